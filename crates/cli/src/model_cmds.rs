//! (placeholder: replaced by the owner of this module)
#[derive(clap::Args)] pub struct ImportArgs {}
pub fn import(_: ImportArgs) -> anyhow::Result<()> { anyhow::bail!("import: not implemented yet") }
#[derive(clap::Args)] pub struct ReplayArgs {}
pub fn replay(_: ReplayArgs) -> anyhow::Result<()> { anyhow::bail!("replay: not implemented yet") }
#[derive(clap::Args)] pub struct BenchTrainStepArgs {}
pub fn bench_train_step(_: BenchTrainStepArgs) -> anyhow::Result<()> { anyhow::bail!("bench_train_step: not implemented yet") }
#[derive(clap::Args)] pub struct BenchEmbedArgs {}
pub fn bench_embed(_: BenchEmbedArgs) -> anyhow::Result<()> { anyhow::bail!("bench_embed: not implemented yet") }
