//! The loss kernels of `kernels/losses.cu` ported to the host, phase by phase and with the
//! same per-block scratch layout ([`crate::plan::rwa_scratch_len`]), so the GPU's
//! decomposition of the losses (the chunked cosine blocks, the recomputed pair forward, the
//! row backward, the step-3 norms' backward, the final sums of both directions' context and
//! cosine-block gradients, the normalisations' backward) is checked against the CPU's
//! `demovlp_retrieval` losses on any machine. Sums run sequentially here where the device
//! uses warp trees and atomics: the tests compare to a tolerance, as the selftest does.
//!
//! Pure Rust, built without the `cuda` feature; what it cannot check is the CUDA C
//! transliteration itself (that is what `demovlp selftest --device cuda` is for).

use crate::plan::align_logs;
use demovlp_retrieval::LossConfig;

const NORM_EPS: f32 = 1e-8;
const SIM_EPS: f32 = 1e-8;
const LEAKY_SLOPE: f32 = 0.1;

fn leaky(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        LEAKY_SLOPE * x
    }
}

fn is_real(m: f32) -> bool {
    m > -0.5
}

/// `cephes_exp` of losses.cu (= crates/retrieval/src/fastmath.rs).
fn cephes_exp(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3f32, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(12_582_912.0f32.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// `l2_rows`: (hat, norm, raw).
pub fn l2_rows(x: &[f32], rows: usize, dim: usize, clamp: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut hat, mut norm, mut raw) = (vec![0f32; rows * dim], vec![0f32; rows], vec![0f32; rows]);
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let nrm = xr.iter().map(|v| v * v).sum::<f32>().sqrt();
        let den = if clamp { nrm.max(SIM_EPS) } else { nrm + NORM_EPS };
        for k in 0..dim {
            hat[r * dim + k] = xr[k] / den;
        }
        norm[r] = if clamp { den } else { nrm };
        raw[r] = nrm;
    }
    (hat, norm, raw)
}

/// `l2_rows_backward` (clamp: overwrite; else accumulate into `gx`).
#[allow(clippy::too_many_arguments)]
pub fn l2_rows_backward(
    g: &[f32],
    hat: &[f32],
    x: &[f32],
    norm: &[f32],
    raw: &[f32],
    rows: usize,
    dim: usize,
    clamp: bool,
    gx: &mut [f32],
) {
    for r in 0..rows {
        let (gr, xr, hr) = (&g[r * dim..(r + 1) * dim], &x[r * dim..(r + 1) * dim], &hat[r * dim..(r + 1) * dim]);
        let out = &mut gx[r * dim..(r + 1) * dim];
        if clamp {
            if raw[r] > SIM_EPS {
                let d: f32 = gr.iter().zip(hr).map(|(a, b)| a * b).sum();
                for k in 0..dim {
                    out[k] = (gr[k] - hr[k] * d) / norm[r];
                }
            } else {
                for k in 0..dim {
                    out[k] = gr[k] / SIM_EPS;
                }
            }
        } else {
            let n = norm[r];
            let ne = n + NORM_EPS;
            let d: f32 = gr.iter().zip(xr).map(|(a, b)| a * b).sum();
            let c = if n > 0.0 { d / (ne * ne * n) } else { 0.0 };
            for k in 0..dim {
                out[k] += gr[k] / ne - xr[k] * c;
            }
        }
    }
}

/// Row-major `a [m, k] · b [n, k]ᵀ`.
fn abt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|q| a[i * k + q] * b[j * k + q]).sum();
        }
    }
    c
}

/// `global_loss_ce`: (L_g, dL/dG).
pub fn global_loss_ce(g: &[f32], b: usize, temperature: f32) -> (f32, Vec<f32>) {
    let inv_tau = 1.0 / temperature as f64;
    let z = |i: usize, j: usize| g[i * b + j] as f64 * inv_tau;
    let mut loss = 0f64;
    let (mut rm, mut rs, mut cm, mut cs) = (vec![0f64; b], vec![0f64; b], vec![0f64; b], vec![0f64; b]);
    for o in 0..2 * b {
        let (line, col) = (o % b, o >= b);
        let at = |k: usize| if col { z(k, line) } else { z(line, k) };
        let m = (0..b).map(at).fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = (0..b).map(|k| (at(k) - m).exp()).sum();
        loss -= (z(line, line) - m - s.ln()) / b as f64;
        if col {
            (cm[line], cs[line]) = (m, s);
        } else {
            (rm[line], rs[line]) = (m, s);
        }
    }
    let mut gg = vec![0f32; b * b];
    for i in 0..b {
        for j in 0..b {
            let (row, col) = ((z(i, j) - rm[i]).exp() / rs[i], (z(i, j) - cm[j]).exp() / cs[j]);
            let eye = if i == j { 2.0 } else { 0.0 };
            gg[i * b + j] = ((row + col - eye) * inv_tau / b as f64) as f32;
        }
    }
    (loss as f32, gg)
}

/// `align_loss`: (L_rwa, dL/dS) of S [b, b] (rows = videos).
pub fn align_loss(s: &[f32], b: usize, lambda: f32) -> (f32, Vec<f32>) {
    let (log_on, log_off) = align_logs();
    let lam = lambda as f64;
    let mut loss = 0f64;
    let mut gs = vec![0f32; b * b];
    for v in 0..b {
        let y = |t: usize| s[v * b + t] as f64 * lam;
        let mx = (0..b).map(y).fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + (0..b).map(|t| (y(t) - mx).exp()).sum::<f64>().ln();
        let e = |t: usize| y(t) - lse - if t == v { log_on as f64 } else { log_off as f64 };
        let f: f64 = (0..b).map(|t| (y(t) - lse).exp() * e(t)).sum();
        loss += f / b as f64;
        for t in 0..b {
            gs[v * b + t] = (lam * (y(t) - lse).exp() * (e(t) - f) / b as f64) as f32;
        }
    }
    (loss as f32, gs)
}

/// One side of the pairs: raw rows, normalised rows, norms, additive mask.
pub struct Side<'a> {
    pub raw: &'a [f32],
    pub hat: &'a [f32],
    pub norm: &'a [f32],
    pub mask: &'a [f32],
    pub count: usize,
    pub len: usize,
}

/// The scratch offsets of losses.cu's `Scratch` (direction 0 = word → region, 1 = region → word).
struct Lay {
    p: [usize; 2],
    g: [usize; 2],
    wc: [usize; 2],
    st: [usize; 2],
    cn: [usize; 2],
    cc: [usize; 2],
}

fn lay(w: usize, n: usize, dim: usize) -> Lay {
    let wn = w * n;
    let p1 = 0;
    let p2 = p1 + wn;
    let g1 = p2 + wn;
    let g2 = g1 + wn;
    let wc1 = g2 + wn;
    let wc2 = wc1 + w * dim;
    let st1 = wc2 + n * dim;
    let st2 = st1 + 4 * w;
    let cn1 = st2 + 4 * n;
    let cn2 = cn1 + n;
    let cc1 = cn2 + w;
    let cc2 = cc1 + n;
    debug_assert_eq!(cc2 + w, crate::plan::rwa_scratch_len(w, n, dim));
    Lay { p: [p1, p2], g: [g1, g2], wc: [wc1, wc2], st: [st1, st2], cn: [cn1, cn2], cc: [cc1, cc2] }
}

/// One pair's view, as `Pair` / `Dir` in losses.cu.
struct PairV<'a> {
    w: usize,
    n: usize,
    dim: usize,
    lambda: f32,
    masked_mean: bool,
    m: &'a [f32],
    ldm: usize,
    t: usize,
    v: usize,
    text: &'a Side<'a>,
    video: &'a Side<'a>,
}

impl PairV<'_> {
    fn lq(&self, d: usize) -> usize {
        if d == 0 {
            self.w
        } else {
            self.n
        }
    }
    fn lc(&self, d: usize) -> usize {
        if d == 0 {
            self.n
        } else {
            self.w
        }
    }
    fn dval(&self, d: usize, l: usize, s: usize) -> f32 {
        if d == 0 {
            self.m[l * self.ldm + s]
        } else {
            self.m[s * self.ldm + l]
        }
    }
    /// (query raw row, query norm, query mask) of row l.
    fn q(&self, d: usize, l: usize) -> (&[f32], f32, f32) {
        let (side, item) = if d == 0 { (self.text, self.t) } else { (self.video, self.v) };
        let i = item * side.len + l;
        (&side.raw[i * self.dim..(i + 1) * self.dim], side.norm[i], side.mask[i])
    }
    /// (context hat row, context mask) of context s.
    fn c(&self, d: usize, s: usize) -> (&[f32], f32) {
        let (side, item) = if d == 0 { (self.video, self.v) } else { (self.text, self.t) };
        let i = item * side.len + s;
        (&side.hat[i * self.dim..(i + 1) * self.dim], side.mask[i])
    }
}

fn kept_weight(x: &PairV, ly: &Lay, sc: &[f32], d: usize, l: usize, s: usize) -> f32 {
    let (lq, lc) = (x.lq(d), x.lc(d));
    let p = sc[ly.p[d] + l * lc + s];
    let (total, kept) = (sc[ly.st[d] + l], sc[ly.st[d] + lq + l]);
    if p * lc as f32 - total > 0.0 {
        p / kept
    } else {
        0.0
    }
}

fn pair_norms(x: &PairV, ly: &Lay, sc: &mut [f32]) {
    for i in 0..x.n {
        let acc: f32 = (0..x.w).map(|l| leaky(x.m[l * x.ldm + i]).powi(2)).sum();
        sc[ly.cn[0] + i] = acc.sqrt() + NORM_EPS;
    }
    for l in 0..x.w {
        let acc: f32 = (0..x.n).map(|s| leaky(x.m[l * x.ldm + s]).powi(2)).sum();
        sc[ly.cn[1] + l] = acc.sqrt() + NORM_EPS;
    }
}

fn dir_row(x: &PairV, ly: &Lay, sc: &mut [f32], d: usize, l: usize) {
    let (lq, lc, dim) = (x.lq(d), x.lc(d), x.dim);
    let (q, qn, mq) = x.q(d, l);
    let p0 = ly.p[d] + l * lc;
    let mut mx = f32::NEG_INFINITY;
    for s in 0..lc {
        let z = ((leaky(x.dval(d, l, s)) / sc[ly.cn[d] + s] + mq) + x.c(d, s).1) * x.lambda;
        sc[p0 + s] = z;
        mx = mx.max(z);
    }
    let mut se = 0f32;
    for s in 0..lc {
        let e = cephes_exp(sc[p0 + s] - mx);
        sc[p0 + s] = e;
        se += e;
    }
    let inv = 1.0 / se;
    let mut total = 0f32;
    for s in 0..lc {
        sc[p0 + s] *= inv;
        total += sc[p0 + s];
    }
    let kept: f32 = (0..lc).map(|s| sc[p0 + s]).filter(|&p| p * lc as f32 - total > 0.0).sum();
    let wc0 = ly.wc[d] + l * dim;
    sc[wc0..wc0 + dim].fill(0.0);
    for s in 0..lc {
        let p = sc[p0 + s];
        if p * lc as f32 - total > 0.0 {
            let r = p / kept;
            let c = x.c(d, s).0;
            for k in 0..dim {
                sc[wc0 + k] += r * c[k];
            }
        }
    }
    let wc = &sc[wc0..wc0 + dim];
    let u: f32 = q.iter().zip(wc).map(|(a, b)| a * b).sum();
    let wn = wc.iter().map(|v| v * v).sum::<f32>().sqrt();
    let st = ly.st[d];
    sc[st + l] = total;
    sc[st + lq + l] = kept;
    sc[st + 2 * lq + l] = wn;
    sc[st + 3 * lq + l] = u / (qn * wn).max(NORM_EPS);
}

fn dir_sim(x: &PairV, ly: &Lay, sc: &[f32], d: usize) -> f32 {
    let lq = x.lq(d);
    let (mut sum, mut real) = (0f32, 0usize);
    for l in 0..lq {
        if !x.masked_mean || is_real(x.q(d, l).2) {
            sum += sc[ly.st[d] + 3 * lq + l];
            real += 1;
        }
    }
    if x.masked_mean {
        if real == 0 {
            0.0
        } else {
            sum / real as f32
        }
    } else {
        sum / lq as f32
    }
}

fn forward_pair(x: &PairV, ly: &Lay, sc: &mut [f32]) {
    pair_norms(x, ly, sc);
    for i in 0..x.w + x.n {
        if i < x.w {
            dir_row(x, ly, sc, 0, i)
        } else {
            dir_row(x, ly, sc, 1, i - x.w)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn dir_row_backward(x: &PairV, ly: &Lay, sc: &mut [f32], d: usize, l: usize, gsim: f32, real: usize, gq: &mut [f32]) {
    let (lq, lc, dim) = (x.lq(d), x.lc(d), x.dim);
    let (q, qn, mq) = x.q(d, l);
    let weight = if !x.masked_mean {
        1.0 / lq as f32
    } else if is_real(mq) {
        1.0 / real as f32
    } else {
        0.0
    };
    let gc = gsim * weight;
    let wc0 = ly.wc[d] + l * dim;
    if gc != 0.0 {
        let (wn, c) = (sc[ly.st[d] + 2 * lq + l], sc[ly.st[d] + 3 * lq + l]);
        let den = qn * wn;
        for k in 0..dim {
            let (wk, qk) = (sc[wc0 + k], q[k]);
            if den > NORM_EPS {
                let (a, b, e, f) = (gc / den, gc * c / (qn * qn), gc / den, gc * c / (wn * wn));
                gq[k] += a * wk - b * qk;
                sc[wc0 + k] = e * qk - f * wk;
            } else {
                let a = gc / NORM_EPS;
                gq[k] += a * wk;
                sc[wc0 + k] = a * qk;
            }
        }
    } else {
        sc[wc0..wc0 + dim].fill(0.0);
    }
    let g0 = ly.g[d] + l * lc;
    for s in 0..lc {
        let r = kept_weight(x, ly, sc, d, l, s);
        sc[g0 + s] = if r > 0.0 { (0..dim).map(|k| sc[wc0 + k] * x.c(d, s).0[k]).sum() } else { 0.0 };
    }
    let rdot: f32 = (0..lc).map(|s| kept_weight(x, ly, sc, d, l, s) * sc[g0 + s]).sum();
    let inv = 1.0 / sc[ly.st[d] + lq + l];
    let p0 = ly.p[d] + l * lc;
    let mut pdot = 0f32;
    for s in 0..lc {
        let gp = if kept_weight(x, ly, sc, d, l, s) > 0.0 { (sc[g0 + s] - rdot) * inv } else { 0.0 };
        sc[g0 + s] = gp;
        pdot += gp * sc[p0 + s];
    }
    for s in 0..lc {
        sc[g0 + s] = x.lambda * sc[p0 + s] * (sc[g0 + s] - pdot);
    }
}

/// What [`pairs_pass`] computes.
pub enum Pass<'a> {
    /// S_loc [V, T].
    Forward(&'a mut [f32]),
    /// The gradients of Σ gs·S_loc: raw text, raw video, hat text, hat video (accumulated).
    Backward { gs: &'a [f32], g_t_raw: &'a mut [f32], g_v_raw: &'a mut [f32], g_t_hat: &'a mut [f32], g_v_hat: &'a mut [f32] },
}

/// Every pair of `text` × `video`, videos in chunks of `nvc` whose cosine blocks are one
/// `[nt·w, nvc·n]` product, as `pairs_pass` on the device.
pub fn pairs_pass(text: &Side, video: &Side, dim: usize, lambda: f32, masked_mean: bool, nvc: usize, mut pass: Pass) {
    let (nt, nv, w, n) = (text.count, video.count, text.len, video.len);
    let ly = lay(w, n, dim);
    let mut sc = vec![0f32; crate::plan::rwa_scratch_len(w, n, dim)];
    for v0 in (0..nv).step_by(nvc.max(1)) {
        let nvc = nvc.min(nv - v0);
        let ldm = nvc * n;
        let m = abt(text.hat, &video.hat[v0 * n * dim..(v0 + nvc) * n * dim], nt * w, nvc * n, dim);
        for pi in 0..nt * nvc {
            let (t, vl) = (pi % nt, pi / nt);
            let v = v0 + vl;
            let x = PairV { w, n, dim, lambda, masked_mean, m: &m[t * w * ldm + vl * n..], ldm, t, v, text, video };
            match &mut pass {
                Pass::Forward(s_out) => {
                    forward_pair(&x, &ly, &mut sc);
                    s_out[v * nt + t] = dir_sim(&x, &ly, &sc, 1) + dir_sim(&x, &ly, &sc, 0);
                }
                Pass::Backward { gs, g_t_raw, g_v_raw, g_t_hat, g_v_hat } => {
                    let g = gs[v * nt + t];
                    if g == 0.0 {
                        continue;
                    }
                    forward_pair(&x, &ly, &mut sc);
                    let real = |d: usize| (0..x.lq(d)).filter(|&l| is_real(x.q(d, l).2)).count();
                    let (r0, r1) = (real(0), real(1));
                    for i in 0..w {
                        dir_row_backward(&x, &ly, &mut sc, 0, i, g, r0, &mut g_t_raw[(t * w + i) * dim..(t * w + i + 1) * dim]);
                    }
                    for r in 0..n {
                        dir_row_backward(&x, &ly, &mut sc, 1, r, g, r1, &mut g_v_raw[(v * n + r) * dim..(v * n + r + 1) * dim]);
                    }
                    for i in 0..n + w {
                        let (d, s) = if i < n { (0, i) } else { (1, i - n) };
                        let (lq, lc) = (x.lq(d), x.lc(d));
                        let acc: f32 = (0..lq).map(|l| sc[ly.g[d] + l * lc + s] * leaky(x.dval(d, l, s))).sum();
                        let nn = sc[ly.cn[d] + s];
                        let raw = nn - NORM_EPS;
                        sc[ly.cc[d] + s] = if raw > 0.0 { acc / (nn * nn * raw) } else { 0.0 };
                    }
                    for e in 0..2 * w * n {
                        let (d, f) = if e < w * n { (0, e) } else { (1, e - w * n) };
                        let lc = x.lc(d);
                        let (l, s) = (f / lc, f % lc);
                        let dv = x.dval(d, l, s);
                        let gl = sc[ly.g[d] + f] / sc[ly.cn[d] + s] - leaky(dv) * sc[ly.cc[d] + s];
                        sc[ly.g[d] + f] = if dv > 0.0 { gl } else { LEAKY_SLOPE * gl };
                    }
                    for e in 0..(w + n) * dim {
                        let (row, k) = (e / dim, e % dim);
                        let mut acc = 0f32;
                        if row < w {
                            let i = row;
                            for r in 0..n {
                                let dm = sc[ly.g[0] + i * n + r] + sc[ly.g[1] + r * w + i];
                                acc += dm * video.hat[(v * n + r) * dim + k];
                                let rw = kept_weight(&x, &ly, &sc, 1, r, i);
                                if rw > 0.0 {
                                    acc += rw * sc[ly.wc[1] + r * dim + k];
                                }
                            }
                            g_t_hat[(t * w + i) * dim + k] += acc;
                        } else {
                            let r = row - w;
                            for i in 0..w {
                                let dm = sc[ly.g[0] + i * n + r] + sc[ly.g[1] + r * w + i];
                                acc += dm * text.hat[(t * w + i) * dim + k];
                                let rw = kept_weight(&x, &ly, &sc, 0, i, r);
                                if rw > 0.0 {
                                    acc += rw * sc[ly.wc[0] + i * dim + k];
                                }
                            }
                            g_v_hat[(v * n + r) * dim + k] += acc;
                        }
                    }
                }
            }
        }
    }
}

/// The losses as `CudaBackend::losses` composes them: (loss_global, loss_local, G, S_loc,
/// d global_text, d global_video, d local_text, d local_video).
pub struct HostLosses {
    pub loss_global: f32,
    pub loss_local: f32,
    pub global_sim: Vec<f32>,
    pub local_sim: Vec<f32>,
    pub grads: [Vec<f32>; 4],
}

/// `losses_on_device` on the host (`nvc` videos per chunk).
#[allow(clippy::too_many_arguments)]
pub fn losses(
    cfg: &LossConfig,
    (b, w, n, p): (usize, usize, usize, usize),
    gt: &[f32],
    gv: &[f32],
    lt: &[f32],
    lv: &[f32],
    tm: &[f32],
    vm: &[f32],
    use_local: bool,
    nvc: usize,
) -> HostLosses {
    let (th, tn, tr) = l2_rows(gt, b, p, true);
    let (vh, vn, vr) = l2_rows(gv, b, p, true);
    let g = abt(&th, &vh, b, b, p);
    let (loss_global, gg) = global_loss_ce(&g, b, cfg.temperature);
    let mut gth = vec![0f32; b * p];
    let mut gvh = vec![0f32; b * p];
    for i in 0..b {
        for k in 0..p {
            gth[i * p + k] = (0..b).map(|j| gg[i * b + j] * vh[j * p + k]).sum();
            gvh[i * p + k] = (0..b).map(|j| gg[j * b + i] * th[j * p + k]).sum();
        }
    }
    let (mut dgt, mut dgv) = (vec![0f32; b * p], vec![0f32; b * p]);
    l2_rows_backward(&gth, &th, gt, &tn, &tr, b, p, true, &mut dgt);
    l2_rows_backward(&gvh, &vh, gv, &vn, &vr, b, p, true, &mut dgv);
    let (mut dlt, mut dlv) = (vec![0f32; b * w * p], vec![0f32; b * n * p]);
    let (mut loss_local, mut s_loc) = (0.0, Vec::new());
    if use_local {
        let (lth, ltn, _) = l2_rows(lt, b * w, p, false);
        let (lvh, lvn, _) = l2_rows(lv, b * n, p, false);
        let text = Side { raw: lt, hat: &lth, norm: &ltn, mask: tm, count: b, len: w };
        let video = Side { raw: lv, hat: &lvh, norm: &lvn, mask: vm, count: b, len: n };
        s_loc = vec![0f32; b * b];
        pairs_pass(&text, &video, p, cfg.lambda, cfg.masked_mean, nvc, Pass::Forward(&mut s_loc));
        let (l, gs) = align_loss(&s_loc, b, cfg.lambda);
        loss_local = l;
        let (mut gth, mut gvh) = (vec![0f32; b * w * p], vec![0f32; b * n * p]);
        let pass = Pass::Backward { gs: &gs, g_t_raw: &mut dlt, g_v_raw: &mut dlv, g_t_hat: &mut gth, g_v_hat: &mut gvh };
        pairs_pass(&text, &video, p, cfg.lambda, cfg.masked_mean, nvc, pass);
        l2_rows_backward(&gth, &lth, lt, &ltn, &ltn, b * w, p, false, &mut dlt);
        l2_rows_backward(&gvh, &lvh, lv, &lvn, &lvn, b * n, p, false, &mut dlv);
    }
    HostLosses { loss_global, loss_local, global_sim: g, local_sim: s_loc, grads: [dgt, dgv, dlt, dlv] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use demovlp_kernels::Rng;
    use demovlp_retrieval::{losses_forward_backward, LossInputs};

    fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max);
        assert!(worst <= tol, "{what}: worst relative error {worst:e} > {tol:e}");
    }

    #[allow(clippy::too_many_arguments)]
    fn check(b: usize, w: usize, n: usize, p: usize, masked_mean: bool, use_local: bool, nvc: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let mut r = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
        let (gt, gv, lt, lv) = (r(b * p), r(b * p), r(b * w * p), r(b * n * p));
        let mut rng = Rng::new(seed ^ 0xabc);
        let mut pad = |len: usize| -> Vec<f32> {
            (0..b)
                .flat_map(|_| {
                    let real = 1 + rng.below(len);
                    (0..len).map(move |i| if i < real { 0.0 } else { -100.0 })
                })
                .collect()
        };
        let (tm, vm) = (pad(w), pad(n));
        let cfg = LossConfig { masked_mean, ..LossConfig::default() };
        let x = LossInputs {
            batch: b,
            words: w,
            regions: n,
            dim: p,
            global_text: &gt,
            global_video: &gv,
            local_text: &lt,
            local_video: &lv,
            text_mask_additive: &tm,
            video_mask_additive: &vm,
        };
        let (want, wg) = losses_forward_backward(&cfg, &x, use_local);
        let got = losses(&cfg, (b, w, n, p), &gt, &gv, &lt, &lv, &tm, &vm, use_local, nvc);
        let what = format!("B {b} W {w} N {n} P {p} masked {masked_mean} local {use_local} chunk {nvc}");
        close(&format!("{what}: losses"), &[got.loss_global, got.loss_local], &[want.loss_global, want.loss_local], 1e-5);
        close(&format!("{what}: G"), &got.global_sim, &want.global_sim_text_video, 1e-5);
        close(&format!("{what}: S_loc"), &got.local_sim, &want.local_sim_video_text, 1e-4);
        for (name, g, w) in [
            ("d global_text", &got.grads[0], &wg.global_text),
            ("d global_video", &got.grads[1], &wg.global_video),
            ("d local_text", &got.grads[2], &wg.local_text),
            ("d local_video", &got.grads[3], &wg.local_video),
        ] {
            close(&format!("{what}: {name}"), g, w, 1e-4);
        }
    }

    #[test]
    fn the_device_decomposition_of_the_losses_is_the_cpus() {
        // loss_small's shape, a chunk of one video and of all of them.
        check(5, 11, 9, 16, false, true, 1, 1);
        check(5, 11, 9, 16, false, true, 5, 2);
        // Uneven chunks, the masked-mean variant, global only.
        check(7, 6, 13, 8, true, true, 3, 3);
        check(6, 4, 5, 12, false, false, 2, 4);
    }

    #[test]
    fn at_the_realistic_fixture_shape() {
        check(4, 99, 240, 16, false, true, 2, 5);
    }

    #[test]
    fn cephes_exp_port_is_the_cpus() {
        for i in 0..2000 {
            let x = -90.0 + i as f32 * 0.0937;
            assert_eq!(cephes_exp(x).to_bits(), demovlp_retrieval_exp(x).to_bits(), "{x}");
        }
    }

    /// The CPU's exp, as the retrieval crate exports it.
    fn demovlp_retrieval_exp(x: f32) -> f32 {
        demovlp_retrieval::fastmath::cephes_exp(x)
    }
}
