//! `demovlp index | index-merge | search | explain | serve`: search your own video collection.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use demovlp_search::build::{ensure_ann, merge, parse_shard, ClipList, IndexOptions};
use demovlp_search::codes::ensure_codes;
use demovlp_search::quality::{exhaustive, Tally};
use demovlp_search::search::{default_rerank, table, Engine, FirstStage, SearchResult, DEFAULT_EXACT_THRESHOLD};

#[derive(clap::Args)]
#[command(after_help = "Resumable and appendable: run it again on the same --out to finish an interrupted run or add new clips \
(old clips are not re-embedded; another model is refused). Then the region codes the default search \
first stage uses are built (and the ANN graph above --exact-threshold). The last stdout line is a JSON summary; the \
exit status is 1 when nothing was indexed.")]
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
    /// Every clip directory under --features, at any depth (or every clip of a packed store).
    #[arg(long, conflicts_with = "annotations")]
    all: bool,
    /// The index directory to write (or extend).
    #[arg(long)]
    out: PathBuf,
    /// Sampled frames per clip (default: the existing index's, else the model's saved training
    /// config's [data] frames, else 8; a value that differs from the saved one warns).
    #[arg(long)]
    frames: Option<usize>,
    /// Regions per frame (default: the existing index's, else the training config's [data] regions, else 30).
    #[arg(long)]
    regions: Option<usize>,
    /// Tokenizer for queries: tokenizer.json, vocab.txt, a directory, or builtin:bert-base-uncased (default).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Query text length (default: the existing index's, else the training config's [data]
    /// text_len, else min(100, the model's text positions)).
    #[arg(long)]
    text_len: Option<usize>,
    /// λ of the region-word alignment, stored in the index (default: the model's saved
    /// training config's [loss] lambda — a checkpoint's embedded config, or train_config.toml /
    /// config.toml in a model directory — else 20; a value that differs from the saved one warns).
    #[arg(long)]
    lambda: Option<f32>,
    /// Region-word means over real positions only: --masked-mean or --masked-mean=false
    /// (default: the saved training config's [loss] masked_mean, else false).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    masked_mean: Option<bool>,
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
    /// Where to embed the clips (and the GEMM precision on a GPU).
    #[command(flatten)]
    device: crate::device::DeviceArgs,
}

/// `index`'s embedding on the chosen backend.
struct IndexJob<'a>(&'a IndexOptions);

impl crate::device::OnBackend for IndexJob<'_> {
    type Out = demovlp_search::build::IndexSummary;
    fn run<B: demovlp_model::Backend>(self, be: &B, device: &str) -> Result<Self::Out> {
        if device != "cpu" {
            eprintln!("embedding clips on {device}");
        }
        let source = demovlp_train::annotations::open_features(&self.0.features)?;
        demovlp_search::build::build_index_on(be, self.0, source)
    }
}

pub fn index(a: IndexArgs) -> Result<()> {
    crate::device::check_available(&a.device)?;
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
    let s = crate::device::with_backend(&a.device, IndexJob(&o))?;
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
    if !s.interrupted && s.total_clips > 0 {
        if let Some(secs) = ensure_ann(&a.out, a.exact_threshold)? {
            eprintln!("ANN graph ready in {secs:.1} s");
        }
        let c = ensure_codes(&a.out, None)?;
        if c.seconds > 0.0 {
            eprintln!(
                "region codes ready in {:.1} s: {} centroids, {:.1} MB ({} clips)",
                c.seconds,
                c.centroids,
                c.bytes as f64 / 1e6,
                s.total_clips
            );
        }
    }
    println!("{}", serde_json::to_string(&s)?);
    if s.clips == 0 && s.already_indexed == 0 && !s.interrupted {
        bail!(
            "nothing was indexed: {} clips found{}",
            s.skipped.len(),
            if s.skipped.is_empty() { " (check --annotations / --all and --features)" } else { ", every one skipped (reasons above)" }
        );
    }
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
    /// Build the ANN graph when the merged index has at least this many clips (as `index` does).
    #[arg(long, default_value_t = DEFAULT_EXACT_THRESHOLD)]
    exact_threshold: usize,
}

pub fn index_merge(a: IndexMergeArgs) -> Result<()> {
    let m = merge(&a.inputs, &a.out, a.exact_threshold)?;
    let c = ensure_codes(&a.out, None)?;
    eprintln!("region codes ready in {:.1} s: {} centroids, {:.1} MB", c.seconds, c.centroids, c.bytes as f64 / 1e6);
    println!("merged {} indexes into {}: {} clips, {} segments", a.inputs.len(), a.out.display(), m.clips, m.segments.len());
    Ok(())
}

#[derive(clap::Args)]
#[command(after_help = "Opening an index (search, explain, serve) checks its small files (clip ids, global embeddings, masks, \
frame numbers); this checks all of them — the local embeddings and boxes too, the bulk of an index — and the region codes, \
and counts non-finite values in the embeddings and boxes. Prints each problem (naming its file) on stderr and one JSON line \
{\"index\", \"segments\", \"clips\", \"files_checked\", \"bytes_checked\", \"problems\": [...], \"seconds\"} on stdout; \
exit status 1 when there is a problem.")]
pub struct VerifyArgs {
    /// The index directory (`demovlp index`).
    index: PathBuf,
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let r = demovlp_search::verify::verify(&a.index)?;
    for p in &r.problems {
        eprintln!("{p}");
    }
    println!("{}", serde_json::to_string(&r)?);
    if !r.problems.is_empty() {
        bail!("{}: {} problem(s) in {} files checked", a.index.display(), r.problems.len(), r.files_checked);
    }
    eprintln!(
        "{}: {} files, {:.1} MB, all match their checksums ({:.1} s)",
        a.index.display(),
        r.files_checked,
        r.bytes_checked as f64 / 1e6,
        r.seconds
    );
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
    /// Re-rank this many first-stage candidates by the exact global + region-word score
    /// (0: global only; at least the index's clips: every clip, i.e. exhaustive scoring).
    /// Default: 100 + 1 per 10 000 clips, at most 300 (see docs/search.md).
    #[arg(long)]
    rerank: Option<usize>,
    /// Where the candidates come from: regions (the region cascade: every clip by a coarse
    /// region-code score, then the best --coarse-depth of those by the exact formula on their
    /// regions' centroids), codes (global cosine + the coarse score alone: the previous
    /// release's default) or global (the global embedding alone: exact scan, the HNSW graph
    /// above --exact-threshold — the two-stage search of old). See docs/search.md.
    #[arg(long, default_value = "regions", value_parser = ["regions", "codes", "global"])]
    first_stage: String,
    /// Clips the region cascade's coarse step passes on (default: 1% of the clips, at least
    /// 1000, at most 20 000).
    #[arg(long)]
    coarse_depth: Option<usize>,
    /// Also score every query exhaustively (every clip, global + region-word, as `eval`) and
    /// end with one JSON line: {"vs_exhaustive": {"queries", "k", "agreement_at_1",
    /// "recall_at_k", "p50_ms", "p99_ms"}} (latency of the search itself, text tower excluded).
    #[arg(long)]
    vs_exhaustive: bool,
    /// Use this model instead of the one recorded in the index (it must be the same model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Scan exactly below this many clips, else use the ANN graph.
    #[arg(long, default_value_t = DEFAULT_EXACT_THRESHOLD)]
    exact_threshold: usize,
    #[arg(long)]
    json: bool,
    /// Score with this λ instead of the one stored in the index (warns when they differ).
    #[arg(long)]
    lambda: Option<f32>,
    /// Score with --masked-mean / --masked-mean=false instead of the index's setting (warns when they differ).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    masked_mean: Option<bool>,
    /// Where the queries' text tower and the re-rank scores run (the first stage and the
    /// index stay in host memory; `--vs-exhaustive`'s reference is scored on the host).
    #[command(flatten)]
    device: crate::device::DeviceArgs,
}

pub fn search(a: SearchArgs) -> Result<()> {
    crate::device::check_available(&a.device)?;
    let stage = FirstStage::from_name(&a.first_stage)?;
    let mut engine = Engine::open_for(&a.index, stage, a.exact_threshold)?;
    engine.coarse_depth = a.coarse_depth;
    for w in engine.override_loss(a.lambda, a.masked_mean) {
        eprintln!("warning: {w}");
    }
    let model = engine.load_model_from(a.model.as_deref())?;
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
    let device = a.device.clone();
    crate::device::run_model(&device, model, Queries { a, engine, queries })
}

/// The queries of `search`, run with the model on the chosen backend.
struct Queries {
    a: SearchArgs,
    engine: Engine,
    queries: Vec<String>,
}

impl crate::device::OnModel for Queries {
    fn run<B: demovlp_model::backend::Backend>(self, mut model: demovlp_model::Model<B>, device: &str) -> Result<()> {
        let Queries { a, mut engine, queries } = self;
        if device != "cpu" {
            engine.score_on(model.backend().clone(), device);
            eprintln!("searching on {device}: the text tower and the re-rank scores");
        }
        let rerank = a.rerank.unwrap_or_else(|| default_rerank(engine.index.len()));
        let mut tally = Tally::default();
        for q in &queries {
            let e = engine.embed_query(&mut model, q)?;
            let t0 = std::time::Instant::now();
            let r = SearchResult { query: q.clone(), results: engine.try_search_embedded(&e, a.k, rerank)? };
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if a.vs_exhaustive {
                tally.add(&r.results, &exhaustive(&engine, &e, a.k), ms);
            }
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", table(&r).trim_end());
            }
        }
        if a.vs_exhaustive {
            let s = tally.finish(a.k);
            if !a.json {
                eprintln!(
                    "vs exhaustive scoring over {} queries: agreement@1 {:.3}, recall@{} {:.3}; search p50 {:.1} ms, p99 {:.1} ms",
                    s.queries, s.agreement_at_1, s.k, s.recall_at_k, s.p50_ms, s.p99_ms
                );
            }
            println!("{}", serde_json::json!({ "vs_exhaustive": s }));
        }
        Ok(())
    }
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
    /// Use this model instead of the one recorded in the index (it must be the same model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Score with this λ instead of the one stored in the index (warns when they differ).
    #[arg(long)]
    lambda: Option<f32>,
    /// Score with --masked-mean / --masked-mean=false instead of the index's setting (warns when they differ).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    masked_mean: Option<bool>,
}

pub fn explain(a: ExplainArgs) -> Result<()> {
    let mut engine = Engine::open(&a.index)?;
    for w in engine.override_loss(a.lambda, a.masked_mean) {
        eprintln!("warning: {w}");
    }
    let mut model = engine.load_model_from(a.model.as_deref())?;
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

#[derive(clap::Args)]
#[command(after_help = "The collection is synthetic (see the search crate's synth module): global embeddings are unit vectors \
with planted neighbours (groups of 5 clips within topics of 200; a query is a new member of a random group, so its exact top 10 \
is its group plus the 5 closest of its topic), local embeddings have the index's real shapes (frames × regions × dim in fp16, \
10 to all regions real per frame) but every segment after the first hard-links the first one's local files, so 1M clips take \
≈ 1 GB of global vectors + one segment of locals on disk. The query text embedding is a random [text-len − 1, dim] token tensor \
(--query-tokens of it real): the text tower is NOT timed (see `bench embed`). Timed with the same code `search` runs: the \
memory-mapped index, the saved and re-mapped HNSW graph, the exact scan (the baseline and the recall oracle; ANN and exact \
alternate in blocks of 10 queries), the exact global + region-word re-rank. Latencies are single queries on all threads \
(RAYON_NUM_THREADS). The last stdout line is one JSON object: clips, build_s, p50_ms, p99_ms (global top-k), recall_at_10 \
(recall@k against the exact scan), exact_p50_ms, ratio_vs_exact, rerank_p50_ms (local scoring of the --rerank candidates), \
search_p50_ms (candidates + re-rank), peak_rss_mb (the larger of the peak RSS up to the graph build and the PSS sampled \
while querying: the kernel's own peak RSS, vmhwm_mb, counts the shared local file once per segment), a sweep over --ef-sweep, \
data (what the collection is), agreement_at_1 / recall_at_10_vs_exhaustive (the whole search against exhaustive \
scoring on exhaustive_queries of the timed queries; null, with exhaustive_note saying why, when none fit the budget). \
With --model DIR the collection is instead generated by the demo's synthetic world and embedded by that model, and the JSON \
line reports the region and global first stages against exhaustive scoring (see --model).")]
pub struct BenchSearchArgs {
    /// Clips in the synthetic collection.
    #[arg(long, default_value_t = 100_000)]
    clips: usize,
    /// Timed queries (after --warmup untimed ones).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Untimed queries first (the fresh mappings' page faults).
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Results per query (recall is recall@k against the exact scan).
    #[arg(short = 'k', long, default_value_t = 10)]
    k: usize,
    /// Candidates re-ranked by global + region-word score (0: skip the re-rank timing).
    #[arg(long, default_value_t = 100)]
    rerank: usize,
    /// Where the global top-k comes from: ann (the HNSW graph at any size), exact (the scan,
    /// no graph), auto (as `search`: the graph at ≥ 50 000 clips).
    #[arg(long, default_value = "ann", value_parser = ["ann", "exact", "auto"])]
    candidates: String,
    /// Embedding width P (the model's proj_dim; published 256).
    #[arg(long, default_value_t = 256)]
    dim: usize,
    /// Frames × regions of the stored local embeddings (the index defaults: 8 × 30).
    #[arg(long, default_value_t = 8)]
    frames: usize,
    /// Regions per frame of the stored local embeddings.
    #[arg(long, default_value_t = 30)]
    regions: usize,
    /// Text length L of the index (query token embeddings are [L − 1, dim]).
    #[arg(long, default_value_t = 100)]
    text_len: usize,
    /// Real tokens of a query (a typical one-sentence query; the rest is padding).
    #[arg(long, default_value_t = 12)]
    query_tokens: usize,
    /// HNSW M (default: what `index` builds).
    #[arg(long)]
    connectivity: Option<usize>,
    /// HNSW ef_construction (default: what `index` builds).
    #[arg(long)]
    expansion_add: Option<usize>,
    /// HNSW ef_search (default: what `search` uses).
    #[arg(long)]
    expansion_search: Option<usize>,
    /// Vectors inside the graph: f32, f16 or i8 (default: what `index` builds).
    #[arg(long)]
    quantization: Option<String>,
    /// More ef_search values measured on the same graph, comma-separated (e.g. 64,128,256).
    #[arg(long, value_delimiter = ',')]
    ef_sweep: Vec<usize>,
    /// Clips per segment (the index's default).
    #[arg(long, default_value_t = 1024)]
    segment_clips: usize,
    /// Seed of the synthetic collection and queries.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the index here (must not exist; default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the index directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Print only the JSON line on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Benchmark on a collection embedded by this trained model instead (e.g. `demo --quick
    /// --out demo-out`'s demo-out/global_rwa_model): the demo's synthetic world generates
    /// --clips clips, the model embeds them, the region codes are built; then search at -k /
    /// --rerank with the region first stage and with the global one, and agreement@1 /
    /// recall@k against exhaustive scoring on --exhaustive-queries of the --queries. The
    /// planted-data flags (--dim, --frames, ...) do not apply.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Queries also scored exhaustively (every clip, global + region-word; slow at large
    /// --clips) for agreement@1 / recall@k of the whole search. Default: 50 with --model; on
    /// planted data as many timed queries as fit 200 000 clip scorings (none at 1M clips: the
    /// JSON's exhaustive_note says so).
    #[arg(long)]
    exhaustive_queries: Option<usize>,
    /// With --model: more --rerank depths of the region first stage measured on the exhaustive
    /// sample, comma-separated (e.g. 300,1000).
    #[arg(long, value_delimiter = ',')]
    rerank_sweep: Vec<usize>,
    /// With --model: the region cascade's coarse depth (default: `search`'s for --clips).
    #[arg(long)]
    coarse_depth: Option<usize>,
}

fn bench_search_model(a: &BenchSearchArgs, model: &std::path::Path) -> Result<()> {
    use demovlp_search::bench_model::{run, ModelBenchOptions};
    let o = ModelBenchOptions {
        model: model.to_path_buf(),
        clips: a.clips,
        queries: a.queries,
        exhaustive_queries: a.exhaustive_queries.unwrap_or(50),
        k: a.k,
        rerank: a.rerank,
        seed: a.seed,
        dir: a.dir.clone(),
        keep: a.keep,
        rerank_sweep: a.rerank_sweep.clone(),
        coarse_depth: a.coarse_depth,
    };
    let r = run(&o, &|s| eprintln!("{s}"))?;
    if !a.json {
        println!("bench search: {} ({} threads)", r.data, r.threads);
        println!(
            "  build {:.1} s (embedding {:.1} s, region codes {:.1} s: {} centroids, {:.1} MB); index {:.1} MB on disk; peak memory {:.0} MB (at the end: {:.0} MB anonymous, {:.0} MB mapped index pages); coarse depth {}",
            r.build_s,
            r.embed_s,
            r.codes_s,
            r.centroids,
            r.codes_bytes as f64 / 1e6,
            r.index_bytes as f64 / 1e6,
            r.peak_rss_mb,
            r.end_rss_anon_mb,
            r.end_rss_file_mb,
            r.coarse_depth
        );
        for (name, p50, p99, a1, rk) in [
            ("regions (default)", r.p50_ms, r.p99_ms, r.agreement_at_1, r.recall_at_10_vs_exhaustive),
            (
                "codes (previous release)",
                r.codes_stage.p50_ms,
                r.codes_stage.p99_ms,
                r.codes_stage.agreement_at_1,
                r.codes_stage.recall_at_10_vs_exhaustive,
            ),
            (
                "global",
                r.global_stage.p50_ms,
                r.global_stage.p99_ms,
                r.global_stage.agreement_at_1,
                r.global_stage.recall_at_10_vs_exhaustive,
            ),
        ] {
            println!(
                "  first stage {name}: -k {} --rerank {}: p50 {p50:.1} ms, p99 {p99:.1} ms; vs exhaustive ({} queries): agreement@1 {a1:.3}, recall@{} {rk:.3}",
                r.k, r.rerank, r.exhaustive_queries, r.k
            );
        }
        for p in &r.sweep {
            println!(
                "    regions --rerank {:5}: p50 {:.1} ms, p99 {:.1} ms; agreement@1 {:.3}, recall@{} {:.3}",
                p.rerank, p.p50_ms, p.p99_ms, p.agreement_at_1, r.k, p.recall_at_10_vs_exhaustive
            );
        }
        println!("  exhaustive scoring p50 {:.1} ms", r.exhaustive_p50_ms);
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

pub fn bench_search(a: BenchSearchArgs) -> Result<()> {
    if let Some(m) = a.model.clone() {
        return bench_search_model(&a, &m);
    }
    use demovlp_search::ann::{AnnParams, Quantization};
    use demovlp_search::bench::{run, BenchOptions, Candidates};
    let d = AnnParams::default();
    let params = AnnParams {
        connectivity: a.connectivity.unwrap_or(d.connectivity),
        expansion_add: a.expansion_add.unwrap_or(d.expansion_add),
        expansion_search: a.expansion_search.unwrap_or(d.expansion_search),
        quantization: a
            .quantization
            .as_deref()
            .map(Quantization::from_name)
            .transpose()
            .context("--quantization")?
            .unwrap_or(d.quantization),
    };
    if params.connectivity < 2 || params.expansion_add == 0 || params.expansion_search == 0 || a.ef_sweep.contains(&0) {
        bail!("--connectivity must be ≥ 2 and --expansion-add / --expansion-search / --ef-sweep positive");
    }
    if a.clips == 0 || a.dim == 0 || a.frames == 0 || a.regions == 0 || a.text_len < 2 || a.segment_clips == 0 {
        bail!("--clips, --dim, --frames, --regions, --segment-clips must be positive and --text-len ≥ 2");
    }
    let candidates = match a.candidates.as_str() {
        "ann" => Candidates::Ann,
        "exact" => Candidates::Exact,
        _ => Candidates::Auto,
    };
    let spec = demovlp_search::synth::SynthSpec {
        clips: a.clips,
        dim: a.dim,
        frames: a.frames,
        regions: a.regions,
        text_len: a.text_len,
        query_tokens: a.query_tokens,
        segment_clips: a.segment_clips,
        seed: a.seed,
    };
    let o = BenchOptions {
        spec,
        queries: a.queries,
        warmup: a.warmup,
        k: a.k,
        rerank: a.rerank,
        candidates,
        params,
        sweep: a.ef_sweep,
        dir: a.dir,
        keep: a.keep,
        exhaustive_queries: a.exhaustive_queries,
    };
    let r = run(&o, &|s| eprintln!("{s}"))?;
    let peak = r.peak_rss_mb;
    if !a.json {
        println!(
            "bench search: {} clips, {} threads, {} candidates{}",
            r.clips,
            r.threads,
            r.candidates,
            r.params.map_or(String::new(), |p| format!(
                " (HNSW M {}, ef_construction {}, ef_search {}, {})",
                p.connectivity,
                p.expansion_add,
                p.expansion_search,
                p.quantization.name()
            ))
        );
        println!(
            "  graph build {:.1} s, save + map {:.1} s, graph {:.1} MB; index {:.1} MB",
            r.build_s,
            r.save_load_s,
            r.graph_bytes as f64 / 1e6,
            r.index_bytes as f64 / 1e6
        );
        println!(
            "  global top-{}: p50 {:.2} ms, p99 {:.2} ms, recall@{} {:.4}; exact scan p50 {:.2} ms, p99 {:.2} ms (ratio {:.3})",
            r.k, r.p50_ms, r.p99_ms, r.k, r.recall_at_10, r.exact_p50_ms, r.exact_p99_ms, r.ratio_vs_exact
        );
        for s in r.sweep.iter().skip(1) {
            println!(
                "    ef_search {:4}: p50 {:.2} ms, p99 {:.2} ms, recall@{} {:.4}",
                s.expansion_search, s.p50_ms, s.p99_ms, r.k, s.recall_at_10
            );
        }
        if r.rerank > 0 {
            println!(
                "  re-rank of {} candidates: p50 {:.2} ms, p99 {:.2} ms; whole search (top-{} + re-rank) p50 {:.2} ms, p99 {:.2} ms",
                r.rerank, r.rerank_p50_ms, r.rerank_p99_ms, r.rerank, r.search_p50_ms, r.search_p99_ms
            );
        }
        match (r.agreement_at_1, r.recall_at_10_vs_exhaustive) {
            (Some(a1), Some(rk)) => println!(
                "  whole search vs exhaustive scoring ({} queries, p50 {:.1} ms each): agreement@1 {a1:.3}, recall@{} {rk:.3} \
                 (planted data, random local embeddings; --model measures a trained model's search)",
                r.exhaustive_queries,
                r.exhaustive_p50_ms.unwrap_or(f64::NAN),
                r.k
            ),
            _ => println!("  vs exhaustive scoring: {}", r.exhaustive_note.as_deref().unwrap_or("not measured")),
        }
        println!(
            "  planted group in the exact top-{}: {:.3}; peak memory {peak:.0} MB (while querying: {:.0} MB PSS; kernel peak RSS {:.0} MB counts the shared local file once per segment)",
            r.k, r.planted_in_exact, r.search_rss_mb, r.vmhwm_mb
        );
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
