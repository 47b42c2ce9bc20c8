//! A second backend, deliberately different from `Cpu` where the arithmetic is: its dense
//! layers are plain triple loops summing in f64 (no packed GEMM, no blocking) and its
//! attention is the kernels' row-loop reference (head-major, then merged), its AdamW a loop
//! written from `StepCoeffs`' documented arithmetic, and host inputs are staged as a device
//! backend would. Everything else delegates to `Cpu`. The whole model runs on it unchanged
//! (the model code is generic over the backend) and `backend::check::compare_with_cpu`
//! holds within a float tolerance — what a CUDA backend's test would assert. It lives
//! outside the crate, as a CUDA backend would: the trait is implementable from there.

use demovlp_kernels::attention::{attention_backward_loops, attention_forward_loops, merge_heads, split_heads, AttnShape};
use demovlp_kernels::Rng;
use demovlp_model::adamw::StepCoeffs;
use demovlp_model::backend::{check, host, Backend, Cpu, Grads, LossGradBufs, LossViews, TokenDims};
use demovlp_retrieval::{LossConfig, LossOutputs};
use std::ops::Range;

#[derive(Clone, Copy, Debug, Default)]
struct Reference;

const CPU: Cpu = Cpu;

/// Token rows `ld` wide (head h at columns `col + h·hd`) to head-major `[B, H, seq, hd]`.
fn heads_of(s: &AttnShape, rows: &[f32], ld: usize, col: usize) -> Vec<f32> {
    let mut out = vec![0.0; s.batch * s.heads * s.seq * s.head_dim];
    split_heads(rows, ld, col, &mut out, s.batch, s.heads, s.seq, s.head_dim);
    out
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_reference(
    s: &AttnShape,
    scale: f32,
    [q, k, v]: [&[f32]; 3],
    ld: usize,
    probs: &[f32],
    drop: Option<&[f32]>,
    dout: &[f32],
    ld_dout: usize,
) -> [Vec<f32>; 3] {
    let n = s.batch * s.heads * s.seq * s.head_dim;
    let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let dout = heads_of(s, dout, ld_dout, 0);
    attention_backward_loops(s, scale, q, k, v, ld, probs, drop, &dout, &mut dq, &mut dk, &mut dv);
    [dq, dk, dv]
}

impl Backend for Reference {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn buf_len(b: &Vec<f32>) -> usize {
        b.len()
    }
    fn view_len(v: &[f32]) -> usize {
        v.len()
    }
    fn view_mut_len(v: &&mut [f32]) -> usize {
        v.len()
    }
    fn zeros(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    fn fit(&self, b: &mut Vec<f32>, n: usize) {
        b.resize(n, 0.0);
    }
    fn view(b: &Vec<f32>) -> &[f32] {
        b
    }
    fn view_mut(b: &mut Vec<f32>) -> &mut [f32] {
        b
    }
    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a> {
        &v[r]
    }
    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a> {
        &mut v[r]
    }
    fn reborrow<'b>(v: &'b mut &mut [f32]) -> &'b mut [f32] {
        v
    }
    fn as_view<'b>(v: &'b &mut [f32]) -> &'b [f32] {
        v
    }
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, at: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        v.split_at_mut(at)
    }
    fn fill_zero(&self, v: &mut [f32]) {
        v.fill(0.0);
    }
    fn copy(&self, src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn copy_2d(&self, src: &[f32], s0: usize, sld: usize, dst: &mut [f32], d0: usize, dld: usize, rows: usize, cols: usize) {
        CPU.copy_2d(src, s0, sld, dst, d0, dld, rows, cols);
    }
    fn input<'a>(&self, host: &'a [f32], staging: &'a mut Vec<f32>) -> &'a [f32] {
        // A device backend's path: the host values copied into the staging buffer.
        staging.clear();
        staging.extend_from_slice(host);
        staging
    }
    fn write_host(&self, b: &mut Vec<f32>, n: usize, f: impl FnOnce(&mut [f32])) {
        let mut host = vec![0.0; n];
        f(&mut host);
        *b = host;
    }
    fn modify_host(&self, b: &mut Vec<f32>, r: Range<usize>, f: impl FnOnce(&mut [f32])) {
        let mut host = b[r.clone()].to_vec();
        f(&mut host);
        b[r].copy_from_slice(&host);
    }
    fn to_host(&self, v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn read_host<R>(&self, v: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
        // A device backend's path: downloaded first.
        f(&self.to_host(v))
    }

    fn linear_forward(&self, x: &[f32], ldx: usize, w: &[f32], b: Option<&[f32]>, y: &mut [f32], n: usize, din: usize, dout: usize) {
        for i in 0..n {
            for o in 0..dout {
                let s: f64 = (0..din).map(|k| x[i * ldx + k] as f64 * w[o * din + k] as f64).sum();
                y[i * dout + o] = (s + b.map_or(0.0, |b| b[o] as f64)) as f32;
            }
        }
    }
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
        let keep = if grads == Grads::Overwrite { 0.0 } else { 1.0 };
        if let Some(dx) = dx {
            for i in 0..n {
                for k in 0..din {
                    let s: f64 = (0..dout).map(|o| dy[i * dout + o] as f64 * w[o * din + k] as f64).sum();
                    dx[i * din + k] += s as f32;
                }
            }
        }
        for o in 0..dout {
            for k in 0..din {
                let s: f64 = (0..n).map(|i| dy[i * dout + o] as f64 * x[i * ldx + k] as f64).sum();
                dw[o * din + k] = keep * dw[o * din + k] + s as f32;
            }
        }
        if let Some(db) = db {
            for o in 0..dout {
                let s: f64 = (0..n).map(|i| dy[i * dout + o] as f64).sum();
                db[o] = keep * db[o] + s as f32;
            }
        }
    }
    fn linear_backward_input(&self, dy: &[f32], w: &[f32], dx: &mut [f32], n: usize, din: usize, dout: usize) {
        dx[..n * din].fill(0.0);
        self.linear_backward_dx(dy, w, dx, n, din, dout);
    }
    fn layernorm_forward(&self, x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], dim: usize) {
        CPU.layernorm_forward(x, w, b, eps, y, mean, rstd, dim);
    }
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
        CPU.layernorm_backward(x, w, mean, rstd, dy, dx, dw, db, dim);
    }
    fn gelu_forward(&self, x: &[f32], y: &mut [f32]) {
        CPU.gelu_forward(x, y);
    }
    fn gelu_forward_with_grad(&self, x: &[f32], y: &mut [f32], dydx: &mut [f32]) {
        CPU.gelu_forward_with_grad(x, y, dydx);
    }
    fn gelu_backward_in_place(&self, x: &[f32], d: &mut [f32]) {
        CPU.gelu_backward_in_place(x, d);
    }
    fn relu_forward(&self, x: &[f32], y: &mut [f32]) {
        CPU.relu_forward(x, y);
    }
    fn relu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        CPU.relu_backward(x, dy, dx);
    }
    fn mul_in_place(&self, x: &mut [f32], m: &[f32]) {
        CPU.mul_in_place(x, m);
    }
    fn scale(&self, x: &[f32], s: f32, y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = *x * s;
        }
    }
    fn add_in_place(&self, y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
    }
    fn add_to_rows(&self, y: &mut [f32], x: &[f32]) {
        CPU.add_to_rows(y, x);
    }
    fn sum_rows_into(&self, acc: &mut [f32], x: &[f32]) {
        CPU.sum_rows_into(acc, x);
    }
    fn masked<'a>(&self, x: &'a [f32], mask: Option<&'a [f32]>, buf: &'a mut Vec<f32>) -> &'a [f32] {
        CPU.masked(x, mask, buf)
    }
    fn dropout_mask(&self, rng: &mut Rng, p: f32, b: &mut Vec<f32>, n: usize) {
        CPU.dropout_mask(rng, p, b, n);
    }

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
        attention_forward_loops(s, scale, q, k, v, ld, mask, drop, probs, out);
    }
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
        let views = [qkv, &qkv[d..], &qkv[2 * d..]];
        let grads = attention_backward_reference(s, scale, views, ld, probs, drop, dout, ld_dout);
        for (t, g) in grads.iter().enumerate() {
            merge_heads(g, dqkv, ld_dqkv, t * d, s.batch, s.heads, s.seq, s.head_dim);
        }
    }
    fn attention_backward_rows_split(
        &self,
        s: &AttnShape,
        scale: f32,
        qkv: [&[f32]; 3],
        ld: usize,
        probs: &[f32],
        drop: Option<&[f32]>,
        dout: &[f32],
        ld_dout: usize,
        dqkv: [&mut [f32]; 3],
        ld_d: usize,
    ) {
        let grads = attention_backward_reference(s, scale, qkv, ld, probs, drop, dout, ld_dout);
        for (g, dst) in grads.iter().zip(dqkv) {
            merge_heads(g, dst, ld_d, 0, s.batch, s.heads, s.seq, s.head_dim);
        }
    }
    fn merge_heads(&self, src: &[f32], dst: &mut [f32], ld: usize, batch: usize, heads: usize, seq: usize, hd: usize) {
        CPU.merge_heads(src, dst, ld, batch, heads, seq, hd);
    }

    fn embedding_forward(&self, ids: &[i64], table: &[f32], dim: usize, out: &mut [f32]) {
        CPU.embedding_forward(ids, table, dim, out);
    }
    fn embedding_backward(&self, ids: &[i64], dout: &[f32], dim: usize, dtable: &mut [f32]) {
        CPU.embedding_backward(ids, dout, dim, dtable);
    }
    fn embedding_backward_rows(&self, ids: &[i64], skip: usize, rows: &[usize], dout: &[f32], dim: usize, grad_rows: &mut [f32]) {
        CPU.embedding_backward_rows(ids, skip, rows, dout, dim, grad_rows);
    }
    fn video_tokens_forward(&self, t: TokenDims, cls: &[f32], pos0: &[f32], temporal: &[f32], region_emb: &[f32], x: &mut [f32]) {
        CPU.video_tokens_forward(t, cls, pos0, temporal, region_emb, x);
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
        CPU.video_tokens_backward(t, dx, grad, cls, pos0, temporal, d_region);
    }
    // The QA head's kernels: the softmax, pooling and broadcast product summed in f64 here
    // (a different order of rounding than `Cpu`'s f32 loops); the rest from `backend::host`.
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
        for bi in 0..batch {
            for k in 0..h {
                let mut s = 0f64;
                for r in 0..n {
                    let i = (bi * n + r) * h + k;
                    dx[i] = dout[i] * y[bi * h + k];
                    s += dout[i] as f64 * x[i] as f64;
                }
                dy[bi * h + k] += s as f32;
            }
        }
    }
    fn softmax_rows(&self, x: &[f32], y: &mut [f32], n: usize) {
        for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
            y.iter_mut().zip(x).for_each(|(y, &v)| *y = ((v as f64 - m).exp() / s) as f32);
        }
    }
    fn softmax_rows_backward(&self, y: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
        for ((y, dy), dx) in y.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
            let dot: f64 = y.iter().zip(dy).map(|(&a, &b)| a as f64 * b as f64).sum();
            for r in 0..n {
                dx[r] = (y[r] as f64 * (dy[r] as f64 - dot)) as f32;
            }
        }
    }
    fn weighted_sum(&self, w: &[f32], o: &[f32], out: &mut [f32], batch: usize, n: usize, dim: usize) {
        for bi in 0..batch {
            for k in 0..dim {
                out[bi * dim + k] = (0..n).map(|r| w[bi * n + r] as f64 * o[(bi * n + r) * dim + k] as f64).sum::<f64>() as f32;
            }
        }
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
        for bi in 0..batch {
            for r in 0..n {
                let i = (bi * n + r) * dim;
                dw[bi * n + r] = (0..dim).map(|k| o[i + k] as f64 * dout[bi * dim + k] as f64).sum::<f64>() as f32;
                for k in 0..dim {
                    d_o[i + k] = w[bi * n + r] * dout[bi * dim + k];
                }
            }
        }
    }
    fn cross_entropy(&self, logits: &[f32], labels: &[usize], answers: usize, d: &mut Vec<f32>) -> f32 {
        d.resize(labels.len() * answers, 0.0);
        host::cross_entropy(logits, labels, answers, d)
    }

    fn losses(&self, cfg: &LossConfig, x: &LossViews<'_, Self>, use_local: bool, grads: bool) -> (LossOutputs, Option<LossGradBufs<Self>>) {
        let v = LossViews::<Cpu> {
            dims: x.dims,
            global_text: x.global_text,
            global_video: x.global_video,
            local_text: x.local_text,
            local_video: x.local_video,
            text_mask: x.text_mask,
            video_mask: x.video_mask,
        };
        let (out, g) = CPU.losses(cfg, &v, use_local, grads);
        let g = g.map(|g| LossGradBufs {
            global_text: g.global_text,
            global_video: g.global_video,
            local_text: g.local_text,
            local_video: g.local_video,
        });
        (out, g)
    }
    fn adamw_update(&self, c: &StepCoeffs, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        // From the documented per-element arithmetic, as a device kernel would be written.
        for i in 0..g.len() {
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * (g[i] * g[i]);
            let pi = p[i] - c.step_size * (m[i] / (v[i].sqrt() + c.eps));
            p[i] = pi - c.decay * pi;
        }
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
        let mut dense = vec![0.0; p.len()];
        for (row, &id) in ids.iter().enumerate() {
            dense[id * dim..(id + 1) * dim].copy_from_slice(&grad_rows[row * dim..(row + 1) * dim]);
        }
        self.adamw_update(c, p, &dense, m, v);
    }
}

impl Reference {
    /// dx += dy·W.
    fn linear_backward_dx(&self, dy: &[f32], w: &[f32], dx: &mut [f32], n: usize, din: usize, dout: usize) {
        for i in 0..n {
            for k in 0..din {
                let s: f64 = (0..dout).map(|o| dy[i * dout + o] as f64 * w[o * din + k] as f64).sum();
                dx[i * din + k] += s as f32;
            }
        }
    }
}

#[test]
fn the_model_runs_unchanged_on_a_reference_backend() {
    check::compare_with_cpu(Reference, 2e-4).unwrap();
}

#[test]
fn the_reference_backend_really_differs_from_cpu() {
    // Bit-for-bit equality would mean the model bypassed the backend for its GEMMs.
    let err = check::compare_with_cpu(Reference, 0.0).unwrap_err();
    assert!(!err.contains("initial parameters"), "{err}");
}

#[test]
fn kernel_by_kernel_verdicts_on_the_reference_backend() {
    use demovlp_model::backend::kernels_check::{compare_kernels_with_cpu, CASES};
    let verdicts = compare_kernels_with_cpu(&Reference, 1e-5);
    assert_eq!(verdicts.len(), CASES.len(), "one verdict per kernel");
    for v in &verdicts {
        assert!(v.ok, "{}: {} (max relative error {:e})", v.name, v.detail, v.max_rel_err);
    }
    // At tolerance 0 the kernels the reference computes differently are reported, each with
    // its own verdict (the others still pass).
    let exact = compare_kernels_with_cpu(&Reference, 0.0);
    let failed: Vec<&str> = exact.iter().filter(|v| !v.ok).map(|v| v.name).collect();
    assert!(failed.contains(&"linear_forward") && failed.contains(&"softmax_rows (+ backward)"), "{failed:?}");
    assert!(exact.iter().any(|v| v.ok && v.name == "dropout_mask"), "{failed:?}");
}
