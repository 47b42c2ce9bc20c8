//! The video tower's activation arena: what each block keeps for its backward pass and the
//! scratch every block uses in turn.

use super::VideoShape;
use crate::backend::{Backend, Cpu};

/// What one block keeps for its backward pass (n = B·(1 + F·R) tokens, D = dim,
/// M = mlp_dim). The attention probabilities and context are not kept: the backward
/// recomputes them from `qkv` (about 1 % of the block's arithmetic).
#[derive(Clone, Debug, Default)]
pub(crate) struct BlockActs<B: Backend = Cpu> {
    /// `[n]` each: norm1's row statistics.
    pub(super) ln1_mean: B::Buf,
    pub(super) ln1_rstd: B::Buf,
    /// `[n, 3D]` the fused q | k | v projection of norm1's output.
    pub(super) qkv: B::Buf,
    /// `[n, D]` x + proj(attention): the residual stream between the two branches.
    pub(super) attn_res: B::Buf,
    /// `[n]` each: norm2's row statistics.
    pub(super) ln2_mean: B::Buf,
    pub(super) ln2_rstd: B::Buf,
    /// `[n, M]` fc1 output before GELU; empty in blocks that recompute it.
    pub(crate) fc1_out: B::Buf,
}

/// Buffers every block uses in turn (forward and backward scratch).
#[derive(Clone, Debug, Default)]
pub(super) struct VideoScratch<B: Backend> {
    /// `[n, D]` norm1 / norm2 output (recomputed in the backward).
    pub(super) ln_out: B::Buf,
    /// `[n]` each: statistics of a LayerNorm recomputed in the backward (not needed again).
    pub(super) ln_mean: B::Buf,
    pub(super) ln_rstd: B::Buf,
    /// `[B·H·probs_per_head]` attention probabilities (compact per-frame layout).
    pub(super) probs: B::Buf,
    /// `[B, H, 1 + F·R, D/H]` head-major attention context, before the merge.
    pub(super) ctx_heads: B::Buf,
    /// `[n, D]` attention context, token rows.
    pub(super) ctx: B::Buf,
    /// `[n, M]` GELU output; in the backward d(GELU output), then d(fc1 output) in place.
    pub(super) gelu_out: B::Buf,
    /// `[n, max(M, 4D)]` fc1 output when the block does not keep it; in the backward GELU's
    /// derivative, then `[d(qkv) [n, 3D] | d(ctx) [n, D]]`.
    pub(super) mlp: B::Buf,
    /// `[n, D]` d(block output) on entry to a block's backward, d(block input) on exit.
    pub(super) d_x: B::Buf,
    /// `[n, D]` d(norm2 output), then d(norm1 output).
    pub(super) d_ln_out: B::Buf,
}

/// Activation arena of the video tower (reused across steps).
#[derive(Clone, Debug, Default)]
pub struct VideoActs<B: Backend = Cpu> {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    /// Additive key mask `[B, 1 + F·R]` (0 CLS / real, [`crate::mask::PAD_SCORE`] padded).
    pub mask_add: B::Buf,
    /// Projected tokens `[B, 1 + F·R, P]`: token 0 global, the rest local.
    pub out: B::Buf,
    /// Blocks `0..recompute_mlp_blocks` keep no MLP hidden activations (4·D per token) and
    /// recompute them in the backward pass: about 0.75 % more arithmetic per block for
    /// 4·D floats less per token and block. The other blocks keep them.
    pub recompute_mlp_blocks: usize,
    /// `[B·F·R, D]` feature + box embeddings of the regions; in the backward, their gradient.
    pub(super) region_emb: B::Buf,
    /// `[B·F·R, D]` box embeddings (forward only).
    pub(super) box_emb: B::Buf,
    /// `[n, D]` residual stream: `hidden[0]` the assembled tokens, `hidden[depth]` the last
    /// block's output (inference: two buffers used in turn).
    pub(super) hidden: Vec<B::Buf>,
    pub(crate) blocks: Vec<BlockActs<B>>,
    pub(super) scratch: VideoScratch<B>,
}

impl<B: Backend> VideoActs<B> {
    pub fn shape(&self) -> VideoShape {
        VideoShape { batch: self.batch, frames: self.frames, regions: self.regions }
    }
}

impl VideoActs<Cpu> {
    /// (address, capacity) of every arena buffer: lets tests prove steady-state steps reuse them.
    #[cfg(test)]
    pub(crate) fn buffers(&self) -> Vec<(usize, usize)> {
        let buf = |v: &Vec<f32>| (v.as_ptr() as usize, v.capacity());
        let s = &self.scratch;
        let mut out: Vec<_> = [&self.mask_add, &self.out, &self.region_emb, &self.box_emb].into_iter().map(buf).collect();
        out.extend(
            [&s.ln_out, &s.ln_mean, &s.ln_rstd, &s.probs, &s.ctx_heads, &s.ctx, &s.gelu_out, &s.mlp, &s.d_x, &s.d_ln_out]
                .into_iter()
                .map(buf),
        );
        out.extend(self.hidden.iter().map(buf));
        for l in &self.blocks {
            out.extend([&l.ln1_mean, &l.ln1_rstd, &l.qkv, &l.attn_res, &l.ln2_mean, &l.ln2_rstd, &l.fc1_out].into_iter().map(buf));
        }
        out
    }
}
