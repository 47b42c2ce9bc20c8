//! The training loss on a batch of embeddings (SPEC §6): L = L_g + L_rwa, forward and
//! hand-written backward.

use crate::blocked::local_scores_items;
use crate::global::global_loss;
use crate::local::{local_similarity_backward, AlignConfig, Items};

/// Loss hyper-parameters. Defaults are the published ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    /// τ of the global contrastive loss (0.05).
    pub temperature: f32,
    /// λ of the region-word alignment (20).
    pub lambda: f32,
    /// false = faithful: alignment means over all word / region positions, padding
    /// included. true = means over real positions only (a variant, not the published one).
    pub masked_mean: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { temperature: 0.05, lambda: 20.0, masked_mean: false }
    }
}

impl LossConfig {
    fn align(&self) -> AlignConfig {
        AlignConfig { lambda: self.lambda, masked_mean: self.masked_mean }
    }
}

/// A batch of embeddings; row-major, shapes in brackets.
#[derive(Clone, Copy, Debug)]
pub struct LossInputs<'a> {
    pub batch: usize,
    /// W = L − 1 word positions.
    pub words: usize,
    /// N = F·R region positions.
    pub regions: usize,
    /// P, the embedding width.
    pub dim: usize,
    pub global_text: &'a [f32],  // [B, P]
    pub global_video: &'a [f32], // [B, P]
    pub local_text: &'a [f32],   // [B, W, P]
    pub local_video: &'a [f32],  // [B, N, P]
    /// [B, W]: 0 real word, −100 padding.
    pub text_mask_additive: &'a [f32],
    /// [B, N]: 0 real region, −100 padding.
    pub video_mask_additive: &'a [f32],
}

impl LossInputs<'_> {
    fn check(&self) {
        let (b, w, n, p) = (self.batch, self.words, self.regions, self.dim);
        let want = [
            ("global_text", self.global_text.len(), b * p, "[B, P]"),
            ("global_video", self.global_video.len(), b * p, "[B, P]"),
            ("local_text", self.local_text.len(), b * w * p, "[B, W, P]"),
            ("local_video", self.local_video.len(), b * n * p, "[B, N, P]"),
            ("text_mask_additive", self.text_mask_additive.len(), b * w, "[B, W]"),
            ("video_mask_additive", self.video_mask_additive.len(), b * n, "[B, N]"),
        ];
        for (name, got, want, shape) in want {
            assert_eq!(got, want, "LossInputs.{name}: {got} values, expected {shape} = {want} (B={b}, W={w}, N={n}, P={p})");
        }
        assert!(b > 0, "LossInputs: empty batch");
    }
}

#[derive(Clone, Debug, Default)]
pub struct LossOutputs {
    pub loss_total: f32,
    pub loss_global: f32,
    /// 0 when the local loss is off.
    pub loss_local: f32,
    /// [B, B] rows = texts.
    pub global_sim_text_video: Vec<f32>,
    /// [B, B] rows = videos; empty when the local loss is off (not computed).
    pub local_sim_video_text: Vec<f32>,
}

/// d loss_total / d each input; local gradients are zeros (full length) when the local
/// loss is off.
#[derive(Clone, Debug, Default)]
pub struct LossGrads {
    pub global_text: Vec<f32>,
    pub global_video: Vec<f32>,
    pub local_text: Vec<f32>,
    pub local_video: Vec<f32>,
}

/// L_rwa = mean_v Σ_t p[v,t]·(log p[v,t] − log(δ[v,t] + 1e-6)), p = softmax_t(λ S[v, :]).
/// Returns the loss and, when asked, dL/dS.
fn alignment_loss(s: &[f32], b: usize, lambda: f32, want_grad: bool) -> (f32, Option<Vec<f32>>) {
    // log(label + 1e-6) as the published code evaluates it, in f32.
    let log_on = ((1.0f32 + 1e-6f32).ln()) as f64;
    let log_off = (1e-6f32.ln()) as f64;
    let lam = lambda as f64;
    let mut loss = 0f64;
    let mut grad = want_grad.then(|| vec![0f32; b * b]);
    for v in 0..b {
        let row: Vec<f64> = (0..b).map(|t| s[v * b + t] as f64 * lam).collect();
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + row.iter().map(|y| (y - mx).exp()).sum::<f64>().ln();
        let e: Vec<f64> = (0..b).map(|t| row[t] - lse - if t == v { log_on } else { log_off }).collect();
        let p: Vec<f64> = row.iter().map(|y| (y - lse).exp()).collect();
        let f: f64 = (0..b).map(|t| p[t] * e[t]).sum();
        loss += f / b as f64;
        if let Some(g) = grad.as_mut() {
            // d f / d y_k = p_k (e_k − f).
            for t in 0..b {
                g[v * b + t] = (lam * p[t] * (e[t] - f) / b as f64) as f32;
            }
        }
    }
    (loss as f32, grad)
}

fn run(cfg: &LossConfig, x: &LossInputs, use_local: bool, want_grad: bool) -> (LossOutputs, Option<LossGrads>) {
    x.check();
    let (b, p) = (x.batch, x.dim);
    let (g_sim, loss_global, g_grads) = global_loss(x.global_text, x.global_video, b, p, cfg.temperature, want_grad);
    let mut out = LossOutputs { loss_total: loss_global, loss_global, global_sim_text_video: g_sim, ..Default::default() };
    let mut grads = g_grads.map(|(gt, gv)| LossGrads {
        global_text: gt,
        global_video: gv,
        local_text: vec![0.0; x.local_text.len()],
        local_video: vec![0.0; x.local_video.len()],
    });
    if !use_local {
        return (out, grads);
    }
    let text = Items::new(x.local_text, x.text_mask_additive, b, x.words, p);
    let video = Items::new(x.local_video, x.video_mask_additive, b, x.regions, p);
    let align = cfg.align();
    // Forward through the evaluation kernel (blocked GEMMs, implicit weighted context);
    // the backward recomputes each pair with the fused training kernel.
    let s_loc = local_scores_items(&text, &video, cfg.lambda, cfg.masked_mean, &|_, _| {});
    let (loss_local, g_s) = alignment_loss(&s_loc, b, cfg.lambda, want_grad);
    out.loss_local = loss_local;
    out.loss_total = loss_global + loss_local;
    out.local_sim_video_text = s_loc;
    if let (Some(gr), Some(g_s)) = (grads.as_mut(), g_s) {
        let (lt, lv) = local_similarity_backward(&g_s, &text, &video, &align);
        gr.local_text = lt;
        gr.local_video = lv;
    }
    (out, grads)
}

/// Losses only. `use_local = false`: the "global loss only" ablation (loss_local = 0).
pub fn losses_forward(cfg: &LossConfig, x: &LossInputs, use_local: bool) -> LossOutputs {
    run(cfg, x, use_local, false).0
}

/// Losses and d loss_total / d every input embedding.
pub fn losses_forward_backward(cfg: &LossConfig, x: &LossInputs, use_local: bool) -> (LossOutputs, LossGrads) {
    let (o, g) = run(cfg, x, use_local, true);
    (o, g.expect("gradients were requested"))
}
