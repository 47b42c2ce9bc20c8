//! Parity with the published PyTorch implementation on the recorded batches
//! (`testdata/model_tiny*.safetensors`).
//!
//! Finding: the recordings' *text* outputs were produced with DistilBERT's dropout active
//! (the published model calls `text_model.train()`; HF DistilBERT defaults to dropout 0.1 and
//! attention_dropout 0.1). A dropout-free forward differs from `out.global_text` /
//! `out.local_text` by per-token noise of exactly the size a simulated p = 0.1 dropout gives,
//! while the same text math reproduces a real pretrained HF BERT to 3e-5 (io_minilm.rs) and
//! the video tower (no dropout, drop rates 0) reproduces its outputs to 1e-6. Torch's dropout
//! masks cannot be reproduced, so what depends on the text tower's forward (text-tower and
//! `txt_proj.1.weight` gradients) is checked by finite differences (gradcheck_model.rs)
//! instead, and everything else is checked here against the recording exactly:
//! - video tower outputs and mask;
//! - similarity matrices and the three losses, from the *recorded* text embeddings and ours
//!   for the video;
//! - every `object_model.*` gradient and `txt_proj.1.bias` (which only needs dLoss/dtext),
//!   backpropagated from those losses;
//! - a full training step: exactly the recorded parameters receive a gradient (norm3/norm none).

use demovlp_model::{BatchRef, Model, ModelConfig, TextConfig, TextKind, VideoConfig};
use demovlp_retrieval::{losses_forward_backward, LossConfig, LossInputs};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

struct Fixture {
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64s: HashMap<String, (Vec<usize>, Vec<i64>)>,
    meta: serde_json::Value,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().and_then(|m| m.get("config")).expect("config metadata");
        let meta: serde_json::Value = serde_json::from_str(meta).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (mut f32s, mut i64s) = (HashMap::new(), HashMap::new());
        for (k, v) in st.tensors() {
            let d = v.data();
            match v.dtype() {
                Dtype::F32 => {
                    f32s.insert(
                        k.clone(),
                        (v.shape().to_vec(), d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
                    );
                }
                Dtype::I64 => {
                    i64s.insert(
                        k.clone(),
                        (v.shape().to_vec(), d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
                    );
                }
                t => panic!("{name}: unexpected dtype {t:?} for {k}"),
            }
        }
        Fixture { f32s, i64s, meta }
    }

    fn f(&self, k: &str) -> &[f32] {
        &self.f32s.get(k).unwrap_or_else(|| panic!("fixture lacks {k}")).1
    }

    fn shape(&self, k: &str) -> &[usize] {
        &self.f32s.get(k).unwrap_or_else(|| panic!("fixture lacks {k}")).0
    }

    fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..).take_while(|i| self.f32s.contains_key(&format!("{prefix}{i}{suffix}"))).count()
    }

    /// Sizes from the tensor shapes; head counts from the recorded config.
    fn model_config(&self) -> ModelConfig {
        let word = self.shape("param.text_model.embeddings.word_embeddings.weight");
        let heads = |k: &str| self.meta[k].as_u64().unwrap() as usize;
        ModelConfig {
            text: TextConfig {
                kind: TextKind::Distilbert,
                vocab_size: word[0],
                dim: word[1],
                layers: self.count("param.text_model.transformer.layer.", ".attention.q_lin.weight"),
                heads: heads("theads"),
                hidden_dim: self.shape("param.text_model.transformer.layer.0.ffn.lin1.weight")[0],
                max_position_embeddings: self.shape("param.text_model.embeddings.position_embeddings.weight")[0],
                type_vocab_size: 0,
                layer_norm_eps: 1e-12,
            },
            video: VideoConfig {
                dim: self.shape("param.object_model.cls_token")[2],
                depth: self.count("param.object_model.blocks.", ".attn.qkv.weight"),
                heads: heads("heads"),
                mlp_dim: self.shape("param.object_model.blocks.0.mlp.fc1.weight")[0],
                max_frames: self.shape("param.object_model.temporal_embed")[1],
                pos_embed_rows: self.shape("param.object_model.custom_pos_embed")[1],
                feature_dim: self.shape("param.object_model.object_embedding.weight")[1],
                box_dim: self.shape("param.object_model.pos_embedding.weight")[1],
                layer_norm_eps: 1e-6,
            },
            proj_dim: self.shape("param.txt_proj.1.weight")[0],
        }
    }

    fn model(&self) -> Model {
        let mut m = Model::new(self.model_config());
        let declared: Vec<String> = m.params.specs().iter().map(|s| s.name.clone()).collect();
        for name in &declared {
            let (shape, v) = self.f32s.get(&format!("param.{name}")).unwrap_or_else(|| panic!("fixture lacks param.{name}"));
            let id = m.params.id(name).unwrap();
            assert_eq!(shape, &m.params.spec(id).shape, "{name}: shape");
            m.params.get_mut(id).copy_from_slice(v);
        }
        let in_fixture = self.f32s.keys().filter(|k| k.starts_with("param.")).count();
        assert_eq!(in_fixture, declared.len(), "fixture has parameters the model does not declare");
        m
    }
}

/// max |got − want| / max |want| (both flattened).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64)).max(1e-12);
    got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max) / scale
}

struct Case {
    fx: Fixture,
    b: usize,
    f: usize,
    r: usize,
    l: usize,
}

impl Case {
    fn load(name: &str) -> Case {
        let fx = Fixture::load(name);
        let s = fx.shape("in.object").to_vec();
        let l = fx.i64s["in.input_ids"].0[1];
        Case { fx, b: s[0], f: s[1], r: s[2], l }
    }

    fn batch(&self) -> BatchRef<'_> {
        BatchRef {
            batch: self.b,
            frames: self.f,
            regions: self.r,
            text_len: self.l,
            object: self.fx.f("in.object"),
            object_mask: self.fx.f("in.object_mask"),
            input_ids: &self.fx.i64s["in.input_ids"].1,
            attention_mask: &self.fx.i64s["in.attention_mask"].1,
        }
    }
}

/// Video tower, losses and video/proj-bias gradients against the recording, using the
/// recorded text embeddings (see the module comment).
fn check_video_and_losses(name: &str) {
    let c = Case::load(name);
    let fx = &c.fx;
    let (b, l, nr) = (c.b, c.l, c.f * c.r);
    let mut model = fx.model();
    let p = model.config.proj_dim;
    let batch = c.batch();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut cmp = |what: &str, got: &[f32], want: &[f32], tol: f64| {
        let e = rel_err(got, want);
        report.push(format!("{what} {e:.1e}"));
        if e > tol {
            failures.push(format!("{what}: relative error {e:.3e} > {tol:.0e}"));
        }
    };

    let ve = model.embed_video(batch.object, batch.object_mask, b, c.f, c.r);
    cmp("out.global_video", &ve.global, fx.f("out.global_video"), 1e-5);
    cmp("out.local_video", &ve.local, fx.f("out.local_video"), 1e-5);
    cmp("out.video_mask_additive", &ve.mask_additive, fx.f("out.video_mask_additive"), 0.0);

    let text_mask: Vec<f32> = batch.attention_mask.chunks(l).flat_map(|row| row[1..].iter().map(|&m| (m as f32 - 1.0) * 100.0)).collect();
    let inputs = LossInputs {
        batch: b,
        words: l - 1,
        regions: nr,
        dim: p,
        global_text: fx.f("out.global_text"),
        global_video: &ve.global,
        local_text: fx.f("out.local_text"),
        local_video: &ve.local,
        text_mask_additive: &text_mask,
        video_mask_additive: &ve.mask_additive,
    };
    let (out, g) = losses_forward_backward(&LossConfig::default(), &inputs, true);
    cmp("out.global_sim_text_video", &out.global_sim_text_video, fx.f("out.global_sim_text_video"), 1e-4);
    cmp("out.local_sim_video_text", &out.local_sim_video_text, fx.f("out.local_sim_video_text"), 1e-4);
    cmp("out.loss_total", &[out.loss_total], fx.f("out.loss_total"), 1e-4);
    cmp("out.loss_global", &[out.loss_global], fx.f("out.loss_global"), 1e-4);
    cmp("out.loss_local", &[out.loss_local], fx.f("out.loss_local"), 1e-4);

    // Backpropagate dLoss/dvideo through the video tower.
    model.params.zero_grad();
    let mut d_video = vec![0.0; b * (1 + nr) * p];
    for bi in 0..b {
        let row = &mut d_video[bi * (1 + nr) * p..(bi + 1) * (1 + nr) * p];
        row[..p].copy_from_slice(&g.global_video[bi * p..(bi + 1) * p]);
        row[p..].copy_from_slice(&g.local_video[bi * nr * p..(bi + 1) * nr * p]);
    }
    model.backward_video_tokens(batch.object, &d_video);
    let mut checked = 0;
    for spec in model.params.specs() {
        if !spec.name.starts_with("object_model.") {
            continue;
        }
        let got = &model.params.grad[spec.offset..spec.offset + spec.len];
        match fx.f32s.get(&format!("grad.{}", spec.name)) {
            Some((_, want)) => {
                assert!(spec.receives_grad, "{name}: {} is recorded with a gradient but declared unused", spec.name);
                cmp(&format!("grad.{}", spec.name), got, want, 1e-4);
                checked += 1;
            }
            None => {
                assert!(!spec.receives_grad, "{name}: {} should receive no gradient", spec.name);
                assert!(got.iter().all(|&x| x == 0.0), "{name}: unused {} got a gradient", spec.name);
            }
        }
    }
    assert!(checked >= 8, "{name}: only {checked} video gradients compared");
    // txt_proj.1.bias: Σ over every text token of dLoss/d(token embedding).
    let mut db = vec![0.0f32; p];
    for row in g.global_text.chunks(p).chain(g.local_text.chunks(p)) {
        db.iter_mut().zip(row).for_each(|(a, x)| *a += x);
    }
    cmp("grad.txt_proj.1.bias", &db, fx.f("grad.txt_proj.1.bias"), 1e-4);

    eprintln!("{name}: {}", report.join(", "));
    assert!(failures.is_empty(), "{name}: {} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// A whole training step: finite losses, and gradients on exactly the recorded parameters.
fn check_step_gradient_set(name: &str) {
    let c = Case::load(name);
    let mut model = c.fx.model();
    let batch = c.batch();
    let out = model.forward_backward(&batch, &LossConfig::default(), true);
    assert!(out.loss_total.is_finite() && out.loss_global.is_finite() && out.loss_local.is_finite());
    assert!((out.loss_total - out.loss_global - out.loss_local).abs() < 1e-5 * out.loss_total.abs());
    let again = model.forward_loss(&batch, &LossConfig::default(), true);
    assert_eq!(again.loss_total, out.loss_total, "forward_loss and forward_backward disagree");
    for spec in model.params.specs() {
        let got = &model.params.grad[spec.offset..spec.offset + spec.len];
        let recorded = c.fx.f32s.contains_key(&format!("grad.{}", spec.name));
        assert_eq!(spec.receives_grad, recorded, "{name}: {} receives_grad", spec.name);
        let nonzero = got.iter().any(|&x| x != 0.0);
        assert_eq!(nonzero, recorded, "{name}: {} has a gradient: {nonzero}, recorded: {recorded}", spec.name);
        assert!(got.iter().all(|x| x.is_finite()), "{name}: {} gradient not finite", spec.name);
        // Row level for the word table: exactly the recorded rows get a gradient. Hugging Face
        // declares the table with padding_idx = 0, so the [PAD] row never does.
        if spec.name == "text_model.embeddings.word_embeddings.weight" {
            let d = spec.shape[1];
            let want = c.fx.f(&format!("grad.{}", spec.name));
            let rows = |g: &[f32]| -> Vec<usize> {
                g.chunks(d).enumerate().filter(|(_, r)| r.iter().any(|&x| x != 0.0)).map(|(i, _)| i).collect()
            };
            let (got_rows, want_rows) = (rows(got), rows(want));
            assert!(!want_rows.contains(&0) && batch.input_ids.contains(&0));
            assert_eq!(got_rows, want_rows, "{name}: word-embedding rows with a gradient");
        }
    }
    // Evaluation embeddings are the same token outputs, split, with the text mask (m − 1)·100.
    let (b, l, p) = (c.b, c.l, model.config.proj_dim);
    let tokens = model.forward_tokens(&batch, false).0.to_vec();
    let te = model.embed_text(batch.input_ids, batch.attention_mask, b, l);
    for bi in 0..b {
        assert_eq!(&te.global[bi * p..(bi + 1) * p], &tokens[bi * l * p..bi * l * p + p]);
        assert_eq!(&te.local[bi * (l - 1) * p..(bi + 1) * (l - 1) * p], &tokens[bi * l * p + p..(bi + 1) * l * p]);
    }
    let want_mask: Vec<f32> = batch.attention_mask.chunks(l).flat_map(|row| row[1..].iter().map(|&m| (m as f32 - 1.0) * 100.0)).collect();
    assert_eq!(te.mask_additive, want_mask);
    assert!(want_mask.contains(&-100.0) && want_mask.contains(&0.0));
    // Global-only ablation: loss_local reported as 0, total = global.
    let g = model.forward_backward(&batch, &LossConfig::default(), false);
    assert_eq!(g.loss_local, 0.0);
    assert_eq!(g.loss_total, g.loss_global);
}

#[test]
fn parity_model_tiny_video_losses_gradients() {
    check_video_and_losses("model_tiny.safetensors");
}

#[test]
fn parity_model_tiny_1frame_video_losses_gradients() {
    check_video_and_losses("model_tiny_1frame.safetensors");
}

#[test]
fn parity_model_tiny_step_gradient_set() {
    check_step_gradient_set("model_tiny.safetensors");
}

#[test]
fn parity_model_tiny_1frame_step_gradient_set() {
    check_step_gradient_set("model_tiny_1frame.safetensors");
}
