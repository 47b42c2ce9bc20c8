//! The region-aware first stage on the tiny trained world: the codebook's codes and scores
//! against plain loops, agreement with exhaustive scoring, appending and merging, and an
//! index that cannot silently go wrong (checksums, non-finite scores, global-only models).

use std::path::{Path, PathBuf};

use demovlp_retrieval::EmbeddingSet;
use demovlp_search::build::{build_index, merge, ClipList};
use demovlp_search::cascade::{centroid_scores, centroid_scores_portable, coarse_scores, QueryTables};
use demovlp_search::codes::{ensure_codes, hat_rows, Codes};
use demovlp_search::quality::agreement;
use demovlp_search::search::{Engine, FirstStage, TextQuery};
use demovlp_search::store::Index;

mod common;
use common::{opts, world};

fn queries(e: &Engine, caption: usize) -> Vec<TextQuery> {
    let mut model = e.load_model().unwrap();
    world().samples.iter().map(|s| e.embed_query(&mut model, &s.captions[caption]).unwrap()).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn codes_are_the_nearest_centroids_and_scores_match_a_plain_loop() {
    let w = world();
    let idx = Index::open(&w.index).unwrap();
    let c = Codes::build_or_update(&idx, Some(64), false).unwrap();
    let st = idx.settings();
    let (p, nl) = (st.proj_dim, st.locals());
    assert_eq!(c.codes.len(), idx.len() * nl);
    assert_eq!(c.codebook.centroids, 64);
    for row in c.codebook.rows.chunks(p) {
        let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-3, "centroid norm {n}");
    }
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for i in (0..idx.len()).step_by(7) {
        let mut l = vec![];
        idx.local_into(i, &mut l);
        hat_rows(&mut l, p);
        for (r, x) in l.chunks(p).enumerate() {
            let best = (0..64).map(|k| dot(x, &c.codebook.rows[k * p..(k + 1) * p])).fold(f32::NEG_INFINITY, f32::max);
            let k = c.codes[i * nl + r] as usize;
            assert!(dot(x, &c.codebook.rows[k * p..(k + 1) * p]) >= best - 1e-5, "clip {i} region {r}: not the nearest centroid");
        }
    }
    // The coarse score against a plain loop over words and real regions: the query as it is,
    // and with 15 (the words and the best-word lane fill one 16-lane chunk) and every position
    // (two chunks) taken as real words.
    let e = Engine::open(&w.index).unwrap();
    let q = &queries(&e, 0)[0];
    let lq = q.mask_additive.len();
    assert!(lq > 16, "the query must have room for two chunks of words");
    let masks =
        [q.mask_additive.clone(), (0..lq).map(|l| if l < 15 { 0.0 } else { q.mask_additive[l].min(-1.0) }).collect(), vec![0.0; lq]];
    for mask in &masks {
        let mut words: Vec<f32> = q.local.chunks(p).zip(mask).filter(|(_, &m)| m > -0.5).flat_map(|(r, _)| r.to_vec()).collect();
        hat_rows(&mut words, p);
        let nw = words.len() / p;
        let qt = QueryTables::new(&c, &q.local, mask, st.lambda, st.masked_mean);
        assert_eq!(qt.words(), nw);
        let got = coarse_scores(&c, &qt);
        for i in 0..idx.len() {
            let real: Vec<usize> = (0..nl).filter(|&r| idx.mask(i)[r] != 0).collect();
            let cen = |r: usize| {
                let k = c.codes[i * nl + r] as usize;
                &c.codebook.rows[k * p..(k + 1) * p]
            };
            let s1: f32 =
                words.chunks(p).map(|wv| real.iter().map(|&r| dot(wv, cen(r))).fold(f32::NEG_INFINITY, f32::max)).sum::<f32>() / nw as f32;
            let s2: f32 = real.iter().map(|&r| words.chunks(p).map(|wv| dot(wv, cen(r))).fold(f32::NEG_INFINITY, f32::max)).sum::<f32>()
                / real.len() as f32;
            assert!((got[i] - (s1 + s2)).abs() < 1e-4, "{nw} words, clip {i}: {} vs {}", got[i], s1 + s2);
        }
    }
}

/// The cascade's centroid step is the evaluation's formula with every region slot replaced by
/// its centroid: compared with `demovlp_retrieval`'s exact scorer run on centroid-decoded
/// regions, faithful and masked mean alike (up to the table's float order).
#[test]
fn centroid_scores_are_the_exact_formula_on_centroids() {
    let w = world();
    let idx = Index::open(&w.index).unwrap();
    let c = Codes::build_or_update(&idx, Some(64), false).unwrap();
    let st = idx.settings().clone();
    let (p, nl) = (st.proj_dim, st.locals());
    let e = Engine::open(&w.index).unwrap();
    let qs = queries(&e, 1);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let clips: Vec<usize> = (0..idx.len()).collect();
    // Every clip decoded: region r of clip i = centroid codes[i, r] (raw = unit), masks as stored.
    let mut vl = Vec::with_capacity(idx.len() * nl * p);
    let mut vm = Vec::with_capacity(idx.len() * nl);
    let mut vg = Vec::with_capacity(idx.len() * p);
    for i in 0..idx.len() {
        for r in 0..nl {
            let k = c.codes[i * nl + r] as usize;
            vl.extend_from_slice(&c.codebook.rows[k * p..(k + 1) * p]);
        }
        idx.mask_additive_into(i, &mut vm);
        vg.extend_from_slice(idx.global(i));
    }
    let videos = EmbeddingSet { count: idx.len(), len: nl, dim: p, global: &vg, local: &vl, mask_additive: &vm };
    let mut worst = 0f32;
    for masked_mean in [false, true] {
        for q in qs.iter().step_by(9) {
            let texts = q.as_set();
            let want_local = demovlp_retrieval::eval::local_scores(&texts, &videos, st.lambda, masked_mean, &|_, _| {});
            let qt = QueryTables::new(&c, &q.local, &q.mask_additive, st.lambda, masked_mean);
            // The SIMD form this CPU runs and the portable one.
            for (form, got) in [
                ("default", centroid_scores(&c, &idx, &qt, &q.global_unit, &clips)),
                ("portable", centroid_scores_portable(&c, &idx, &qt, &q.global_unit, &clips)),
            ] {
                for i in 0..idx.len() {
                    let want = dot(&q.global_unit, idx.global(i)) + want_local[i];
                    worst = worst.max((got[i] - want).abs());
                    assert!((got[i] - want).abs() < 2e-4, "{form} form, masked_mean {masked_mean}, clip {i}: {} vs {want}", got[i]);
                }
            }
        }
    }
    eprintln!("largest difference from the exact formula on centroids: {worst:e}");
}

#[test]
fn region_first_stage_agrees_with_exhaustive_scoring() {
    let w = world();
    let dir = w.root.join("index-first-stage");
    copy_dir(&w.index, &dir);
    let regions = Engine::open_for(&dir, FirstStage::Regions, usize::MAX).unwrap();
    assert!(regions.codes.is_some() && dir.join("codes.json").is_file(), "the codes are built and saved on first use");
    let global = Engine::open_for(&dir, FirstStage::Global, usize::MAX).unwrap();
    let codes = Engine::open_for(&dir, FirstStage::Codes, usize::MAX).unwrap();
    // A coarse depth below the index's size, so the cascade's coarse step chooses too.
    let mut shallow = Engine::open_for(&dir, FirstStage::Regions, usize::MAX).unwrap();
    shallow.coarse_depth = Some(40);
    for caption in [0, 1] {
        let qs = queries(&regions, caption);
        // 20 candidates of 100 clips: the first stage decides what the re-rank sees.
        let r = agreement(&regions, &qs, 10, 20);
        let s = agreement(&shallow, &qs, 10, 20);
        let c = agreement(&codes, &qs, 10, 20);
        let g = agreement(&global, &qs, 10, 20);
        eprintln!("caption {caption}: regions {r:?}; coarse depth 40 {s:?}; codes {c:?}; global {g:?}");
        assert!(r.agreement_at_1 >= 0.95 && r.recall_at_k >= 0.95, "caption {caption}: {r:?}");
        assert!(s.agreement_at_1 >= 0.95 && s.recall_at_k >= 0.9, "caption {caption}: {s:?}");
        assert!(c.agreement_at_1 >= 0.95 && c.recall_at_k >= 0.9, "caption {caption}: {c:?}");
        assert!(r.recall_at_k >= c.recall_at_k, "caption {caption}: cascade {r:?} below codes {c:?}");
        assert!(r.recall_at_k > g.recall_at_k, "caption {caption}: regions {r:?} not above global {g:?}");
        // N ≥ clips is exhaustive scoring whatever the first stage.
        let all = agreement(&global, &qs, 10, 100);
        assert_eq!((all.agreement_at_1, all.recall_at_k), (1.0, 1.0));
    }
}

#[test]
fn appending_codes_only_the_new_segment_and_merging_covers_every_clip() {
    let w = world();
    let ids: Vec<String> = w.samples.iter().map(|s| s.clip.clone()).collect();
    let out = w.root.join("index-codes-append");
    build_index(&opts(w, out.clone(), ClipList::Ids(ids[..40].to_vec()))).unwrap();
    let first = ensure_codes(&out, Some(32)).unwrap();
    assert!(first.seconds > 0.0 && first.centroids == 32);
    let book = std::fs::read(out.join("codebook.f32")).unwrap();
    let seg0 = std::fs::read(out.join("codes/seg-00000.u16")).unwrap();
    assert_eq!(ensure_codes(&out, None).unwrap().seconds, 0.0, "nothing to do when current");
    // Append 40 more clips (segments of 30): only the new segments are coded, same codebook.
    build_index(&opts(w, out.clone(), ClipList::Ids(ids[..80].to_vec()))).unwrap();
    ensure_codes(&out, None).unwrap();
    assert_eq!(std::fs::read(out.join("codebook.f32")).unwrap(), book);
    assert_eq!(std::fs::read(out.join("codes/seg-00000.u16")).unwrap(), seg0);
    let idx = Index::open(&out).unwrap();
    let c = Codes::build_or_update(&idx, None, false).unwrap();
    assert!(!c.updated);
    assert_eq!(c.meta.segments, idx.manifest.segments);
    assert_eq!(c.codes.len(), 80 * idx.settings().locals());
    // The appended clips' codes are what the codebook assigns them.
    let p = idx.settings().proj_dim;
    let mut l = vec![];
    idx.local_into(79, &mut l);
    hat_rows(&mut l, p);
    let nl = idx.settings().locals();
    assert_eq!(c.codebook.assign(&l), c.codes[79 * nl..80 * nl].to_vec());

    // Two shards merged: the merged index gets codes over every clip.
    let shards: Vec<PathBuf> = (0..2).map(|i| w.root.join(format!("index-codes-shard{i}"))).collect();
    for (i, s) in shards.iter().enumerate() {
        let mut o = opts(w, s.clone(), ClipList::Ids(ids[..60].to_vec()));
        o.shard = Some((i, 2));
        build_index(&o).unwrap();
        ensure_codes(s, None).unwrap();
    }
    let merged = w.root.join("index-codes-merged");
    merge(&shards, &merged, usize::MAX).unwrap();
    ensure_codes(&merged, None).unwrap();
    let mi = Index::open(&merged).unwrap();
    let mc = Codes::build_or_update(&mi, None, false).unwrap();
    assert!(!mc.updated);
    assert_eq!(mc.codes.len(), 60 * nl);
}

#[test]
fn a_damaged_segment_is_refused_and_non_finite_scores_are_never_ranked() {
    let w = world();
    let dir = w.root.join("index-nan");
    copy_dir(&w.index, &dir);
    let g = dir.join("seg-00000/global.f32");
    let mut b = std::fs::read(&g).unwrap();
    b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&g, &b).unwrap();
    let err = format!("{:#}", Index::open(&dir).err().expect("a damaged segment is refused"));
    assert!(err.contains("global.f32") && err.contains("checksum"), "{err}");
    // Without the checksums (an index written before them), the NaN clip is never ranked.
    std::fs::remove_file(dir.join("seg-00000/sums.json")).unwrap();
    let nan_clip = Index::open(&dir).unwrap().clip_id(0).to_string();
    for stage in [FirstStage::Regions, FirstStage::Global] {
        let e = Engine::open_for(&dir, stage, usize::MAX).unwrap();
        let q = &queries(&e, 0)[0];
        for rerank in [0, 20, 100] {
            let hits = e.search_embedded(q, 10, rerank);
            assert_eq!(hits.len(), 10, "{stage:?} rerank {rerank}");
            assert!(hits.iter().all(|h| h.score.is_finite() && h.clip != nan_clip), "{stage:?} rerank {rerank}: {hits:?}");
        }
    }
}

#[test]
fn a_model_trained_without_the_region_word_loss_ranks_by_the_global_term() {
    let w = world();
    let ids: Vec<String> = w.samples.iter().take(30).map(|s| s.clip.clone()).collect();
    let out = w.root.join("index-global-model");
    let mut o = opts(w, out.clone(), ClipList::Ids(ids));
    o.model = w.root.join("global_model");
    build_index(&o).unwrap();
    let e = Engine::open_for(&out, FirstStage::Regions, usize::MAX).unwrap();
    assert!(!e.index.settings().use_local);
    assert!(e.codes.is_none(), "no region codes for a model without the region-word term");
    let q = &queries(&e, 0)[0];
    let hits = e.search_embedded(q, 10, 100);
    assert_eq!(hits.len(), 10);
    assert!(hits.iter().all(|h| h.local.is_none() && h.score == h.global), "{hits:?}");
    assert!(hits.windows(2).all(|p| p[0].score >= p[1].score));
}

/// Every file of a segment and of the region codes has a checksum: a flipped byte in any of
/// them is reported by `verify`, naming the file; the small files are refused at open, a
/// damaged code file is recomputed; a NaN in the local embeddings never ranks.
#[test]
fn a_flipped_byte_in_any_segment_file_is_reported_naming_it() {
    use demovlp_search::verify::verify;
    let w = world();
    let clean = w.root.join("index-verify-clean");
    copy_dir(&w.index, &clean);
    ensure_codes(&clean, None).unwrap();
    let r = verify(&clean).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let seg = Index::open(&clean).unwrap().manifest.segments[0].clone();
    assert_eq!(r.files_checked, 6 * r.segments + 1 + r.segments, "six files per segment, the codebook, one code file per segment");
    let want_codes = Codes::build_or_update(&Index::open(&clean).unwrap(), None, false).unwrap().codes;
    let files = ["clips.json", "global.f32", "local.f16", "mask.u8", "boxes.f32", "frames.i32"]
        .map(|f| format!("{seg}/{f}"))
        .into_iter()
        .chain(["codebook.f32".to_string(), format!("codes/{seg}.u16")]);
    for (k, f) in files.enumerate() {
        let dir = w.root.join(format!("index-verify-{k}"));
        copy_dir(&clean, &dir);
        let p = dir.join(&f);
        let mut b = std::fs::read(&p).unwrap();
        let at = (b.len() / 2) & !7;
        b[at] ^= 0x01;
        std::fs::write(&p, &b).unwrap();
        let r = verify(&dir).unwrap();
        assert_eq!(r.problems.len(), 1, "{f}: {:?}", r.problems);
        assert!(r.problems[0].contains(&p.display().to_string()) && r.problems[0].contains("checksum"), "{f}: {:?}", r.problems);
        let opened = Index::open(&dir);
        if demovlp_search::store::CHECKED_AT_OPEN.iter().any(|c| f.ends_with(c)) {
            let err = format!("{:#}", opened.err().unwrap_or_else(|| panic!("{f}: opened")));
            assert!(err.contains(&f), "{err}");
        } else {
            let idx = opened.unwrap();
            if f.contains("codebook") || f.starts_with("codes/") {
                // A derived file: recomputed, the same codes as before the damage.
                let c = Codes::build_or_update(&idx, None, true).unwrap();
                assert!(c.updated, "{f}");
                assert_eq!(c.codes, want_codes, "{f}");
                assert!(verify(&dir).unwrap().problems.is_empty(), "{f}: saved again");
            }
        }
    }
    // A NaN in one clip's local embeddings (an index without checksums): that clip never ranks.
    let dir = w.root.join("index-verify-nan");
    copy_dir(&clean, &dir);
    let p = dir.join(format!("{seg}/local.f16"));
    let mut b = std::fs::read(&p).unwrap();
    b[..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let r = verify(&dir).unwrap();
    assert!(r.problems.iter().any(|x| x.contains("local.f16") && x.contains("1 non-finite values")), "{:?}", r.problems);
    std::fs::remove_file(dir.join(format!("{seg}/sums.json"))).unwrap();
    let nan_clip = Index::open(&dir).unwrap().clip_id(0).to_string();
    let e = Engine::open_for(&dir, FirstStage::Regions, usize::MAX).unwrap();
    for q in queries(&e, 0).iter().take(10) {
        for rerank in [20, 100, 1000] {
            let hits = e.search_embedded(q, 10, rerank);
            assert!(hits.iter().all(|h| h.score.is_finite() && h.clip != nan_clip), "rerank {rerank}: {hits:?}");
        }
    }
}
