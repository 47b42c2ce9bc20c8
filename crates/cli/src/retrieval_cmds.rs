//! (placeholder: replaced by the owner of this module)
#[derive(clap::Args)] pub struct MetricsArgs {}
pub fn metrics(_: MetricsArgs) -> anyhow::Result<()> { anyhow::bail!("metrics: not implemented yet") }
#[derive(clap::Args)] pub struct BenchEvalSimsArgs {}
pub fn bench_eval_sims(_: BenchEvalSimsArgs) -> anyhow::Result<()> { anyhow::bail!("bench_eval_sims: not implemented yet") }
