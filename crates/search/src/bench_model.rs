//! `demovlp bench search --data model`: search on a collection embedded by a real trained
//! model, where the region-word term decides the ranking. The demo's synthetic world
//! generates as many clips as asked (features on demand, never written), the model embeds
//! them into an index (timed: the build), the region codes are built (timed), then queries
//! — captions of clips spread over the collection, embedded untimed — are searched at the
//! given settings (timed, single queries on all threads) and, for a sample of them, scored
//! exhaustively (every clip, global + region-word, as `eval` scores) to measure agreement@1
//! and recall@k. The old global first stage is measured on the same queries alongside.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_train::synthetic::{CorpusConfig, Split, SyntheticCorpus};
use serde::Serialize;

use crate::bench::{dir_bytes, peak_rss_mb, quantile, rss_split_mb, Cleanup};
use crate::build::{build_index_from, ClipList, IndexOptions};
use crate::codes::ensure_codes;
use crate::quality::{exhaustive, Tally};
use crate::search::{Engine, FirstStage};

#[derive(Clone, Debug)]
pub struct ModelBenchOptions {
    /// The trained model (a model directory with its training config, e.g. the demo's).
    pub model: PathBuf,
    pub clips: usize,
    /// Timed queries.
    pub queries: usize,
    /// Of those, scored exhaustively too (the agreement sample).
    pub exhaustive_queries: usize,
    pub k: usize,
    pub rerank: usize,
    pub seed: u64,
    pub dir: Option<PathBuf>,
    pub keep: bool,
    /// More re-rank depths measured with the region first stage on the exhaustive sample.
    pub rerank_sweep: Vec<usize>,
    /// The cascade's coarse depth (`None`: `search`'s default for the collection's size).
    pub coarse_depth: Option<usize>,
}

/// One re-rank depth of the region first stage, on the exhaustive sample.
#[derive(Clone, Debug, Serialize)]
pub struct DepthPoint {
    pub rerank: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub agreement_at_1: f64,
    pub recall_at_10_vs_exhaustive: f64,
}

/// Latency and agreement of one first stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageFigures {
    pub first_stage: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub agreement_at_1: f64,
    pub recall_at_10_vs_exhaustive: f64,
}

impl StageFigures {
    fn of(first_stage: &'static str, ms: &[f64], a: &crate::quality::Agreement) -> StageFigures {
        StageFigures {
            first_stage,
            p50_ms: quantile(ms, 0.5),
            p99_ms: quantile(ms, 0.99),
            agreement_at_1: a.agreement_at_1,
            recall_at_10_vs_exhaustive: a.recall_at_k,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelBenchReport {
    pub bench: &'static str,
    /// What the collection is.
    pub data: String,
    pub model: String,
    pub clips: usize,
    pub frames: usize,
    pub regions: usize,
    pub dim: usize,
    pub queries: usize,
    pub exhaustive_queries: usize,
    pub k: usize,
    pub rerank: usize,
    /// Clips the region cascade's coarse step passes to its centroid step.
    pub coarse_depth: usize,
    pub threads: usize,
    /// Embedding the collection into the index (the model's video tower on the generated features).
    pub embed_s: f64,
    /// Training the region codebook and coding every region.
    pub codes_s: f64,
    pub build_s: f64,
    /// The index directory on disk (segments + region codes), and the codes alone.
    pub index_bytes: u64,
    pub codes_bytes: u64,
    pub centroids: usize,
    /// Search at the defaults (region first stage): latency of the search itself (the text
    /// tower excluded), agreement with exhaustive scoring on the sample.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub agreement_at_1: f64,
    pub recall_at_10_vs_exhaustive: f64,
    /// Exhaustive scoring's own latency (every clip re-ranked).
    pub exhaustive_p50_ms: f64,
    /// The same queries through the old global first stage.
    pub global_stage: StageFigures,
    /// The same queries through the previous release's region first stage (global cosine +
    /// the coarse region-code score, then the exact re-rank).
    pub codes_stage: StageFigures,
    /// The region first stage at other re-rank depths (`--rerank-sweep`), on the exhaustive sample.
    pub sweep: Vec<DepthPoint>,
    /// Peak resident memory of the whole bench process (VmHWM: anonymous + the index's
    /// memory-mapped pages, which the exhaustive reference scoring touches in full).
    pub peak_rss_mb: f64,
    /// Resident memory at the end, split into anonymous and file-backed (mapped index pages).
    pub end_rss_anon_mb: f64,
    pub end_rss_file_mb: f64,
}

/// Runs the benchmark; `say` gets the progress lines.
pub fn run(o: &ModelBenchOptions, say: &dyn Fn(String)) -> Result<ModelBenchReport> {
    if o.clips == 0 || o.queries == 0 || o.k == 0 {
        bail!("--clips, --queries and -k must be positive");
    }
    let ex_n = o.exhaustive_queries.min(o.queries);
    let (dir, _cleanup) = match &o.dir {
        Some(d) => {
            if d.exists() {
                bail!("{}: exists; bench writes a new index", d.display());
            }
            (d.clone(), Cleanup(if o.keep { None } else { Some(d.clone()) }))
        }
        None => {
            let d = std::env::temp_dir().join(format!("demovlp-bench-search-model-{}", std::process::id()));
            (d.clone(), Cleanup(if o.keep { None } else { Some(d) }))
        }
    };
    let mut cfg = CorpusConfig::new(o.seed);
    (cfg.pretrain_videos, cfg.pretrain_images, cfg.finetune_train, cfg.val, cfg.test) = (0, 0, 0, 0, o.clips);
    let data = format!(
        "model-embedded synthetic world: {} clips of the demo's corpus generator (seed {}, test split), embedded by {}",
        o.clips,
        o.seed,
        o.model.display()
    );
    say(format!("bench search: {data}"));
    let corpus = Arc::new(SyntheticCorpus::new(cfg));
    let samples = corpus.samples(Split::Test);
    let ids: Vec<String> = samples.iter().map(|s| s.clip.clone()).collect();
    let mut opt = IndexOptions::new(o.model.clone(), PathBuf::from("synthetic:features"), ClipList::Ids(ids), dir.clone());
    opt.batch_size = 64;
    let t = Instant::now();
    let s = build_index_from(&opt, corpus.clone())?;
    let embed_s = t.elapsed().as_secs_f64();
    if !s.skipped.is_empty() {
        bail!("{} clips could not be embedded, e.g. {:?}", s.skipped.len(), s.skipped[0]);
    }
    say(format!("embedded {} clips in {embed_s:.1} s", s.total_clips));
    let c = ensure_codes(&dir, None)?;
    say(format!("region codes: {} centroids, {:.1} MB, {:.1} s", c.centroids, c.bytes as f64 / 1e6, c.seconds));
    let build_peak = peak_rss_mb();
    let index_bytes = dir_bytes(&dir);

    let mut regions = Engine::open_for(&dir, FirstStage::Regions, usize::MAX)?;
    regions.coarse_depth = o.coarse_depth;
    let coarse_depth = o.coarse_depth.unwrap_or_else(|| crate::search::default_coarse_depth(regions.index.len()));
    let global = Engine::open_for(&dir, FirstStage::Global, usize::MAX)?;
    let codes = Engine::open_for(&dir, FirstStage::Codes, usize::MAX)?;
    let mut model = regions.load_model().context("the bench's model")?;
    // Queries: the first caption of clips spread evenly over the collection.
    let step = (samples.len() / o.queries).max(1);
    let texts: Vec<&str> = samples.iter().step_by(step).take(o.queries).map(|s| s.captions[0].as_str()).collect();
    let qs = texts.iter().map(|t| regions.embed_query(&mut model, t)).collect::<Result<Vec<_>>>()?;
    say(format!("{} queries embedded; {ex_n} of them scored exhaustively", qs.len()));
    let (mut tr, mut tg, mut tc) = (Tally::default(), Tally::default(), Tally::default());
    let mut sweep: Vec<(Tally, Vec<f64>)> = o.rerank_sweep.iter().map(|_| (Tally::default(), vec![])).collect();
    let (mut ms_r, mut ms_g, mut ms_c, mut ms_x) = (vec![], vec![], vec![], vec![]);
    for (i, q) in qs.iter().enumerate() {
        let t = Instant::now();
        let hr = regions.search_embedded(q, o.k, o.rerank);
        ms_r.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let hg = global.search_embedded(q, o.k, o.rerank);
        ms_g.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let hc = codes.search_embedded(q, o.k, o.rerank);
        ms_c.push(t.elapsed().as_secs_f64() * 1e3);
        if i < ex_n {
            let t = Instant::now();
            let ex = exhaustive(&regions, q, o.k);
            ms_x.push(t.elapsed().as_secs_f64() * 1e3);
            tr.add(&hr, &ex, 0.0);
            tg.add(&hg, &ex, 0.0);
            tc.add(&hc, &ex, 0.0);
            for (&n, (t, ms)) in o.rerank_sweep.iter().zip(sweep.iter_mut()) {
                let t0 = Instant::now();
                let h = regions.search_embedded(q, o.k, n);
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
                t.add(&h, &ex, 0.0);
            }
            if (i + 1) % 10 == 0 || i + 1 == ex_n {
                let a = tr.finish(o.k);
                say(format!("  {}/{ex_n} exhaustive: agreement@1 {:.3}, recall@{} {:.3}", i + 1, a.agreement_at_1, o.k, a.recall_at_k));
            }
        }
    }
    let (ar, ag, ac) = (tr.finish(o.k), tg.finish(o.k), tc.finish(o.k));
    let st = regions.index.settings();
    let (end_rss_anon_mb, end_rss_file_mb) = rss_split_mb();
    Ok(ModelBenchReport {
        bench: "search",
        data,
        model: st.model.clone(),
        clips: regions.index.len(),
        frames: st.frames,
        regions: st.regions,
        dim: st.proj_dim,
        queries: qs.len(),
        exhaustive_queries: ex_n,
        k: o.k,
        rerank: o.rerank,
        coarse_depth,
        threads: rayon::current_num_threads(),
        embed_s,
        codes_s: c.seconds,
        build_s: embed_s + c.seconds,
        index_bytes,
        codes_bytes: c.bytes,
        centroids: c.centroids,
        p50_ms: quantile(&ms_r, 0.5),
        p99_ms: quantile(&ms_r, 0.99),
        agreement_at_1: ar.agreement_at_1,
        recall_at_10_vs_exhaustive: ar.recall_at_k,
        exhaustive_p50_ms: quantile(&ms_x, 0.5),
        global_stage: StageFigures::of("global", &ms_g, &ag),
        codes_stage: StageFigures::of("codes", &ms_c, &ac),
        sweep: o
            .rerank_sweep
            .iter()
            .zip(&sweep)
            .map(|(&n, (t, ms))| {
                let a = t.finish(o.k);
                DepthPoint {
                    rerank: n,
                    p50_ms: quantile(ms, 0.5),
                    p99_ms: quantile(ms, 0.99),
                    agreement_at_1: a.agreement_at_1,
                    recall_at_10_vs_exhaustive: a.recall_at_k,
                }
            })
            .collect(),
        peak_rss_mb: build_peak.max(peak_rss_mb()),
        end_rss_anon_mb,
        end_rss_file_mb,
    })
}
