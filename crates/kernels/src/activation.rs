//! Elementwise activations: GELU (exact, erf form, as `nn.GELU()`), ReLU, LeakyReLU.
//! Backward passes accumulate into `dx`.

use crate::fastmath;
use rayon::prelude::*;

const MIN_LEN: usize = 4096;
const CHUNK: usize = 1024;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2)), computed as PyTorch's CPU kernel does.
pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
    y[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + fastmath::erf(x * FRAC_1_SQRT_2));
        }
    });
}

/// gelu'(x) = Φ(x) + x·φ(x).
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + fastmath::erf(x * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * fastmath::exp(-0.5 * x * x);
            *dx += dy * (cdf + x * pdf);
        }
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
