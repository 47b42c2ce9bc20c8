//! Multi-head scaled dot-product attention with an additive key mask, for two key patterns:
//! - `Full`: every query attends to every key (the text towers; padding keys carry a large
//!   negative mask value so they get zero weight, as Hugging Face does).
//! - `Frames { regions }`: the video tower's per-frame attention over a sequence
//!   `[CLS, frame 0 regions, frame 1 regions, …]` (seq = 1 + F·R): the CLS query attends to
//!   every token; a region query of frame f attends to `[CLS, the R regions of frame f]`.
//!
//! Queries, keys and values are read in place from row-major `[B, seq, ld]` buffers, head h
//! at columns `h·hd .. (h+1)·hd` (so one fused qkv buffer can be passed as three offset
//! slices). The forward output is head-major `[B, H, seq, hd]` so each (batch, head) task
//! owns a contiguous block; [`merge_heads`] scatters it back. The backward reads d(output)
//! and writes dq, dk, dv as token rows, for a fused qkv buffer ([`attention_backward_rows`],
//! the video tower) or three separate ones ([`attention_backward_rows_split`], the text
//! tower); [`attention_backward`] is the head-major form they are tested against.
//! Probabilities are kept for the backward pass in a compact per-head layout (see
//! [`AttnShape::probs_per_head`]).

mod reference;

pub use reference::{attention_backward_loops, attention_forward_loops};

use crate::dropout::masked;
use crate::fastmath::dot;
use crate::gemm::{sgemm, sgemm_raw, Trans};
use crate::softmax::{softmax_backward_in_place, softmax_in_place};
use rayon::prelude::*;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPattern {
    Full,
    Frames { regions: usize },
}

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub pattern: KeyPattern,
}

/// The keys of one query row: an optional single leading key (the CLS token) and a range.
struct RowKeys {
    offset: usize,
    lead: Option<usize>,
    range: Range<usize>,
}

impl RowKeys {
    fn len(&self) -> usize {
        self.lead.is_some() as usize + self.range.len()
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.lead.into_iter().chain(self.range.clone())
    }
}

impl AttnShape {
    /// Probability values stored per (batch, head): seq² for `Full`; for `Frames` the CLS
    /// row (seq values) then R + 1 values per region row.
    pub fn probs_per_head(&self) -> usize {
        match self.pattern {
            KeyPattern::Full => self.seq * self.seq,
            KeyPattern::Frames { regions } => self.seq + (self.seq - 1) * (regions + 1),
        }
    }

    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.probs_per_head()
    }

    /// Every query sees every key in order: `Full`, or `Frames` with a single frame (whose
    /// compact probability layout is then exactly seq × seq).
    pub fn is_dense(&self) -> bool {
        match self.pattern {
            KeyPattern::Full => true,
            KeyPattern::Frames { regions } => self.seq == 1 + regions,
        }
    }

    fn check(&self) {
        if let KeyPattern::Frames { regions } = self.pattern {
            assert!(regions > 0 && (self.seq - 1).is_multiple_of(regions), "attention: seq {} is not 1 + frames·{regions}", self.seq);
        }
    }

    fn row(&self, i: usize) -> RowKeys {
        match self.pattern {
            KeyPattern::Full => RowKeys { offset: i * self.seq, lead: None, range: 0..self.seq },
            KeyPattern::Frames { .. } if i == 0 => RowKeys { offset: 0, lead: None, range: 0..self.seq },
            KeyPattern::Frames { regions } => {
                let start = 1 + (i - 1) / regions * regions;
                RowKeys { offset: self.seq + (i - 1) * (regions + 1), lead: Some(0), range: start..start + regions }
            }
        }
    }
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// out[b,h,i,:] = Σ_j softmax_j(scale·q_i·k_j + mask[b,j]) v_j over the row's keys.
/// `drop`, when given, multiplies each probability (layout of `probs`) before the weighted
/// sum: attention dropout, with 0 or 1/(1−p) entries. `probs` keeps the undropped values.
/// `Full` (and single-frame `Frames`) runs as per-(batch, head) GEMMs; multi-frame
/// `Frames` as one GEMM block per frame plus the CLS row. The row-loop versions
/// ([`attention_forward_loops`]) are the reference the tests compare against.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    mask: &[f32],
    drop: Option<&[f32]>,
    probs: &mut [f32],
    out: &mut [f32],
) {
    if s.is_dense() {
        attention_forward_gemm(s, scale, q, k, v, ld, mask, drop, probs, out)
    } else {
        attention_forward_frames(s, scale, q, k, v, ld, mask, drop, probs, out)
    }
}

/// Where one (batch item, head)'s rows lie in a buffer: row i of head h of item b starts at
/// `offset + b·sb + h·sh + i·si` and holds `head_dim` values. The head-major `[B, H, seq, hd]`
/// layout and row-major `[B·seq, ld]` token rows (head h at columns `col + h·hd`) are both.
#[derive(Clone, Copy, Debug)]
struct HeadRows {
    offset: usize,
    sb: usize,
    sh: usize,
    si: usize,
}

impl HeadRows {
    fn head_major(s: &AttnShape) -> Self {
        HeadRows { offset: 0, sb: s.heads * s.seq * s.head_dim, sh: s.seq * s.head_dim, si: s.head_dim }
    }

    fn row_major(s: &AttnShape, ld: usize, col: usize) -> Self {
        assert!(col + s.heads * s.head_dim <= ld, "attention: columns {col}.. of rows {ld} wide cannot hold every head");
        HeadRows { offset: col, sb: s.seq * ld, sh: s.head_dim, si: ld }
    }

    fn start(&self, b: usize, h: usize) -> usize {
        self.offset + b * self.sb + h * self.sh
    }

    /// Elements a buffer needs to hold the whole view.
    fn span(&self, s: &AttnShape) -> usize {
        self.start(s.batch - 1, s.heads - 1) + (s.seq - 1) * self.si + s.head_dim
    }
}

/// Raw pointers handed to the parallel tasks; each task touches only its own (b, h) rows.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Gradients of [`attention_forward`] given its probabilities; `dout` (d(output)) and dq, dk,
/// dv are head-major `[B, H, seq, hd]`; dq, dk, dv are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    probs: &[f32],
    drop: Option<&[f32]>,
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let view = HeadRows::head_major(s);
    let n = view.span(s);
    assert!(dout.len() >= n && dq.len() >= n && dk.len() >= n && dv.len() >= n, "attention backward: buffers must hold [B, H, seq, hd]");
    // SAFETY: the three outputs are distinct &mut slices, each holding the whole view.
    unsafe {
        backward_views(
            s,
            scale,
            q,
            k,
            v,
            ld,
            probs,
            drop,
            dout,
            view,
            [SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr())],
            view,
        )
    }
}

/// [`attention_backward`] on token rows, with no head-major copies: d(output) is read from
/// rows `ld_dout` wide (head h at columns `h·hd`), and dq, dk, dv are written (overwritten)
/// into the rows of `dqkv`, `ld_dqkv` wide, at columns `0..D`, `D..2D`, `2D..3D` (D = H·hd) —
/// the layout the fused qkv projection's backward reads.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_rows(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    probs: &[f32],
    drop: Option<&[f32]>,
    dout: &[f32],
    ld_dout: usize,
    dqkv: &mut [f32],
    ld_dqkv: usize,
) {
    let d = s.heads * s.head_dim;
    let dview = HeadRows::row_major(s, ld_dout, 0);
    let oview = HeadRows::row_major(s, ld_dqkv, 0);
    assert!(3 * d <= ld_dqkv, "attention backward: rows of {ld_dqkv} cannot hold dq, dk and dv ({d} each)");
    assert!(dout.len() >= dview.span(s), "attention backward: d(output) too small");
    assert!(dqkv.len() >= oview.span(s) + 2 * d, "attention backward: dqkv too small");
    let base = dqkv.as_mut_ptr();
    // SAFETY: the three column ranges of `dqkv` are disjoint and inside it (asserted).
    unsafe {
        backward_views(
            s,
            scale,
            q,
            k,
            v,
            ld,
            probs,
            drop,
            dout,
            dview,
            [SendPtr(base), SendPtr(base.add(d)), SendPtr(base.add(2 * d))],
            oview,
        )
    }
}

/// [`attention_backward_rows`] with dq, dk and dv in three buffers of token rows, `ld_d`
/// wide (head h at columns `h·hd`), for towers whose q, k and v projections are separate
/// layers (the text tower). d(output) is read from rows `ld_dout` wide. Same bits as the
/// head-major [`attention_backward`] followed by [`merge_heads`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_rows_split(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    probs: &[f32],
    drop: Option<&[f32]>,
    dout: &[f32],
    ld_dout: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    ld_d: usize,
) {
    let dview = HeadRows::row_major(s, ld_dout, 0);
    let oview = HeadRows::row_major(s, ld_d, 0);
    assert!(dout.len() >= dview.span(s), "attention backward: d(output) too small");
    let n = oview.span(s);
    assert!(dq.len() >= n && dk.len() >= n && dv.len() >= n, "attention backward: dq, dk, dv must hold [B·seq, {ld_d}] rows");
    // SAFETY: three distinct &mut slices, each holding the whole view.
    unsafe {
        backward_views(
            s,
            scale,
            q,
            k,
            v,
            ld,
            probs,
            drop,
            dout,
            dview,
            [SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr())],
            oview,
        )
    }
}

/// Both layouts: the (b, h) tasks run in parallel, each zeroing then accumulating its own
/// rows of dq, dk, dv (the order of every sum as when the caller zeroed head-major buffers).
///
/// # Safety
/// `out[t]` with `oview` must address valid, writable memory for every (b, h, row) and
/// no two of those rows may overlap, between or within the three outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_views(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    probs: &[f32],
    drop: Option<&[f32]>,
    dout: &[f32],
    dview: HeadRows,
    out: [SendPtr; 3],
    oview: HeadRows,
) {
    let (seq, hd) = (s.seq, s.head_dim);
    (0..s.batch * s.heads).into_par_iter().with_max_len(1).for_each(|bh| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let o = oview.start(b, h);
        // SAFETY (rows and GEMM outputs): rows of this (b, h) only, which no other task
        // touches; one such &mut at a time.
        let rows = |t: usize| -> OutRows { OutRows { ptr: unsafe { out[t].0.add(o) }, si: oview.si, hd } };
        let task = Task { bh, b, h, d_o: &dout[dview.start(b, h)..], dsi: dview.si, dq: rows(0), dk: rows(1), dv: rows(2) };
        for t in [&task.dq, &task.dk, &task.dv] {
            for i in 0..seq {
                t.row(i).fill(0.0);
            }
        }
        if s.is_dense() {
            backward_dense(s, scale, q, k, v, ld, probs, drop, &task);
        } else {
            backward_frames(s, scale, q, k, v, ld, probs, drop, &task);
        }
    });
}

/// One (b, h)'s output rows: row i at `ptr + i·si`, `hd` values.
struct OutRows {
    ptr: *mut f32,
    si: usize,
    hd: usize,
}

impl OutRows {
    /// Row i. The caller holds no other reference to it meanwhile.
    #[allow(clippy::mut_from_ref)]
    fn row(&self, i: usize) -> &mut [f32] {
        // SAFETY: `backward_views`' contract: the row is valid, writable and this task's alone.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.si), self.hd) }
    }
}

/// What one (b, h) task of the backward pass reads and writes.
struct Task<'a> {
    bh: usize,
    b: usize,
    h: usize,
    /// d(output) of this (b, h): row i at `d_o[i·dsi..]`.
    d_o: &'a [f32],
    dsi: usize,
    dq: OutRows,
    dk: OutRows,
    dv: OutRows,
}

/// `Full` pattern with per-(batch, head) GEMMs: S = scale·Q·Kᵀ + mask, P = softmax(S), O = P·V.
#[allow(clippy::too_many_arguments)]
fn attention_forward_gemm(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    mask: &[f32],
    drop: Option<&[f32]>,
    probs: &mut [f32],
    out: &mut [f32],
) {
    let (seq, hd, heads) = (s.seq, s.head_dim, s.heads);
    assert_eq!(mask.len(), s.batch * seq, "attention: mask must be [B, seq]");
    let pph = seq * seq;
    out[..s.batch * heads * seq * hd].par_chunks_mut(seq * hd).zip(probs[..s.probs_len()].par_chunks_mut(pph)).enumerate().for_each(
        |(bh, (out, p))| {
            let (b, h) = (bh / heads, bh % heads);
            let o = b * seq * ld + h * hd;
            sgemm(Trans::No, Trans::Yes, seq, seq, hd, scale, &q[o..], ld, &k[o..], ld, 0.0, p, seq);
            let m = &mask[b * seq..(b + 1) * seq];
            for row in p.chunks_exact_mut(seq) {
                row.iter_mut().zip(m).for_each(|(x, m)| *x += m);
                softmax_in_place(row);
            }
            let mut dropped = Vec::new();
            let pv = masked(p, drop.map(|d| &d[bh * pph..(bh + 1) * pph]), &mut dropped);
            sgemm(Trans::No, Trans::No, seq, hd, seq, 1.0, pv, seq, &v[o..], ld, 0.0, out, hd);
        },
    );
}

/// Multi-frame `Frames` pattern: the CLS row as a loop over all keys, then per frame one
/// small GEMM block, with the frame's keys gathered as `[CLS, its R regions]` so the
/// scores land directly in the compact probability layout (rows of R + 1).
#[allow(clippy::too_many_arguments)]
fn attention_forward_frames(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    mask: &[f32],
    drop: Option<&[f32]>,
    probs: &mut [f32],
    out: &mut [f32],
) {
    s.check();
    let KeyPattern::Frames { regions: r } = s.pattern else { unreachable!("frames kernel on a dense pattern") };
    let (seq, hd, heads) = (s.seq, s.head_dim, s.heads);
    assert_eq!(mask.len(), s.batch * seq, "attention: mask must be [B, seq]");
    let frames = (seq - 1) / r;
    let pph = s.probs_per_head();
    out[..s.batch * heads * seq * hd].par_chunks_mut(seq * hd).zip(probs[..s.probs_len()].par_chunks_mut(pph)).enumerate().for_each(
        |(bh, (out, probs))| {
            let (b, h) = (bh / heads, bh % heads);
            let row = |j: usize| (b * seq + j) * ld + h * hd;
            let m = &mask[b * seq..(b + 1) * seq];
            let dm = drop.map(|d| &d[bh * pph..(bh + 1) * pph]);
            // CLS query: every key.
            let (p0, rest) = probs.split_at_mut(seq);
            let q0 = &q[row(0)..row(0) + hd];
            for (j, pj) in p0.iter_mut().enumerate() {
                *pj = scale * dot(q0, &k[row(j)..row(j) + hd]) + m[j];
            }
            softmax_in_place(p0);
            let o0 = &mut out[..hd];
            o0.fill(0.0);
            for (j, &pj) in p0.iter().enumerate() {
                axpy(pj * dm.map_or(1.0, |d| d[j]), &v[row(j)..row(j) + hd], o0);
            }
            // Region queries, one frame at a time.
            let w = r + 1;
            let mut kf = vec![0.0f32; w * hd];
            let mut vf = vec![0.0f32; w * hd];
            let mut mf = vec![0.0f32; w];
            let mut pd = Vec::with_capacity(r * w);
            for f in 0..frames {
                let first = 1 + f * r;
                for (slot, j) in std::iter::once(0).chain(first..first + r).enumerate() {
                    kf[slot * hd..(slot + 1) * hd].copy_from_slice(&k[row(j)..row(j) + hd]);
                    vf[slot * hd..(slot + 1) * hd].copy_from_slice(&v[row(j)..row(j) + hd]);
                    mf[slot] = m[j];
                }
                let pf = &mut rest[f * r * w..(f + 1) * r * w];
                sgemm(Trans::No, Trans::Yes, r, w, hd, scale, &q[row(first)..], ld, &kf, hd, 0.0, pf, w);
                for prow in pf.chunks_exact_mut(w) {
                    prow.iter_mut().zip(&mf).for_each(|(x, m)| *x += m);
                    softmax_in_place(prow);
                }
                let pv = masked(pf, dm.map(|d| &d[seq + f * r * w..seq + (f + 1) * r * w]), &mut pd);
                sgemm(Trans::No, Trans::No, r, hd, w, 1.0, pv, w, &vf, hd, 0.0, &mut out[first * hd..(first + r) * hd], hd);
            }
        },
    );
}

/// `Full` pattern (and single-frame `Frames`) for one (b, h), as per-head GEMMs.
#[allow(clippy::too_many_arguments)]
fn backward_dense(s: &AttnShape, scale: f32, q: &[f32], k: &[f32], v: &[f32], ld: usize, probs: &[f32], drop: Option<&[f32]>, t: &Task) {
    let (seq, hd) = (s.seq, s.head_dim);
    let pph = seq * seq;
    let o = t.b * seq * ld + t.h * hd;
    let p = &probs[t.bh * pph..(t.bh + 1) * pph];
    let dm = drop.map(|d| &d[t.bh * pph..(t.bh + 1) * pph]);
    // dV += P'ᵀ·dO with P' the dropped probabilities.
    let mut dropped = Vec::new();
    let pv = masked(p, dm, &mut dropped);
    // SAFETY (the three raw GEMMs): C is this task's rows of dv / dq / dk (see `OutRows`),
    // seq rows of hd values `si` apart; A and B are slices read in bounds.
    unsafe { sgemm_raw(Trans::Yes, Trans::No, seq, hd, seq, 1.0, pv.as_ptr(), seq, t.d_o.as_ptr(), t.dsi, 1.0, t.dv.ptr, t.dv.si) };
    // dP = (dO·Vᵀ) ⊙ mask, then the softmax backward and the score scale.
    let mut ds = vec![0.0f32; pph];
    sgemm(Trans::No, Trans::Yes, seq, seq, hd, 1.0, t.d_o, t.dsi, &v[o..], ld, 0.0, &mut ds, seq);
    if let Some(m) = dm {
        ds.iter_mut().zip(m).for_each(|(x, m)| *x *= m);
    }
    for (row, pr) in ds.chunks_exact_mut(seq).zip(p.chunks_exact(seq)) {
        softmax_backward_in_place(pr, row, scale);
    }
    unsafe {
        sgemm_raw(Trans::No, Trans::No, seq, hd, seq, 1.0, ds.as_ptr(), seq, k[o..].as_ptr(), ld, 1.0, t.dq.ptr, t.dq.si);
        sgemm_raw(Trans::Yes, Trans::No, seq, hd, seq, 1.0, ds.as_ptr(), seq, q[o..].as_ptr(), ld, 1.0, t.dk.ptr, t.dk.si);
    }
}

/// Multi-frame `Frames` pattern for one (b, h): the CLS row as loops over all keys, then per
/// frame small GEMMs over `[CLS, its R regions]` gathered.
#[allow(clippy::too_many_arguments)]
fn backward_frames(s: &AttnShape, scale: f32, q: &[f32], k: &[f32], v: &[f32], ld: usize, probs: &[f32], drop: Option<&[f32]>, t: &Task) {
    s.check();
    let KeyPattern::Frames { regions: r } = s.pattern else { unreachable!("frames kernel on a dense pattern") };
    let (seq, hd) = (s.seq, s.head_dim);
    let frames = (seq - 1) / r;
    let pph = s.probs_per_head();
    let row = |j: usize| (t.b * seq + j) * ld + t.h * hd;
    let probs = &probs[t.bh * pph..(t.bh + 1) * pph];
    let dm = drop.map(|d| &d[t.bh * pph..(t.bh + 1) * pph]);
    let d_o = |i: usize| &t.d_o[i * t.dsi..i * t.dsi + hd];
    // CLS query row.
    {
        let p = &probs[..seq];
        let d0 = d_o(0);
        let mut ds = vec![0.0f32; seq];
        for (j, dsj) in ds.iter_mut().enumerate() {
            let mj = dm.map_or(1.0, |d| d[j]);
            axpy(p[j] * mj, d0, t.dv.row(j));
            *dsj = mj * dot(d0, &v[row(j)..row(j) + hd]);
        }
        softmax_backward_in_place(p, &mut ds, scale);
        let q0 = &q[row(0)..row(0) + hd];
        for (j, &g) in ds.iter().enumerate() {
            axpy(g, &k[row(j)..row(j) + hd], t.dq.row(0));
            axpy(g, q0, t.dk.row(j));
        }
    }
    let w = r + 1;
    let mut kf = vec![0.0f32; w * hd];
    let mut vf = vec![0.0f32; w * hd];
    let mut pd = Vec::with_capacity(r * w);
    let mut ds = vec![0.0f32; r * w];
    let mut gkv = vec![0.0f32; w * hd];
    for f in 0..frames {
        let first = 1 + f * r;
        let keys = || std::iter::once(0).chain(first..first + r);
        for (slot, j) in keys().enumerate() {
            kf[slot * hd..(slot + 1) * hd].copy_from_slice(&k[row(j)..row(j) + hd]);
            vf[slot * hd..(slot + 1) * hd].copy_from_slice(&v[row(j)..row(j) + hd]);
        }
        let pf = &probs[seq + f * r * w..seq + (f + 1) * r * w];
        let dmf = dm.map(|d| &d[seq + f * r * w..seq + (f + 1) * r * w]);
        let pv = masked(pf, dmf, &mut pd);
        let d_of = &t.d_o[first * t.dsi..];
        // dV' = P'ᵀ·dO, scattered to [CLS, frame keys].
        sgemm(Trans::Yes, Trans::No, w, hd, r, 1.0, pv, w, d_of, t.dsi, 0.0, &mut gkv, hd);
        for (slot, j) in keys().enumerate() {
            t.dv.row(j).iter_mut().zip(&gkv[slot * hd..(slot + 1) * hd]).for_each(|(a, b)| *a += b);
        }
        // dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), dP = (dO·V'ᵀ) ⊙ mask.
        sgemm(Trans::No, Trans::Yes, r, w, hd, 1.0, d_of, t.dsi, &vf, hd, 0.0, &mut ds, w);
        if let Some(df) = dmf {
            ds.iter_mut().zip(df).for_each(|(x, m)| *x *= m);
        }
        for (drow, prow) in ds.chunks_exact_mut(w).zip(pf.chunks_exact(w)) {
            softmax_backward_in_place(prow, drow, scale);
        }
        // dQ_f += dS·K'; dK' = dSᵀ·Q_f, scattered.
        // SAFETY: C is this task's dq rows first..first + r (see `OutRows`).
        unsafe {
            sgemm_raw(Trans::No, Trans::No, r, hd, w, 1.0, ds.as_ptr(), w, kf.as_ptr(), hd, 1.0, t.dq.ptr.add(first * t.dq.si), t.dq.si)
        };
        sgemm(Trans::Yes, Trans::No, w, hd, r, 1.0, &ds, w, &q[row(first)..], ld, 0.0, &mut gkv, hd);
        for (slot, j) in keys().enumerate() {
            t.dk.row(j).iter_mut().zip(&gkv[slot * hd..(slot + 1) * hd]).for_each(|(a, b)| *a += b);
        }
    }
}

/// dst[(b·seq + i)·ld + col + h·hd + d] = src[b, h, i, d] (head-major back to token rows).
#[allow(clippy::too_many_arguments)]
pub fn merge_heads(src: &[f32], dst: &mut [f32], ld: usize, col: usize, batch: usize, heads: usize, seq: usize, hd: usize) {
    dst[..batch * seq * ld].par_chunks_mut(ld).enumerate().with_min_len(8).for_each(|(r, row)| {
        let (b, i) = (r / seq, r % seq);
        for h in 0..heads {
            let s = ((b * heads + h) * seq + i) * hd;
            row[col + h * hd..col + (h + 1) * hd].copy_from_slice(&src[s..s + hd]);
        }
    });
}

/// dst[b, h, i, d] = src[(b·seq + i)·ld + col + h·hd + d] (token rows to head-major).
#[allow(clippy::too_many_arguments)]
pub fn split_heads(src: &[f32], ld: usize, col: usize, dst: &mut [f32], batch: usize, heads: usize, seq: usize, hd: usize) {
    dst[..batch * heads * seq * hd].par_chunks_mut(seq * hd).enumerate().for_each(|(bh, blk)| {
        let (b, h) = (bh / heads, bh % heads);
        for i in 0..seq {
            let s = (b * seq + i) * ld + col + h * hd;
            blk[i * hd..(i + 1) * hd].copy_from_slice(&src[s..s + hd]);
        }
    });
}
