//! `demovlp bench search`: build a synthetic index ([`crate::synth`]), then time queries
//! through the same [`Engine`] that `demovlp search` runs — the memory-mapped store, the
//! saved and re-mapped HNSW graph, the exact scan (the baseline and the recall oracle),
//! the exact global + region-word re-rank — alternating the ANN and the exact path in
//! blocks of 10 queries so machine noise hits both alike.
//!
//! The query text embedding is synthetic (a random `[L−1, P]` token tensor of the index's
//! text length, `query_tokens` of it real): the text tower's cost is not included in any
//! latency here (`demovlp bench embed` measures texts/s).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::ann::{exact_top_k, Ann, AnnParams};
use crate::search::{Engine, DEFAULT_EXACT_THRESHOLD};
use crate::synth::{self, SynthSpec};

/// Where the global candidates come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Candidates {
    /// Always the HNSW graph (built whatever the size).
    Ann,
    /// Always the exact scan (no graph built).
    Exact,
    /// As `search` decides: the graph at ≥ 50 000 clips, else the exact scan.
    Auto,
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub spec: SynthSpec,
    pub queries: usize,
    /// Untimed queries first (page faults of the fresh mappings).
    pub warmup: usize,
    pub k: usize,
    pub rerank: usize,
    pub candidates: Candidates,
    pub params: AnnParams,
    /// Extra ef_search values measured on the same graph (recall and latency of each).
    pub sweep: Vec<usize>,
    /// The index directory to write (must not exist); None: a temporary one.
    pub dir: Option<PathBuf>,
    /// Keep the index directory afterwards.
    pub keep: bool,
    /// Timed queries also scored exhaustively (every clip, global + region-word) for
    /// agreement@1 / recall@k; None: as many as fit [`EXHAUSTIVE_BUDGET`] clip scorings.
    pub exhaustive_queries: Option<usize>,
}

/// Clip scorings (queries × clips) the exhaustive comparison may take by default: 200 000
/// (e.g. 20 queries at 10 000 clips, 2 at 100 000; none at 1M — pass `--exhaustive-queries`).
pub const EXHAUSTIVE_BUDGET: usize = 200_000;

#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub expansion_search: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub recall_at_10: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub bench: &'static str,
    /// What the collection is: planted global neighbours, random local embeddings.
    pub data: &'static str,
    /// The whole search (`-k K --rerank N`: global candidates, exact re-rank) against
    /// exhaustive scoring (every clip scored with global + region-word) on
    /// `exhaustive_queries` of the timed queries: the same top clip, and the share of the
    /// exhaustive top-k returned. On this data the planted global neighbours dominate the
    /// score and the local embeddings are random: these check the pipeline at this size,
    /// not what a trained model's search finds (`--model` measures that).
    /// null only when no query was scored exhaustively (`exhaustive_note` says why).
    pub agreement_at_1: Option<f64>,
    pub recall_at_10_vs_exhaustive: Option<f64>,
    pub exhaustive_queries: usize,
    /// Milliseconds per exhaustive scoring (p50).
    pub exhaustive_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exhaustive_note: Option<String>,
    pub clips: usize,
    pub dim: usize,
    pub frames: usize,
    pub regions: usize,
    pub text_len: usize,
    pub query_tokens: usize,
    pub queries: usize,
    pub k: usize,
    pub rerank: usize,
    pub threads: usize,
    /// What the timed global top-k used: `ann` or `exact`.
    pub candidates: &'static str,
    pub params: Option<AnnParams>,
    /// Writing the synthetic index (not part of any user-facing cost).
    pub write_s: f64,
    /// Index bytes on disk (the shared local files counted once).
    pub index_bytes: u64,
    /// Building the HNSW graph over the index (0 when none is built).
    pub build_s: f64,
    /// Saving it (`ann.usearch`) and mapping it back as `search` does.
    pub save_load_s: f64,
    pub graph_bytes: u64,
    /// Global top-k (`search --rerank 0`): latency over the timed queries.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Of the exact top-k (the oracle), the share the timed path returned.
    pub recall_at_10: f64,
    /// The exact scan's top-k latency (the baseline).
    pub exact_p50_ms: f64,
    pub exact_p99_ms: f64,
    /// p50 of the timed path / p50 of the exact scan.
    pub ratio_vs_exact: f64,
    /// Exact global + local scoring of `rerank` candidates (the re-rank alone).
    pub rerank_p50_ms: f64,
    pub rerank_p99_ms: f64,
    /// The whole `search -k K --rerank N`: N candidates, then the re-rank.
    pub search_p50_ms: f64,
    pub search_p99_ms: f64,
    /// Share of each query's planted group found in the exact top-k (checks the synthetic
    /// structure: ≈ 1 when the group is the nearest).
    pub planted_in_exact: f64,
    pub sweep: Vec<SweepPoint>,
    /// Peak physical memory of the run, MiB: the peak RSS (VmHWM) up to the end of the graph
    /// build (synthetic data generation included), or the largest proportional set size
    /// sampled while querying, whichever is larger (see `vmhwm_mb`).
    pub peak_rss_mb: f64,
    /// Largest proportional set size (PSS, `/proc/self/smaps_rollup`) sampled between query
    /// blocks, MiB: what a `search` process holds — heap plus the index and graph pages it
    /// touched, each physical page once.
    pub search_rss_mb: f64,
    /// The kernel's peak RSS of the whole run, MiB. It counts a page once per mapping, and
    /// the synthetic index maps the same local file from every segment, so after many
    /// re-ranks it exceeds the physical memory used (a real index maps distinct files).
    pub vmhwm_mb: f64,
}

/// Proportional set size of this process in MiB (NaN where /proc is unavailable).
pub fn pss_mb() -> f64 {
    proc_mb("/proc/self/smaps_rollup", &["Pss:"])[0]
}

/// Peak resident set size of this process (VmHWM) in MiB; NaN where /proc is unavailable.
pub fn peak_rss_mb() -> f64 {
    proc_mb("/proc/self/status", &["VmHWM:"])[0]
}

/// The values of `keys` (`Key:  N kB` lines of the /proc file `path`) in MiB, NaN where absent.
fn proc_mb<const N: usize>(path: &str, keys: &[&str; N]) -> [f64; N] {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    keys.map(|k| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    })
}

/// The process's resident memory now, split: (anonymous, file-backed — mostly the index's
/// memory-mapped segments) in MB (`RssAnon` / `RssFile` of /proc/self/status).
pub fn rss_split_mb() -> (f64, f64) {
    let [anon, file] = proc_mb("/proc/self/status", &["RssAnon:", "RssFile:"]);
    (anon, file)
}

/// The `q`-quantile (0..=1) of `xs` (nearest rank).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let r = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[r - 1]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub fn dir_bytes(dir: &Path) -> u64 {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_dir() {
                    stack.push(e.path());
                } else if seen.insert(m.ino()) {
                    total += m.len();
                }
            }
        }
    }
    total
}

pub struct Cleanup(pub Option<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs the benchmark; `say` gets the progress lines.
pub fn run(o: &BenchOptions, say: &dyn Fn(String)) -> Result<BenchReport> {
    if o.queries == 0 || o.k == 0 {
        bail!("bench search: --queries and -k must be positive");
    }
    if o.k > o.spec.clips {
        bail!("bench search: -k {} is more than --clips {}", o.k, o.spec.clips);
    }
    let dir = match &o.dir {
        Some(d) => d.clone(),
        None => {
            // Unique per run (several runs in one process, e.g. tests, must not collide).
            static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::env::temp_dir().join(format!("demovlp-bench-search-{}-{n}", std::process::id()))
        }
    };
    if dir.exists() {
        bail!("{}: exists; the benchmark writes a new index directory", dir.display());
    }
    let _cleanup = Cleanup((!o.keep).then(|| dir.clone()));
    let spec = &o.spec;
    say(format!(
        "writing a synthetic index of {} clips ({} × {} regions × {} fp16 locals per clip) to {} ...",
        spec.clips,
        spec.frames,
        spec.regions,
        spec.dim,
        dir.display()
    ));
    let t = Instant::now();
    synth::write_index(&dir, spec)?;
    let write_s = t.elapsed().as_secs_f64();
    let index_bytes = dir_bytes(&dir);
    say(format!("  {write_s:.1} s, {:.1} MB on disk", index_bytes as f64 / 1e6));

    let use_ann = match o.candidates {
        Candidates::Ann => true,
        Candidates::Exact => false,
        Candidates::Auto => spec.clips >= DEFAULT_EXACT_THRESHOLD,
    };
    let (mut build_s, mut save_load_s, mut graph_bytes) = (0.0, 0.0, 0);
    let mut engine = if use_ann {
        let idx = crate::store::Index::open(&dir)?;
        say(format!(
            "building the HNSW graph (M {}, ef_construction {}, {} vectors) on {} threads ...",
            o.params.connectivity,
            o.params.expansion_add,
            o.params.quantization.name(),
            rayon::current_num_threads()
        ));
        let t = Instant::now();
        let ann = Ann::build(&idx, o.params)?;
        build_s = t.elapsed().as_secs_f64();
        say(format!("  {build_s:.1} s ({:.0} clips/s)", spec.clips as f64 / build_s.max(1e-9)));
        let t = Instant::now();
        ann.save(&idx)?;
        drop((ann, idx));
        // What `search` does: open the index, map the saved graph (threshold 0: always used).
        let e = Engine::open_with_ann(&dir, 0)?;
        save_load_s = t.elapsed().as_secs_f64();
        graph_bytes = std::fs::metadata(dir.join("ann.usearch")).map(|m| m.len()).unwrap_or(0);
        e
    } else {
        Engine::open_with_ann(&dir, usize::MAX)?
    };
    let qs: Vec<_> = (0..o.warmup + o.queries).map(|j| synth::query(spec, j)).collect();
    let mut efs = vec![o.params.expansion_search];
    if use_ann {
        efs.extend(o.sweep.iter().copied().filter(|e| *e != o.params.expansion_search));
    }
    let (mut t_exact, mut planted) = (vec![], 0.0);
    let mut t_ann: Vec<Vec<f64>> = vec![vec![]; efs.len()];
    let mut hits: Vec<usize> = vec![0; efs.len()];
    let (mut t_rerank, mut t_search) = (vec![], vec![]);
    let build_peak = peak_rss_mb();
    let mut search_pss = pss_mb();
    say(format!("{} queries ({} untimed first), k {}, re-rank {} ...", o.queries, o.warmup, o.k, o.rerank));
    // Blocks of BLOCK queries: each path runs the block's queries back to back (its data
    // stays in cache as in a server running only that path), the paths alternate block by
    // block (machine noise hits them alike).
    const BLOCK: usize = 10;
    let mut oracle: Vec<Vec<usize>> = vec![];
    for (b, block) in qs.chunks(BLOCK).enumerate() {
        search_pss = search_pss.max(pss_mb());
        let timed = |i: usize| b * BLOCK + i >= o.warmup;
        for (i, (q, g)) in block.iter().enumerate() {
            let t = Instant::now();
            let exact = exact_top_k(&engine.index, &q.global_unit, o.k);
            let te = ms(t);
            let ids: Vec<usize> = exact.iter().map(|x| x.0).collect();
            if timed(i) {
                t_exact.push(te);
                let members = spec.members(*g);
                planted += members.iter().filter(|m| ids.contains(m)).count() as f64 / members.len().min(o.k) as f64;
            }
            oracle.push(ids);
        }
        // The ef values take turns being first after the exact block.
        for r in 0..efs.len() {
            let e = (b + r) % efs.len();
            let ef = efs[e];
            if let Some(a) = engine.ann.as_mut() {
                a.set_expansion_search(ef);
            }
            for (i, (q, _)) in block.iter().enumerate() {
                let t = Instant::now();
                let got = engine.search_embedded(q, o.k, 0);
                let ta = ms(t);
                if timed(i) {
                    t_ann[e].push(ta);
                    let want = &oracle[b * BLOCK + i];
                    hits[e] += got.iter().filter(|h| want.contains(&engine.index.by_id[&h.clip])).count();
                }
            }
        }
        if let Some(a) = engine.ann.as_mut() {
            a.set_expansion_search(efs[0]);
        }
        if o.rerank > 0 {
            for (i, (q, _)) in block.iter().enumerate() {
                let cands: Vec<usize> = engine.candidates(&q.global_unit, o.rerank).into_iter().map(|c| c.0).collect();
                let t = Instant::now();
                std::hint::black_box(engine.rerank_scores(q, &cands));
                let tr = ms(t);
                let t = Instant::now();
                std::hint::black_box(engine.search_embedded(q, o.k, o.rerank));
                let ts = ms(t);
                if timed(i) {
                    t_rerank.push(tr);
                    t_search.push(ts);
                }
            }
        }
    }
    // The whole search against exhaustive scoring, on the first timed queries.
    let ex_n = o.exhaustive_queries.unwrap_or(EXHAUSTIVE_BUDGET / spec.clips.max(1)).min(o.queries);
    let (mut tally, mut ex_ms) = (crate::quality::Tally::default(), vec![]);
    for (i, (q, _)) in qs[o.warmup..].iter().take(ex_n).enumerate() {
        let t = Instant::now();
        let ex = crate::quality::exhaustive(&engine, q, o.k);
        ex_ms.push(ms(t));
        tally.add(&engine.search_embedded(q, o.k, o.rerank), &ex, 0.0);
        if (i + 1) % 10 == 0 || i + 1 == ex_n {
            let a = tally.finish(o.k);
            say(format!("  {}/{ex_n} exhaustive: agreement@1 {:.3}, recall@{} {:.3}", i + 1, a.agreement_at_1, o.k, a.recall_at_k));
        }
    }
    let agreement = (ex_n > 0).then(|| tally.finish(o.k));
    let exhaustive_note = (ex_n == 0).then(|| {
        format!(
            "no query scored exhaustively: at {} clips that exceeds the default budget of {EXHAUSTIVE_BUDGET} clip scorings \
             (pass --exhaustive-queries N)",
            spec.clips
        )
    });
    let search_pss = search_pss.max(pss_mb());
    let vmhwm = peak_rss_mb();
    let nq = o.queries as f64;
    let (t_rerank, t_search) = if o.rerank > 0 { (t_rerank, t_search) } else { (vec![f64::NAN], vec![f64::NAN]) };
    let sweep: Vec<SweepPoint> = efs
        .iter()
        .zip(&t_ann)
        .zip(&hits)
        .map(|((&ef, t), &h)| SweepPoint {
            expansion_search: ef,
            p50_ms: quantile(t, 0.5),
            p99_ms: quantile(t, 0.99),
            recall_at_10: h as f64 / (nq * o.k as f64),
        })
        .collect();
    let exact_p50 = quantile(&t_exact, 0.5);
    let main = &sweep[0];
    Ok(BenchReport {
        bench: "search",
        data: "planted: synthetic global embeddings with planted neighbours, random local embeddings (no model)",
        agreement_at_1: agreement.as_ref().map(|a| a.agreement_at_1),
        recall_at_10_vs_exhaustive: agreement.as_ref().map(|a| a.recall_at_k),
        exhaustive_queries: ex_n,
        exhaustive_p50_ms: (ex_n > 0).then(|| quantile(&ex_ms, 0.5)),
        exhaustive_note,
        clips: spec.clips,
        dim: spec.dim,
        frames: spec.frames,
        regions: spec.regions,
        text_len: spec.text_len,
        query_tokens: spec.query_tokens,
        queries: o.queries,
        k: o.k,
        rerank: o.rerank,
        threads: rayon::current_num_threads(),
        candidates: if use_ann { "ann" } else { "exact" },
        params: use_ann.then_some(o.params),
        write_s,
        index_bytes,
        build_s,
        save_load_s,
        graph_bytes,
        p50_ms: main.p50_ms,
        p99_ms: main.p99_ms,
        recall_at_10: main.recall_at_10,
        exact_p50_ms: exact_p50,
        exact_p99_ms: quantile(&t_exact, 0.99),
        ratio_vs_exact: main.p50_ms / exact_p50,
        rerank_p50_ms: quantile(&t_rerank, 0.5),
        rerank_p99_ms: quantile(&t_rerank, 0.99),
        search_p50_ms: quantile(&t_search, 0.5),
        search_p99_ms: quantile(&t_search, 0.99),
        planted_in_exact: planted / nq,
        sweep: if use_ann { sweep } else { vec![] },
        peak_rss_mb: build_peak.max(search_pss),
        search_rss_mb: search_pss,
        vmhwm_mb: vmhwm,
    })
}
