//! LayerNorm over the last dimension (biased variance, as PyTorch), forward and backward.

use rayon::prelude::*;

const ROWS_PER_TASK: usize = 16;

/// y = (x − mean)·rstd·w + b per row of width `d`; also stores each row's mean and
/// rstd = 1/sqrt(var + eps) for the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], d: usize) {
    let rows = x.len() / d;
    assert_eq!(x.len(), rows * d);
    assert!(y.len() >= rows * d && mean.len() >= rows && rstd.len() >= rows, "layernorm: outputs too small");
    y[..rows * d]
        .par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean[..rows].par_iter_mut().zip(rstd[..rows].par_iter_mut()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((yr, xr), (m, r))| forward_row(xr, w, b, eps, yr, m, r));
}

crate::multiversion! {
    fn forward_row(xr: &[f32], w: &[f32], b: &[f32], eps: f32, yr: &mut [f32], m: &mut f32, r: &mut f32) {
        let d = xr.len();
        let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for i in 0..d {
            yr[i] = (((xr[i] as f64 - mu) * rs) as f32) * w[i] + b[i];
        }
        *m = mu as f32;
        *r = rs as f32;
    }
}

/// dx += ∂/∂x, dw += Σ dy·x̂, db += Σ dy, given the forward's mean and rstd.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    d: usize,
) {
    let rows = x.len() / d;
    dx[..rows * d]
        .par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(r, (dxr, (xr, dyr)))| backward_row(xr, w, mean[r], rstd[r], dyr, dxr));
    // dw, db: column blocks in parallel, each column still summing its rows in order.
    let (x, dy) = (&x[..rows * d], &dy[..rows * d]);
    dw[..d].par_chunks_mut(PARAM_COLS).zip(db[..d].par_chunks_mut(PARAM_COLS)).enumerate().for_each(|(ci, (dw, db))| {
        param_grads_cols(x, dy, mean, rstd, d, ci * PARAM_COLS, dw, db);
    });
}

/// Columns of dw / db per parallel task.
const PARAM_COLS: usize = 64;

crate::multiversion! {
    fn backward_row(xr: &[f32], w: &[f32], mu: f32, rs: f32, dyr: &[f32], dxr: &mut [f32]) {
        let d = xr.len();
        let mut sum_g = 0.0f64;
        let mut sum_gx = 0.0f64;
        for i in 0..d {
            let g = (dyr[i] * w[i]) as f64;
            sum_g += g;
            sum_gx += g * ((xr[i] - mu) * rs) as f64;
        }
        let mg = (sum_g / d as f64) as f32;
        let mgx = (sum_gx / d as f64) as f32;
        for i in 0..d {
            let xhat = (xr[i] - mu) * rs;
            dxr[i] += rs * (dyr[i] * w[i] - mg - xhat * mgx);
        }
    }
}

crate::multiversion! {
    /// dw[c] += Σ_r dy[r, j0+c]·x̂[r, j0+c], db[c] += Σ_r dy[r, j0+c], rows in order.
    fn param_grads_cols(x: &[f32], dy: &[f32], mean: &[f32], rstd: &[f32], d: usize, j0: usize, dw: &mut [f32], db: &mut [f32]) {
        let cols = dw.len();
        for (r, (xr, dyr)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).enumerate() {
            let (mu, rs) = (mean[r], rstd[r]);
            let (xr, dyr) = (&xr[j0..j0 + cols], &dyr[j0..j0 + cols]);
            for i in 0..cols {
                dw[i] += dyr[i] * (xr[i] - mu) * rs;
                db[i] += dyr[i];
            }
        }
    }
}
