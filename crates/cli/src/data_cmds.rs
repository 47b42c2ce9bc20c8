//! `demovlp regions | tokenize | pack | bench data`: the data layer's commands.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use demovlp_data::regions::{select_clip, FrameChoice, NpzTree};
use demovlp_data::tokenizer::{TextTokenizer, DEFAULT_MAX_LEN};

/// Write the evaluation-path model input of one clip directory (`<clip_dir>/<i>.npz`).
///
/// Picks k = min(S, V) frames (the middle of each of S segments), keeps each frame's
/// top-R regions by confidence (edge-padded, masked) and writes a safetensors file with
/// `object` f32 [k,R,2054], `mask` f32 [k,R] (1 real, 0 padding), `frames` i64 [k].
#[derive(Args)]
pub struct RegionsArgs {
    /// Clip directory holding 0.npz, 1.npz, ... (the extractor's layout).
    pub clip_dir: PathBuf,
    /// Number of segments S (frames wanted).
    #[arg(long, default_value_t = 8)]
    pub segments: usize,
    /// Regions per frame R.
    #[arg(long, default_value_t = 30)]
    pub regions: usize,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn regions(a: RegionsArgs) -> Result<()> {
    let dir = a.clip_dir.canonicalize().with_context(|| format!("{}: clip directory not found", a.clip_dir.display()))?;
    let clip = dir.file_name().context("clip directory has no name")?.to_string_lossy().into_owned();
    let root = dir.parent().context("clip directory has no parent")?;
    let src = NpzTree::new(root);
    let input = select_clip(&src, &clip, a.segments, a.regions, FrameChoice::Middle)?;
    input.write_safetensors(&a.out)?;
    let real: f32 = input.mask.iter().sum();
    eprintln!(
        "{}: frames {:?}, {} real regions of {} slots -> {}",
        clip,
        input.frame_indices,
        real,
        input.mask.len(),
        a.out.display()
    );
    Ok(())
}

/// Tokenize lines of stdin into padded uncased WordPiece ids.
///
/// Prints one JSON object per input line: {"input_ids": [...], "attention_mask": [...]},
/// each exactly --max-len long ([CLS] ... [SEP], padded with id 0 / mask 0).
#[derive(Args)]
pub struct TokenizeArgs {
    /// tokenizer.json, a BERT vocab.txt, or a directory containing either.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output length (truncate / pad to exactly this many tokens).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    pub max_len: usize,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = TextTokenizer::from_path(&a.tokenizer)?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.with_context(|| format!("stdin line {}: not UTF-8", n + 1))?;
        let (ids, mask) = tok.encode(&line, a.max_len)?;
        serde_json::to_writer(&mut out, &serde_json::json!({ "input_ids": ids, "attention_mask": mask }))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

#[derive(Args)]
pub struct PackArgs {}
pub fn pack(_: PackArgs) -> Result<()> {
    anyhow::bail!("pack: not implemented yet")
}
#[derive(Args)]
pub struct BenchDataArgs {}
pub fn bench_data(_: BenchDataArgs) -> Result<()> {
    anyhow::bail!("bench_data: not implemented yet")
}
