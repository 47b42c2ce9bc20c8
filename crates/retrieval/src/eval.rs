//! Evaluation scores (SPEC §8): Score[t, v] = G[t, v] + S_loc[v, t].
//!
//! The local part is quadratic in both counts and, per pair, linear in words × regions ×
//! width, so it is computed pair by pair with O(words × regions) scratch per thread:
//! - the word × region cosine block M = Ŵ_t R̂_vᵀ is computed once per pair and read by
//!   both directions (the published code computes it twice);
//! - the weighted context w = Σ_s R_s ĉ_s is never formed: ⟨q, w⟩ = (‖q‖ + ε)·Σ_s R_s M[q, s]
//!   and ‖w‖² = Σ_{s,s'} R_s R_s' ⟨ĉ_s, ĉ_s'⟩ over the focal-kept contexts only (about a
//!   tenth), with each item's Gram matrix ⟨ĉ_s, ĉ_s'⟩ computed once;
//! - contexts whose mask makes their attention exactly 0 (padding) are skipped;
//! - one GEMM per (video, 8 texts) task; tasks run in parallel; the element-wise loops
//!   run on whole 8-lane chunks and are compiled for AVX2 when the CPU has it.
//!
//! Memory: normalised copies of the local embeddings, the Gram matrices ([V, N, N] +
//! [T, W, W], 0.27 GB at 1000 × 1000 with 99 words, 240 regions) and < 2 MB of scratch
//! per thread, independent of the pair count (0.94 GB peak RSS measured for the whole
//! `bench eval-sims` at 1000 × 1000, width 256, inputs included).

use std::sync::atomic::{AtomicBool, Ordering};

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
pub fn eval_scores(
    texts: &EmbeddingSet,
    videos: &EmbeddingSet,
    lambda: f32,
    mode: ScoreMode,
    use_local: bool,
    progress: &dyn Fn(usize, usize),
) -> Vec<f32> {
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

/// Texts scored against one video per task: their cosine blocks come from one GEMM
/// (the video's rows are packed once for all of them).
const TEXT_BLOCK: usize = 8;
/// Videos per progress report.
const VIDEO_WAVE: usize = 8;

/// S_loc [V, T] (rows = videos), SPEC §6 s1[v, t] + s2[t, v].
pub fn local_scores(
    texts: &EmbeddingSet,
    videos: &EmbeddingSet,
    lambda: f32,
    masked_mean: bool,
    progress: &dyn Fn(usize, usize),
) -> Vec<f32> {
    let text = Items::new(texts.local, texts.mask_additive, texts.count, texts.len, texts.dim);
    let video = Items::new(videos.local, videos.mask_additive, videos.count, videos.len, videos.dim);
    local_scores_items(&text, &video, lambda, masked_mean, progress)
}

/// [`local_scores`] on prepared items (the training loss's forward uses it too).
pub fn local_scores_items(text: &Items, video: &Items, lambda: f32, masked_mean: bool, progress: &dyn Fn(usize, usize)) -> Vec<f32> {
    let (nt, nv) = (text.count, video.count);
    let (text, video) = (text, video);
    let (text_gram, video_gram) = (grams(text), grams(video));
    let (text_active, video_active) = (Active::new(text, lambda), Active::new(video, lambda));
    let mut s = vec![0f32; nv * nt];
    let total = nv * nt;
    let text_blocks = nt.div_ceil(TEXT_BLOCK);
    progress(0, total);
    for v0 in (0..nv).step_by(VIDEO_WAVE) {
        let v1 = (v0 + VIDEO_WAVE).min(nv);
        let tasks: Vec<(usize, usize, Vec<f32>)> = (0..(v1 - v0) * text_blocks)
            .into_par_iter()
            .map_init(TaskScratch::default, |sc, k| {
                // Consecutive tasks share the text block: its rows (the GEMM's A, re-packed
                // per call) stay in cache while the wave's videos go by.
                let nw = v1 - v0;
                let (v, tb) = (v0 + k % nw, k / nw);
                let t0 = tb * TEXT_BLOCK;
                let t1 = (t0 + TEXT_BLOCK).min(nt);
                (
                    v,
                    t0,
                    score_block(
                        sc,
                        Side { items: text, gram: &text_gram, active: &text_active },
                        t0..t1,
                        Side { items: video, gram: &video_gram, active: &video_active },
                        v,
                        lambda,
                        masked_mean,
                    ),
                )
            })
            .collect();
        for (v, t0, vals) in tasks {
            s[v * nt + t0..v * nt + t0 + vals.len()].copy_from_slice(&vals);
        }
        progress(v1 * nt, total);
    }
    s
}

/// Per-thread scratch; row lengths are padded to multiples of 8 so the hot loops run on
/// whole 8-lane chunks (padding contexts get mask −∞, i.e. probability 0).
#[derive(Default)]
struct TaskScratch {
    m: Vec<f32>,       // [texts·W, Np] cosine blocks of the task's texts with the video
    colnorm: Vec<f32>, // [Np] over words, per region (word→region step 3)
    rownorm: Vec<f32>, // [W]  over regions, per word (region→word step 3)
    ctx: Vec<f32>,     // [queries, active contexts (padded)] one direction's cosines
    cnorm: Vec<f32>,   // its step-3 norms per context
    cmask: Vec<f32>,   // its context mask (−∞ on the padding)
    z: Vec<f32>,
    kept: Kept,
}

/// Focal-kept contexts of one query row.
#[derive(Default)]
struct Kept {
    pos: Vec<u32>, // in the active list
    ctx: Vec<u32>, // context index
    w: Vec<f32>,
}

impl Kept {
    fn fit(&mut self, len: usize) {
        if self.pos.len() < len {
            self.pos.resize(len, 0);
            self.ctx.resize(len, 0);
            self.w.resize(len, 0.0);
        }
    }
}

fn pad8(x: usize) -> usize {
    x.div_ceil(8) * 8
}

/// S_loc[v, t] for t in `texts`.
/// One side of the pairs: items, their Gram matrices [count, len, len], active contexts.
#[derive(Clone, Copy)]
struct Side<'a> {
    items: &'a Items<'a>,
    gram: &'a [f32],
    active: &'a Active,
}

/// Per item, the positions that can get non-zero attention as contexts: a context whose
/// additive mask is far below the item's largest one (padding, −100 against 0) has
/// exp(λ·(… − 100)) = 0 exactly in f32 whatever the cosines: it contributes nothing to
/// the softmax sums and is never kept, so it is skipped; the focal threshold still uses
/// the full context count.
struct Active {
    idx: Vec<u32>,
    start: Vec<usize>,
}

impl Active {
    fn new(items: &Items, lambda: f32) -> Self {
        let mut idx = Vec::new();
        let mut start = vec![0];
        for i in 0..items.count {
            let m = items.mask(i);
            let top = m.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            // |A| ≤ 1, so logits differ by at most λ·(2 + Δmask); exp underflows below −88.
            // (Written as !(… > 88) so a NaN margin keeps the context.)
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            idx.extend((0..items.len as u32).filter(|&s| !(lambda * (top - m[s as usize] - 2.0) > 88.0)));
            start.push(idx.len());
        }
        Active { idx, start }
    }

    fn of(&self, i: usize) -> &[u32] {
        &self.idx[self.start[i]..self.start[i + 1]]
    }
}

/// Testing hook: route every pair through the portable path even on AVX2 machines.
static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);

#[doc(hidden)]
pub fn force_portable_path(on: bool) {
    FORCE_PORTABLE.store(on, Ordering::Relaxed);
}

/// S_loc[v, t] for t in `texts`.
fn score_block(
    sc: &mut TaskScratch,
    text: Side,
    texts: std::ops::Range<usize>,
    video: Side,
    v: usize,
    lambda: f32,
    masked_mean: bool,
) -> Vec<f32> {
    let (w, n, dim) = (text.items.len, video.items.len, text.items.dim);
    let np = pad8(n);
    let rows = texts.len() * w;
    // Padding columns are never written by the GEMM and stay 0.
    if sc.m.len() != TEXT_BLOCK * w * np {
        sc.m = vec![0.0; TEXT_BLOCK * w * np];
    }
    let hats = &text.items.hat[texts.start * w * dim..texts.end * w * dim];
    sgemm(Trans::No, Trans::Yes, rows, n, dim, 1.0, hats, dim, video.items.hat(v), dim, 0.0, &mut sc.m, np);
    let portable = FORCE_PORTABLE.load(Ordering::Relaxed);
    texts
        .enumerate()
        .map(|(i, t)| {
            #[cfg(target_arch = "x86_64")]
            {
                if !portable && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { pair_avx2(sc, i, text, t, video, v, lambda, masked_mean) };
                }
            }
            let _ = portable;
            pair::<false>(sc, i, text, t, video, v, lambda, masked_mean)
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn pair_avx2(sc: &mut TaskScratch, i: usize, text: Side, t: usize, video: Side, v: usize, lambda: f32, masked_mean: bool) -> f32 {
    pair::<true>(sc, i, text, t, video, v, lambda, masked_mean)
}

/// s2[t, v] + s1[v, t] from the task's i-th cosine block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pair<const AVX2: bool>(
    sc: &mut TaskScratch,
    i: usize,
    text: Side,
    t: usize,
    video: Side,
    v: usize,
    lambda: f32,
    masked_mean: bool,
) -> f32 {
    let (w, n) = (text.items.len, video.items.len);
    let np = pad8(n);
    let m = &sc.m[i * w * np..(i + 1) * w * np];
    sc.colnorm.clear();
    sc.colnorm.resize(np, 0.0);
    sc.rownorm.clear();
    sc.rownorm.resize(w, 0.0);
    // Step 3 norms of both directions from one pass over LeakyReLU(M).
    for (r, row) in m.chunks_exact(np).enumerate() {
        let acc = sq_norms::<AVX2>(row, &mut sc.colnorm);
        sc.rownorm[r] = sum8(&acc).sqrt() + NORM_EPS;
    }
    for x in sc.colnorm.iter_mut() {
        *x = x.sqrt() + NORM_EPS;
    }
    let (tm, vm) = (text.items.mask(t), video.items.mask(v));
    let (ta, va) = (text.active.of(t), video.active.of(v));
    let (wa, na) = (pad8(ta.len()), pad8(va.len()));

    // Word → region: query rows = words of t, contexts = the active regions of v. When
    // every region is active the gathered block would equal M itself (its padding
    // columns are 0 too), so M is read in place.
    let all_active = va.len() == n && va.iter().enumerate().all(|(j, &c)| c as usize == j);
    if !all_active {
        gather(&mut sc.ctx, m, np, w, va, na, false);
    }
    pad_gather(&mut sc.cnorm, &sc.colnorm, va, na, 1.0);
    pad_gather(&mut sc.cmask, vm, va, na, f32::NEG_INFINITY);
    sc.z.resize(na.max(wa), 0.0);
    let vgram = &video.gram[v * n * n..(v + 1) * n * n];
    let (mut sum, mut real) = (0f32, 0usize);
    let ctx = if all_active { m } else { &sc.ctx[..] };
    sc.kept.fit(na.max(wa));
    // query_row_cos relies on every active context being < the context count.
    assert!(va.iter().all(|&c| (c as usize) < n) && ta.iter().all(|&c| (c as usize) < w));
    for (l, mrow) in ctx.chunks_exact(na).enumerate() {
        let c = query_row_cos::<AVX2>(
            mrow,
            &sc.cnorm,
            tm[l],
            &sc.cmask,
            lambda,
            n,
            va,
            vgram,
            text.items.norm(t)[l],
            &mut sc.z[..na],
            &mut sc.kept,
        );
        if !masked_mean || is_real(tm[l]) {
            sum += c;
            real += 1;
        }
    }
    let s1 = mean(sum, real, w, masked_mean);

    // Region → word: query rows = regions of v, contexts = the active words of t.
    gather(&mut sc.ctx, m, np, n, ta, wa, true);
    pad_gather(&mut sc.cnorm, &sc.rownorm, ta, wa, 1.0);
    pad_gather(&mut sc.cmask, tm, ta, wa, f32::NEG_INFINITY);
    let tgram = &text.gram[t * w * w..(t + 1) * w * w];
    let (mut sum, mut real) = (0f32, 0usize);
    for (r, mrow) in sc.ctx.chunks_exact(wa).enumerate() {
        let c = query_row_cos::<AVX2>(
            mrow,
            &sc.cnorm,
            vm[r],
            &sc.cmask,
            lambda,
            w,
            ta,
            tgram,
            video.items.norm(v)[r],
            &mut sc.z[..wa],
            &mut sc.kept,
        );
        if !masked_mean || is_real(vm[r]) {
            sum += c;
            real += 1;
        }
    }
    let s2 = mean(sum, real, n, masked_mean);
    s2 + s1
}

/// out [rows, width]: the `cols` columns of m [.., ld] (or, `transposed`, of its rows:
/// out[r, j] = m[cols[j], r]), zero-padded to `width`.
#[inline(always)]
fn gather(out: &mut Vec<f32>, m: &[f32], ld: usize, rows: usize, cols: &[u32], width: usize, transposed: bool) {
    out.clear();
    out.resize(rows * width, 0.0);
    if transposed {
        for (j, &c) in cols.iter().enumerate() {
            let src = &m[c as usize * ld..c as usize * ld + rows];
            for (r, &x) in src.iter().enumerate() {
                out[r * width + j] = x;
            }
        }
    } else {
        // Bounds checked once here so the inner loop is a plain indexed copy.
        assert!(cols.iter().all(|&c| (c as usize) < ld) && cols.len() <= width);
        for r in 0..rows {
            let (src, dst) = (&m[r * ld..(r + 1) * ld], &mut out[r * width..r * width + cols.len()]);
            for (d, &c) in dst.iter_mut().zip(cols) {
                // SAFETY: every c < ld = src.len(), asserted above.
                *d = unsafe { *src.get_unchecked(c as usize) };
            }
        }
    }
}

#[inline(always)]
fn pad_gather(out: &mut Vec<f32>, src: &[f32], idx: &[u32], width: usize, pad: f32) {
    out.clear();
    out.extend(idx.iter().map(|&i| src[i as usize]));
    out.resize(width, pad);
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

/// One query row of attend → focal → context → cosine. `mrow[s]` = ⟨q̂, ĉ_s⟩ over the
/// contexts (padded to a multiple of 8, padding masked with −∞); `lc` real contexts with
/// Gram matrix `gram` [lc, lc]; `q_norm` = ‖q‖ of the raw query row. The weighted context
/// w = Σ_s R_s ĉ_s stays implicit: ⟨q, w⟩ = (‖q‖ + ε)·Σ_s R_s mrow[s] and
/// ‖w‖² = Σ_{s,s'} R_s R_s' ⟨ĉ_s, ĉ_s'⟩, both over the focal-kept s only.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn query_row_cos<const AVX2: bool>(
    mrow: &[f32],
    norms: &[f32],
    mq: f32,
    mc: &[f32],
    lambda: f32,
    lc: usize,
    active: &[u32],
    gram: &[f32],
    q_norm: f32,
    z: &mut [f32],
    kept: &mut Kept,
) -> f32 {
    // Logits in the published order ((A + m_q) + m_c)·λ, and their max.
    let mx = logits::<AVX2>(z, mrow, norms, mq, mc, lambda);
    let acc = exp_shifted::<AVX2>(z, mx);
    let inv = 1.0 / sum8(&acc);
    let acc = scale_sum::<AVX2>(z, inv);
    let total = sum8(&acc);
    // Focal "equal": keep P above the row mean (branch-free compaction; adding the
    // dropped entries as 0 leaves the kept sum unchanged), renormalise.
    let la = active.len();
    // `kept` is sized and `active` (< lc) checked once per direction by the caller; the
    // rest is checked here so the loops below index without bounds checks.
    assert!(kept.pos.len() >= z.len() && kept.ctx.len() >= la && kept.w.len() >= z.len());
    assert!(z.len() >= la && mrow.len() >= la && gram.len() >= lc * lc);
    let (kp, kc, kw) = (&mut kept.pos[..], &mut kept.ctx[..la], &mut kept.w[..]);
    // Branch-free left-pack per 8-lane chunk: every lane is written at slot k and k only
    // advances past the kept ones (data-dependent branches here mispredict constantly).
    let mut k = 0usize;
    for (c, zc) in z.chunks_exact(8).enumerate() {
        let valid = la.saturating_sub(c * 8).min(8);
        let bits = focal_bits::<AVX2>(zc.try_into().unwrap(), lc as f32, total) & ((1u32 << valid) - 1);
        if bits == 0 {
            continue;
        }
        for (q, &p) in zc.iter().enumerate() {
            // SAFETY: k ≤ c·8 + q < z.len() ≤ kp.len(), kw.len() (asserted above).
            unsafe {
                *kp.get_unchecked_mut(k) = (c * 8 + q) as u32;
                *kw.get_unchecked_mut(k) = p;
            }
            k += ((bits >> q) & 1) as usize;
        }
    }
    // Kept sum in kept order, as before.
    let mut kept_sum = 0f32;
    for i in 0..k {
        kc[i] = active[kp[i] as usize];
        kept_sum += kw[i];
    }
    let (pos, idx, wts) = (&kp[..k], &kc[..k], &mut kw[..k]);
    // Renormalise in its own loop so the divisions vectorise (each is exact per lane).
    for r in wts.iter_mut() {
        *r /= kept_sum;
    }
    let mut u = 0f32;
    for (&s, r) in pos.iter().zip(wts.iter()) {
        // SAFETY: s < la ≤ mrow.len() (asserted above).
        u += *r * unsafe { *mrow.get_unchecked(s as usize) };
    }
    // ‖w‖² with the Gram matrix's symmetry: Σ_i R_i (R_i G_ii + 2 Σ_{j<i} R_j G_ij);
    // four partial sums break the add latency chain.
    let wts = &*wts;
    let mut wn2 = 0f32;
    for i in 0..k {
        let si = idx[i] as usize;
        // SAFETY: every kept context index is an active one, < lc (asserted above), and
        // gram holds lc × lc values.
        let off = unsafe { gram_off::<AVX2>(&wts[..i], &idx[..i], gram.as_ptr().add(si * lc)) };
        wn2 += wts[i] * (wts[i] * gram[si * lc + si] + 2.0 * off);
    }
    let wn = wn2.max(0.0).sqrt();
    (q_norm + NORM_EPS) * u / (q_norm * wn).max(NORM_EPS)
}

/// Σ_j w[j]·grow[idx[j]] in four partial sums (lane j mod 4, then (0+1)+(2+3)), the same
/// order on both paths.
///
/// # Safety
/// grow[idx[j]] must be in bounds for every j.
#[inline(always)]
unsafe fn gram_off<const AVX2: bool>(w: &[f32], idx: &[u32], grow: *const f32) -> f32 {
    let n = w.len().min(idx.len());
    let full = n / 4 * 4;
    let mut off = [0f32; 4];
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        use std::arch::x86_64::*;
        let mut acc = _mm_setzero_ps();
        for j in (0..full).step_by(4) {
            let g = _mm_set_ps(
                *grow.add(*idx.get_unchecked(j + 3) as usize),
                *grow.add(*idx.get_unchecked(j + 2) as usize),
                *grow.add(*idx.get_unchecked(j + 1) as usize),
                *grow.add(*idx.get_unchecked(j) as usize),
            );
            acc = _mm_add_ps(acc, _mm_mul_ps(_mm_loadu_ps(w.as_ptr().add(j)), g));
        }
        _mm_storeu_ps(off.as_mut_ptr(), acc);
    }
    if !AVX2 || cfg!(not(target_arch = "x86_64")) {
        for j in (0..full).step_by(4) {
            for (q, o) in off.iter_mut().enumerate() {
                *o += *w.get_unchecked(j + q) * *grow.add(*idx.get_unchecked(j + q) as usize);
            }
        }
    }
    for j in full..n {
        off[j - full] += *w.get_unchecked(j) * *grow.add(*idx.get_unchecked(j) as usize);
    }
    (off[0] + off[1]) + (off[2] + off[3])
}

/// Bit q set iff p[q]·lc − total > 0 (the focal "above the row mean" test; NaN → unset).
#[inline(always)]
fn focal_bits<const AVX2: bool>(p: &[f32; 8], lc: f32, total: f32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { focal_bits_avx2(p, lc, total) };
    }
    let mut bits = 0u32;
    for (q, &x) in p.iter().enumerate() {
        bits |= ((x * lc - total > 0.0) as u32) << q;
    }
    bits
}

/// Same operations as the portable test (mul, then sub, no FMA), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn focal_bits_avx2(p: &[f32; 8], lc: f32, total: f32) -> u32 {
    use std::arch::x86_64::*;
    let x = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p.as_ptr()), _mm256_set1_ps(lc)), _mm256_set1_ps(total));
    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_setzero_ps())) as u32
}

/// Whether the AVX2 element-wise path runs here (also used by the training kernel).
pub(crate) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !FORCE_PORTABLE.load(Ordering::Relaxed) && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One padded row (length a multiple of 8, padding masked with −∞ in `mc`):
/// z ← softmax_s(((LeakyReLU(m[s]) / norms[s] + mq) + mc[s])·λ); returns Σ_s z[s].
/// `simd` must come from [`simd_available`].
pub(crate) fn softmax_row(simd: bool, z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
    #[inline(always)]
    fn run<const AVX2: bool>(z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
        let mx = logits::<AVX2>(z, m, norms, mq, mc, lambda);
        let acc = exp_shifted::<AVX2>(z, mx);
        let inv = 1.0 / sum8(&acc);
        sum8(&scale_sum::<AVX2>(z, inv))
    }
    if simd {
        run::<true>(z, m, norms, mq, mc, lambda)
    } else {
        run::<false>(z, m, norms, mq, mc, lambda)
    }
}

/// z[s] = ((LeakyReLU(m[s]) / norms[s] + mq) + mc[s])·λ; returns max z.
#[inline(always)]
fn logits<const AVX2: bool>(z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { logits_avx2(z, m, norms, mq, mc, lambda) };
    }
    let mut mx = [f32::NEG_INFINITY; 8];
    for (((zc, mr), nr), mcr) in z.chunks_exact_mut(8).zip(m.chunks_exact(8)).zip(norms.chunks_exact(8)).zip(mc.chunks_exact(8)) {
        for k in 0..8 {
            let v = ((leaky(mr[k]) / nr[k] + mq) + mcr[k]) * lambda;
            zc[k] = v;
            mx[k] = if v > mx[k] { v } else { mx[k] };
        }
    }
    mx.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn logits_avx2(z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
    use std::arch::x86_64::*;
    let (zero, slope, vmq, vl) = (_mm256_setzero_ps(), _mm256_set1_ps(LEAKY_SLOPE), _mm256_set1_ps(mq), _mm256_set1_ps(lambda));
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    let n = z.len() / 8 * 8;
    assert!(m.len() >= n && norms.len() >= n && mc.len() >= n);
    for o in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(m.as_ptr().add(o));
        let y = _mm256_blendv_ps(_mm256_mul_ps(slope, x), x, _mm256_cmp_ps::<_CMP_GT_OQ>(x, zero));
        let a = _mm256_div_ps(y, _mm256_loadu_ps(norms.as_ptr().add(o)));
        let v = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(a, vmq), _mm256_loadu_ps(mc.as_ptr().add(o))), vl);
        _mm256_storeu_ps(z.as_mut_ptr().add(o), v);
        mx = _mm256_max_ps(v, mx);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), mx);
    out.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// z ← z·inv; returns the 8 lane sums of the result.
#[inline(always)]
fn scale_sum<const AVX2: bool>(z: &mut [f32], inv: f32) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { scale_sum_avx2(z, inv) };
    }
    let mut acc = [0f32; 8];
    for zc in z.chunks_exact_mut(8) {
        for k in 0..8 {
            zc[k] *= inv;
            acc[k] += zc[k];
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn scale_sum_avx2(z: &mut [f32], inv: f32) -> [f32; 8] {
    use std::arch::x86_64::*;
    let vi = _mm256_set1_ps(inv);
    let mut acc = _mm256_setzero_ps();
    for zc in z.chunks_exact_mut(8) {
        let p = _mm256_mul_ps(_mm256_loadu_ps(zc.as_ptr()), vi);
        _mm256_storeu_ps(zc.as_mut_ptr(), p);
        acc = _mm256_add_ps(acc, p);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Σ LeakyReLU(row)² per lane, and per column into `col`.
#[inline(always)]
fn sq_norms<const AVX2: bool>(row: &[f32], col: &mut [f32]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { sq_norms_avx2(row, col) };
    }
    let mut acc = [0f32; 8];
    for (cn, x) in col.chunks_exact_mut(8).zip(row.chunks_exact(8)) {
        for k in 0..8 {
            let y = leaky(x[k]);
            cn[k] += y * y;
            acc[k] += y * y;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sq_norms_avx2(row: &[f32], col: &mut [f32]) -> [f32; 8] {
    use std::arch::x86_64::*;
    let (zero, slope) = (_mm256_setzero_ps(), _mm256_set1_ps(LEAKY_SLOPE));
    let mut acc = _mm256_setzero_ps();
    let n = col.len() / 8 * 8;
    assert!(row.len() >= n);
    for o in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(row.as_ptr().add(o));
        let y = _mm256_blendv_ps(_mm256_mul_ps(slope, x), x, _mm256_cmp_ps::<_CMP_GT_OQ>(x, zero));
        let y2 = _mm256_mul_ps(y, y);
        _mm256_storeu_ps(col.as_mut_ptr().add(o), _mm256_add_ps(_mm256_loadu_ps(col.as_ptr().add(o)), y2));
        acc = _mm256_add_ps(acc, y2);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// z ← exp(z − mx) in place; returns the 8 lane sums (lane k sums the elements ≡ k mod 8,
/// identically on both paths).
#[inline(always)]
fn exp_shifted<const AVX2: bool>(z: &mut [f32], mx: f32) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 = true is only instantiated inside `pair_avx2` and behind
        // `simd_available()`, both after the CPU feature check.
        return unsafe { exp_shifted_avx2(z, mx) };
    }
    let mut acc = [0f32; 8];
    for zc in z.chunks_exact_mut(8) {
        let zc: &mut [f32; 8] = zc.try_into().unwrap();
        for k in 0..8 {
            let e = fastmath::exp(zc[k] - mx);
            zc[k] = e;
            acc[k] += e;
        }
    }
    acc
}

/// [`fastmath::exp`] on 8 lanes with the same operations in the same order (no FMA), so
/// results are bit-identical to the scalar path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn exp_shifted_avx2(z: &mut [f32], mx: f32) -> [f32; 8] {
    use std::arch::x86_64::*;
    let set = |x: f32| _mm256_set1_ps(x);
    let (lo, hi, log2e, magic) = (set(-87.0), set(88.0), set(std::f32::consts::LOG2_E), set(12_582_912.0));
    let (ln2_hi, ln2_lo) = (set(0.693_359_4), set(-2.121_944_4e-4));
    let c = [1.398_199_9e-3f32, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
    let (p0, one, vmx) = (set(1.987_569_1e-4), set(1.0), set(mx));
    let magic_bits = _mm256_set1_epi32(12_582_912.0f32.to_bits() as i32);
    let bias = _mm256_set1_epi32(127);
    let mut acc = _mm256_setzero_ps();
    for zc in z.chunks_exact_mut(8) {
        let x = _mm256_sub_ps(_mm256_loadu_ps(zc.as_ptr()), vmx);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let t = _mm256_add_ps(_mm256_mul_ps(xc, log2e), magic);
        let n = _mm256_sub_ps(t, magic);
        let r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, ln2_hi)), _mm256_mul_ps(n, ln2_lo));
        let mut p = p0;
        for &ck in &c {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), set(ck));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), one);
        let ni = _mm256_sub_epi32(_mm256_castps_si256(t), magic_bits);
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(ni, bias)));
        let e = _mm256_mul_ps(y, scale);
        let e = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, lo), e);
        _mm256_storeu_ps(zc.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Gram matrices ĉ ĉᵀ [len, len] of every item.
fn grams(items: &Items) -> Vec<f32> {
    let (l, d) = (items.len, items.dim);
    let mut g = vec![0f32; items.count * l * l];
    g.par_chunks_mut((l * l).max(1)).enumerate().for_each(|(i, out)| {
        let h = items.hat(i);
        sgemm(Trans::No, Trans::Yes, l, l, d, 1.0, h, d, h, d, 0.0, out, l);
    });
    g
}
