//! Times `Model::forward_backward` at the published size (DistilBERT-base, ViT-B video tower,
//! P = 256) on a random batch: `cargo run --release -p demovlp-model --example step_timing -- [B F R L steps]`.
//! `RECOMPUTE_MLP=0` keeps the video MLP activations instead of recomputing them (see `Model::set_recompute_mlp`).

use demovlp_kernels::Rng;
use demovlp_model::{BatchRef, Model, ModelConfig, TextDropout};
use demovlp_retrieval::LossConfig;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers: B F R L steps")).collect();
    let get = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (b, f, r, l, steps) = (get(0, 8), get(1, 8), get(2, 30), get(3, 100), get(4, 3));
    let mut cfg = ModelConfig::published(f);
    cfg.video.pos_embed_rows = r + 1;
    let mut model = Model::new(cfg);
    model.init_random(1);
    model.set_text_dropout(TextDropout::PUBLISHED, 1);
    model.set_recompute_mlp(std::env::var("RECOMPUTE_MLP").map_or(true, |v| v != "0"));
    let mut rng = Rng::new(2);
    let object: Vec<f32> = (0..b * f * r * 2054).map(|_| rng.uniform()).collect();
    let mask: Vec<f32> = (0..b * f * r).map(|i| if i % 7 == 6 { 0.0 } else { 1.0 }).collect();
    let ids: Vec<i64> = (0..b * l).map(|i| if i % l < 20 { 1000 + (i % 900) as i64 } else { 0 }).collect();
    let am: Vec<i64> = (0..b * l).map(|i| (i % l < 20) as i64).collect();
    let batch = BatchRef {
        batch: b,
        frames: f,
        regions: r,
        text_len: l,
        object: &object,
        object_mask: &mask,
        input_ids: &ids,
        attention_mask: &am,
    };
    let cfg = LossConfig::default();
    for s in 0..steps {
        let t = Instant::now();
        let out = model.forward_backward(&batch, &cfg, true);
        let total = t.elapsed().as_secs_f64();
        let t = Instant::now();
        model.forward_loss(&batch, &cfg, true);
        let fwd = t.elapsed().as_secs_f64();
        eprintln!("step {s}: forward_backward {total:.3} s (forward_loss alone {fwd:.3} s), loss {:.4}", out.loss_total);
    }
}
