//! Text tower: Hugging Face DistilBertModel or BertModel (post-LayerNorm encoder, GELU-erf
//! FFN, padding keys masked out), forward and backward over the flat parameter buffers.
//! Dropout (training only) at Hugging Face's sites: after the embedding LayerNorm, on the
//! attention probabilities, on the FFN output before its residual, and for BERT also on
//! the attention output projection before its residual.

mod acts;
mod declare;

pub use acts::{TextActs, WordGradRows};
pub use declare::declare;

use crate::adamw::FusedStep;
use crate::backend::{zeroed, Backend};
use crate::config::{TextConfig, TextKind};
use crate::layers::{block_window, range, Grads, LayerNorm, Linear};
use crate::mask::{additive_mask, TEXT_ATTENTION_PAD_SCORE};
use crate::params::Params;
use acts::{TextLayerActs, TextScratch};
use declare::layer_names;
use demovlp_kernels::attention::{AttnShape, KeyPattern};
use demovlp_kernels::Rng;
use std::ops::Range;

/// `[PAD]` id of the uncased BERT vocabulary and Hugging Face's `padding_idx` of the word table.
const PAD_TOKEN_ID: usize = 0;

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

/// One batch of text input, on the host: token ids and attention mask (1 real / 0
/// padding), both `[B, L]`.
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

/// What each layer's pass takes from the tower: the backend, sizes, the attention mask and
/// which dropout is active (with the generator that draws the forward pass's masks).
struct LayerRun<'a, B: Backend> {
    be: &'a B,
    kind: TextKind,
    shape: TextShape,
    dim: usize,
    hidden_dim: usize,
    attn: AttnShape,
    scale: f32,
    /// `[B, L]` additive key mask.
    mask_add: B::View<'a>,
    dropout: TextDropout,
    drop_hidden: bool,
    drop_attn: bool,
    rng: Option<&'a mut Rng>,
    ffn_hidden_kept: bool,
}

impl<B: Backend> LayerRun<'_, B> {
    /// Draws a fresh dropout mask of `n` values into `buf` when that dropout is active.
    fn draw(&mut self, buf: &mut B::Buf, n: usize, prob: f32) {
        if let (Some(rng), true) = (self.rng.as_deref_mut(), prob > 0.0) {
            self.be.dropout_mask(rng, prob, buf, n);
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
    fn forward<B: Backend>(
        &self,
        data: B::View<'_>,
        run: &mut LayerRun<B>,
        x: B::View<'_>,
        out: &mut B::Buf,
        acts: &mut TextLayerActs<B>,
        s: &mut TextScratch<B>,
    ) {
        let be = run.be;
        let (n, d, hid) = (run.shape.tokens(), run.dim, run.hidden_dim);
        let TextShape { batch, len } = run.shape;
        for (lin, buf) in [(&self.q, &mut acts.q), (&self.k, &mut acts.k), (&self.v, &mut acts.v)] {
            be.fit(buf, n * d);
            lin.forward(be, data, x, d, n, B::view_mut(buf));
        }
        // Attention.
        be.fit(&mut s.probs, run.attn.probs_len());
        be.fit(&mut s.ctx_heads, n * d);
        let (p_attn, probs_len) = (run.dropout.attention, run.attn.probs_len());
        run.draw(&mut acts.attn_drop, probs_len, p_attn);
        let attn_drop = run.drop_attn.then(|| B::view(&acts.attn_drop));
        let (q, k, v) = (B::view(&acts.q), B::view(&acts.k), B::view(&acts.v));
        be.attention_forward(
            &run.attn,
            run.scale,
            q,
            k,
            v,
            d,
            run.mask_add,
            attn_drop,
            B::view_mut(&mut s.probs),
            B::view_mut(&mut s.ctx_heads),
        );
        be.fit(&mut acts.ctx, n * d);
        be.merge_heads(B::view(&s.ctx_heads), B::view_mut(&mut acts.ctx), d, batch, run.attn.heads, len, run.attn.head_dim);
        // attn_res = out_lin(ctx) (+ dropout, BERT) + x; ln1_out = ln1(attn_res)
        be.fit(&mut acts.attn_res, n * d);
        self.o.forward(be, data, B::view(&acts.ctx), d, n, B::view_mut(&mut acts.attn_res));
        if run.kind == TextKind::Bert {
            let p = run.dropout.hidden;
            run.draw(&mut acts.attn_out_drop, n * d, p);
            if run.drop_hidden {
                be.mul_in_place(B::view_mut(&mut acts.attn_res), B::view(&acts.attn_out_drop));
            }
        }
        be.add_in_place(B::view_mut(&mut acts.attn_res), x);
        be.fit(&mut acts.ln1_out, n * d);
        be.fit(&mut acts.ln1_mean, n);
        be.fit(&mut acts.ln1_rstd, n);
        self.ln1.forward(
            be,
            data,
            B::view(&acts.attn_res),
            B::view_mut(&mut acts.ln1_out),
            B::view_mut(&mut acts.ln1_mean),
            B::view_mut(&mut acts.ln1_rstd),
        );
        // ffn_res = ffn2(gelu(ffn1(ln1_out))) (+ dropout) + ln1_out; out = ln2(ffn_res)
        let ffn1_out = if run.ffn_hidden_kept { &mut acts.ffn1_out } else { &mut s.ffn1_out };
        be.fit(ffn1_out, n * hid);
        self.ffn1.forward(be, data, B::view(&acts.ln1_out), d, n, B::view_mut(ffn1_out));
        be.fit(&mut s.gelu_out, n * hid);
        be.gelu_forward(B::view(ffn1_out), B::view_mut(&mut s.gelu_out));
        be.fit(&mut acts.ffn_res, n * d);
        self.ffn2.forward(be, data, B::view(&s.gelu_out), hid, n, B::view_mut(&mut acts.ffn_res));
        let p = run.dropout.hidden;
        run.draw(&mut acts.ffn_drop, n * d, p);
        if run.drop_hidden {
            be.mul_in_place(B::view_mut(&mut acts.ffn_res), B::view(&acts.ffn_drop));
        }
        be.add_in_place(B::view_mut(&mut acts.ffn_res), B::view(&acts.ln1_out));
        be.fit(out, n * d);
        be.fit(&mut acts.ln2_mean, n);
        be.fit(&mut acts.ln2_rstd, n);
        self.ln2.forward(
            be,
            data,
            B::view(&acts.ffn_res),
            B::view_mut(out),
            B::view_mut(&mut acts.ln2_mean),
            B::view_mut(&mut acts.ln2_rstd),
        );
    }

    /// Given d(layer output) in `s.d_x`, writes this layer's parameter gradients (overwritten)
    /// and leaves d(`x`) in `s.d_x`. `self` indexes `data` / `grad`: the whole buffers or
    /// this layer's window of them.
    fn backward<B: Backend>(
        &self,
        data: B::View<'_>,
        mut grad: B::ViewMut<'_>,
        run: &LayerRun<B>,
        x: B::View<'_>,
        acts: &TextLayerActs<B>,
        s: &mut TextScratch<B>,
    ) {
        let be = run.be;
        let g = &mut grad;
        let (n, d, hid) = (run.shape.tokens(), run.dim, run.hidden_dim);
        // out = ln2(ffn_res)
        let d_ffn_res = zeroed(be, &mut s.d_res, n * d);
        let (mean, rstd) = (B::view(&acts.ln2_mean), B::view(&acts.ln2_rstd));
        self.ln2.backward(be, data, B::reborrow(g), B::view(&acts.ffn_res), mean, rstd, B::view(&s.d_x), d_ffn_res, Grads::Overwrite);
        // ffn_res = ffn2(gelu(ffn1(ln1_out))) + ln1_out, ffn1's output kept or recomputed.
        let ffn1_out = if run.ffn_hidden_kept {
            B::view(&acts.ffn1_out)
        } else {
            be.fit(&mut s.ffn1_out, n * hid);
            self.ffn1.forward(be, data, B::view(&acts.ln1_out), d, n, B::view_mut(&mut s.ffn1_out));
            B::view(&s.ffn1_out)
        };
        be.fit(&mut s.gelu_out, n * hid);
        be.gelu_forward(ffn1_out, B::view_mut(&mut s.gelu_out));
        let ffn_drop = run.drop_hidden.then(|| B::view(&acts.ffn_drop));
        let d_ffn2_out = be.masked(B::view(&s.d_res), ffn_drop, &mut s.d_dropped);
        // ffn2's weight gradient first; then gelu_out is dead and its buffer takes
        // d(gelu_out), which becomes d(ffn1_out) in place (one hidden-wide scratch buffer,
        // no zeroing).
        self.ffn2.backward(be, data, B::reborrow(g), B::view(&s.gelu_out), hid, n, d_ffn2_out, None, Grads::Overwrite);
        self.ffn2.backward_input(be, data, d_ffn2_out, n, B::view_mut(&mut s.gelu_out));
        be.gelu_backward_in_place(ffn1_out, B::view_mut(&mut s.gelu_out));
        be.fit(&mut s.d_ln1_out, n * d);
        be.copy(B::view(&s.d_res), B::view_mut(&mut s.d_ln1_out));
        let d_ln1_out = Some(B::view_mut(&mut s.d_ln1_out));
        self.ffn1.backward(be, data, B::reborrow(g), B::view(&acts.ln1_out), d, n, B::view(&s.gelu_out), d_ln1_out, Grads::Overwrite);
        // ln1_out = ln1(attn_res)
        let d_attn_res = zeroed(be, &mut s.d_res, n * d);
        let (mean, rstd) = (B::view(&acts.ln1_mean), B::view(&acts.ln1_rstd));
        self.ln1.backward(
            be,
            data,
            B::reborrow(g),
            B::view(&acts.attn_res),
            mean,
            rstd,
            B::view(&s.d_ln1_out),
            d_attn_res,
            Grads::Overwrite,
        );
        // attn_res = out_lin(attention(q, k, v)) + x
        be.copy(B::view(&s.d_res), B::view_mut(&mut s.d_x));
        let d_ctx = zeroed(be, &mut s.d_ctx, n * d);
        let attn_out_drop = (run.drop_hidden && run.kind == TextKind::Bert).then(|| B::view(&acts.attn_out_drop));
        let d_attn_out = be.masked(B::view(&s.d_res), attn_out_drop, &mut s.d_dropped);
        self.o.backward(be, data, B::reborrow(g), B::view(&acts.ctx), d, n, d_attn_out, Some(d_ctx), Grads::Overwrite);
        // The probabilities, recomputed (the context that comes with them is not needed).
        let attn_drop = run.drop_attn.then(|| B::view(&acts.attn_drop));
        let qkv = [B::view(&acts.q), B::view(&acts.k), B::view(&acts.v)];
        be.fit(&mut s.probs, run.attn.probs_len());
        be.fit(&mut s.ctx_heads, n * d);
        let (probs, ctx_heads) = (B::view_mut(&mut s.probs), B::view_mut(&mut s.ctx_heads));
        be.attention_forward(&run.attn, run.scale, qkv[0], qkv[1], qkv[2], d, run.mask_add, attn_drop, probs, ctx_heads);
        // d(ctx) read and d(q), d(k), d(v) written as token rows: no head-major copies.
        // Overwritten: no zeroing.
        for buf in [&mut s.d_q, &mut s.d_k, &mut s.d_v] {
            be.fit(buf, n * d);
        }
        let d_qkv = [B::view_mut(&mut s.d_q), B::view_mut(&mut s.d_k), B::view_mut(&mut s.d_v)];
        be.attention_backward_rows_split(&run.attn, run.scale, qkv, d, B::view(&s.probs), attn_drop, B::view(&s.d_ctx), d, d_qkv, d);
        for (lin, dy) in [(&self.q, &s.d_q), (&self.k, &s.d_k), (&self.v, &s.d_v)] {
            lin.backward(be, data, B::reborrow(g), x, d, n, B::view(dy), Some(B::view_mut(&mut s.d_x)), Grads::Overwrite);
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
    pub fn new<B: Backend>(p: &Params<B>, c: &TextConfig) -> Self {
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
    fn run<'a, B: Backend>(&self, be: &'a B, a: &'a TextActs<B>, dropout: TextDropout, rng: Option<&'a mut Rng>) -> LayerRun<'a, B> {
        let c = &self.cfg;
        let shape = a.shape();
        let head_dim = c.dim / c.heads;
        LayerRun {
            be,
            kind: c.kind,
            shape,
            dim: c.dim,
            hidden_dim: c.hidden_dim,
            attn: AttnShape { batch: shape.batch, heads: c.heads, seq: shape.len, head_dim, pattern: KeyPattern::Full },
            scale: 1.0 / (head_dim as f32).sqrt(),
            mask_add: B::view(&a.mask_add),
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
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        a: &mut TextActs<B>,
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
        a.hidden.resize_with(c.layers + 1, Default::default);
        a.layers.resize_with(c.layers, Default::default);
        self.embeddings_forward(be, data, a, input, p, rng.as_deref_mut());
        be.write_host(&mut a.mask_add, input.shape.tokens(), |mask_add| {
            for (m, &v) in mask_add.iter_mut().zip(input.mask) {
                *m = additive_mask((v != 0) as u8 as f32, TEXT_ATTENTION_PAD_SCORE);
            }
        });
        let (mut hidden, mut layers, mut scratch) =
            (std::mem::take(&mut a.hidden), std::mem::take(&mut a.layers), std::mem::take(&mut a.scratch));
        let mut run = self.run(be, a, p, rng);
        for (li, (layer, acts)) in self.layers.iter().zip(&mut layers).enumerate() {
            let (before, after) = hidden.split_at_mut(li + 1);
            layer.forward(data, &mut run, B::view(&before[li]), &mut after[0], acts, &mut scratch);
        }
        (a.hidden, a.layers, a.scratch) = (hidden, layers, scratch);
    }

    /// word + position (+ token type 0 for BERT) embeddings, LayerNorm, dropout: `a.hidden[0]`.
    fn embeddings_forward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        a: &mut TextActs<B>,
        input: TextInput,
        p: TextDropout,
        rng: Option<&mut Rng>,
    ) {
        let (n, d, len) = (input.shape.tokens(), self.cfg.dim, input.shape.len);
        be.fit(&mut a.emb, n * d);
        be.embedding_forward(input.ids, B::slice(data, self.word.clone()), d, B::view_mut(&mut a.emb));
        be.add_to_rows(B::view_mut(&mut a.emb), B::slice(data, self.pos.start..self.pos.start + len * d));
        if let Some(tt) = &self.token_type {
            be.add_to_rows(B::view_mut(&mut a.emb), B::slice(data, tt.start..tt.start + d));
        }
        be.fit(&mut a.hidden[0], n * d);
        be.fit(&mut a.emb_mean, n);
        be.fit(&mut a.emb_rstd, n);
        self.ln_emb.forward(
            be,
            data,
            B::view(&a.emb),
            B::view_mut(&mut a.hidden[0]),
            B::view_mut(&mut a.emb_mean),
            B::view_mut(&mut a.emb_rstd),
        );
        if let (Some(rng), true) = (rng, p.hidden > 0.0) {
            be.dropout_mask(rng, p.hidden, &mut a.emb_drop, n * d);
        }
        if a.drop_hidden {
            be.mul_in_place(B::view_mut(&mut a.hidden[0]), B::view(&a.emb_drop));
        }
    }

    /// Accumulates parameter gradients given d(last_hidden_state) `[B, L, D]`;
    /// `ids` must be those of the preceding forward.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        mut grad: B::ViewMut<'_>,
        a: &mut TextActs<B>,
        ids: &[i64],
        dlast: B::View<'_>,
    ) {
        let mut s = self.backward_begin(be, a, dlast);
        let run = self.run(be, a, TextDropout::default(), None);
        for li in (0..self.cfg.layers).rev() {
            self.layers[li].backward(data, B::reborrow(&mut grad), &run, B::view(&a.hidden[li]), &a.layers[li], &mut s);
        }
        a.scratch = s;
        self.embeddings_backward(be, data, grad, a, ids, false);
    }

    /// [`Self::backward`] with the optimiser step fused in: each layer's gradients go to the
    /// step's scratch window and its AdamW update is applied as soon as they are final.
    /// The position (/ token type) embeddings accumulate into `grad`, the word table's rows
    /// into `a.word_grad` (the dense table gradient is not touched); the caller updates
    /// them at the end.
    pub fn backward_fused<B: Backend>(
        &self,
        be: &B,
        params: &mut Params<B>,
        a: &mut TextActs<B>,
        ids: &[i64],
        dlast: B::View<'_>,
        step: &mut FusedStep<B>,
    ) {
        let (data, grad) = (&mut params.data, &mut params.grad);
        let mut s = self.backward_begin(be, a, dlast);
        let run = self.run(be, a, TextDropout::default(), None);
        for li in (0..self.cfg.layers).rev() {
            let (layer, x, acts) = (&self.layers_local[li], B::view(&a.hidden[li]), &a.layers[li]);
            step.block(data, self.layer_windows[li].clone(), |data, grad| layer.backward(data, grad, &run, x, acts, &mut s));
        }
        a.scratch = s;
        self.embeddings_backward(be, B::view(data), B::view_mut(grad), a, ids, true);
    }

    /// The scratch buffers, taken out of the arena, with d(last hidden state) in `d_x`.
    fn backward_begin<B: Backend>(&self, be: &B, a: &mut TextActs<B>, dlast: B::View<'_>) -> TextScratch<B> {
        let n = a.shape().tokens() * self.cfg.dim;
        let mut s = std::mem::take(&mut a.scratch);
        be.fit(&mut s.d_x, n);
        be.copy(B::slice(dlast, 0..n), B::view_mut(&mut s.d_x));
        s
    }

    /// Embedding dropout and LayerNorm, then the word / position (/ token type) lookups,
    /// from d(embedding output) in `a.scratch.d_x`. The word table's gradient goes to `grad`
    /// (dense) or, with `word_rows`, to `a.word_grad`.
    fn embeddings_backward<B: Backend>(
        &self,
        be: &B,
        data: B::View<'_>,
        mut grad: B::ViewMut<'_>,
        a: &mut TextActs<B>,
        ids: &[i64],
        word_rows: bool,
    ) {
        let (len, d) = (a.len, self.cfg.dim);
        let n = a.shape().tokens();
        let s = &mut a.scratch;
        if a.drop_hidden {
            be.mul_in_place(B::view_mut(&mut s.d_x), B::view(&a.emb_drop));
        }
        let d_emb = zeroed(be, &mut s.d_res, n * d);
        let (mean, rstd) = (B::view(&a.emb_mean), B::view(&a.emb_rstd));
        self.ln_emb.backward(be, data, B::reborrow(&mut grad), B::view(&a.emb), mean, rstd, B::view(&s.d_x), d_emb, Grads::Accumulate);
        let d_emb = B::slice(B::view(&s.d_res), 0..n * d);
        if word_rows {
            a.word_grad.accumulate(be, ids, PAD_TOKEN_ID, d_emb, d);
        } else {
            let mut d_word = B::slice_mut(B::reborrow(&mut grad), self.word.clone());
            be.embedding_backward(ids, d_emb, d, B::reborrow(&mut d_word));
            // Hugging Face builds the word table with padding_idx = pad_token_id (0): the [PAD]
            // row receives no gradient, however often it is looked up.
            be.fill_zero(B::slice_mut(d_word, PAD_TOKEN_ID * d..(PAD_TOKEN_ID + 1) * d));
        }
        be.sum_rows_into(B::slice_mut(B::reborrow(&mut grad), self.pos.start..self.pos.start + len * d), d_emb);
        if let Some(tt) = &self.token_type {
            be.sum_rows_into(B::slice_mut(grad, tt.start..tt.start + d), d_emb);
        }
    }
}
