//! Elementwise activations: GELU (exact, erf form, as `nn.GELU()`), ReLU, LeakyReLU.
//! Backward passes accumulate into `dx`.

use rayon::prelude::*;

const MIN_LEN: usize = 4096;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
    y[..x.len()].par_iter_mut().zip(x.par_iter()).with_min_len(MIN_LEN).for_each(|(y, &x)| {
        let xf = x as f64;
        *y = (0.5 * xf * (1.0 + libm::erf(xf * FRAC_1_SQRT_2))) as f32;
    });
}

/// gelu'(x) = Φ(x) + x·φ(x).
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx[..x.len()].par_iter_mut().zip(x.par_iter().zip(dy.par_iter())).with_min_len(MIN_LEN).for_each(|(dx, (&x, &dy))| {
        let xf = x as f64;
        let cdf = 0.5 * (1.0 + libm::erf(xf * FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * (-0.5 * xf * xf).exp();
        *dx += dy * (cdf + xf * pdf) as f32;
    });
}

pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    y[..x.len()].par_iter_mut().zip(x.par_iter()).with_min_len(MIN_LEN).for_each(|(y, &x)| *y = x.max(0.0));
}

/// Subgradient 0 at x = 0, as PyTorch.
pub fn relu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx[..x.len()].par_iter_mut().zip(x.par_iter().zip(dy.par_iter())).with_min_len(MIN_LEN).for_each(|(dx, (&x, &dy))| {
        if x > 0.0 {
            *dx += dy;
        }
    });
}

pub fn leaky_relu_forward(x: &[f32], slope: f32, y: &mut [f32]) {
    y[..x.len()].par_iter_mut().zip(x.par_iter()).with_min_len(MIN_LEN).for_each(|(y, &x)| *y = if x > 0.0 { x } else { slope * x });
}

pub fn leaky_relu_backward(x: &[f32], slope: f32, dy: &[f32], dx: &mut [f32]) {
    dx[..x.len()].par_iter_mut().zip(x.par_iter().zip(dy.par_iter())).with_min_len(MIN_LEN).for_each(|(dx, (&x, &dy))| {
        *dx += if x > 0.0 { dy } else { slope * dy };
    });
}
