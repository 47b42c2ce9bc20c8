//! `demovlp index | index-merge | search | explain | serve`: search your own video collection.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use demovlp_search::build::{build_index, merge, parse_shard, ClipList, IndexOptions};
use demovlp_search::search::{table, Engine, SearchResult, DEFAULT_EXACT_THRESHOLD};

#[derive(clap::Args)]
#[command(after_help = "Resumable and appendable: run it again on the same --out to finish an interrupted run or add new clips \
(old clips are not re-embedded). The last stdout line is a JSON summary.")]
pub struct IndexArgs {
    /// A model directory (model.safetensors + config.json) or a training checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Region features: an .npz tree (<root>/<clip>/<i>.npz) or a packed store.
    #[arg(long)]
    features: PathBuf,
    /// Annotation file naming the clips (any supported layout; MSR-VTT: its metadata directory).
    #[arg(long, required_unless_present = "all")]
    annotations: Option<PathBuf>,
    /// Annotation layout when the file name does not tell (webvid, cc3m, didemo, msvd, lsmdc, jsonl).
    #[arg(long)]
    layout: Option<String>,
    /// Every clip directory under --features (or every clip of a packed store).
    #[arg(long, conflicts_with = "annotations")]
    all: bool,
    /// The index directory to write (or extend).
    #[arg(long)]
    out: PathBuf,
    /// Sampled frames per clip (default: the existing index's, else 8).
    #[arg(long)]
    frames: Option<usize>,
    /// Regions per frame (default: the existing index's, else 30).
    #[arg(long)]
    regions: Option<usize>,
    /// Tokenizer for queries: tokenizer.json, vocab.txt, a directory, or builtin:bert-base-uncased (default).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Query text length (default: min(100, the model's text positions)).
    #[arg(long)]
    text_len: Option<usize>,
    /// λ of the region-word alignment (the training config's [loss] lambda).
    #[arg(long, default_value_t = 20.0)]
    lambda: f32,
    /// Region-word means over real positions only (if the model was trained with masked_mean).
    #[arg(long)]
    masked_mean: bool,
    /// Store the local region embeddings in f32 (default f16; its error is measured and reported).
    #[arg(long)]
    fp32: bool,
    /// Clips per model batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Clips per segment (the unit written atomically).
    #[arg(long, default_value_t = 1024)]
    segment_clips: usize,
    /// Index only clip i of every n (i/n), for n parallel jobs; combine with `index-merge`.
    #[arg(long)]
    shard: Option<String>,
    /// Build the ANN graph when the index has at least this many clips.
    #[arg(long, default_value_t = DEFAULT_EXACT_THRESHOLD)]
    exact_threshold: usize,
}

pub fn index(a: IndexArgs) -> Result<()> {
    let clips = match (&a.annotations, a.all) {
        (Some(p), false) => ClipList::Annotations { path: p.clone(), layout: a.layout.clone() },
        (None, true) => ClipList::All,
        _ => bail!("give either --annotations FILE or --all"),
    };
    let mut o = IndexOptions::new(a.model, a.features, clips, a.out.clone());
    (o.frames, o.regions, o.tokenizer, o.text_len) = (a.frames, a.regions, a.tokenizer, a.text_len);
    (o.lambda, o.masked_mean, o.fp32, o.batch_size, o.segment_clips) = (a.lambda, a.masked_mean, a.fp32, a.batch_size, a.segment_clips);
    o.shard = a.shard.as_deref().map(parse_shard).transpose()?;
    o.stop = Some(demovlp_train::trainer::install_ctrlc());
    let s = build_index(&o)?;
    for (c, why) in s.skipped.iter().take(20) {
        eprintln!("skipped {c}: {why}");
    }
    if s.skipped.len() > 20 {
        eprintln!("... and {} more skipped", s.skipped.len() - 20);
    }
    println!(
        "indexed {} clips ({} already in the index, {} skipped) in {:.1} s, {:.1} MB written; index now {} clips; fp16 max relative error {:.2e}",
        s.clips,
        s.already_indexed,
        s.skipped.len(),
        s.seconds,
        s.bytes as f64 / 1e6,
        s.total_clips,
        s.fp16_max_rel_err
    );
    if !s.interrupted && s.total_clips >= a.exact_threshold {
        let idx = demovlp_search::store::Index::open(&a.out)?;
        let t = std::time::Instant::now();
        demovlp_search::ann::Ann::load_or_build(&idx)?;
        eprintln!("ANN graph ready in {:.1} s", t.elapsed().as_secs_f64());
    }
    println!("{}", serde_json::to_string(&s)?);
    if s.interrupted {
        eprintln!("interrupted; run the same command again to continue");
        std::process::exit(130);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct IndexMergeArgs {
    /// The new index directory.
    #[arg(long)]
    out: PathBuf,
    /// Indexes built with the same settings (e.g. the --shard i/n parts).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn index_merge(a: IndexMergeArgs) -> Result<()> {
    let m = merge(&a.inputs, &a.out)?;
    println!("merged {} indexes into {}: {} clips, {} segments", a.inputs.len(), a.out.display(), m.clips, m.segments.len());
    Ok(())
}

#[derive(clap::Args)]
#[command(
    after_help = "With --json one line per query: {\"query\": ..., \"results\": [{\"clip\", \"score\", \"global\", \"local\"}, ...]} best first."
)]
pub struct SearchArgs {
    /// The index directory (`demovlp index`).
    index: PathBuf,
    /// The query text.
    #[arg(required_unless_present = "queries")]
    text: Option<String>,
    /// A file with one query per line (blank lines skipped).
    #[arg(long, conflicts_with = "text")]
    queries: Option<PathBuf>,
    /// Results per query.
    #[arg(short = 'k', long, default_value_t = 10)]
    k: usize,
    /// Re-rank this many global candidates by global + region-word score (0: global only).
    #[arg(long, default_value_t = 100)]
    rerank: usize,
    /// Scan exactly below this many clips, else use the ANN graph.
    #[arg(long, default_value_t = DEFAULT_EXACT_THRESHOLD)]
    exact_threshold: usize,
    #[arg(long)]
    json: bool,
}

pub fn search(a: SearchArgs) -> Result<()> {
    let engine = Engine::open_with_ann(&a.index, a.exact_threshold)?;
    let mut model = engine.load_model()?;
    let queries: Vec<String> = match (&a.text, &a.queries) {
        (Some(t), None) => vec![t.clone()],
        (None, Some(p)) => std::io::BufReader::new(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?)
            .lines()
            .collect::<std::io::Result<Vec<_>>>()?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect(),
        _ => bail!("give a query text or --queries FILE"),
    };
    for q in &queries {
        let r: SearchResult = engine.search(&mut model, q, a.k, a.rerank)?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            print!("{}", table(&r));
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The index directory.
    index: PathBuf,
    /// The clip id (as in the annotations).
    #[arg(long)]
    clip: String,
    /// The text.
    text: String,
    /// Print the explanation as JSON.
    #[arg(long)]
    json: bool,
    /// Write the SVG picture here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder of frame images to draw on: <dir>/<clip>/<frame>.jpg|png (or <dir>/<frame>.jpg|png).
    #[arg(long)]
    images: Option<PathBuf>,
}

pub fn explain(a: ExplainArgs) -> Result<()> {
    let engine = Engine::open(&a.index)?;
    let mut model = engine.load_model()?;
    let e = engine.explain(&mut model, &a.clip, &a.text)?;
    if let Some(p) = &a.out {
        demovlp_search::explain::write_svg(&e, a.images.as_deref(), p)?;
        eprintln!("wrote {}", p.display());
    }
    if a.json {
        println!("{}", serde_json::to_string(&e)?);
    } else {
        println!("clip {}  score {:.4} (global {:.4} + local {:.4})", e.clip, e.score, e.global, e.local);
        for w in &e.words {
            let regs: Vec<String> =
                w.regions.iter().take(3).map(|r| format!("frame {} region {} ({:.2})", r.frame, r.region, r.weight)).collect();
            println!("{:>12}  {}", w.word, regs.join(", "));
        }
    }
    Ok(())
}
