//! Finite-difference checks of the whole model's backward pass on tiny random models
//! (DistilBERT and BERT text towers, multi-frame video with padded regions and padded words):
//! a few coordinates of every parameter tensor, against Σ r·tokens and against the losses.

use demovlp_kernels::gradcheck::{numeric_gradient, sample_coords, weighted_sum};
use demovlp_kernels::Rng;
use demovlp_model::{BatchRef, Model, ModelConfig, TextConfig, TextDropout, TextKind, VideoConfig};
use demovlp_retrieval::LossConfig;

/// Two step sizes: a coordinate passes if either agrees, since a step may cross a ReLU kink
/// (txt_proj's ReLU, LeakyReLU and the focal threshold in the loss are piecewise).
const EPS: [f32; 2] = [3e-3, 1e-3];

fn tiny_config(kind: TextKind) -> ModelConfig {
    ModelConfig {
        text: TextConfig {
            kind,
            vocab_size: 20,
            dim: 8,
            layers: 2,
            heads: 2,
            hidden_dim: 12,
            max_position_embeddings: 8,
            type_vocab_size: if kind == TextKind::Bert { 2 } else { 0 },
            layer_norm_eps: 1e-12,
        },
        video: VideoConfig {
            dim: 8,
            depth: 2,
            heads: 2,
            mlp_dim: 12,
            max_frames: 3,
            pos_embed_rows: 4,
            feature_dim: 10,
            box_dim: 6,
            layer_norm_eps: 1e-6,
        },
        proj_dim: 4,
    }
}

struct Inputs {
    object: Vec<f32>,
    object_mask: Vec<f32>,
    ids: Vec<i64>,
    mask: Vec<i64>,
}

const B: usize = 3;
const F: usize = 2;
const R: usize = 3;
const L: usize = 6;

fn inputs(rng: &mut Rng) -> Inputs {
    let object: Vec<f32> = (0..B * F * R * 16).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    // Item 1 has two padded regions in frame 1; item 2 a wholly padded second frame.
    let mut object_mask = vec![1.0; B * F * R];
    object_mask[R + R + 1] = 0.0;
    object_mask[R + R + 2] = 0.0;
    for j in 0..R {
        object_mask[2 * F * R + R + j] = 0.0;
    }
    let lens = [6, 4, 3];
    let mut ids = vec![0i64; B * L];
    let mut mask = vec![0i64; B * L];
    for b in 0..B {
        for t in 0..lens[b] {
            ids[b * L + t] = 1 + rng.below(19) as i64;
            mask[b * L + t] = 1;
        }
    }
    Inputs { object, object_mask, ids, mask }
}

fn batch(x: &Inputs) -> BatchRef<'_> {
    BatchRef {
        batch: B,
        frames: F,
        regions: R,
        text_len: L,
        object: &x.object,
        object_mask: &x.object_mask,
        input_ids: &x.ids,
        attention_mask: &x.mask,
    }
}

/// Random weights large enough that every nonlinearity is exercised (LayerNorm weights near 1).
fn random_model(kind: TextKind, seed: u64) -> Model {
    let mut m = Model::new(tiny_config(kind));
    let mut rng = Rng::new(seed);
    let specs = m.params.specs().to_vec();
    for s in &specs {
        let norm_weight =
            s.name.ends_with(".weight") && (s.name.contains("LayerNorm") || s.name.contains("layer_norm") || s.name.contains(".norm"));
        for v in &mut m.params.data[s.offset..s.offset + s.len] {
            let u = rng.uniform() * 2.0 - 1.0;
            *v = if norm_weight { 1.0 + 0.3 * u } else { 0.5 * u };
        }
    }
    m
}

/// For each parameter tensor receiving a gradient: a few coordinates (for embedding tables,
/// rows that the batch uses), numeric vs analytic with an error floor against f32 noise.
fn check_all_tensors(
    what: &str,
    model: &mut Model,
    analytic: &[f32],
    mut loss: impl FnMut(&mut Model) -> f64,
    per_tensor: usize,
    tol: f64,
    ids: &[i64],
) {
    let mut rng = Rng::new(99);
    let x = model.params.data.clone();
    let specs = model.params.specs().to_vec();
    let mut worst = (0.0f64, String::new());
    for s in specs.iter().filter(|s| s.receives_grad) {
        let mut coords: Vec<usize> = if s.name.ends_with("word_embeddings.weight")
            || s.name.ends_with("position_embeddings.weight")
            || s.name.ends_with("token_type_embeddings.weight")
        {
            let d = s.shape[1];
            let row = if s.name.ends_with("word_embeddings.weight") { ids[rng.below(ids.len())] as usize } else { 0 };
            sample_coords(&mut rng, d, per_tensor).into_iter().map(|i| row * d + i).collect()
        } else {
            sample_coords(&mut rng, s.len, per_tensor)
        };
        coords.iter_mut().for_each(|c| *c += s.offset);
        let numeric: Vec<Vec<f64>> = EPS
            .iter()
            .map(|&eps| {
                numeric_gradient(&x, &coords, eps, |xp| {
                    model.params.data.copy_from_slice(xp);
                    loss(model)
                })
            })
            .collect();
        let scale = coords.iter().zip(&numeric[0]).map(|(&i, n)| (analytic[i] as f64).abs().max(n.abs())).fold(0.05, f64::max);
        for (k, &i) in coords.iter().enumerate() {
            let (e, n) = numeric.iter().map(|nv| ((nv[k] - analytic[i] as f64).abs() / scale, nv[k])).fold((f64::MAX, 0.0), |a, b| {
                if b.0 < a.0 {
                    b
                } else {
                    a
                }
            });
            if e > worst.0 {
                worst = (e, format!("{}[{}]: numeric {n:.6}, analytic {:.6}", s.name, i - s.offset, analytic[i]));
            }
        }
    }
    model.params.data.copy_from_slice(&x);
    eprintln!("{what}: worst {:.2e} at {}", worst.0, worst.1);
    assert!(worst.0 <= tol, "{what}: gradient mismatch {:.3e} at {}", worst.0, worst.1);
}

/// With `dropout`, the generator is reset before every forward so all evaluations share masks.
fn check_tokens(kind: TextKind, dropout: bool) {
    let mut rng = Rng::new(5);
    let x = inputs(&mut rng);
    let b = batch(&x);
    let mut model = random_model(kind, 1);
    if dropout {
        model.set_text_dropout(TextDropout { hidden: 0.2, attention: 0.2 }, 0);
    }
    let reset = |m: &mut Model| m.set_dropout_rng(Rng::new(17));
    reset(&mut model);
    let (nt, nv) = {
        let (t, v) = model.forward_tokens(&b, dropout);
        (t.len(), v.len())
    };
    let rt: Vec<f32> = (0..nt).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let rv: Vec<f32> = (0..nv).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    model.params.zero_grad();
    model.backward_tokens(&b, &rt, &rv);
    let analytic = model.params.grad.clone();
    let loss = |m: &mut Model| {
        reset(m);
        let (t, v) = m.forward_tokens(&b, dropout);
        weighted_sum(t, &rt) + weighted_sum(v, &rv)
    };
    check_all_tensors(&format!("{kind:?} tokens dropout {dropout}"), &mut model, &analytic, loss, 3, 1e-2, &x.ids);
}

#[test]
fn gradcheck_tokens_distilbert() {
    check_tokens(TextKind::Distilbert, false);
}

#[test]
fn gradcheck_tokens_bert() {
    check_tokens(TextKind::Bert, false);
}

#[test]
fn gradcheck_tokens_with_dropout() {
    check_tokens(TextKind::Distilbert, true);
    check_tokens(TextKind::Bert, true);
}

/// Dropout changes training outputs only; evaluation paths ignore it.
#[test]
fn dropout_only_in_training() {
    let mut rng = Rng::new(8);
    let x = inputs(&mut rng);
    let b = batch(&x);
    let mut model = random_model(TextKind::Distilbert, 3);
    let eval = model.forward_tokens(&b, false).0.to_vec();
    let hidden = model.text_hidden_states(&x.ids, &x.mask, B, L);
    model.set_text_dropout(TextDropout::PUBLISHED, 1);
    assert_eq!(model.forward_tokens(&b, false).0, &eval[..]);
    assert_eq!(model.text_hidden_states(&x.ids, &x.mask, B, L), hidden);
    let train1 = model.forward_tokens(&b, true).0.to_vec();
    let train2 = model.forward_tokens(&b, true).0.to_vec();
    assert_ne!(train1, eval);
    assert_ne!(train1, train2, "each training step draws new masks");
    let cfg = LossConfig::default();
    let e1 = model.forward_loss(&b, &cfg, true).loss_total;
    let e2 = model.forward_loss(&b, &cfg, true).loss_total;
    assert_eq!(e1, e2);
}

/// Through the retrieval losses as `forward_backward` wires them (global-only and full).
#[test]
fn gradcheck_losses() {
    let mut rng = Rng::new(6);
    let x = inputs(&mut rng);
    let b = batch(&x);
    for use_local in [false, true] {
        let mut model = random_model(TextKind::Distilbert, 2);
        let cfg = LossConfig::default();
        model.forward_backward(&b, &cfg, use_local);
        let analytic = model.params.grad.clone();
        let loss = |m: &mut Model| m.forward_loss(&b, &cfg, use_local).loss_total as f64;
        check_all_tensors(&format!("loss use_local={use_local}"), &mut model, &analytic, loss, 2, 2e-2, &x.ids);
    }
}
