//! The fused per-pair alignment kernel against the unfused reference (the published
//! structure, every [bc, bq, Lq, Lc] tensor materialised), forward and backward, in both
//! mean modes, on random embeddings with padded words and regions.

mod common;
use common::*;
use demovlp_retrieval::local::{local_similarity, local_similarity_backward, AlignConfig, Items};
use demovlp_retrieval::reference::{local_similarity_block, local_similarity_block_backward, local_similarity_segmented};

struct Case {
    nt: usize,
    nv: usize,
    w: usize,
    n: usize,
    dim: usize,
    text: Vec<f32>,
    video: Vec<f32>,
    tmask: Vec<f32>,
    vmask: Vec<f32>,
}

fn case(nt: usize, nv: usize, w: usize, n: usize, dim: usize, seed: u64) -> Case {
    let text = randn(nt * w * dim, seed);
    let video = randn(nv * n * dim, seed + 1);
    // Item i has its last (i·3 mod len) positions padded; item 0 none.
    let mask = |count: usize, len: usize| -> Vec<f32> {
        (0..count * len).map(|k| if k % len >= len - (k / len * 3) % len { -100.0 } else { 0.0 }).collect()
    };
    Case { nt, nv, w, n, dim, tmask: mask(nt, w), vmask: mask(nv, n), text, video }
}

fn check(c: &Case, masked_mean: bool) {
    let cfg = AlignConfig { lambda: 20.0, masked_mean };
    let ti = Items::new(&c.text, &c.tmask, c.nt, c.w, c.dim);
    let vi = Items::new(&c.video, &c.vmask, c.nv, c.n, c.dim);
    let fused = local_similarity(&ti, &vi, &cfg);
    let (reference, w2r, r2w) = local_similarity_block(&c.text, &c.tmask, c.nt, c.w, &c.video, &c.vmask, c.nv, c.n, c.dim, &cfg);
    let e = rel_to_max(&fused, &reference);
    assert!(e < 1e-5, "masked_mean={masked_mean}: fused vs reference sims rel err {e}");
    // The segmented evaluation path (3 × 3 blocks here) gives the same matrix.
    let seg = local_similarity_segmented(&c.text, &c.tmask, c.nt, c.w, &c.video, &c.vmask, c.nv, c.n, c.dim, &cfg, 3, &|_, _| {});
    assert!(rel_to_max(&seg, &reference) < 1e-6);

    let g = randn(c.nv * c.nt, 99);
    let (gt, gv) = local_similarity_backward(&g, &ti, &vi, &cfg);
    let (rt, rv) = local_similarity_block_backward(&g, &c.text, &c.video, &w2r, &r2w, &cfg);
    let (et, ev) = (rel_to_max(&gt, &rt), rel_to_max(&gv, &rv));
    assert!(et < 2e-5 && ev < 2e-5, "masked_mean={masked_mean}: grad rel err text {et}, video {ev}");
    // Padded words get gradient in both modes: in the faithful mean directly, in the
    // masked mean through the step-3 normalisation over the query axis they share.
    let padded_text_grad: f32 =
        (0..c.nt * c.w).filter(|&i| c.tmask[i] < 0.0).map(|i| gt[i * c.dim..(i + 1) * c.dim].iter().map(|v| v.abs()).sum::<f32>()).sum();
    assert!(padded_text_grad > 0.0);
}

#[test]
fn fused_matches_reference_faithful_mean() {
    check(&case(5, 4, 7, 9, 12, 1), false);
}

#[test]
fn fused_matches_reference_masked_mean() {
    check(&case(5, 4, 7, 9, 12, 2), true);
}

/// Rectangular, more items than the backward's fixed chunk count, a width that is not a
/// multiple of 8.
#[test]
fn fused_matches_reference_many_items() {
    check(&case(19, 6, 5, 6, 11, 3), false);
}

#[test]
fn masked_mean_differs_from_faithful_when_padding_exists() {
    let c = case(3, 3, 6, 8, 10, 4);
    let ti = Items::new(&c.text, &c.tmask, c.nt, c.w, c.dim);
    let vi = Items::new(&c.video, &c.vmask, c.nv, c.n, c.dim);
    let a = local_similarity(&ti, &vi, &AlignConfig { lambda: 20.0, masked_mean: false });
    let b = local_similarity(&ti, &vi, &AlignConfig { lambda: 20.0, masked_mean: true });
    // Pair (video 0, text 0) has no padding: identical; others differ.
    assert!((a[0] - b[0]).abs() < 1e-6);
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
}

/// Resuming training must reproduce an uninterrupted run bit for bit, so the loss
/// gradients may not depend on the thread count or scheduling.
#[test]
fn gradients_are_bitwise_deterministic_across_thread_counts() {
    use demovlp_retrieval::{losses_forward_backward, LossConfig, LossInputs};
    let c = case(20, 20, 7, 9, 12, 5);
    let (gt, gv) = (randn(20 * 12, 6), randn(20 * 12, 7));
    let x = LossInputs {
        batch: 20,
        words: c.w,
        regions: c.n,
        dim: c.dim,
        global_text: &gt,
        global_video: &gv,
        local_text: &c.text,
        local_video: &c.video,
        text_mask_additive: &c.tmask,
        video_mask_additive: &c.vmask,
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| losses_forward_backward(&LossConfig::default(), &x, true))
    };
    let (o1, g1) = run(1);
    let (o3, g3) = run(3);
    assert_eq!(o1.loss_total.to_bits(), o3.loss_total.to_bits());
    assert_eq!(g1.local_text, g3.local_text);
    assert_eq!(g1.local_video, g3.local_video);
    assert_eq!(g1.global_text, g3.global_text);
}
