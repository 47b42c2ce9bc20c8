//! Fully connected layer in PyTorch's convention: `y = x · Wᵀ + b`, `W` stored `[out, in]`.
//! Backward passes accumulate (`+=`) into the input gradient, and into the parameter
//! gradients unless told to overwrite them ([`Grads`]).

use crate::gemm::{sgemm, sgemm_bias, Trans};
use rayon::prelude::*;

/// Bias-gradient columns per parallel task.
const DB_COLS: usize = 128;

/// y[n,out] = x[n,in] · w[out,in]ᵀ + b. `ldx` is the stored row length of `x` (≥ `din`),
/// so a column block of a wider matrix (e.g. the first 2048 of 2054 region values) can be used in place.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(x: &[f32], ldx: usize, w: &[f32], b: Option<&[f32]>, y: &mut [f32], n: usize, din: usize, dout: usize) {
    assert_eq!(w.len(), dout * din, "linear: weight has {} values, want {dout}x{din}", w.len());
    assert!(y.len() >= n * dout, "linear: output too small");
    match b {
        Some(b) => sgemm_bias(Trans::No, Trans::Yes, n, dout, din, x, ldx, w, din, b, y, dout),
        None => sgemm(Trans::No, Trans::Yes, n, dout, din, 1.0, x, ldx, w, din, 0.0, y, dout),
    }
}

/// How a backward pass writes parameter gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grads {
    /// `+=` into the buffers (a tensor used more than once, or gradients summed over calls).
    Accumulate,
    /// `=`: the buffers' old contents are ignored. A block whose weights are used once per
    /// step writes them this way into an unzeroed scratch buffer: no zero fill, and the
    /// weight-gradient GEMM's first k-slice does not read its output.
    Overwrite,
}

/// Gradients of [`linear_forward`]: dx += dy·W, dW (+)= dyᵀ·x, db (+)= Σ_rows dy, where
/// (+)= is `+=` or `=` as `grads` says (`dx` always accumulates).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    ldx: usize,
    w: &[f32],
    dy: &[f32],
    n: usize,
    din: usize,
    dout: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    grads: Grads,
) {
    if let Some(dx) = dx {
        sgemm(Trans::No, Trans::No, n, din, dout, 1.0, dy, dout, w, din, 1.0, dx, din);
    }
    // Overwriting gives the bits accumulating into zeros gives (0 + v = v).
    let beta = if grads == Grads::Overwrite { 0.0 } else { 1.0 };
    sgemm(Trans::Yes, Trans::No, dout, din, n, 1.0, dy, dout, x, ldx, beta, dw, din);
    if let Some(db) = db {
        if grads == Grads::Overwrite {
            db.fill(0.0);
        }
        // Column blocks in parallel; each column still sums its rows in order.
        let dy = &dy[..n * dout];
        db.par_chunks_mut(DB_COLS).enumerate().for_each(|(ci, g)| bias_grad_cols(dy, dout, ci * DB_COLS, g));
    }
}

crate::multiversion! {
    /// g[c] += Σ_rows dy[row, j0 + c], rows in order.
    fn bias_grad_cols(dy: &[f32], dout: usize, j0: usize, g: &mut [f32]) {
        let cols = g.len();
        for row in dy.chunks_exact(dout) {
            for (g, d) in g.iter_mut().zip(&row[j0..j0 + cols]) {
                *g += d;
            }
        }
    }
}
