//! Finite-difference gradient checking, used by the tests of every backward pass here and in
//! the model crate. A scalar test loss (usually Σ r·y with fixed random r, summed in f64) is
//! evaluated at x ± eps along probed coordinates and compared with the analytic gradient.

use crate::rng::Rng;

/// Values uniform in (−scale, scale).
pub fn random_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * scale).collect()
}

/// Σ r_i·y_i in f64: a test loss whose gradient w.r.t. y is r.
pub fn weighted_sum(y: &[f32], r: &[f32]) -> f64 {
    assert_eq!(y.len(), r.len());
    y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}

#[derive(Clone, Debug)]
pub struct GradReport {
    /// max |numeric − analytic| over the probed coordinates, divided by the larger of the
    /// two gradients' max magnitude (so small gradients next to large ones are not over-weighted).
    pub max_rel_err: f64,
    pub worst_index: usize,
    pub numeric: f64,
    pub analytic: f64,
}

/// Central differences of `f` at `x` on `coords`, divided by the step actually taken in f32.
pub fn numeric_gradient(x: &[f32], coords: &[usize], eps: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    coords
        .iter()
        .map(|&i| {
            let orig = xp[i];
            xp[i] = orig + eps;
            let fp = f(&xp);
            xp[i] = orig - eps;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / ((orig + eps) as f64 - (orig - eps) as f64)
        })
        .collect()
}

/// Central differences of `f` at `x` on `coords` (all coordinates when `None`).
pub fn numeric_vs_analytic(
    x: &[f32],
    analytic: &[f32],
    coords: Option<&[usize]>,
    eps: f32,
    mut f: impl FnMut(&[f32]) -> f64,
) -> GradReport {
    assert_eq!(x.len(), analytic.len(), "gradcheck: gradient length differs from input length");
    let all: Vec<usize>;
    let coords = match coords {
        Some(c) => c,
        None => {
            all = (0..x.len()).collect();
            &all
        }
    };
    let numeric = numeric_gradient(x, coords, eps, &mut f);
    let scale = coords.iter().zip(&numeric).map(|(&i, n)| (analytic[i] as f64).abs().max(n.abs())).fold(1e-6, f64::max);
    let mut rep = GradReport { max_rel_err: 0.0, worst_index: 0, numeric: 0.0, analytic: 0.0 };
    for (&i, &n) in coords.iter().zip(&numeric) {
        let e = (n - analytic[i] as f64).abs() / scale;
        if e >= rep.max_rel_err {
            rep = GradReport { max_rel_err: e, worst_index: i, numeric: n, analytic: analytic[i] as f64 };
        }
    }
    rep
}

/// Panics with a readable message when the analytic gradient disagrees with finite differences.
pub fn assert_gradient(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    coords: Option<&[usize]>,
    eps: f32,
    tol: f64,
    f: impl FnMut(&[f32]) -> f64,
) -> GradReport {
    let rep = numeric_vs_analytic(x, analytic, coords, eps, f);
    assert!(
        rep.max_rel_err <= tol,
        "gradcheck {name}: relative error {:.3e} > {tol:.1e} at index {} (numeric {:.6e}, analytic {:.6e})",
        rep.max_rel_err,
        rep.worst_index,
        rep.numeric,
        rep.analytic
    );
    rep
}

/// `n` distinct coordinates out of `len`, for probing big tensors.
pub fn sample_coords(rng: &mut Rng, len: usize, n: usize) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    let mut idx: Vec<usize> = (0..len).collect();
    rng.shuffle(&mut idx);
    idx.truncate(n);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catches_a_wrong_gradient() {
        let x = [0.3f32, -1.2, 2.0];
        let f = |x: &[f32]| x.iter().map(|&v| (v as f64).powi(3)).sum::<f64>();
        let right: Vec<f32> = x.iter().map(|v| 3.0 * v * v).collect();
        assert!(numeric_vs_analytic(&x, &right, None, 1e-2, f).max_rel_err < 1e-3);
        let mut wrong = right.clone();
        wrong[1] *= 1.05;
        assert!(numeric_vs_analytic(&x, &wrong, None, 1e-2, f).max_rel_err > 1e-2);
    }
}
