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
        // The maximum in 16 lanes (the same value in any order); the exponentials as one
        // vector loop; their sum still a single running sum in index order (its rounding
        // is the result's), kept out of the exponential loop so that one vectorises.
        let mut lanes = [f32::NEG_INFINITY; 16];
        let chunks = v.chunks_exact(16);
        for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
            *l = l.max(x);
        }
        for c in chunks {
            for j in 0..16 {
                lanes[j] = lanes[j].max(c[j]);
            }
        }
        let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in v.iter_mut() {
            *x = crate::fastmath::exp(*x - max);
        }
        let sum = v.iter().fold(0.0f32, |s, &x| s + x);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane maximum and split loops give the single-loop softmax bit for bit (masked
    /// entries, the row widths of the step's attention, ragged lane tails).
    #[test]
    fn split_loops_equal_the_single_loop() {
        let mut rng = crate::rng::Rng::new(3);
        for n in [1, 7, 16, 31, 100, 241] {
            for _ in 0..50 {
                let row: Vec<f32> = (0..n).map(|i| 3.0 * rng.normal() + if i % 9 == 4 { -100.0 } else { 0.0 }).collect();
                let mut want = row.clone();
                let max = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for x in want.iter_mut() {
                    *x = crate::fastmath::exp(*x - max);
                    sum += *x;
                }
                let inv = 1.0 / sum;
                want.iter_mut().for_each(|x| *x *= inv);
                let mut got = row.clone();
                softmax_in_place(&mut got);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "width {n}");
            }
        }
    }
}
