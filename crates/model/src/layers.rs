//! Parameterised building blocks over the flat parameter buffers: each layer holds the
//! ranges of its tensors inside `Params::data` / `Params::grad`, so a backward pass can read
//! weights and write gradients at the same time. Backward passes accumulate (`+=`) into the
//! input gradient; parameter gradients are accumulated or overwritten as [`Grads`] says.

use crate::params::Params;
use demovlp_kernels::gemm::{sgemm, Trans};
use demovlp_kernels::{layernorm, linear};
use rayon::prelude::*;

pub use demovlp_kernels::linear::Grads;
use std::ops::Range;

/// Location of a named tensor; panics with the name when it was not declared.
pub fn range(p: &Params, name: &str) -> Range<usize> {
    let id = p.id(name).unwrap_or_else(|| panic!("parameter {name} is not declared"));
    let s = p.spec(id);
    s.offset..s.offset + s.len
}

/// Two disjoint mutable views of one buffer.
pub fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start || b.end <= a.start, "overlapping parameter ranges");
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b])
    }
}

/// `nn.Linear`: weight `[out, in]`, optional bias.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Range<usize>,
    pub b: Option<Range<usize>>,
    pub din: usize,
    pub dout: usize,
}

impl Linear {
    pub fn new(p: &Params, prefix: &str, din: usize, dout: usize, bias: bool) -> Self {
        let w = range(p, &format!("{prefix}.weight"));
        assert_eq!(w.len(), din * dout, "{prefix}.weight: wrong size");
        let b = bias.then(|| range(p, &format!("{prefix}.bias")));
        Linear { w, b, din, dout }
    }

    /// y[n,out] = x[n,in]·Wᵀ + b with x rows `ldx` apart.
    pub fn forward(&self, data: &[f32], x: &[f32], ldx: usize, n: usize, y: &mut [f32]) {
        let b = self.b.as_ref().map(|r| &data[r.clone()]);
        linear::linear_forward(x, ldx, &data[self.w.clone()], b, y, n, self.din, self.dout);
    }

    /// dx += dy·W (when given); dW, db accumulated or overwritten as `grads` says.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        data: &[f32],
        grad: &mut [f32],
        x: &[f32],
        ldx: usize,
        n: usize,
        dy: &[f32],
        dx: Option<&mut [f32]>,
        grads: Grads,
    ) {
        let w = &data[self.w.clone()];
        match &self.b {
            Some(b) => {
                let (dw, db) = two_mut(grad, self.w.clone(), b.clone());
                linear::linear_backward(x, ldx, w, dy, n, self.din, self.dout, dx, dw, Some(db), grads);
            }
            None => linear::linear_backward(x, ldx, w, dy, n, self.din, self.dout, dx, &mut grad[self.w.clone()], None, grads),
        }
    }
}

/// `r` moved down by `base` (a tensor's place inside one block's window of the buffers).
fn shift(r: &Range<usize>, base: usize) -> Range<usize> {
    assert!(r.start >= base, "tensor at {r:?} lies before its block at {base}");
    r.start - base..r.end - base
}

impl Linear {
    /// The same layer addressed inside a window of the buffers that starts at `base`.
    pub fn rebased(&self, base: usize) -> Linear {
        Linear { w: shift(&self.w, base), b: self.b.as_ref().map(|b| shift(b, base)), ..self.clone() }
    }

    /// dx = dy·W, overwriting `dx` (no zeroing pass). With [`Linear::backward`] given
    /// `dx = None` first, the caller may reuse the forward input's buffer for `dx`.
    pub fn backward_input(&self, data: &[f32], dy: &[f32], n: usize, dx: &mut [f32]) {
        sgemm(Trans::No, Trans::No, n, self.din, self.dout, 1.0, dy, self.dout, &data[self.w.clone()], self.din, 0.0, dx, self.din);
    }
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub w: Range<usize>,
    pub b: Range<usize>,
    pub dim: usize,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(p: &Params, prefix: &str, dim: usize, eps: f32) -> Self {
        LayerNorm { w: range(p, &format!("{prefix}.weight")), b: range(p, &format!("{prefix}.bias")), dim, eps }
    }

    /// The same layer addressed inside a window of the buffers that starts at `base`.
    pub fn rebased(&self, base: usize) -> LayerNorm {
        LayerNorm { w: shift(&self.w, base), b: shift(&self.b, base), ..self.clone() }
    }

    pub fn forward(&self, data: &[f32], x: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
        layernorm::layernorm_forward(x, &data[self.w.clone()], &data[self.b.clone()], self.eps, y, mean, rstd, self.dim);
    }

    /// dx += ∂/∂x; dw, db accumulated or overwritten as `grads` says.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        data: &[f32],
        grad: &mut [f32],
        x: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        grads: Grads,
    ) {
        let (dw, db) = two_mut(grad, self.w.clone(), self.b.clone());
        if grads == Grads::Overwrite {
            dw.fill(0.0);
            db.fill(0.0);
        }
        layernorm::layernorm_backward(x, &data[self.w.clone()], mean, rstd, dy, dx, dw, db, self.dim);
    }
}

/// Resize an arena buffer to `n` values: reuses the allocation whenever it is big enough,
/// so a steady stream of same-shaped batches allocates nothing after the first.
pub fn fit(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Fit then zero (gradient accumulators).
pub fn zeroed(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    fill_zero(v);
    &mut v[..]
}

/// Sets every value to 0, in parallel chunks when long (block gradients and activation
/// gradients are tens of MB: one core alone would leave the other idle).
pub fn fill_zero(v: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    if v.len() >= 4 * CHUNK {
        v.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
    } else {
        v.fill(0.0);
    }
}

/// y += x elementwise (in parallel chunks when long: the residual adds are whole activations).
pub fn add_in_place(y: &mut [f32], x: &[f32]) {
    const CHUNK: usize = 1 << 14;
    if y.len() >= 4 * CHUNK {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| add_chunk(y, x));
    } else {
        add_chunk(y, x);
    }
}

demovlp_kernels::multiversion! {
    fn add_chunk(y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
    }
}

/// The window `[start, end)` of the buffers holding exactly the tensors whose names start
/// with `prefix` (one transformer block): they must be contiguous, as declared.
pub fn block_window(p: &Params, prefix: &str) -> Range<usize> {
    let specs: Vec<_> = p.specs().iter().filter(|s| s.name.starts_with(prefix)).collect();
    assert!(!specs.is_empty(), "no tensors named {prefix}*");
    let start = specs.iter().map(|s| s.offset).min().unwrap_or(0);
    let end = specs.iter().map(|s| s.offset + s.len).max().unwrap_or(0);
    let total: usize = specs.iter().map(|s| s.len).sum();
    assert_eq!(total, end - start, "tensors {prefix}* are not contiguous in the parameter buffer");
    start..end
}
