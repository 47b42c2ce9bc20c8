//! Fully connected layer in PyTorch's convention: `y = x · Wᵀ + b`, `W` stored `[out, in]`.
//! Backward passes accumulate (`+=`) into every gradient buffer, as everywhere in this crate.

use crate::gemm::{sgemm, Trans};

/// y[n,out] = x[n,in] · w[out,in]ᵀ + b. `ldx` is the stored row length of `x` (≥ `din`),
/// so a column block of a wider matrix (e.g. the first 2048 of 2054 region values) can be used in place.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(x: &[f32], ldx: usize, w: &[f32], b: Option<&[f32]>, y: &mut [f32], n: usize, din: usize, dout: usize) {
    assert_eq!(w.len(), dout * din, "linear: weight has {} values, want {dout}x{din}", w.len());
    assert!(y.len() >= n * dout, "linear: output too small");
    let beta = match b {
        Some(b) => {
            assert_eq!(b.len(), dout, "linear: bias length");
            for row in y[..n * dout].chunks_exact_mut(dout) {
                row.copy_from_slice(b);
            }
            1.0
        }
        None => 0.0,
    };
    sgemm(Trans::No, Trans::Yes, n, dout, din, 1.0, x, ldx, w, din, beta, y, dout);
}

/// Gradients of [`linear_forward`]: dx += dy·W, dW += dyᵀ·x, db += Σ_rows dy.
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
) {
    if let Some(dx) = dx {
        sgemm(Trans::No, Trans::No, n, din, dout, 1.0, dy, dout, w, din, 1.0, dx, din);
    }
    sgemm(Trans::Yes, Trans::No, dout, din, n, 1.0, dy, dout, x, ldx, 1.0, dw, din);
    if let Some(db) = db {
        for row in dy[..n * dout].chunks_exact(dout) {
            for (g, d) in db.iter_mut().zip(row) {
                *g += d;
            }
        }
    }
}
