//! Video tower: the published "object transformer". Region tokens
//! e = Linear(2048→D)(feature) + Linear(6→D)(box), a CLS token, CLS position
//! `custom_pos_embed[0]` and `temporal_embed[f]` for frame f, additive key mask
//! (0 CLS / real, −100 padded), pre-LN blocks whose attention lets CLS see every token and a
//! region of frame f see [CLS, regions of f], then Linear(D→P, no bias) on every token.
//! `norm3` of each block and the final `norm` exist in checkpoints but are never applied.

use crate::adamw::FusedStep;
use crate::config::VideoConfig;
use crate::layers::{add_in_place, block_window, fit, range, zeroed, Grads, LayerNorm, Linear};
use crate::params::{Params, ParamsBuilder};
use demovlp_kernels::activation::{gelu_backward_in_place, gelu_forward, gelu_forward_with_grad};
use demovlp_kernels::attention::{attention_backward_rows, attention_forward, merge_heads, AttnShape, KeyPattern};
use demovlp_kernels::dropout::mul_in_place;
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

#[derive(Clone, Debug)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

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

/// What one block keeps for its backward pass. The attention probabilities and context are
/// not kept: the backward recomputes them from `qkv` (about 1 % of the block's arithmetic).
#[derive(Clone, Debug, Default)]
pub(crate) struct BlockActs {
    m1: Vec<f32>,
    r1: Vec<f32>,
    qkv: Vec<f32>,
    xmid: Vec<f32>,
    m2: Vec<f32>,
    r2: Vec<f32>,
    pub(crate) h: Vec<f32>,
}

/// Activation arena of the video tower (reused across steps).
#[derive(Clone, Debug, Default)]
pub struct VideoActs {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    /// Additive key mask `[B, 1 + F·R]` (0 CLS / real, −100 padded).
    pub mask_add: Vec<f32>,
    /// Projected tokens `[B, 1 + F·R, P]`: token 0 global, the rest local.
    pub out: Vec<f32>,
    /// Blocks `0..recompute_mlp_blocks` keep no MLP hidden activations (4·D per token) and
    /// recompute them in the backward pass: about 0.75 % more arithmetic per block for
    /// 4·D floats less per token and block. The other blocks keep them.
    pub recompute_mlp_blocks: usize,
    hs: Vec<f32>,
    e: Vec<f32>,
    xs: Vec<Vec<f32>>,
    pub(crate) blocks: Vec<BlockActs>,
    y: Vec<f32>,
    ms: Vec<f32>,
    rs: Vec<f32>,
    ctx_h: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    g: Vec<f32>,
    // backward scratch
    dx_a: Vec<f32>,
    dy: Vec<f32>,
}

impl VideoActs {
    /// (address, capacity) of every arena buffer: lets tests prove steady-state steps reuse them.
    #[cfg(test)]
    pub(crate) fn buffers(&self) -> Vec<(usize, usize)> {
        let buf = |v: &Vec<f32>| (v.as_ptr() as usize, v.capacity());
        let mut out = vec![
            buf(&self.mask_add),
            buf(&self.out),
            buf(&self.e),
            buf(&self.y),
            buf(&self.ms),
            buf(&self.rs),
            buf(&self.ctx_h),
            buf(&self.probs),
            buf(&self.ctx),
            buf(&self.tmp),
            buf(&self.g),
            buf(&self.dx_a),
            buf(&self.dy),
            buf(&self.hs),
        ];
        for v in &self.xs {
            out.push(buf(v));
        }
        for l in &self.blocks {
            out.extend([buf(&l.m1), buf(&l.r1), buf(&l.qkv), buf(&l.xmid), buf(&l.m2), buf(&l.r2), buf(&l.h)]);
        }
        out
    }
}

impl VideoTower {
    pub fn new(p: &Params, c: &VideoConfig, proj_dim: usize) -> Self {
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

    fn attn_shape(&self, b: usize, f: usize, r: usize) -> AttnShape {
        AttnShape {
            batch: b,
            heads: self.cfg.heads,
            seq: 1 + f * r,
            head_dim: self.cfg.dim / self.cfg.heads,
            pattern: KeyPattern::Frames { regions: r },
        }
    }

    /// `object` `[B, F, R, feature_dim + box_dim]`, `object_mask` `[B, F, R]` (1 real / 0 pad).
    /// Fills `a.out` and `a.mask_add`, keeping every block's activations for [`Self::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&self, data: &[f32], a: &mut VideoActs, object: &[f32], object_mask: &[f32], b: usize, f: usize, r: usize) {
        self.forward_impl(data, a, object, object_mask, b, f, r, true);
    }

    /// [`Self::forward`] for inference: every block reuses one set of activation buffers
    /// (two for the residual stream), so memory does not grow with depth. Identical outputs;
    /// no backward pass may follow.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_inference(&self, data: &[f32], a: &mut VideoActs, object: &[f32], object_mask: &[f32], b: usize, f: usize, r: usize) {
        self.forward_impl(data, a, object, object_mask, b, f, r, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_impl(&self, data: &[f32], a: &mut VideoActs, object: &[f32], object_mask: &[f32], b: usize, f: usize, r: usize, keep: bool) {
        let c = &self.cfg;
        let (d, mlp, heads) = (c.dim, c.mlp_dim, c.heads);
        let row = c.feature_dim + c.box_dim;
        assert!(d % heads == 0, "video dim {d} not divisible by {heads} heads");
        assert!(f >= 1 && r >= 1, "video input needs at least one frame and one region");
        assert!(f <= c.max_frames, "{f} frames but temporal_embed has {} rows", c.max_frames);
        assert_eq!(object.len(), b * f * r * row, "object must be [B={b}, F={f}, R={r}, {row}]");
        assert_eq!(object_mask.len(), b * f * r, "object_mask must be [B={b}, F={f}, R={r}]");
        let nr = f * r;
        let seq = 1 + nr;
        let n = b * seq;
        (a.batch, a.frames, a.regions) = (b, f, r);

        // Region tokens: feature and box projections summed.
        fit(&mut a.e, b * nr * d);
        self.object_embedding.forward(data, object, row, b * nr, &mut a.e);
        fit(&mut a.tmp, b * nr * d);
        self.pos_embedding.forward(data, &object[c.feature_dim..], row, b * nr, &mut a.tmp);
        add_in_place(&mut a.e, &a.tmp);

        // Sequence [CLS, regions…] with CLS and temporal positions.
        // Kept: one residual-stream buffer per block boundary and one activation set per
        // block. Inference: two and one, used in turn.
        a.xs.resize_with(if keep { c.depth + 1 } else { a.xs.len().max(2) }, Vec::new);
        a.blocks.resize_with(if keep { c.depth } else { a.blocks.len().max(1) }, Default::default);
        let x0 = &mut a.xs[0];
        fit(x0, n * d);
        let cls = &data[self.cls.clone()];
        let pos0 = &data[self.pos_embed.start..self.pos_embed.start + d];
        let temporal = &data[self.temporal.clone()];
        for bi in 0..b {
            let xb = &mut x0[bi * seq * d..(bi + 1) * seq * d];
            for i in 0..d {
                xb[i] = cls[i] + pos0[i];
            }
            for j in 0..nr {
                let tf = &temporal[(j / r) * d..(j / r + 1) * d];
                let src = &a.e[(bi * nr + j) * d..(bi * nr + j + 1) * d];
                let dst = &mut xb[(1 + j) * d..(2 + j) * d];
                for i in 0..d {
                    dst[i] = src[i] + tf[i];
                }
            }
        }
        fit(&mut a.mask_add, n);
        for bi in 0..b {
            a.mask_add[bi * seq] = 0.0;
            for j in 0..nr {
                a.mask_add[bi * seq + 1 + j] = (object_mask[bi * nr + j] - 1.0) * 100.0;
            }
        }

        let shape = self.attn_shape(b, f, r);
        let hd = d / heads;
        let scale = (hd as f32).powf(-0.5);
        for (li, blk) in self.blocks.iter().enumerate() {
            let (xi, oi, bi) = if keep { (li, li + 1, li) } else { (li % 2, (li + 1) % 2, 0) };
            let (x, out) = if xi < oi {
                let (lo, hi) = a.xs.split_at_mut(oi);
                (&lo[xi], &mut hi[0])
            } else {
                let (lo, hi) = a.xs.split_at_mut(xi);
                (&hi[0], &mut lo[oi])
            };
            let ba = &mut a.blocks[bi];
            // x_mid = x + proj(attn(norm1(x)))
            fit(&mut a.y, n * d);
            fit(&mut ba.m1, n);
            fit(&mut ba.r1, n);
            blk.norm1.forward(data, x, &mut a.y, &mut ba.m1, &mut ba.r1);
            fit(&mut ba.qkv, n * 3 * d);
            blk.qkv.forward(data, &a.y, d, n, &mut ba.qkv);
            fit(&mut a.probs, shape.probs_len());
            fit(&mut a.ctx_h, n * d);
            attention_forward(&shape, scale, &ba.qkv, &ba.qkv[d..], &ba.qkv[2 * d..], 3 * d, &a.mask_add, None, &mut a.probs, &mut a.ctx_h);
            fit(&mut a.ctx, n * d);
            merge_heads(&a.ctx_h, &mut a.ctx, d, 0, b, heads, seq, hd);
            fit(&mut ba.xmid, n * d);
            blk.proj.forward(data, &a.ctx, d, n, &mut ba.xmid);
            add_in_place(&mut ba.xmid, x);
            // out = x_mid + fc2(gelu(fc1(norm2(x_mid))))
            fit(&mut ba.m2, n);
            fit(&mut ba.r2, n);
            blk.norm2.forward(data, &ba.xmid, &mut a.y, &mut ba.m2, &mut ba.r2);
            let h = if !keep {
                &mut a.hs
            } else if li < a.recompute_mlp_blocks {
                ba.h = Vec::new();
                &mut a.hs
            } else {
                &mut ba.h
            };
            fit(h, n * mlp);
            blk.fc1.forward(data, &a.y, d, n, h);
            fit(&mut a.g, n * mlp);
            gelu_forward(h, &mut a.g);
            fit(out, n * d);
            blk.fc2.forward(data, &a.g, mlp, n, out);
            add_in_place(out, &ba.xmid);
        }
        fit(&mut a.out, n * self.proj.dout);
        self.proj.forward(data, &a.xs[if keep { c.depth } else { c.depth % 2 }], d, n, &mut a.out);
    }

    /// Accumulates parameter gradients given d(out) `[B, 1 + F·R, P]`; `object` must be the
    /// preceding forward's input.
    pub fn backward(&self, data: &[f32], grad: &mut [f32], a: &mut VideoActs, object: &[f32], dout: &[f32]) {
        self.backward_head(data, grad, a, dout);
        for li in (0..self.cfg.depth).rev() {
            self.block_backward(&self.blocks[li], data, grad, a, li);
        }
        self.backward_tokens(data, grad, a, object);
    }

    /// [`Self::backward`] with the optimiser step fused in: each block's gradients go to the
    /// step's block-sized scratch buffer and its AdamW update is applied as soon as they are
    /// final (no later block reads its weights). Tensors outside the blocks accumulate into
    /// `grad` as usual; the caller updates them at the end.
    pub fn backward_fused(
        &self,
        data: &mut [f32],
        grad: &mut [f32],
        a: &mut VideoActs,
        object: &[f32],
        dout: &[f32],
        step: &mut FusedStep,
    ) {
        self.backward_head(data, grad, a, dout);
        for li in (0..self.cfg.depth).rev() {
            step.block(data, self.block_windows[li].clone(), |data, grad| self.block_backward(&self.blocks_local[li], data, grad, a, li));
        }
        self.backward_tokens(data, grad, a, object);
    }

    /// Output projection: fills `a.dx_a` with d(last residual stream).
    fn backward_head(&self, data: &[f32], grad: &mut [f32], a: &mut VideoActs, dout: &[f32]) {
        let n = a.batch * (1 + a.frames * a.regions);
        let d = self.cfg.dim;
        let dx = zeroed(&mut a.dx_a, n * d);
        self.proj.backward(data, grad, &a.xs[self.cfg.depth], d, n, dout, Some(dx), Grads::Accumulate);
    }

    /// One block, given d(its output) in `a.dx_a` (replaced by d(its input)). `blk` indexes
    /// `data` / `grad`, which may be the whole buffers or this block's window of them.
    fn block_backward(&self, blk: &Block, data: &[f32], grad: &mut [f32], a: &mut VideoActs, li: usize) {
        let c = &self.cfg;
        let (b, f, r) = (a.batch, a.frames, a.regions);
        let (d, mlp, heads) = (c.dim, c.mlp_dim, c.heads);
        let hd = d / heads;
        let seq = 1 + f * r;
        let n = b * seq;
        let shape = self.attn_shape(b, f, r);
        let scale = (hd as f32).powf(-0.5);
        let ba = &a.blocks[li];
        let x = &a.xs[li];
        // MLP branch (norm2 output and GELU, optionally fc1, recomputed).
        fit(&mut a.y, n * d);
        fit(&mut a.ms, n);
        fit(&mut a.rs, n);
        blk.norm2.forward(data, &ba.xmid, &mut a.y, &mut a.ms, &mut a.rs);
        let recompute = li < a.recompute_mlp_blocks;
        if recompute {
            fit(&mut a.hs, n * mlp);
            blk.fc1.forward(data, &a.y, d, n, &mut a.hs);
        }
        fit(&mut a.g, n * mlp);
        // fc2's weight gradient first; then g is dead and its buffer takes d(g), which
        // becomes d(fc1 output) in place: one MLP-wide scratch buffer instead of three.
        // With h kept, `hs` is free until the attention part: GELU's output and derivative
        // then come from one pass (one erf per element, not two).
        if recompute {
            gelu_forward(&a.hs, &mut a.g);
        } else {
            fit(&mut a.hs, n * mlp);
            gelu_forward_with_grad(&ba.h, &mut a.g, &mut a.hs);
        }
        blk.fc2.backward(data, grad, &a.g, mlp, n, &a.dx_a, None, Grads::Overwrite);
        blk.fc2.backward_input(data, &a.dx_a, n, &mut a.g);
        if recompute {
            gelu_backward_in_place(&a.hs, &mut a.g);
        } else {
            mul_in_place(&mut a.g, &a.hs);
        }
        blk.fc1.backward(data, grad, &a.y, d, n, &a.g, None, Grads::Overwrite);
        fit(&mut a.dy, n * d);
        blk.fc1.backward_input(data, &a.g, n, &mut a.dy);
        // dx_a (the residual stream's gradient) gains the norm2 branch.
        blk.norm2.backward(data, grad, &ba.xmid, &ba.m2, &ba.r2, &a.dy, &mut a.dx_a, Grads::Overwrite);
        // Attention branch (probabilities, context and norm1 output recomputed). Its
        // scratch lives in the MLP-wide `hs`, free until the next block: [d(qkv) | d(ctx)].
        fit(&mut a.probs, shape.probs_len());
        fit(&mut a.ctx_h, n * d);
        attention_forward(&shape, scale, &ba.qkv, &ba.qkv[d..], &ba.qkv[2 * d..], 3 * d, &a.mask_add, None, &mut a.probs, &mut a.ctx_h);
        fit(&mut a.ctx, n * d);
        merge_heads(&a.ctx_h, &mut a.ctx, d, 0, b, heads, seq, hd);
        fit(&mut a.hs, (n * mlp).max(4 * n * d));
        let (dqkv, dctx) = a.hs.split_at_mut(3 * n * d);
        let dctx = &mut dctx[..n * d];
        blk.proj.backward(data, grad, &a.ctx, d, n, &a.dx_a, None, Grads::Overwrite);
        blk.proj.backward_input(data, &a.dx_a, n, dctx);
        // d(ctx) read and dq, dk, dv written as token rows: no head-major copies, no zeroing.
        attention_backward_rows(&shape, scale, &ba.qkv, &ba.qkv[d..], &ba.qkv[2 * d..], 3 * d, &a.probs, None, dctx, d, dqkv, 3 * d);
        blk.norm1.forward(data, x, &mut a.y, &mut a.ms, &mut a.rs);
        blk.qkv.backward(data, grad, &a.y, d, n, dqkv, None, Grads::Overwrite);
        blk.qkv.backward_input(data, dqkv, n, &mut a.dy);
        blk.norm1.backward(data, grad, x, &ba.m1, &ba.r1, &a.dy, &mut a.dx_a, Grads::Overwrite);
    }

    /// Token assembly (CLS + custom_pos_embed[0], regions + temporal_embed[f]) and the two
    /// region embeddings, from d(first residual stream) in `a.dx_a`.
    fn backward_tokens(&self, data: &[f32], grad: &mut [f32], a: &mut VideoActs, object: &[f32]) {
        let c = &self.cfg;
        let (b, f, r) = (a.batch, a.frames, a.regions);
        let d = c.dim;
        let row = c.feature_dim + c.box_dim;
        let nr = f * r;
        let seq = 1 + nr;
        let de = zeroed(&mut a.e, b * nr * d);
        for bi in 0..b {
            let xb = &a.dx_a[bi * seq * d..(bi + 1) * seq * d];
            add_in_place(&mut grad[self.cls.clone()], &xb[..d]);
            add_in_place(&mut grad[self.pos_embed.start..self.pos_embed.start + d], &xb[..d]);
            for j in 0..nr {
                let src = &xb[(1 + j) * d..(2 + j) * d];
                let t = self.temporal.start + (j / r) * d;
                add_in_place(&mut grad[t..t + d], src);
                de[(bi * nr + j) * d..(bi * nr + j + 1) * d].copy_from_slice(src);
            }
        }
        self.object_embedding.backward(data, grad, object, row, b * nr, &a.e, None, Grads::Accumulate);
        self.pos_embedding.backward(data, grad, &object[c.feature_dim..], row, b * nr, &a.e, None, Grads::Accumulate);
    }
}
