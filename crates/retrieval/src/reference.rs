//! Unfused reference of the region-word alignment, structured like the published code:
//! `attend` on a block of (context, query) items materialises every [bc, bq, Lq, Lc]
//! intermediate, the two directions each compute their own cosine block, and evaluation
//! walks 8 × 8 blocks (`get_sim_by_segment`). It is the oracle the fused kernels in
//! [`crate::local`] and [`crate::eval`] are tested against, and the baseline that
//! `demovlp bench eval-sims` times. Its backward runs op by op over the stored tensors.

use std::sync::atomic::{AtomicUsize, Ordering};

use demovlp_kernels::gemm::{sgemm, Trans};
use rayon::prelude::*;

use crate::fastmath;
use crate::local::{is_real, AlignConfig, LEAKY_SLOPE, NORM_EPS};
use crate::rows::focal_keep;

/// Every intermediate of one published `func_attention_fast` call plus the cosine/mean
/// that follows it. 4-D tensors are [bc, bq, lq, lc]; `wctx` is [bc, bq, lq, dim].
pub struct AttendTape {
    pub bq: usize,
    pub lq: usize,
    pub bc: usize,
    pub lc: usize,
    pub dim: usize,
    pub q_hat: Vec<f32>,
    pub q_norm: Vec<f32>,
    pub c_hat: Vec<f32>,
    pub c_norm: Vec<f32>,
    pub d: Vec<f32>,
    pub leaky: Vec<f32>,
    pub colnorm: Vec<f32>, // [bc, bq, lc]
    pub p: Vec<f32>,
    pub keep: Vec<f32>,
    pub kept_sum: Vec<f32>, // [bc, bq, lq]
    pub r: Vec<f32>,
    pub wctx: Vec<f32>,
    pub wnorm: Vec<f32>,  // [bc, bq, lq]
    pub cos: Vec<f32>,    // [bc, bq, lq]
    pub weight: Vec<f32>, // [bq, lq] weight of each query position in the mean
    /// sim[c, q] = mean_l cos(q_l, wctx[c, q, l])
    pub sim: Vec<f32>,
}

fn l2norm_rows(x: &[f32], rows: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut hat = vec![0f32; rows * dim];
    let mut norm = vec![0f32; rows];
    for i in 0..rows {
        let row = &x[i * dim..(i + 1) * dim];
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        norm[i] = n;
        for k in 0..dim {
            hat[i * dim + k] = row[k] / (n + NORM_EPS);
        }
    }
    (hat, norm)
}

/// The published attend + cosine + mean for queries `q` [bq, lq, dim] over contexts
/// `c` [bc, lc, dim] with additive masks `mq` [bq, lq], `mc` [bc, lc].
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    bq: usize,
    lq: usize,
    mq: &[f32],
    c: &[f32],
    bc: usize,
    lc: usize,
    mc: &[f32],
    dim: usize,
    cfg: &AlignConfig,
) -> AttendTape {
    let (q_hat, q_norm) = l2norm_rows(q, bq * lq, dim);
    let (c_hat, c_norm) = l2norm_rows(c, bc * lc, dim);
    let blk = lq * lc;
    let n4 = bc * bq * blk;
    // Step 1–2: cosines, LeakyReLU.
    let mut d = vec![0f32; n4];
    for ci in 0..bc {
        for qi in 0..bq {
            let o = (ci * bq + qi) * blk;
            sgemm(
                Trans::No,
                Trans::Yes,
                lq,
                lc,
                dim,
                1.0,
                &q_hat[qi * lq * dim..],
                dim,
                &c_hat[ci * lc * dim..],
                dim,
                0.0,
                &mut d[o..o + blk],
                lc,
            );
        }
    }
    let leaky: Vec<f32> = d.iter().map(|&v| if v > 0.0 { v } else { LEAKY_SLOPE * v }).collect();
    // Step 3: L2 over the query axis.
    let mut colnorm = vec![0f32; bc * bq * lc];
    for cq in 0..bc * bq {
        for l in 0..lq {
            for s in 0..lc {
                let v = leaky[cq * blk + l * lc + s];
                colnorm[cq * lc + s] += v * v;
            }
        }
    }
    for v in colnorm.iter_mut() {
        *v = v.sqrt() + NORM_EPS;
    }
    // Step 4: masked softmax over contexts.
    let mut p = vec![0f32; n4];
    for ci in 0..bc {
        for qi in 0..bq {
            let cq = ci * bq + qi;
            for l in 0..lq {
                let row = &mut p[cq * blk + l * lc..cq * blk + (l + 1) * lc];
                for s in 0..lc {
                    let a = leaky[cq * blk + l * lc + s] / colnorm[cq * lc + s];
                    row[s] = ((a + mq[qi * lq + l]) + mc[ci * lc + s]) * cfg.lambda;
                }
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for v in row.iter_mut() {
                    *v = fastmath::cephes_exp(*v - mx);
                    sum += *v;
                }
                let inv = 1.0 / sum;
                for v in row.iter_mut() {
                    *v *= inv;
                }
            }
        }
    }
    // Step 5: focal "equal" and renormalisation.
    let mut keep = vec![0f32; n4];
    let mut kept_sum = vec![0f32; bc * bq * lq];
    let mut r = vec![0f32; n4];
    for row in 0..bc * bq * lq {
        let pr = &p[row * lc..(row + 1) * lc];
        let total: f32 = pr.iter().sum();
        for s in 0..lc {
            keep[row * lc + s] = if focal_keep(pr[s], lc as f32, total) { 1.0 } else { 0.0 };
        }
        let z: f32 = (0..lc).map(|s| keep[row * lc + s] * pr[s]).sum();
        kept_sum[row] = z;
        for s in 0..lc {
            r[row * lc + s] = keep[row * lc + s] * pr[s] / z;
        }
    }
    // Step 6: weighted context.
    let mut wctx = vec![0f32; bc * bq * lq * dim];
    for ci in 0..bc {
        for qi in 0..bq {
            let cq = ci * bq + qi;
            sgemm(
                Trans::No,
                Trans::No,
                lq,
                dim,
                lc,
                1.0,
                &r[cq * blk..],
                lc,
                &c_hat[ci * lc * dim..],
                dim,
                0.0,
                &mut wctx[cq * lq * dim..(cq + 1) * lq * dim],
                dim,
            );
        }
    }
    // Cosine with the raw queries, mean over the query positions.
    let mut weight = vec![0f32; bq * lq];
    for qi in 0..bq {
        let real = (0..lq).filter(|&l| is_real(mq[qi * lq + l])).count();
        for l in 0..lq {
            weight[qi * lq + l] = if !cfg.masked_mean {
                1.0 / lq as f32
            } else if is_real(mq[qi * lq + l]) {
                1.0 / real as f32
            } else {
                0.0
            };
        }
    }
    let mut wnorm = vec![0f32; bc * bq * lq];
    let mut cos = vec![0f32; bc * bq * lq];
    let mut sim = vec![0f32; bc * bq];
    for ci in 0..bc {
        for qi in 0..bq {
            let cq = ci * bq + qi;
            for l in 0..lq {
                let qv = &q[(qi * lq + l) * dim..(qi * lq + l + 1) * dim];
                let wv = &wctx[(cq * lq + l) * dim..(cq * lq + l + 1) * dim];
                let u: f32 = qv.iter().zip(wv).map(|(a, b)| a * b).sum();
                let wn = wv.iter().map(|v| v * v).sum::<f32>().sqrt();
                wnorm[cq * lq + l] = wn;
                cos[cq * lq + l] = u / (q_norm[qi * lq + l] * wn).max(NORM_EPS);
                sim[cq] += weight[qi * lq + l] * cos[cq * lq + l];
            }
        }
    }
    AttendTape { bq, lq, bc, lc, dim, q_hat, q_norm, c_hat, c_norm, d, leaky, colnorm, p, keep, kept_sum, r, wctx, wnorm, cos, weight, sim }
}

/// Op-by-op backward of [`attend`] for d loss / d sim[c, q] = `gsim` [bc, bq]; returns
/// (d/d q [bq, lq, dim], d/d c [bc, lc, dim]) for the raw inputs.
pub fn attend_backward(t: &AttendTape, q: &[f32], c: &[f32], gsim: &[f32], cfg: &AlignConfig) -> (Vec<f32>, Vec<f32>) {
    let (bq, lq, bc, lc, dim) = (t.bq, t.lq, t.bc, t.lc, t.dim);
    let blk = lq * lc;
    let mut gq = vec![0f32; bq * lq * dim];
    let mut gq_hat = vec![0f32; bq * lq * dim];
    let mut gc_hat = vec![0f32; bc * lc * dim];
    // Mean and cosine.
    let mut gw = vec![0f32; bc * bq * lq * dim];
    for ci in 0..bc {
        for qi in 0..bq {
            let cq = ci * bq + qi;
            for l in 0..lq {
                let g = gsim[cq] * t.weight[qi * lq + l];
                let (qn, wn, cs) = (t.q_norm[qi * lq + l], t.wnorm[cq * lq + l], t.cos[cq * lq + l]);
                let qv = &q[(qi * lq + l) * dim..(qi * lq + l + 1) * dim];
                let wo = (cq * lq + l) * dim;
                for k in 0..dim {
                    let wk = t.wctx[wo + k];
                    if qn * wn > NORM_EPS {
                        gq[(qi * lq + l) * dim + k] += g * (wk / (qn * wn) - cs * qv[k] / (qn * qn));
                        gw[wo + k] = g * (qv[k] / (qn * wn) - cs * wk / (wn * wn));
                    } else {
                        gq[(qi * lq + l) * dim + k] += g * wk / NORM_EPS;
                        gw[wo + k] = g * qv[k] / NORM_EPS;
                    }
                }
            }
        }
    }
    // Weighted context.
    let mut gr = vec![0f32; bc * bq * blk];
    for ci in 0..bc {
        for qi in 0..bq {
            let cq = ci * bq + qi;
            for l in 0..lq {
                for s in 0..lc {
                    let mut acc = 0f32;
                    for k in 0..dim {
                        acc += gw[(cq * lq + l) * dim + k] * t.c_hat[(ci * lc + s) * dim + k];
                        gc_hat[(ci * lc + s) * dim + k] += t.r[cq * blk + l * lc + s] * gw[(cq * lq + l) * dim + k];
                    }
                    gr[cq * blk + l * lc + s] = acc;
                }
            }
        }
    }
    // Renormalisation r = keep·p / Σ keep·p, then softmax, then ×λ.
    let mut ga = vec![0f32; bc * bq * blk];
    for row in 0..bc * bq * lq {
        let o = row * lc;
        let rdot: f32 = (0..lc).map(|s| gr[o + s] * t.r[o + s]).sum();
        let gp: Vec<f32> = (0..lc).map(|s| t.keep[o + s] * (gr[o + s] - rdot) / t.kept_sum[row]).collect();
        let pdot: f32 = (0..lc).map(|s| gp[s] * t.p[o + s]).sum();
        for s in 0..lc {
            ga[o + s] = cfg.lambda * t.p[o + s] * (gp[s] - pdot);
        }
    }
    // Normalisation over the query axis, LeakyReLU.
    let mut gd = vec![0f32; bc * bq * blk];
    for cq in 0..bc * bq {
        for s in 0..lc {
            let n = t.colnorm[cq * lc + s];
            let dot: f32 = (0..lq).map(|l| ga[cq * blk + l * lc + s] * t.leaky[cq * blk + l * lc + s]).sum();
            for l in 0..lq {
                let i = cq * blk + l * lc + s;
                let dn = if n - NORM_EPS > 0.0 { t.leaky[i] / (n - NORM_EPS) } else { 0.0 };
                let gl = ga[i] / n - dot / (n * n) * dn;
                gd[i] = if t.d[i] > 0.0 { gl } else { LEAKY_SLOPE * gl };
            }
        }
    }
    // Cosines of the normalised rows.
    for ci in 0..bc {
        for qi in 0..bq {
            let cq = ci * bq + qi;
            for l in 0..lq {
                for s in 0..lc {
                    let g = gd[cq * blk + l * lc + s];
                    for k in 0..dim {
                        gq_hat[(qi * lq + l) * dim + k] += g * t.c_hat[(ci * lc + s) * dim + k];
                        gc_hat[(ci * lc + s) * dim + k] += g * t.q_hat[(qi * lq + l) * dim + k];
                    }
                }
            }
        }
    }
    let l2_back = |ghat: &[f32], x: &[f32], norm: &[f32], out: &mut [f32]| {
        for (i, &n) in norm.iter().enumerate() {
            let ne = n + NORM_EPS;
            let dot: f32 = (0..dim).map(|k| ghat[i * dim + k] * x[i * dim + k]).sum();
            for k in 0..dim {
                let dn = if n > 0.0 { x[i * dim + k] / n } else { 0.0 };
                out[i * dim + k] += ghat[i * dim + k] / ne - dot / (ne * ne) * dn;
            }
        }
    };
    let mut gc = vec![0f32; bc * lc * dim];
    l2_back(&gq_hat, q, &t.q_norm, &mut gq);
    l2_back(&gc_hat, c, &t.c_norm, &mut gc);
    (gq, gc)
}

/// The published `xattn_score_fast` on a block: S [nv, nt] (rows = videos) =
/// t2i_simᵀ + i2t_sim. Returns the two tapes too (for the backward).
#[allow(clippy::too_many_arguments)]
pub fn local_similarity_block(
    text: &[f32],
    text_mask: &[f32],
    nt: usize,
    words: usize,
    video: &[f32],
    video_mask: &[f32],
    nv: usize,
    regions: usize,
    dim: usize,
    cfg: &AlignConfig,
) -> (Vec<f32>, AttendTape, AttendTape) {
    // Word → region: queries = words, contexts = regions; sim [v, t].
    let w2r = attend(text, nt, words, text_mask, video, nv, regions, video_mask, dim, cfg);
    // Region → word: queries = regions, contexts = words; sim [t, v].
    let r2w = attend(video, nv, regions, video_mask, text, nt, words, text_mask, dim, cfg);
    let mut s = vec![0f32; nv * nt];
    for v in 0..nv {
        for t in 0..nt {
            s[v * nt + t] = r2w.sim[t * nv + v] + w2r.sim[v * nt + t];
        }
    }
    (s, w2r, r2w)
}

/// Op-by-op gradients of Σ g[v, t]·S[v, t] for the block computed by
/// [`local_similarity_block`]; returns (d/d text local, d/d video local).
pub fn local_similarity_block_backward(
    g: &[f32],
    text: &[f32],
    video: &[f32],
    w2r: &AttendTape,
    r2w: &AttendTape,
    cfg: &AlignConfig,
) -> (Vec<f32>, Vec<f32>) {
    let (nv, nt) = (w2r.bc, w2r.bq);
    let mut g_t = vec![0f32; nt * nv];
    for v in 0..nv {
        for t in 0..nt {
            g_t[t * nv + v] = g[v * nt + t];
        }
    }
    let (gt1, gv1) = attend_backward(w2r, text, video, g, cfg);
    let (gv2, gt2) = attend_backward(r2w, video, text, &g_t, cfg);
    (gt1.iter().zip(&gt2).map(|(a, b)| a + b).collect(), gv1.iter().zip(&gv2).map(|(a, b)| a + b).collect())
}

/// The published evaluation's blocked local similarity (`get_sim_by_segment`, 8 × 8
/// blocks): S [nv, nt] rows = videos. `progress(done, total)` is called per block.
#[allow(clippy::too_many_arguments)]
pub fn local_similarity_segmented(
    text: &[f32],
    text_mask: &[f32],
    nt: usize,
    words: usize,
    video: &[f32],
    video_mask: &[f32],
    nv: usize,
    regions: usize,
    dim: usize,
    cfg: &AlignConfig,
    segment: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Vec<f32> {
    // Blocks run in parallel (the published code's matmuls and element-wise ops use
    // every core too); each block materialises its own [8, 8, Lq, Lc] tensors.
    let (nvb, ntb) = (nv.div_ceil(segment), nt.div_ceil(segment));
    let done = AtomicUsize::new(0);
    let blocks: Vec<(usize, usize, Vec<f32>)> = (0..nvb * ntb)
        .into_par_iter()
        .map(|b| {
            let (i, j) = (b / ntb, b % ntb);
            let (v0, v1) = (i * segment, ((i + 1) * segment).min(nv));
            let (t0, t1) = (j * segment, ((j + 1) * segment).min(nt));
            let (blk, _, _) = local_similarity_block(
                &text[t0 * words * dim..t1 * words * dim],
                &text_mask[t0 * words..t1 * words],
                t1 - t0,
                words,
                &video[v0 * regions * dim..v1 * regions * dim],
                &video_mask[v0 * regions..v1 * regions],
                v1 - v0,
                regions,
                dim,
                cfg,
            );
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, nvb * ntb);
            (i, j, blk)
        })
        .collect();
    let mut s = vec![0f32; nv * nt];
    for (i, j, blk) in blocks {
        let (v0, v1) = (i * segment, ((i + 1) * segment).min(nv));
        let (t0, t1) = (j * segment, ((j + 1) * segment).min(nt));
        for v in v0..v1 {
            for t in t0..t1 {
                s[v * nt + t] = blk[(v - v0) * (t1 - t0) + (t - t0)];
            }
        }
    }
    s
}
