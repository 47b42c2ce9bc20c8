//! Region-word alignment (SPEC §6), fused per (text, video) pair, forward and backward.
//!
//! For one pair the word × region block M[w, r] = ⟨ŵ_w, r̂_r⟩ is computed once and feeds
//! both directions: word→region reads it as D[l = w, s = r] (queries = words, contexts =
//! regions), region→word reads its transpose. Each direction then runs
//! attend → focal → weighted context → cosine → mean on [Lq, Lc] scratch, so nothing of
//! size (B, B, words, regions) is allocated. The backward recomputes the pair's forward
//! (like flash attention) and pushes gradients back through every step the published
//! autograd graph differentiates: the row L2 normalisations of step 1, the
//! normalisation over the query axis of step 3, the softmax, and the renormalisation of
//! the focal-kept weights (the keep/drop decision itself is a constant).
//!
//! Masks are additive (0 real, −100 padding) and enter the logits exactly in the
//! published order `((A + m_q) + m_c) · λ` in f32: padded query rows sit near −2000, where
//! f32 rounding visibly quantises A, and those rows are part of the faithful mean.

use demovlp_kernels::gemm::{sgemm, Trans};
use rayon::prelude::*;

use crate::fastmath;
use crate::rows;

/// ε of the published `l2norm` (added to the norm) and of the cosine clamp.
pub const NORM_EPS: f32 = 1e-8;
/// Negative slope of the LeakyReLU in step 2.
pub const LEAKY_SLOPE: f32 = 0.1;

/// Hyper-parameters of the alignment.
#[derive(Clone, Copy, Debug)]
pub struct AlignConfig {
    /// λ: softmax inverse temperature of steps 4 and of the loss.
    pub lambda: f32,
    /// false (faithful): means over all positions, padding included; true: over real ones.
    pub masked_mean: bool,
}

/// Whether an additive mask entry marks a real position (published masks are 0 / −100).
#[inline]
pub fn is_real(m: f32) -> bool {
    m > -0.5
}

/// One side's local embeddings (texts: words, videos: regions), with the per-row data
/// every pair needs: x̂ = x / (‖x‖ + 1e-8) and ‖x‖.
pub struct Items<'a> {
    pub count: usize,
    pub len: usize,
    pub dim: usize,
    pub raw: &'a [f32],
    pub mask: &'a [f32],
    pub hat: Vec<f32>,
    pub norm: Vec<f32>,
}

impl<'a> Items<'a> {
    pub fn new(raw: &'a [f32], mask: &'a [f32], count: usize, len: usize, dim: usize) -> Self {
        assert_eq!(raw.len(), count * len * dim, "local embeddings: expected [{count}, {len}, {dim}]");
        assert_eq!(mask.len(), count * len, "additive mask: expected [{count}, {len}]");
        let mut hat = vec![0f32; raw.len()];
        let mut norm = vec![0f32; count * len];
        hat.par_chunks_mut(dim.max(1) * 64).zip(norm.par_chunks_mut(64)).enumerate().for_each(|(c, (h, n))| {
            for (i, nn) in n.iter_mut().enumerate() {
                let row0 = (c * 64 + i) * dim;
                let row = &raw[row0..row0 + dim];
                let nrm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                *nn = nrm;
                let inv = nrm + NORM_EPS;
                for (o, v) in h[i * dim..(i + 1) * dim].iter_mut().zip(row) {
                    *o = v / inv;
                }
            }
        });
        Items { count, len, dim, raw, mask, hat, norm }
    }

    pub fn raw(&self, i: usize) -> &[f32] {
        &self.raw[i * self.len * self.dim..(i + 1) * self.len * self.dim]
    }
    pub fn hat(&self, i: usize) -> &[f32] {
        &self.hat[i * self.len * self.dim..(i + 1) * self.len * self.dim]
    }
    pub fn norm(&self, i: usize) -> &[f32] {
        &self.norm[i * self.len..(i + 1) * self.len]
    }
    pub fn mask(&self, i: usize) -> &[f32] {
        &self.mask[i * self.len..(i + 1) * self.len]
    }
}

/// One attend direction's operands for one pair.
struct DirInputs<'a> {
    lq: usize,
    lc: usize,
    dim: usize,
    /// [lq, lc] cosines of normalised query and context rows.
    d: &'a [f32],
    q_raw: &'a [f32],
    q_norm: &'a [f32],
    c_hat: &'a [f32],
    mq: &'a [f32],
    mc: &'a [f32],
}

/// Scratch of one direction; kept between forward and backward of the same pair.
#[derive(Default)]
struct Direction {
    leaky: Vec<f32>,    // [lq, lc] LeakyReLU(D)
    colnorm: Vec<f32>,  // [lc]  sqrt(Σ_l leaky²) + ε  (normalisation over the query axis)
    p: Vec<f32>,        // [lq, lc] softmax over contexts
    r: Vec<f32>,        // [lq, lc] focal-kept weights renormalised (0 where dropped)
    kept_sum: Vec<f32>, // [lq] Σ of the kept P
    wc: Vec<f32>,       // [lq, dim] weighted context
    wnorm: Vec<f32>,    // [lq] ‖wc‖
    cos: Vec<f32>,      // [lq]
    weight: Vec<f32>,   // [lq] weight of each position in the mean
    // backward scratch
    gwc: Vec<f32>,  // [lq, dim]
    gr: Vec<f32>,   // [lq, lc]
    colc: Vec<f32>, // [lc]
    // padded row scratch
    cn_p: Vec<f32>,
    mc_p: Vec<f32>,
    d_p: Vec<f32>,
    z_p: Vec<f32>,
}

fn pad_into(out: &mut Vec<f32>, src: &[f32], len: usize, pad: f32) {
    out.clear();
    out.extend_from_slice(src);
    out.resize(len, pad);
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

impl Direction {
    /// sim = mean_l cos(q_l, Σ_s R[l, s] ĉ_s).
    fn forward(&mut self, x: &DirInputs, cfg: &AlignConfig) -> f32 {
        let (lq, lc, dim) = (x.lq, x.lc, x.dim);
        resize(&mut self.leaky, lq * lc);
        resize(&mut self.colnorm, lc);
        resize(&mut self.p, lq * lc);
        resize(&mut self.r, lq * lc);
        resize(&mut self.kept_sum, lq);
        resize(&mut self.wc, lq * dim);
        resize(&mut self.wnorm, lq);
        resize(&mut self.cos, lq);
        resize(&mut self.weight, lq);

        // Steps 2–3: LeakyReLU, then L2 over the query axis l for every context s.
        for l in 0..lq {
            let (drow, lrow) = (&x.d[l * lc..(l + 1) * lc], &mut self.leaky[l * lc..(l + 1) * lc]);
            for s in 0..lc {
                let v = drow[s];
                let y = if v > 0.0 { v } else { LEAKY_SLOPE * v };
                lrow[s] = y;
                self.colnorm[s] += y * y;
            }
        }
        for n in self.colnorm.iter_mut() {
            *n = n.sqrt() + NORM_EPS;
        }

        // Steps 4–5 per query row: masked softmax over contexts, the focal "equal" keep
        // (`rows::focal_keep`: above the row mean), renormalise the kept weights.
        // Rows are padded to whole 8-lane chunks for the shared (SIMD) softmax kernel.
        let lcp = lc.div_ceil(8) * 8;
        let simd = rows::simd_available();
        pad_into(&mut self.cn_p, &self.colnorm, lcp, 1.0);
        pad_into(&mut self.mc_p, x.mc, lcp, f32::NEG_INFINITY);
        resize(&mut self.d_p, lcp);
        resize(&mut self.z_p, lcp);
        for l in 0..lq {
            self.d_p[..lc].copy_from_slice(&x.d[l * lc..(l + 1) * lc]);
            let total = rows::softmax_row(simd, &mut self.z_p, &self.d_p, &self.cn_p, x.mq[l], &self.mc_p, cfg.lambda);
            let prow = &mut self.p[l * lc..(l + 1) * lc];
            prow.copy_from_slice(&self.z_p[..lc]);
            let rrow = &mut self.r[l * lc..(l + 1) * lc];
            let mut kept = 0f32;
            for s in 0..lc {
                if rows::focal_keep(prow[s], lc as f32, total) {
                    rrow[s] = prow[s];
                    kept += prow[s];
                }
            }
            rows::focal_renormalise(rrow, kept);
            self.kept_sum[l] = kept;
        }

        // Step 6: weighted context.
        sgemm(Trans::No, Trans::No, lq, dim, lc, 1.0, &self.r, lc, x.c_hat, dim, 0.0, &mut self.wc, dim);

        // Cosine with the raw query row, then the mean.
        let n_real = x.mq.iter().filter(|&&m| is_real(m)).count();
        let mut sim = 0f32;
        for l in 0..lq {
            let q = &x.q_raw[l * dim..(l + 1) * dim];
            let w = &self.wc[l * dim..(l + 1) * dim];
            let u = fastmath::dot(q, w);
            let wn = fastmath::norm(w);
            self.wnorm[l] = wn;
            let c = u / (x.q_norm[l] * wn).max(NORM_EPS);
            self.cos[l] = c;
            self.weight[l] = if !cfg.masked_mean {
                1.0 / lq as f32
            } else if is_real(x.mq[l]) {
                1.0 / n_real as f32
            } else {
                0.0
            };
            sim += c;
        }
        if cfg.masked_mean {
            if n_real == 0 {
                return 0.0;
            }
            let s: f32 = (0..lq).filter(|&l| is_real(x.mq[l])).map(|l| self.cos[l]).sum();
            s / n_real as f32
        } else {
            sim / lq as f32
        }
    }

    /// Backward of `forward` (which must have just run on the same inputs) for
    /// d loss / d sim = `gsim`. Writes d/dD into `gd` [lq, lc]; accumulates into
    /// `gq_raw` [lq, dim] (via the cosine) and `gc_hat` [lc, dim] (via the context).
    fn backward(&mut self, gsim: f32, x: &DirInputs, cfg: &AlignConfig, gd: &mut [f32], gq_raw: &mut [f32], gc_hat: &mut [f32]) {
        let (lq, lc, dim) = (x.lq, x.lc, x.dim);
        resize(&mut self.gwc, lq * dim);
        resize(&mut self.gr, lq * lc);
        resize(&mut self.colc, lc);

        // Cosine c = u / max(‖q‖‖w‖, ε): where unclamped, dq = w/den − c q/‖q‖²,
        // dw = q/den − c w/‖w‖²; where clamped only the numerator carries gradient.
        for l in 0..lq {
            let gc = gsim * self.weight[l];
            if gc == 0.0 {
                continue;
            }
            let q = &x.q_raw[l * dim..(l + 1) * dim];
            let w = &self.wc[l * dim..(l + 1) * dim];
            let gq = &mut gq_raw[l * dim..(l + 1) * dim];
            let gw = &mut self.gwc[l * dim..(l + 1) * dim];
            let (qn, wn, c) = (x.q_norm[l], self.wnorm[l], self.cos[l]);
            let den = qn * wn;
            if den > NORM_EPS {
                let (a, b) = (gc / den, gc * c / (qn * qn));
                let (e, f) = (gc / den, gc * c / (wn * wn));
                for k in 0..dim {
                    gq[k] += a * w[k] - b * q[k];
                    gw[k] = e * q[k] - f * w[k];
                }
            } else {
                let a = gc / NORM_EPS;
                for k in 0..dim {
                    gq[k] += a * w[k];
                    gw[k] = a * q[k];
                }
            }
        }

        // Weighted context wc = R · Ĉ.
        sgemm(Trans::No, Trans::Yes, lq, lc, dim, 1.0, &self.gwc, dim, x.c_hat, dim, 0.0, &mut self.gr, lc);
        sgemm(Trans::Yes, Trans::No, lc, dim, lq, 1.0, &self.r, lc, &self.gwc, dim, 1.0, gc_hat, dim);

        // Renormalisation of the kept weights, then the softmax; result dL/dA in `gd`.
        for l in 0..lq {
            let (rrow, grow, prow) = (&self.r[l * lc..(l + 1) * lc], &self.gr[l * lc..(l + 1) * lc], &self.p[l * lc..(l + 1) * lc]);
            let out = &mut gd[l * lc..(l + 1) * lc];
            let rdot: f32 = rrow.iter().zip(grow).map(|(a, b)| a * b).sum();
            let inv = 1.0 / self.kept_sum[l];
            let mut pdot = 0f32;
            for s in 0..lc {
                let gp = if rrow[s] > 0.0 { (grow[s] - rdot) * inv } else { 0.0 };
                out[s] = gp;
                pdot += gp * prow[s];
            }
            for s in 0..lc {
                out[s] = cfg.lambda * prow[s] * (out[s] - pdot);
            }
        }

        // Normalisation over the query axis: A = L / n_s with n_s = sqrt(Σ_l L²) + ε.
        for l in 0..lq {
            let (ga, lr) = (&gd[l * lc..(l + 1) * lc], &self.leaky[l * lc..(l + 1) * lc]);
            for s in 0..lc {
                self.colc[s] += ga[s] * lr[s];
            }
        }
        for s in 0..lc {
            let n = self.colnorm[s];
            let raw = n - NORM_EPS;
            self.colc[s] = if raw > 0.0 { self.colc[s] / (n * n * raw) } else { 0.0 };
        }
        for l in 0..lq {
            let lr = &self.leaky[l * lc..(l + 1) * lc];
            let drow = &x.d[l * lc..(l + 1) * lc];
            let out = &mut gd[l * lc..(l + 1) * lc];
            for s in 0..lc {
                let gl = out[s] / self.colnorm[s] - lr[s] * self.colc[s];
                out[s] = if drow[s] > 0.0 { gl } else { LEAKY_SLOPE * gl };
            }
        }
    }
}

/// Backward of x̂ = x / (‖x‖ + ε) for every row, accumulated into `gx`.
fn l2norm_backward(ghat: &[f32], x: &[f32], norms: &[f32], dim: usize, gx: &mut [f32]) {
    for (i, &n) in norms.iter().enumerate() {
        let r = i * dim..(i + 1) * dim;
        let (g, xr, out) = (&ghat[r.clone()], &x[r.clone()], &mut gx[r]);
        let ne = n + NORM_EPS;
        let c = if n > 0.0 { fastmath::dot(g, xr) / (ne * ne * n) } else { 0.0 };
        for k in 0..dim {
            out[k] += g[k] / ne - xr[k] * c;
        }
    }
}

/// Scratch for one (text, video) pair: the shared word×region block and both directions.
#[derive(Default)]
pub struct PairKernel {
    m: Vec<f32>,  // [W, N] ⟨ŵ, r̂⟩
    mt: Vec<f32>, // [N, W]
    gm: Vec<f32>,
    gmt: Vec<f32>,
    w2r: Direction, // queries = words, contexts = regions
    r2w: Direction, // queries = regions, contexts = words
    gw_hat: Vec<f32>,
    gr_hat: Vec<f32>,
}

impl PairKernel {
    fn inputs<'a>(m: &'a [f32], mt: &'a [f32], text: &'a Items, t: usize, video: &'a Items, v: usize) -> (DirInputs<'a>, DirInputs<'a>) {
        let (w, n, dim) = (text.len, video.len, text.dim);
        (
            DirInputs {
                lq: w,
                lc: n,
                dim,
                d: m,
                q_raw: text.raw(t),
                q_norm: text.norm(t),
                c_hat: video.hat(v),
                mq: text.mask(t),
                mc: video.mask(v),
            },
            DirInputs {
                lq: n,
                lc: w,
                dim,
                d: mt,
                q_raw: video.raw(v),
                q_norm: video.norm(v),
                c_hat: text.hat(t),
                mq: video.mask(v),
                mc: text.mask(t),
            },
        )
    }

    /// (s1, s2) for text t and video v: s1 = word→region similarity (SPEC's s1[v, t]),
    /// s2 = region→word similarity (SPEC's s2[t, v]).
    pub fn forward(&mut self, text: &Items, t: usize, video: &Items, v: usize, cfg: &AlignConfig) -> (f32, f32) {
        let (w, n, dim) = (text.len, video.len, text.dim);
        resize(&mut self.m, w * n);
        resize(&mut self.mt, n * w);
        sgemm(Trans::No, Trans::Yes, w, n, dim, 1.0, text.hat(t), dim, video.hat(v), dim, 0.0, &mut self.m, n);
        transpose(&self.m, w, n, &mut self.mt);
        let (d1, d2) = Self::inputs(&self.m, &self.mt, text, t, video, v);
        (self.w2r.forward(&d1, cfg), self.r2w.forward(&d2, cfg))
    }

    /// Recomputes the pair and accumulates the gradients of g1·s1 + g2·s2 into the raw
    /// local embeddings of text t (`g_text` [W, dim]) and video v (`g_video` [N, dim]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        g1: f32,
        g2: f32,
        text: &Items,
        t: usize,
        video: &Items,
        v: usize,
        cfg: &AlignConfig,
        g_text: &mut [f32],
        g_video: &mut [f32],
    ) {
        self.forward(text, t, video, v, cfg);
        let (w, n, dim) = (text.len, video.len, text.dim);
        resize(&mut self.gm, w * n);
        resize(&mut self.gmt, n * w);
        resize(&mut self.gw_hat, w * dim);
        resize(&mut self.gr_hat, n * dim);
        let (d1, d2) = Self::inputs(&self.m, &self.mt, text, t, video, v);
        self.w2r.backward(g1, &d1, cfg, &mut self.gm, g_text, &mut self.gr_hat);
        self.r2w.backward(g2, &d2, cfg, &mut self.gmt, g_video, &mut self.gw_hat);
        for i in 0..w {
            for j in 0..n {
                self.gm[i * n + j] += self.gmt[j * w + i];
            }
        }
        // M = Ŵ R̂ᵀ.
        sgemm(Trans::No, Trans::No, w, dim, n, 1.0, &self.gm, n, video.hat(v), dim, 1.0, &mut self.gw_hat, dim);
        sgemm(Trans::Yes, Trans::No, n, dim, w, 1.0, &self.gm, n, text.hat(t), dim, 1.0, &mut self.gr_hat, dim);
        l2norm_backward(&self.gw_hat, text.raw(t), text.norm(t), dim, g_text);
        l2norm_backward(&self.gr_hat, video.raw(v), video.norm(v), dim, g_video);
    }
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

/// S_loc [V, T] (rows = videos) = s1[v, t] + s2[t, v] for every pair, parallel over pairs.
pub fn local_similarity(text: &Items, video: &Items, cfg: &AlignConfig) -> Vec<f32> {
    let nt = text.count;
    let mut s = vec![0f32; video.count * nt];
    s.par_iter_mut().enumerate().for_each_init(PairKernel::default, |k, (i, out)| {
        let (v, t) = (i / nt, i % nt);
        let (s1, s2) = k.forward(text, t, video, v, cfg);
        *out = s2 + s1;
    });
    s
}

/// Text chunks of the backward: fixed, so gradients do not depend on the thread count.
const BACKWARD_CHUNKS: usize = 16;

/// Gradients of Σ_{v,t} g[v, t]·S_loc[v, t] w.r.t. the raw local text [T, W, dim] and
/// video [V, N, dim] embeddings. Deterministic: the texts are split into a fixed number
/// of chunks run in parallel; a chunk owns its texts' gradients and sums its video
/// gradients privately; the chunks' video sums are then added in chunk order.
pub fn local_similarity_backward(g: &[f32], text: &Items, video: &Items, cfg: &AlignConfig) -> (Vec<f32>, Vec<f32>) {
    let (nt, nv) = (text.count, video.count);
    assert_eq!(g.len(), nv * nt, "local similarity gradient: expected [{nv}, {nt}]");
    let (tsz, vsz) = (text.len * text.dim, video.len * video.dim);
    let mut g_text = vec![0f32; nt * tsz];
    let chunks = BACKWARD_CHUNKS.min(nt).max(1);
    // Split the texts (and their gradient rows) into `chunks` contiguous ranges.
    let mut parts: Vec<(std::ops::Range<usize>, &mut [f32])> = Vec::with_capacity(chunks);
    let mut rest: &mut [f32] = &mut g_text;
    let mut start = 0;
    for c in 0..chunks {
        let end = (c + 1) * nt / chunks;
        let (head, tail) = std::mem::take(&mut rest).split_at_mut((end - start) * tsz);
        parts.push((start..end, head));
        rest = tail;
        start = end;
    }
    let video_parts: Vec<Vec<f32>> = parts
        .into_par_iter()
        .map(|(range, gt)| {
            let mut k = PairKernel::default();
            let mut gv = vec![0f32; nv * vsz];
            for (i, t) in range.clone().enumerate() {
                let gt_row = &mut gt[i * tsz..(i + 1) * tsz];
                for v in 0..nv {
                    let gs = g[v * nt + t];
                    if gs == 0.0 {
                        continue;
                    }
                    k.backward(gs, gs, text, t, video, v, cfg, gt_row, &mut gv[v * vsz..(v + 1) * vsz]);
                }
            }
            gv
        })
        .collect();
    let mut g_video = vec![0f32; nv * vsz];
    for part in &video_parts {
        for (a, b) in g_video.iter_mut().zip(part) {
            *a += b;
        }
    }
    (g_text, g_video)
}
