//! The device seam: every kernel the model runs, and every buffer it holds, goes through one
//! [`Backend`]. The model code (towers, heads, losses, AdamW) is generic over it; [`Cpu`]
//! implements it with today's `demovlp_kernels` (owned buffers are `Vec<f32>`, views are
//! `&[f32]` / `&mut [f32]`: monomorphised, the same calls as before, no cost).
//!
//! # What a backend must provide
//!
//! A checklist for a new implementation (e.g. CUDA: cudarc buffers, cuBLASLt GEMMs,
//! NVRTC-compiled elementwise kernels, fp32 master weights with bf16 GEMM inputs — the
//! `demovlp-cuda` crate, behind its `cuda` feature):
//!
//! - **Memory.** An owned buffer [`Backend::Buf`] of `f32` (parameters, gradients, AdamW
//!   moments, every activation), shared and mutable views of element ranges of it
//!   ([`Backend::View`] must be `Copy`; [`Backend::ViewMut`] is reborrowed with
//!   [`Backend::reborrow`]), disjoint splits ([`Backend::split_at_mut`]), [`Backend::fit`]
//!   (resize keeping the allocation: the arenas rely on a steady stream of same-shaped
//!   batches allocating nothing), fills and copies, including the strided 2-D copy
//!   [`Backend::copy_2d`] that gathers embeddings for the losses and scatters their gradients.
//! - **Host transfers, at batch boundaries only.** [`Backend::input`] (a host input:
//!   zero-copy on the CPU, one upload on a device; [`Backend::input_again`] for the same
//!   values later in the step), [`Backend::input_batch`] (a batch's region features, into
//!   the buffers of a [`StagingPair`] in turn, so that a device may upload them while the
//!   previous batch computes), [`Backend::read_late`] (a read-back waited for only when the
//!   values are needed: a step's losses, kept on the device by [`Backend::losses_late`] /
//!   [`Backend::cross_entropy_late`], read after the next step is queued), [`Backend::write_host`] (masks,
//!   initial weights: the closure fills host memory that then lands in the buffer),
//!   [`Backend::to_host`] / [`Backend::read_host`] (embeddings, checkpoints). Token ids and dropout
//!   generators stay on the host and are passed as host values: a device backend uploads
//!   the ids, and draws the dropout masks from the given [`Rng`] (on the host, or on the
//!   device from its state; either way the masks must be the ones
//!   [`dropout_mask`](demovlp_kernels::dropout::dropout_mask) draws and the generator must
//!   end where that leaves it, for runs to be reproducible across backends).
//! - **Kernels**, one method each, with the semantics of the `demovlp_kernels` function of
//!   the same name: linear forward (bias folded in) and backward ([`Grads`] says whether the
//!   parameter gradients are `=` or `+=`), `dy·W` alone, LayerNorm forward/backward, GELU
//!   forward / with its derivative / backward in place, ReLU forward/backward, elementwise
//!   product and sum, broadcast row adds and row sums, dropout masks, attention forward
//!   (head-major output) and backward on token rows (fused qkv, or split q/k/v), head merge,
//!   embedding lookup and its backward (dense, or by table row), the video token assembly
//!   and its backward, the task heads' small kernels (max over positions with its
//!   argmax, weight normalisation, broadcast product, row softmax, attention pooling,
//!   cross-entropy; host versions in [`host`]), the retrieval losses (forward, and forward + backward on the
//!   embeddings), and the AdamW update of a run of elements and of a table by gradient rows
//!   (the per-element arithmetic is [`StepCoeffs`]'s).
//! - **Trait bounds.** A backend value is a cheap handle (`Clone`; a device backend shares
//!   its context, streams and handles behind it), `Default` gives the default device, and it
//!   is `Send + Sync + 'static`. `Buf: Clone` is a deep copy (models are cloned in tests).
//!
//! Precision is the backend's business behind these signatures: buffers hold f32 values
//! (the master weights, moments and gradients stay f32), and a GPU backend may run its
//! GEMMs on bf16 copies of weights and activations (it updates the weights itself, in
//! [`Backend::adamw_update`], so it knows when a cached bf16 copy goes stale), as long as
//! [`check::compare_with_cpu`] holds at the tolerance it claims, and
//! [`kernels_check::compare_kernels_with_cpu`] gives each kernel its own verdict.
//!
//! What the model still does on the host: token ids, masks (built on the host, then
//! [`Backend::write_host`]), dropout masks' random draws, the losses' scalar outputs and
//! similarity matrices ([`LossOutputs`]), evaluation embeddings (read back once per batch),
//! and weights I/O ([`crate::io`] reads and writes `Params<Cpu>`; [`crate::Params::to_backend`]
//! moves them). A batch's region features go up once per training step: the forward pass
//! stages them with [`Backend::input_batch`], the backward pass reuses them with
//! [`Backend::input_batch_again`]. A training step reads nothing back: its losses stay on
//! the device until the loop reads them, one step later ([`Backend::read_late`]).
//!
//! [`sim::SimDevice`] is a simulated device for tests: host memory reachable only through
//! the transfer methods, NaN wherever a GPU's memory would be unspecified, the CPU's
//! kernels (bit for bit), and counters of bytes moved, synchronisations and allocations.
//!
//! # Conventions
//!
//! - Row-major; weights in PyTorch's `[out, in]` layout; `ld*` arguments are stored row
//!   lengths (a column block of a wider matrix is used in place).
//! - Backward kernels accumulate (`+=`) into input gradients; parameter gradients follow
//!   [`Grads`] (`Overwrite` buffers hold stale values that must not be read); the attention
//!   backward overwrites dq, dk, dv.
//! - No kernel's output aliases one of its inputs unless the method says "in place".
//! - Bit-for-bit reproducibility is the CPU backend's contract (the tests compare fused and
//!   unfused steps, recompute and keep, bit for bit); another backend is compared with it
//!   to a tolerance ([`check`] holds the comparison a second backend can reuse).

#![allow(clippy::too_many_arguments)] // kernel signatures mirror demovlp_kernels' functions

pub mod check;
mod cpu;
pub mod host;
pub mod kernels_check;
pub mod sim;
mod transfer;

pub use cpu::Cpu;
pub use transfer::{LateRead, StagingPair};

use demovlp_kernels::attention::AttnShape;
pub use demovlp_kernels::linear::Grads;
use demovlp_kernels::Rng;
use demovlp_retrieval::{EmbeddingSet, EvalOptions, LossConfig, LossOutputs};
use std::fmt::Debug;
use std::ops::Range;

use crate::adamw::StepCoeffs;

/// Sizes of the retrieval losses' inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossDims {
    pub batch: usize,
    pub words: usize,
    pub regions: usize,
    pub dim: usize,
}

/// The losses' inputs as views of one backend (see [`demovlp_retrieval::LossInputs`]).
pub struct LossViews<'a, B: Backend> {
    pub dims: LossDims,
    /// `[B, P]`
    pub global_text: B::View<'a>,
    /// `[B, P]`
    pub global_video: B::View<'a>,
    /// `[B, W, P]`
    pub local_text: B::View<'a>,
    /// `[B, N, P]`
    pub local_video: B::View<'a>,
    /// `[B, W]`, additive
    pub text_mask: B::View<'a>,
    /// `[B, N]`, additive
    pub video_mask: B::View<'a>,
}

/// The losses' gradients on their four embedding inputs (layouts of [`LossViews`]).
#[derive(Clone, Debug, Default)]
pub struct LossGradBufs<B: Backend> {
    pub global_text: B::Buf,
    pub global_video: B::Buf,
    pub local_text: B::Buf,
    pub local_video: B::Buf,
}

/// Sizes of the video token assembly: `batch` clips of `frames` × `regions` region tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenDims {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    pub dim: usize,
}

/// One compute device: its buffers and every kernel the model calls. See the module docs
/// for what an implementation must provide.
pub trait Backend: Clone + Debug + Default + Send + Sync + 'static {
    /// An owned buffer of `f32` on the device.
    type Buf: Clone + Debug + Default + Send + Sync + 'static;
    /// A shared view of a range of a buffer.
    type View<'a>: Copy + Send + Sync;
    /// A mutable view of a range of a buffer.
    type ViewMut<'a>: Send;

    // ---- memory -------------------------------------------------------------------------

    fn buf_len(b: &Self::Buf) -> usize;
    fn view_len(v: Self::View<'_>) -> usize;
    fn view_mut_len(v: &Self::ViewMut<'_>) -> usize;
    /// A buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// Resizes `b` to `n` values, reusing its allocation when it is big enough (new
    /// elements are unspecified).
    fn fit(&self, b: &mut Self::Buf, n: usize);
    fn view(b: &Self::Buf) -> Self::View<'_>;
    fn view_mut(b: &mut Self::Buf) -> Self::ViewMut<'_>;
    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a>;
    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a>;
    fn reborrow<'b>(v: &'b mut Self::ViewMut<'_>) -> Self::ViewMut<'b>;
    fn as_view<'b>(v: &'b Self::ViewMut<'_>) -> Self::View<'b>;
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, at: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>);
    /// Sets every value to 0 (in parallel chunks when long, on the CPU).
    fn fill_zero(&self, v: Self::ViewMut<'_>);
    /// dst = src (same lengths).
    fn copy(&self, src: Self::View<'_>, dst: Self::ViewMut<'_>);
    /// `rows` runs of `cols` values: `dst[d0 + i·dld ..][..cols] = src[s0 + i·sld ..][..cols]`.
    fn copy_2d(&self, src: Self::View<'_>, s0: usize, sld: usize, dst: Self::ViewMut<'_>, d0: usize, dld: usize, rows: usize, cols: usize);

    // ---- host transfers ------------------------------------------------------------------

    /// A host input as a view for one batch: the host slice itself on the CPU, else
    /// uploaded into `staging`.
    fn input<'a>(&self, host: &'a [f32], staging: &'a mut Self::Buf) -> Self::View<'a>;
    /// The view [`Backend::input`] gave for the same `host` values into `staging`, again
    /// (`staging` untouched since, e.g. the backward pass of the batch the forward staged):
    /// the host slice itself on the CPU, the values already staged on a device (no second
    /// upload). The default stages them again.
    fn input_again<'a>(&self, host: &'a [f32], staging: &'a mut Self::Buf) -> Self::View<'a> {
        self.input(host, staging)
    }
    /// A batch's host input (its region features) staged into the next buffer of `pair`
    /// (the one the previous batch did not use), as [`Backend::input`]: a device may upload
    /// it while the previous batch's work still runs (CUDA: from pinned host memory, on a
    /// copy stream the compute stream waits for). The default is [`Backend::input`] into
    /// that buffer.
    fn input_batch<'a>(&self, host: &'a [f32], pair: &'a mut StagingPair<Self>) -> Self::View<'a> {
        self.input(host, pair.advance().0)
    }
    /// [`Backend::input_again`] of the batch [`Backend::input_batch`] staged last.
    fn input_batch_again<'a>(&self, host: &'a [f32], pair: &'a mut StagingPair<Self>) -> Self::View<'a> {
        self.input_again(host, pair.split().0)
    }
    /// Fits `b` to `n` values and lets `f` write them on the host (in place on the CPU).
    fn write_host(&self, b: &mut Self::Buf, n: usize, f: impl FnOnce(&mut [f32]));
    /// Lets `f` modify elements `r` of `b` on the host (in place on the CPU).
    fn modify_host(&self, b: &mut Self::Buf, r: Range<usize>, f: impl FnOnce(&mut [f32]));
    /// A view's values, on the host.
    fn to_host(&self, v: Self::View<'_>) -> Vec<f32>;
    /// Lets `f` read a view's values on the host (no copy on the CPU).
    fn read_host<R>(&self, v: Self::View<'_>, f: impl FnOnce(&[f32]) -> R) -> R;
    /// Queues a read-back of `v`: the values it holds once the work queued so far has run,
    /// returned by [`LateRead::wait`] when the host needs them (a device synchronises only
    /// then). A training step's loss scalars are read so, after the next step was queued.
    /// The default reads at once.
    fn read_late(&self, v: Self::View<'_>) -> LateRead {
        LateRead::ready(self.to_host(v))
    }

    // ---- dense layers --------------------------------------------------------------------

    /// y[n, dout] = x[n, din] (rows `ldx` apart) · wᵀ + b.
    fn linear_forward(
        &self,
        x: Self::View<'_>,
        ldx: usize,
        w: Self::View<'_>,
        b: Option<Self::View<'_>>,
        y: Self::ViewMut<'_>,
        n: usize,
        din: usize,
        dout: usize,
    );
    /// dx += dy·W (when given); dW, db (+)= as `grads` says.
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
    );
    /// dx[n, din] = dy[n, dout] · w[dout, din], overwriting `dx`.
    fn linear_backward_input(&self, dy: Self::View<'_>, w: Self::View<'_>, dx: Self::ViewMut<'_>, n: usize, din: usize, dout: usize);
    fn layernorm_forward(
        &self,
        x: Self::View<'_>,
        w: Self::View<'_>,
        b: Self::View<'_>,
        eps: f32,
        y: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        dim: usize,
    );
    /// dx += ∂/∂x; dw, db accumulate.
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
    );

    // ---- elementwise ---------------------------------------------------------------------

    fn gelu_forward(&self, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// y = gelu(x), dydx = gelu'(x) in one pass.
    fn gelu_forward_with_grad(&self, x: Self::View<'_>, y: Self::ViewMut<'_>, dydx: Self::ViewMut<'_>);
    /// d ⊙= gelu'(x), in place.
    fn gelu_backward_in_place(&self, x: Self::View<'_>, d: Self::ViewMut<'_>);
    fn relu_forward(&self, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// `dx += dy·(x > 0)`.
    fn relu_backward(&self, x: Self::View<'_>, dy: Self::View<'_>, dx: Self::ViewMut<'_>);
    /// x ⊙= m, in place.
    fn mul_in_place(&self, x: Self::ViewMut<'_>, m: Self::View<'_>);
    /// y += x, in place.
    fn add_in_place(&self, y: Self::ViewMut<'_>, x: Self::View<'_>);
    /// `y[i] = x[i] · s` (one f32 product per element: accumulated gradients scaled by
    /// 1 / parts).
    fn scale(&self, x: Self::View<'_>, s: f32, y: Self::ViewMut<'_>);
    /// `y[i] += x[i mod len(x)]`: `x` added to every run of len(x) values of `y`.
    fn add_to_rows(&self, y: Self::ViewMut<'_>, x: Self::View<'_>);
    /// acc += each run of len(acc) values of `x`, runs in order.
    fn sum_rows_into(&self, acc: Self::ViewMut<'_>, x: Self::View<'_>);
    /// `x ⊙ mask` in `buf` when a mask is given, else `x` itself.
    fn masked<'a>(&self, x: Self::View<'a>, mask: Option<Self::View<'a>>, buf: &'a mut Self::Buf) -> Self::View<'a>;
    /// Fits `b` to `n` values and draws an inverted-dropout mask (0 with probability p, else 1/(1−p)).
    fn dropout_mask(&self, rng: &mut Rng, p: f32, b: &mut Self::Buf, n: usize);

    // ---- attention -----------------------------------------------------------------------

    /// Probabilities and head-major output `[B, H, seq, hd]` (see `demovlp_kernels::attention`).
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
    );
    /// d(out) rows `ld_dout` wide; dq | dk | dv written into rows `ld_dqkv` wide (overwritten).
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
    );
    /// Separate q, k, v (rows `ld` wide) and dq, dk, dv (rows `ld_d` wide, overwritten).
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
    );
    /// Head-major `[B, H, seq, hd]` to token rows `ld` wide.
    fn merge_heads(&self, src: Self::View<'_>, dst: Self::ViewMut<'_>, ld: usize, batch: usize, heads: usize, seq: usize, hd: usize);

    // ---- embeddings ----------------------------------------------------------------------

    /// `out[i] = table[ids[i]]` (rows of `dim`).
    fn embedding_forward(&self, ids: &[i64], table: Self::View<'_>, dim: usize, out: Self::ViewMut<'_>);
    /// `dtable[ids[i]] += dout[i]`.
    fn embedding_backward(&self, ids: &[i64], dout: Self::View<'_>, dim: usize, dtable: Self::ViewMut<'_>);
    /// The same by table row: `rows` (increasing) are the distinct ids other than `skip`;
    /// `grad_rows` `[rows.len(), dim]` (zeroed first) `+= dout[i]` at the row of `ids[i]`, tokens in order.
    fn embedding_backward_rows(
        &self,
        ids: &[i64],
        skip: usize,
        rows: &[usize],
        dout: Self::View<'_>,
        dim: usize,
        grad_rows: Self::ViewMut<'_>,
    );
    /// Video tokens `[B, 1 + F·R, D]`: CLS row `cls + pos0`, region row j of a clip `region_emb[j] + temporal[j / R]`.
    fn video_tokens_forward(
        &self,
        t: TokenDims,
        cls: Self::View<'_>,
        pos0: Self::View<'_>,
        temporal: Self::View<'_>,
        region_emb: Self::View<'_>,
        x: Self::ViewMut<'_>,
    );
    /// Backward of [`Backend::video_tokens_forward`] from d(tokens) `dx`: elements `cls`,
    /// `pos0`, `temporal` of `grad` accumulate (clips in order, regions in order), d(region_emb) is overwritten.
    fn video_tokens_backward(
        &self,
        t: TokenDims,
        dx: Self::View<'_>,
        grad: Self::ViewMut<'_>,
        cls: Range<usize>,
        pos0: Range<usize>,
        temporal: Range<usize>,
        d_region: Self::ViewMut<'_>,
    );

    // ---- task heads (the QA head; host semantics in [`host`]) -----------------------------

    /// `out [B, dim]` = max over the `len` positions of `x [B, len, dim]`; `arg [B, dim]` the
    /// winning position as an f32 (the first maximum wins).
    fn max_over_positions(&self, x: Self::View<'_>, arg: Self::ViewMut<'_>, out: Self::ViewMut<'_>, batch: usize, len: usize, dim: usize);
    /// `dx [B, len, dim]` overwritten: `dout` at the winning positions, 0 elsewhere.
    fn max_over_positions_backward(
        &self,
        dout: Self::View<'_>,
        arg: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        batch: usize,
        len: usize,
        dim: usize,
    );
    /// `w = g · v / ‖v‖_F` (`g` one value; the norm and scale in f64).
    fn weight_norm(&self, g: Self::View<'_>, v: Self::View<'_>, w: Self::ViewMut<'_>);
    /// From `dw`: `dg`, `dv` accumulate (see [`host::weight_norm_backward`]).
    fn weight_norm_backward(&self, g: Self::View<'_>, v: Self::View<'_>, dw: Self::View<'_>, dg: Self::ViewMut<'_>, dv: Self::ViewMut<'_>);
    /// `out[b, n, :] = x[b, n, :] ⊙ y[b, :]`.
    fn mul_broadcast(&self, x: Self::View<'_>, y: Self::View<'_>, out: Self::ViewMut<'_>, batch: usize, n: usize, h: usize);
    /// `dx = dout ⊙ y` (overwritten), `dy[b] += Σ_n dout[b, n] ⊙ x[b, n]`.
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
    );
    /// Softmax of each run of `n` values.
    fn softmax_rows(&self, x: Self::View<'_>, y: Self::ViewMut<'_>, n: usize);
    /// From the softmax output `y`: `dx = y ⊙ (dy − ⟨y, dy⟩)` per run of `n` (overwritten).
    fn softmax_rows_backward(&self, y: Self::View<'_>, dy: Self::View<'_>, dx: Self::ViewMut<'_>, n: usize);
    /// `out[b] = Σ_n w[b, n] · o[b, n, :]` (overwritten).
    fn weighted_sum(&self, w: Self::View<'_>, o: Self::View<'_>, out: Self::ViewMut<'_>, batch: usize, n: usize, dim: usize);
    /// `dw[b, n] = ⟨o[b, n], dout[b]⟩`, `d_o[b, n] = w[b, n] · dout[b]` (both overwritten).
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
    );
    /// Mean cross-entropy of `logits [labels.len(), answers]` (returned to the host) and
    /// d(loss)/d(logits) in `d` (fitted). Labels are host values.
    fn cross_entropy(&self, logits: Self::View<'_>, labels: &[usize], answers: usize, d: &mut Self::Buf) -> f32;
    /// [`Backend::cross_entropy`] leaving the loss on the device, in `loss` (fitted to 1
    /// value), for [`Backend::read_late`]: nothing is read back. The default reads it and
    /// writes it there.
    fn cross_entropy_late(&self, logits: Self::View<'_>, labels: &[usize], answers: usize, d: &mut Self::Buf, loss: &mut Self::Buf) {
        let l = self.cross_entropy(logits, labels, answers, d);
        self.write_host(loss, 1, |h| h[0] = l);
    }

    // ---- losses --------------------------------------------------------------------------

    /// The retrieval losses; with `grads`, also their gradients on the four embeddings.
    fn losses(&self, cfg: &LossConfig, x: &LossViews<'_, Self>, use_local: bool, grads: bool) -> (LossOutputs, Option<LossGradBufs<Self>>);
    /// [`Backend::losses`] with the gradients (when `grads` is given) written into buffers the
    /// caller keeps across steps (each fitted): a device allocates nothing per step. The
    /// default moves [`Backend::losses`]' new buffers in.
    fn losses_into(
        &self,
        cfg: &LossConfig,
        x: &LossViews<'_, Self>,
        use_local: bool,
        grads: Option<&mut LossGradBufs<Self>>,
    ) -> LossOutputs {
        let (out, g) = self.losses(cfg, x, use_local, grads.is_some());
        if let (Some(dst), Some(g)) = (grads, g) {
            *dst = g;
        }
        out
    }
    /// [`Backend::losses_into`] leaving the two loss scalars on the device, in `scalars`
    /// (fitted to 2: `[loss_global, loss_local]`, the latter 0 without `use_local`; the total
    /// is their sum, as [`LossOutputs::loss_total`]), for [`Backend::read_late`]: nothing is
    /// read back (no similarity matrices either). The default reads them and writes them there.
    fn losses_late(
        &self,
        cfg: &LossConfig,
        x: &LossViews<'_, Self>,
        use_local: bool,
        grads: Option<&mut LossGradBufs<Self>>,
        scalars: &mut Self::Buf,
    ) {
        let out = self.losses_into(cfg, x, use_local, grads);
        self.write_host(scalars, 2, |h| h.copy_from_slice(&[out.loss_global, out.loss_local]));
    }

    /// Evaluation scores `[T, V]` (rows = texts) of embeddings held on the host, with
    /// [`demovlp_retrieval::eval_scores_with`]'s semantics (`progress(done, total)` as it
    /// goes). The default is that CPU function; a device scores with its own kernels, so
    /// `eval`, validation inside a training run and search's re-rank all score where the
    /// model runs. `Err` is a device failure, in words.
    fn eval_scores(
        &self,
        texts: &EmbeddingSet,
        videos: &EmbeddingSet,
        opts: &EvalOptions,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<f32>, String> {
        Ok(demovlp_retrieval::eval_scores_with(texts, videos, opts, progress))
    }

    // ---- optimiser -----------------------------------------------------------------------

    /// One AdamW step of a run of elements: parameters `p`, gradients `g`, moments `m`, `v`.
    fn adamw_update(&self, c: &StepCoeffs, p: Self::ViewMut<'_>, g: Self::View<'_>, m: Self::ViewMut<'_>, v: Self::ViewMut<'_>);
    /// One AdamW step of a `[rows, dim]` table whose gradient is zero except on rows `ids`
    /// (increasing), given as `grad_rows` `[ids.len(), dim]`.
    fn adamw_update_table_rows(
        &self,
        c: &StepCoeffs,
        p: Self::ViewMut<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        dim: usize,
        ids: &[usize],
        grad_rows: Self::View<'_>,
    );
}

/// A resized buffer, zeroed: gradient accumulators.
pub fn zeroed<'a, B: Backend>(be: &B, b: &'a mut B::Buf, n: usize) -> B::ViewMut<'a> {
    be.fit(b, n);
    be.fill_zero(B::view_mut(b));
    B::view_mut(b)
}

/// Two disjoint mutable ranges of one view.
pub fn two_mut<'a, B: Backend>(v: B::ViewMut<'a>, a: Range<usize>, b: Range<usize>) -> (B::ViewMut<'a>, B::ViewMut<'a>) {
    assert!(a.end <= b.start || b.end <= a.start, "overlapping ranges {a:?} and {b:?}");
    if a.start < b.start {
        let (lo, hi) = B::split_at_mut(v, b.start);
        (B::slice_mut(lo, a), B::slice_mut(hi, 0..b.len()))
    } else {
        let (lo, hi) = B::split_at_mut(v, a.start);
        (B::slice_mut(hi, 0..a.len()), B::slice_mut(lo, b))
    }
}
