//! The comparison a second backend runs against [`Cpu`](super::Cpu): tiny models of both text families,
//! with dropout and weight decay on, through a forward/backward pass, the token-level API
//! (projected tokens, given token gradients), the evaluation embeddings and fused training
//! steps, and the QA model (towers + `BUTDQAHead`, attention dropout on: loss, logits, every
//! gradient of both parameter sets, evaluation logits), on `B` and on `Cpu` from the same
//! initial weights;
//! every loss, gradient tensor, embedding and updated parameter tensor must agree within a
//! relative tolerance (of the tensor's largest magnitude). A backend's test suite calls
//! [`compare_with_cpu`]; `Cpu` itself passes it at tolerance 0 (bit for bit).

use super::Backend;
use crate::adamw::{AdamW, AdamWSettings};
use crate::config::{ModelConfig, TextConfig, TextKind, VideoConfig};
use crate::model::{BatchRef, Model};
use crate::qa::{QaHead, QaHeadConfig, QaModel};
use crate::text::TextDropout;
use demovlp_kernels::Rng;
use demovlp_retrieval::LossConfig;

/// A tiny model (GEMMs bigger than one micro-tile, several heads, two layers per tower).
pub fn tiny_config(kind: TextKind) -> ModelConfig {
    ModelConfig {
        text: TextConfig {
            kind,
            vocab_size: 60,
            dim: 32,
            layers: 2,
            heads: 4,
            hidden_dim: 64,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        },
        video: VideoConfig {
            dim: 32,
            depth: 2,
            heads: 4,
            mlp_dim: 64,
            max_frames: 3,
            pos_embed_rows: 4,
            feature_dim: 2048,
            box_dim: 6,
            layer_norm_eps: 1e-6,
        },
        proj_dim: 16,
    }
}

/// Host inputs of one batch: `batch` clips of `frames` × `regions`, captions of `len` tokens,
/// some regions and tokens padded, ids repeated.
pub struct CheckBatch {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    pub len: usize,
    pub object: Vec<f32>,
    pub object_mask: Vec<f32>,
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
}

impl CheckBatch {
    pub fn new(seed: u64, batch: usize, frames: usize, regions: usize, len: usize) -> Self {
        let mut rng = Rng::new(seed);
        let nr = frames * regions;
        CheckBatch {
            batch,
            frames,
            regions,
            len,
            object: (0..batch * nr * 2054).map(|_| rng.uniform()).collect(),
            object_mask: (0..batch * nr).map(|i| if i % 4 == 3 { 0.0 } else { 1.0 }).collect(),
            ids: (0..batch * len).map(|i| if i % len < len - 3 { 1 + (i * 7 % 13) as i64 } else { 0 }).collect(),
            attention_mask: (0..batch * len).map(|i| (i % len < len - 3) as i64).collect(),
        }
    }

    pub fn as_ref(&self) -> BatchRef<'_> {
        BatchRef {
            batch: self.batch,
            frames: self.frames,
            regions: self.regions,
            text_len: self.len,
            object: &self.object,
            object_mask: &self.object_mask,
            input_ids: &self.ids,
            attention_mask: &self.attention_mask,
        }
    }
}

/// `Err` naming the first value of `got` farther from `want` than `tol` × the largest
/// magnitude of `want` (0 compares bits).
pub fn close(what: &str, got: &[f32], want: &[f32], tol: f32) -> Result<(), String> {
    close_with_floor(what, got, want, tol, 0.0)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// [`close`] with the magnitude taken as at least `floor`: a tensor whose exact values are
/// 0 (a key bias's gradient: softmax ignores a constant shift) holds rounding noise only.
pub fn close_with_floor(what: &str, got: &[f32], want: &[f32], tol: f32, floor: f32) -> Result<(), String> {
    close_plus(what, got, want, tol, floor, 0.0)
}

/// [`close_with_floor`] allowing `abs` more per value.
fn close_plus(what: &str, got: &[f32], want: &[f32], tol: f32, floor: f32, abs: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    let scale = max_abs(want).max(floor).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if tol == 0.0 { g.to_bits() == w.to_bits() } else { (g - w).abs() <= tol * scale + abs };
        if !ok {
            return Err(format!("{what}[{i}]: {g} vs {w} (scale {scale}, tolerance {tol})"));
        }
    }
    Ok(())
}

/// Runs the comparison on `backend`; `tol` is relative to each tensor's largest magnitude.
pub fn compare_with_cpu<B: Backend>(backend: B, tol: f32) -> Result<(), String> {
    for kind in [TextKind::Distilbert, TextKind::Bert] {
        compare_one(backend.clone(), kind, tol).map_err(|e| format!("{kind:?}: {e}"))?;
    }
    compare_qa(backend, tol).map_err(|e| format!("QA model: {e}"))
}

/// Each tensor of `specs` against its own largest magnitude, at least 1e-3 of the whole buffer's.
fn per_tensor(what: &str, specs: &[crate::params::ParamSpec], got: &[f32], want: &[f32], tol: f32) -> Result<(), String> {
    let floor = 1e-3 * max_abs(want);
    for s in specs {
        let r = s.offset..s.offset + s.len;
        close_with_floor(&format!("{what} {}", s.name), &got[r.clone()], &want[r], tol, floor)?;
    }
    Ok(())
}

/// The QA model on `B` and on `Cpu`: one training forward/backward (text and attention
/// dropout on, padded regions), then evaluation logits.
fn compare_qa<B: Backend>(backend: B, tol: f32) -> Result<(), String> {
    let cfg = tiny_config(TextKind::Distilbert);
    let head_cfg = QaHeadConfig { dim: cfg.proj_dim, hidden: 12, answers: 5 };
    let data = CheckBatch::new(4, 3, 2, 3, 10);
    let batch = data.as_ref();
    let labels = [1, 4, 0];
    let mut cpu_base = Model::new(cfg.clone());
    let mut dev_base = Model::new_on(backend.clone(), cfg);
    setup(&mut cpu_base);
    setup(&mut dev_base);
    let (mut cpu_head, mut dev_head) = (QaHead::new(head_cfg), QaHead::new_on(backend.clone(), head_cfg));
    cpu_head.init_random(7);
    dev_head.init_random(7);
    let mut cpu = QaModel::new(cpu_base, cpu_head);
    let mut dev = QaModel::new(dev_base, dev_head);
    cpu.set_attention_dropout(true, 13);
    dev.set_attention_dropout(true, 13);
    let host = |b: &B::Buf| backend.to_host(B::view(b));
    close("initial head parameters", &host(&dev.head.params.data), &cpu.head.params.data, 0.0)?;
    let (a, b) = (cpu.forward_backward(&batch, &labels), dev.forward_backward(&batch, &labels));
    close("loss", &[b.loss], &[a.loss], tol)?;
    close("logits", &b.logits, &a.logits, tol)?;
    close("attention", &host(&dev.head.acts.attention), &cpu.head.acts.attention, tol)?;
    close("question", &host(&dev.head.acts.question), &cpu.head.acts.question, tol)?;
    per_tensor("head gradient", cpu.head.params.specs(), &host(&dev.head.params.grad), &cpu.head.params.grad, tol)?;
    per_tensor("tower gradient", cpu.base.params.specs(), &host(&dev.base.params.grad), &cpu.base.params.grad, tol)?;
    let want = cpu.forward(&batch, false).to_vec();
    let got = backend.to_host(dev.forward(&batch, false));
    close("evaluation logits", &got, &want, tol)
}

fn compare_one<B: Backend>(backend: B, kind: TextKind, tol: f32) -> Result<(), String> {
    let cfg = tiny_config(kind);
    let data = CheckBatch::new(3, 3, 2, 3, 10);
    let batch = data.as_ref();
    let loss = LossConfig::default();
    let mut cpu = Model::new(cfg.clone());
    let mut dev = Model::new_on(backend.clone(), cfg);
    setup(&mut cpu);
    setup(&mut dev);
    close("initial parameters", &backend.to_host(B::view(&dev.params.data)), &cpu.params.data, 0.0)?;
    let host = |b: &B::Buf| backend.to_host(B::view(b));
    let specs = cpu.params.specs().to_vec();
    // Each tensor against its own largest magnitude, at least 1e-3 of the whole buffer's.
    let per_tensor = |what: &str, got: &[f32], want: &[f32], abs: f32| -> Result<(), String> {
        let floor = 1e-3 * max_abs(want);
        for s in &specs {
            let r = s.offset..s.offset + s.len;
            close_plus(&format!("{what} {}", s.name), &got[r.clone()], &want[r], tol, floor, abs)?;
        }
        Ok(())
    };

    let (a, b) = (cpu.forward_backward(&batch, &loss, true), dev.forward_backward(&batch, &loss, true));
    close("losses", &[b.loss_total, b.loss_global, b.loss_local], &[a.loss_total, a.loss_global, a.loss_local], tol)?;
    per_tensor("gradient", &host(&dev.params.grad), &cpu.params.grad, 0.0)?;

    // The token-level API: projected tokens out, given token gradients in (host values).
    let (tokens_cpu, tokens_dev) = {
        let (t, v) = cpu.forward_tokens(&batch, false);
        let (t, v) = (t.to_vec(), v.to_vec());
        let (dt, dv) = dev.forward_tokens(&batch, false);
        ((t, v), (backend.to_host(dt), backend.to_host(dv)))
    };
    close("text tokens", &tokens_dev.0, &tokens_cpu.0, tol)?;
    close("video tokens", &tokens_dev.1, &tokens_cpu.1, tol)?;
    let mut rng = Rng::new(17);
    let d_text: Vec<f32> = tokens_cpu.0.iter().map(|_| rng.normal()).collect();
    let d_video: Vec<f32> = tokens_cpu.1.iter().map(|_| rng.normal()).collect();
    cpu.params.zero_grad();
    backend.fill_zero(B::view_mut(&mut dev.params.grad));
    cpu.backward_tokens(&batch, &d_text, &d_video);
    dev.backward_tokens(&batch, &d_text, &d_video);
    per_tensor("gradient of the token API", &host(&dev.params.grad), &cpu.params.grad, 0.0)?;

    let (ta, tb) = (cpu.embed_text(&data.ids, &data.attention_mask, 3, 10), dev.embed_text(&data.ids, &data.attention_mask, 3, 10));
    close("text global", &tb.global, &ta.global, tol)?;
    close("text local", &tb.local, &ta.local, tol)?;
    close("text mask", &tb.mask_additive, &ta.mask_additive, 0.0)?;
    let (va, vb) = (cpu.embed_video(&data.object, &data.object_mask, 3, 2, 3), dev.embed_video(&data.object, &data.object_mask, 3, 2, 3));
    close("video global", &vb.global, &va.global, tol)?;
    close("video local", &vb.local, &va.local, tol)?;
    close("video mask", &vb.mask_additive, &va.mask_additive, 0.0)?;
    let vi = dev.embed_video_inference(&data.object, &data.object_mask, 3, 2, 3);
    close("video global (inference)", &vi.global, &va.global, tol)?;

    let settings = AdamWSettings { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01 };
    let mut opt_cpu = AdamW::with_settings(cpu.params.len(), settings);
    let mut opt_dev = AdamW::new_on(backend.clone(), dev.params.len(), settings);
    for step in 0..2 {
        let (a, b) = (cpu.train_step_fused(&batch, &loss, true, &mut opt_cpu), dev.train_step_fused(&batch, &loss, true, &mut opt_dev));
        close(&format!("fused step {step} loss"), &[b.loss_total], &[a.loss_total], tol)?;
    }
    // AdamW divides by √v: a gradient that is rounding noise around 0 (different on each
    // backend) moves its weight by up to lr per step either way. So the parameters may
    // differ by 2·lr per step on top of the relative tolerance (none at tolerance 0).
    let adam_noise = if tol == 0.0 { 0.0 } else { 2.0 * 2.0 * settings.lr };
    let (got, want) = (host(&dev.params.data), &cpu.params.data);
    per_tensor("parameters after 2 fused steps", &got, want, adam_noise)?;
    // ... but only where the gradient is noise: nearly every value must meet the tolerance.
    let scale = max_abs(want);
    let off = got.iter().zip(want).filter(|(g, w)| (*g - *w).abs() > tol * scale).count();
    if off * 1000 > want.len() {
        return Err(format!("parameters after 2 fused steps: {off} of {} values off by more than {tol} × {scale}", want.len()));
    }
    let loss_eval = (cpu.forward_loss(&batch, &loss, true), dev.forward_loss(&batch, &loss, true));
    close("evaluation loss", &[loss_eval.1.loss_total], &[loss_eval.0.loss_total], tol)
}

/// The same initial state on every backend.
fn setup<B: Backend>(m: &mut Model<B>) {
    m.init_random(5);
    m.set_text_dropout(TextDropout::PUBLISHED, 11);
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_matches_itself_bit_for_bit() {
        super::compare_with_cpu(crate::backend::Cpu, 0.0).unwrap();
    }
}
