//! Parameterised building blocks over the flat parameter buffers: each layer holds the
//! ranges of its tensors inside `Params::data` / `Params::grad`, so a backward pass can read
//! weights and write gradients at the same time. Backward passes accumulate (`+=`) into the
//! input gradient; parameter gradients are accumulated or overwritten as [`Grads`] says.

use crate::backend::{two_mut, Backend};
use crate::params::Params;

pub use demovlp_kernels::linear::Grads;
use std::ops::Range;

/// Location of a named tensor; panics with the name when it was not declared.
pub fn range<B: Backend>(p: &Params<B>, name: &str) -> Range<usize> {
    let id = p.id(name).unwrap_or_else(|| panic!("parameter {name} is not declared"));
    let s = p.spec(id);
    s.offset..s.offset + s.len
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
    pub fn new<B: Backend>(p: &Params<B>, prefix: &str, din: usize, dout: usize, bias: bool) -> Self {
        let w = range(p, &format!("{prefix}.weight"));
        assert_eq!(w.len(), din * dout, "{prefix}.weight: wrong size");
        let b = bias.then(|| range(p, &format!("{prefix}.bias")));
        Linear { w, b, din, dout }
    }

    /// `y[n, out] = x[n, in]·Wᵀ + b` with x rows `ldx` apart.
    pub fn forward<B: Backend>(&self, be: &B, data: B::View<'_>, x: B::View<'_>, ldx: usize, n: usize, y: B::ViewMut<'_>) {
        let b = self.b.as_ref().map(|r| B::slice(data, r.clone()));
        be.linear_forward(x, ldx, B::slice(data, self.w.clone()), b, y, n, self.din, self.dout);
    }

    /// dx += dy·W (when given); dW, db accumulated or overwritten as `grads` says.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        grad: B::ViewMut<'_>,
        x: B::View<'_>,
        ldx: usize,
        n: usize,
        dy: B::View<'_>,
        dx: Option<B::ViewMut<'_>>,
        grads: Grads,
    ) {
        let w = B::slice(data, self.w.clone());
        match &self.b {
            Some(b) => {
                let (dw, db) = two_mut::<B>(grad, self.w.clone(), b.clone());
                be.linear_backward(x, ldx, w, dy, n, self.din, self.dout, dx, dw, Some(db), grads);
            }
            None => be.linear_backward(x, ldx, w, dy, n, self.din, self.dout, dx, B::slice_mut(grad, self.w.clone()), None, grads),
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
    pub fn backward_input<B: Backend>(&self, be: &B, data: B::View<'_>, dy: B::View<'_>, n: usize, dx: B::ViewMut<'_>) {
        be.linear_backward_input(dy, B::slice(data, self.w.clone()), dx, n, self.din, self.dout);
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
    pub fn new<B: Backend>(p: &Params<B>, prefix: &str, dim: usize, eps: f32) -> Self {
        LayerNorm { w: range(p, &format!("{prefix}.weight")), b: range(p, &format!("{prefix}.bias")), dim, eps }
    }

    /// The same layer addressed inside a window of the buffers that starts at `base`.
    pub fn rebased(&self, base: usize) -> LayerNorm {
        LayerNorm { w: shift(&self.w, base), b: shift(&self.b, base), ..self.clone() }
    }

    pub fn forward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        x: B::View<'_>,
        y: B::ViewMut<'_>,
        mean: B::ViewMut<'_>,
        rstd: B::ViewMut<'_>,
    ) {
        be.layernorm_forward(x, B::slice(data, self.w.clone()), B::slice(data, self.b.clone()), self.eps, y, mean, rstd, self.dim);
    }

    /// dx += ∂/∂x; dw, db accumulated or overwritten as `grads` says.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        grad: B::ViewMut<'_>,
        x: B::View<'_>,
        mean: B::View<'_>,
        rstd: B::View<'_>,
        dy: B::View<'_>,
        dx: B::ViewMut<'_>,
        grads: Grads,
    ) {
        let (mut dw, mut db) = two_mut::<B>(grad, self.w.clone(), self.b.clone());
        if grads == Grads::Overwrite {
            be.fill_zero(B::reborrow(&mut dw));
            be.fill_zero(B::reborrow(&mut db));
        }
        be.layernorm_backward(x, B::slice(data, self.w.clone()), mean, rstd, dy, dx, dw, db, self.dim);
    }
}

/// The window `[start, end)` of the buffers holding exactly the tensors whose names start
/// with `prefix` (one transformer block): they must be contiguous, as declared.
pub fn block_window<B: Backend>(p: &Params<B>, prefix: &str) -> Range<usize> {
    let specs: Vec<_> = p.specs().iter().filter(|s| s.name.starts_with(prefix)).collect();
    assert!(!specs.is_empty(), "no tensors named {prefix}*");
    let start = specs.iter().map(|s| s.offset).min().unwrap_or(0);
    let end = specs.iter().map(|s| s.offset + s.len).max().unwrap_or(0);
    let total: usize = specs.iter().map(|s| s.len).sum();
    assert_eq!(total, end - start, "tensors {prefix}* are not contiguous in the parameter buffer");
    start..end
}
