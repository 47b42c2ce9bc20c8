//! (placeholder: replaced by the owner of this module)
#[derive(clap::Args)] pub struct DemoArgs {}
pub fn demo(_: DemoArgs) -> anyhow::Result<()> { anyhow::bail!("demo: not implemented yet") }
#[derive(clap::Args)] pub struct PretrainArgs {}
pub fn pretrain(_: PretrainArgs) -> anyhow::Result<()> { anyhow::bail!("pretrain: not implemented yet") }
#[derive(clap::Args)] pub struct FinetuneArgs {}
pub fn finetune(_: FinetuneArgs) -> anyhow::Result<()> { anyhow::bail!("finetune: not implemented yet") }
#[derive(clap::Args)] pub struct EvalArgs {}
pub fn eval(_: EvalArgs) -> anyhow::Result<()> { anyhow::bail!("eval: not implemented yet") }
