//! The text tower's activation arena: what each layer keeps for its backward pass, the
//! scratch every layer uses in turn, and the word table's gradient by row.

use super::TextShape;
use crate::backend::{Backend, Cpu};

/// What one layer keeps for its backward pass (n = B·L tokens, D = dim, F = hidden_dim).
/// The attention probabilities are not kept: the backward recomputes them from q and k
/// (under 1 % of the tower's arithmetic, 3.8 MB per layer at the published size). The FFN
/// hidden activations `ffn1_out` (9.8 MB per layer) are kept when the forward pass is asked
/// to (training), else the backward recomputes them from `ln1_out`.
#[derive(Clone, Debug, Default)]
pub(super) struct TextLayerActs<B: Backend> {
    /// `[n, D]` each: the attention's query, key and value projections.
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    /// `[n, D]` attention context, token rows.
    pub ctx: B::Buf,
    /// `[n, D]` out_lin(ctx) (dropped for BERT) + x: the input of ln1.
    pub attn_res: B::Buf,
    /// `[n]` each: ln1's row statistics.
    pub ln1_mean: B::Buf,
    pub ln1_rstd: B::Buf,
    /// `[n, D]` ln1 output, the FFN's input.
    pub ln1_out: B::Buf,
    /// `[n, F]` ffn1 output before GELU, when kept.
    pub ffn1_out: B::Buf,
    /// `[n, D]` ffn2(gelu(ffn1_out)) (dropped) + ln1_out: the input of ln2.
    pub ffn_res: B::Buf,
    /// `[n]` each: ln2's row statistics.
    pub ln2_mean: B::Buf,
    pub ln2_rstd: B::Buf,
    /// Dropout multipliers, when that dropout is active: `[B·H·L·L]` on the attention
    /// probabilities, `[n, D]` on the BERT attention output and on the FFN output.
    pub attn_drop: B::Buf,
    pub attn_out_drop: B::Buf,
    pub ffn_drop: B::Buf,
}

/// Buffers every layer uses in turn (forward and backward scratch).
#[derive(Clone, Debug, Default)]
pub(super) struct TextScratch<B: Backend> {
    /// `[B·H·L·L]` attention probabilities of the layer at hand (recomputed in the backward).
    pub probs: B::Buf,
    /// `[B, H, L, D/H]` head-major attention context, before the merge into token rows.
    pub ctx_heads: B::Buf,
    /// `[n, F]` ffn1 output when the layer does not keep it.
    pub ffn1_out: B::Buf,
    /// `[n, F]` GELU output; in the backward, d(GELU output) then d(ffn1 output) in place.
    pub gelu_out: B::Buf,
    /// `[n, D]` d(layer output) on entry to a layer's backward, d(layer input) on exit.
    pub d_x: B::Buf,
    /// `[n, D]` d(ln1 output): the FFN branch and the residual.
    pub d_ln1_out: B::Buf,
    /// `[n, D]` d(LayerNorm input): d(ffn_res), then d(attn_res), then d(embeddings).
    pub d_res: B::Buf,
    /// `[n, D]` d(attention context), token rows.
    pub d_ctx: B::Buf,
    /// `[n, D]` each: d(q), d(k), d(v), token rows.
    pub d_q: B::Buf,
    pub d_k: B::Buf,
    pub d_v: B::Buf,
    /// `[n, D]` a gradient taken through a dropout site.
    pub d_dropped: B::Buf,
}

/// Activation arena of the text tower (reused across steps).
#[derive(Clone, Debug, Default)]
pub struct TextActs<B: Backend = Cpu> {
    pub batch: usize,
    pub len: usize,
    /// Training recomputes the FFN hidden activations too (less memory, more arithmetic).
    pub recompute_ffn: bool,
    /// Whether the last forward pass kept them (the backward pass follows it).
    pub(super) ffn_hidden_kept: bool,
    /// Dropout applied in the last forward (hidden, attention).
    pub(super) drop_hidden: bool,
    pub(super) drop_attn: bool,
    /// `[n, D]` word + position (+ token type) embeddings, the input of the embedding LayerNorm.
    pub(super) emb: B::Buf,
    /// `[n]` each: the embedding LayerNorm's row statistics.
    pub(super) emb_mean: B::Buf,
    pub(super) emb_rstd: B::Buf,
    /// `[n, D]` dropout multipliers on the embedding output, when active.
    pub(super) emb_drop: B::Buf,
    /// `[B, L]` additive key mask of the attention (0 real, [`crate::mask::TEXT_ATTENTION_PAD_SCORE`] padding).
    pub(super) mask_add: B::Buf,
    /// `[n, D]` hidden states: `hidden[0]` the embeddings' output, `hidden[layers]` the
    /// last_hidden_state.
    pub(super) hidden: Vec<B::Buf>,
    pub(super) layers: Vec<TextLayerActs<B>>,
    pub(super) scratch: TextScratch<B>,
    /// The word table's gradient of the last fused backward, by row (see [`WordGradRows`]).
    pub word_grad: WordGradRows<B>,
}

/// The word-embedding gradient of one batch, kept by row: only the rows of the ids the
/// batch looks up can be nonzero (a few hundred of 30 522), so the fused step never holds
/// the dense 94 MB table gradient. Rows in increasing id order; `[PAD]` excluded (it gets
/// no gradient, as Hugging Face's `padding_idx`).
#[derive(Clone, Debug, Default)]
pub struct WordGradRows<B: Backend = Cpu> {
    pub ids: Vec<usize>,
    /// `[ids.len(), dim]`.
    pub grad: B::Buf,
}

impl<B: Backend> WordGradRows<B> {
    /// Accumulates d(embedding output) `dout` `[tokens, dim]` by looked-up id other than
    /// `pad`, tokens in order (the dense embedding backward's summation order for every row).
    pub(super) fn accumulate(&mut self, be: &B, ids: &[i64], pad: usize, dout: B::View<'_>, dim: usize) {
        self.ids.clear();
        self.ids.extend(ids.iter().map(|&i| i as usize).filter(|&i| i != pad));
        self.ids.sort_unstable();
        self.ids.dedup();
        // Room for the most rows a batch of this many tokens can touch, once: a later batch
        // with more distinct ids then allocates nothing.
        if B::buf_len(&self.grad) < ids.len() * dim {
            be.fit(&mut self.grad, ids.len() * dim);
        }
        be.fit(&mut self.grad, self.ids.len() * dim);
        be.embedding_backward_rows(ids, pad, &self.ids, dout, dim, B::view_mut(&mut self.grad));
    }
}

impl<B: Backend> TextActs<B> {
    /// `[B, L, D]` output of the last layer.
    pub fn last_hidden(&self) -> B::View<'_> {
        B::view(self.hidden.last().expect("a forward pass ran"))
    }

    pub(super) fn shape(&self) -> TextShape {
        TextShape { batch: self.batch, len: self.len }
    }
}

impl TextActs<Cpu> {
    /// Fills every kept FFN hidden activation with NaN (tests: the recompute path must not read them).
    #[cfg(test)]
    pub(crate) fn poison_kept_ffn_hidden(&mut self) {
        self.layers.iter_mut().for_each(|l| l.ffn1_out.fill(f32::NAN));
    }

    /// (address, capacity) of every arena buffer: lets tests prove steady-state steps reuse them.
    #[cfg(test)]
    pub(crate) fn buffers(&self) -> Vec<(usize, usize)> {
        let buf = |v: &Vec<f32>| (v.as_ptr() as usize, v.capacity());
        let s = &self.scratch;
        let mut out: Vec<_> = [&self.emb, &self.emb_mean, &self.emb_rstd, &self.mask_add, &self.emb_drop].into_iter().map(buf).collect();
        let scratch = [
            &s.probs,
            &s.ctx_heads,
            &s.ffn1_out,
            &s.gelu_out,
            &s.d_x,
            &s.d_ln1_out,
            &s.d_res,
            &s.d_ctx,
            &s.d_q,
            &s.d_k,
            &s.d_v,
            &s.d_dropped,
        ];
        out.extend(scratch.into_iter().map(buf));
        out.extend(self.hidden.iter().map(buf));
        for l in &self.layers {
            let kept = [&l.q, &l.k, &l.v, &l.ctx, &l.attn_res, &l.ln1_mean, &l.ln1_rstd, &l.ln1_out, &l.ffn1_out, &l.ffn_res];
            out.extend(kept.into_iter().map(buf));
            out.extend([&l.ln2_mean, &l.ln2_rstd, &l.attn_drop, &l.attn_out_drop, &l.ffn_drop].into_iter().map(buf));
        }
        out
    }
}
