//! Row softmax with an optional additive mask broadcast over rows, and its backward.

use rayon::prelude::*;

/// y[r,:] = softmax(x[r,:] + mask) for rows of width `n`. `mask`, when given, has `n` values.
pub fn softmax_forward(x: &[f32], mask: Option<&[f32]>, y: &mut [f32], n: usize) {
    y[..x.len()].par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(yr, xr)| {
        for i in 0..n {
            yr[i] = xr[i] + mask.map_or(0.0, |m| m[i]);
        }
        softmax_in_place(yr);
    });
}

crate::multiversion! {
    /// Numerically stable softmax of one row, in place.
    pub fn softmax_in_place(v: &mut [f32]) {
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for x in v.iter_mut() {
            *x = crate::fastmath::exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

crate::multiversion! {
    /// One row in place: d ← scale · y ⊙ (d − ⟨y, d⟩), the gradient of the (scaled) scores of
    /// a softmax given the probabilities `y` and d(probabilities) `d` (attention's backward).
    pub fn softmax_backward_in_place(y: &[f32], d: &mut [f32], scale: f32) {
        let yd: f32 = d.iter().zip(y).map(|(a, b)| a * b).sum();
        d.iter_mut().zip(y).for_each(|(x, &yj)| *x = scale * yj * (*x - yd));
    }
}

/// dx += y ⊙ (dy − ⟨y, dy⟩) per row.
pub fn softmax_backward(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
    dx[..y.len()].par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(dxr, (yr, dyr))| {
        let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
        for i in 0..n {
            dxr[i] += yr[i] * (dyr[i] - dot);
        }
    });
}
