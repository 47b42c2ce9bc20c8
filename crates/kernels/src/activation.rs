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
    y[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| gelu_chunk(x, y));
}

crate::multiversion! {
    fn gelu_chunk(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + fastmath::erf(x * FRAC_1_SQRT_2));
        }
    }
}

/// gelu'(x) = Φ(x) + x·φ(x).
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| gelu_backward_chunk(x, dy, dx));
}

crate::multiversion! {
    fn gelu_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx += dy * gelu_grad(x);
        }
    }
}

/// gelu'(x) = Φ(x) + x·φ(x).
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + fastmath::erf(x * FRAC_1_SQRT_2));
    let pdf = INV_SQRT_2PI * fastmath::exp(-0.5 * x * x);
    cdf + x * pdf
}

/// In place: d ← d · gelu'(x). The MLP backward turns d(GELU output) into d(fc1 output)
/// in the same buffer instead of zeroing and filling a second one ([`gelu_backward`] is the
/// accumulating form and this one's test oracle).
pub fn gelu_backward_in_place(x: &[f32], d: &mut [f32]) {
    d[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(d, x)| gelu_scale_chunk(x, d));
}

crate::multiversion! {
    fn gelu_scale_chunk(x: &[f32], d: &mut [f32]) {
        for (d, &x) in d.iter_mut().zip(x) {
            *d *= gelu_grad(x);
        }
    }
}

/// y = gelu(x) and dydx = gelu'(x) in one pass (one erf and one exp per element instead of
/// two erfs and an exp over two passes): for a backward pass that needs the GELU output
/// again (the next layer's weight gradient) and then its derivative (applied with
/// [`crate::dropout::mul_in_place`]). Bit-identical to [`gelu_forward`] and to the factor
/// [`gelu_backward_in_place`] applies.
pub fn gelu_forward_with_grad(x: &[f32], y: &mut [f32], dydx: &mut [f32]) {
    let n = x.len();
    y[..n]
        .par_chunks_mut(CHUNK)
        .zip(dydx[..n].par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((y, g), x)| gelu_with_grad_chunk(x, y, g));
}

crate::multiversion! {
    fn gelu_with_grad_chunk(x: &[f32], y: &mut [f32], dydx: &mut [f32]) {
        for ((y, g), &x) in y.iter_mut().zip(dydx.iter_mut()).zip(x) {
            let e = fastmath::erf(x * FRAC_1_SQRT_2);
            *y = 0.5 * x * (1.0 + e);
            *g = 0.5 * (1.0 + e) + x * (INV_SQRT_2PI * fastmath::exp(-0.5 * x * x));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_backward_in_place_equals_accumulating_form() {
        let x: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 0.003).collect();
        let dy: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
        let mut want = vec![0.0; x.len()];
        gelu_backward(&x, &dy, &mut want);
        let mut got = dy.clone();
        gelu_backward_in_place(&x, &mut got);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a - b).abs() <= 1e-7 * b.abs()));
    }

    /// The one-pass output and derivative equal the separate kernels bit for bit.
    #[test]
    fn gelu_with_grad_equals_separate_passes() {
        let x: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 0.0031).collect();
        let d: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6).collect();
        let (mut y0, mut y1, mut g) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
        gelu_forward(&x, &mut y0);
        gelu_forward_with_grad(&x, &mut y1, &mut g);
        let mut want = d.clone();
        gelu_backward_in_place(&x, &mut want);
        let mut got = d.clone();
        crate::dropout::mul_in_place(&mut got, &g);
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same(&y0, &y1), "outputs differ");
        assert!(same(&want, &got), "derivatives differ");
    }
}
