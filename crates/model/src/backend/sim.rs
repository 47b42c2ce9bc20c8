//! A simulated device, for tests: [`SimDevice`] keeps its buffers in host memory but lets no
//! code reach them except through the [`Backend`] transfer methods, behaves the way a GPU's
//! memory does where the trait leaves values unspecified, and counts what crosses between
//! host and device. Its kernels are [`Cpu`]'s, so its results are the CPU's bit for bit: a
//! test that runs a model (or a training loop) on it and on `Cpu` and compares bits finds
//! every place that reads memory it never wrote, that treats a device buffer as host memory,
//! or that moves more data than it should, without a GPU.
//!
//! - **Opaque memory.** [`SimBuf`] is its own type (no `Vec<f32>`, no `Deref`; its `Debug`
//!   shows sizes, not values), its views [`SimView`] / [`SimViewMut`] expose nothing but
//!   their length through the trait.
//! - **Poison.** Every value a GPU would leave unspecified is NaN: a new buffer (except
//!   [`Backend::zeros`]), the values a [`Backend::fit`] adds, the buffer `write_host`'s
//!   closure gets (it must write all of it), and, before the kernel runs, every output the
//!   trait documents as overwritten (`Grads::Overwrite` dW/db, attention dq/dk/dv,
//!   `embedding_backward_rows`' rows, forward outputs...). A kernel that reads a stale output,
//!   or model code that reads a buffer it never filled, turns the results into NaN.
//! - **Counters** ([`SimCounts`], shared by every clone of the handle and by the buffers it
//!   made): bytes host→device (`input`, `write_host`, `modify_host`'s write-back, and the host
//!   arguments a kernel must upload: token ids and table rows at 8 bytes each (`i64` /
//!   `usize`), cross-entropy labels at 8 bytes each), bytes device→host (`to_host`,
//!   `read_host`, `modify_host`'s read, the losses' scalars and similarity matrices, the
//!   cross-entropy's loss; a [`Backend::read_late`] when it is waited for, not when queued:
//!   the `_late` losses and cross-entropy leave their scalars on the device),
//!   synchronisations (one per device→host read; [`SimDevice::late_reads`] says when each
//!   late read was queued and waited for, in kernel launches), allocations
//!   ([`Backend::zeros`], a [`Backend::fit`] beyond the allocation, a buffer's `clone`; never
//!   for zero values), and kernel launches (one per kernel method, `fill_zero`, `copy` and
//!   `copy_2d` included). Dropout masks are drawn on the device from the generator's state
//!   (kernel arguments), so they move no bytes.

use super::{Backend, Cpu, Grads, LateRead, LossGradBufs, LossViews, TokenDims};
use crate::adamw::StepCoeffs;
use demovlp_kernels::attention::AttnShape;
use demovlp_kernels::{dropout, Rng};
use demovlp_retrieval::{EmbeddingSet, EvalOptions, LossConfig, LossOutputs};
use std::fmt;
use std::ops::{Range, Sub};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

const CPU: Cpu = Cpu;
const F32: u64 = 4;
/// Bytes of one host index (`i64` token id, `usize` row or label) uploaded for a kernel.
const INDEX: u64 = 8;

/// What a [`SimDevice`] has counted (see the module docs for what counts as what).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounts {
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    pub syncs: u64,
    pub allocations: u64,
    pub launches: u64,
    /// Evaluation score matrices computed on the device ([`Backend::eval_scores`]).
    pub score_runs: u64,
}

impl Sub for SimCounts {
    type Output = SimCounts;
    /// The counts between two snapshots (`later - earlier`).
    fn sub(self, earlier: SimCounts) -> SimCounts {
        SimCounts {
            h2d_bytes: self.h2d_bytes - earlier.h2d_bytes,
            d2h_bytes: self.d2h_bytes - earlier.d2h_bytes,
            syncs: self.syncs - earlier.syncs,
            allocations: self.allocations - earlier.allocations,
            launches: self.launches - earlier.launches,
            score_runs: self.score_runs - earlier.score_runs,
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    h2d: AtomicU64,
    d2h: AtomicU64,
    syncs: AtomicU64,
    allocs: AtomicU64,
    launches: AtomicU64,
    score_runs: AtomicU64,
    /// Each late read waited for: the launch count when it was queued and when it was waited for.
    late: Mutex<Vec<(u64, u64)>>,
}

impl Stats {
    fn alloc(&self, n: usize) {
        if n > 0 {
            self.allocs.fetch_add(1, Relaxed);
        }
    }
}

/// The simulated device: a cheap handle (clones share the counters).
#[derive(Clone, Debug, Default)]
pub struct SimDevice {
    stats: Arc<Stats>,
}

/// A buffer of the simulated device: an allocation of `mem.len()` values of which the first
/// `len` are the buffer's.
#[derive(Default)]
pub struct SimBuf {
    mem: Vec<f32>,
    len: usize,
    /// The counters of the device that allocated it (none while it holds nothing).
    stats: Option<Arc<Stats>>,
}

impl Clone for SimBuf {
    /// A deep copy on the device: one allocation of `len` values.
    fn clone(&self) -> Self {
        if let Some(s) = &self.stats {
            s.alloc(self.len);
        }
        SimBuf { mem: self.mem[..self.len].to_vec(), len: self.len, stats: self.stats.clone() }
    }
}

impl fmt::Debug for SimBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimBuf {{ len: {}, allocated: {} }}", self.len, self.mem.len())
    }
}

/// A shared view of a [`SimBuf`]'s values (opaque).
#[derive(Clone, Copy)]
pub struct SimView<'a>(&'a [f32]);

/// A mutable view of a [`SimBuf`]'s values (opaque).
pub struct SimViewMut<'a>(&'a mut [f32]);

fn poison(v: &mut [f32]) {
    v.fill(f32::NAN);
}

/// Poisons the first `n` values of `v` (at most all of them).
fn poison_first(v: &mut [f32], n: usize) {
    let n = n.min(v.len());
    poison(&mut v[..n]);
}

/// Poisons `width` values at the start of each of `rows` rows `ld` apart.
fn poison_rows(v: &mut [f32], rows: usize, ld: usize, width: usize) {
    for r in 0..rows {
        let start = (r * ld).min(v.len());
        let end = (r * ld + width).min(v.len());
        poison(&mut v[start..end]);
    }
}

impl SimDevice {
    /// A new device with its own counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters now.
    pub fn snapshot(&self) -> SimCounts {
        let s = &self.stats;
        SimCounts {
            h2d_bytes: s.h2d.load(Relaxed),
            d2h_bytes: s.d2h.load(Relaxed),
            syncs: s.syncs.load(Relaxed),
            allocations: s.allocs.load(Relaxed),
            launches: s.launches.load(Relaxed),
            score_runs: s.score_runs.load(Relaxed),
        }
    }

    /// Sets every counter to zero (and forgets the late reads).
    pub fn reset(&self) {
        let s = &self.stats;
        for c in [&s.h2d, &s.d2h, &s.syncs, &s.allocs, &s.launches, &s.score_runs] {
            c.store(0, Relaxed);
        }
        s.late.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The late reads ([`Backend::read_late`]) waited for so far, in order: the launch count
    /// when each was queued and when it was waited for. Kernels launched in between are work
    /// the device had queued while the host waited (a step's losses read after the next
    /// step was queued: the difference is that step's launches).
    pub fn late_reads(&self) -> Vec<(u64, u64)> {
        self.stats.late.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn launch(&self) {
        self.stats.launches.fetch_add(1, Relaxed);
    }

    fn upload(&self, bytes: u64) {
        self.stats.h2d.fetch_add(bytes, Relaxed);
    }

    /// One device→host read of `bytes` (a synchronisation).
    fn download(&self, bytes: u64) {
        self.stats.d2h.fetch_add(bytes, Relaxed);
        self.stats.syncs.fetch_add(1, Relaxed);
    }

    /// A buffer of `n` values, all NaN.
    fn poisoned(&self, n: usize) -> SimBuf {
        self.stats.alloc(n);
        SimBuf { mem: vec![f32::NAN; n], len: n, stats: Some(self.stats.clone()) }
    }
}

impl Backend for SimDevice {
    type Buf = SimBuf;
    type View<'a> = SimView<'a>;
    type ViewMut<'a> = SimViewMut<'a>;

    fn buf_len(b: &SimBuf) -> usize {
        b.len
    }
    fn view_len(v: SimView<'_>) -> usize {
        v.0.len()
    }
    fn view_mut_len(v: &SimViewMut<'_>) -> usize {
        v.0.len()
    }
    fn zeros(&self, n: usize) -> SimBuf {
        self.stats.alloc(n);
        SimBuf { mem: vec![0.0; n], len: n, stats: Some(self.stats.clone()) }
    }
    fn fit(&self, b: &mut SimBuf, n: usize) {
        if b.stats.is_none() {
            b.stats = Some(self.stats.clone());
        }
        if n > b.mem.len() {
            // A new allocation of exactly n values, the old ones copied (as the CUDA backend).
            let mut mem = self.poisoned(n).mem;
            mem[..b.len].copy_from_slice(&b.mem[..b.len]);
            b.mem = mem;
        } else if n > b.len {
            poison(&mut b.mem[b.len..n]);
        }
        b.len = n;
    }
    fn view(b: &SimBuf) -> SimView<'_> {
        SimView(&b.mem[..b.len])
    }
    fn view_mut(b: &mut SimBuf) -> SimViewMut<'_> {
        SimViewMut(&mut b.mem[..b.len])
    }
    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a> {
        SimView(&v.0[r])
    }
    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a> {
        SimViewMut(&mut v.0[r])
    }
    fn reborrow<'b>(v: &'b mut SimViewMut<'_>) -> SimViewMut<'b> {
        SimViewMut(&mut *v.0)
    }
    fn as_view<'b>(v: &'b SimViewMut<'_>) -> SimView<'b> {
        SimView(&*v.0)
    }
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, at: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        let (a, b) = v.0.split_at_mut(at);
        (SimViewMut(a), SimViewMut(b))
    }
    fn fill_zero(&self, v: SimViewMut<'_>) {
        self.launch();
        CPU.fill_zero(v.0);
    }
    fn copy(&self, src: SimView<'_>, dst: SimViewMut<'_>) {
        self.launch();
        CPU.copy(src.0, dst.0);
    }
    fn copy_2d(&self, src: SimView<'_>, s0: usize, sld: usize, dst: SimViewMut<'_>, d0: usize, dld: usize, rows: usize, cols: usize) {
        self.launch();
        CPU.copy_2d(src.0, s0, sld, dst.0, d0, dld, rows, cols);
    }

    fn input<'a>(&self, host: &'a [f32], staging: &'a mut SimBuf) -> SimView<'a> {
        self.fit(staging, host.len());
        staging.mem[..host.len()].copy_from_slice(host);
        self.upload(F32 * host.len() as u64);
        Self::view(staging)
    }
    fn input_again<'a>(&self, host: &'a [f32], staging: &'a mut SimBuf) -> SimView<'a> {
        let same = staging.len == host.len() && staging.mem[..host.len()].iter().zip(host).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "input_again: the staging buffer no longer holds these host values (was it used for another input since?)");
        Self::view(staging)
    }
    fn write_host(&self, b: &mut SimBuf, n: usize, f: impl FnOnce(&mut [f32])) {
        // The closure fills fresh host memory (NaN: it must write every value), then it lands.
        let mut host = vec![f32::NAN; n];
        f(&mut host);
        self.fit(b, n);
        b.mem[..n].copy_from_slice(&host);
        self.upload(F32 * n as u64);
    }
    fn modify_host(&self, b: &mut SimBuf, r: Range<usize>, f: impl FnOnce(&mut [f32])) {
        let mut host = self.to_host(SimView(&b.mem[..b.len][r.clone()]));
        f(&mut host);
        b.mem[..b.len][r].copy_from_slice(&host);
        self.upload(F32 * host.len() as u64);
    }
    fn to_host(&self, v: SimView<'_>) -> Vec<f32> {
        self.download(F32 * v.0.len() as u64);
        v.0.to_vec()
    }
    fn read_host<R>(&self, v: SimView<'_>, f: impl FnOnce(&[f32]) -> R) -> R {
        f(&self.to_host(v))
    }
    fn read_late(&self, v: SimView<'_>) -> LateRead {
        // The copy is queued now (the values as they are now); the host waits when it reads.
        let values = v.0.to_vec();
        let (stats, queued) = (self.stats.clone(), self.stats.launches.load(Relaxed));
        LateRead::pending(move || {
            stats.d2h.fetch_add(F32 * values.len() as u64, Relaxed);
            stats.syncs.fetch_add(1, Relaxed);
            let waited = stats.launches.load(Relaxed);
            stats.late.lock().unwrap_or_else(|e| e.into_inner()).push((queued, waited));
            values
        })
    }

    fn linear_forward(
        &self,
        x: SimView<'_>,
        ldx: usize,
        w: SimView<'_>,
        b: Option<SimView<'_>>,
        y: SimViewMut<'_>,
        n: usize,
        din: usize,
        dout: usize,
    ) {
        self.launch();
        poison_first(y.0, n * dout);
        CPU.linear_forward(x.0, ldx, w.0, b.map(|b| b.0), y.0, n, din, dout);
    }
    fn linear_backward(
        &self,
        x: SimView<'_>,
        ldx: usize,
        w: SimView<'_>,
        dy: SimView<'_>,
        n: usize,
        din: usize,
        dout: usize,
        dx: Option<SimViewMut<'_>>,
        dw: SimViewMut<'_>,
        mut db: Option<SimViewMut<'_>>,
        grads: Grads,
    ) {
        self.launch();
        if grads == Grads::Overwrite {
            poison_first(dw.0, dout * din);
            if let Some(db) = &mut db {
                poison_first(db.0, dout);
            }
        }
        CPU.linear_backward(x.0, ldx, w.0, dy.0, n, din, dout, dx.map(|v| v.0), dw.0, db.map(|v| v.0), grads);
    }
    fn linear_backward_input(&self, dy: SimView<'_>, w: SimView<'_>, dx: SimViewMut<'_>, n: usize, din: usize, dout: usize) {
        self.launch();
        poison_first(dx.0, n * din);
        CPU.linear_backward_input(dy.0, w.0, dx.0, n, din, dout);
    }
    fn layernorm_forward(
        &self,
        x: SimView<'_>,
        w: SimView<'_>,
        b: SimView<'_>,
        eps: f32,
        y: SimViewMut<'_>,
        mean: SimViewMut<'_>,
        rstd: SimViewMut<'_>,
        dim: usize,
    ) {
        self.launch();
        let rows = x.0.len() / dim.max(1);
        poison_first(y.0, x.0.len());
        poison_first(mean.0, rows);
        poison_first(rstd.0, rows);
        CPU.layernorm_forward(x.0, w.0, b.0, eps, y.0, mean.0, rstd.0, dim);
    }
    fn layernorm_backward(
        &self,
        x: SimView<'_>,
        w: SimView<'_>,
        mean: SimView<'_>,
        rstd: SimView<'_>,
        dy: SimView<'_>,
        dx: SimViewMut<'_>,
        dw: SimViewMut<'_>,
        db: SimViewMut<'_>,
        dim: usize,
    ) {
        self.launch();
        CPU.layernorm_backward(x.0, w.0, mean.0, rstd.0, dy.0, dx.0, dw.0, db.0, dim);
    }

    fn gelu_forward(&self, x: SimView<'_>, y: SimViewMut<'_>) {
        self.launch();
        poison_first(y.0, x.0.len());
        CPU.gelu_forward(x.0, y.0);
    }
    fn gelu_forward_with_grad(&self, x: SimView<'_>, y: SimViewMut<'_>, dydx: SimViewMut<'_>) {
        self.launch();
        poison_first(y.0, x.0.len());
        poison_first(dydx.0, x.0.len());
        CPU.gelu_forward_with_grad(x.0, y.0, dydx.0);
    }
    fn gelu_backward_in_place(&self, x: SimView<'_>, d: SimViewMut<'_>) {
        self.launch();
        CPU.gelu_backward_in_place(x.0, d.0);
    }
    fn relu_forward(&self, x: SimView<'_>, y: SimViewMut<'_>) {
        self.launch();
        poison_first(y.0, x.0.len());
        CPU.relu_forward(x.0, y.0);
    }
    fn relu_backward(&self, x: SimView<'_>, dy: SimView<'_>, dx: SimViewMut<'_>) {
        self.launch();
        CPU.relu_backward(x.0, dy.0, dx.0);
    }
    fn mul_in_place(&self, x: SimViewMut<'_>, m: SimView<'_>) {
        self.launch();
        CPU.mul_in_place(x.0, m.0);
    }
    fn add_in_place(&self, y: SimViewMut<'_>, x: SimView<'_>) {
        self.launch();
        CPU.add_in_place(y.0, x.0);
    }
    fn scale(&self, x: SimView<'_>, s: f32, y: SimViewMut<'_>) {
        self.launch();
        poison_first(y.0, x.0.len());
        CPU.scale(x.0, s, y.0);
    }
    fn add_to_rows(&self, y: SimViewMut<'_>, x: SimView<'_>) {
        self.launch();
        CPU.add_to_rows(y.0, x.0);
    }
    fn sum_rows_into(&self, acc: SimViewMut<'_>, x: SimView<'_>) {
        self.launch();
        CPU.sum_rows_into(acc.0, x.0);
    }
    fn masked<'a>(&self, x: SimView<'a>, mask: Option<SimView<'a>>, buf: &'a mut SimBuf) -> SimView<'a> {
        let Some(m) = mask else { return x };
        assert_eq!(x.0.len(), m.0.len(), "dropout: mask length");
        self.launch();
        self.fit(buf, x.0.len());
        let out = &mut buf.mem[..x.0.len()];
        poison(out);
        // dropout::masked's arithmetic: one product per element.
        out.iter_mut().zip(x.0.iter().zip(m.0)).for_each(|(o, (x, m))| *o = x * m);
        Self::view(buf)
    }
    fn dropout_mask(&self, rng: &mut Rng, p: f32, b: &mut SimBuf, n: usize) {
        self.launch();
        self.fit(b, n);
        let out = &mut b.mem[..n];
        poison(out);
        dropout::dropout_mask(rng, p, out);
    }

    fn attention_forward(
        &self,
        s: &AttnShape,
        scale: f32,
        q: SimView<'_>,
        k: SimView<'_>,
        v: SimView<'_>,
        ld: usize,
        mask: SimView<'_>,
        drop: Option<SimView<'_>>,
        probs: SimViewMut<'_>,
        out: SimViewMut<'_>,
    ) {
        self.launch();
        poison_first(probs.0, s.probs_len());
        poison_first(out.0, s.batch * s.heads * s.seq * s.head_dim);
        CPU.attention_forward(s, scale, q.0, k.0, v.0, ld, mask.0, drop.map(|d| d.0), probs.0, out.0);
    }
    fn attention_backward_rows(
        &self,
        s: &AttnShape,
        scale: f32,
        qkv: SimView<'_>,
        ld: usize,
        probs: SimView<'_>,
        drop: Option<SimView<'_>>,
        dout: SimView<'_>,
        ld_dout: usize,
        dqkv: SimViewMut<'_>,
        ld_dqkv: usize,
    ) {
        self.launch();
        poison_rows(dqkv.0, s.batch * s.seq, ld_dqkv, 3 * s.heads * s.head_dim);
        CPU.attention_backward_rows(s, scale, qkv.0, ld, probs.0, drop.map(|d| d.0), dout.0, ld_dout, dqkv.0, ld_dqkv);
    }
    fn attention_backward_rows_split(
        &self,
        s: &AttnShape,
        scale: f32,
        [q, k, v]: [SimView<'_>; 3],
        ld: usize,
        probs: SimView<'_>,
        drop: Option<SimView<'_>>,
        dout: SimView<'_>,
        ld_dout: usize,
        [dq, dk, dv]: [SimViewMut<'_>; 3],
        ld_d: usize,
    ) {
        self.launch();
        for d in [&mut *dq.0, &mut *dk.0, &mut *dv.0] {
            poison_rows(d, s.batch * s.seq, ld_d, s.heads * s.head_dim);
        }
        CPU.attention_backward_rows_split(
            s,
            scale,
            [q.0, k.0, v.0],
            ld,
            probs.0,
            drop.map(|d| d.0),
            dout.0,
            ld_dout,
            [dq.0, dk.0, dv.0],
            ld_d,
        );
    }
    fn merge_heads(&self, src: SimView<'_>, dst: SimViewMut<'_>, ld: usize, batch: usize, heads: usize, seq: usize, hd: usize) {
        self.launch();
        poison_rows(dst.0, batch * seq, ld, heads * hd);
        CPU.merge_heads(src.0, dst.0, ld, batch, heads, seq, hd);
    }

    fn embedding_forward(&self, ids: &[i64], table: SimView<'_>, dim: usize, out: SimViewMut<'_>) {
        self.launch();
        self.upload(INDEX * ids.len() as u64);
        poison_first(out.0, ids.len() * dim);
        CPU.embedding_forward(ids, table.0, dim, out.0);
    }
    fn embedding_backward(&self, ids: &[i64], dout: SimView<'_>, dim: usize, dtable: SimViewMut<'_>) {
        self.launch();
        self.upload(INDEX * ids.len() as u64);
        CPU.embedding_backward(ids, dout.0, dim, dtable.0);
    }
    fn embedding_backward_rows(&self, ids: &[i64], skip: usize, rows: &[usize], dout: SimView<'_>, dim: usize, grad_rows: SimViewMut<'_>) {
        self.launch();
        self.upload(INDEX * (ids.len() + rows.len()) as u64);
        poison_first(grad_rows.0, rows.len() * dim);
        CPU.embedding_backward_rows(ids, skip, rows, dout.0, dim, grad_rows.0);
    }
    fn video_tokens_forward(
        &self,
        t: TokenDims,
        cls: SimView<'_>,
        pos0: SimView<'_>,
        temporal: SimView<'_>,
        region_emb: SimView<'_>,
        x: SimViewMut<'_>,
    ) {
        self.launch();
        poison_first(x.0, t.batch * (1 + t.frames * t.regions) * t.dim);
        CPU.video_tokens_forward(t, cls.0, pos0.0, temporal.0, region_emb.0, x.0);
    }
    fn video_tokens_backward(
        &self,
        t: TokenDims,
        dx: SimView<'_>,
        grad: SimViewMut<'_>,
        cls: Range<usize>,
        pos0: Range<usize>,
        temporal: Range<usize>,
        d_region: SimViewMut<'_>,
    ) {
        self.launch();
        poison_first(d_region.0, t.batch * t.frames * t.regions * t.dim);
        CPU.video_tokens_backward(t, dx.0, grad.0, cls, pos0, temporal, d_region.0);
    }

    fn max_over_positions(&self, x: SimView<'_>, arg: SimViewMut<'_>, out: SimViewMut<'_>, batch: usize, len: usize, dim: usize) {
        self.launch();
        poison_first(arg.0, batch * dim);
        poison_first(out.0, batch * dim);
        CPU.max_over_positions(x.0, arg.0, out.0, batch, len, dim);
    }
    fn max_over_positions_backward(&self, dout: SimView<'_>, arg: SimView<'_>, dx: SimViewMut<'_>, batch: usize, len: usize, dim: usize) {
        self.launch();
        poison_first(dx.0, batch * len * dim);
        CPU.max_over_positions_backward(dout.0, arg.0, dx.0, batch, len, dim);
    }
    fn weight_norm(&self, g: SimView<'_>, v: SimView<'_>, w: SimViewMut<'_>) {
        self.launch();
        poison_first(w.0, v.0.len());
        CPU.weight_norm(g.0, v.0, w.0);
    }
    fn weight_norm_backward(&self, g: SimView<'_>, v: SimView<'_>, dw: SimView<'_>, dg: SimViewMut<'_>, dv: SimViewMut<'_>) {
        self.launch();
        CPU.weight_norm_backward(g.0, v.0, dw.0, dg.0, dv.0);
    }
    fn mul_broadcast(&self, x: SimView<'_>, y: SimView<'_>, out: SimViewMut<'_>, batch: usize, n: usize, h: usize) {
        self.launch();
        poison_first(out.0, batch * n * h);
        CPU.mul_broadcast(x.0, y.0, out.0, batch, n, h);
    }
    fn mul_broadcast_backward(
        &self,
        x: SimView<'_>,
        y: SimView<'_>,
        dout: SimView<'_>,
        dx: SimViewMut<'_>,
        dy: SimViewMut<'_>,
        batch: usize,
        n: usize,
        h: usize,
    ) {
        self.launch();
        poison_first(dx.0, batch * n * h);
        CPU.mul_broadcast_backward(x.0, y.0, dout.0, dx.0, dy.0, batch, n, h);
    }
    fn softmax_rows(&self, x: SimView<'_>, y: SimViewMut<'_>, n: usize) {
        self.launch();
        poison_first(y.0, x.0.len());
        CPU.softmax_rows(x.0, y.0, n);
    }
    fn softmax_rows_backward(&self, y: SimView<'_>, dy: SimView<'_>, dx: SimViewMut<'_>, n: usize) {
        self.launch();
        poison_first(dx.0, y.0.len());
        CPU.softmax_rows_backward(y.0, dy.0, dx.0, n);
    }
    fn weighted_sum(&self, w: SimView<'_>, o: SimView<'_>, out: SimViewMut<'_>, batch: usize, n: usize, dim: usize) {
        self.launch();
        poison_first(out.0, batch * dim);
        CPU.weighted_sum(w.0, o.0, out.0, batch, n, dim);
    }
    fn weighted_sum_backward(
        &self,
        w: SimView<'_>,
        o: SimView<'_>,
        dout: SimView<'_>,
        dw: SimViewMut<'_>,
        d_o: SimViewMut<'_>,
        batch: usize,
        n: usize,
        dim: usize,
    ) {
        self.launch();
        poison_first(dw.0, batch * n);
        poison_first(d_o.0, batch * n * dim);
        CPU.weighted_sum_backward(w.0, o.0, dout.0, dw.0, d_o.0, batch, n, dim);
    }
    fn cross_entropy(&self, logits: SimView<'_>, labels: &[usize], answers: usize, d: &mut SimBuf) -> f32 {
        let loss = self.cross_entropy_on_device(logits, labels, answers, d);
        self.download(F32);
        loss
    }

    fn eval_scores(
        &self,
        texts: &EmbeddingSet,
        videos: &EmbeddingSet,
        opts: &EvalOptions,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<f32>, String> {
        // As a GPU does it: both sets up, one kernel, the [T, V] matrix back.
        let values = |e: &EmbeddingSet| (e.global.len() + e.local.len() + e.mask_additive.len()) as u64;
        self.upload(F32 * (values(texts) + values(videos)));
        self.launch();
        self.stats.score_runs.fetch_add(1, Relaxed);
        let scores = CPU.eval_scores(texts, videos, opts, progress)?;
        self.download(F32 * scores.len() as u64);
        Ok(scores)
    }
    fn cross_entropy_late(&self, logits: SimView<'_>, labels: &[usize], answers: usize, d: &mut SimBuf, loss: &mut SimBuf) {
        let l = self.cross_entropy_on_device(logits, labels, answers, d);
        self.fit(loss, 1);
        loss.mem[0] = l;
    }

    fn losses(&self, cfg: &LossConfig, x: &LossViews<'_, Self>, use_local: bool, grads: bool) -> (LossOutputs, Option<LossGradBufs<Self>>) {
        // New buffers: the fits in `losses_into` allocate them.
        let mut g = grads.then(LossGradBufs::default);
        let out = self.losses_into(cfg, x, use_local, g.as_mut());
        (out, g)
    }
    fn losses_into(
        &self,
        cfg: &LossConfig,
        x: &LossViews<'_, Self>,
        use_local: bool,
        grads: Option<&mut LossGradBufs<Self>>,
    ) -> LossOutputs {
        let out = self.losses_on_device(cfg, x, use_local, grads);
        self.download_loss_outputs(&out);
        out
    }

    fn losses_late(
        &self,
        cfg: &LossConfig,
        x: &LossViews<'_, Self>,
        use_local: bool,
        grads: Option<&mut LossGradBufs<Self>>,
        scalars: &mut SimBuf,
    ) {
        let out = self.losses_on_device(cfg, x, use_local, grads);
        self.fit(scalars, 2);
        scalars.mem[..2].copy_from_slice(&[out.loss_global, out.loss_local]);
    }

    fn adamw_update(&self, c: &StepCoeffs, p: SimViewMut<'_>, g: SimView<'_>, m: SimViewMut<'_>, v: SimViewMut<'_>) {
        self.launch();
        CPU.adamw_update(c, p.0, g.0, m.0, v.0);
    }
    fn adamw_update_table_rows(
        &self,
        c: &StepCoeffs,
        p: SimViewMut<'_>,
        m: SimViewMut<'_>,
        v: SimViewMut<'_>,
        dim: usize,
        ids: &[usize],
        grad_rows: SimView<'_>,
    ) {
        self.launch();
        self.upload(INDEX * ids.len() as u64);
        CPU.adamw_update_table_rows(c, p.0, m.0, v.0, dim, ids, grad_rows.0);
    }
}

impl SimDevice {
    /// The cross-entropy computed on the device (one launch, the labels uploaded), its
    /// gradient in `d`; the loss is returned but not counted as read back.
    fn cross_entropy_on_device(&self, logits: SimView<'_>, labels: &[usize], answers: usize, d: &mut SimBuf) -> f32 {
        self.launch();
        self.upload(INDEX * labels.len() as u64);
        let n = labels.len() * answers;
        self.fit(d, n);
        let out = &mut d.mem[..n];
        poison(out);
        super::host::cross_entropy(logits.0, labels, answers, out)
    }

    /// The losses computed on the device (one launch), their gradients landing in `grads`;
    /// the host outputs are returned but not counted as read back.
    fn losses_on_device(
        &self,
        cfg: &LossConfig,
        x: &LossViews<'_, Self>,
        use_local: bool,
        grads: Option<&mut LossGradBufs<Self>>,
    ) -> LossOutputs {
        self.launch();
        let (out, g) = CPU.losses(cfg, &cpu_views(x), use_local, grads.is_some());
        if let (Some(dst), Some(g)) = (grads, g) {
            for (dst, src) in [
                (&mut dst.global_text, g.global_text),
                (&mut dst.global_video, g.global_video),
                (&mut dst.local_text, g.local_text),
                (&mut dst.local_video, g.local_video),
            ] {
                self.fit(dst, src.len());
                dst.mem[..src.len()].copy_from_slice(&src);
            }
        }
        out
    }

    /// The losses' host outputs read back at once: three scalars and the similarity matrices.
    fn download_loss_outputs(&self, out: &LossOutputs) {
        let values = 3 + out.global_sim_text_video.len() + out.local_sim_video_text.len();
        self.download(F32 * values as u64);
    }
}

fn cpu_views<'a>(x: &LossViews<'a, SimDevice>) -> LossViews<'a, Cpu> {
    LossViews {
        dims: x.dims,
        global_text: x.global_text.0,
        global_video: x.global_video.0,
        local_text: x.local_text.0,
        local_video: x.local_video.0,
        text_mask: x.text_mask.0,
        video_mask: x.video_mask.0,
    }
}
