//! `demovlp`: video-language pre-training and retrieval on region features.
//!
//! Each group of subcommands lives in its own module; this file only wires them up.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "demovlp",
    version,
    about = "DemoVLP: video-language pre-training and retrieval on object-detector region features",
    long_about = "DemoVLP learns text<->video retrieval from region features (Faster R-CNN boxes of a few \
sparsely sampled frames) instead of raw pixels. Start with `demovlp demo`, which needs no downloads."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
