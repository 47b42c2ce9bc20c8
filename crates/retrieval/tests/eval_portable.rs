//! The AVX2 and portable element-wise paths of the fast evaluation perform the same
//! operations in the same order: identical scores, bit for bit. (Own test binary: the
//! path switch is process-wide.)

mod common;
use common::randn;
use demovlp_retrieval::eval::force_portable_path;
use demovlp_retrieval::{eval_scores_with, EmbeddingSet, EvalOptions, ScoreMode};

#[test]
fn portable_and_simd_paths_agree_exactly() {
    let (nt, nv, w, n, p) = (10, 9, 13, 21, 24);
    let (gt, gv, lt, lv) = (randn(nt * p, 1), randn(nv * p, 2), randn(nt * w * p, 3), randn(nv * n * p, 4));
    let mask = |count: usize, len: usize| -> Vec<f32> {
        (0..count * len).map(|k| if k % len < 3 + (k / len) % len { 0.0 } else { -100.0 }).collect()
    };
    let (mt, mv) = (mask(nt, w), mask(nv, n));
    let texts = EmbeddingSet { count: nt, len: w, dim: p, global: &gt, local: &lt, mask_additive: &mt };
    let videos = EmbeddingSet { count: nv, len: n, dim: p, global: &gv, local: &lv, mask_additive: &mv };
    for masked_mean in [false, true] {
        let opts = EvalOptions { lambda: 20.0, mode: ScoreMode::Aligned, use_local: true, masked_mean };
        force_portable_path(false);
        let simd = eval_scores_with(&texts, &videos, &opts, &|_, _| {});
        force_portable_path(true);
        let portable = eval_scores_with(&texts, &videos, &opts, &|_, _| {});
        force_portable_path(false);
        assert!(simd.iter().all(|x| x.is_finite()));
        assert_eq!(simd, portable, "masked_mean={masked_mean}");
    }
}
