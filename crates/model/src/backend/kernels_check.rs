//! Kernel by kernel: every [`Backend`] method run on `B` and on [`Cpu`] from the same random
//! inputs, each output compared, and a verdict for **every** kernel (a panic in one is caught
//! and reported as its failure). What `demovlp selftest` prints and `scripts/gpu-check.sh`
//! records; [`super::check::compare_with_cpu`] then runs whole models.

use super::{Backend, Cpu, Grads, LossDims, LossViews, TokenDims};
use crate::adamw::StepCoeffs;
use demovlp_kernels::attention::{AttnShape, KeyPattern};
use demovlp_kernels::Rng;
use demovlp_retrieval::LossConfig;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// One kernel's verdict.
#[derive(Clone, Debug)]
pub struct KernelVerdict {
    pub name: &'static str,
    pub ok: bool,
    /// Largest |got − want| over the outputs, relative to each output's largest magnitude.
    pub max_rel_err: f32,
    /// The failing output, or the panic message.
    pub detail: String,
    /// The element with the largest relative error (none when every output matched bit for bit).
    pub worst: Option<Worst>,
}

/// Where an output differs most from the CPU's.
#[derive(Clone, Debug, PartialEq)]
pub struct Worst {
    /// The output's name (`run_case`'s labels).
    pub output: String,
    /// Index of the element in that output.
    pub index: usize,
    pub got: f32,
    pub want: f32,
    /// The output's largest |want| (the scale the error is relative to).
    pub scale: f32,
}

/// Every kernel case, in order.
pub const CASES: &[&str] = &[
    "memory (zeros, fit, fill_zero, copy, copy_2d, write/modify/read host)",
    "linear_forward",
    "linear_backward (overwrite)",
    "linear_backward (accumulate, strided x)",
    "linear_backward_input",
    "layernorm_forward",
    "layernorm_backward",
    "gelu_forward",
    "gelu_forward_with_grad",
    "gelu_backward_in_place",
    "relu_forward / relu_backward",
    "mul_in_place / add_in_place / scale / masked",
    "add_to_rows / sum_rows_into",
    "dropout_mask",
    "attention full (forward, backward rows)",
    "attention frames (forward, backward rows split)",
    "merge_heads",
    "embedding_forward / embedding_backward",
    "embedding_backward_rows",
    "video_tokens_forward / backward",
    "max_over_positions (+ backward)",
    "weight_norm (+ backward)",
    "mul_broadcast (+ backward)",
    "softmax_rows (+ backward)",
    "weighted_sum (+ backward)",
    "cross_entropy",
    "losses (forward + backward)",
    "losses at the loss_small fixture's shape (B 5, W 11, N 9, P 16)",
    "losses at the loss_realistic fixture's shape (B 8, W 99, N 240, P 64)",
    "losses forward only, masked mean (B 6, W 13, N 21, P 24)",
    "losses global only (use_local off, B 7, P 40)",
    "adamw_update",
    "adamw_update_table_rows",
];

struct Io<'b, B: Backend> {
    be: &'b B,
    rng: Rng,
    out: Vec<(String, Vec<f32>)>,
}

impl<B: Backend> Io<'_, B> {
    fn rand(&mut self, n: usize) -> B::Buf {
        let h: Vec<f32> = (0..n).map(|_| self.rng.normal()).collect();
        self.up(&h)
    }
    fn up(&self, h: &[f32]) -> B::Buf {
        let mut b = B::Buf::default();
        self.be.write_host(&mut b, h.len(), |d| d.copy_from_slice(h));
        b
    }
    fn host_rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.rng.normal()).collect()
    }
    fn keep(&mut self, name: &str, b: &B::Buf) {
        let h = self.be.to_host(B::view(b));
        self.out.push((name.to_string(), h));
    }
}

fn v<B: Backend>(b: &B::Buf) -> B::View<'_> {
    B::view(b)
}
fn vm<B: Backend>(b: &mut B::Buf) -> B::ViewMut<'_> {
    B::view_mut(b)
}

/// Runs case `name` (one of [`CASES`]) on `be` from fixed seeds; the outputs by name.
pub fn run_case<B: Backend>(be: &B, name: &str) -> Vec<(String, Vec<f32>)> {
    let mut io = Io { be, rng: Rng::new(0x5eed ^ name.len() as u64), out: Vec::new() };
    match name {
        n if n.starts_with("memory") => {
            let a = io.rand(50);
            let mut z = be.zeros(13);
            io.keep("zeros", &z);
            let mut c = be.zeros(50);
            be.copy(v::<B>(&a), vm::<B>(&mut c));
            io.keep("copy", &c);
            let mut d = be.zeros(64);
            be.copy_2d(v::<B>(&a), 3, 10, vm::<B>(&mut d), 1, 12, 4, 7);
            io.keep("copy_2d", &d);
            be.fit(&mut z, 40);
            be.fill_zero(B::slice_mut(vm::<B>(&mut z), 0..40));
            be.modify_host(&mut z, 5..9, |h| h.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32 + 0.5));
            io.keep("fit + fill_zero + modify_host", &z);
            let s = be.read_host(v::<B>(&a), |h| h.iter().sum::<f32>());
            io.out.push(("read_host".into(), vec![s]));
            let mut st = B::Buf::default();
            let host = io.host_rand(17);
            let iv = be.to_host(be.input(&host, &mut st));
            io.out.push(("input".into(), iv));
            let cl = a.clone();
            io.keep("clone", &cl);
        }
        "linear_forward" => {
            let (n, din, dout, ldx) = (37, 45, 29, 48);
            let (x, w, b) = (io.rand(n * ldx), io.rand(dout * din), io.rand(dout));
            let mut y = be.zeros(n * dout);
            be.linear_forward(v::<B>(&x), ldx, v::<B>(&w), Some(v::<B>(&b)), vm::<B>(&mut y), n, din, dout);
            io.keep("y (bias)", &y);
            be.linear_forward(v::<B>(&x), ldx, v::<B>(&w), None, vm::<B>(&mut y), n, din, dout);
            io.keep("y (no bias)", &y);
        }
        "linear_backward (overwrite)" | "linear_backward (accumulate, strided x)" => {
            let acc = name.contains("accumulate");
            let (n, din, dout) = (33, 40, 27);
            let ldx = if acc { 43 } else { din };
            let (x, w, dy) = (io.rand(n * ldx), io.rand(dout * din), io.rand(n * dout));
            let (mut dx, mut dw, mut db) = (io.rand(n * din), io.rand(dout * din), io.rand(dout));
            let g = if acc { Grads::Accumulate } else { Grads::Overwrite };
            be.linear_backward(
                v::<B>(&x),
                ldx,
                v::<B>(&w),
                v::<B>(&dy),
                n,
                din,
                dout,
                Some(vm::<B>(&mut dx)),
                vm::<B>(&mut dw),
                Some(vm::<B>(&mut db)),
                g,
            );
            io.keep("dx", &dx);
            io.keep("dw", &dw);
            io.keep("db", &db);
        }
        "linear_backward_input" => {
            let (n, din, dout) = (31, 26, 38);
            let (dy, w, mut dx) = (io.rand(n * dout), io.rand(dout * din), io.rand(n * din));
            be.linear_backward_input(v::<B>(&dy), v::<B>(&w), vm::<B>(&mut dx), n, din, dout);
            io.keep("dx", &dx);
        }
        "layernorm_forward" | "layernorm_backward" => {
            let (rows, d) = (9, 300);
            let (x, w, b) = (io.rand(rows * d), io.rand(d), io.rand(d));
            let (mut y, mut mean, mut rstd) = (be.zeros(rows * d), be.zeros(rows), be.zeros(rows));
            be.layernorm_forward(v::<B>(&x), v::<B>(&w), v::<B>(&b), 1e-6, vm::<B>(&mut y), vm::<B>(&mut mean), vm::<B>(&mut rstd), d);
            if name == "layernorm_forward" {
                io.keep("y", &y);
                io.keep("mean", &mean);
                io.keep("rstd", &rstd);
            } else {
                let dy = io.rand(rows * d);
                let (mut dx, mut dw, mut db) = (io.rand(rows * d), io.rand(d), io.rand(d));
                be.layernorm_backward(
                    v::<B>(&x),
                    v::<B>(&w),
                    v::<B>(&mean),
                    v::<B>(&rstd),
                    v::<B>(&dy),
                    vm::<B>(&mut dx),
                    vm::<B>(&mut dw),
                    vm::<B>(&mut db),
                    d,
                );
                io.keep("dx", &dx);
                io.keep("dw", &dw);
                io.keep("db", &db);
            }
        }
        "gelu_forward" | "gelu_forward_with_grad" | "gelu_backward_in_place" => {
            let n = 3000;
            let x = io.rand(n);
            let (mut y, mut g) = (be.zeros(n), io.rand(n));
            match name {
                "gelu_forward" => be.gelu_forward(v::<B>(&x), vm::<B>(&mut y)),
                "gelu_forward_with_grad" => be.gelu_forward_with_grad(v::<B>(&x), vm::<B>(&mut y), vm::<B>(&mut g)),
                _ => be.gelu_backward_in_place(v::<B>(&x), vm::<B>(&mut g)),
            }
            io.keep("y", &y);
            io.keep("grad", &g);
        }
        "relu_forward / relu_backward" => {
            let n = 1000;
            let (x, dy, mut dx, mut y) = (io.rand(n), io.rand(n), io.rand(n), be.zeros(n));
            be.relu_forward(v::<B>(&x), vm::<B>(&mut y));
            be.relu_backward(v::<B>(&x), v::<B>(&dy), vm::<B>(&mut dx));
            io.keep("y", &y);
            io.keep("dx", &dx);
        }
        "mul_in_place / add_in_place / scale / masked" => {
            let n = 777;
            let (mut x, m, y) = (io.rand(n), io.rand(n), io.rand(n));
            be.mul_in_place(vm::<B>(&mut x), v::<B>(&m));
            io.keep("mul", &x);
            be.add_in_place(vm::<B>(&mut x), v::<B>(&y));
            io.keep("add", &x);
            let mut scaled = be.zeros(n);
            be.scale(v::<B>(&x), 1.0 / 3.0, vm::<B>(&mut scaled));
            io.keep("scale", &scaled);
            let mut buf = B::Buf::default();
            let h = be.to_host(be.masked(v::<B>(&x), Some(v::<B>(&m)), &mut buf));
            io.out.push(("masked".into(), h));
            let h = be.to_host(be.masked(v::<B>(&x), None, &mut buf));
            io.out.push(("unmasked".into(), h));
        }
        "add_to_rows / sum_rows_into" => {
            let (rows, m) = (23, 19);
            let (mut y, x, mut acc) = (io.rand(rows * m), io.rand(m), io.rand(m));
            be.add_to_rows(vm::<B>(&mut y), v::<B>(&x));
            io.keep("add_to_rows", &y);
            be.sum_rows_into(vm::<B>(&mut acc), v::<B>(&y));
            io.keep("sum_rows_into", &acc);
        }
        "dropout_mask" => {
            // Short and long masks (a device may split the stream across threads), and the
            // generator's next draw after each: a backend must leave it where the CPU does.
            let mut r = Rng::new(42);
            let mut b = B::Buf::default();
            for (n, p) in [(999, 0.1), (3 * 4096 + 17, 0.1), (70_001, 0.45), (33, 0.0)] {
                be.dropout_mask(&mut r, p, &mut b, n);
                io.keep(&format!("mask of {n}, p {p}"), &b);
                io.out.push((format!("next draw after the mask of {n}"), vec![r.uniform()]));
            }
        }
        "attention full (forward, backward rows)" | "attention frames (forward, backward rows split)" => {
            let frames = name.contains("frames");
            let (batch, heads, hd) = (2, 3, 8);
            let (seq, pattern) = if frames { (1 + 2 * 3, KeyPattern::Frames { regions: 3 }) } else { (9, KeyPattern::Full) };
            let s = AttnShape { batch, heads, seq, head_dim: hd, pattern };
            let d = heads * hd;
            let ld = 3 * d;
            let qkv = io.rand(batch * seq * ld);
            let mask_h: Vec<f32> = (0..batch * seq).map(|i| if i % seq == seq - 1 { -100.0 } else { 0.0 }).collect();
            let mask = io.up(&mask_h);
            let mut r = Rng::new(3);
            let mut drop = B::Buf::default();
            be.dropout_mask(&mut r, 0.1, &mut drop, s.probs_len());
            let (mut probs, mut out) = (be.zeros(s.probs_len()), be.zeros(batch * heads * seq * hd));
            let q = v::<B>(&qkv);
            let (k, vv) = (B::slice(q, d..batch * seq * ld), B::slice(q, 2 * d..batch * seq * ld));
            be.attention_forward(&s, 0.35, q, k, vv, ld, v::<B>(&mask), Some(v::<B>(&drop)), vm::<B>(&mut probs), vm::<B>(&mut out));
            io.keep("probs", &probs);
            io.keep("out", &out);
            let dout = io.rand(batch * seq * d);
            if frames {
                let (mut dq, mut dk, mut dv) = (io.rand(batch * seq * d), io.rand(batch * seq * d), io.rand(batch * seq * d));
                let qs = B::slice(q, 0..batch * seq * ld);
                be.attention_backward_rows_split(
                    &s,
                    0.35,
                    [qs, k, vv],
                    ld,
                    v::<B>(&probs),
                    Some(v::<B>(&drop)),
                    v::<B>(&dout),
                    d,
                    [vm::<B>(&mut dq), vm::<B>(&mut dk), vm::<B>(&mut dv)],
                    d,
                );
                io.keep("dq", &dq);
                io.keep("dk", &dk);
                io.keep("dv", &dv);
            } else {
                let mut dqkv = io.rand(batch * seq * ld);
                be.attention_backward_rows(&s, 0.35, q, ld, v::<B>(&probs), None, v::<B>(&dout), d, vm::<B>(&mut dqkv), ld);
                io.keep("dqkv", &dqkv);
            }
        }
        "merge_heads" => {
            let (batch, heads, seq, hd) = (2, 3, 5, 4);
            let src = io.rand(batch * heads * seq * hd);
            let mut dst = io.rand(batch * seq * (heads * hd + 2));
            be.merge_heads(v::<B>(&src), vm::<B>(&mut dst), heads * hd + 2, batch, heads, seq, hd);
            io.keep("dst", &dst);
        }
        "embedding_forward / embedding_backward" | "embedding_backward_rows" => {
            let (rows, dim) = (11, 24);
            let ids: Vec<i64> = (0..30).map(|i| (i * 7 % 11) as i64).collect();
            let table = io.rand(rows * dim);
            let dout = io.rand(ids.len() * dim);
            if name == "embedding_backward_rows" {
                let skip = 0usize;
                let mut distinct: Vec<usize> = ids.iter().map(|&i| i as usize).filter(|&i| i != skip).collect();
                distinct.sort();
                distinct.dedup();
                let mut g = io.rand(distinct.len() * dim);
                be.embedding_backward_rows(&ids, skip, &distinct, v::<B>(&dout), dim, vm::<B>(&mut g));
                io.keep("grad_rows", &g);
            } else {
                let mut out = be.zeros(ids.len() * dim);
                be.embedding_forward(&ids, v::<B>(&table), dim, vm::<B>(&mut out));
                io.keep("out", &out);
                let mut dt = io.rand(rows * dim);
                be.embedding_backward(&ids, v::<B>(&dout), dim, vm::<B>(&mut dt));
                io.keep("dtable", &dt);
            }
        }
        "video_tokens_forward / backward" => {
            let t = TokenDims { batch: 2, frames: 3, regions: 4, dim: 8 };
            let nr = t.frames * t.regions;
            let (cls, pos0, temporal, region) = (io.rand(t.dim), io.rand(t.dim), io.rand(t.frames * t.dim), io.rand(t.batch * nr * t.dim));
            let mut x = be.zeros(t.batch * (1 + nr) * t.dim);
            be.video_tokens_forward(t, v::<B>(&cls), v::<B>(&pos0), v::<B>(&temporal), v::<B>(&region), vm::<B>(&mut x));
            io.keep("tokens", &x);
            let dx = io.rand(t.batch * (1 + nr) * t.dim);
            let mut grad = io.rand(10 + (2 + t.frames) * t.dim);
            let mut dr = io.rand(t.batch * nr * t.dim);
            let (c0, p0, f0) = (10, 10 + t.dim, 10 + 2 * t.dim);
            be.video_tokens_backward(
                t,
                v::<B>(&dx),
                vm::<B>(&mut grad),
                c0..c0 + t.dim,
                p0..p0 + t.dim,
                f0..f0 + t.frames * t.dim,
                vm::<B>(&mut dr),
            );
            io.keep("grad", &grad);
            io.keep("d_region", &dr);
        }
        "max_over_positions (+ backward)" => {
            let (b, l, d) = (3, 7, 10);
            let x = io.rand(b * l * d);
            let (mut arg, mut out) = (be.zeros(b * d), be.zeros(b * d));
            be.max_over_positions(v::<B>(&x), vm::<B>(&mut arg), vm::<B>(&mut out), b, l, d);
            io.keep("out", &out);
            io.keep("arg", &arg);
            let dout = io.rand(b * d);
            let mut dx = io.rand(b * l * d);
            be.max_over_positions_backward(v::<B>(&dout), v::<B>(&arg), vm::<B>(&mut dx), b, l, d);
            io.keep("dx", &dx);
        }
        "weight_norm (+ backward)" => {
            let n = 700;
            let (g, vv, dw) = (io.rand(1), io.rand(n), io.rand(n));
            let mut w = be.zeros(n);
            be.weight_norm(v::<B>(&g), v::<B>(&vv), vm::<B>(&mut w));
            io.keep("w", &w);
            let (mut dg, mut dv) = (io.rand(1), io.rand(n));
            be.weight_norm_backward(v::<B>(&g), v::<B>(&vv), v::<B>(&dw), vm::<B>(&mut dg), vm::<B>(&mut dv));
            io.keep("dg", &dg);
            io.keep("dv", &dv);
        }
        "mul_broadcast (+ backward)" => {
            let (b, n, h) = (3, 5, 9);
            let (x, y, dout) = (io.rand(b * n * h), io.rand(b * h), io.rand(b * n * h));
            let mut out = be.zeros(b * n * h);
            be.mul_broadcast(v::<B>(&x), v::<B>(&y), vm::<B>(&mut out), b, n, h);
            io.keep("out", &out);
            let (mut dx, mut dy) = (io.rand(b * n * h), io.rand(b * h));
            be.mul_broadcast_backward(v::<B>(&x), v::<B>(&y), v::<B>(&dout), vm::<B>(&mut dx), vm::<B>(&mut dy), b, n, h);
            io.keep("dx", &dx);
            io.keep("dy", &dy);
        }
        "softmax_rows (+ backward)" => {
            let (rows, n) = (6, 17);
            let (x, dy) = (io.rand(rows * n), io.rand(rows * n));
            let mut y = be.zeros(rows * n);
            be.softmax_rows(v::<B>(&x), vm::<B>(&mut y), n);
            io.keep("y", &y);
            let mut dx = io.rand(rows * n);
            be.softmax_rows_backward(v::<B>(&y), v::<B>(&dy), vm::<B>(&mut dx), n);
            io.keep("dx", &dx);
        }
        "weighted_sum (+ backward)" => {
            let (b, n, d) = (3, 6, 11);
            let (w, o, dout) = (io.rand(b * n), io.rand(b * n * d), io.rand(b * d));
            let mut out = io.rand(b * d);
            be.weighted_sum(v::<B>(&w), v::<B>(&o), vm::<B>(&mut out), b, n, d);
            io.keep("out", &out);
            let (mut dw, mut d_o) = (io.rand(b * n), io.rand(b * n * d));
            be.weighted_sum_backward(v::<B>(&w), v::<B>(&o), v::<B>(&dout), vm::<B>(&mut dw), vm::<B>(&mut d_o), b, n, d);
            io.keep("dw", &dw);
            io.keep("d_o", &d_o);
        }
        "cross_entropy" => {
            let logits = io.rand(4 * 9);
            let mut d = B::Buf::default();
            let loss = be.cross_entropy(v::<B>(&logits), &[0, 8, 3, 3], 9, &mut d);
            io.out.push(("loss".into(), vec![loss]));
            io.keep("d_logits", &d);
        }
        "losses (forward + backward)" => {
            let dims = LossDims { batch: 3, words: 5, regions: 6, dim: 8 };
            let (gt, gv) = (io.rand(dims.batch * dims.dim), io.rand(dims.batch * dims.dim));
            let (lt, lv) = (io.rand(dims.batch * dims.words * dims.dim), io.rand(dims.batch * dims.regions * dims.dim));
            let tm = io.up(&(0..dims.batch * dims.words).map(|i| if i % dims.words == 4 { -100.0 } else { 0.0 }).collect::<Vec<_>>());
            let vm_ = io.up(&(0..dims.batch * dims.regions).map(|i| if i % dims.regions == 5 { -100.0 } else { 0.0 }).collect::<Vec<_>>());
            let x = LossViews::<B> {
                dims,
                global_text: v::<B>(&gt),
                global_video: v::<B>(&gv),
                local_text: v::<B>(&lt),
                local_video: v::<B>(&lv),
                text_mask: v::<B>(&tm),
                video_mask: v::<B>(&vm_),
            };
            let (o, g) = be.losses(&LossConfig::default(), &x, true, true);
            io.out.push(("loss".into(), vec![o.loss_total, o.loss_global, o.loss_local]));
            io.out.push(("global sims".into(), o.global_sim_text_video));
            let g = g.expect("gradients");
            io.keep("d global_text", &g.global_text);
            io.keep("d global_video", &g.global_video);
            io.keep("d local_text", &g.local_text);
            io.keep("d local_video", &g.local_video);
        }
        n if n.starts_with("losses ") && n != "losses (forward + backward)" => {
            // (dims, real words / regions per item as (min, spread), masked mean, local, gradients)
            let (dims, words, regions, masked_mean, use_local, grads) = if n.contains("loss_small") {
                (LossDims { batch: 5, words: 11, regions: 9, dim: 16 }, (4, 7), (5, 4), false, true, true)
            } else if n.contains("loss_realistic") {
                (LossDims { batch: 8, words: 99, regions: 240, dim: 64 }, (6, 35), (80, 160), false, true, true)
            } else if n.contains("masked mean") {
                (LossDims { batch: 6, words: 13, regions: 21, dim: 24 }, (3, 10), (6, 15), true, true, false)
            } else {
                (LossDims { batch: 7, words: 5, regions: 6, dim: 40 }, (2, 3), (3, 3), false, false, true)
            };
            let (b, w, r, p) = (dims.batch, dims.words, dims.regions, dims.dim);
            let (gt, gv) = (io.rand(b * p), io.rand(b * p));
            let (lt, lv) = (io.rand(b * w * p), io.rand(b * r * p));
            // Padding at the end of each item, as the towers' masks: −100 additive.
            let mut pad = |len: usize, (lo, spread): (usize, usize)| -> Vec<f32> {
                (0..b)
                    .flat_map(|_| {
                        let real = (lo + io.rng.below(spread + 1)).min(len);
                        (0..len).map(move |i| if i < real { 0.0 } else { -100.0 })
                    })
                    .collect()
            };
            let (tmh, vmh) = (pad(w, words), pad(r, regions));
            let (tm, vm_) = (io.up(&tmh), io.up(&vmh));
            let x = LossViews::<B> {
                dims,
                global_text: v::<B>(&gt),
                global_video: v::<B>(&gv),
                local_text: v::<B>(&lt),
                local_video: v::<B>(&lv),
                text_mask: v::<B>(&tm),
                video_mask: v::<B>(&vm_),
            };
            let cfg = LossConfig { masked_mean, ..LossConfig::default() };
            let (o, g) = be.losses(&cfg, &x, use_local, grads);
            io.out.push(("loss".into(), vec![o.loss_total, o.loss_global, o.loss_local]));
            io.out.push(("global sims".into(), o.global_sim_text_video));
            io.out.push(("local sims".into(), o.local_sim_video_text));
            match g {
                Some(g) if grads => {
                    io.keep("d global_text", &g.global_text);
                    io.keep("d global_video", &g.global_video);
                    io.keep("d local_text", &g.local_text);
                    io.keep("d local_video", &g.local_video);
                }
                None if !grads => {}
                _ => panic!("gradients {} but asked for: {grads}", if grads { "missing" } else { "returned" }),
            }
        }
        "adamw_update" | "adamw_update_table_rows" => {
            let c = StepCoeffs { step_size: 1e-3, decay: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-6 };
            let (rows, dim) = (9, 16);
            let (mut p, mut m) = (io.rand(rows * dim), io.rand(rows * dim));
            let vh: Vec<f32> = io.host_rand(rows * dim).iter().map(|x| x * x).collect();
            let mut vv = io.up(&vh);
            if name == "adamw_update" {
                let g = io.rand(rows * dim);
                be.adamw_update(&c, vm::<B>(&mut p), v::<B>(&g), vm::<B>(&mut m), vm::<B>(&mut vv));
            } else {
                let ids = [1usize, 4, 5, 8];
                let g = io.rand(ids.len() * dim);
                be.adamw_update_table_rows(&c, vm::<B>(&mut p), vm::<B>(&mut m), vm::<B>(&mut vv), dim, &ids, v::<B>(&g));
            }
            io.keep("p", &p);
            io.keep("m", &m);
            io.keep("v", &vv);
        }
        other => panic!("unknown kernel case {other}"),
    }
    io.out
}

/// The message of a caught panic.
pub fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panic".into())
}

/// Outputs of a backend against the CPU's (same names, same order): the largest relative
/// error (relative to each output's largest |want|; a non-finite value where the CPU has a
/// finite one counts as infinite), its element, and the first output over `tol` (0 compares
/// bits). `(ok, max_rel_err, worst, detail)`.
pub fn compare_outputs(got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)], tol: f32) -> (bool, f32, Option<Worst>, String) {
    let mut worst_err = 0f32;
    let mut worst = None;
    let mut detail = String::new();
    if got.len() != want.len() {
        return (false, f32::INFINITY, None, format!("{} outputs, want {}", got.len(), want.len()));
    }
    for ((what, g), (_, w)) in got.iter().zip(want) {
        if g.len() != w.len() {
            return (false, f32::INFINITY, worst, format!("{what}: {} values, want {}", g.len(), w.len()));
        }
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        let (mut err, mut at) = (0f32, None);
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            if a.to_bits() == b.to_bits() {
                continue;
            }
            let e = if a.is_finite() != b.is_finite() || a.is_nan() || b.is_nan() { f32::INFINITY } else { (a - b).abs() / scale };
            if at.is_none() || e > err {
                (err, at) = (e, Some(i));
            }
        }
        let Some(i) = at else { continue };
        if err > worst_err || worst.is_none() {
            worst_err = err;
            worst = Some(Worst { output: what.clone(), index: i, got: g[i], want: w[i], scale });
        }
        if err > tol && detail.is_empty() {
            detail = format!("{what}[{i}]: {} vs {} (relative error {err:e} > tolerance {tol:e}, scale {scale:e})", g[i], w[i]);
        }
    }
    let ok = if tol == 0.0 { worst.is_none() } else { worst_err <= tol };
    if !ok && detail.is_empty() {
        if let Some(w) = &worst {
            detail = format!("{}[{}]: {} vs {} differ (tolerance 0: bits)", w.output, w.index, w.got, w.want);
        }
    }
    (ok, worst_err, worst, detail)
}

/// One case of [`CASES`] on `backend` against [`Cpu`] (a panic in it is its failure).
pub fn compare_case_with_cpu<B: Backend>(backend: &B, name: &'static str, tol: f32) -> KernelVerdict {
    let got = catch_unwind(AssertUnwindSafe(|| run_case(backend, name)));
    match got {
        Err(e) => KernelVerdict { name, ok: false, max_rel_err: f32::NAN, detail: format!("panicked: {}", panic_text(e)), worst: None },
        Ok(got) => {
            let want = run_case(&Cpu, name);
            let (ok, max_rel_err, worst, detail) = compare_outputs(&got, &want, tol);
            KernelVerdict { name, ok, max_rel_err, detail, worst }
        }
    }
}

/// Every case of [`CASES`] on `backend` against [`Cpu`]: `tol` relative to each output's
/// largest magnitude (0 compares bits). One verdict per case, failures included.
pub fn compare_kernels_with_cpu<B: Backend>(backend: &B, tol: f32) -> Vec<KernelVerdict> {
    CASES.iter().map(|&name| compare_case_with_cpu(backend, name, tol)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_matches_itself_kernel_by_kernel() {
        for v in super::compare_kernels_with_cpu(&super::Cpu, 0.0) {
            assert!(v.ok, "{}: {}", v.name, v.detail);
        }
    }
}

#[cfg(test)]
mod compare_tests {
    use super::compare_outputs;

    #[test]
    fn the_worst_element_is_named_with_both_values() {
        let want = vec![("y".to_string(), vec![1.0, -4.0, 2.0]), ("z".to_string(), vec![0.5, 0.5])];
        let got = vec![("y".to_string(), vec![1.0, -4.2, 2.1]), ("z".to_string(), vec![0.5, 0.5])];
        let (ok, err, worst, detail) = compare_outputs(&got, &want, 1e-2);
        let w = worst.unwrap();
        assert!(!ok && (err - 0.05).abs() < 1e-6, "{err}");
        assert_eq!((w.output.as_str(), w.index, w.got, w.want, w.scale), ("y", 1, -4.2, -4.0, 4.0));
        assert!(detail.contains("y[1]: -4.2 vs -4") && detail.contains("tolerance 1e-2"), "{detail}");
        let (ok, _, _, _) = compare_outputs(&got, &want, 0.1);
        assert!(ok);
        // A NaN where the CPU has a number is an infinite error; bits are compared at tolerance 0.
        let nan = vec![("y".to_string(), vec![1.0, f32::NAN, 2.0]), ("z".to_string(), vec![0.5, 0.5])];
        let (ok, err, worst, _) = compare_outputs(&nan, &want, 1.0);
        assert!(!ok && err.is_infinite() && worst.unwrap().index == 1);
        let (ok, _, worst, _) = compare_outputs(&want, &want, 0.0);
        assert!(ok && worst.is_none());
    }
}
