//! Text tower: Hugging Face DistilBertModel or BertModel (post-LayerNorm encoder, GELU-erf
//! FFN, padding keys masked out), forward and backward over the flat parameter buffers.
//! Dropout (training only) at Hugging Face's sites: after the embedding LayerNorm, on the
//! attention probabilities, on the FFN output before its residual, and for BERT also on
//! the attention output projection before its residual.

use crate::adamw::FusedStep;
use crate::config::{TextConfig, TextKind};
use crate::layers::{add_in_place, block_window, fit, range, zeroed, Grads, LayerNorm, Linear};
use crate::params::{Params, ParamsBuilder};
use demovlp_kernels::activation::{gelu_backward_in_place, gelu_forward};
use demovlp_kernels::attention::{attention_backward, attention_forward, merge_heads, split_heads, AttnShape, KeyPattern};
use demovlp_kernels::dropout::{dropout_mask, masked, mul_in_place};
use demovlp_kernels::embedding::{embedding_backward, embedding_forward};
use demovlp_kernels::Rng;
use std::ops::Range;

/// Score added to padded keys: exp underflows to exactly 0, like HF's `finfo.min` fill.
const TEXT_MASK_NEG: f32 = -1e30;
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

/// What one layer keeps for its backward pass. The attention probabilities are not kept:
/// the backward recomputes them from q and k (under 1 % of the tower's arithmetic, 3.8 MB
/// per layer at the published size). The FFN hidden activations `h` (9.8 MB per layer) are
/// kept when the forward pass is asked to (`keep_ffn_hidden`; training: recomputing them
/// is 1.5 % of a step's arithmetic), else recomputed from x1.
#[derive(Clone, Debug, Default)]
struct LayerActs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    z1: Vec<f32>,
    m1: Vec<f32>,
    r1: Vec<f32>,
    x1: Vec<f32>,
    z2: Vec<f32>,
    m2: Vec<f32>,
    r2: Vec<f32>,
    /// ffn1 output (before GELU), when kept.
    h: Vec<f32>,
    attn_drop: Vec<f32>,
    sa_drop: Vec<f32>,
    ffn_drop: Vec<f32>,
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
    emb: Vec<f32>,
    emb_mean: Vec<f32>,
    emb_rstd: Vec<f32>,
    mask_add: Vec<f32>,
    /// Dropout applied in the last forward (hidden, attention).
    drop_hidden: bool,
    drop_attn: bool,
    emb_drop: Vec<f32>,
    /// Hidden states: xs[0] = embeddings output, xs[layers] = last_hidden_state.
    xs: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    ctx_h: Vec<f32>,
    /// Attention probabilities and FFN hidden activations of the layer at hand.
    probs: Vec<f32>,
    hs: Vec<f32>,
    g: Vec<f32>,
    // backward scratch
    dx_a: Vec<f32>,
    dx_b: Vec<f32>,
    dz: Vec<f32>,
    dctx: Vec<f32>,
    dctx_h: Vec<f32>,
    dq_h: Vec<f32>,
    dk_h: Vec<f32>,
    dv_h: Vec<f32>,
    dq: Vec<f32>,
    dtmp: Vec<f32>,
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
        self.xs.last().map(|v| &v[..]).unwrap_or(&[])
    }
}

impl TextActs {
    /// Fills every kept FFN hidden activation with NaN (tests: the recompute path must not read them).
    #[cfg(test)]
    pub(crate) fn poison_kept_ffn_hidden(&mut self) {
        self.layers.iter_mut().for_each(|l| l.h.fill(f32::NAN));
    }

    /// (address, capacity) of every arena buffer: lets tests prove steady-state steps reuse them.
    #[cfg(test)]
    pub(crate) fn buffers(&self) -> Vec<(usize, usize)> {
        let buf = |v: &Vec<f32>| (v.as_ptr() as usize, v.capacity());
        let mut out = vec![
            buf(&self.emb),
            buf(&self.emb_mean),
            buf(&self.emb_rstd),
            buf(&self.mask_add),
            buf(&self.emb_drop),
            buf(&self.ctx_h),
            buf(&self.probs),
            buf(&self.hs),
            buf(&self.g),
            buf(&self.dx_a),
            buf(&self.dx_b),
            buf(&self.dz),
            buf(&self.dctx),
            buf(&self.dctx_h),
            buf(&self.dq_h),
            buf(&self.dk_h),
            buf(&self.dv_h),
            buf(&self.dq),
            buf(&self.dtmp),
        ];
        for v in &self.xs {
            out.push(buf(v));
        }
        for l in &self.layers {
            out.extend([
                buf(&l.q),
                buf(&l.k),
                buf(&l.v),
                buf(&l.ctx),
                buf(&l.z1),
                buf(&l.m1),
                buf(&l.r1),
                buf(&l.x1),
                buf(&l.z2),
                buf(&l.m2),
                buf(&l.r2),
                buf(&l.h),
                buf(&l.attn_drop),
                buf(&l.sa_drop),
                buf(&l.ffn_drop),
            ]);
        }
        out
    }
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

    fn attn_shape(&self, b: usize, l: usize) -> AttnShape {
        AttnShape { batch: b, heads: self.cfg.heads, seq: l, head_dim: self.cfg.dim / self.cfg.heads, pattern: KeyPattern::Full }
    }

    /// Runs the encoder; the result is `a.last_hidden()` `[B, L, D]`. With `dropout`
    /// (training), masks are drawn from the generator and kept for the backward pass;
    /// `keep_ffn_hidden` keeps each layer's FFN hidden activations for it as well.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        data: &[f32],
        a: &mut TextActs,
        ids: &[i64],
        mask: &[i64],
        b: usize,
        l: usize,
        mut dropout: Option<(TextDropout, &mut Rng)>,
        keep_ffn_hidden: bool,
    ) {
        let c = &self.cfg;
        let (d, hid) = (c.dim, c.hidden_dim);
        assert!(d % c.heads == 0, "text dim {d} not divisible by {} heads", c.heads);
        assert!(l <= c.max_position_embeddings, "text length {l} exceeds max_position_embeddings {}", c.max_position_embeddings);
        assert!(ids.len() == b * l && mask.len() == b * l, "text inputs must be [B={b}, L={l}]");
        let n = b * l;
        a.batch = b;
        a.len = l;
        a.ffn_hidden_kept = keep_ffn_hidden;

        // Embeddings: word + position (+ token type 0 for BERT), then LayerNorm.
        fit(&mut a.emb, n * d);
        embedding_forward(ids, &data[self.word.clone()], d, &mut a.emb, false);
        let pos = &data[self.pos.clone()];
        for row in a.emb.chunks_exact_mut(l * d) {
            add_in_place(row, &pos[..l * d]);
        }
        if let Some(tt) = &self.token_type {
            let t0 = &data[tt.start..tt.start + d];
            a.emb.chunks_exact_mut(d).for_each(|r| add_in_place(r, t0));
        }
        a.xs.resize_with(c.layers + 1, Vec::new);
        a.layers.resize_with(c.layers, Default::default);
        fit(&mut a.xs[0], n * d);
        fit(&mut a.emb_mean, n);
        fit(&mut a.emb_rstd, n);
        self.ln_emb.forward(data, &a.emb, &mut a.xs[0], &mut a.emb_mean, &mut a.emb_rstd);
        let p = dropout.as_ref().map(|(p, _)| *p).unwrap_or_default();
        a.drop_hidden = p.hidden > 0.0;
        a.drop_attn = p.attention > 0.0;
        // Draws a fresh mask into `buf` when that dropout is active.
        let mut draw = |buf: &mut Vec<f32>, n: usize, prob: f32| {
            if let (Some((_, rng)), true) = (dropout.as_mut(), prob > 0.0) {
                fit(buf, n);
                dropout_mask(rng, prob, buf);
            }
        };
        draw(&mut a.emb_drop, n * d, p.hidden);
        if a.drop_hidden {
            mul_in_place(&mut a.xs[0], &a.emb_drop);
        }

        fit(&mut a.mask_add, n);
        for (m, &v) in a.mask_add.iter_mut().zip(mask) {
            *m = if v == 0 { TEXT_MASK_NEG } else { 0.0 };
        }

        let shape = self.attn_shape(b, l);
        let scale = 1.0 / ((d / c.heads) as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            let (before, after) = a.xs.split_at_mut(li + 1);
            let (x, out) = (&before[li], &mut after[0]);
            let la = &mut a.layers[li];
            for (lin, buf) in [(&layer.q, &mut la.q), (&layer.k, &mut la.k), (&layer.v, &mut la.v)] {
                fit(buf, n * d);
                lin.forward(data, x, d, n, buf);
            }
            fit(&mut a.probs, shape.probs_len());
            fit(&mut a.ctx_h, n * d);
            draw(&mut la.attn_drop, shape.probs_len(), p.attention);
            let attn_drop = a.drop_attn.then_some(&la.attn_drop[..]);
            attention_forward(&shape, scale, &la.q, &la.k, &la.v, d, &a.mask_add, attn_drop, &mut a.probs, &mut a.ctx_h);
            fit(&mut la.ctx, n * d);
            merge_heads(&a.ctx_h, &mut la.ctx, d, 0, b, c.heads, l, d / c.heads);
            // z1 = out_lin(ctx) + x; x1 = LN(z1)
            fit(&mut la.z1, n * d);
            layer.o.forward(data, &la.ctx, d, n, &mut la.z1);
            if self.cfg.kind == TextKind::Bert {
                draw(&mut la.sa_drop, n * d, p.hidden);
                if a.drop_hidden {
                    mul_in_place(&mut la.z1, &la.sa_drop);
                }
            }
            add_in_place(&mut la.z1, x);
            fit(&mut la.x1, n * d);
            fit(&mut la.m1, n);
            fit(&mut la.r1, n);
            layer.ln1.forward(data, &la.z1, &mut la.x1, &mut la.m1, &mut la.r1);
            // z2 = lin2(gelu(lin1(x1))) + x1; out = LN(z2)
            let h = if a.ffn_hidden_kept { &mut la.h } else { &mut a.hs };
            fit(h, n * hid);
            layer.ffn1.forward(data, &la.x1, d, n, h);
            fit(&mut a.g, n * hid);
            gelu_forward(h, &mut a.g);
            fit(&mut la.z2, n * d);
            layer.ffn2.forward(data, &a.g, hid, n, &mut la.z2);
            draw(&mut la.ffn_drop, n * d, p.hidden);
            if a.drop_hidden {
                mul_in_place(&mut la.z2, &la.ffn_drop);
            }
            add_in_place(&mut la.z2, &la.x1);
            fit(out, n * d);
            fit(&mut la.m2, n);
            fit(&mut la.r2, n);
            layer.ln2.forward(data, &la.z2, out, &mut la.m2, &mut la.r2);
        }
    }

    /// Accumulates parameter gradients given d(last_hidden_state) `[B, L, D]`;
    /// `ids` must be those of the preceding forward.
    pub fn backward(&self, data: &[f32], grad: &mut [f32], a: &mut TextActs, ids: &[i64], dlast: &[f32]) {
        fit(&mut a.dx_a, a.batch * a.len * self.cfg.dim);
        a.dx_a.copy_from_slice(&dlast[..a.batch * a.len * self.cfg.dim]);
        for li in (0..self.cfg.layers).rev() {
            self.layer_backward(&self.layers[li], data, grad, a, li);
        }
        self.backward_embeddings(data, grad, a, ids, false);
    }

    /// [`Self::backward`] with the optimiser step fused in: each layer's gradients go to the
    /// step's scratch window and its AdamW update is applied as soon as they are final.
    /// The position (/ token type) embeddings accumulate into `grad`, the word table's rows
    /// into `a.word_grad` (the dense table gradient is not touched); the caller updates
    /// them at the end.
    pub fn backward_fused(&self, data: &mut [f32], grad: &mut [f32], a: &mut TextActs, ids: &[i64], dlast: &[f32], step: &mut FusedStep) {
        fit(&mut a.dx_a, a.batch * a.len * self.cfg.dim);
        a.dx_a.copy_from_slice(&dlast[..a.batch * a.len * self.cfg.dim]);
        for li in (0..self.cfg.layers).rev() {
            step.block(data, self.layer_windows[li].clone(), |data, grad| self.layer_backward(&self.layers_local[li], data, grad, a, li));
        }
        self.backward_embeddings(data, grad, a, ids, true);
    }

    /// One layer, given d(its output) in `a.dx_a` (replaced by d(its input)). `layer`
    /// indexes `data` / `grad`, the whole buffers or this layer's window of them.
    fn layer_backward(&self, layer: &TextLayer, data: &[f32], grad: &mut [f32], a: &mut TextActs, li: usize) {
        let c = &self.cfg;
        let (b, l) = (a.batch, a.len);
        let (d, hid, heads) = (c.dim, c.hidden_dim, c.heads);
        let hd = d / heads;
        let n = b * l;
        let shape = self.attn_shape(b, l);
        let scale = 1.0 / (hd as f32).sqrt();
        let la = &a.layers[li];
        let x = &a.xs[li];
        // out = LN2(z2)
        let dz2 = zeroed(&mut a.dz, n * d);
        layer.ln2.backward(data, grad, &la.z2, &la.m2, &la.r2, &a.dx_a, dz2, Grads::Overwrite);
        // z2 = ffn2(gelu(ffn1(x1))) + x1, its hidden activations kept or recomputed.
        let h: &[f32] = if a.ffn_hidden_kept {
            &la.h
        } else {
            fit(&mut a.hs, n * hid);
            layer.ffn1.forward(data, &la.x1, d, n, &mut a.hs);
            &a.hs
        };
        fit(&mut a.g, n * hid);
        gelu_forward(h, &mut a.g);
        let dffn = masked(&a.dz, a.drop_hidden.then_some(&la.ffn_drop[..]), &mut a.dtmp);
        // ffn2's weight gradient first; then g is dead and its buffer takes d(g), which
        // becomes d(ffn1 output) in place (one hidden-wide scratch buffer, no zeroing).
        layer.ffn2.backward(data, grad, &a.g, hid, n, dffn, None, Grads::Overwrite);
        layer.ffn2.backward_input(data, dffn, n, &mut a.g);
        gelu_backward_in_place(h, &mut a.g);
        fit(&mut a.dx_b, n * d);
        a.dx_b.copy_from_slice(&a.dz);
        layer.ffn1.backward(data, grad, &la.x1, d, n, &a.g, Some(&mut a.dx_b), Grads::Overwrite);
        // x1 = LN1(z1)
        let dz1 = zeroed(&mut a.dz, n * d);
        layer.ln1.backward(data, grad, &la.z1, &la.m1, &la.r1, &a.dx_b, dz1, Grads::Overwrite);
        // z1 = out_lin(attn(q, k, v)) + x
        a.dx_a.copy_from_slice(&a.dz);
        let dctx = zeroed(&mut a.dctx, n * d);
        let dsa = masked(&a.dz, (a.drop_hidden && c.kind == TextKind::Bert).then_some(&la.sa_drop[..]), &mut a.dtmp);
        layer.o.backward(data, grad, &la.ctx, d, n, dsa, Some(dctx), Grads::Overwrite);
        fit(&mut a.dctx_h, n * d);
        split_heads(&a.dctx, d, 0, &mut a.dctx_h, b, heads, l, hd);
        // Overwritten by the attention backward: no zeroing.
        fit(&mut a.dq_h, n * d);
        fit(&mut a.dk_h, n * d);
        fit(&mut a.dv_h, n * d);
        let attn_drop = a.drop_attn.then_some(&la.attn_drop[..]);
        // The probabilities, recomputed (the context that comes with them is not needed).
        fit(&mut a.probs, shape.probs_len());
        fit(&mut a.ctx_h, n * d);
        attention_forward(&shape, scale, &la.q, &la.k, &la.v, d, &a.mask_add, attn_drop, &mut a.probs, &mut a.ctx_h);
        attention_backward(&shape, scale, &la.q, &la.k, &la.v, d, &a.probs, attn_drop, &a.dctx_h, &mut a.dq_h, &mut a.dk_h, &mut a.dv_h);
        fit(&mut a.dq, n * d);
        for (lin, dh) in [(&layer.q, &a.dq_h), (&layer.k, &a.dk_h), (&layer.v, &a.dv_h)] {
            merge_heads(dh, &mut a.dq, d, 0, b, heads, l, hd);
            lin.backward(data, grad, x, d, n, &a.dq, Some(&mut a.dx_a), Grads::Overwrite);
        }
    }

    /// Embedding dropout and LayerNorm, then the word / position (/ token type) lookups,
    /// from d(embedding output) in `a.dx_a`. The word table's gradient goes to `grad`
    /// (dense) or, with `word_rows`, to `a.word_grad`.
    fn backward_embeddings(&self, data: &[f32], grad: &mut [f32], a: &mut TextActs, ids: &[i64], word_rows: bool) {
        let (l, d) = (a.len, self.cfg.dim);
        let n = a.batch * l;
        if a.drop_hidden {
            mul_in_place(&mut a.dx_a, &a.emb_drop);
        }
        let demb = zeroed(&mut a.dz, n * d);
        self.ln_emb.backward(data, grad, &a.emb, &a.emb_mean, &a.emb_rstd, &a.dx_a, demb, Grads::Accumulate);
        if word_rows {
            a.word_grad.accumulate(ids, &a.dz[..n * d], d);
        } else {
            let dword = &mut grad[self.word.clone()];
            embedding_backward(ids, &a.dz, d, dword);
            // Hugging Face builds the word table with padding_idx = pad_token_id (0): the [PAD]
            // row receives no gradient, however often it is looked up.
            dword[PAD_TOKEN_ID * d..(PAD_TOKEN_ID + 1) * d].iter_mut().for_each(|g| *g = 0.0);
        }
        let dpos = &mut grad[self.pos.clone()];
        for row in a.dz.chunks_exact(l * d) {
            add_in_place(&mut dpos[..l * d], row);
        }
        if let Some(tt) = &self.token_type {
            let dt0 = &mut grad[tt.start..tt.start + d];
            a.dz.chunks_exact(d).for_each(|r| add_in_place(dt0, r));
        }
    }
}
