//! The synthetic index behind `demovlp bench search`, and ANN recall on it.

use demovlp_search::ann::{exact_top_k, AnnParams};
use demovlp_search::bench::{run, BenchOptions, Candidates};
use demovlp_search::search::Engine;
use demovlp_search::store::Index;
use demovlp_search::synth::{self, SynthSpec};

fn spec(clips: usize) -> SynthSpec {
    SynthSpec { clips, dim: 64, frames: 2, regions: 12, text_len: 16, query_tokens: 6, segment_clips: 1000, seed: 3 }
}

#[test]
fn synthetic_index_opens_as_an_index_with_planted_neighbours() {
    let dir = demovlp_testutil::tmpdir("synth-index");
    let s = spec(2500);
    synth::write_index(&dir, &s).unwrap();
    let idx = Index::open(&dir).unwrap();
    assert_eq!(idx.len(), 2500);
    // 1000 + 1000 + a partial segment of 500.
    assert_eq!(idx.manifest.segments.len(), 3);
    for i in [0, 999, 1000, 2499] {
        assert_eq!(idx.clip_id(i), SynthSpec::clip_id(i));
        let n: f32 = idx.global(i).iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4, "clip {i}: |g|² = {n}");
        assert_eq!(idx.mask(i), idx.mask(i % 1000), "locals repeat every segment");
    }
    let (mut a, mut b) = (vec![], vec![]);
    idx.local_into(1500, &mut a);
    idx.local_into(500, &mut b);
    assert_eq!(a, b);
    assert!(a.iter().any(|&x| x != 0.0));
    assert!(idx.mask(7).iter().filter(|&&m| m != 0).count() >= 2 * 10, "10..=R real regions per frame");
    // A group's members are each other's nearest neighbours.
    let g = s.group_of(42);
    let top: Vec<usize> = exact_top_k(&idx, idx.global(42), 5).into_iter().map(|x| x.0).collect();
    let members = s.members(g);
    assert_eq!(members.len(), 5);
    assert!(members.iter().all(|m| top.contains(m)), "top {top:?} vs group {members:?}");
    // Writing into an existing index is refused.
    assert!(synth::write_index(&dir, &s).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ann_recall_against_exact_above_the_threshold() {
    // Above the exact-search threshold the engine answers from the graph (built with the
    // parameters `index` uses); its top 10 must hold ≥ 95 % of the exact top 10.
    let dir = demovlp_testutil::tmpdir("synth-ann");
    let s = spec(12_000);
    synth::write_index(&dir, &s).unwrap();
    let e = Engine::open_with_ann(&dir, 10_000).unwrap();
    let ann = e.ann.as_ref().expect("12 000 clips ≥ threshold 10 000: a graph");
    assert_eq!((ann.len(), ann.params), (12_000, AnnParams::default()));
    let (mut hit, mut planted) = (0, 0);
    let nq = 100;
    for j in 0..nq {
        let (q, g) = synth::query(&s, j);
        let exact: Vec<usize> = exact_top_k(&e.index, &q.global_unit, 10).into_iter().map(|x| x.0).collect();
        planted += s.members(g).iter().filter(|m| exact.contains(m)).count();
        let got = e.candidates(&q.global_unit, 10);
        assert_eq!(got.len(), 10);
        hit += got.iter().filter(|x| exact.contains(&x.0)).count();
    }
    let recall = hit as f64 / (nq * 10) as f64;
    assert!(recall >= 0.95, "recall@10 {recall}");
    // The planted group is what the exact search finds first (the collection has structure).
    assert!(planted as f64 / (nq * 5) as f64 > 0.95, "planted {planted} / {}", nq * 5);
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn opts(clips: usize, c: Candidates) -> BenchOptions {
    BenchOptions {
        spec: spec(clips),
        queries: 30,
        warmup: 3,
        k: 10,
        rerank: 50,
        candidates: c,
        params: AnnParams::default(),
        sweep: vec![16, 64],
        dir: None,
        keep: false,
        exhaustive_queries: None,
    }
}

/// Planted data: the whole search against exhaustive scoring is measured (real numbers);
/// re-ranking every clip is exhaustive scoring itself (agreement 1); no exhaustive query
/// leaves the fields null with a note saying why.
#[test]
fn planted_bench_measures_agreement_with_exhaustive_scoring() {
    let r = run(&opts(2000, Candidates::Exact), &|_| {}).unwrap();
    assert_eq!(r.exhaustive_queries, 30, "200 000 / 2000 clips = 100, capped by the 30 queries");
    let (a1, rk) = (r.agreement_at_1.unwrap(), r.recall_at_10_vs_exhaustive.unwrap());
    assert!((0.0..=1.0).contains(&a1) && (0.0..=1.0).contains(&rk), "{r:?}");
    assert!(r.exhaustive_note.is_none() && r.exhaustive_p50_ms.unwrap() > 0.0);
    let mut o = opts(2000, Candidates::Exact);
    (o.rerank, o.exhaustive_queries) = (2000, Some(5));
    let all = run(&o, &|_| {}).unwrap();
    assert_eq!((all.exhaustive_queries, all.agreement_at_1, all.recall_at_10_vs_exhaustive), (5, Some(1.0), Some(1.0)));
    o.exhaustive_queries = Some(0);
    let none = run(&o, &|_| {}).unwrap();
    assert_eq!((none.agreement_at_1, none.recall_at_10_vs_exhaustive), (None, None));
    assert!(none.exhaustive_note.unwrap().contains("--exhaustive-queries"));
}

#[test]
fn bench_with_exact_candidates_has_recall_one_and_builds_no_graph() {
    let r = run(&opts(2000, Candidates::Exact), &|_| {}).unwrap();
    assert_eq!((r.clips, r.candidates, r.recall_at_10, r.build_s), (2000, "exact", 1.0, 0.0));
    assert!(r.params.is_none() && r.sweep.is_empty() && r.graph_bytes == 0);
    // At width 64 the noise sometimes lifts a topic-mate above a group member (at 256: 1.000).
    assert!(r.planted_in_exact > 0.9, "{}", r.planted_in_exact);
    for v in [r.p50_ms, r.p99_ms, r.exact_p50_ms, r.rerank_p50_ms, r.search_p50_ms] {
        assert!(v.is_finite() && v > 0.0, "{r:?}");
    }
    assert!(r.p50_ms <= r.p99_ms && r.rerank_p50_ms <= r.rerank_p99_ms);
}

#[test]
fn bench_with_the_graph_measures_recall_per_ef_and_cleans_up() {
    let dir = std::env::temp_dir().join(format!("demovlp-bench-test-{}", std::process::id()));
    let mut o = opts(3000, Candidates::Ann);
    o.dir = Some(dir.clone());
    let r = run(&o, &|_| {}).unwrap();
    assert!(!dir.exists(), "the benchmark's index is removed afterwards");
    assert_eq!(r.candidates, "ann");
    assert!(r.build_s > 0.0 && r.graph_bytes > 0);
    assert!(r.recall_at_10 >= 0.95 && r.recall_at_10 <= 1.0, "recall {}", r.recall_at_10);
    let efs: Vec<usize> = r.sweep.iter().map(|s| s.expansion_search).collect();
    assert_eq!(efs, vec![AnnParams::default().expansion_search, 16, 64]);
    assert_eq!(r.sweep[0].recall_at_10, r.recall_at_10);
    // Auto below the 50 000 threshold is the exact scan, as `search` decides.
    let a = run(&opts(2000, Candidates::Auto), &|_| {}).unwrap();
    assert_eq!(a.candidates, "exact");
}
