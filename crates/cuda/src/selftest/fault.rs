//! [`Faulty`]: a [`Backend`] wrapper that injects device faults into another backend's
//! kernel calls, so the selftest's behaviour under faults is tested on the CPU.
//!
//! - [`FaultKind::Error`]: the chosen call panics once, as the CUDA backend does on a
//!   non-sticky error (an invalid launch configuration, an out-of-memory), **while holding
//!   the backend's scratch lock** as the CUDA backend's GEMM, scratch and loss paths do; the
//!   calls after it must still work (the lock is taken with [`crate::lock`], which tolerates
//!   the poisoning).
//! - [`FaultKind::Sticky`]: the chosen call and every call after it panic, as every driver
//!   call does once a context has hit an illegal address; [`Faulty::fault`] reports it, as
//!   [`crate::CudaBackend::fault`] does.
//!
//! The fault is chosen by kernel (method) name and occurrence: `sticky:layernorm_forward`
//! fails the first `layernorm_forward`, `error:gelu_forward#2` the third `gelu_forward`
//! ([`FaultPlan::parse`], also what `DEMOVLP_SELFTEST_FAULT` holds for `demovlp selftest
//! --device cpu`).

use demovlp_kernels::attention::AttnShape;
use demovlp_kernels::Rng;
use demovlp_model::adamw::StepCoeffs;
use demovlp_model::backend::{Backend, Grads, LossGradBufs, LossViews, TokenDims};
use demovlp_retrieval::{LossConfig, LossOutputs};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What an injected fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// One call fails; the device stays usable.
    Error,
    /// The call fails and so does every later one (a dead context).
    Sticky,
}

/// Which call fails, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    pub kind: FaultKind,
    /// The [`Backend`] method's name (`layernorm_forward`, `zeros`, `to_host`, ...).
    pub method: String,
    /// How many calls of it succeed first.
    pub skip: usize,
}

impl FaultPlan {
    /// `sticky:METHOD[#SKIP]` or `error:METHOD[#SKIP]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| format!("fault {s:?}: want sticky:METHOD[#N] or error:METHOD[#N]"))?;
        let kind = match kind {
            "sticky" => FaultKind::Sticky,
            "error" => FaultKind::Error,
            k => return Err(format!("fault {s:?}: unknown kind {k:?} (sticky or error)")),
        };
        let (method, skip) = match rest.split_once('#') {
            Some((m, n)) => (m, n.parse().map_err(|_| format!("fault {s:?}: {n:?} is not a count"))?),
            None => (rest, 0),
        };
        if method.is_empty() {
            return Err(format!("fault {s:?}: no method named"));
        }
        Ok(FaultPlan { kind, method: method.to_string(), skip })
    }
}

#[derive(Debug, Default)]
struct State {
    plan: Option<FaultPlan>,
    calls: AtomicUsize,
    /// Set by a sticky fault.
    dead: Mutex<Option<String>>,
    /// Stands for the CUDA backend's scratch / plan / loss locks: a non-sticky fault panics
    /// while holding it.
    scratch: Mutex<()>,
}

/// `B` with a fault injected at one call (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Faulty<B: Backend> {
    inner: B,
    state: Arc<State>,
}

impl<B: Backend> Faulty<B> {
    pub fn new(inner: B, plan: FaultPlan) -> Self {
        Faulty { inner, state: Arc::new(State { plan: Some(plan), ..State::default() }) }
    }

    /// `Err` (the fault) once a sticky fault has fired: the device is unusable.
    pub fn fault(&self) -> Result<(), String> {
        match &*crate::lock(&self.state.dead) {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Called first by every method: fails as the plan says.
    fn gate(&self, method: &str) {
        if let Some(why) = crate::lock(&self.state.dead).clone() {
            panic!("{method}: {why}");
        }
        let Some(plan) = &self.state.plan else { return };
        if plan.method != method || self.state.calls.fetch_add(1, Ordering::SeqCst) != plan.skip {
            return;
        }
        match plan.kind {
            FaultKind::Error => {
                let _held = crate::lock(&self.state.scratch);
                panic!("CUDA backend: {method} failed: CUDA_ERROR_INVALID_VALUE (injected, not sticky)");
            }
            FaultKind::Sticky => {
                let why = format!("CUDA_ERROR_ILLEGAL_ADDRESS (injected in {method}, sticky)");
                *crate::lock(&self.state.dead) = Some(why.clone());
                panic!("CUDA backend: {method} failed: {why}");
            }
        }
    }

    /// Every kernel takes the scratch lock, as the CUDA backend's do: a poisoned one must not
    /// fail them.
    fn call<R>(&self, method: &str, f: impl FnOnce(&B) -> R) -> R {
        self.gate(method);
        let _s = crate::lock(&self.state.scratch);
        f(&self.inner)
    }
}

impl<B: Backend> Backend for Faulty<B> {
    type Buf = B::Buf;
    type View<'a> = B::View<'a>;
    type ViewMut<'a> = B::ViewMut<'a>;

    fn buf_len(b: &Self::Buf) -> usize {
        B::buf_len(b)
    }
    fn view_len(v: Self::View<'_>) -> usize {
        B::view_len(v)
    }
    fn view_mut_len(v: &Self::ViewMut<'_>) -> usize {
        B::view_mut_len(v)
    }
    fn zeros(&self, n: usize) -> Self::Buf {
        self.call("zeros", |b| b.zeros(n))
    }
    fn fit(&self, b: &mut Self::Buf, n: usize) {
        self.call("fit", |be| be.fit(b, n))
    }
    fn view(b: &Self::Buf) -> Self::View<'_> {
        B::view(b)
    }
    fn view_mut(b: &mut Self::Buf) -> Self::ViewMut<'_> {
        B::view_mut(b)
    }
    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a> {
        B::slice(v, r)
    }
    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a> {
        B::slice_mut(v, r)
    }
    fn reborrow<'b>(v: &'b mut Self::ViewMut<'_>) -> Self::ViewMut<'b> {
        B::reborrow(v)
    }
    fn as_view<'b>(v: &'b Self::ViewMut<'_>) -> Self::View<'b> {
        B::as_view(v)
    }
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, at: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        B::split_at_mut(v, at)
    }
    fn fill_zero(&self, v: Self::ViewMut<'_>) {
        self.call("fill_zero", |b| b.fill_zero(v))
    }
    fn copy(&self, src: Self::View<'_>, dst: Self::ViewMut<'_>) {
        self.call("copy", |b| b.copy(src, dst))
    }
    fn copy_2d(&self, src: Self::View<'_>, s0: usize, sld: usize, dst: Self::ViewMut<'_>, d0: usize, dld: usize, rows: usize, cols: usize) {
        self.call("copy_2d", |b| b.copy_2d(src, s0, sld, dst, d0, dld, rows, cols))
    }
    fn input<'a>(&self, host: &'a [f32], staging: &'a mut Self::Buf) -> Self::View<'a> {
        self.gate("input");
        self.inner.input(host, staging)
    }
    fn write_host(&self, b: &mut Self::Buf, n: usize, f: impl FnOnce(&mut [f32])) {
        self.call("write_host", |be| be.write_host(b, n, f))
    }
    fn modify_host(&self, b: &mut Self::Buf, r: Range<usize>, f: impl FnOnce(&mut [f32])) {
        self.call("modify_host", |be| be.modify_host(b, r, f))
    }
    fn to_host(&self, v: Self::View<'_>) -> Vec<f32> {
        self.call("to_host", |b| b.to_host(v))
    }
    fn read_host<R>(&self, v: Self::View<'_>, f: impl FnOnce(&[f32]) -> R) -> R {
        self.call("read_host", |b| b.read_host(v, f))
    }
    fn linear_forward(
        &self,
        x: Self::View<'_>,
        ldx: usize,
        w: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        y: Self::ViewMut<'_>,
        n: usize,
        din: usize,
        dout: usize,
    ) {
        self.call("linear_forward", |b| b.linear_forward(x, ldx, w, bias, y, n, din, dout))
    }
    fn linear_backward(
        &self,
        x: Self::View<'_>,
        ldx: usize,
        w: Self::View<'_>,
        dy: Self::View<'_>,
        n: usize,
        din: usize,
        dout: usize,
        dx: Option<Self::ViewMut<'_>>,
        dw: Self::ViewMut<'_>,
        db: Option<Self::ViewMut<'_>>,
        grads: Grads,
    ) {
        self.call("linear_backward", |b| b.linear_backward(x, ldx, w, dy, n, din, dout, dx, dw, db, grads))
    }
    fn linear_backward_input(&self, dy: Self::View<'_>, w: Self::View<'_>, dx: Self::ViewMut<'_>, n: usize, din: usize, dout: usize) {
        self.call("linear_backward_input", |b| b.linear_backward_input(dy, w, dx, n, din, dout))
    }
    fn layernorm_forward(
        &self,
        x: Self::View<'_>,
        w: Self::View<'_>,
        bias: Self::View<'_>,
        eps: f32,
        y: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        dim: usize,
    ) {
        self.call("layernorm_forward", |b| b.layernorm_forward(x, w, bias, eps, y, mean, rstd, dim))
    }
    fn layernorm_backward(
        &self,
        x: Self::View<'_>,
        w: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        dw: Self::ViewMut<'_>,
        db: Self::ViewMut<'_>,
        dim: usize,
    ) {
        self.call("layernorm_backward", |b| b.layernorm_backward(x, w, mean, rstd, dy, dx, dw, db, dim))
    }
    fn gelu_forward(&self, x: Self::View<'_>, y: Self::ViewMut<'_>) {
        self.call("gelu_forward", |b| b.gelu_forward(x, y))
    }
    fn gelu_forward_with_grad(&self, x: Self::View<'_>, y: Self::ViewMut<'_>, dydx: Self::ViewMut<'_>) {
        self.call("gelu_forward_with_grad", |b| b.gelu_forward_with_grad(x, y, dydx))
    }
    fn gelu_backward_in_place(&self, x: Self::View<'_>, d: Self::ViewMut<'_>) {
        self.call("gelu_backward_in_place", |b| b.gelu_backward_in_place(x, d))
    }
    fn relu_forward(&self, x: Self::View<'_>, y: Self::ViewMut<'_>) {
        self.call("relu_forward", |b| b.relu_forward(x, y))
    }
    fn relu_backward(&self, x: Self::View<'_>, dy: Self::View<'_>, dx: Self::ViewMut<'_>) {
        self.call("relu_backward", |b| b.relu_backward(x, dy, dx))
    }
    fn mul_in_place(&self, x: Self::ViewMut<'_>, m: Self::View<'_>) {
        self.call("mul_in_place", |b| b.mul_in_place(x, m))
    }
    fn add_in_place(&self, y: Self::ViewMut<'_>, x: Self::View<'_>) {
        self.call("add_in_place", |b| b.add_in_place(y, x))
    }
    fn scale(&self, x: Self::View<'_>, s: f32, y: Self::ViewMut<'_>) {
        self.call("scale", |b| b.scale(x, s, y))
    }
    fn add_to_rows(&self, y: Self::ViewMut<'_>, x: Self::View<'_>) {
        self.call("add_to_rows", |b| b.add_to_rows(y, x))
    }
    fn sum_rows_into(&self, acc: Self::ViewMut<'_>, x: Self::View<'_>) {
        self.call("sum_rows_into", |b| b.sum_rows_into(acc, x))
    }
    fn masked<'a>(&self, x: Self::View<'a>, mask: Option<Self::View<'a>>, buf: &'a mut Self::Buf) -> Self::View<'a> {
        self.gate("masked");
        self.inner.masked(x, mask, buf)
    }
    fn dropout_mask(&self, rng: &mut Rng, p: f32, buf: &mut Self::Buf, n: usize) {
        self.call("dropout_mask", |b| b.dropout_mask(rng, p, buf, n))
    }
    fn attention_forward(
        &self,
        s: &AttnShape,
        scale: f32,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        ld: usize,
        mask: Self::View<'_>,
        drop: Option<Self::View<'_>>,
        probs: Self::ViewMut<'_>,
        out: Self::ViewMut<'_>,
    ) {
        self.call("attention_forward", |b| b.attention_forward(s, scale, q, k, v, ld, mask, drop, probs, out))
    }
    fn attention_backward_rows(
        &self,
        s: &AttnShape,
        scale: f32,
        qkv: Self::View<'_>,
        ld: usize,
        probs: Self::View<'_>,
        drop: Option<Self::View<'_>>,
        dout: Self::View<'_>,
        ld_dout: usize,
        dqkv: Self::ViewMut<'_>,
        ld_dqkv: usize,
    ) {
        self.call("attention_backward_rows", |b| b.attention_backward_rows(s, scale, qkv, ld, probs, drop, dout, ld_dout, dqkv, ld_dqkv))
    }
    fn attention_backward_rows_split(
        &self,
        s: &AttnShape,
        scale: f32,
        qkv: [Self::View<'_>; 3],
        ld: usize,
        probs: Self::View<'_>,
        drop: Option<Self::View<'_>>,
        dout: Self::View<'_>,
        ld_dout: usize,
        dqkv: [Self::ViewMut<'_>; 3],
        ld_d: usize,
    ) {
        self.call("attention_backward_rows_split", |b| {
            b.attention_backward_rows_split(s, scale, qkv, ld, probs, drop, dout, ld_dout, dqkv, ld_d)
        })
    }
    fn merge_heads(&self, src: Self::View<'_>, dst: Self::ViewMut<'_>, ld: usize, batch: usize, heads: usize, seq: usize, hd: usize) {
        self.call("merge_heads", |b| b.merge_heads(src, dst, ld, batch, heads, seq, hd))
    }
    fn embedding_forward(&self, ids: &[i64], table: Self::View<'_>, dim: usize, out: Self::ViewMut<'_>) {
        self.call("embedding_forward", |b| b.embedding_forward(ids, table, dim, out))
    }
    fn embedding_backward(&self, ids: &[i64], dout: Self::View<'_>, dim: usize, dtable: Self::ViewMut<'_>) {
        self.call("embedding_backward", |b| b.embedding_backward(ids, dout, dim, dtable))
    }
    fn embedding_backward_rows(
        &self,
        ids: &[i64],
        skip: usize,
        rows: &[usize],
        dout: Self::View<'_>,
        dim: usize,
        grad_rows: Self::ViewMut<'_>,
    ) {
        self.call("embedding_backward_rows", |b| b.embedding_backward_rows(ids, skip, rows, dout, dim, grad_rows))
    }
    fn video_tokens_forward(
        &self,
        t: TokenDims,
        cls: Self::View<'_>,
        pos0: Self::View<'_>,
        temporal: Self::View<'_>,
        region_emb: Self::View<'_>,
        x: Self::ViewMut<'_>,
    ) {
        self.call("video_tokens_forward", |b| b.video_tokens_forward(t, cls, pos0, temporal, region_emb, x))
    }
    fn video_tokens_backward(
        &self,
        t: TokenDims,
        dx: Self::View<'_>,
        grad: Self::ViewMut<'_>,
        cls: Range<usize>,
        pos0: Range<usize>,
        temporal: Range<usize>,
        d_region: Self::ViewMut<'_>,
    ) {
        self.call("video_tokens_backward", |b| b.video_tokens_backward(t, dx, grad, cls, pos0, temporal, d_region))
    }
    fn max_over_positions(&self, x: Self::View<'_>, arg: Self::ViewMut<'_>, out: Self::ViewMut<'_>, batch: usize, len: usize, dim: usize) {
        self.call("max_over_positions", |b| b.max_over_positions(x, arg, out, batch, len, dim))
    }
    fn max_over_positions_backward(
        &self,
        dout: Self::View<'_>,
        arg: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        batch: usize,
        len: usize,
        dim: usize,
    ) {
        self.call("max_over_positions_backward", |b| b.max_over_positions_backward(dout, arg, dx, batch, len, dim))
    }
    fn weight_norm(&self, g: Self::View<'_>, v: Self::View<'_>, w: Self::ViewMut<'_>) {
        self.call("weight_norm", |b| b.weight_norm(g, v, w))
    }
    fn weight_norm_backward(&self, g: Self::View<'_>, v: Self::View<'_>, dw: Self::View<'_>, dg: Self::ViewMut<'_>, dv: Self::ViewMut<'_>) {
        self.call("weight_norm_backward", |b| b.weight_norm_backward(g, v, dw, dg, dv))
    }
    fn mul_broadcast(&self, x: Self::View<'_>, y: Self::View<'_>, out: Self::ViewMut<'_>, batch: usize, n: usize, h: usize) {
        self.call("mul_broadcast", |b| b.mul_broadcast(x, y, out, batch, n, h))
    }
    fn mul_broadcast_backward(
        &self,
        x: Self::View<'_>,
        y: Self::View<'_>,
        dout: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        dy: Self::ViewMut<'_>,
        batch: usize,
        n: usize,
        h: usize,
    ) {
        self.call("mul_broadcast_backward", |b| b.mul_broadcast_backward(x, y, dout, dx, dy, batch, n, h))
    }
    fn softmax_rows(&self, x: Self::View<'_>, y: Self::ViewMut<'_>, n: usize) {
        self.call("softmax_rows", |b| b.softmax_rows(x, y, n))
    }
    fn softmax_rows_backward(&self, y: Self::View<'_>, dy: Self::View<'_>, dx: Self::ViewMut<'_>, n: usize) {
        self.call("softmax_rows_backward", |b| b.softmax_rows_backward(y, dy, dx, n))
    }
    fn weighted_sum(&self, w: Self::View<'_>, o: Self::View<'_>, out: Self::ViewMut<'_>, batch: usize, n: usize, dim: usize) {
        self.call("weighted_sum", |b| b.weighted_sum(w, o, out, batch, n, dim))
    }
    fn weighted_sum_backward(
        &self,
        w: Self::View<'_>,
        o: Self::View<'_>,
        dout: Self::View<'_>,
        dw: Self::ViewMut<'_>,
        d_o: Self::ViewMut<'_>,
        batch: usize,
        n: usize,
        dim: usize,
    ) {
        self.call("weighted_sum_backward", |b| b.weighted_sum_backward(w, o, dout, dw, d_o, batch, n, dim))
    }
    fn cross_entropy(&self, logits: Self::View<'_>, labels: &[usize], answers: usize, d: &mut Self::Buf) -> f32 {
        self.call("cross_entropy", |b| b.cross_entropy(logits, labels, answers, d))
    }
    fn losses(&self, cfg: &LossConfig, x: &LossViews<'_, Self>, use_local: bool, grads: bool) -> (LossOutputs, Option<LossGradBufs<Self>>) {
        self.gate("losses");
        let y = LossViews::<B> {
            dims: x.dims,
            global_text: x.global_text,
            global_video: x.global_video,
            local_text: x.local_text,
            local_video: x.local_video,
            text_mask: x.text_mask,
            video_mask: x.video_mask,
        };
        let (o, g) = self.inner.losses(cfg, &y, use_local, grads);
        let g = g.map(|g| LossGradBufs {
            global_text: g.global_text,
            global_video: g.global_video,
            local_text: g.local_text,
            local_video: g.local_video,
        });
        (o, g)
    }
    fn adamw_update(&self, c: &StepCoeffs, p: Self::ViewMut<'_>, g: Self::View<'_>, m: Self::ViewMut<'_>, v: Self::ViewMut<'_>) {
        self.call("adamw_update", |b| b.adamw_update(c, p, g, m, v))
    }
    fn adamw_update_table_rows(
        &self,
        c: &StepCoeffs,
        p: Self::ViewMut<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        dim: usize,
        ids: &[usize],
        grad_rows: Self::View<'_>,
    ) {
        self.call("adamw_update_table_rows", |b| b.adamw_update_table_rows(c, p, m, v, dim, ids, grad_rows))
    }
}
