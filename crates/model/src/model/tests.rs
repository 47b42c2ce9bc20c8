//! Tests of the whole model: the fused step, arena reuse, recompute options, initialisation.

use super::*;
use crate::config::{TextConfig, VideoConfig};

fn tiny() -> ModelConfig {
    ModelConfig {
        text: TextConfig {
            kind: TextKind::Distilbert,
            vocab_size: 50,
            dim: 16,
            layers: 2,
            heads: 2,
            hidden_dim: 32,
            max_position_embeddings: 12,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
        },
        video: VideoConfig {
            dim: 16,
            depth: 2,
            heads: 2,
            mlp_dim: 32,
            max_frames: 2,
            pos_embed_rows: 4,
            feature_dim: 2048,
            box_dim: 6,
            layer_norm_eps: 1e-6,
        },
        proj_dim: 8,
    }
}

fn arena_buffers(m: &Model) -> Vec<(usize, usize)> {
    let a = &m.arena;
    let mut v = a.text.buffers();
    v.extend(a.video.buffers());
    for b in [
        &a.relu,
        &a.text_out,
        &a.global_text,
        &a.local_text,
        &a.text_mask,
        &a.global_video,
        &a.local_video,
        &a.video_mask,
        &a.d_text_out,
        &a.d_video_out,
        &a.d_relu,
        &a.d_hidden,
    ] {
        v.push((b.as_ptr() as usize, b.capacity()));
    }
    v
}

struct Data {
    object: Vec<f32>,
    mask: Vec<f32>,
    ids: Vec<i64>,
    am: Vec<i64>,
}

fn data(b: usize, f: usize, r: usize, l: usize) -> Data {
    let mut rng = Rng::new(b as u64);
    Data {
        object: (0..b * f * r * 2054).map(|_| rng.uniform()).collect(),
        mask: (0..b * f * r).map(|i| if i % 4 == 3 { 0.0 } else { 1.0 }).collect(),
        ids: (0..b * l).map(|i| if i % l < l - 2 { 1 + (i % 40) as i64 } else { 0 }).collect(),
        am: (0..b * l).map(|i| (i % l < l - 2) as i64).collect(),
    }
}

fn batch(d: &Data, b: usize, f: usize, r: usize, l: usize) -> BatchRef<'_> {
    BatchRef {
        batch: b,
        frames: f,
        regions: r,
        text_len: l,
        object: &d.object,
        object_mask: &d.mask,
        input_ids: &d.ids,
        attention_mask: &d.am,
    }
}

/// The fused step (AdamW applied block by block inside the backward pass) must leave
/// parameters and both moments bit-identical to forward_backward + AdamW::step, over
/// several steps, for both text families, with dropout and weight decay on; and it must
/// never write a block's or the word table's gradient into `params.grad`.
#[test]
fn fused_step_equals_backward_then_adamw_bit_for_bit() {
    for kind in [TextKind::Distilbert, TextKind::Bert] {
        let mut cfg = tiny();
        cfg.text.kind = kind;
        cfg.text.type_vocab_size = 2;
        let mut plain = Model::new(cfg.clone());
        plain.init_random(3);
        plain.set_text_dropout(TextDropout::PUBLISHED, 11);
        let mut fused = plain.clone();
        let settings = crate::AdamWSettings { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01 };
        let mut opt_plain = AdamW::with_settings(plain.params.len(), settings);
        let mut opt_fused = opt_plain.clone();
        let loss = LossConfig::default();
        let mut d = data(3, 2, 3, 10);
        // Repeated ids (rows summed over several tokens) as well as [PAD].
        for (i, id) in d.ids.iter_mut().enumerate() {
            if *id != 0 {
                *id = 1 + (i * 7 % 13) as i64;
            }
        }
        for step in 0..3 {
            let a = plain.forward_backward(&batch(&d, 3, 2, 3, 10), &loss, true);
            opt_plain.step(&mut plain.params);
            let b = fused.train_step_fused(&batch(&d, 3, 2, 3, 10), &loss, true, &mut opt_fused);
            assert_eq!(a.loss_total.to_bits(), b.loss_total.to_bits(), "{kind:?} step {step}: loss");
            let same = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same(&plain.params.data, &fused.params.data), "{kind:?} step {step}: parameters differ");
            assert!(same(&opt_plain.m, &opt_fused.m) && same(&opt_plain.v, &opt_fused.v), "{kind:?} step {step}: moments differ");
            assert_eq!(opt_plain.t, opt_fused.t);
            for w in fused.text.layer_windows().iter().chain(fused.video.block_windows()).chain([&fused.word_range]) {
                assert!(
                    fused.params.grad[w.clone()].iter().all(|&g| g == 0.0),
                    "{kind:?}: a block or word-table gradient reached params.grad"
                );
            }
        }
        // The windows and the rest cover every updated element exactly once.
        let mut count = vec![0u8; fused.params.len()];
        for w in fused.text.layer_windows().iter().chain(fused.video.block_windows()) {
            count[w.clone()].iter_mut().for_each(|c| *c += 1);
        }
        for &(r0, r1) in &fused.rest_ranges {
            count[r0..r1].iter_mut().for_each(|c| *c += 1);
        }
        count[fused.word_range.clone()].iter_mut().for_each(|c| *c += 1);
        for s in fused.params.specs().iter().filter(|s| s.receives_grad) {
            assert!(count[s.offset..s.offset + s.len].iter().all(|&c| c == 1), "{kind:?}: {} not covered exactly once", s.name);
        }
    }
}

#[test]
fn steady_state_steps_reuse_the_arena() {
    let mut m = Model::new(tiny());
    m.init_random(1);
    m.set_text_dropout(TextDropout::PUBLISHED, 2);
    let cfg = LossConfig::default();
    let big = data(4, 2, 3, 10);
    let small = data(2, 1, 3, 8);
    m.forward_backward(&batch(&big, 4, 2, 3, 10), &cfg, true);
    // An evaluation forward grows the one buffer training does not use (the text FFN
    // scratch: training keeps those activations per layer instead).
    m.forward_loss(&batch(&big, 4, 2, 3, 10), &cfg, true);
    let after_first = arena_buffers(&m);
    let l1 = m.forward_backward(&batch(&big, 4, 2, 3, 10), &cfg, true);
    assert_eq!(arena_buffers(&m), after_first, "a same-shaped step reallocated");
    m.forward_backward(&batch(&small, 2, 1, 3, 8), &cfg, true);
    m.forward_loss(&batch(&small, 2, 1, 3, 8), &cfg, true);
    let l2 = m.forward_backward(&batch(&big, 4, 2, 3, 10), &cfg, true);
    assert_eq!(arena_buffers(&m), after_first, "a smaller batch in between reallocated");
    assert!(l1.loss_total.is_finite() && l2.loss_total.is_finite());
}

/// The inference forward (one block's buffers, ping-pong residual stream) gives the
/// training forward's outputs bit for bit, and leaves the kept activations usable.
#[test]
fn embed_video_inference_between_training_steps() {
    let mut m = Model::new(tiny());
    m.init_random(5);
    let cfg = LossConfig::default();
    let d = data(3, 2, 3, 10);
    let b = batch(&d, 3, 2, 3, 10);
    let first = m.forward_backward(&b, &cfg, true);
    let g1 = m.params.grad.clone();
    let tokens = m.forward_tokens(&b, false).1.to_vec();
    let e = m.embed_video_inference(b.object, b.object_mask, 3, 2, 3);
    let p = m.config.proj_dim;
    for bi in 0..3 {
        let t = &tokens[bi * 7 * p..(bi + 1) * 7 * p];
        assert_eq!(&e.global[bi * p..(bi + 1) * p], &t[..p]);
        assert_eq!(&e.local[bi * 6 * p..(bi + 1) * 6 * p], &t[p..]);
    }
    let again = m.forward_backward(&b, &cfg, true);
    assert_eq!(first.loss_total, again.loss_total);
    assert_eq!(g1, m.params.grad);
}

#[test]
fn recomputing_the_mlp_gives_identical_gradients() {
    let mut m = Model::new(tiny());
    m.init_random(3);
    let cfg = LossConfig::default();
    let d = data(3, 2, 3, 10);
    let b = batch(&d, 3, 2, 3, 10);
    m.set_recompute_mlp(false);
    let kept = m.forward_backward(&b, &cfg, true);
    assert!(m.arena.video.blocks.iter().all(|b| b.fc1_out.capacity() > 0), "hidden activations not kept");
    let g_kept = m.params.grad.clone();
    m.set_recompute_mlp(true);
    let re = m.forward_backward(&b, &cfg, true);
    assert_eq!(kept.loss_total, re.loss_total);
    assert_eq!(g_kept, m.params.grad);
    assert!(m.arena.video.blocks.iter().all(|b| b.fc1_out.capacity() == 0), "hidden activations still kept");
    // Some blocks recomputing, the others keeping.
    m.set_recompute_mlp_blocks(1);
    let part = m.forward_backward(&b, &cfg, true);
    assert_eq!(kept.loss_total, part.loss_total);
    assert_eq!(g_kept, m.params.grad);
    assert!(m.arena.video.blocks[0].fc1_out.capacity() == 0 && m.arena.video.blocks[1].fc1_out.capacity() > 0);
}

#[test]
fn recomputing_the_text_ffn_gives_identical_gradients() {
    let mut m = Model::new(tiny());
    m.init_random(4);
    let cfg = LossConfig::default();
    let d = data(3, 2, 3, 10);
    let b = batch(&d, 3, 2, 3, 10);
    let kept = m.forward_backward(&b, &cfg, true);
    let g_kept = m.params.grad.clone();
    m.set_text_recompute_ffn(true);
    // Stale kept activations must not be read: poison them.
    m.arena.text.poison_kept_ffn_hidden();
    let re = m.forward_backward(&b, &cfg, true);
    assert_eq!(kept.loss_total, re.loss_total);
    assert_eq!(g_kept, m.params.grad);
}

#[test]
fn init_random_is_published_style() {
    let mut m = Model::new(tiny());
    m.init_random(7);
    let p = &m.params;
    let get = |n: &str| p.get(p.id(n).unwrap_or_else(|| panic!("{n}")));
    assert!(get("text_model.embeddings.LayerNorm.weight").iter().all(|&x| x == 1.0));
    assert!(get("object_model.blocks.0.norm3.weight").iter().all(|&x| x == 1.0));
    assert!(get("object_model.blocks.1.attn.qkv.bias").iter().all(|&x| x == 0.0));
    assert!(get("object_model.temporal_embed").iter().all(|&x| x == 0.0));
    assert!(get("text_model.embeddings.word_embeddings.weight")[..16].iter().all(|&x| x == 0.0), "padding row");
    let w = get("object_model.object_embedding.weight");
    let n = w.len() as f64;
    let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 1e-3 && (std - 0.0176).abs() < 1e-3, "mean {mean} std {std}"); // N(0, .02) cut at ±2σ has σ ≈ 0.0176
    assert!(w.iter().all(|&x| x.abs() <= 0.04));
    assert!(get("object_model.cls_token").iter().any(|&x| x != 0.0));
    let mut again = Model::new(tiny());
    again.init_random(7);
    assert_eq!(again.params.data, m.params.data);
    again.init_random(8);
    assert_ne!(again.params.data, m.params.data);
}
