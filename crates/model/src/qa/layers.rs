//! The head's two layer kinds over its flat buffers: the weight-normalised linear (`WN`,
//! one scalar gain: `W = g·V/‖V‖_F`) and the plain `nn.Linear`, forward and backward through
//! the backend (parameter gradients via an `Overwrite` scratch, then accumulated).

use crate::backend::{two_mut, Backend, Grads};
use crate::layers::range;
use crate::params::Params;
use std::ops::Range;

/// A weight-normalised linear layer `y = x·(g·V/‖V‖)ᵀ + b`, located in the head's buffers.
#[derive(Clone, Debug)]
pub(super) struct WnLinear {
    g: Range<usize>,
    v: Range<usize>,
    b: Range<usize>,
    din: usize,
    dout: usize,
}

/// Parameter-gradient scratch of the head's backward pass (`Overwrite` targets).
#[derive(Clone, Debug, Default)]
pub(super) struct GradScratch<B: Backend> {
    dw: B::Buf,
    db: B::Buf,
}

impl WnLinear {
    pub(super) fn new<B: Backend>(p: &Params<B>, prefix: &str, din: usize, dout: usize) -> Self {
        let v = range(p, &format!("{prefix}.weight_v"));
        assert_eq!(v.len(), din * dout, "{prefix}.weight_v: wrong size");
        WnLinear { g: range(p, &format!("{prefix}.weight_g")), v, b: range(p, &format!("{prefix}.bias")), din, dout }
    }

    /// Forward: `y [n, dout]`; keeps the effective weight `g·V/‖V‖` in `w`.
    pub(super) fn forward<B: Backend>(&self, be: &B, data: B::View<'_>, x: B::View<'_>, n: usize, w: &mut B::Buf, y: B::ViewMut<'_>) {
        be.fit(w, self.din * self.dout);
        be.weight_norm(B::slice(data, self.g.clone()), B::slice(data, self.v.clone()), B::view_mut(w));
        be.linear_forward(x, self.din, B::view(w), Some(B::slice(data, self.b.clone())), y, n, self.din, self.dout);
    }

    /// Backward from `dy [n, dout]`: `dx += dy·W` (when given), and `dg`, `dV`, `db` accumulated
    /// into `grad` through the weight norm. `w` is the effective weight of the forward.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        mut grad: B::ViewMut<'_>,
        s: &mut GradScratch<B>,
        x: B::View<'_>,
        n: usize,
        w: &B::Buf,
        dy: B::View<'_>,
        dx: Option<B::ViewMut<'_>>,
    ) {
        be.fit(&mut s.dw, self.din * self.dout);
        be.fit(&mut s.db, self.dout);
        let (dw, db) = (B::view_mut(&mut s.dw), B::view_mut(&mut s.db));
        be.linear_backward(x, self.din, B::view(w), dy, n, self.din, self.dout, dx, dw, Some(db), Grads::Overwrite);
        let (dg, dv) = two_mut::<B>(B::reborrow(&mut grad), self.g.clone(), self.v.clone());
        be.weight_norm_backward(B::slice(data, self.g.clone()), B::slice(data, self.v.clone()), B::view(&s.dw), dg, dv);
        be.add_in_place(B::slice_mut(grad, self.b.clone()), B::view(&s.db));
    }
}

/// A plain `nn.Linear` of the head.
#[derive(Clone, Debug)]
pub(super) struct PlainLinear {
    w: Range<usize>,
    b: Range<usize>,
    din: usize,
    dout: usize,
}

impl PlainLinear {
    pub(super) fn new<B: Backend>(p: &Params<B>, prefix: &str, din: usize, dout: usize) -> Self {
        PlainLinear { w: range(p, &format!("{prefix}.weight")), b: range(p, &format!("{prefix}.bias")), din, dout }
    }

    pub(super) fn forward<B: Backend>(&self, be: &B, data: B::View<'_>, x: B::View<'_>, n: usize, y: B::ViewMut<'_>) {
        let (w, b) = (B::slice(data, self.w.clone()), B::slice(data, self.b.clone()));
        be.linear_forward(x, self.din, w, Some(b), y, n, self.din, self.dout);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        mut grad: B::ViewMut<'_>,
        s: &mut GradScratch<B>,
        x: B::View<'_>,
        n: usize,
        dy: B::View<'_>,
        dx: Option<B::ViewMut<'_>>,
    ) {
        be.fit(&mut s.dw, self.din * self.dout);
        be.fit(&mut s.db, self.dout);
        let (dw, db) = (B::view_mut(&mut s.dw), B::view_mut(&mut s.db));
        let w = B::slice(data, self.w.clone());
        be.linear_backward(x, self.din, w, dy, n, self.din, self.dout, dx, dw, Some(db), Grads::Overwrite);
        be.add_in_place(B::slice_mut(B::reborrow(&mut grad), self.w.clone()), B::view(&s.dw));
        be.add_in_place(B::slice_mut(grad, self.b.clone()), B::view(&s.db));
    }
}
