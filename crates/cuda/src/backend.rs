//! [`CudaBackend`]: the [`Backend`] trait on one NVIDIA GPU.
//!
//! - Buffers: raw device allocations ([`DevBuf`], stream-ordered `cuMemAllocAsync`), grown
//!   on demand and then reused (`fit` keeps the allocation), views are (pointer, length).
//! - GEMMs: cuBLASLt (module `lt`: compute type `CUBLAS_COMPUTE_32F`, i.e. no TF32, in the
//!   fp32 parity mode; bf16 inputs with fp32 accumulation and fp32 outputs in the bf16 speed
//!   mode: activations converted per call into a scratch buffer, weights' bf16 copies cached
//!   until a mutable view of their memory has been used ([`crate::weights16`]); one cached
//!   plan per shape),
//!   plain cuBLAS as the fallback (`cublasSgemm` with `CUBLAS_DEFAULT_MATH`, `cublasGemmEx`)
//!   for shapes cuBLASLt has no algorithm for, when it fails to start, or with
//!   `DEMOVLP_CUDA_GEMM=cublas`.
//! - Every other kernel: the NVRTC-compiled sources of `kernels/*.cu`, one stream.
//! - The retrieval losses on the device, fused (module `losses`, `kernels/losses.cu`): the
//!   global contrastive loss and the region-word alignment, forward and backward, with one
//!   read-back per call (the two loss scalars and the `[B, B]` similarity matrices of
//!   `LossOutputs`), none for a training step (`losses_late`: the scalars copied into a
//!   device buffer, read later with `read_late`); the evaluation scores likewise
//!   ([`CudaBackend::eval_scores`]).
//! - Transfers that overlap the work (module `transfer`): a batch's region features
//!   uploaded from pinned memory on a copy stream into the buffer of a `StagingPair` the
//!   previous batch does not use (`input_batch`), late reads into pinned memory waited
//!   for by event (`read_late`).
//! - Epilogues (module `lt`): in the bf16 mode (and wherever
//!   [`CudaBackend::set_epilogues`] turns them on) a linear layer's bias is added by its
//!   GEMM and, when its gradient is overwritten, its bias gradient reduced by the dW GEMM;
//!   where cuBLASLt has no algorithm for an epilogue the unfused kernels run.
//! - Dropout masks on the device from the given `Rng`'s state, exactly the CPU's masks
//!   (`crate::plan`: xoshiro256++ jumped ahead per thread by GF(2) matrix powers).
//! - On the host, through the seam: token ids and the QA cross-entropy (logits
//!   `[B, answers]` read back).
//! - Kernels are resolved once (`open`) and launched by a compile-time index
//!   ([`crate::kernel_index`]); the context is made current only when it is not (once per
//!   thread in the steady state).
//!
//! Errors of the driver or cuBLAS in a kernel call panic with the call named (the trait's
//! methods return nothing); opening the device ([`CudaBackend::open`]) returns them. Locks are
//! taken with [`crate::lock`] (a panic under one does not fail later calls); a buffer's `Drop`
//! never panics; [`CudaBackend::fault`] says when a sticky error has made the context unusable.
//! With `DEMOVLP_CUDA_SYNC=1` every launch and GEMM is synchronised, so an asynchronous error
//! names its kernel (otherwise errors name the last kernel queued).
//!
//! **Never run on a GPU yet**: this compiles and lints; its kernels compile with NVRTC for
//! sm_80/sm_90; the selftest against `Cpu` is what `scripts/gpu-check.sh` runs first.

mod mem;

use mem::{at, view, view_mut, Inner, F};
pub use mem::{DevBuf, DevView, DevViewMut};

use crate::Precision;
use demovlp_kernels::attention::AttnShape;
use demovlp_kernels::Rng;
use demovlp_model::adamw::StepCoeffs;
use demovlp_model::backend::{host, Backend, Grads, LateRead, LossGradBufs, LossViews, StagingPair, TokenDims};
use demovlp_retrieval::{LossConfig, LossOutputs};
use std::ffi::c_void;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// Blocks of 256 threads for `n` elements (grid-stride loops cover the rest).
fn blocks(n: usize) -> (u32, u32, u32) {
    crate::geometry::elementwise(n).grid
}
const T256: (u32, u32, u32) = (crate::geometry::ELEMENTWISE_THREADS, 1, 1);

/// Launches `$name` with the arguments' values (each must have the kernel parameter's type);
/// the kernel is looked up at compile time ([`crate::kernel_index`]).
macro_rules! launch {
    ($be:expr, $name:literal, $grid:expr, $block:expr, $shared:expr; $($arg:expr),* $(,)?) => {{
        const K: usize = $crate::kernel_index($name);
        $be.inner.launch(K, $grid, $block, $shared, &mut [$( &mut { $arg } as *mut _ as *mut c_void ),*])
    }};
}

/// The CUDA backend: a cheap handle (its context, stream, cuBLAS handle and kernels are shared).
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBackend({} {}, sm_{}{}, {:?})",
            self.inner.info.ordinal, self.inner.info.name, self.inner.info.capability.0, self.inner.info.capability.1, self.inner.precision
        )
    }
}

impl Default for CudaBackend {
    /// GPU 0 in fp32; panics when there is none (use [`CudaBackend::open`] to get an error).
    fn default() -> Self {
        CudaBackend::open(0, Precision::Fp32).unwrap_or_else(|e| panic!("{e}"))
    }
}

mod losses;
mod lt;
mod setup;
mod transfer;
use setup::regions_of;

impl Backend for CudaBackend {
    type Buf = DevBuf;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;

    fn buf_len(b: &DevBuf) -> usize {
        b.len
    }
    fn view_len(v: DevView<'_>) -> usize {
        v.len
    }
    fn view_mut_len(v: &DevViewMut<'_>) -> usize {
        v.len
    }
    fn zeros(&self, n: usize) -> DevBuf {
        let mut b = DevBuf::default();
        self.fit(&mut b, n);
        self.inner.zero(b.ptr, n);
        b
    }
    fn fit(&self, b: &mut DevBuf, n: usize) {
        self.inner.bind();
        if b.be.is_none() {
            b.be = Some(self.inner.clone());
        }
        // The caller may write any of it: cached bf16 copies of weights in it are stale.
        self.inner.invalidate16(b.ptr, b.cap);
        if n > b.cap {
            // Grow, keeping the values (as `Vec::resize` does), then reuse from here on.
            let ptr = self.inner.alloc(n * F as usize);
            self.inner.dtod(ptr, b.ptr, b.len * F as usize);
            self.inner.forget16(b.ptr, b.cap);
            self.inner.free(b.ptr);
            b.ptr = ptr;
            b.cap = n;
        }
        b.len = n;
    }
    fn view(b: &DevBuf) -> DevView<'_> {
        view(b.ptr, b.len)
    }
    fn view_mut(b: &mut DevBuf) -> DevViewMut<'_> {
        // Device memory is written through mutable views (and `&mut DevBuf` methods) only:
        // when one is dropped, the cached bf16 copies of weights in its range are stale
        // (crate::weights16). Slicing hands that duty to the narrower view.
        view_mut(b.ptr, b.len, b.be.as_deref())
    }
    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a> {
        assert!(r.start <= r.end && r.end <= v.len, "slice {r:?} of {} values", v.len);
        view(at(v.ptr, r.start), r.len())
    }
    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a> {
        assert!(r.start <= r.end && r.end <= v.len, "slice {r:?} of {} values", v.len);
        let mut v = v;
        let be = v.be.take();
        view_mut(at(v.ptr, r.start), r.len(), be)
    }
    fn reborrow<'b>(v: &'b mut DevViewMut<'_>) -> DevViewMut<'b> {
        view_mut(v.ptr, v.len, v.be)
    }
    fn as_view<'b>(v: &'b DevViewMut<'_>) -> DevView<'b> {
        view(v.ptr, v.len)
    }
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, at_: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        assert!(at_ <= v.len);
        let mut v = v;
        let be = v.be.take();
        (view_mut(v.ptr, at_, be), view_mut(at(v.ptr, at_), v.len - at_, be))
    }
    fn fill_zero(&self, v: DevViewMut<'_>) {
        self.inner.bind();
        self.inner.zero(v.ptr, v.len);
    }
    fn copy(&self, src: DevView<'_>, dst: DevViewMut<'_>) {
        assert_eq!(src.len, dst.len, "copy: lengths differ");
        self.inner.bind();
        self.inner.dtod(dst.ptr, src.ptr, src.len * F as usize);
    }
    fn copy_2d(&self, src: DevView<'_>, s0: usize, sld: usize, dst: DevViewMut<'_>, d0: usize, dld: usize, rows: usize, cols: usize) {
        if rows * cols == 0 {
            return;
        }
        assert!(s0 + (rows - 1) * sld + cols <= src.len && d0 + (rows - 1) * dld + cols <= dst.len, "copy_2d out of range");
        self.inner.bind();
        launch!(self, "copy_2d", blocks(rows * cols), T256, 0; at(src.ptr, s0), sld as i64, at(dst.ptr, d0), dld as i64, rows as i64, cols as i64);
    }

    fn input<'a>(&self, host: &'a [f32], staging: &'a mut DevBuf) -> DevView<'a> {
        self.fit(staging, host.len());
        self.inner.upload(staging.ptr, host);
        Self::view(staging)
    }
    fn input_batch<'a>(&self, host: &'a [f32], pair: &'a mut StagingPair<Self>) -> DevView<'a> {
        // Pinned memory, the copy stream, events (module `transfer`).
        self.upload_batch(host, pair)
    }
    fn read_late(&self, v: DevView<'_>) -> LateRead {
        self.queue_read(v)
    }
    fn input_again<'a>(&self, host: &'a [f32], staging: &'a mut DevBuf) -> DevView<'a> {
        // The forward pass uploaded these values into `staging`: the backward reuses them.
        assert_eq!(staging.len, host.len(), "input_again: the staging buffer holds another input");
        Self::view(staging)
    }
    fn write_host(&self, b: &mut DevBuf, n: usize, f: impl FnOnce(&mut [f32])) {
        let mut h = vec![0.0f32; n];
        f(&mut h);
        self.fit(b, n);
        self.inner.upload(b.ptr, &h);
    }
    fn modify_host(&self, b: &mut DevBuf, r: Range<usize>, f: impl FnOnce(&mut [f32])) {
        self.inner.bind();
        self.inner.invalidate16(b.ptr, b.cap);
        let v = Self::slice(Self::view(b), r);
        let mut h = self.host_of(v);
        f(&mut h);
        self.inner.upload(v.ptr, &h);
    }
    fn to_host(&self, v: DevView<'_>) -> Vec<f32> {
        self.inner.bind();
        self.host_of(v)
    }
    fn read_host<R>(&self, v: DevView<'_>, f: impl FnOnce(&[f32]) -> R) -> R {
        f(&self.to_host(v))
    }

    fn linear_forward(
        &self,
        x: DevView<'_>,
        ldx: usize,
        w: DevView<'_>,
        b: Option<DevView<'_>>,
        y: DevViewMut<'_>,
        n: usize,
        din: usize,
        dout: usize,
    ) {
        self.inner.bind();
        let precision = self.inner.precision;
        if let Some(b) = b.filter(|_| self.epilogues()) {
            // y = x·Wᵀ + b with the bias added by the GEMM (one value per row of yᵀ).
            let epi = (lt::Epilogue::Bias, b.ptr);
            if self.gemm_epilogue(precision, true, true, false, (dout, n, din), w.ptr, din, x.ptr, ldx, 0.0, y.ptr, dout, epi) {
                return;
            }
        }
        let beta = match b {
            Some(b) => {
                launch!(self, "set_rows", blocks(n * dout), T256, 0; y.ptr, b.ptr, (n * dout) as i64, dout as i64);
                1.0
            }
            None => 0.0,
        };
        // Row-major y = x·Wᵀ is column-major yᵀ = W(ᵀ of its column-major view)·xᵀ.
        self.gemm_in(self.inner.precision, true, true, false, dout, n, din, w.ptr, din, x.ptr, ldx, beta, y.ptr, dout);
    }
    fn linear_backward(
        &self,
        x: DevView<'_>,
        ldx: usize,
        w: DevView<'_>,
        dy: DevView<'_>,
        n: usize,
        din: usize,
        dout: usize,
        dx: Option<DevViewMut<'_>>,
        dw: DevViewMut<'_>,
        db: Option<DevViewMut<'_>>,
        grads: Grads,
    ) {
        self.inner.bind();
        if let Some(dx) = dx {
            self.gemm_in(self.inner.precision, true, false, false, din, n, dout, w.ptr, din, dy.ptr, dout, 1.0, dx.ptr, din);
        }
        let beta = if grads == Grads::Accumulate { 1.0 } else { 0.0 };
        if let Some(db) = db.as_ref().filter(|_| grads == Grads::Overwrite && self.epilogues()) {
            // dW and db (= the column sums of dy, overwritten) from one GEMM.
            let epi = (lt::Epilogue::BgradB, db.ptr);
            if self.gemm_epilogue(self.inner.precision, false, false, true, (din, dout, n), x.ptr, ldx, dy.ptr, dout, 0.0, dw.ptr, din, epi)
            {
                return;
            }
        }
        self.gemm(false, true, din, dout, n, x.ptr, ldx, dy.ptr, dout, beta, dw.ptr, din);
        if let Some(db) = db {
            if grads == Grads::Overwrite {
                self.inner.zero(db.ptr, dout);
            }
            self.column_sums(db.ptr, dy.ptr, n, dout);
        }
    }
    fn linear_backward_input(&self, dy: DevView<'_>, w: DevView<'_>, dx: DevViewMut<'_>, n: usize, din: usize, dout: usize) {
        self.inner.bind();
        self.gemm_in(self.inner.precision, true, false, false, din, n, dout, w.ptr, din, dy.ptr, dout, 0.0, dx.ptr, din);
    }
    fn layernorm_forward(
        &self,
        x: DevView<'_>,
        w: DevView<'_>,
        b: DevView<'_>,
        eps: f32,
        y: DevViewMut<'_>,
        mean: DevViewMut<'_>,
        rstd: DevViewMut<'_>,
        dim: usize,
    ) {
        let rows = x.len / dim;
        if rows == 0 {
            return;
        }
        self.inner.bind();
        let g = crate::geometry::layernorm_rows(rows);
        launch!(self, "layernorm_forward", g.grid, g.block, 0; x.ptr, w.ptr, b.ptr, eps, y.ptr, mean.ptr, rstd.ptr, rows as i64, dim as i32);
    }
    fn layernorm_backward(
        &self,
        x: DevView<'_>,
        w: DevView<'_>,
        mean: DevView<'_>,
        rstd: DevView<'_>,
        dy: DevView<'_>,
        dx: DevViewMut<'_>,
        dw: DevViewMut<'_>,
        db: DevViewMut<'_>,
        dim: usize,
    ) {
        let rows = x.len / dim;
        if rows == 0 {
            return;
        }
        self.inner.bind();
        let g = crate::geometry::layernorm_rows(rows);
        launch!(self, "layernorm_backward_dx", g.grid, g.block, 0; x.ptr, w.ptr, mean.ptr, rstd.ptr, dy.ptr, dx.ptr, rows as i64, dim as i32);
        // dw, db: two deterministic passes over many blocks (crate::geometry).
        let (chunk, chunks) = crate::geometry::col_chunks(rows);
        let g = crate::geometry::col_partial(rows, dim);
        let mut s = crate::lock(&self.inner.scratch);
        let pw = self.inner.grow(&mut s.partial, chunks * dim * F as usize);
        let pb = self.inner.grow(&mut s.partial2, chunks * dim * F as usize);
        launch!(self, "layernorm_dwdb_partial", g.grid, g.block, 0; x.ptr, mean.ptr, rstd.ptr, dy.ptr, rows as i64, dim as i32, chunk as i64, pw, pb);
        launch!(self, "col_sums_finish", blocks(dim), T256, 0; pw, chunks as i64, dim as i64, dw.ptr);
        launch!(self, "col_sums_finish", blocks(dim), T256, 0; pb, chunks as i64, dim as i64, db.ptr);
    }

    fn gelu_forward(&self, x: DevView<'_>, y: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "gelu_forward", blocks(x.len), T256, 0; x.ptr, y.ptr, x.len as i64);
    }
    fn gelu_forward_with_grad(&self, x: DevView<'_>, y: DevViewMut<'_>, dydx: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "gelu_forward_with_grad", blocks(x.len), T256, 0; x.ptr, y.ptr, dydx.ptr, x.len as i64);
    }
    fn gelu_backward_in_place(&self, x: DevView<'_>, d: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "gelu_backward_in_place", blocks(x.len), T256, 0; x.ptr, d.ptr, x.len as i64);
    }
    fn relu_forward(&self, x: DevView<'_>, y: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "relu_forward", blocks(x.len), T256, 0; x.ptr, y.ptr, x.len as i64);
    }
    fn relu_backward(&self, x: DevView<'_>, dy: DevView<'_>, dx: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "relu_backward", blocks(x.len), T256, 0; x.ptr, dy.ptr, dx.ptr, x.len as i64);
    }
    fn mul_in_place(&self, x: DevViewMut<'_>, m: DevView<'_>) {
        self.inner.bind();
        launch!(self, "mul_in_place", blocks(x.len), T256, 0; x.ptr, m.ptr, x.len as i64);
    }
    fn add_in_place(&self, y: DevViewMut<'_>, x: DevView<'_>) {
        self.inner.bind();
        launch!(self, "add_in_place", blocks(y.len), T256, 0; y.ptr, x.ptr, y.len as i64);
    }
    fn scale(&self, x: DevView<'_>, scale: f32, y: DevViewMut<'_>) {
        assert_eq!(x.len, y.len, "scale: lengths differ");
        self.inner.bind();
        launch!(self, "scale", blocks(y.len), T256, 0; x.ptr, scale, y.ptr, y.len as i64);
    }
    fn add_to_rows(&self, y: DevViewMut<'_>, x: DevView<'_>) {
        self.inner.bind();
        launch!(self, "add_to_rows", blocks(y.len), T256, 0; y.ptr, x.ptr, y.len as i64, x.len as i64);
    }
    fn sum_rows_into(&self, acc: DevViewMut<'_>, x: DevView<'_>) {
        self.inner.bind();
        let rows = x.len / acc.len.max(1);
        self.column_sums(acc.ptr, x.ptr, rows, acc.len);
    }
    fn masked<'a>(&self, x: DevView<'a>, mask: Option<DevView<'a>>, buf: &'a mut DevBuf) -> DevView<'a> {
        match mask {
            None => x,
            Some(m) => {
                self.fit(buf, x.len);
                launch!(self, "mul_into", blocks(x.len), T256, 0; x.ptr, m.ptr, buf.ptr, x.len as i64);
                Self::view(buf)
            }
        }
    }
    fn dropout_mask(&self, rng: &mut Rng, p: f32, b: &mut DevBuf, n: usize) {
        // Drawn on the device from the given generator's state, the CPU backend's masks bit
        // for bit (crate::plan: jump-ahead of xoshiro256++), then the host generator is
        // advanced past the n draws as the CPU's would be.
        assert!((0.0..1.0).contains(&p), "dropout probability {p} outside [0, 1)");
        self.fit(b, n);
        if n == 0 {
            return;
        }
        let s = rng.state();
        let (drop_p, keep) = (p, 1.0 / (1.0 - p));
        let table = self.inner.jumps;
        let threads = crate::plan::dropout_threads(n);
        launch!(self, "dropout_xoshiro", blocks(threads), T256, 0;
            s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64, table, crate::plan::DROPOUT_CHUNK_LOG2 as i32, n as i64, drop_p, keep, b.ptr);
        *rng = Rng::from_state(crate::plan::advance(s, n as u64));
    }

    fn attention_forward(
        &self,
        s: &AttnShape,
        scale: f32,
        q: DevView<'_>,
        k: DevView<'_>,
        v: DevView<'_>,
        ld: usize,
        mask: DevView<'_>,
        drop: Option<DevView<'_>>,
        probs: DevViewMut<'_>,
        out: DevViewMut<'_>,
    ) {
        self.inner.bind();
        let g = crate::geometry::attention_forward(s.batch, s.heads, s.seq);
        launch!(self, "attention_forward", g.grid, g.block, g.dynamic_shared;
            s.seq as i32, s.heads as i32, s.head_dim as i32, regions_of(s), scale, q.ptr, k.ptr, v.ptr, ld as i64, mask.ptr, drop.map_or(0, |d| d.ptr), probs.ptr, out.ptr);
    }
    fn attention_backward_rows(
        &self,
        s: &AttnShape,
        scale: f32,
        qkv: DevView<'_>,
        ld: usize,
        probs: DevView<'_>,
        drop: Option<DevView<'_>>,
        dout: DevView<'_>,
        ld_dout: usize,
        dqkv: DevViewMut<'_>,
        ld_dqkv: usize,
    ) {
        let d = s.heads * s.head_dim;
        let src = [qkv.ptr, at(qkv.ptr, d), at(qkv.ptr, 2 * d)];
        let dst = [dqkv.ptr, at(dqkv.ptr, d), at(dqkv.ptr, 2 * d)];
        self.attention_backward_ptrs(s, scale, src, ld, probs, drop, dout, ld_dout, dst, ld_dqkv);
    }
    fn attention_backward_rows_split(
        &self,
        s: &AttnShape,
        scale: f32,
        [q, k, v]: [DevView<'_>; 3],
        ld: usize,
        probs: DevView<'_>,
        drop: Option<DevView<'_>>,
        dout: DevView<'_>,
        ld_dout: usize,
        [dq, dk, dv]: [DevViewMut<'_>; 3],
        ld_d: usize,
    ) {
        self.attention_backward_ptrs(s, scale, [q.ptr, k.ptr, v.ptr], ld, probs, drop, dout, ld_dout, [dq.ptr, dk.ptr, dv.ptr], ld_d);
    }
    fn merge_heads(&self, src: DevView<'_>, dst: DevViewMut<'_>, ld: usize, batch: usize, heads: usize, seq: usize, hd: usize) {
        self.inner.bind();
        launch!(self, "merge_heads", blocks(batch * heads * seq * hd), T256, 0; src.ptr, dst.ptr, ld as i64, batch as i32, heads as i32, seq as i32, hd as i32);
    }

    fn embedding_forward(&self, ids: &[i64], table: DevView<'_>, dim: usize, out: DevViewMut<'_>) {
        let rows = table.len / dim.max(1);
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id as usize >= rows) {
            panic!("embedding: id {bad} outside a table of {rows} rows");
        }
        self.inner.bind();
        let mut s = crate::lock(&self.inner.scratch);
        let p = self.ids(&mut s, ids);
        launch!(self, "embedding_forward", blocks(ids.len() * dim), T256, 0; p, ids.len() as i64, table.ptr, dim as i64, out.ptr);
    }
    fn embedding_backward(&self, ids: &[i64], dout: DevView<'_>, dim: usize, dtable: DevViewMut<'_>) {
        self.inner.bind();
        let mut s = crate::lock(&self.inner.scratch);
        let p = self.ids(&mut s, ids);
        launch!(self, "embedding_backward", blocks(dim), T256, 0; p, ids.len() as i64, dout.ptr, dim as i64, dtable.ptr);
    }
    fn embedding_backward_rows(&self, ids: &[i64], skip: usize, rows: &[usize], dout: DevView<'_>, dim: usize, grad_rows: DevViewMut<'_>) {
        self.inner.bind();
        let row_of: Vec<i32> = ids
            .iter()
            .map(|&id| {
                if id as usize == skip {
                    -1
                } else {
                    rows.binary_search(&(id as usize)).expect("every id other than `skip` has a row") as i32
                }
            })
            .collect();
        self.inner.zero(grad_rows.ptr, grad_rows.len);
        let mut s = crate::lock(&self.inner.scratch);
        let p = self.rows(&mut s, &row_of);
        launch!(self, "embedding_backward_rows", blocks(dim), T256, 0; p, ids.len() as i64, dout.ptr, dim as i64, grad_rows.ptr);
    }
    fn video_tokens_forward(
        &self,
        t: TokenDims,
        cls: DevView<'_>,
        pos0: DevView<'_>,
        temporal: DevView<'_>,
        region_emb: DevView<'_>,
        x: DevViewMut<'_>,
    ) {
        self.inner.bind();
        let n = t.batch * (1 + t.frames * t.regions) * t.dim;
        launch!(self, "video_tokens_forward", blocks(n), T256, 0;
            t.batch as i32, t.frames as i32, t.regions as i32, t.dim as i64, cls.ptr, pos0.ptr, temporal.ptr, region_emb.ptr, x.ptr);
    }
    fn video_tokens_backward(
        &self,
        t: TokenDims,
        dx: DevView<'_>,
        grad: DevViewMut<'_>,
        cls: Range<usize>,
        pos0: Range<usize>,
        temporal: Range<usize>,
        d_region: DevViewMut<'_>,
    ) {
        self.inner.bind();
        assert!(cls.end <= grad.len && pos0.end <= grad.len && temporal.end <= grad.len);
        launch!(self, "video_tokens_backward_params", blocks((1 + t.frames) * t.dim), T256, 0;
            t.batch as i32, t.frames as i32, t.regions as i32, t.dim as i64, dx.ptr, at(grad.ptr, cls.start), at(grad.ptr, pos0.start), at(grad.ptr, temporal.start));
        launch!(self, "video_tokens_backward_regions", blocks(t.batch * t.frames * t.regions * t.dim), T256, 0;
            t.batch as i32, t.frames as i32, t.regions as i32, t.dim as i64, dx.ptr, d_region.ptr);
    }

    fn max_over_positions(&self, x: DevView<'_>, arg: DevViewMut<'_>, out: DevViewMut<'_>, batch: usize, len: usize, dim: usize) {
        self.inner.bind();
        launch!(self, "max_over_positions", blocks(batch * dim), T256, 0; x.ptr, arg.ptr, out.ptr, batch as i32, len as i32, dim as i32);
    }
    fn max_over_positions_backward(&self, dout: DevView<'_>, arg: DevView<'_>, dx: DevViewMut<'_>, batch: usize, len: usize, dim: usize) {
        self.inner.bind();
        self.inner.zero(dx.ptr, dx.len);
        launch!(self, "max_over_positions_backward", blocks(batch * dim), T256, 0; dout.ptr, arg.ptr, dx.ptr, batch as i32, len as i32, dim as i32);
    }
    fn weight_norm(&self, g: DevView<'_>, v: DevView<'_>, w: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "weight_norm", (1, 1, 1), T256, 0; g.ptr, v.ptr, w.ptr, v.len as i64);
    }
    fn weight_norm_backward(&self, g: DevView<'_>, v: DevView<'_>, dw: DevView<'_>, dg: DevViewMut<'_>, dv: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "weight_norm_backward", (1, 1, 1), T256, 0; g.ptr, v.ptr, dw.ptr, dg.ptr, dv.ptr, v.len as i64);
    }
    fn mul_broadcast(&self, x: DevView<'_>, y: DevView<'_>, out: DevViewMut<'_>, batch: usize, n: usize, h: usize) {
        self.inner.bind();
        launch!(self, "mul_broadcast", blocks(batch * n * h), T256, 0; x.ptr, y.ptr, out.ptr, batch as i32, n as i32, h as i32);
    }
    fn mul_broadcast_backward(
        &self,
        x: DevView<'_>,
        y: DevView<'_>,
        dout: DevView<'_>,
        dx: DevViewMut<'_>,
        dy: DevViewMut<'_>,
        batch: usize,
        n: usize,
        h: usize,
    ) {
        self.inner.bind();
        launch!(self, "mul_broadcast_backward", blocks(batch * h), T256, 0; x.ptr, y.ptr, dout.ptr, dx.ptr, dy.ptr, batch as i32, n as i32, h as i32);
    }
    fn softmax_rows(&self, x: DevView<'_>, y: DevViewMut<'_>, n: usize) {
        self.inner.bind();
        let rows = x.len / n.max(1);
        launch!(self, "softmax_rows", blocks(rows), T256, 0; x.ptr, y.ptr, rows as i64, n as i32);
    }
    fn softmax_rows_backward(&self, y: DevView<'_>, dy: DevView<'_>, dx: DevViewMut<'_>, n: usize) {
        self.inner.bind();
        let rows = y.len / n.max(1);
        launch!(self, "softmax_rows_backward", blocks(rows), T256, 0; y.ptr, dy.ptr, dx.ptr, rows as i64, n as i32);
    }
    fn weighted_sum(&self, w: DevView<'_>, o: DevView<'_>, out: DevViewMut<'_>, batch: usize, n: usize, dim: usize) {
        self.inner.bind();
        launch!(self, "weighted_sum", blocks(batch * dim), T256, 0; w.ptr, o.ptr, out.ptr, batch as i32, n as i32, dim as i32);
    }
    fn weighted_sum_backward(
        &self,
        w: DevView<'_>,
        o: DevView<'_>,
        dout: DevView<'_>,
        dw: DevViewMut<'_>,
        d_o: DevViewMut<'_>,
        batch: usize,
        n: usize,
        dim: usize,
    ) {
        self.inner.bind();
        launch!(self, "weighted_sum_backward_w", blocks(batch * n), T256, 0; o.ptr, dout.ptr, dw.ptr, batch as i32, n as i32, dim as i32);
        launch!(self, "weighted_sum_backward_o", blocks(batch * n * dim), T256, 0; w.ptr, dout.ptr, d_o.ptr, batch as i32, n as i32, dim as i32);
    }
    fn cross_entropy(&self, logits: DevView<'_>, labels: &[usize], answers: usize, d: &mut DevBuf) -> f32 {
        // On the host: [B, answers] values, once per step.
        let l = self.to_host(logits);
        let mut dh = vec![0.0f32; labels.len() * answers];
        let loss = host::cross_entropy(&l, labels, answers, &mut dh);
        self.fit(d, dh.len());
        self.inner.upload(d.ptr, &dh);
        loss
    }

    fn losses(&self, cfg: &LossConfig, x: &LossViews<'_, Self>, use_local: bool, grads: bool) -> (LossOutputs, Option<LossGradBufs<Self>>) {
        // On the device, fused (kernels/losses.cu): one read-back of the loss scalars and
        // the two [B, B] similarity matrices; the gradients stay on the device.
        self.losses_on_device(cfg, x, use_local, grads, None)
    }
    fn losses_late(
        &self,
        cfg: &LossConfig,
        x: &LossViews<'_, Self>,
        use_local: bool,
        grads: Option<&mut LossGradBufs<Self>>,
        scalars: &mut DevBuf,
    ) {
        // The two loss scalars copied on the device into `scalars`: no read-back, no sync.
        let (_, g) = self.losses_on_device(cfg, x, use_local, grads.is_some(), Some(scalars));
        if let (Some(dst), Some(g)) = (grads, g) {
            *dst = g;
        }
    }

    fn eval_scores(
        &self,
        texts: &demovlp_retrieval::EmbeddingSet,
        videos: &demovlp_retrieval::EmbeddingSet,
        opts: &demovlp_retrieval::EvalOptions,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<f32>, String> {
        // The pair kernels of kernels/losses.cu (backend/losses.rs), the CPU's semantics.
        CudaBackend::eval_scores(self, texts, videos, opts, progress)
    }

    fn adamw_update(&self, c: &StepCoeffs, p: DevViewMut<'_>, g: DevView<'_>, m: DevViewMut<'_>, v: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "adamw_update", blocks(g.len), T256, 0; p.ptr, g.ptr, m.ptr, v.ptr, g.len as i64, c.step_size, c.decay, c.beta1, c.beta2, c.eps);
    }
    fn adamw_update_table_rows(
        &self,
        c: &StepCoeffs,
        p: DevViewMut<'_>,
        m: DevViewMut<'_>,
        v: DevViewMut<'_>,
        dim: usize,
        ids: &[usize],
        grad_rows: DevView<'_>,
    ) {
        self.inner.bind();
        let rows = p.len / dim;
        let mut row_of = vec![-1i32; rows];
        for (i, &id) in ids.iter().enumerate() {
            row_of[id] = i as i32;
        }
        let mut s = crate::lock(&self.inner.scratch);
        let rows_p = self.rows(&mut s, &row_of);
        launch!(self, "adamw_update_table_rows", blocks(p.len), T256, 0;
            p.ptr, m.ptr, v.ptr, rows as i64, dim as i64, rows_p, grad_rows.ptr, c.step_size, c.decay, c.beta1, c.beta2, c.eps);
    }
}

#[cfg(test)]
mod launch_check;
