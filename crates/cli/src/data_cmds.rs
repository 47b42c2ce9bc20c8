//! (placeholder: replaced by the owner of this module)
#[derive(clap::Args)] pub struct RegionsArgs {}
pub fn regions(_: RegionsArgs) -> anyhow::Result<()> { anyhow::bail!("regions: not implemented yet") }
#[derive(clap::Args)] pub struct TokenizeArgs {}
pub fn tokenize(_: TokenizeArgs) -> anyhow::Result<()> { anyhow::bail!("tokenize: not implemented yet") }
#[derive(clap::Args)] pub struct PackArgs {}
pub fn pack(_: PackArgs) -> anyhow::Result<()> { anyhow::bail!("pack: not implemented yet") }
#[derive(clap::Args)] pub struct BenchDataArgs {}
pub fn bench_data(_: BenchDataArgs) -> anyhow::Result<()> { anyhow::bail!("bench_data: not implemented yet") }
