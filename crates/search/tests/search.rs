//! End to end on a tiny trained model: the demo pipeline (written to disk) trains it, then
//! the test split is indexed and searched.

use std::path::PathBuf;

use demovlp_retrieval::local::{AlignConfig, Items, PairKernel};
use demovlp_retrieval::{eval_scores_with, EmbeddingSet, EvalOptions, ScoreMode};
use demovlp_search::ann::{exact_top_k, top_k_rows, Ann, AnnParams};
use demovlp_search::build::{build_index, merge, ClipList};
use demovlp_search::search::Engine;
use demovlp_search::store::Index;

mod common;
use common::{opts, world, World};

#[test]
fn own_caption_finds_its_clip_far_above_chance() {
    let w = world();
    let e = Engine::open(&w.index).unwrap();
    let mut model = e.load_model().unwrap();
    let (mut r1, mut r1_global) = (0, 0);
    for s in &w.samples {
        let hits = e.search(&mut model, &s.captions[0], 10, 100).unwrap().results;
        assert_eq!(hits.len(), 10);
        assert!(hits.windows(2).all(|p| p[0].score >= p[1].score));
        r1 += usize::from(hits[0].clip == s.clip);
        let g = e.search(&mut model, &s.captions[0], 1, 0).unwrap().results;
        r1_global += usize::from(g[0].clip == s.clip);
    }
    // Chance is 1 in 100.
    assert!(r1 >= 10, "R@1 with re-rank: {r1} / 100");
    // This tiny model's global embedding alone is weak (the demo's "global + region-word" row
    // is the one far above chance); the re-rank must not be worse than it.
    assert!(r1 >= r1_global, "re-rank {r1} < global only {r1_global}");
    eprintln!("R@1 re-ranked {r1}/100, global only {r1_global}/100");
}

#[test]
fn rerank_equals_the_evaluation_scores_computed_independently() {
    let w = world();
    let e = Engine::open(&w.index).unwrap();
    let mut model = e.load_model().unwrap();
    let idx = &e.index;
    let st = idx.settings().clone();
    let (p, nl) = (st.proj_dim, st.locals());
    let (mut vg, mut vl, mut vm) = (vec![], vec![], vec![]);
    for i in 0..idx.len() {
        vg.extend_from_slice(idx.global(i));
        idx.local_into(i, &mut vl);
        idx.mask_additive_into(i, &mut vm);
    }
    let videos = EmbeddingSet { count: idx.len(), len: nl, dim: p, global: &vg, local: &vl, mask_additive: &vm };
    for s in w.samples.iter().take(5) {
        let q = e.embed_query(&mut model, &s.captions[0]).unwrap();
        let texts = q.as_set();
        let o = EvalOptions { lambda: st.lambda, mode: ScoreMode::Aligned, use_local: true, masked_mean: st.masked_mean };
        let full = eval_scores_with(&texts, &videos, &o, &|_, _| {});
        let mut order: Vec<usize> = (0..idx.len()).collect();
        order.sort_by(|&a, &b| full[b].total_cmp(&full[a]));
        let hits = e.search_embedded(&q, 10, 100);
        for (h, &want) in hits.iter().zip(&order) {
            let got = idx.by_id[&h.clip];
            assert!((h.score - full[got]).abs() < 1e-4, "{}: {} vs {}", h.clip, h.score, full[got]);
            assert!((full[got] - full[want]).abs() < 1e-5, "rank differs: {} vs {}", idx.clip_id(want), h.clip);
        }
    }
}

/// On a device (the simulated one: memory reachable only through transfers), the query's
/// text tower and the re-rank scores run there and give the host's ranking and scores.
#[test]
fn on_a_device_the_text_tower_and_rerank_give_the_hosts_results() {
    use demovlp_model::backend::sim::SimDevice;
    let w = world();
    let mut host = Engine::open(&w.index).unwrap();
    host.prepare().unwrap();
    let mut cpu_model = host.load_model().unwrap();
    let sim = SimDevice::new();
    let mut dev = Engine::open(&w.index).unwrap();
    dev.prepare().unwrap();
    dev.score_on(sim.clone(), "sim");
    assert_eq!((host.device(), dev.device()), (None, Some("sim")));
    let cpu = dev.load_model().unwrap();
    let params = cpu.params.to_backend(&demovlp_model::Cpu, &sim);
    let mut sim_model = demovlp_model::Model::from_params_on(sim.clone(), cpu.config.clone(), params);
    for s in w.samples.iter().take(8) {
        let want = host.search(&mut cpu_model, &s.captions[0], 10, 50).unwrap().results;
        let got = dev.search(&mut sim_model, &s.captions[0], 10, 50).unwrap().results;
        assert_eq!(want.iter().map(|h| &h.clip).collect::<Vec<_>>(), got.iter().map(|h| &h.clip).collect::<Vec<_>>(), "{}", s.captions[0]);
        for (a, b) in want.iter().zip(&got) {
            assert_eq!(a.global.to_bits(), b.global.to_bits(), "{}", a.clip);
            assert!((a.score - b.score).abs() <= 1e-5 * a.score.abs().max(1.0), "{}: {} vs {}", a.clip, a.score, b.score);
            assert!((a.local.unwrap() - b.local.unwrap()).abs() <= 1e-5 * a.score.abs().max(1.0), "{}", a.clip);
        }
    }
    // One score run per query (50 candidates fit one block), and none on the host engine.
    assert_eq!(sim.snapshot().score_runs, 8);
}

#[test]
fn explanation_reproduces_the_pair_similarity() {
    let w = world();
    let e = Engine::open(&w.index).unwrap();
    let mut model = e.load_model().unwrap();
    let s = &w.samples[3];
    let q = e.embed_query(&mut model, &s.captions[0]).unwrap();
    let x = e.explain_embedded(&q, &s.clip).unwrap();
    let idx = &e.index;
    let st = idx.settings();
    let ci = idx.by_id[&s.clip];
    let (mut vl, mut vm) = (vec![], vec![]);
    idx.local_into(ci, &mut vl);
    idx.mask_additive_into(ci, &mut vm);
    let text = Items::new(&q.local, &q.mask_additive, 1, q.mask_additive.len(), st.proj_dim);
    let video = Items::new(&vl, &vm, 1, st.locals(), st.proj_dim);
    let (s1, s2) = PairKernel::default().forward(&text, 0, &video, 0, &AlignConfig { lambda: st.lambda, masked_mean: st.masked_mean });
    assert!((x.s1 - s1).abs() < 1e-4 && (x.s2 - s2).abs() < 1e-4, "explain s1 {} s2 {} vs kernel {s1} {s2}", x.s1, x.s2);
    assert!((x.local - (s1 + s2)).abs() < 1e-4);
    assert!(!x.words.is_empty() && !x.regions.is_empty());
    for wr in &x.words {
        assert!(!wr.word.starts_with('['), "special token {}", wr.word);
        let sum: f32 = wr.regions.iter().map(|r| r.weight).sum();
        assert!(sum > 0.5 && sum <= 1.0 + 1e-4, "{}: weights sum {sum}", wr.word);
        for r in &wr.regions {
            assert!(
                r.bbox.iter().all(|v| (-1e-6..=1.0 + 1e-6).contains(v)) && r.bbox[0] <= r.bbox[2] && r.bbox[1] <= r.bbox[3],
                "{:?}",
                r.bbox
            );
            assert!(x.frames.contains(&r.frame));
        }
    }
    let svg = demovlp_search::explain::svg(&x, None).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("class=\"region\"").count(), x.regions.len());
    assert!(e.explain_embedded(&q, "no/such/clip").is_err());
}

#[test]
fn append_resume_and_shards_give_the_same_index() {
    let w = world();
    let full = Index::open(&w.index).unwrap();
    let ids: Vec<String> = w.samples.iter().map(|s| s.clip.clone()).collect();
    // Half first, then everything: only the new half is embedded.
    let out = w.root.join("index-append");
    let s1 = build_index(&opts(w, out.clone(), ClipList::Ids(ids[..50].to_vec()))).unwrap();
    assert_eq!((s1.clips, s1.total_clips), (50, 50));
    // A stray half-written segment (an interrupted run) is cleaned up.
    std::fs::create_dir_all(out.join("seg-00099.tmp")).unwrap();
    let s2 = build_index(&opts(w, out.clone(), ClipList::Ids(ids.clone()))).unwrap();
    assert_eq!((s2.clips, s2.already_indexed, s2.total_clips), (50, 50, 100));
    assert!(!out.join("seg-00099.tmp").exists());
    // Shards 0/2 and 1/2, merged.
    let mut parts = vec![];
    for i in 0..2 {
        let mut o = opts(w, w.root.join(format!("index-shard{i}")), ClipList::Ids(ids.clone()));
        o.shard = Some((i, 2));
        assert_eq!(build_index(&o).unwrap().clips, 50);
        parts.push(o.out);
    }
    let merged_dir = w.root.join("index-merged");
    merge(&parts, &merged_dir, usize::MAX).unwrap();
    assert!(merge(&parts, &merged_dir, usize::MAX).is_err(), "merging into an existing index must fail");
    for dir in [&out, &merged_dir] {
        let other = Index::open(dir).unwrap();
        assert_eq!(other.len(), 100);
        for i in 0..100 {
            let j = other.by_id[full.clip_id(i)];
            assert_eq!(full.global(i), other.global(j), "{}", full.clip_id(i));
            assert_eq!(full.boxes(i), other.boxes(j));
        }
    }
    // Other settings on an existing index are refused.
    let mut o = opts(w, out, ClipList::Ids(ids));
    o.regions = Some(5);
    assert!(build_index(&o).is_err());
}

fn planted(n: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut s = seed | 1;
    let mut r = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let centres: Vec<f32> = (0..(n / 10) * dim).map(|_| r()).collect();
    let mut rows = vec![0f32; n * dim];
    for i in 0..n {
        let c = i % (n / 10);
        for k in 0..dim {
            rows[i * dim + k] = centres[c * dim + k] + 0.5 * r();
        }
    }
    demovlp_search::store::normalize_rows(&mut rows, dim);
    let mut qs = vec![0f32; 50 * dim];
    for q in 0..50 {
        let c = (q * 37) % (n / 10);
        for k in 0..dim {
            qs[q * dim + k] = centres[c * dim + k] + 0.5 * r();
        }
    }
    demovlp_search::store::normalize_rows(&mut qs, dim);
    (rows, qs)
}

#[test]
fn ann_recall_against_exact() {
    let (n, dim) = (5000, 64);
    let (rows, qs) = planted(n, dim, 7);
    let ann = Ann::build_rows(&rows, dim, AnnParams::default()).unwrap();
    assert_eq!(ann.len(), n);
    let mut hit = 0;
    for q in qs.chunks(dim) {
        let exact: Vec<usize> = top_k_rows(&rows, dim, 0, q, 10).into_iter().map(|x| x.0).collect();
        // The exact scan is itself checked against a plain sort.
        let mut all: Vec<(usize, f32)> =
            rows.chunks(dim).enumerate().map(|(i, r)| (i, r.iter().zip(q).map(|(a, b)| a * b).sum())).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(exact[0], all[0].0);
        let got = ann.search_rows(q, 10);
        hit += got.iter().filter(|x| exact.contains(&x.0)).count();
    }
    let recall = hit as f64 / (qs.len() / dim * 10) as f64;
    assert!(recall >= 0.95, "recall@10 {recall}");
}

#[test]
fn exact_top_k_over_segments_matches_a_sort() {
    let w = world();
    let idx = Index::open(&w.root.join("index-merged")).unwrap_or_else(|_| Index::open(&w.index).unwrap());
    assert!(idx.segments.len() > 1);
    let q = idx.global(7).to_vec();
    let top = exact_top_k(&idx, &q, 5);
    assert_eq!(top[0].0, 7);
    let mut all: Vec<(usize, f32)> = (0..idx.len()).map(|i| (i, idx.global(i).iter().zip(&q).map(|(a, b)| a * b).sum())).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (a, b) in top.iter().zip(&all) {
        assert!((a.1 - b.1).abs() < 1e-5);
    }
}

/// A copy of the world's model directory with a training config whose `[loss]` differs from
/// the defaults (λ 7.5, masked mean).
fn model_with_train_config(w: &World, name: &str) -> PathBuf {
    let src = w.root.join("global_rwa_model");
    let dir = w.root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/finetune_msrvtt.toml");
    let mut cfg = demovlp_train::config::TrainConfig::parse_file(std::path::Path::new(shipped)).unwrap();
    (cfg.loss.lambda, cfg.loss.masked_mean) = (7.5, true);
    std::fs::write(dir.join("train_config.toml"), cfg.to_toml()).unwrap();
    dir
}

fn eval_scores_for(e: &Engine, q: &demovlp_search::search::TextQuery, lambda: f32, masked_mean: bool) -> Vec<f32> {
    let idx = &e.index;
    let st = idx.settings();
    let (p, nl) = (st.proj_dim, st.locals());
    let (mut vg, mut vl, mut vm) = (vec![], vec![], vec![]);
    for i in 0..idx.len() {
        vg.extend_from_slice(idx.global(i));
        idx.local_into(i, &mut vl);
        idx.mask_additive_into(i, &mut vm);
    }
    let videos = EmbeddingSet { count: idx.len(), len: nl, dim: p, global: &vg, local: &vl, mask_additive: &vm };
    let texts = q.as_set();
    eval_scores_with(&texts, &videos, &EvalOptions { lambda, mode: ScoreMode::Aligned, use_local: true, masked_mean }, &|_, _| {})
}

#[test]
fn index_takes_lambda_and_masked_mean_from_the_models_training_config() {
    let w = world();
    let model = model_with_train_config(w, "model-lambda7.5");
    let ids: Vec<String> = w.samples.iter().take(30).map(|s| s.clip.clone()).collect();
    let mut o = opts(w, w.root.join("index-lambda7.5"), ClipList::Ids(ids.clone()));
    o.model = model.clone();
    build_index(&o).unwrap();
    let st = Index::open(&o.out).unwrap().settings().clone();
    assert_eq!((st.lambda, st.masked_mean), (7.5, true), "{st:?}");
    assert!(st.loss_from.as_deref().unwrap().ends_with("train_config.toml"), "{:?}", st.loss_from);

    // search scores with the stored values by default ...
    let mut e = Engine::open(&o.out).unwrap();
    let mut m = e.load_model().unwrap();
    let q = e.embed_query(&mut m, &w.samples[0].captions[0]).unwrap();
    let want = eval_scores_for(&e, &q, 7.5, true);
    let defaults = eval_scores_for(&e, &q, 20.0, false);
    let hits = e.search_embedded(&q, 5, 30);
    for h in &hits {
        let i = e.index.by_id[&h.clip];
        assert!((h.score - want[i]).abs() < 1e-4, "{}: {} vs {} (λ 7.5, masked mean)", h.clip, h.score, want[i]);
    }
    assert!(hits.iter().any(|h| (h.score - defaults[e.index.by_id[&h.clip]]).abs() > 1e-3), "the test cannot tell the settings apart");
    // ... and a flag overrides them, with a warning per differing value.
    assert!(e.override_loss(Some(7.5), None).is_empty());
    assert_eq!(e.override_loss(Some(20.0), Some(false)).len(), 2);
    for h in e.search_embedded(&q, 5, 30) {
        let i = e.index.by_id[&h.clip];
        assert!((h.score - defaults[i]).abs() < 1e-4, "{}: {} vs {} (λ 20)", h.clip, h.score, defaults[i]);
    }

    // An index-time flag wins over the saved config (and the index says so).
    let mut o2 = opts(w, w.root.join("index-lambda3"), ClipList::Ids(ids[..10].to_vec()));
    (o2.model, o2.lambda) = (model, Some(3.0));
    build_index(&o2).unwrap();
    let st2 = Index::open(&o2.out).unwrap().settings().clone();
    assert_eq!((st2.lambda, st2.masked_mean), (3.0, true));
    let from = st2.loss_from.unwrap();
    assert!(from.starts_with("λ: command line; masked-mean: ") && from.ends_with("train_config.toml"), "{from}");
    // The demo's own model directory carries its fine-tuning config (λ 20, no masked mean).
    let demo = demovlp_search::build::saved_loss(&w.root.join("global_rwa_model")).unwrap().expect("demo model has a training config");
    assert_eq!((demo.0, demo.1), (20.0, false));
}

#[test]
fn saved_loss_reads_a_training_checkpoints_config() {
    let w = world();
    let mut stack = vec![w.root.clone()];
    let mut found = None;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == demovlp_train::checkpoint::BEST) {
                found = Some(p);
            }
        }
    }
    let ck = found.expect("the demo run leaves a best checkpoint");
    let text = demovlp_train::checkpoint::read_config_text(&ck).unwrap();
    let cfg = demovlp_train::config::TrainConfig::parse_str(&text).unwrap();
    let (l, m, from) = demovlp_search::build::saved_loss(&ck).unwrap().expect("a checkpoint has its training config");
    assert_eq!((l, m), (cfg.loss.lambda, cfg.loss.masked_mean));
    assert!(from.contains(demovlp_train::checkpoint::BEST), "{from}");
    // Nothing saved: None, not an error (the defaults apply, and the index records that).
    let bare = w.root.join("bare-model");
    std::fs::create_dir_all(&bare).unwrap();
    assert!(demovlp_search::build::saved_loss(&bare).unwrap().is_none());
    // A broken saved config is an error naming the file, never silently the defaults.
    std::fs::write(bare.join("train_config.toml"), "[loss]\nlambda = \"x\"\n").unwrap();
    let err = format!("{:#}", demovlp_search::build::saved_loss(&bare).unwrap_err());
    assert!(err.contains("train_config.toml"), "{err}");
}

#[test]
fn index_merge_builds_the_ann_graph_above_the_threshold() {
    let w = world();
    let ids: Vec<String> = w.samples.iter().map(|s| s.clip.clone()).collect();
    let mut parts = vec![];
    for (i, r) in [(0, 0..20), (1, 20..40)] {
        let o = opts(w, w.root.join(format!("index-mpart{i}")), ClipList::Ids(ids[r].to_vec()));
        build_index(&o).unwrap();
        parts.push(o.out);
    }
    // Below the threshold: no graph (search scans exactly).
    let small = w.root.join("index-merge-exact");
    merge(&parts, &small, 41).unwrap();
    assert!(!small.join("ann.usearch").exists());
    // At or above it: the graph is built and saved, and search maps it instead of building it.
    let out = w.root.join("index-merge-ann");
    merge(&parts, &out, 40).unwrap();
    assert!(out.join("ann.usearch").is_file() && out.join("ann.json").is_file());
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("ann.json")).unwrap()).unwrap();
    assert_eq!(meta["clips"], 40);
    let modified = std::fs::metadata(out.join("ann.usearch")).unwrap().modified().unwrap();
    let e = Engine::open_with_ann(&out, 40).unwrap();
    assert_eq!(e.ann.as_ref().map(|a| a.len()), Some(40));
    assert_eq!(std::fs::metadata(out.join("ann.usearch")).unwrap().modified().unwrap(), modified, "search rebuilt the graph");
    let q = e.index.global(3).to_vec();
    assert_eq!(e.candidates(&q, 1)[0].0, 3);
}
