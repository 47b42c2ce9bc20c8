//! Video tower: the published "object transformer". Region tokens
//! e = Linear(2048→D)(feature) + Linear(6→D)(box), a CLS token, CLS position
//! `custom_pos_embed[0]` and `temporal_embed[f]` for frame f, additive key mask
//! (0 CLS / real, −100 padded), pre-LN blocks whose attention lets CLS see every token and a
//! region of frame f see [CLS, regions of f], then Linear(D→P, no bias) on every token.
//! `norm3` of each block and the final `norm` exist in checkpoints but are never applied.

mod acts;

pub use acts::VideoActs;

use crate::adamw::FusedStep;
use crate::backend::{zeroed, Backend, TokenDims};
use crate::config::VideoConfig;
use crate::layers::{block_window, range, Grads, LayerNorm, Linear};
use crate::mask::{additive_mask, PAD_SCORE};
use crate::params::{Params, ParamsBuilder};
use acts::{BlockActs, VideoScratch};
use demovlp_kernels::attention::{AttnShape, KeyPattern};
use std::ops::Range;

/// Declare the video tower's tensors in the published state_dict order.
pub fn declare(pb: &mut ParamsBuilder, c: &VideoConfig, proj_dim: usize) {
    let (d, m) = (c.dim, c.mlp_dim);
    pb.add("object_model.cls_token", &[1, 1, d]);
    pb.add("object_model.custom_pos_embed", &[1, c.pos_embed_rows, d]);
    pb.add("object_model.temporal_embed", &[1, c.max_frames, d]);
    for i in 0..c.depth {
        let p = format!("object_model.blocks.{i}");
        pb.add(format!("{p}.norm1.weight"), &[d]);
        pb.add(format!("{p}.norm1.bias"), &[d]);
        pb.add(format!("{p}.attn.qkv.weight"), &[3 * d, d]);
        pb.add(format!("{p}.attn.qkv.bias"), &[3 * d]);
        pb.add(format!("{p}.attn.proj.weight"), &[d, d]);
        pb.add(format!("{p}.attn.proj.bias"), &[d]);
        pb.add(format!("{p}.norm2.weight"), &[d]);
        pb.add(format!("{p}.norm2.bias"), &[d]);
        pb.add(format!("{p}.mlp.fc1.weight"), &[m, d]);
        pb.add(format!("{p}.mlp.fc1.bias"), &[m]);
        pb.add(format!("{p}.mlp.fc2.weight"), &[d, m]);
        pb.add(format!("{p}.mlp.fc2.bias"), &[d]);
        pb.add_unused(format!("{p}.norm3.weight"), &[d]);
        pb.add_unused(format!("{p}.norm3.bias"), &[d]);
    }
    pb.add_unused("object_model.norm.weight", &[d]);
    pb.add_unused("object_model.norm.bias", &[d]);
    pb.add("object_model.object_embedding.weight", &[d, c.feature_dim]);
    pb.add("object_model.object_embedding.bias", &[d]);
    pb.add("object_model.pos_embedding.weight", &[d, c.box_dim]);
    pb.add("object_model.pos_embedding.bias", &[d]);
    pb.add("object_model.proj.weight", &[proj_dim, d]);
}

/// One batch of video input: region features `object` `[B, F, R, feature_dim + box_dim]`
/// on the backend, `mask` `[B, F, R]` (1 real / 0 padding) on the host.
pub struct VideoInput<'a, B: Backend> {
    pub object: B::View<'a>,
    pub mask: &'a [f32],
    pub shape: VideoShape,
}

impl<B: Backend> Clone for VideoInput<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for VideoInput<'_, B> {}

/// Sizes of one video batch: `batch` clips of `frames` frames of `regions` regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VideoShape {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
}

impl VideoShape {
    /// Region tokens per clip: F·R.
    pub fn region_tokens(&self) -> usize {
        self.frames * self.regions
    }

    /// Tokens per clip: CLS + F·R.
    pub fn seq(&self) -> usize {
        1 + self.region_tokens()
    }

    /// Token rows of every activation: B·(1 + F·R).
    pub fn tokens(&self) -> usize {
        self.batch * self.seq()
    }
}

#[derive(Clone, Debug)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// What each block's pass takes from the tower.
struct BlockRun<'a, B: Backend> {
    be: &'a B,
    shape: VideoShape,
    dim: usize,
    mlp_dim: usize,
    attn: AttnShape,
    scale: f32,
    /// `[B, 1 + F·R]` additive key mask.
    mask_add: B::View<'a>,
    /// This block keeps its fc1 output (else the backward recomputes it).
    keep_fc1_out: bool,
}

impl<B: Backend> Clone for BlockRun<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for BlockRun<'_, B> {}

impl Block {
    fn rebased(&self, base: usize) -> Block {
        Block {
            norm1: self.norm1.rebased(base),
            qkv: self.qkv.rebased(base),
            proj: self.proj.rebased(base),
            norm2: self.norm2.rebased(base),
            fc1: self.fc1.rebased(base),
            fc2: self.fc2.rebased(base),
        }
    }

    /// attn_res = x + proj(attention(norm1(x))); out = attn_res + fc2(gelu(fc1(norm2(attn_res)))).
    fn forward<B: Backend>(
        &self,
        data: B::View<'_>,
        run: &BlockRun<B>,
        x: B::View<'_>,
        out: &mut B::Buf,
        acts: &mut BlockActs<B>,
        s: &mut VideoScratch<B>,
    ) {
        let be = run.be;
        let (n, d, mlp) = (run.shape.tokens(), run.dim, run.mlp_dim);
        let hd = run.attn.head_dim;
        be.fit(&mut s.ln_out, n * d);
        be.fit(&mut acts.ln1_mean, n);
        be.fit(&mut acts.ln1_rstd, n);
        self.norm1.forward(be, data, x, B::view_mut(&mut s.ln_out), B::view_mut(&mut acts.ln1_mean), B::view_mut(&mut acts.ln1_rstd));
        be.fit(&mut acts.qkv, n * 3 * d);
        self.qkv.forward(be, data, B::view(&s.ln_out), d, n, B::view_mut(&mut acts.qkv));
        be.fit(&mut s.probs, run.attn.probs_len());
        be.fit(&mut s.ctx_heads, n * d);
        let qkv = B::view(&acts.qkv);
        let (q, k, v) = (qkv, B::slice(qkv, d..3 * n * d), B::slice(qkv, 2 * d..3 * n * d));
        be.attention_forward(
            &run.attn,
            run.scale,
            q,
            k,
            v,
            3 * d,
            run.mask_add,
            None,
            B::view_mut(&mut s.probs),
            B::view_mut(&mut s.ctx_heads),
        );
        be.fit(&mut s.ctx, n * d);
        be.merge_heads(B::view(&s.ctx_heads), B::view_mut(&mut s.ctx), d, run.shape.batch, run.attn.heads, run.shape.seq(), hd);
        be.fit(&mut acts.attn_res, n * d);
        self.proj.forward(be, data, B::view(&s.ctx), d, n, B::view_mut(&mut acts.attn_res));
        be.add_in_place(B::view_mut(&mut acts.attn_res), x);
        // MLP branch.
        be.fit(&mut acts.ln2_mean, n);
        be.fit(&mut acts.ln2_rstd, n);
        self.norm2.forward(
            be,
            data,
            B::view(&acts.attn_res),
            B::view_mut(&mut s.ln_out),
            B::view_mut(&mut acts.ln2_mean),
            B::view_mut(&mut acts.ln2_rstd),
        );
        let fc1_out = if run.keep_fc1_out { &mut acts.fc1_out } else { &mut s.mlp };
        be.fit(fc1_out, n * mlp);
        self.fc1.forward(be, data, B::view(&s.ln_out), d, n, B::view_mut(fc1_out));
        be.fit(&mut s.gelu_out, n * mlp);
        be.gelu_forward(B::view(fc1_out), B::view_mut(&mut s.gelu_out));
        be.fit(out, n * d);
        self.fc2.forward(be, data, B::view(&s.gelu_out), mlp, n, B::view_mut(out));
        be.add_in_place(B::view_mut(out), B::view(&acts.attn_res));
    }

    /// Given d(block output) in `s.d_x`, writes this block's parameter gradients
    /// (overwritten) and leaves d(`x`) in `s.d_x`. `self` indexes `data` / `grad`, which may
    /// be the whole buffers or this block's window of them.
    fn backward<B: Backend>(
        &self,
        data: B::View<'_>,
        mut grad: B::ViewMut<'_>,
        run: &BlockRun<B>,
        x: B::View<'_>,
        acts: &BlockActs<B>,
        s: &mut VideoScratch<B>,
    ) {
        let be = run.be;
        let (n, d, mlp) = (run.shape.tokens(), run.dim, run.mlp_dim);
        let hd = run.attn.head_dim;
        let g = &mut grad;
        // MLP branch (norm2 output and GELU, optionally fc1, recomputed).
        be.fit(&mut s.ln_out, n * d);
        be.fit(&mut s.ln_mean, n);
        be.fit(&mut s.ln_rstd, n);
        self.norm2.forward(
            be,
            data,
            B::view(&acts.attn_res),
            B::view_mut(&mut s.ln_out),
            B::view_mut(&mut s.ln_mean),
            B::view_mut(&mut s.ln_rstd),
        );
        let recompute = !run.keep_fc1_out;
        if recompute {
            be.fit(&mut s.mlp, n * mlp);
            self.fc1.forward(be, data, B::view(&s.ln_out), d, n, B::view_mut(&mut s.mlp));
        }
        be.fit(&mut s.gelu_out, n * mlp);
        // fc2's weight gradient first; then gelu_out is dead and its buffer takes
        // d(gelu_out), which becomes d(fc1_out) in place: one MLP-wide scratch buffer instead
        // of three. With fc1_out kept, `mlp` is free until the attention part: GELU's output
        // and derivative then come from one pass (one erf per element, not two).
        if recompute {
            be.gelu_forward(B::view(&s.mlp), B::view_mut(&mut s.gelu_out));
        } else {
            be.fit(&mut s.mlp, n * mlp);
            be.gelu_forward_with_grad(B::view(&acts.fc1_out), B::view_mut(&mut s.gelu_out), B::view_mut(&mut s.mlp));
        }
        let d_x = B::view(&s.d_x);
        self.fc2.backward(be, data, B::reborrow(g), B::view(&s.gelu_out), mlp, n, d_x, None, Grads::Overwrite);
        self.fc2.backward_input(be, data, d_x, n, B::view_mut(&mut s.gelu_out));
        if recompute {
            be.gelu_backward_in_place(B::view(&s.mlp), B::view_mut(&mut s.gelu_out));
        } else {
            be.mul_in_place(B::view_mut(&mut s.gelu_out), B::view(&s.mlp));
        }
        self.fc1.backward(be, data, B::reborrow(g), B::view(&s.ln_out), d, n, B::view(&s.gelu_out), None, Grads::Overwrite);
        be.fit(&mut s.d_ln_out, n * d);
        self.fc1.backward_input(be, data, B::view(&s.gelu_out), n, B::view_mut(&mut s.d_ln_out));
        // d_x (the residual stream's gradient) gains the norm2 branch.
        let (mean, rstd) = (B::view(&acts.ln2_mean), B::view(&acts.ln2_rstd));
        self.norm2.backward(
            be,
            data,
            B::reborrow(g),
            B::view(&acts.attn_res),
            mean,
            rstd,
            B::view(&s.d_ln_out),
            B::view_mut(&mut s.d_x),
            Grads::Overwrite,
        );
        // Attention branch (probabilities, context and norm1 output recomputed). Its
        // scratch lives in the MLP-wide `mlp`, free until the next block: [d(qkv) | d(ctx)].
        let qkv = B::view(&acts.qkv);
        let (q, k, v) = (qkv, B::slice(qkv, d..3 * n * d), B::slice(qkv, 2 * d..3 * n * d));
        be.fit(&mut s.probs, run.attn.probs_len());
        be.fit(&mut s.ctx_heads, n * d);
        be.attention_forward(
            &run.attn,
            run.scale,
            q,
            k,
            v,
            3 * d,
            run.mask_add,
            None,
            B::view_mut(&mut s.probs),
            B::view_mut(&mut s.ctx_heads),
        );
        be.fit(&mut s.ctx, n * d);
        be.merge_heads(B::view(&s.ctx_heads), B::view_mut(&mut s.ctx), d, run.shape.batch, run.attn.heads, run.shape.seq(), hd);
        be.fit(&mut s.mlp, (n * mlp).max(4 * n * d));
        let (mut d_qkv, d_ctx) = B::split_at_mut(B::view_mut(&mut s.mlp), 3 * n * d);
        let mut d_ctx = B::slice_mut(d_ctx, 0..n * d);
        let d_x = B::view(&s.d_x);
        self.proj.backward(be, data, B::reborrow(g), B::view(&s.ctx), d, n, d_x, None, Grads::Overwrite);
        self.proj.backward_input(be, data, d_x, n, B::reborrow(&mut d_ctx));
        // d(ctx) read and dq, dk, dv written as token rows: no head-major copies, no zeroing.
        let probs = B::view(&s.probs);
        be.attention_backward_rows(&run.attn, run.scale, qkv, 3 * d, probs, None, B::as_view(&d_ctx), d, B::reborrow(&mut d_qkv), 3 * d);
        self.norm1.forward(be, data, x, B::view_mut(&mut s.ln_out), B::view_mut(&mut s.ln_mean), B::view_mut(&mut s.ln_rstd));
        let d_qkv = B::as_view(&d_qkv);
        self.qkv.backward(be, data, B::reborrow(g), B::view(&s.ln_out), d, n, d_qkv, None, Grads::Overwrite);
        self.qkv.backward_input(be, data, d_qkv, n, B::view_mut(&mut s.d_ln_out));
        let (mean, rstd) = (B::view(&acts.ln1_mean), B::view(&acts.ln1_rstd));
        self.norm1.backward(be, data, B::reborrow(g), x, mean, rstd, B::view(&s.d_ln_out), B::view_mut(&mut s.d_x), Grads::Overwrite);
    }
}

#[derive(Clone, Debug)]
pub struct VideoTower {
    pub cfg: VideoConfig,
    cls: Range<usize>,
    pos_embed: Range<usize>,
    temporal: Range<usize>,
    object_embedding: Linear,
    pos_embedding: Linear,
    blocks: Vec<Block>,
    /// Where each block's tensors lie in the flat buffers, and the block addressed inside
    /// that window (for the fused optimiser step, whose gradients live in a block-sized
    /// scratch buffer).
    block_windows: Vec<Range<usize>>,
    blocks_local: Vec<Block>,
    proj: Linear,
}

impl VideoTower {
    pub fn new<B: Backend>(p: &Params<B>, c: &VideoConfig, proj_dim: usize) -> Self {
        let (d, m) = (c.dim, c.mlp_dim);
        let blocks = (0..c.depth)
            .map(|i| {
                let p_ = format!("object_model.blocks.{i}");
                Block {
                    norm1: LayerNorm::new(p, &format!("{p_}.norm1"), d, c.layer_norm_eps),
                    qkv: Linear::new(p, &format!("{p_}.attn.qkv"), d, 3 * d, true),
                    proj: Linear::new(p, &format!("{p_}.attn.proj"), d, d, true),
                    norm2: LayerNorm::new(p, &format!("{p_}.norm2"), d, c.layer_norm_eps),
                    fc1: Linear::new(p, &format!("{p_}.mlp.fc1"), d, m, true),
                    fc2: Linear::new(p, &format!("{p_}.mlp.fc2"), m, d, true),
                }
            })
            .collect::<Vec<Block>>();
        let block_windows: Vec<Range<usize>> = (0..c.depth).map(|i| block_window(p, &format!("object_model.blocks.{i}."))).collect();
        let blocks_local = blocks.iter().zip(&block_windows).map(|(b, w)| b.rebased(w.start)).collect();
        VideoTower {
            cfg: c.clone(),
            block_windows,
            blocks_local,
            cls: range(p, "object_model.cls_token"),
            pos_embed: range(p, "object_model.custom_pos_embed"),
            temporal: range(p, "object_model.temporal_embed"),
            object_embedding: Linear::new(p, "object_model.object_embedding", c.feature_dim, d, true),
            pos_embedding: Linear::new(p, "object_model.pos_embedding", c.box_dim, d, true),
            blocks,
            proj: Linear::new(p, "object_model.proj", d, proj_dim, false),
        }
    }

    /// Where each transformer block's tensors lie in the flat buffers.
    pub fn block_windows(&self) -> &[Range<usize>] {
        &self.block_windows
    }

    /// The per-block context of a pass over `shape`.
    fn run<'a, B: Backend>(&self, be: &'a B, shape: VideoShape, mask_add: B::View<'a>) -> BlockRun<'a, B> {
        let head_dim = self.cfg.dim / self.cfg.heads;
        BlockRun {
            be,
            shape,
            dim: self.cfg.dim,
            mlp_dim: self.cfg.mlp_dim,
            attn: AttnShape {
                batch: shape.batch,
                heads: self.cfg.heads,
                seq: shape.seq(),
                head_dim,
                pattern: KeyPattern::Frames { regions: shape.regions },
            },
            scale: (head_dim as f32).powf(-0.5),
            mask_add,
            keep_fc1_out: true,
        }
    }

    /// Fills `a.out` and `a.mask_add`, keeping every block's activations for [`Self::backward`].
    pub fn forward<B: Backend>(&self, be: &B, data: B::View<'_>, a: &mut VideoActs<B>, input: VideoInput<'_, B>) {
        self.forward_impl(be, data, a, input, true);
    }

    /// [`Self::forward`] for inference: every block reuses one set of activation buffers
    /// (two for the residual stream), so memory does not grow with depth. Identical outputs;
    /// no backward pass may follow.
    pub fn forward_inference<B: Backend>(&self, be: &B, data: B::View<'_>, a: &mut VideoActs<B>, input: VideoInput<'_, B>) {
        self.forward_impl(be, data, a, input, false);
    }

    fn forward_impl<B: Backend>(&self, be: &B, data: B::View<'_>, a: &mut VideoActs<B>, input: VideoInput<'_, B>, keep: bool) {
        let VideoInput { object, mask: object_mask, shape } = input;
        let c = &self.cfg;
        let VideoShape { batch: b, frames: f, regions: r } = shape;
        let row = c.feature_dim + c.box_dim;
        assert!(c.dim.is_multiple_of(c.heads), "video dim {} not divisible by {} heads", c.dim, c.heads);
        assert!(f >= 1 && r >= 1, "video input needs at least one frame and one region");
        assert!(f <= c.max_frames, "{f} frames but temporal_embed has {} rows", c.max_frames);
        assert_eq!(B::view_len(object), b * f * r * row, "object must be [B={b}, F={f}, R={r}, {row}]");
        assert_eq!(object_mask.len(), b * f * r, "object_mask must be [B={b}, F={f}, R={r}]");
        (a.batch, a.frames, a.regions) = (b, f, r);
        // Kept: one residual-stream buffer per block boundary and one activation set per
        // block. Inference: two and one, used in turn.
        a.hidden.resize_with(if keep { c.depth + 1 } else { a.hidden.len().max(2) }, Default::default);
        a.blocks.resize_with(if keep { c.depth } else { a.blocks.len().max(1) }, Default::default);
        self.tokens_forward(be, data, a, object, object_mask);
        let (mut hidden, mut blocks, mut s) =
            (std::mem::take(&mut a.hidden), std::mem::take(&mut a.blocks), std::mem::take(&mut a.scratch));
        let run = self.run(be, shape, B::view(&a.mask_add));
        for (li, blk) in self.blocks.iter().enumerate() {
            let (xi, oi, bi) = if keep { (li, li + 1, li) } else { (li % 2, (li + 1) % 2, 0) };
            let (x, out) = if xi < oi {
                let (lo, hi) = hidden.split_at_mut(oi);
                (&lo[xi], &mut hi[0])
            } else {
                let (lo, hi) = hidden.split_at_mut(xi);
                (&hi[0], &mut lo[oi])
            };
            let keep_fc1_out = keep && li >= a.recompute_mlp_blocks;
            if keep && !keep_fc1_out {
                blocks[bi].fc1_out = B::Buf::default();
            }
            blk.forward(data, &BlockRun { keep_fc1_out, ..run }, B::view(x), out, &mut blocks[bi], &mut s);
        }
        be.fit(&mut a.out, shape.tokens() * self.proj.dout);
        let last = B::view(&hidden[if keep { c.depth } else { c.depth % 2 }]);
        self.proj.forward(be, data, last, c.dim, shape.tokens(), B::view_mut(&mut a.out));
        (a.hidden, a.blocks, a.scratch) = (hidden, blocks, s);
    }

    fn token_dims(&self, shape: VideoShape) -> TokenDims {
        TokenDims { batch: shape.batch, frames: shape.frames, regions: shape.regions, dim: self.cfg.dim }
    }

    /// Region tokens (feature and box projections summed), the sequence [CLS, regions…] with
    /// CLS and temporal positions in `a.hidden[0]`, and the additive key mask.
    fn tokens_forward<B: Backend>(&self, be: &B, data: B::View<'_>, a: &mut VideoActs<B>, object: B::View<'_>, object_mask: &[f32]) {
        let c = &self.cfg;
        let shape = a.shape();
        let (b, d) = (shape.batch, c.dim);
        let (nr, seq) = (shape.region_tokens(), shape.seq());
        let row = c.feature_dim + c.box_dim;
        let len = B::view_len(object);
        be.fit(&mut a.region_emb, b * nr * d);
        self.object_embedding.forward(be, data, object, row, b * nr, B::view_mut(&mut a.region_emb));
        be.fit(&mut a.box_emb, b * nr * d);
        self.pos_embedding.forward(be, data, B::slice(object, c.feature_dim..len), row, b * nr, B::view_mut(&mut a.box_emb));
        be.add_in_place(B::view_mut(&mut a.region_emb), B::view(&a.box_emb));
        be.fit(&mut a.hidden[0], shape.tokens() * d);
        let (cls, pos0, temporal) = (
            B::slice(data, self.cls.clone()),
            B::slice(data, self.pos_embed.start..self.pos_embed.start + d),
            B::slice(data, self.temporal.clone()),
        );
        be.video_tokens_forward(self.token_dims(shape), cls, pos0, temporal, B::view(&a.region_emb), B::view_mut(&mut a.hidden[0]));
        be.write_host(&mut a.mask_add, shape.tokens(), |mask_add| {
            for bi in 0..b {
                mask_add[bi * seq] = 0.0;
                for j in 0..nr {
                    mask_add[bi * seq + 1 + j] = additive_mask(object_mask[bi * nr + j], PAD_SCORE);
                }
            }
        });
    }

    /// Accumulates parameter gradients given d(out) `[B, 1 + F·R, P]`; `object` must be the
    /// preceding forward's input.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        mut grad: B::ViewMut<'_>,
        a: &mut VideoActs<B>,
        object: B::View<'_>,
        dout: B::View<'_>,
    ) {
        let mut s = self.head_backward(be, data, B::reborrow(&mut grad), a, dout);
        for li in (0..self.cfg.depth).rev() {
            let run = BlockRun { keep_fc1_out: li >= a.recompute_mlp_blocks, ..self.run(be, a.shape(), B::view(&a.mask_add)) };
            self.blocks[li].backward(data, B::reborrow(&mut grad), &run, B::view(&a.hidden[li]), &a.blocks[li], &mut s);
        }
        a.scratch = s;
        self.tokens_backward(be, data, grad, a, object);
    }

    /// [`Self::backward`] with the optimiser step fused in: each block's gradients go to the
    /// step's block-sized scratch buffer and its AdamW update is applied as soon as they are
    /// final (no later block reads its weights). Tensors outside the blocks accumulate into
    /// `grad` as usual; the caller updates them at the end.
    pub fn backward_fused<B: Backend>(
        &self,
        be: &B,
        params: &mut Params<B>,
        a: &mut VideoActs<B>,
        object: B::View<'_>,
        dout: B::View<'_>,
        step: &mut FusedStep<B>,
    ) {
        let (data, grad) = (&mut params.data, &mut params.grad);
        let mut s = self.head_backward(be, B::view(data), B::view_mut(grad), a, dout);
        for li in (0..self.cfg.depth).rev() {
            let run = BlockRun { keep_fc1_out: li >= a.recompute_mlp_blocks, ..self.run(be, a.shape(), B::view(&a.mask_add)) };
            let (blk, x, acts) = (&self.blocks_local[li], B::view(&a.hidden[li]), &a.blocks[li]);
            step.block(data, self.block_windows[li].clone(), |data, grad| blk.backward(data, grad, &run, x, acts, &mut s));
        }
        a.scratch = s;
        self.tokens_backward(be, B::view(data), B::view_mut(grad), a, object);
    }

    /// Output projection: returns the scratch buffers, taken out of the arena, with
    /// d(last residual stream) in `d_x`.
    fn head_backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        grad: B::ViewMut<'_>,
        a: &mut VideoActs<B>,
        dout: B::View<'_>,
    ) -> VideoScratch<B> {
        let (n, d) = (a.shape().tokens(), self.cfg.dim);
        let mut s = std::mem::take(&mut a.scratch);
        let d_x = zeroed(be, &mut s.d_x, n * d);
        self.proj.backward(be, data, grad, B::view(&a.hidden[self.cfg.depth]), d, n, dout, Some(d_x), Grads::Accumulate);
        s
    }

    /// Token assembly (CLS + custom_pos_embed[0], regions + temporal_embed[f]) and the two
    /// region embeddings, from d(first residual stream) in `a.scratch.d_x`.
    fn tokens_backward<B: Backend>(&self, be: &B, data: B::View<'_>, mut grad: B::ViewMut<'_>, a: &mut VideoActs<B>, object: B::View<'_>) {
        let c = &self.cfg;
        let shape = a.shape();
        let (b, d) = (shape.batch, c.dim);
        let nr = shape.region_tokens();
        let row = c.feature_dim + c.box_dim;
        let d_region = zeroed(be, &mut a.region_emb, b * nr * d);
        let pos0 = self.pos_embed.start..self.pos_embed.start + d;
        be.video_tokens_backward(
            self.token_dims(shape),
            B::view(&a.scratch.d_x),
            B::reborrow(&mut grad),
            self.cls.clone(),
            pos0,
            self.temporal.clone(),
            d_region,
        );
        let d_region = B::view(&a.region_emb);
        self.object_embedding.backward(be, data, B::reborrow(&mut grad), object, row, b * nr, d_region, None, Grads::Accumulate);
        let boxes = B::slice(object, c.feature_dim..B::view_len(object));
        self.pos_embedding.backward(be, data, grad, boxes, row, b * nr, d_region, None, Grads::Accumulate);
    }
}
