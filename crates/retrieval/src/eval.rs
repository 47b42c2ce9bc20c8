//! Evaluation scores (SPEC §8): Score[t, v] = G[t, v] + S_loc[v, t].
//!
//! The local part is quadratic in both counts and, per pair, linear in words × regions ×
//! width, so it is computed pair by pair with O(words × regions) scratch per thread:
//! - the word × region cosine block M = Ŵ_t R̂_vᵀ is computed once per pair and read by
//!   both directions (the published code computes it twice);
//! - the weighted context is never formed: ⟨q, Σ_s R_s ĉ_s⟩ = (‖q‖ + ε)·Σ_s R_s M[q, s]
//!   and ‖Σ_s R_s ĉ_s‖² = Σ_{s,s'} R_s R_s' ⟨ĉ_s, ĉ_s'⟩ over the focal-kept s only (about
//!   a tenth of the contexts), with the per-item Gram matrices ⟨ĉ_s, ĉ_s'⟩ computed once;
//! - pairs run in parallel; the hot loops are compiled for AVX2 when the CPU has it.
//! Memory: the normalised copies of the local embeddings, the text Grams [T, W, W], the
//! Grams of one block of videos, and per-thread scratch — ~0.75 GB at 1000 × 1000 with
//! 99 words, 240 regions, width 256 (inputs included), independent of the pair count.

use demovlp_kernels::gemm::{sgemm, Trans};
use rayon::prelude::*;

use crate::fastmath;
use crate::global::cosine_matrix;
use crate::local::{is_real, Items, LEAKY_SLOPE, NORM_EPS};

/// How the local similarity (rows = videos) is combined with the global one (rows = texts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScoreMode {
    /// Score[t, v] = G[t, v] + S_loc[v, t] (the correct combination).
    #[default]
    Aligned,
    /// Score[i, j] = G[i, j] + S_loc[i, j]: the published evaluation, which adds S_loc
    /// untransposed. Only defined for as many texts as videos.
    Reference,
}

/// Embeddings of every test text (len = words) or video (len = regions).
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingSet<'a> {
    pub count: usize,
    /// W or N positions per item.
    pub len: usize,
    pub dim: usize,
    pub global: &'a [f32],        // [count, dim]
    pub local: &'a [f32],         // [count, len, dim]
    pub mask_additive: &'a [f32], // [count, len] 0 real / −100 padding
}

impl EmbeddingSet<'_> {
    fn check(&self, what: &str) {
        let (c, l, d) = (self.count, self.len, self.dim);
        assert_eq!(self.global.len(), c * d, "{what}: global has {} values, expected [{c}, {d}]", self.global.len());
        assert_eq!(self.local.len(), c * l * d, "{what}: local has {} values, expected [{c}, {l}, {d}]", self.local.len());
        assert_eq!(self.mask_additive.len(), c * l, "{what}: mask has {} values, expected [{c}, {l}]", self.mask_additive.len());
    }
}

/// Everything `eval_scores` can be asked for.
#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    pub lambda: f32,
    pub mode: ScoreMode,
    pub use_local: bool,
    /// Means over real positions only (the loss's `masked_mean` variant); false = published.
    pub masked_mean: bool,
}

/// Score matrix [T, V] (rows = texts). `progress(done, total)` is called from the calling
/// thread as blocks of pairs finish. Panics on inconsistent shapes, and in
/// `ScoreMode::Reference` when T ≠ V (the published code cannot combine those either).
pub fn eval_scores(texts: &EmbeddingSet, videos: &EmbeddingSet, lambda: f32, mode: ScoreMode, use_local: bool, progress: &dyn Fn(usize, usize)) -> Vec<f32> {
    eval_scores_with(texts, videos, &EvalOptions { lambda, mode, use_local, masked_mean: false }, progress)
}

/// [`eval_scores`] with every option.
pub fn eval_scores_with(texts: &EmbeddingSet, videos: &EmbeddingSet, opts: &EvalOptions, progress: &dyn Fn(usize, usize)) -> Vec<f32> {
    texts.check("texts");
    videos.check("videos");
    assert_eq!(texts.dim, videos.dim, "texts have width {}, videos {}", texts.dim, videos.dim);
    let (nt, nv) = (texts.count, videos.count);
    if opts.mode == ScoreMode::Reference {
        assert_eq!(nt, nv, "ScoreMode::Reference adds S_loc [videos, texts] untransposed and needs as many texts ({nt}) as videos ({nv})");
    }
    let mut score = cosine_matrix(texts.global, nt, videos.global, nv, texts.dim);
    if !opts.use_local {
        return score;
    }
    let s_loc = local_scores(texts, videos, opts.lambda, opts.masked_mean, progress);
    for t in 0..nt {
        for v in 0..nv {
            score[t * nv + v] += match opts.mode {
                ScoreMode::Aligned => s_loc[v * nt + t],
                ScoreMode::Reference => s_loc[t * nt + v],
            };
        }
    }
    score
}

/// Videos per block: their Grams are computed together and every text is scored
/// against the block before the next one.
const VIDEO_BLOCK: usize = 8;

/// S_loc [V, T] (rows = videos), SPEC §6 s1[v, t] + s2[t, v].
pub fn local_scores(texts: &EmbeddingSet, videos: &EmbeddingSet, lambda: f32, masked_mean: bool, progress: &dyn Fn(usize, usize)) -> Vec<f32> {
    let (nt, nv, w, n, dim) = (texts.count, videos.count, texts.len, videos.len, texts.dim);
    let text = Items::new(texts.local, texts.mask_additive, nt, w, dim);
    let video = Items::new(videos.local, videos.mask_additive, nv, n, dim);
    let text_gram = grams(&text, 0..nt);
    let mut s = vec![0f32; nv * nt];
    let total = nv * nt;
    progress(0, total);
    for v0 in (0..nv).step_by(VIDEO_BLOCK) {
        let v1 = (v0 + VIDEO_BLOCK).min(nv);
        let video_gram = grams(&video, v0..v1);
        // Each task: one text against the block's videos.
        let cols: Vec<Vec<f32>> = (0..nt)
            .into_par_iter()
            .map_init(PairScratch::default, |sc, t| {
                (v0..v1)
                    .map(|v| {
                        let tg = &text_gram[t * w * w..(t + 1) * w * w];
                        let vg = &video_gram[(v - v0) * n * n..(v - v0 + 1) * n * n];
                        pair_score(sc, &text, t, tg, &video, v, vg, lambda, masked_mean)
                    })
                    .collect()
            })
            .collect();
        for (t, col) in cols.iter().enumerate() {
            for (i, &x) in col.iter().enumerate() {
                s[(v0 + i) * nt + t] = x;
            }
        }
        progress(v1 * nt, total);
    }
    s
}

/// Gram matrices ĉ ĉᵀ [len, len] of the given items.
fn grams(items: &Items, range: std::ops::Range<usize>) -> Vec<f32> {
    let (l, d) = (items.len, items.dim);
    let mut g = vec![0f32; range.len() * l * l];
    g.par_chunks_mut((l * l).max(1)).zip(range).for_each(|(out, i)| {
        let h = items.hat(i);
        sgemm(Trans::No, Trans::Yes, l, l, d, 1.0, h, d, h, d, 0.0, out, l);
    });
    g
}

#[derive(Default)]
struct PairScratch {
    m: Vec<f32>,       // [W, N]
    mt: Vec<f32>,      // [N, W]
    colnorm: Vec<f32>, // [N]  over words, per region (word→region step 3)
    rownorm: Vec<f32>, // [W]  over regions, per word (region→word step 3)
    z: Vec<f32>,
    kept_idx: Vec<u32>,
    kept_w: Vec<f32>,
}

/// s1[v, t] + s2[t, v] for one pair.
#[allow(clippy::too_many_arguments)]
fn pair_score(sc: &mut PairScratch, text: &Items, t: usize, tgram: &[f32], video: &Items, v: usize, vgram: &[f32], lambda: f32, masked_mean: bool) -> f32 {
    let (w, n, dim) = (text.len, video.len, text.dim);
    sc.m.resize(w * n, 0.0);
    sc.mt.resize(n * w, 0.0);
    sgemm(Trans::No, Trans::Yes, w, n, dim, 1.0, text.hat(t), dim, video.hat(v), dim, 0.0, &mut sc.m, n);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { pair_tail_avx2(sc, text, t, tgram, video, v, vgram, lambda, masked_mean) };
        }
    }
    pair_tail(sc, text, t, tgram, video, v, vgram, lambda, masked_mean)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn pair_tail_avx2(sc: &mut PairScratch, text: &Items, t: usize, tgram: &[f32], video: &Items, v: usize, vgram: &[f32], lambda: f32, masked_mean: bool) -> f32 {
    pair_tail(sc, text, t, tgram, video, v, vgram, lambda, masked_mean)
}

/// Everything after the cosine block: both directions on `sc.m`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pair_tail(sc: &mut PairScratch, text: &Items, t: usize, tgram: &[f32], video: &Items, v: usize, vgram: &[f32], lambda: f32, masked_mean: bool) -> f32 {
    let (w, n) = (text.len, video.len);
    let (tmask, vmask) = (text.mask(t), video.mask(v));
    sc.colnorm.clear();
    sc.colnorm.resize(n, 0.0);
    sc.rownorm.clear();
    sc.rownorm.resize(w, 0.0);
    // Step 3 norms of both directions from one pass over LeakyReLU(M).
    for i in 0..w {
        let row = &sc.m[i * n..(i + 1) * n];
        let mut acc = [0f32; 8];
        for (c, chunk) in row.chunks(8).enumerate() {
            for (k, &x) in chunk.iter().enumerate() {
                let y = leaky(x);
                sc.colnorm[c * 8 + k] += y * y;
                acc[k] += y * y;
            }
        }
        sc.rownorm[i] = sum8(&acc).sqrt() + NORM_EPS;
    }
    for x in sc.colnorm.iter_mut() {
        *x = x.sqrt() + NORM_EPS;
    }
    transpose(&sc.m, w, n, &mut sc.mt);

    // Word → region: query rows = words of t, contexts = regions of v.
    let s1 = {
        let (mut sum, mut real) = (0f32, 0usize);
        for i in 0..w {
            let c = query_row_cos(
                &sc.m[i * n..(i + 1) * n],
                &sc.colnorm,
                tmask[i],
                vmask,
                lambda,
                vgram,
                text.norm(t)[i],
                &mut sc.z,
                &mut sc.kept_idx,
                &mut sc.kept_w,
            );
            if !masked_mean || is_real(tmask[i]) {
                sum += c;
                real += 1;
            }
        }
        mean(sum, real, w, masked_mean)
    };
    // Region → word: query rows = regions of v, contexts = words of t.
    let s2 = {
        let (mut sum, mut real) = (0f32, 0usize);
        for r in 0..n {
            let c = query_row_cos(
                &sc.mt[r * w..(r + 1) * w],
                &sc.rownorm,
                vmask[r],
                tmask,
                lambda,
                tgram,
                video.norm(v)[r],
                &mut sc.z,
                &mut sc.kept_idx,
                &mut sc.kept_w,
            );
            if !masked_mean || is_real(vmask[r]) {
                sum += c;
                real += 1;
            }
        }
        mean(sum, real, n, masked_mean)
    };
    s2 + s1
}

#[inline(always)]
fn mean(sum: f32, real: usize, len: usize, masked_mean: bool) -> f32 {
    if masked_mean {
        if real == 0 {
            0.0
        } else {
            sum / real as f32
        }
    } else {
        sum / len as f32
    }
}

#[inline(always)]
fn leaky(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        LEAKY_SLOPE * x
    }
}

#[inline(always)]
fn sum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// One query row of attend: `mrow[s]` = ⟨q̂, ĉ_s⟩ over the contexts. Returns
/// cos(q, Σ_s R_s ĉ_s) with the weighted context left implicit (see the module doc).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn query_row_cos(
    mrow: &[f32],
    colnorm: &[f32],
    mq: f32,
    mc: &[f32],
    lambda: f32,
    gram: &[f32],
    q_norm: f32,
    z: &mut Vec<f32>,
    kept_idx: &mut Vec<u32>,
    kept_w: &mut Vec<f32>,
) -> f32 {
    let lc = mrow.len();
    z.clear();
    z.resize(lc, 0.0);
    // Logits in the published order, and their max.
    let mut mx = [f32::NEG_INFINITY; 8];
    for (c, (zc, (mr, (nr, mcr)))) in z.chunks_mut(8).zip(mrow.chunks(8).zip(colnorm.chunks(8).zip(mc.chunks(8)))).enumerate() {
        let _ = c;
        for k in 0..zc.len() {
            let v = ((leaky(mr[k]) / nr[k] + mq) + mcr[k]) * lambda;
            zc[k] = v;
            mx[k] = if v > mx[k] { v } else { mx[k] };
        }
    }
    let mx = mx.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut acc = [0f32; 8];
    for zc in z.chunks_mut(8) {
        for k in 0..zc.len() {
            let e = fastmath::exp(zc[k] - mx);
            zc[k] = e;
            acc[k] += e;
        }
    }
    let inv = 1.0 / sum8(&acc);
    let mut acc = [0f32; 8];
    for zc in z.chunks_mut(8) {
        for k in 0..zc.len() {
            zc[k] *= inv;
            acc[k] += zc[k];
        }
    }
    let total = sum8(&acc);
    // Focal "equal": keep P above the row mean; renormalise.
    kept_idx.clear();
    kept_w.clear();
    let mut kept = 0f32;
    for (s, &p) in z.iter().enumerate() {
        if p * lc as f32 - total > 0.0 {
            kept_idx.push(s as u32);
            kept_w.push(p);
            kept += p;
        }
    }
    let mut u = 0f32;
    for (&s, r) in kept_idx.iter().zip(kept_w.iter_mut()) {
        *r /= kept;
        u += *r * mrow[s as usize];
    }
    // ‖Σ R_s ĉ_s‖² through the Gram matrix, kept entries only.
    let mut wn2 = 0f32;
    for (&s, &r) in kept_idx.iter().zip(kept_w.iter()) {
        let grow = &gram[s as usize * lc..(s as usize + 1) * lc];
        let mut inner = 0f32;
        for (&s2, &r2) in kept_idx.iter().zip(kept_w.iter()) {
            inner += r2 * grow[s2 as usize];
        }
        wn2 += r * inner;
    }
    let wn = wn2.max(0.0).sqrt();
    // ⟨q, ĉ_s⟩ = (‖q‖ + ε)·⟨q̂, ĉ_s⟩.
    (q_norm + NORM_EPS) * u / (q_norm * wn).max(NORM_EPS)
}

fn transpose(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const T: usize = 16;
    for i0 in (0..rows).step_by(T) {
        for j0 in (0..cols).step_by(T) {
            for i in i0..(i0 + T).min(rows) {
                for j in j0..(j0 + T).min(cols) {
                    out[j * rows + i] = a[i * cols + j];
                }
            }
        }
    }
}
