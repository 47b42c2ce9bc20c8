//! Kernel cases at the published model's shapes: the launch geometry the GPU sees in
//! training (grids of 32 clips × 12 heads × 241 tokens, 7712-row reductions, the
//! 30 522-row word table, dropout over millions of probabilities), run on a backend and
//! compared with the CPU's kernels. Sizes: batch 32, video tokens 1 + 8 × 30 = 241, text
//! 100 tokens, width 768, 12 heads of 64, MLP 3072.

use demovlp_kernels::attention::{AttnShape, KeyPattern};
use demovlp_kernels::Rng;
use demovlp_model::backend::{Backend, TokenDims};

/// A published-shape case and its fp32 tolerance (relative to each output's largest magnitude;
/// 0: bit for bit).
pub struct ShapeCase {
    pub name: &'static str,
    pub tol: f32,
}

const B: usize = 32;
const D: usize = 768;
const HEADS: usize = 12;
const HD: usize = 64;
const FRAMES: usize = 8;
const REGIONS: usize = 30;
const VSEQ: usize = 1 + FRAMES * REGIONS;
const TSEQ: usize = 100;
const MLP: usize = 3072;
const VOCAB: usize = 30_522;

pub const CASES: &[ShapeCase] = &[
    ShapeCase { name: "attention frames (B 32, 12 heads of 64, 1 + 8 x 30 tokens, dropout 0.1)", tol: 1e-4 },
    ShapeCase { name: "attention full (B 32, 12 heads of 64, 100 tokens, padded)", tol: 1e-4 },
    ShapeCase { name: "layernorm forward + backward (7712 x 768)", tol: 1e-4 },
    ShapeCase { name: "bias reductions sum_rows_into (7712 x 768, 7712 x 3072)", tol: 1e-4 },
    ShapeCase { name: "linear forward + backward (241 x 768 -> 3072, bias)", tol: 1e-4 },
    ShapeCase { name: "gelu (7712 x 3072)", tol: 1e-5 },
    ShapeCase { name: "softmax rows (38400 x 100)", tol: 1e-5 },
    ShapeCase { name: "word table lookup + row gradient (30522 x 768, B 32 x 100 ids)", tol: 1e-5 },
    ShapeCase { name: "video tokens forward + backward (B 32, 8 x 30, 768)", tol: 1e-5 },
    ShapeCase { name: "dropout mask (32 x 12 x 241-token frame probabilities, p 0.1)", tol: 0.0 },
];

struct Io<'b, Be: Backend> {
    be: &'b Be,
    rng: Rng,
    out: Vec<(String, Vec<f32>)>,
}

impl<Be: Backend> Io<'_, Be> {
    fn up(&self, h: &[f32]) -> Be::Buf {
        let mut b = Be::Buf::default();
        self.be.write_host(&mut b, h.len(), |d| d.copy_from_slice(h));
        b
    }
    fn rand(&mut self, n: usize, scale: f32) -> Be::Buf {
        let h: Vec<f32> = (0..n).map(|_| scale * self.rng.normal()).collect();
        self.up(&h)
    }
    fn keep(&mut self, name: &str, b: &Be::Buf) {
        self.out.push((name.to_string(), self.be.to_host(Be::view(b))));
    }
}

/// Padding mask of `batch` sequences of `seq`: item i keeps `lo + (i·37 mod spread)` tokens.
fn pad_mask(batch: usize, seq: usize, lo: usize, spread: usize) -> Vec<f32> {
    (0..batch).flat_map(|i| (0..seq).map(move |t| if t < lo + (i * 37) % spread { 0.0 } else { -100.0 })).collect()
}

/// Runs case `name` (one of [`CASES`]) on `be` from fixed seeds: its outputs by name.
pub fn run<Be: Backend>(be: &Be, name: &str) -> Vec<(String, Vec<f32>)> {
    let mut io = Io { be, rng: Rng::new(0x5a9e ^ name.len() as u64), out: Vec::new() };
    match name {
        n if n.starts_with("attention ") => {
            let frames = n.starts_with("attention frames");
            let (seq, pattern) = if frames { (VSEQ, KeyPattern::Frames { regions: REGIONS }) } else { (TSEQ, KeyPattern::Full) };
            let s = AttnShape { batch: B, heads: HEADS, seq, head_dim: HD, pattern };
            let ld = 3 * D;
            let qkv = io.rand(B * seq * ld, 1.0);
            let mask = io.up(&if frames { pad_mask(B, seq, 200, 42) } else { pad_mask(B, seq, 8, 33) });
            let mut drop = Be::Buf::default();
            if frames {
                be.dropout_mask(&mut Rng::new(9), 0.1, &mut drop, s.probs_len());
            }
            let drop_v = frames.then(|| Be::view(&drop));
            let (mut probs, mut out) = (be.zeros(s.probs_len()), be.zeros(B * seq * D));
            let q = Be::view(&qkv);
            let (k, vv) = (Be::slice(q, D..B * seq * ld), Be::slice(q, 2 * D..B * seq * ld));
            let scale = 1.0 / (HD as f32).sqrt();
            be.attention_forward(&s, scale, q, k, vv, ld, Be::view(&mask), drop_v, Be::view_mut(&mut probs), Be::view_mut(&mut out));
            io.keep("probs", &probs);
            io.keep("out", &out);
            let dout = io.rand(B * seq * D, 1.0);
            let mut dqkv = be.zeros(B * seq * ld);
            be.attention_backward_rows(&s, scale, q, ld, Be::view(&probs), drop_v, Be::view(&dout), D, Be::view_mut(&mut dqkv), ld);
            io.keep("dqkv", &dqkv);
        }
        n if n.starts_with("layernorm") => {
            let rows = B * VSEQ;
            let x = io.rand(rows * D, 2.0);
            let (w, bias) = (io.rand(D, 1.0), io.rand(D, 1.0));
            let (mut y, mut mean, mut rstd) = (be.zeros(rows * D), be.zeros(rows), be.zeros(rows));
            be.layernorm_forward(
                Be::view(&x),
                Be::view(&w),
                Be::view(&bias),
                1e-6,
                Be::view_mut(&mut y),
                Be::view_mut(&mut mean),
                Be::view_mut(&mut rstd),
                D,
            );
            io.keep("y", &y);
            io.keep("mean", &mean);
            io.keep("rstd", &rstd);
            let dy = io.rand(rows * D, 1.0);
            let (mut dx, mut dw, mut db) = (io.rand(rows * D, 1.0), io.rand(D, 1.0), io.rand(D, 1.0));
            be.layernorm_backward(
                Be::view(&x),
                Be::view(&w),
                Be::view(&mean),
                Be::view(&rstd),
                Be::view(&dy),
                Be::view_mut(&mut dx),
                Be::view_mut(&mut dw),
                Be::view_mut(&mut db),
                D,
            );
            io.keep("dx", &dx);
            io.keep("dw", &dw);
            io.keep("db", &db);
        }
        n if n.starts_with("bias reductions") => {
            for width in [D, MLP] {
                let x = io.rand(B * VSEQ * width, 1.0);
                let mut acc = io.rand(width, 1.0);
                be.sum_rows_into(Be::view_mut(&mut acc), Be::view(&x));
                io.keep(&format!("sum of 7712 rows of {width}"), &acc);
            }
        }
        n if n.starts_with("linear") => {
            let (rows, din, dout) = (VSEQ, D, MLP);
            let (x, w, bias) = (io.rand(rows * din, 1.0), io.rand(dout * din, 0.05), io.rand(dout, 1.0));
            let mut y = be.zeros(rows * dout);
            be.linear_forward(Be::view(&x), din, Be::view(&w), Some(Be::view(&bias)), Be::view_mut(&mut y), rows, din, dout);
            io.keep("y", &y);
            let dy = io.rand(rows * dout, 1.0);
            let (mut dx, mut dw, mut db) = (io.rand(rows * din, 1.0), be.zeros(dout * din), be.zeros(dout));
            be.linear_backward(
                Be::view(&x),
                din,
                Be::view(&w),
                Be::view(&dy),
                rows,
                din,
                dout,
                Some(Be::view_mut(&mut dx)),
                Be::view_mut(&mut dw),
                Some(Be::view_mut(&mut db)),
                demovlp_model::backend::Grads::Overwrite,
            );
            io.keep("dx", &dx);
            io.keep("dw", &dw);
            io.keep("db", &db);
        }
        n if n.starts_with("gelu") => {
            let len = B * VSEQ * MLP;
            let x = io.rand(len, 2.0);
            let (mut y, mut g) = (be.zeros(len), be.zeros(len));
            be.gelu_forward_with_grad(Be::view(&x), Be::view_mut(&mut y), Be::view_mut(&mut g));
            io.keep("y", &y);
            io.keep("dydx", &g);
            let mut d = io.rand(len, 1.0);
            be.gelu_backward_in_place(Be::view(&x), Be::view_mut(&mut d));
            io.keep("d", &d);
        }
        n if n.starts_with("softmax") => {
            let (rows, len) = (B * HEADS * TSEQ, TSEQ);
            let (x, dy) = (io.rand(rows * len, 3.0), io.rand(rows * len, 1.0));
            let (mut y, mut dx) = (be.zeros(rows * len), be.zeros(rows * len));
            be.softmax_rows(Be::view(&x), Be::view_mut(&mut y), len);
            io.keep("y", &y);
            be.softmax_rows_backward(Be::view(&y), Be::view(&dy), Be::view_mut(&mut dx), len);
            io.keep("dx", &dx);
        }
        n if n.starts_with("word table") => {
            let table = io.rand(VOCAB * D, 0.02);
            // Captions: CLS, words anywhere in the vocabulary (a few repeated), SEP, padding 0.
            let mut ids = Vec::with_capacity(B * TSEQ);
            for i in 0..B {
                let len = 8 + (i * 37) % 33;
                for t in 0..TSEQ {
                    ids.push(match t {
                        0 => 101,
                        t if t + 1 == len => 102,
                        t if t < len => (1000 + io.rng.below(VOCAB - 1000)) as i64,
                        _ => 0,
                    });
                }
            }
            ids[5] = ids[TSEQ + 3]; // one word twice across captions: its row accumulates both
            let mut out = be.zeros(ids.len() * D);
            be.embedding_forward(&ids, Be::view(&table), D, Be::view_mut(&mut out));
            io.keep("rows", &out);
            let dout = io.rand(ids.len() * D, 1.0);
            let mut rows: Vec<usize> = ids.iter().map(|&i| i as usize).filter(|&i| i != 0).collect();
            rows.sort_unstable();
            rows.dedup();
            let mut g = be.zeros(rows.len() * D);
            be.embedding_backward_rows(&ids, 0, &rows, Be::view(&dout), D, Be::view_mut(&mut g));
            io.keep("grad rows", &g);
        }
        n if n.starts_with("video tokens") => {
            let t = TokenDims { batch: B, frames: FRAMES, regions: REGIONS, dim: D };
            let nr = FRAMES * REGIONS;
            let (cls, pos0, temporal, region) = (io.rand(D, 1.0), io.rand(D, 1.0), io.rand(FRAMES * D, 1.0), io.rand(B * nr * D, 1.0));
            let mut x = be.zeros(B * VSEQ * D);
            be.video_tokens_forward(t, Be::view(&cls), Be::view(&pos0), Be::view(&temporal), Be::view(&region), Be::view_mut(&mut x));
            io.keep("tokens", &x);
            let dx = io.rand(B * VSEQ * D, 1.0);
            let mut grad = io.rand((2 + FRAMES) * D, 1.0);
            let mut dr = be.zeros(B * nr * D);
            be.video_tokens_backward(
                t,
                Be::view(&dx),
                Be::view_mut(&mut grad),
                0..D,
                D..2 * D,
                2 * D..(2 + FRAMES) * D,
                Be::view_mut(&mut dr),
            );
            io.keep("cls, pos0, temporal gradients", &grad);
            io.keep("region gradients", &dr);
        }
        n if n.starts_with("dropout") => {
            let s = AttnShape { batch: B, heads: HEADS, seq: VSEQ, head_dim: HD, pattern: KeyPattern::Frames { regions: REGIONS } };
            let mut r = Rng::new(0xd0);
            let mut b = Be::Buf::default();
            be.dropout_mask(&mut r, 0.1, &mut b, s.probs_len());
            io.keep(&format!("mask of {}", s.probs_len()), &b);
            io.out.push(("next draw".into(), vec![r.uniform()]));
        }
        other => panic!("unknown shape case {other}"),
    }
    io.out
}
