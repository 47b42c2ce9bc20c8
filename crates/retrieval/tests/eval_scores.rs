//! Evaluation scores: the published sums in the loss fixtures, and the fast blocked local
//! similarity against the unfused segmented reference.

mod common;
use std::cell::RefCell;

use common::*;
use demovlp_retrieval::local::AlignConfig;
use demovlp_retrieval::reference::local_similarity_segmented;
use demovlp_retrieval::{eval_scores, eval_scores_with, EmbeddingSet, EvalOptions, ScoreMode};

fn fixture_case(name: &str) {
    let t = load(name);
    let g = |k: &str| &t[k].1;
    let (b, w, p) = (t["in.local_text"].0[0], t["in.local_text"].0[1], t["in.local_text"].0[2]);
    let n = t["in.local_video"].0[1];
    let texts = EmbeddingSet {
        count: b,
        len: w,
        dim: p,
        global: g("in.global_text"),
        local: g("in.local_text"),
        mask_additive: g("in.text_mask_additive"),
    };
    let videos = EmbeddingSet {
        count: b,
        len: n,
        dim: p,
        global: g("in.global_video"),
        local: g("in.local_video"),
        mask_additive: g("in.video_mask_additive"),
    };
    let calls = RefCell::new(Vec::new());
    let aligned = eval_scores(&texts, &videos, 20.0, ScoreMode::Aligned, true, &|d, tot| calls.borrow_mut().push((d, tot)));
    let e = rel_to_max(&aligned, g("out.eval_sum_aligned"));
    assert!(e < 1e-5, "{name}: aligned rel err {e}");
    let calls = calls.into_inner();
    assert_eq!(*calls.last().unwrap(), (b * b, b * b), "progress ends at total");
    assert!(calls.windows(2).all(|c| c[0].0 <= c[1].0), "progress is monotone");
    let reference = eval_scores(&texts, &videos, 20.0, ScoreMode::Reference, true, &|_, _| {});
    let e = rel_to_max(&reference, g("out.eval_sum_as_reference"));
    assert!(e < 1e-5, "{name}: reference-mode rel err {e}");
    let global = eval_scores(&texts, &videos, 20.0, ScoreMode::Aligned, false, &|_, _| {});
    assert!(rel_to_max(&global, g("out.global_sim_text_video")) < 1e-6);
}

#[test]
fn loss_small_eval_sums() {
    fixture_case("loss_small.safetensors");
}

#[test]
fn loss_realistic_eval_sums() {
    fixture_case("loss_realistic.safetensors");
}

fn padded_mask(count: usize, len: usize, seed: u64) -> Vec<f32> {
    // Item i keeps a pseudo-random number of real positions in 1..=len.
    (0..count)
        .flat_map(|i| {
            let real = 1 + ((i as u64 * 7919 + seed * 104_729) % len as u64) as usize;
            (0..len).map(move |k| if k < real { 0.0 } else { -100.0 })
        })
        .collect()
}

fn random_vs_segmented(masked_mean: bool) {
    // Rectangular (more texts than videos), not multiples of the block sizes.
    let (nt, nv, w, n, p) = (13, 11, 9, 14, 20);
    let (gt, gv) = (randn(nt * p, 1), randn(nv * p, 2));
    let (lt, lv) = (randn(nt * w * p, 3), randn(nv * n * p, 4));
    let (mt, mv) = (padded_mask(nt, w, 5), padded_mask(nv, n, 6));
    let texts = EmbeddingSet { count: nt, len: w, dim: p, global: &gt, local: &lt, mask_additive: &mt };
    let videos = EmbeddingSet { count: nv, len: n, dim: p, global: &gv, local: &lv, mask_additive: &mv };
    let opts = EvalOptions { lambda: 20.0, mode: ScoreMode::Aligned, use_local: true, masked_mean };
    let fast = eval_scores_with(&texts, &videos, &opts, &|_, _| {});
    let global = eval_scores_with(&texts, &videos, &EvalOptions { use_local: false, ..opts }, &|_, _| {});
    let cfg = AlignConfig { lambda: 20.0, masked_mean };
    let s_loc = local_similarity_segmented(&lt, &mt, nt, w, &lv, &mv, nv, n, p, &cfg, 8, &|_, _| {});
    let want: Vec<f32> = (0..nt * nv).map(|i| global[i] + s_loc[(i % nv) * nt + i / nv]).collect();
    let e = rel_to_max(&fast, &want);
    assert!(e < 1e-5, "masked_mean={masked_mean}: fast vs segmented reference rel err {e}");
}

#[test]
fn fast_local_matches_segmented_reference() {
    random_vs_segmented(false);
}

#[test]
fn fast_local_matches_segmented_reference_masked_mean() {
    random_vs_segmented(true);
}

#[test]
#[should_panic(expected = "needs as many texts")]
fn reference_mode_rejects_rectangular_sets() {
    let (g2, g3) = (randn(2 * 4, 1), randn(3 * 4, 2));
    let (l2, l3) = (randn(2 * 2 * 4, 3), randn(3 * 2 * 4, 4));
    let m = vec![0f32; 6];
    let texts = EmbeddingSet { count: 3, len: 2, dim: 4, global: &g3, local: &l3, mask_additive: &m };
    let videos = EmbeddingSet { count: 2, len: 2, dim: 4, global: &g2, local: &l2, mask_additive: &m[..4] };
    eval_scores(&texts, &videos, 20.0, ScoreMode::Reference, true, &|_, _| {});
}
