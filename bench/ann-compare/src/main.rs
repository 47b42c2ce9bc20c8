//! usearch vs hnsw_rs on the global vectors of `demovlp bench search` (the planted-neighbour
//! generator of `demovlp_search::synth`, same seed, same queries), against the exact scan
//! of `demovlp_search::ann::top_k_rows`.
//!
//! Builds one graph per library (M 16 / max_nb_connection 16, ef_construction 128, parallel
//! inserts on every rayon thread), then times single top-10 queries at each ef_search,
//! the libraries and ef values taking turns block by block (50 queries a block) so machine
//! noise hits them alike. Prints a table and one JSON line.
//!
//! `cargo run --release -- [--clips 100000] [--queries 1000] [--dim 256] [--block 50]
//!  [--warmup 10] [--seed 0] [--ef 64,128,256] [--no-usearch-f32]`

use std::time::Instant;

use anndists::dist::DistDot;
use anyhow::{bail, Context, Result};
use demovlp_search::ann::{dot, top_k_rows};
use demovlp_search::synth::{self, SynthSpec};
use hnsw_rs::prelude::Hnsw;
use rayon::prelude::*;

const M: usize = 16;
const EF_CONSTRUCTION: usize = 128;
const K: usize = 10;

struct Args {
    clips: usize,
    queries: usize,
    dim: usize,
    block: usize,
    warmup: usize,
    seed: u64,
    efs: Vec<usize>,
    usearch_f32: bool,
}

fn args() -> Result<Args> {
    let mut a =
        Args { clips: 100_000, queries: 1000, dim: 256, block: 50, warmup: 10, seed: 0, efs: vec![64, 128, 256], usearch_f32: true };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        if f == "--no-usearch-f32" {
            a.usearch_f32 = false;
            continue;
        }
        let v = it.next().with_context(|| format!("{f}: missing value"))?;
        match f.as_str() {
            "--clips" => a.clips = v.parse()?,
            "--queries" => a.queries = v.parse()?,
            "--dim" => a.dim = v.parse()?,
            "--block" => a.block = v.parse()?,
            "--warmup" => a.warmup = v.parse()?,
            "--seed" => a.seed = v.parse()?,
            "--ef" => a.efs = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            _ => bail!("unknown flag {f}"),
        }
    }
    if a.clips < K || a.queries == 0 || a.dim == 0 || a.block == 0 || a.efs.is_empty() {
        bail!("--clips ≥ {K}, --queries, --dim, --block and --ef must be positive");
    }
    Ok(a)
}

/// Resident set size (VmRSS) in MiB; NaN where /proc is unavailable.
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let r = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[r - 1]
}

enum Graph<'a> {
    Usearch(usearch::Index),
    HnswRs(Hnsw<'a, f32, DistDot>),
}

impl Graph<'_> {
    /// Top-K keys of one query at ef_search `ef`.
    fn search(&self, q: &[f32], ef: usize) -> Vec<usize> {
        match self {
            Graph::Usearch(i) => {
                i.change_expansion_search(ef);
                i.search(q, K).map(|m| m.keys.iter().map(|&k| k as usize).collect()).unwrap_or_default()
            }
            Graph::HnswRs(h) => h.search(q, K, ef).iter().map(|n| n.d_id).collect(),
        }
    }
}

struct Built<'a> {
    name: &'static str,
    graph: Graph<'a>,
    build_s: f64,
    rss_delta_mb: f64,
}

fn build_usearch(rows: &[f32], dim: usize, kind: usearch::ScalarKind) -> Result<usearch::Index> {
    let opts = usearch::IndexOptions {
        dimensions: dim,
        metric: usearch::MetricKind::IP,
        quantization: kind,
        connectivity: M,
        expansion_add: EF_CONSTRUCTION,
        expansion_search: 256,
        multi: false,
    };
    let idx = usearch::Index::new(&opts).map_err(|e| anyhow::anyhow!("usearch: {e}"))?;
    let n = rows.len() / dim;
    idx.reserve_capacity_and_threads(n, rayon::current_num_threads()).map_err(|e| anyhow::anyhow!("usearch reserve: {e}"))?;
    (0..n)
        .into_par_iter()
        .try_for_each(|i| idx.add(i as u64, &rows[i * dim..(i + 1) * dim]).map_err(|e| anyhow::anyhow!("usearch add: {e}")))?;
    Ok(idx)
}

fn build_hnsw_rs(rows: &[f32], dim: usize) -> Hnsw<'static, f32, DistDot> {
    let n = rows.len() / dim;
    // hnsw_rs's own examples: nb_layer = min(16, ln n).
    let layers = 16.min((n as f64).ln().trunc() as usize).max(1);
    let mut h = Hnsw::<f32, DistDot>::new(M, n, layers, EF_CONSTRUCTION, DistDot {});
    let data: Vec<(&[f32], usize)> = rows.chunks_exact(dim).enumerate().map(|(i, r)| (r, i)).collect();
    h.parallel_insert_slice(&data);
    h.set_searching_mode(true);
    h
}

fn timed<'a>(name: &'static str, f: impl FnOnce() -> Result<Graph<'a>>) -> Result<Built<'a>> {
    eprintln!("building {name} (M {M}, ef_construction {EF_CONSTRUCTION}) on {} threads ...", rayon::current_num_threads());
    let r0 = rss_mb();
    let t = Instant::now();
    let graph = f()?;
    let build_s = t.elapsed().as_secs_f64();
    let rss_delta_mb = rss_mb() - r0;
    eprintln!("  {build_s:.1} s, RSS +{rss_delta_mb:.0} MiB");
    Ok(Built { name, graph, build_s, rss_delta_mb })
}

fn main() -> Result<()> {
    let a = args()?;
    let spec = SynthSpec {
        clips: a.clips,
        dim: a.dim,
        frames: 8,
        regions: 30,
        text_len: 100,
        query_tokens: 12,
        segment_clips: 1024,
        seed: a.seed,
    };
    let dim = a.dim;
    eprintln!("generating {} synthetic global vectors (dim {dim}, seed {}) and {} queries ...", a.clips, a.seed, a.warmup + a.queries);
    let rows = synth::global_rows(&spec, 0, a.clips);
    // As `bench search`: query j for j in 0..warmup + queries, the first `warmup` untimed.
    let queries: Vec<(Vec<f32>, usize)> = (0..a.warmup + a.queries)
        .into_par_iter()
        .map(|j| {
            let (q, g) = synth::query(&spec, j);
            (q.global_unit, g)
        })
        .collect();
    let exact: Vec<Vec<(usize, f32)>> = queries.iter().map(|(q, _)| top_k_rows(&rows, dim, 0, q, K)).collect();
    let oracle: Vec<Vec<usize>> = exact.iter().map(|e| e.iter().map(|x| x.0).collect()).collect();
    // A miss is a near tie when the key returned instead scores within TIE of the exact 10th.
    const TIE: f32 = 1e-4;
    let near_tie = |j: usize, key: usize| dot(&queries[j].0, &rows[key * dim..(key + 1) * dim]) >= exact[j][K - 1].1 - TIE;
    let planted = queries[a.warmup..]
        .iter()
        .zip(&oracle[a.warmup..])
        .map(|((_, g), o)| {
            let m = spec.members(*g);
            m.iter().filter(|x| o.contains(x)).count() as f64 / m.len().min(K) as f64
        })
        .sum::<f64>()
        / a.queries as f64;
    eprintln!("  planted group in the exact top {K}: {:.3}", planted);

    let mut libs = vec![timed("usearch f16", || Ok(Graph::Usearch(build_usearch(&rows, dim, usearch::ScalarKind::F16)?)))?];
    if a.usearch_f32 {
        libs.push(timed("usearch f32", || Ok(Graph::Usearch(build_usearch(&rows, dim, usearch::ScalarKind::F32)?)))?);
    }
    libs.push(timed("hnsw_rs f32", || Ok(Graph::HnswRs(build_hnsw_rs(&rows, dim))))?);

    // times[lib][ef], hits[lib][ef]
    let (nl, ne) = (libs.len(), a.efs.len());
    let mut times = vec![vec![Vec::<f64>::new(); ne]; nl];
    let mut hits = vec![vec![0usize; ne]; nl];
    let mut ties = vec![vec![0usize; ne]; nl];
    // Exact top-10 keys a library missed (any ef): are they found by a search for their own vector?
    let mut missed: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); nl];
    eprintln!("{} queries ({} untimed first), top {K}, blocks of {}, ef_search {:?} ...", a.queries, a.warmup, a.block, a.efs);
    let idx: Vec<usize> = (0..queries.len()).collect();
    for (b, block) in idx.chunks(a.block).enumerate() {
        // Each (library, ef) runs the block back to back; who goes first rotates by block.
        for r in 0..nl * ne {
            let s = (b + r) % (nl * ne);
            let (l, e) = (s % nl, s / nl);
            let ef = a.efs[e];
            for &j in block {
                let t = Instant::now();
                let got = libs[l].graph.search(&queries[j].0, ef);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if j >= a.warmup {
                    times[l][e].push(ms);
                    hits[l][e] += got.iter().filter(|g| oracle[j].contains(g)).count();
                    ties[l][e] += got.iter().filter(|&&g| !oracle[j].contains(&g) && near_tie(j, g)).count();
                    missed[l].extend(oracle[j].iter().filter(|o| !got.contains(o)));
                }
            }
        }
    }

    let mut lost_keys = vec![0usize; nl];
    for (l, lib) in libs.iter().enumerate() {
        let ef = *a.efs.iter().max().unwrap();
        let lost = missed[l].iter().filter(|&&key| !lib.graph.search(&rows[key * dim..(key + 1) * dim], ef).contains(&key)).count();
        eprintln!(
            "  {}: {} distinct exact top-{K} keys missed; {lost} of them not found by a search for their own vector (ef {ef})",
            lib.name,
            missed[l].len()
        );
        lost_keys[l] = lost;
    }
    println!("| N | library | build s | RSS Δ MiB | ef_search | p50 ms | p99 ms | recall@{K} | near-tie misses |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut json = vec![];
    for (l, lib) in libs.iter().enumerate() {
        let mut points = vec![];
        for (e, &ef) in a.efs.iter().enumerate() {
            let (p50, p99) = (quantile(&times[l][e], 0.5), quantile(&times[l][e], 0.99));
            let recall = hits[l][e] as f64 / (a.queries * K) as f64;
            println!(
                "| {} | {} | {:.1} | {:.0} | {ef} | {p50:.3} | {p99:.3} | {recall:.4} | {} / {} |",
                a.clips,
                lib.name,
                lib.build_s,
                lib.rss_delta_mb,
                ties[l][e],
                a.queries * K - hits[l][e]
            );
            points.push(serde_json::json!({"ef_search": ef, "p50_ms": p50, "p99_ms": p99, "recall_at_10": recall,
                "misses": a.queries * K - hits[l][e], "near_tie_misses": ties[l][e]}));
        }
        json.push(serde_json::json!({"library": lib.name, "build_s": lib.build_s, "rss_delta_mb": lib.rss_delta_mb,
            "missed_keys": missed[l].len(), "missed_keys_not_found_by_own_vector": lost_keys[l], "sweep": points}));
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "ann-compare", "clips": a.clips, "dim": dim, "queries": a.queries, "warmup": a.warmup,
            "block": a.block, "k": K, "m": M, "ef_construction": EF_CONSTRUCTION, "seed": a.seed,
            "threads": rayon::current_num_threads(), "planted_in_exact": planted, "libraries": json,
        })
    );
    Ok(())
}
