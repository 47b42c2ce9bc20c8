//! Text tower: Hugging Face DistilBertModel or BertModel (post-LayerNorm encoder, GELU-erf
//! FFN, padding keys masked out), forward and backward over the flat parameter buffers.
//! Dropout (training only) at Hugging Face's sites: after the embedding LayerNorm, on the
//! attention probabilities, on the FFN output before its residual, and for BERT also on
//! the attention output projection before its residual.

use crate::adamw::FusedStep;
use crate::config::{TextConfig, TextKind};
use crate::layers::{add_in_place, block_window, fit, range, zeroed, Grads, LayerNorm, Linear};
use crate::mask::{additive_mask, TEXT_ATTENTION_PAD_SCORE};
use crate::params::{Params, ParamsBuilder};
use demovlp_kernels::activation::{gelu_backward_in_place, gelu_forward};
use demovlp_kernels::attention::{attention_backward_rows_split, attention_forward, merge_heads, AttnShape, KeyPattern};
use demovlp_kernels::dropout::{dropout_mask, masked, mul_in_place};
use demovlp_kernels::embedding::{embedding_backward, embedding_forward};
use demovlp_kernels::Rng;
use std::ops::Range;

/// `[PAD]` id of the uncased BERT vocabulary and Hugging Face's `padding_idx` of the word table.
const PAD_TOKEN_ID: usize = 0;

/// Parameter names of one encoder layer, per model family (Hugging Face layouts).
struct LayerNames {
    q: String,
    k: String,
    v: String,
    o: String,
    ln1: String,
    ffn1: String,
    ffn2: String,
    ln2: String,
}

fn layer_names(kind: TextKind, i: usize) -> LayerNames {
    match kind {
        TextKind::Distilbert => {
            let p = format!("text_model.transformer.layer.{i}");
            LayerNames {
                q: format!("{p}.attention.q_lin"),
                k: format!("{p}.attention.k_lin"),
                v: format!("{p}.attention.v_lin"),
                o: format!("{p}.attention.out_lin"),
                ln1: format!("{p}.sa_layer_norm"),
                ffn1: format!("{p}.ffn.lin1"),
                ffn2: format!("{p}.ffn.lin2"),
                ln2: format!("{p}.output_layer_norm"),
            }
        }
        TextKind::Bert => {
            let p = format!("text_model.encoder.layer.{i}");
            LayerNames {
                q: format!("{p}.attention.self.query"),
                k: format!("{p}.attention.self.key"),
                v: format!("{p}.attention.self.value"),
                o: format!("{p}.attention.output.dense"),
                ln1: format!("{p}.attention.output.LayerNorm"),
                ffn1: format!("{p}.intermediate.dense"),
                ffn2: format!("{p}.output.dense"),
                ln2: format!("{p}.output.LayerNorm"),
            }
        }
    }
}

/// Declare the text tower's tensors in Hugging Face state_dict order.
pub fn declare(pb: &mut ParamsBuilder, c: &TextConfig) {
    let (d, h) = (c.dim, c.hidden_dim);
    pb.add("text_model.embeddings.word_embeddings.weight", &[c.vocab_size, d]);
    pb.add("text_model.embeddings.position_embeddings.weight", &[c.max_position_embeddings, d]);
    if c.kind == TextKind::Bert {
        pb.add("text_model.embeddings.token_type_embeddings.weight", &[c.type_vocab_size.max(1), d]);
    }
    pb.add("text_model.embeddings.LayerNorm.weight", &[d]);
    pb.add("text_model.embeddings.LayerNorm.bias", &[d]);
    let lin = |pb: &mut ParamsBuilder, name: &str, din: usize, dout: usize| {
        pb.add(format!("{name}.weight"), &[dout, din]);
        pb.add(format!("{name}.bias"), &[dout]);
    };
    let ln = |pb: &mut ParamsBuilder, name: &str| {
        pb.add(format!("{name}.weight"), &[d]);
        pb.add(format!("{name}.bias"), &[d]);
    };
    for i in 0..c.layers {
        let n = layer_names(c.kind, i);
        lin(pb, &n.q, d, d);
        lin(pb, &n.k, d, d);
        lin(pb, &n.v, d, d);
        lin(pb, &n.o, d, d);
        ln(pb, &n.ln1);
        lin(pb, &n.ffn1, d, h);
        lin(pb, &n.ffn2, h, d);
        ln(pb, &n.ln2);
    }
    if c.kind == TextKind::Bert {
        // BertModel's pooler: in checkpoints, unused by retrieval (no gradient).
        pb.add_unused("text_model.pooler.dense.weight", &[d, d]);
        pb.add_unused("text_model.pooler.dense.bias", &[d]);
    }
}

/// Dropout probabilities of the text tower in training. The published model trains its
/// DistilBERT in train mode, i.e. with the Hugging Face defaults `dropout` = 0.1 and
/// `attention_dropout` = 0.1 (BERT: hidden/attention_probs dropout 0.1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TextDropout {
    pub hidden: f32,
    pub attention: f32,
}

impl TextDropout {
    pub const PUBLISHED: TextDropout = TextDropout { hidden: 0.1, attention: 0.1 };
}

/// Sizes of one text batch: `batch` sequences of `len` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextShape {
    pub batch: usize,
    pub len: usize,
}

impl TextShape {
    /// Token rows of every activation: batch · len.
    pub fn tokens(&self) -> usize {
        self.batch * self.len
    }
}

/// One batch of text input: token ids and attention mask (1 real / 0 padding), both `[B, L]`.
#[derive(Clone, Copy, Debug)]
pub struct TextInput<'a> {
    pub ids: &'a [i64],
    pub mask: &'a [i64],
    pub shape: TextShape,
}

#[derive(Clone, Debug)]
struct TextLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    ffn1: Linear,
    ffn2: Linear,
    ln2: LayerNorm,
}

/// What one layer keeps for its backward pass (n = B·L tokens, D = dim, F = hidden_dim).
/// The attention probabilities are not kept: the backward recomputes them from q and k
/// (under 1 % of the tower's arithmetic, 3.8 MB per layer at the published size). The FFN
/// hidden activations `ffn1_out` (9.8 MB per layer) are kept when the forward pass is asked
/// to (training), else the backward recomputes them from `ln1_out`.
#[derive(Clone, Debug, Default)]
struct TextLayerActs {
    /// `[n, D]` each: the attention's query, key and value projections.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[n, D]` attention context, token rows.
    ctx: Vec<f32>,
    /// `[n, D]` out_lin(ctx) (dropped for BERT) + x: the input of ln1.
    attn_res: Vec<f32>,
    /// `[n]` each: ln1's row statistics.
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    /// `[n, D]` ln1 output, the FFN's input.
    ln1_out: Vec<f32>,
    /// `[n, F]` ffn1 output before GELU, when kept.
    ffn1_out: Vec<f32>,
    /// `[n, D]` ffn2(gelu(ffn1_out)) (dropped) + ln1_out: the input of ln2.
    ffn_res: Vec<f32>,
    /// `[n]` each: ln2's row statistics.
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    /// Dropout multipliers, when that dropout is active: `[B·H·L·L]` on the attention
    /// probabilities, `[n, D]` on the BERT attention output and on the FFN output.
    attn_drop: Vec<f32>,
    attn_out_drop: Vec<f32>,
    ffn_drop: Vec<f32>,
}

/// Buffers every layer uses in turn (forward and backward scratch).
#[derive(Clone, Debug, Default)]
struct TextScratch {
    /// `[B·H·L·L]` attention probabilities of the layer at hand (recomputed in the backward).
    probs: Vec<f32>,
    /// `[B, H, L, D/H]` head-major attention context, before the merge into token rows.
    ctx_heads: Vec<f32>,
    /// `[n, F]` ffn1 output when the layer does not keep it.
    ffn1_out: Vec<f32>,
    /// `[n, F]` GELU output; in the backward, d(GELU output) then d(ffn1 output) in place.
    gelu_out: Vec<f32>,
    /// `[n, D]` d(layer output) on entry to a layer's backward, d(layer input) on exit.
    d_x: Vec<f32>,
    /// `[n, D]` d(ln1 output): the FFN branch and the residual.
    d_ln1_out: Vec<f32>,
    /// `[n, D]` d(LayerNorm input): d(ffn_res), then d(attn_res), then d(embeddings).
    d_res: Vec<f32>,
    /// `[n, D]` d(attention context), token rows.
    d_ctx: Vec<f32>,
    /// `[n, D]` each: d(q), d(k), d(v), token rows.
    d_q: Vec<f32>,
    d_k: Vec<f32>,
    d_v: Vec<f32>,
    /// `[n, D]` a gradient taken through a dropout site.
    d_dropped: Vec<f32>,
}

/// Activation arena of the text tower (reused across steps).
#[derive(Clone, Debug, Default)]
pub struct TextActs {
    pub batch: usize,
    pub len: usize,
    /// Training recomputes the FFN hidden activations too (less memory, more arithmetic).
    pub recompute_ffn: bool,
    /// Whether the last forward pass kept them (the backward pass follows it).
    ffn_hidden_kept: bool,
    /// Dropout applied in the last forward (hidden, attention).
    drop_hidden: bool,
    drop_attn: bool,
    /// `[n, D]` word + position (+ token type) embeddings, the input of the embedding LayerNorm.
    emb: Vec<f32>,
    /// `[n]` each: the embedding LayerNorm's row statistics.
    emb_mean: Vec<f32>,
    emb_rstd: Vec<f32>,
    /// `[n, D]` dropout multipliers on the embedding output, when active.
    emb_drop: Vec<f32>,
    /// `[B, L]` additive key mask of the attention (0 real, [`TEXT_ATTENTION_PAD_SCORE`] padding).
    mask_add: Vec<f32>,
    /// `[n, D]` hidden states: `hidden[0]` the embeddings' output, `hidden[layers]` the
    /// last_hidden_state.
    hidden: Vec<Vec<f32>>,
    layers: Vec<TextLayerActs>,
    scratch: TextScratch,
    /// The word table's gradient of the last fused backward, by row (see [`WordGradRows`]).
    pub word_grad: WordGradRows,
}

/// The word-embedding gradient of one batch, kept by row: only the rows of the ids the
/// batch looks up can be nonzero (a few hundred of 30 522), so the fused step never holds
/// the dense 94 MB table gradient. Rows in increasing id order; `[PAD]` excluded (it gets
/// no gradient, as Hugging Face's `padding_idx`).
#[derive(Clone, Debug, Default)]
pub struct WordGradRows {
    pub ids: Vec<usize>,
    /// `[ids.len(), dim]`.
    pub grad: Vec<f32>,
}

impl WordGradRows {
    /// Accumulates d(embedding output) `dout` `[tokens, dim]` by looked-up id, tokens in
    /// order (the dense [`embedding_backward`]'s summation order for every row).
    fn accumulate(&mut self, ids: &[i64], dout: &[f32], dim: usize) {
        self.ids.clear();
        self.ids.extend(ids.iter().map(|&i| i as usize).filter(|&i| i != PAD_TOKEN_ID));
        self.ids.sort_unstable();
        self.ids.dedup();
        self.grad.clear();
        self.grad.resize(self.ids.len() * dim, 0.0);
        for (t, &id) in ids.iter().enumerate() {
            if id as usize == PAD_TOKEN_ID {
                continue;
            }
            let row = self.ids.binary_search(&(id as usize)).expect("id collected above");
            let dst = &mut self.grad[row * dim..(row + 1) * dim];
            dst.iter_mut().zip(&dout[t * dim..(t + 1) * dim]).for_each(|(d, s)| *d += s);
        }
    }
}

impl TextActs {
    /// `[B, L, D]` output of the last layer.
    pub fn last_hidden(&self) -> &[f32] {
        self.hidden.last().map(|v| &v[..]).unwrap_or(&[])
    }

    fn shape(&self) -> TextShape {
        TextShape { batch: self.batch, len: self.len }
    }

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
        out.extend(
            [
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
            ]
            .into_iter()
            .map(buf),
        );
        out.extend(self.hidden.iter().map(buf));
        for l in &self.layers {
            out.extend(
                [
                    &l.q,
                    &l.k,
                    &l.v,
                    &l.ctx,
                    &l.attn_res,
                    &l.ln1_mean,
                    &l.ln1_rstd,
                    &l.ln1_out,
                    &l.ffn1_out,
                    &l.ffn_res,
                    &l.ln2_mean,
                    &l.ln2_rstd,
                    &l.attn_drop,
                    &l.attn_out_drop,
                    &l.ffn_drop,
                ]
                .into_iter()
                .map(buf),
            );
        }
        out
    }
}

/// What each layer's pass takes from the tower: sizes, the attention mask and which dropout
/// is active (with the generator that draws the forward pass's masks).
struct LayerRun<'a> {
    kind: TextKind,
    shape: TextShape,
    dim: usize,
    hidden_dim: usize,
    attn: AttnShape,
    scale: f32,
    /// `[B, L]` additive key mask.
    mask_add: &'a [f32],
    dropout: TextDropout,
    drop_hidden: bool,
    drop_attn: bool,
    rng: Option<&'a mut Rng>,
    ffn_hidden_kept: bool,
}

impl LayerRun<'_> {
    /// Draws a fresh dropout mask of `n` values into `buf` when that dropout is active.
    fn draw(&mut self, buf: &mut Vec<f32>, n: usize, prob: f32) {
        if let (Some(rng), true) = (self.rng.as_deref_mut(), prob > 0.0) {
            fit(buf, n);
            dropout_mask(rng, prob, buf);
        }
    }
}

impl TextLayer {
    fn rebased(&self, base: usize) -> TextLayer {
        TextLayer {
            q: self.q.rebased(base),
            k: self.k.rebased(base),
            v: self.v.rebased(base),
            o: self.o.rebased(base),
            ln1: self.ln1.rebased(base),
            ffn1: self.ffn1.rebased(base),
            ffn2: self.ffn2.rebased(base),
            ln2: self.ln2.rebased(base),
        }
    }

    /// out = ln2(ffn(x1) + x1) with x1 = ln1(attn_out(attention(x)) + x) (post-LN).
    fn forward(&self, data: &[f32], run: &mut LayerRun, x: &[f32], out: &mut Vec<f32>, acts: &mut TextLayerActs, s: &mut TextScratch) {
        let (n, d, hid) = (run.shape.tokens(), run.dim, run.hidden_dim);
        let TextShape { batch, len } = run.shape;
        for (lin, buf) in [(&self.q, &mut acts.q), (&self.k, &mut acts.k), (&self.v, &mut acts.v)] {
            fit(buf, n * d);
            lin.forward(data, x, d, n, buf);
        }
        // Attention.
        fit(&mut s.probs, run.attn.probs_len());
        fit(&mut s.ctx_heads, n * d);
        let p_attn = run.dropout.attention;
        run.draw(&mut acts.attn_drop, run.attn.probs_len(), p_attn);
        let attn_drop = run.drop_attn.then_some(&acts.attn_drop[..]);
        attention_forward(&run.attn, run.scale, &acts.q, &acts.k, &acts.v, d, run.mask_add, attn_drop, &mut s.probs, &mut s.ctx_heads);
        fit(&mut acts.ctx, n * d);
        merge_heads(&s.ctx_heads, &mut acts.ctx, d, 0, batch, run.attn.heads, len, run.attn.head_dim);
        // attn_res = out_lin(ctx) (+ dropout, BERT) + x; ln1_out = ln1(attn_res)
        fit(&mut acts.attn_res, n * d);
        self.o.forward(data, &acts.ctx, d, n, &mut acts.attn_res);
        if run.kind == TextKind::Bert {
            let p = run.dropout.hidden;
            run.draw(&mut acts.attn_out_drop, n * d, p);
            if run.drop_hidden {
                mul_in_place(&mut acts.attn_res, &acts.attn_out_drop);
            }
        }
        add_in_place(&mut acts.attn_res, x);
        fit(&mut acts.ln1_out, n * d);
        fit(&mut acts.ln1_mean, n);
        fit(&mut acts.ln1_rstd, n);
        self.ln1.forward(data, &acts.attn_res, &mut acts.ln1_out, &mut acts.ln1_mean, &mut acts.ln1_rstd);
        // ffn_res = ffn2(gelu(ffn1(ln1_out))) (+ dropout) + ln1_out; out = ln2(ffn_res)
        let ffn1_out = if run.ffn_hidden_kept { &mut acts.ffn1_out } else { &mut s.ffn1_out };
        fit(ffn1_out, n * hid);
        self.ffn1.forward(data, &acts.ln1_out, d, n, ffn1_out);
        fit(&mut s.gelu_out, n * hid);
        gelu_forward(ffn1_out, &mut s.gelu_out);
        fit(&mut acts.ffn_res, n * d);
        self.ffn2.forward(data, &s.gelu_out, hid, n, &mut acts.ffn_res);
        let p = run.dropout.hidden;
        run.draw(&mut acts.ffn_drop, n * d, p);
        if run.drop_hidden {
            mul_in_place(&mut acts.ffn_res, &acts.ffn_drop);
        }
        add_in_place(&mut acts.ffn_res, &acts.ln1_out);
        fit(out, n * d);
        fit(&mut acts.ln2_mean, n);
        fit(&mut acts.ln2_rstd, n);
        self.ln2.forward(data, &acts.ffn_res, out, &mut acts.ln2_mean, &mut acts.ln2_rstd);
    }

    /// Given d(layer output) in `s.d_x`, writes this layer's parameter gradients (overwritten)
    /// and leaves d(`x`) in `s.d_x`. `self` indexes `data` / `grad`: the whole buffers or
    /// this layer's window of them.
    fn backward(&self, data: &[f32], grad: &mut [f32], run: &LayerRun, x: &[f32], acts: &TextLayerActs, s: &mut TextScratch) {
        let (n, d, hid) = (run.shape.tokens(), run.dim, run.hidden_dim);
        // out = ln2(ffn_res)
        let d_ffn_res = zeroed(&mut s.d_res, n * d);
        self.ln2.backward(data, grad, &acts.ffn_res, &acts.ln2_mean, &acts.ln2_rstd, &s.d_x, d_ffn_res, Grads::Overwrite);
        // ffn_res = ffn2(gelu(ffn1(ln1_out))) + ln1_out, ffn1's output kept or recomputed.
        let ffn1_out: &[f32] = if run.ffn_hidden_kept {
            &acts.ffn1_out
        } else {
            fit(&mut s.ffn1_out, n * hid);
            self.ffn1.forward(data, &acts.ln1_out, d, n, &mut s.ffn1_out);
            &s.ffn1_out
        };
        fit(&mut s.gelu_out, n * hid);
        gelu_forward(ffn1_out, &mut s.gelu_out);
        let d_ffn2_out = masked(&s.d_res, run.drop_hidden.then_some(&acts.ffn_drop[..]), &mut s.d_dropped);
        // ffn2's weight gradient first; then gelu_out is dead and its buffer takes
        // d(gelu_out), which becomes d(ffn1_out) in place (one hidden-wide scratch buffer,
        // no zeroing).
        self.ffn2.backward(data, grad, &s.gelu_out, hid, n, d_ffn2_out, None, Grads::Overwrite);
        self.ffn2.backward_input(data, d_ffn2_out, n, &mut s.gelu_out);
        gelu_backward_in_place(ffn1_out, &mut s.gelu_out);
        fit(&mut s.d_ln1_out, n * d);
        s.d_ln1_out.copy_from_slice(&s.d_res);
        self.ffn1.backward(data, grad, &acts.ln1_out, d, n, &s.gelu_out, Some(&mut s.d_ln1_out), Grads::Overwrite);
        // ln1_out = ln1(attn_res)
        let d_attn_res = zeroed(&mut s.d_res, n * d);
        self.ln1.backward(data, grad, &acts.attn_res, &acts.ln1_mean, &acts.ln1_rstd, &s.d_ln1_out, d_attn_res, Grads::Overwrite);
        // attn_res = out_lin(attention(q, k, v)) + x
        s.d_x.copy_from_slice(&s.d_res);
        let d_ctx = zeroed(&mut s.d_ctx, n * d);
        let attn_out_drop = (run.drop_hidden && run.kind == TextKind::Bert).then_some(&acts.attn_out_drop[..]);
        let d_attn_out = masked(&s.d_res, attn_out_drop, &mut s.d_dropped);
        self.o.backward(data, grad, &acts.ctx, d, n, d_attn_out, Some(d_ctx), Grads::Overwrite);
        // The probabilities, recomputed (the context that comes with them is not needed).
        let attn_drop = run.drop_attn.then_some(&acts.attn_drop[..]);
        fit(&mut s.probs, run.attn.probs_len());
        fit(&mut s.ctx_heads, n * d);
        attention_forward(&run.attn, run.scale, &acts.q, &acts.k, &acts.v, d, run.mask_add, attn_drop, &mut s.probs, &mut s.ctx_heads);
        // d(ctx) read and d(q), d(k), d(v) written as token rows: no head-major copies.
        // Overwritten: no zeroing.
        for buf in [&mut s.d_q, &mut s.d_k, &mut s.d_v] {
            fit(buf, n * d);
        }
        #[rustfmt::skip]
        attention_backward_rows_split(&run.attn, run.scale, &acts.q, &acts.k, &acts.v, d, &s.probs, attn_drop, &s.d_ctx, d, &mut s.d_q, &mut s.d_k, &mut s.d_v, d);
        for (lin, dy) in [(&self.q, &s.d_q), (&self.k, &s.d_k), (&self.v, &s.d_v)] {
            lin.backward(data, grad, x, d, n, dy, Some(&mut s.d_x), Grads::Overwrite);
        }
    }
}

#[derive(Clone, Debug)]
pub struct TextTower {
    pub cfg: TextConfig,
    word: Range<usize>,
    pos: Range<usize>,
    token_type: Option<Range<usize>>,
    ln_emb: LayerNorm,
    layers: Vec<TextLayer>,
    /// Where each layer's tensors lie in the flat buffers, and the layer addressed inside
    /// that window (for the fused optimiser step).
    layer_windows: Vec<Range<usize>>,
    layers_local: Vec<TextLayer>,
}

impl TextTower {
    pub fn new(p: &Params, c: &TextConfig) -> Self {
        let (d, h) = (c.dim, c.hidden_dim);
        let layers = (0..c.layers)
            .map(|i| {
                let n = layer_names(c.kind, i);
                TextLayer {
                    q: Linear::new(p, &n.q, d, d, true),
                    k: Linear::new(p, &n.k, d, d, true),
                    v: Linear::new(p, &n.v, d, d, true),
                    o: Linear::new(p, &n.o, d, d, true),
                    ln1: LayerNorm::new(p, &n.ln1, d, c.layer_norm_eps),
                    ffn1: Linear::new(p, &n.ffn1, d, h, true),
                    ffn2: Linear::new(p, &n.ffn2, h, d, true),
                    ln2: LayerNorm::new(p, &n.ln2, d, c.layer_norm_eps),
                }
            })
            .collect::<Vec<TextLayer>>();
        let layer_windows: Vec<Range<usize>> = (0..c.layers)
            .map(|i| {
                let q = layer_names(c.kind, i).q;
                // "text_model.transformer.layer.{i}." / "text_model.encoder.layer.{i}."
                let prefix = &q[..q.find(".attention").expect("layer names contain .attention") + 1];
                block_window(p, prefix)
            })
            .collect();
        let layers_local = layers.iter().zip(&layer_windows).map(|(l, w)| l.rebased(w.start)).collect();
        TextTower {
            cfg: c.clone(),
            layer_windows,
            layers_local,
            word: range(p, "text_model.embeddings.word_embeddings.weight"),
            pos: range(p, "text_model.embeddings.position_embeddings.weight"),
            token_type: (c.kind == TextKind::Bert).then(|| range(p, "text_model.embeddings.token_type_embeddings.weight")),
            ln_emb: LayerNorm::new(p, "text_model.embeddings.LayerNorm", d, c.layer_norm_eps),
            layers,
        }
    }

    /// Where the word-embedding table lies in the flat buffers (`[vocab, dim]`).
    pub fn word_range(&self) -> Range<usize> {
        self.word.clone()
    }

    /// Where each transformer block's tensors lie in the flat buffers.
    pub fn layer_windows(&self) -> &[Range<usize>] {
        &self.layer_windows
    }

    /// The per-layer context of a pass over `a`'s batch (`rng` only for a forward pass).
    fn run<'a>(&self, a: &'a TextActs, dropout: TextDropout, rng: Option<&'a mut Rng>) -> LayerRun<'a> {
        let c = &self.cfg;
        let shape = a.shape();
        let head_dim = c.dim / c.heads;
        LayerRun {
            kind: c.kind,
            shape,
            dim: c.dim,
            hidden_dim: c.hidden_dim,
            attn: AttnShape { batch: shape.batch, heads: c.heads, seq: shape.len, head_dim, pattern: KeyPattern::Full },
            scale: 1.0 / (head_dim as f32).sqrt(),
            mask_add: &a.mask_add,
            dropout,
            drop_hidden: a.drop_hidden,
            drop_attn: a.drop_attn,
            rng,
            ffn_hidden_kept: a.ffn_hidden_kept,
        }
    }

    /// Runs the encoder; the result is `a.last_hidden()` `[B, L, D]`. With `dropout`
    /// (training), masks are drawn from the generator and kept for the backward pass;
    /// `keep_ffn_hidden` keeps each layer's FFN hidden activations for it as well.
    pub fn forward(
        &self,
        data: &[f32],
        a: &mut TextActs,
        input: TextInput,
        dropout: Option<(TextDropout, &mut Rng)>,
        keep_ffn_hidden: bool,
    ) {
        let c = &self.cfg;
        let TextShape { batch, len } = input.shape;
        assert!(c.dim.is_multiple_of(c.heads), "text dim {} not divisible by {} heads", c.dim, c.heads);
        assert!(len <= c.max_position_embeddings, "text length {len} exceeds max_position_embeddings {}", c.max_position_embeddings);
        assert!(input.ids.len() == batch * len && input.mask.len() == batch * len, "text inputs must be [B={batch}, L={len}]");
        (a.batch, a.len) = (batch, len);
        a.ffn_hidden_kept = keep_ffn_hidden;
        let (p, mut rng) = match dropout {
            Some((p, rng)) => (p, Some(rng)),
            None => (TextDropout::default(), None),
        };
        a.drop_hidden = p.hidden > 0.0;
        a.drop_attn = p.attention > 0.0;
        a.hidden.resize_with(c.layers + 1, Vec::new);
        a.layers.resize_with(c.layers, Default::default);
        self.embeddings_forward(data, a, input, p, rng.as_deref_mut());
        fit(&mut a.mask_add, input.shape.tokens());
        for (m, &v) in a.mask_add.iter_mut().zip(input.mask) {
            *m = additive_mask((v != 0) as u8 as f32, TEXT_ATTENTION_PAD_SCORE);
        }
        let (mut hidden, mut layers, mut scratch) =
            (std::mem::take(&mut a.hidden), std::mem::take(&mut a.layers), std::mem::take(&mut a.scratch));
        let mut run = self.run(a, p, rng);
        for (li, (layer, acts)) in self.layers.iter().zip(&mut layers).enumerate() {
            let (before, after) = hidden.split_at_mut(li + 1);
            layer.forward(data, &mut run, &before[li], &mut after[0], acts, &mut scratch);
        }
        (a.hidden, a.layers, a.scratch) = (hidden, layers, scratch);
    }

    /// word + position (+ token type 0 for BERT) embeddings, LayerNorm, dropout: `a.hidden[0]`.
    fn embeddings_forward(&self, data: &[f32], a: &mut TextActs, input: TextInput, p: TextDropout, rng: Option<&mut Rng>) {
        let (n, d, len) = (input.shape.tokens(), self.cfg.dim, input.shape.len);
        fit(&mut a.emb, n * d);
        embedding_forward(input.ids, &data[self.word.clone()], d, &mut a.emb, false);
        let pos = &data[self.pos.clone()];
        for row in a.emb.chunks_exact_mut(len * d) {
            add_in_place(row, &pos[..len * d]);
        }
        if let Some(tt) = &self.token_type {
            let t0 = &data[tt.start..tt.start + d];
            a.emb.chunks_exact_mut(d).for_each(|r| add_in_place(r, t0));
        }
        fit(&mut a.hidden[0], n * d);
        fit(&mut a.emb_mean, n);
        fit(&mut a.emb_rstd, n);
        self.ln_emb.forward(data, &a.emb, &mut a.hidden[0], &mut a.emb_mean, &mut a.emb_rstd);
        if let (Some(rng), true) = (rng, p.hidden > 0.0) {
            fit(&mut a.emb_drop, n * d);
            dropout_mask(rng, p.hidden, &mut a.emb_drop);
        }
        if a.drop_hidden {
            mul_in_place(&mut a.hidden[0], &a.emb_drop);
        }
    }

    /// Accumulates parameter gradients given d(last_hidden_state) `[B, L, D]`;
    /// `ids` must be those of the preceding forward.
    pub fn backward(&self, data: &[f32], grad: &mut [f32], a: &mut TextActs, ids: &[i64], dlast: &[f32]) {
        let mut s = self.backward_begin(a, dlast);
        let run = self.run(a, TextDropout::default(), None);
        for li in (0..self.cfg.layers).rev() {
            self.layers[li].backward(data, grad, &run, &a.hidden[li], &a.layers[li], &mut s);
        }
        a.scratch = s;
        self.embeddings_backward(data, grad, a, ids, false);
    }

    /// [`Self::backward`] with the optimiser step fused in: each layer's gradients go to the
    /// step's scratch window and its AdamW update is applied as soon as they are final.
    /// The position (/ token type) embeddings accumulate into `grad`, the word table's rows
    /// into `a.word_grad` (the dense table gradient is not touched); the caller updates
    /// them at the end.
    pub fn backward_fused(&self, data: &mut [f32], grad: &mut [f32], a: &mut TextActs, ids: &[i64], dlast: &[f32], step: &mut FusedStep) {
        let mut s = self.backward_begin(a, dlast);
        let run = self.run(a, TextDropout::default(), None);
        for li in (0..self.cfg.layers).rev() {
            let (layer, x, acts) = (&self.layers_local[li], &a.hidden[li], &a.layers[li]);
            step.block(data, self.layer_windows[li].clone(), |data, grad| layer.backward(data, grad, &run, x, acts, &mut s));
        }
        a.scratch = s;
        self.embeddings_backward(data, grad, a, ids, true);
    }

    /// The scratch buffers, taken out of the arena, with d(last hidden state) in `d_x`.
    fn backward_begin(&self, a: &mut TextActs, dlast: &[f32]) -> TextScratch {
        let n = a.shape().tokens() * self.cfg.dim;
        let mut s = std::mem::take(&mut a.scratch);
        fit(&mut s.d_x, n);
        s.d_x.copy_from_slice(&dlast[..n]);
        s
    }

    /// Embedding dropout and LayerNorm, then the word / position (/ token type) lookups,
    /// from d(embedding output) in `a.scratch.d_x`. The word table's gradient goes to `grad`
    /// (dense) or, with `word_rows`, to `a.word_grad`.
    fn embeddings_backward(&self, data: &[f32], grad: &mut [f32], a: &mut TextActs, ids: &[i64], word_rows: bool) {
        let (len, d) = (a.len, self.cfg.dim);
        let n = a.shape().tokens();
        let s = &mut a.scratch;
        if a.drop_hidden {
            mul_in_place(&mut s.d_x, &a.emb_drop);
        }
        let d_emb = zeroed(&mut s.d_res, n * d);
        self.ln_emb.backward(data, grad, &a.emb, &a.emb_mean, &a.emb_rstd, &s.d_x, d_emb, Grads::Accumulate);
        let d_emb = &s.d_res[..n * d];
        if word_rows {
            a.word_grad.accumulate(ids, d_emb, d);
        } else {
            let d_word = &mut grad[self.word.clone()];
            embedding_backward(ids, d_emb, d, d_word);
            // Hugging Face builds the word table with padding_idx = pad_token_id (0): the [PAD]
            // row receives no gradient, however often it is looked up.
            d_word[PAD_TOKEN_ID * d..(PAD_TOKEN_ID + 1) * d].iter_mut().for_each(|g| *g = 0.0);
        }
        let d_pos = &mut grad[self.pos.clone()];
        for row in d_emb.chunks_exact(len * d) {
            add_in_place(&mut d_pos[..len * d], row);
        }
        if let Some(tt) = &self.token_type {
            let d_type0 = &mut grad[tt.start..tt.start + d];
            d_emb.chunks_exact(d).for_each(|r| add_in_place(d_type0, r));
        }
    }
}
