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
        let mu = sum_f64(xr, |v| v as f64) / d as f64;
        let var = sum_f64(xr, |v| (v as f64 - mu).powi(2)) / d as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for i in 0..d {
            yr[i] = (((xr[i] as f64 - mu) * rs) as f32) * w[i] + b[i];
        }
        *m = mu as f32;
        *r = rs as f32;
    }
}

/// Lanes of the f64 row sums: that many running sums (element i into lane i mod LANES),
/// combined pairwise at the end. One running sum is a chain of dependent adds, four cycles
/// each; 32 lanes are four independent AVX-512 vectors. (A row's mean sums f32 values
/// exactly in f64 whatever the order unless their magnitudes span 2²⁹; the order only
/// moves the other sums in their last f64 bits, far below the f32 results' precision.)
const LANES: usize = 32;

#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += f(v);
    }
    combine(acc)
}

#[inline(always)]
fn combine(mut acc: [f64; LANES]) -> f64 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
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
        // Σ g and Σ g·x̂ (g = dy·w) in f64, LANES running sums each (see `sum_f64`).
        let (mut acc_g, mut acc_gx) = ([0.0f64; LANES], [0.0f64; LANES]);
        let full = d / LANES * LANES;
        for c in (0..full).step_by(LANES) {
            let (x, dy, w) = (&xr[c..c + LANES], &dyr[c..c + LANES], &w[c..c + LANES]);
            for j in 0..LANES {
                let g = (dy[j] * w[j]) as f64;
                acc_g[j] += g;
                acc_gx[j] += g * ((x[j] - mu) * rs) as f64;
            }
        }
        for (j, i) in (full..d).enumerate() {
            let g = (dyr[i] * w[i]) as f64;
            acc_g[j] += g;
            acc_gx[j] += g * ((xr[i] - mu) * rs) as f64;
        }
        let (sum_g, sum_gx) = (combine(acc_g), combine(acc_gx));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The former single-running-sum rows: the oracle of the lane-parallel sums.
    fn forward_row_serial(xr: &[f32], w: &[f32], b: &[f32], eps: f32, yr: &mut [f32]) -> (f32, f32) {
        let d = xr.len();
        let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for i in 0..d {
            yr[i] = (((xr[i] as f64 - mu) * rs) as f32) * w[i] + b[i];
        }
        (mu as f32, rs as f32)
    }

    fn backward_row_serial(xr: &[f32], w: &[f32], mu: f32, rs: f32, dyr: &[f32], dxr: &mut [f32]) {
        let d = xr.len();
        let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
        for i in 0..d {
            let g = (dyr[i] * w[i]) as f64;
            sum_g += g;
            sum_gx += g * ((xr[i] - mu) * rs) as f64;
        }
        let (mg, mgx) = ((sum_g / d as f64) as f32, (sum_gx / d as f64) as f32);
        for i in 0..d {
            dxr[i] += rs * (dyr[i] * w[i] - mg - (xr[i] - mu) * rs * mgx);
        }
    }

    /// Rows of transformer-like activations (widths with and without a ragged lane tail):
    /// the lane sums give the serial sums' f32 results, bit for bit on all but a vanishing
    /// fraction of elements and within one rounding on those.
    #[test]
    fn lane_sums_match_serial_sums() {
        let mut rng = crate::rng::Rng::new(7);
        let (mut elems, mut differ) = (0usize, 0usize);
        for d in [768, 100, 37] {
            let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect();
            let b: Vec<f32> = (0..d).map(|_| 0.1 * rng.normal()).collect();
            for row in 0..400 {
                let offset = (row % 5) as f32 - 2.0;
                let x: Vec<f32> = (0..d).map(|i| offset + rng.normal() * if i % 97 == 0 { 30.0 } else { 1.0 }).collect();
                let dy: Vec<f32> = (0..d).map(|_| 1e-3 * rng.normal()).collect();
                let (mut y0, mut y1) = (vec![0.0; d], vec![0.0; d]);
                let (mu0, rs0) = forward_row_serial(&x, &w, &b, 1e-6, &mut y0);
                let (mut mu1, mut rs1) = (0.0, 0.0);
                forward_row(&x, &w, &b, 1e-6, &mut y1, &mut mu1, &mut rs1);
                let (mut dx0, mut dx1) = (vec![0.5; d], vec![0.5; d]);
                backward_row_serial(&x, &w, mu0, rs0, &dy, &mut dx0);
                backward_row(&x, &w, mu1, rs1, &dy, &mut dx1);
                for (u, v) in y0.iter().chain(&dx0).chain([&mu0, &rs0]).zip(y1.iter().chain(&dx1).chain([&mu1, &rs1])) {
                    elems += 1;
                    if u.to_bits() != v.to_bits() {
                        differ += 1;
                        assert!((u - v).abs() <= 2.0 * f32::EPSILON * u.abs().max(1e-3), "{u} vs {v} (width {d})");
                    }
                }
            }
        }
        assert!(differ * 10_000 <= elems, "{differ} of {elems} results differ from the serial sums");
    }
}
