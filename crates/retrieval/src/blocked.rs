//! The local (region-word) similarity of many (text, video) pairs at once, blocked, with
//! bounded memory: what evaluation scores ([`crate::eval`]) and the training loss's forward
//! ([`crate::loss`]) compute. The training backward recomputes each pair with the explicit
//! kernel of [`crate::local`]; both use the row kernels of [`crate::rows`].
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
//!   run on whole 8-lane chunks and are compiled for AVX2 when `demovlp_kernels::simd`
//!   selected AVX2 or AVX-512.
//!
//! Memory: normalised copies of the local embeddings, the Gram matrices ([V, N, N] +
//! [T, W, W], 0.27 GB at 1000 × 1000 with 99 words, 240 regions) and < 2 MB of scratch
//! per thread, independent of the pair count (0.94 GB peak RSS measured for the whole
//! `bench eval-sims` at 1000 × 1000, width 256, inputs included).

use demovlp_kernels::gemm::{sgemm, Trans};
use rayon::prelude::*;

use crate::local::{is_real, Items, NORM_EPS};
use crate::rows::{focal_bits, focal_renormalise, gram_off, pad8, simd_available, softmax_lanes, sq_norms, sum8};

/// Texts scored against one video per task: their cosine blocks come from one GEMM
/// (the video's rows are packed once for all of them).
const TEXT_BLOCK: usize = 8;
/// Videos per progress report.
const VIDEO_WAVE: usize = 8;

/// S_loc [V, T] (rows = videos), SPEC §6 s1[v, t] + s2[t, v], on prepared items: what
/// [`crate::eval::local_scores`] and the training loss's forward both run.
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
    let simd = simd_available();
    texts
        .enumerate()
        .map(|(i, t)| {
            #[cfg(target_arch = "x86_64")]
            {
                if simd {
                    // SAFETY: `simd_available` only says yes where the CPU has AVX2 and FMA.
                    return unsafe { pair_avx2(sc, i, text, t, video, v, lambda, masked_mean) };
                }
            }
            let _ = simd;
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
    // Softmax of the logits in the published order ((A + m_q) + m_c)·λ.
    let total = softmax_lanes::<AVX2>(z, mrow, norms, mq, mc, lambda);
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
    focal_renormalise(wts, kept_sum);
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
