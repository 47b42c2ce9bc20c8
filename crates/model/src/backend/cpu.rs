//! The CPU backend: `Vec<f32>` buffers, slice views, the `demovlp_kernels` functions.

use super::{host, Backend, Grads, LossGradBufs, LossViews, TokenDims};
use crate::adamw::StepCoeffs;
use demovlp_kernels::attention::{self, AttnShape};
use demovlp_kernels::gemm::{sgemm, Trans};
use demovlp_kernels::{activation, dropout, embedding, layernorm, linear, Rng};
use demovlp_retrieval::{losses_forward, losses_forward_backward, LossConfig, LossInputs, LossOutputs};
use rayon::prelude::*;
use std::ops::Range;

/// Today's kernels on the host's cores (rayon), AVX-512 / AVX2 where the CPU has them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu;

/// Elements per parallel AdamW work item: large enough to amortise scheduling, small
/// enough to balance across cores.
const ADAMW_CHUNK: usize = 1 << 15;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    #[inline]
    fn buf_len(b: &Vec<f32>) -> usize {
        b.len()
    }
    #[inline]
    fn view_len(v: &[f32]) -> usize {
        v.len()
    }
    #[inline]
    fn view_mut_len(v: &&mut [f32]) -> usize {
        v.len()
    }
    fn zeros(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    #[inline]
    fn fit(&self, b: &mut Vec<f32>, n: usize) {
        b.resize(n, 0.0);
    }
    #[inline]
    fn view(b: &Vec<f32>) -> &[f32] {
        b
    }
    #[inline]
    fn view_mut(b: &mut Vec<f32>) -> &mut [f32] {
        b
    }
    #[inline]
    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a> {
        &v[r]
    }
    #[inline]
    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a> {
        &mut v[r]
    }
    #[inline]
    fn reborrow<'b>(v: &'b mut &mut [f32]) -> &'b mut [f32] {
        v
    }
    #[inline]
    fn as_view<'b>(v: &'b &mut [f32]) -> &'b [f32] {
        v
    }
    #[inline]
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, at: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        v.split_at_mut(at)
    }
    fn fill_zero(&self, v: &mut [f32]) {
        const CHUNK: usize = 1 << 16;
        if v.len() >= 4 * CHUNK {
            v.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
        } else {
            v.fill(0.0);
        }
    }
    #[inline]
    fn copy(&self, src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn copy_2d(&self, src: &[f32], s0: usize, sld: usize, dst: &mut [f32], d0: usize, dld: usize, rows: usize, cols: usize) {
        for i in 0..rows {
            dst[d0 + i * dld..d0 + i * dld + cols].copy_from_slice(&src[s0 + i * sld..s0 + i * sld + cols]);
        }
    }

    #[inline]
    fn input<'a>(&self, host: &'a [f32], _staging: &'a mut Vec<f32>) -> &'a [f32] {
        host
    }
    #[inline]
    fn write_host(&self, b: &mut Vec<f32>, n: usize, f: impl FnOnce(&mut [f32])) {
        b.resize(n, 0.0);
        f(b)
    }
    #[inline]
    fn modify_host(&self, b: &mut Vec<f32>, r: Range<usize>, f: impl FnOnce(&mut [f32])) {
        f(&mut b[r])
    }
    fn to_host(&self, v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    #[inline]
    fn read_host<R>(&self, v: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
        f(v)
    }

    #[inline]
    fn linear_forward(&self, x: &[f32], ldx: usize, w: &[f32], b: Option<&[f32]>, y: &mut [f32], n: usize, din: usize, dout: usize) {
        linear::linear_forward(x, ldx, w, b, y, n, din, dout);
    }
    #[inline]
    fn linear_backward(
        &self,
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
        linear::linear_backward(x, ldx, w, dy, n, din, dout, dx, dw, db, grads);
    }
    #[inline]
    fn linear_backward_input(&self, dy: &[f32], w: &[f32], dx: &mut [f32], n: usize, din: usize, dout: usize) {
        sgemm(Trans::No, Trans::No, n, din, dout, 1.0, dy, dout, w, din, 0.0, dx, din);
    }
    #[inline]
    fn layernorm_forward(&self, x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], dim: usize) {
        layernorm::layernorm_forward(x, w, b, eps, y, mean, rstd, dim);
    }
    #[inline]
    fn layernorm_backward(
        &self,
        x: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dim: usize,
    ) {
        layernorm::layernorm_backward(x, w, mean, rstd, dy, dx, dw, db, dim);
    }

    #[inline]
    fn gelu_forward(&self, x: &[f32], y: &mut [f32]) {
        activation::gelu_forward(x, y);
    }
    #[inline]
    fn gelu_forward_with_grad(&self, x: &[f32], y: &mut [f32], dydx: &mut [f32]) {
        activation::gelu_forward_with_grad(x, y, dydx);
    }
    #[inline]
    fn gelu_backward_in_place(&self, x: &[f32], d: &mut [f32]) {
        activation::gelu_backward_in_place(x, d);
    }
    #[inline]
    fn relu_forward(&self, x: &[f32], y: &mut [f32]) {
        activation::relu_forward(x, y);
    }
    #[inline]
    fn relu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        activation::relu_backward(x, dy, dx);
    }
    #[inline]
    fn mul_in_place(&self, x: &mut [f32], m: &[f32]) {
        dropout::mul_in_place(x, m);
    }
    fn add_in_place(&self, y: &mut [f32], x: &[f32]) {
        const CHUNK: usize = 1 << 14;
        if y.len() >= 4 * CHUNK {
            y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| add_chunk(y, x));
        } else {
            add_chunk(y, x);
        }
    }
    fn scale(&self, x: &[f32], s: f32, y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "scale: lengths differ");
        for (y, x) in y.iter_mut().zip(x) {
            *y = *x * s;
        }
    }
    fn add_to_rows(&self, y: &mut [f32], x: &[f32]) {
        for row in y.chunks_exact_mut(x.len()) {
            self.add_in_place(row, x);
        }
    }
    fn sum_rows_into(&self, acc: &mut [f32], x: &[f32]) {
        let n = acc.len();
        for row in x.chunks_exact(n) {
            self.add_in_place(acc, row);
        }
    }
    #[inline]
    fn masked<'a>(&self, x: &'a [f32], mask: Option<&'a [f32]>, buf: &'a mut Vec<f32>) -> &'a [f32] {
        dropout::masked(x, mask, buf)
    }
    fn dropout_mask(&self, rng: &mut Rng, p: f32, b: &mut Vec<f32>, n: usize) {
        b.resize(n, 0.0);
        dropout::dropout_mask(rng, p, b);
    }

    #[inline]
    fn attention_forward(
        &self,
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
        attention::attention_forward(s, scale, q, k, v, ld, mask, drop, probs, out);
    }
    #[inline]
    fn attention_backward_rows(
        &self,
        s: &AttnShape,
        scale: f32,
        qkv: &[f32],
        ld: usize,
        probs: &[f32],
        drop: Option<&[f32]>,
        dout: &[f32],
        ld_dout: usize,
        dqkv: &mut [f32],
        ld_dqkv: usize,
    ) {
        let d = s.heads * s.head_dim;
        attention::attention_backward_rows(s, scale, qkv, &qkv[d..], &qkv[2 * d..], ld, probs, drop, dout, ld_dout, dqkv, ld_dqkv);
    }
    #[inline]
    fn attention_backward_rows_split(
        &self,
        s: &AttnShape,
        scale: f32,
        [q, k, v]: [&[f32]; 3],
        ld: usize,
        probs: &[f32],
        drop: Option<&[f32]>,
        dout: &[f32],
        ld_dout: usize,
        [dq, dk, dv]: [&mut [f32]; 3],
        ld_d: usize,
    ) {
        attention::attention_backward_rows_split(s, scale, q, k, v, ld, probs, drop, dout, ld_dout, dq, dk, dv, ld_d);
    }
    #[inline]
    fn merge_heads(&self, src: &[f32], dst: &mut [f32], ld: usize, batch: usize, heads: usize, seq: usize, hd: usize) {
        attention::merge_heads(src, dst, ld, 0, batch, heads, seq, hd);
    }

    #[inline]
    fn embedding_forward(&self, ids: &[i64], table: &[f32], dim: usize, out: &mut [f32]) {
        embedding::embedding_forward(ids, table, dim, out, false);
    }
    #[inline]
    fn embedding_backward(&self, ids: &[i64], dout: &[f32], dim: usize, dtable: &mut [f32]) {
        embedding::embedding_backward(ids, dout, dim, dtable);
    }
    fn embedding_backward_rows(&self, ids: &[i64], skip: usize, rows: &[usize], dout: &[f32], dim: usize, grad_rows: &mut [f32]) {
        grad_rows.fill(0.0);
        for (t, &id) in ids.iter().enumerate() {
            if id as usize == skip {
                continue;
            }
            let row = rows.binary_search(&(id as usize)).expect("every id other than `skip` has a row");
            let dst = &mut grad_rows[row * dim..(row + 1) * dim];
            dst.iter_mut().zip(&dout[t * dim..(t + 1) * dim]).for_each(|(d, s)| *d += s);
        }
    }
    fn video_tokens_forward(&self, t: TokenDims, cls: &[f32], pos0: &[f32], temporal: &[f32], region_emb: &[f32], x: &mut [f32]) {
        let (d, r) = (t.dim, t.regions);
        let nr = t.frames * r;
        let seq = 1 + nr;
        for bi in 0..t.batch {
            let xb = &mut x[bi * seq * d..(bi + 1) * seq * d];
            for i in 0..d {
                xb[i] = cls[i] + pos0[i];
            }
            for j in 0..nr {
                let tf = &temporal[(j / r) * d..(j / r + 1) * d];
                let src = &region_emb[(bi * nr + j) * d..(bi * nr + j + 1) * d];
                let dst = &mut xb[(1 + j) * d..(2 + j) * d];
                for i in 0..d {
                    dst[i] = src[i] + tf[i];
                }
            }
        }
    }
    fn video_tokens_backward(
        &self,
        t: TokenDims,
        dx: &[f32],
        grad: &mut [f32],
        cls: Range<usize>,
        pos0: Range<usize>,
        temporal: Range<usize>,
        d_region: &mut [f32],
    ) {
        let (d, r) = (t.dim, t.regions);
        let nr = t.frames * r;
        let seq = 1 + nr;
        for bi in 0..t.batch {
            let xb = &dx[bi * seq * d..(bi + 1) * seq * d];
            self.add_in_place(&mut grad[cls.clone()], &xb[..d]);
            self.add_in_place(&mut grad[pos0.clone()], &xb[..d]);
            for j in 0..nr {
                let src = &xb[(1 + j) * d..(2 + j) * d];
                let f0 = temporal.start + (j / r) * d;
                self.add_in_place(&mut grad[f0..f0 + d], src);
                d_region[(bi * nr + j) * d..(bi * nr + j + 1) * d].copy_from_slice(src);
            }
        }
    }

    fn max_over_positions(&self, x: &[f32], arg: &mut [f32], out: &mut [f32], batch: usize, len: usize, dim: usize) {
        host::max_over_positions(x, arg, out, batch, len, dim);
    }
    fn max_over_positions_backward(&self, dout: &[f32], arg: &[f32], dx: &mut [f32], batch: usize, len: usize, dim: usize) {
        host::max_over_positions_backward(dout, arg, dx, batch, len, dim);
    }
    fn weight_norm(&self, g: &[f32], v: &[f32], w: &mut [f32]) {
        host::weight_norm(g, v, w);
    }
    fn weight_norm_backward(&self, g: &[f32], v: &[f32], dw: &[f32], dg: &mut [f32], dv: &mut [f32]) {
        host::weight_norm_backward(g, v, dw, dg, dv);
    }
    fn mul_broadcast(&self, x: &[f32], y: &[f32], out: &mut [f32], batch: usize, n: usize, h: usize) {
        host::mul_broadcast(x, y, out, batch, n, h);
    }
    fn mul_broadcast_backward(&self, x: &[f32], y: &[f32], dout: &[f32], dx: &mut [f32], dy: &mut [f32], batch: usize, n: usize, h: usize) {
        host::mul_broadcast_backward(x, y, dout, dx, dy, batch, n, h);
    }
    fn softmax_rows(&self, x: &[f32], y: &mut [f32], n: usize) {
        host::softmax_rows(x, y, n);
    }
    fn softmax_rows_backward(&self, y: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
        host::softmax_rows_backward(y, dy, dx, n);
    }
    fn weighted_sum(&self, w: &[f32], o: &[f32], out: &mut [f32], batch: usize, n: usize, dim: usize) {
        host::weighted_sum(w, o, out, batch, n, dim);
    }
    fn weighted_sum_backward(
        &self,
        w: &[f32],
        o: &[f32],
        dout: &[f32],
        dw: &mut [f32],
        d_o: &mut [f32],
        batch: usize,
        n: usize,
        dim: usize,
    ) {
        host::weighted_sum_backward(w, o, dout, dw, d_o, batch, n, dim);
    }
    fn cross_entropy(&self, logits: &[f32], labels: &[usize], answers: usize, d: &mut Vec<f32>) -> f32 {
        d.resize(labels.len() * answers, 0.0);
        host::cross_entropy(logits, labels, answers, d)
    }

    fn losses(&self, cfg: &LossConfig, x: &LossViews<'_, Cpu>, use_local: bool, grads: bool) -> (LossOutputs, Option<LossGradBufs<Cpu>>) {
        let inputs = LossInputs {
            batch: x.dims.batch,
            words: x.dims.words,
            regions: x.dims.regions,
            dim: x.dims.dim,
            global_text: x.global_text,
            global_video: x.global_video,
            local_text: x.local_text,
            local_video: x.local_video,
            text_mask_additive: x.text_mask,
            video_mask_additive: x.video_mask,
        };
        if grads {
            let (out, g) = losses_forward_backward(cfg, &inputs, use_local);
            let g = LossGradBufs {
                global_text: g.global_text,
                global_video: g.global_video,
                local_text: g.local_text,
                local_video: g.local_video,
            };
            (out, Some(g))
        } else {
            (losses_forward(cfg, &inputs, use_local), None)
        }
    }

    fn adamw_update(&self, c: &StepCoeffs, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        p.par_chunks_mut(ADAMW_CHUNK)
            .zip(g.par_chunks(ADAMW_CHUNK))
            .zip(m.par_chunks_mut(ADAMW_CHUNK).zip(v.par_chunks_mut(ADAMW_CHUNK)))
            .for_each(|((p, g), (m, v))| c.apply(p, g, m, v));
    }
    fn adamw_update_table_rows(
        &self,
        c: &StepCoeffs,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        dim: usize,
        ids: &[usize],
        grad_rows: &[f32],
    ) {
        let zeros = vec![0.0f32; dim];
        let rows_per_task = ADAMW_CHUNK.div_ceil(dim);
        p.par_chunks_mut(rows_per_task * dim)
            .zip(m.par_chunks_mut(rows_per_task * dim).zip(v.par_chunks_mut(rows_per_task * dim)))
            .enumerate()
            .for_each(|(t, (p, (m, v)))| {
                let r0 = t * rows_per_task;
                let mut next = ids.partition_point(|&i| i < r0);
                for (r, ((p, m), v)) in p.chunks_mut(dim).zip(m.chunks_mut(dim)).zip(v.chunks_mut(dim)).enumerate() {
                    let g = if next < ids.len() && ids[next] == r0 + r {
                        next += 1;
                        &grad_rows[(next - 1) * dim..next * dim]
                    } else {
                        &zeros[..]
                    };
                    c.apply(p, g, m, v);
                }
            });
    }
}

demovlp_kernels::multiversion! {
    fn add_chunk(y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
    }
}
