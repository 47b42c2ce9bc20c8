//! Times the main kernels at published shapes (8 clips × 241 tokens, D = 768).
use demovlp_kernels::activation::{gelu_backward, gelu_forward};
use demovlp_kernels::attention::{attention_backward, attention_forward, AttnShape, KeyPattern};
use demovlp_kernels::layernorm::{layernorm_backward, layernorm_forward};
use demovlp_kernels::linear::{linear_backward, linear_forward, Grads};
use std::time::Instant;

fn t(name: &str, reps: usize, mut f: impl FnMut()) {
    f();
    let s = Instant::now();
    for _ in 0..reps {
        f();
    }
    eprintln!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 1e3 / reps as f64);
}

fn main() {
    let (n, d, m) = (8 * 241, 768, 3072);
    let x = vec![0.1f32; n * d];
    let w = vec![0.01f32; m * d];
    let bias = vec![0.0f32; m];
    let mut y = vec![0.0f32; n * m];
    t("linear fwd 1928x768->3072", 3, || linear_forward(&x, d, &w, Some(&bias), &mut y, n, d, m));
    let mut dx = vec![0.0f32; n * d];
    let mut dw = vec![0.0f32; m * d];
    let mut db = vec![0.0f32; m];
    t("linear bwd", 3, || linear_backward(&x, d, &w, &y, n, d, m, Some(&mut dx), &mut dw, Some(&mut db), Grads::Accumulate));
    let h = vec![0.3f32; n * m];
    let mut g = vec![0.0f32; n * m];
    t("gelu fwd 5.9M", 3, || gelu_forward(&h, &mut g));
    t("gelu bwd", 3, || gelu_backward(&h, &h, &mut g));
    let (mut ln, mut mu, mut rs) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
    let lw = vec![1.0f32; d];
    t("layernorm fwd", 3, || layernorm_forward(&x, &lw, &lw, 1e-6, &mut ln, &mut mu, &mut rs, d));
    t("layernorm bwd", 3, || layernorm_backward(&x, &lw, &mu, &rs, &x, &mut ln, &mut dx, &mut db[..d], d));
    let s = AttnShape { batch: 8, heads: 12, seq: 241, head_dim: 64, pattern: KeyPattern::Frames { regions: 30 } };
    let qkv = vec![0.05f32; n * 3 * d];
    let mask = vec![0.0f32; n];
    let mut probs = vec![0.0; s.probs_len()];
    let mut out = vec![0.0; n * d];
    t("attention frames fwd", 3, || attention_forward(&s, 0.125, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &mask, None, &mut probs, &mut out));
    let (mut a, mut b2, mut c) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n * d]);
    t("attention frames bwd", 3, || {
        attention_backward(&s, 0.125, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &probs, None, &out, &mut a, &mut b2, &mut c)
    });
    let s = AttnShape { batch: 8, heads: 12, seq: 100, head_dim: 64, pattern: KeyPattern::Full };
    let n2 = 800;
    let mut probs = vec![0.0; s.probs_len()];
    t("attention text fwd", 3, || {
        attention_forward(&s, 0.125, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &mask[..n2], None, &mut probs, &mut out[..n2 * d])
    });
}
