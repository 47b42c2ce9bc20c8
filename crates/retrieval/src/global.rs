//! Global contrastive loss (SPEC §6): cosine similarities G[t, v] of the global text and
//! video embeddings (norms clamped below at 1e-8), then a symmetric InfoNCE at
//! temperature τ: L_g = −mean_i log `softmax_v(G[i,:]/τ)[i]` − mean_j log `softmax_t(G[:,j]/τ)[j]`.

use demovlp_kernels::gemm::{sgemm, Trans};

/// Norm clamp of the published `sim_matrix`: x / max(‖x‖, 1e-8).
pub const SIM_EPS: f32 = 1e-8;

/// Rows of `x` [n, dim] divided by max(‖row‖, 1e-8); also returns the clamped norms.
pub fn normalize_rows_clamped(x: &[f32], n: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; n * dim];
    let mut norms = vec![0f32; n];
    for i in 0..n {
        let row = &x[i * dim..(i + 1) * dim];
        let nrm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(SIM_EPS);
        norms[i] = nrm;
        for (o, v) in out[i * dim..(i + 1) * dim].iter_mut().zip(row) {
            *o = v / nrm;
        }
    }
    (out, norms)
}

/// G [a_n, b_n] = cos(a_i, b_j) with the published clamp.
pub fn cosine_matrix(a: &[f32], a_n: usize, b: &[f32], b_n: usize, dim: usize) -> Vec<f32> {
    let (ah, _) = normalize_rows_clamped(a, a_n, dim);
    let (bh, _) = normalize_rows_clamped(b, b_n, dim);
    let mut g = vec![0f32; a_n * b_n];
    sgemm(Trans::No, Trans::Yes, a_n, b_n, dim, 1.0, &ah, dim, &bh, dim, 0.0, &mut g, b_n);
    g
}

/// (d loss / d text, d loss / d video).
pub type GlobalGrads = (Vec<f32>, Vec<f32>);

/// Forward and (optionally) backward of the global loss for a square batch.
/// Returns (G [b, b] rows = texts, loss, grads (text, video) when `want_grad`).
pub fn global_loss(
    text: &[f32],
    video: &[f32],
    b: usize,
    dim: usize,
    temperature: f32,
    want_grad: bool,
) -> (Vec<f32>, f32, Option<GlobalGrads>) {
    let (th, tn) = normalize_rows_clamped(text, b, dim);
    let (vh, vn) = normalize_rows_clamped(video, b, dim);
    let mut g = vec![0f32; b * b];
    sgemm(Trans::No, Trans::Yes, b, b, dim, 1.0, &th, dim, &vh, dim, 0.0, &mut g, b);

    // Row softmax (text → videos) and column softmax (video → texts) of G/τ, in f64.
    let inv_tau = 1.0 / temperature as f64;
    let mut row_sm = vec![0f64; b * b];
    let mut col_sm = vec![0f64; b * b];
    let mut loss = 0f64;
    softmax_cross_entropy(&g, b, inv_tau, |i, j| i * b + j, &mut row_sm, &mut loss);
    softmax_cross_entropy(&g, b, inv_tau, |j, i| i * b + j, &mut col_sm, &mut loss);
    if !want_grad {
        return (g, loss as f32, None);
    }

    // dL/dG = ((softmax_row − I) + (softmax_col − I)) / (b τ).
    let mut gg = vec![0f32; b * b];
    for i in 0..b {
        for j in 0..b {
            let eye = if i == j { 2.0 } else { 0.0 };
            gg[i * b + j] = ((row_sm[i * b + j] + col_sm[i * b + j] - eye) * inv_tau / b as f64) as f32;
        }
    }
    // Through the matmul: dT̂ = dG · V̂, dV̂ = dGᵀ · T̂.
    let mut gth = vec![0f32; b * dim];
    let mut gvh = vec![0f32; b * dim];
    sgemm(Trans::No, Trans::No, b, dim, b, 1.0, &gg, b, &vh, dim, 0.0, &mut gth, dim);
    sgemm(Trans::Yes, Trans::No, b, dim, b, 1.0, &gg, b, &th, dim, 0.0, &mut gvh, dim);
    let gt = normalize_clamped_backward(&gth, &th, &tn, text, b, dim);
    let gv = normalize_clamped_backward(&gvh, &vh, &vn, video, b, dim);
    (g, loss as f32, Some((gt, gv)))
}

/// Backward of x̂ = x / max(‖x‖, eps): (g − x̂⟨g, x̂⟩)/‖x‖ where the norm is not clamped,
/// g / eps where it is (the clamp passes no gradient to the norm).
fn normalize_clamped_backward(g: &[f32], xh: &[f32], norms: &[f32], x: &[f32], n: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * dim];
    for (i, &nrm) in norms.iter().enumerate().take(n) {
        let r = i * dim..(i + 1) * dim;
        let raw = x[r.clone()].iter().map(|v| v * v).sum::<f32>().sqrt();
        if raw > SIM_EPS {
            let d: f32 = g[r.clone()].iter().zip(&xh[r.clone()]).map(|(a, b)| a * b).sum();
            for k in r {
                out[k] = (g[k] - xh[k] * d) / nrm;
            }
        } else {
            for k in r {
                out[k] = g[k] / SIM_EPS;
            }
        }
    }
    out
}

/// Softmax of G/τ along one axis for every index `o` of the other (`at(o, k)` is the flat
/// position of entry k of line o), written to `sm`; subtracts the mean cross-entropy of the
/// diagonal entries from `loss`. One function for both directions of the contrastive loss.
fn softmax_cross_entropy(g: &[f32], b: usize, inv_tau: f64, at: impl Fn(usize, usize) -> usize, sm: &mut [f64], loss: &mut f64) {
    for o in 0..b {
        let z = |k: usize| g[at(o, k)] as f64 * inv_tau;
        let m = (0..b).map(z).fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = (0..b).map(|k| (z(k) - m).exp()).sum();
        for k in 0..b {
            sm[at(o, k)] = (z(k) - m).exp() / s;
        }
        *loss -= (z(o) - m - s.ln()) / b as f64;
    }
}
