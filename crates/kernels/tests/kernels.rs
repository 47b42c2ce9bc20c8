//! Forward checks against naive formulas and finite-difference checks of every backward.

use demovlp_kernels::activation::*;
use demovlp_kernels::attention::*;
use demovlp_kernels::embedding::*;
use demovlp_kernels::gradcheck::{assert_gradient, random_vec, weighted_sum};
use demovlp_kernels::layernorm::*;
use demovlp_kernels::linear::*;
use demovlp_kernels::softmax::*;
use demovlp_kernels::Rng;

const EPS: f32 = 1e-2;
const TOL: f64 = 1e-2;

#[test]
fn linear_forward_and_gradients() {
    let (n, din, dout, ldx) = (5, 7, 4, 9); // x is a column block of a wider matrix
    let mut rng = Rng::new(1);
    let x = random_vec(&mut rng, n * ldx, 1.0);
    let w = random_vec(&mut rng, dout * din, 1.0);
    let b = random_vec(&mut rng, dout, 1.0);
    let r = random_vec(&mut rng, n * dout, 1.0);
    let fwd = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0.0; n * dout];
        linear_forward(x, ldx, w, Some(b), &mut y, n, din, dout);
        y
    };
    let y = fwd(&x, &w, &b);
    for i in 0..n {
        for o in 0..dout {
            let want: f32 = b[o] + (0..din).map(|k| x[i * ldx + k] * w[o * din + k]).sum::<f32>();
            assert!((y[i * dout + o] - want).abs() < 1e-5);
        }
    }
    let mut dx = vec![0.0; n * din];
    let mut dw = vec![0.0; dout * din];
    let mut db = vec![0.0; dout];
    linear_backward(&x, ldx, &w, &r, n, din, dout, Some(&mut dx), &mut dw, Some(&mut db), Grads::Accumulate);
    // dx is dense [n, din]; compare on the used columns of x.
    let mut dx_full = vec![0.0; n * ldx];
    for i in 0..n {
        dx_full[i * ldx..i * ldx + din].copy_from_slice(&dx[i * din..(i + 1) * din]);
    }
    assert_gradient("linear dx", &x, &dx_full, None, EPS, TOL, |x| weighted_sum(&fwd(x, &w, &b), &r));
    assert_gradient("linear dw", &w, &dw, None, EPS, TOL, |w| weighted_sum(&fwd(&x, w, &b), &r));
    assert_gradient("linear db", &b, &db, None, EPS, TOL, |b| weighted_sum(&fwd(&x, &w, b), &r));
    // Overwriting stale buffers gives the bits of accumulating into zeros (dx still adds).
    let (mut dx2, mut dw2, mut db2) = (vec![0.0; n * din], vec![f32::NAN; dout * din], vec![7.5; dout]);
    linear_backward(&x, ldx, &w, &r, n, din, dout, Some(&mut dx2), &mut dw2, Some(&mut db2), Grads::Overwrite);
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
    assert!(same(&dx, &dx2) && same(&dw, &dw2) && same(&db, &db2), "Grads::Overwrite differs from accumulating into zeros");
}

#[test]
fn layernorm_forward_and_gradients() {
    let (rows, d) = (6, 10);
    let mut rng = Rng::new(2);
    let x: Vec<f32> = random_vec(&mut rng, rows * d, 2.0).iter().map(|v| v + 0.5).collect();
    let w: Vec<f32> = random_vec(&mut rng, d, 0.5).iter().map(|v| v + 1.0).collect();
    let b = random_vec(&mut rng, d, 0.5);
    let r = random_vec(&mut rng, rows * d, 1.0);
    let fwd = |x: &[f32], w: &[f32], b: &[f32]| {
        let (mut y, mut m, mut s) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm_forward(x, w, b, 1e-5, &mut y, &mut m, &mut s, d);
        (y, m, s)
    };
    let (y, m, s) = fwd(&x, &w, &b);
    for rr in 0..rows {
        let xr = &x[rr * d..(rr + 1) * d];
        let mu = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d as f32;
        for i in 0..d {
            let want = (xr[i] - mu) / (var + 1e-5).sqrt() * w[i] + b[i];
            assert!((y[rr * d + i] - want).abs() < 1e-5, "{} vs {want}", y[rr * d + i]);
        }
    }
    let (mut dx, mut dw, mut db) = (vec![0.0; rows * d], vec![0.0; d], vec![0.0; d]);
    layernorm_backward(&x, &w, &m, &s, &r, &mut dx, &mut dw, &mut db, d);
    assert_gradient("layernorm dx", &x, &dx, None, EPS, TOL, |x| weighted_sum(&fwd(x, &w, &b).0, &r));
    assert_gradient("layernorm dw", &w, &dw, None, EPS, TOL, |w| weighted_sum(&fwd(&x, w, &b).0, &r));
    assert_gradient("layernorm db", &b, &db, None, EPS, TOL, |b| weighted_sum(&fwd(&x, &w, b).0, &r));
}

/// Inputs kept away from the kinks of ReLU-like functions so differences are smooth.
fn away_from_zero(rng: &mut Rng, n: usize) -> Vec<f32> {
    random_vec(rng, n, 3.0).into_iter().map(|v| if v.abs() < 0.1 { v + 0.3 } else { v }).collect()
}

#[test]
fn gelu_values_and_gradient() {
    let mut y = vec![0.0; 3];
    gelu_forward(&[1.0, -0.5, 3.0], &mut y);
    // torch.nn.functional.gelu(torch.tensor([1.0, -0.5, 3.0]))
    for (a, b) in y.iter().zip([0.841_344_7f32, -0.154_268_8, 2.995_950_6]) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    let mut rng = Rng::new(3);
    let x = away_from_zero(&mut rng, 50);
    let r = random_vec(&mut rng, 50, 1.0);
    let f = |x: &[f32]| {
        let mut y = vec![0.0; x.len()];
        gelu_forward(x, &mut y);
        weighted_sum(&y, &r)
    };
    let mut dx = vec![0.0; 50];
    gelu_backward(&x, &r, &mut dx);
    assert_gradient("gelu", &x, &dx, None, EPS, TOL, f);
}

#[test]
fn relu_and_leaky_relu_gradients() {
    let mut rng = Rng::new(4);
    let x = away_from_zero(&mut rng, 40);
    let r = random_vec(&mut rng, 40, 1.0);
    let mut dx = vec![0.0; 40];
    relu_backward(&x, &r, &mut dx);
    assert_gradient("relu", &x, &dx, None, EPS, TOL, |x| {
        let mut y = vec![0.0; x.len()];
        relu_forward(x, &mut y);
        weighted_sum(&y, &r)
    });
    let mut dx = vec![0.0; 40];
    leaky_relu_backward(&x, 0.1, &r, &mut dx);
    assert_gradient("leaky_relu", &x, &dx, None, EPS, TOL, |x| {
        let mut y = vec![0.0; x.len()];
        leaky_relu_forward(x, 0.1, &mut y);
        weighted_sum(&y, &r)
    });
    let mut y = vec![0.0; 2];
    leaky_relu_forward(&[-2.0, 3.0], 0.1, &mut y);
    assert_eq!(y, vec![-0.2, 3.0]);
}

#[test]
fn softmax_with_mask_and_gradient() {
    let (rows, n) = (4, 6);
    let mut rng = Rng::new(5);
    let x = random_vec(&mut rng, rows * n, 2.0);
    let mask = [0.0, 0.0, -100.0, 0.0, -100.0, 0.0];
    let r = random_vec(&mut rng, rows * n, 1.0);
    let fwd = |x: &[f32]| {
        let mut y = vec![0.0; rows * n];
        softmax_forward(x, Some(&mask), &mut y, n);
        y
    };
    let y = fwd(&x);
    for row in y.chunks(n) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[2] < 1e-30 && row[4] < 1e-30);
    }
    let mut dx = vec![0.0; rows * n];
    softmax_backward(&y, &r, &mut dx, n);
    assert_gradient("softmax", &x, &dx, None, EPS, TOL, |x| weighted_sum(&fwd(x), &r));
}

#[test]
fn embedding_lookup_and_gradient() {
    let (rows, dim) = (5, 3);
    let mut rng = Rng::new(6);
    let table = random_vec(&mut rng, rows * dim, 1.0);
    let ids = [3i64, 0, 3, 4];
    let r = random_vec(&mut rng, ids.len() * dim, 1.0);
    let fwd = |t: &[f32]| {
        let mut out = vec![0.0; ids.len() * dim];
        embedding_forward(&ids, t, dim, &mut out, false);
        out
    };
    assert_eq!(&fwd(&table)[3..6], &table[0..3]);
    let mut dt = vec![0.0; rows * dim];
    embedding_backward(&ids, &r, dim, &mut dt);
    assert_gradient("embedding", &table, &dt, None, EPS, TOL, |t| weighted_sum(&fwd(t), &r));
}

/// Dense reference: scores over all keys, disallowed keys (per pattern) removed.
#[allow(clippy::too_many_arguments)]
fn naive_attention(b: usize, h: usize, seq: usize, hd: usize, pattern: KeyPattern, scale: f32, qkv: &[f32], mask: &[f32]) -> Vec<f32> {
    let d = h * hd;
    let ld = 3 * d;
    let mut out = vec![0.0; b * seq * d];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..seq {
                let allowed = |j: usize| match pattern {
                    KeyPattern::Full => true,
                    KeyPattern::Frames { regions } => i == 0 || j == 0 || (i - 1) / regions == (j - 1) / regions,
                };
                let mut s: Vec<f64> = (0..seq)
                    .map(|j| {
                        if !allowed(j) {
                            return f64::NEG_INFINITY;
                        }
                        let qk: f64 = (0..hd)
                            .map(|e| (qkv[(bb * seq + i) * ld + hh * hd + e] * qkv[(bb * seq + j) * ld + d + hh * hd + e]) as f64)
                            .sum();
                        scale as f64 * qk + mask[bb * seq + j] as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                s.iter_mut().for_each(|v| *v = (*v - m).exp());
                let z: f64 = s.iter().sum();
                for e in 0..hd {
                    let o: f64 = (0..seq).map(|j| s[j] / z * qkv[(bb * seq + j) * ld + 2 * d + hh * hd + e] as f64).sum();
                    out[(bb * seq + i) * d + hh * hd + e] = o as f32;
                }
            }
        }
    }
    out
}

fn check_attention(pattern: KeyPattern, seq: usize, seed: u64) {
    check_attention_dropout(pattern, seq, seed, false);
    check_attention_dropout(pattern, seq, seed, true);
}

fn check_attention_dropout(pattern: KeyPattern, seq: usize, seed: u64, with_dropout: bool) {
    let (b, h, hd) = (2, 3, 4);
    let d = h * hd;
    let shape = AttnShape { batch: b, heads: h, seq, head_dim: hd, pattern };
    let scale = (hd as f32).powf(-0.5);
    let mut rng = Rng::new(seed);
    let qkv = random_vec(&mut rng, b * seq * 3 * d, 1.5);
    // A padded key in each batch item, CLS never padded.
    let mut mask = vec![0.0f32; b * seq];
    mask[seq - 1] = -100.0;
    mask[seq + 2] = -100.0;
    let r = random_vec(&mut rng, b * seq * d, 1.0);
    // Dropout multipliers: 0 or 1/(1 − 0.25).
    let drop: Vec<f32> = (0..shape.probs_len()).map(|_| if rng.uniform() < 0.25 { 0.0 } else { 1.0 / 0.75 }).collect();
    let drop = with_dropout.then_some(&drop[..]);
    let fwd = |qkv: &[f32], probs: &mut Vec<f32>| {
        let mut heads_out = vec![0.0; b * h * seq * hd];
        attention_forward(&shape, scale, qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &mask, drop, probs, &mut heads_out);
        let mut out = vec![0.0; b * seq * d];
        merge_heads(&heads_out, &mut out, d, 0, b, h, seq, hd);
        out
    };
    let mut probs = vec![0.0; shape.probs_len()];
    let out = fwd(&qkv, &mut probs);
    if !with_dropout {
        let want = naive_attention(b, h, seq, hd, pattern, scale, &qkv, &mask);
        for (a, w) in out.iter().zip(&want) {
            assert!((a - w).abs() < 1e-5, "{pattern:?}: {a} vs {w}");
        }
    } else {
        let mut plain = vec![0.0; shape.probs_len()];
        let mut heads_out = vec![0.0; b * h * seq * hd];
        attention_forward(&shape, scale, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &mask, None, &mut plain, &mut heads_out);
        assert_eq!(plain, probs, "dropout must not change the stored probabilities");
    }
    // Backward: dout in head-major layout from r, grads merged back into a [B, seq, 3D] buffer.
    let mut dout = vec![0.0; b * h * seq * hd];
    split_heads(&r, d, 0, &mut dout, b, h, seq, hd);
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..seq {
                for e in 0..hd {
                    assert_eq!(dout[((bb * h + hh) * seq + i) * hd + e], r[(bb * seq + i) * d + hh * hd + e]);
                }
            }
        }
    }
    let n = b * h * seq * hd;
    let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    attention_backward(&shape, scale, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &probs, drop, &dout, &mut dq, &mut dk, &mut dv);
    let mut dqkv = vec![0.0; b * seq * 3 * d];
    merge_heads(&dq, &mut dqkv, 3 * d, 0, b, h, seq, hd);
    merge_heads(&dk, &mut dqkv, 3 * d, d, b, h, seq, hd);
    merge_heads(&dv, &mut dqkv, 3 * d, 2 * d, b, h, seq, hd);
    let mut scratch = vec![0.0; shape.probs_len()];
    assert_gradient(&format!("attention {pattern:?} dropout {with_dropout}"), &qkv, &dqkv, None, EPS, TOL, |x| {
        weighted_sum(&fwd(x, &mut scratch), &r)
    });
}

#[test]
fn attention_full_matches_naive_and_gradients() {
    check_attention(KeyPattern::Full, 5, 7);
}

#[test]
fn attention_frames_matches_naive_and_gradients() {
    // 3 frames × 2 regions + CLS
    check_attention(KeyPattern::Frames { regions: 2 }, 7, 8);
    // one frame: every token sees every token
    check_attention(KeyPattern::Frames { regions: 4 }, 5, 9);
}

/// The GEMM paths (`Full`, single- and multi-frame `Frames`) agree with the row-loop
/// reference, masks and dropout included.
#[test]
fn attention_gemm_matches_loops() {
    for (pattern, seq) in [
        (KeyPattern::Full, 9),
        (KeyPattern::Frames { regions: 8 }, 9),
        (KeyPattern::Frames { regions: 3 }, 13),
        (KeyPattern::Frames { regions: 1 }, 4),
    ] {
        gemm_vs_loops(pattern, seq);
    }
}

type Fwd = fn(&AttnShape, f32, &[f32], &[f32], &[f32], usize, &[f32], Option<&[f32]>, &mut [f32], &mut [f32]);
type Bwd = fn(&AttnShape, f32, &[f32], &[f32], &[f32], usize, &[f32], Option<&[f32]>, &[f32], &mut [f32], &mut [f32], &mut [f32]);

fn gemm_vs_loops(pattern: KeyPattern, seq: usize) {
    let (b, h, hd) = (2, 3, 8);
    let d = h * hd;
    let shape = AttnShape { batch: b, heads: h, seq, head_dim: hd, pattern };
    let mut rng = Rng::new(12);
    let qkv = random_vec(&mut rng, b * seq * 3 * d, 1.5);
    let mut mask = vec![0.0f32; b * seq];
    mask[seq - 1] = -100.0;
    mask[2 * seq - 2] = -100.0;
    let drop: Vec<f32> = (0..shape.probs_len()).map(|_| if rng.uniform() < 0.2 { 0.0 } else { 1.25 }).collect();
    let dout = random_vec(&mut rng, b * h * seq * hd, 1.0);
    for dr in [None, Some(&drop[..])] {
        let run = |fwd: Fwd, bwd: Bwd| {
            let mut probs = vec![0.0; shape.probs_len()];
            let mut out = vec![0.0; b * h * seq * hd];
            fwd(&shape, 0.3, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &mask, dr, &mut probs, &mut out);
            let n = b * h * seq * hd;
            let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            bwd(&shape, 0.3, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &probs, dr, &dout, &mut dq, &mut dk, &mut dv);
            (probs, out, dq, dk, dv)
        };
        let a = run(attention_forward, attention_backward);
        let r = run(attention_forward_loops, attention_backward_loops);
        for (name, x, y) in [("probs", &a.0, &r.0), ("out", &a.1, &r.1), ("dq", &a.2, &r.2), ("dk", &a.3, &r.3), ("dv", &a.4, &r.4)] {
            for (u, w) in x.iter().zip(y.iter()) {
                assert!((u - w).abs() < 1e-5, "{pattern:?} {name} dropout {}: {u} vs {w}", dr.is_some());
            }
        }
    }
}

/// The token-row backward (d(output) read in place, dq/dk/dv written into the [B·seq, 3D]
/// buffer) equals the head-major one plus the merges, bit for bit, and overwrites stale
/// contents; masks and dropout included, dense and multi-frame patterns.
#[test]
fn attention_backward_rows_equals_head_major() {
    for (pattern, seq) in [(KeyPattern::Full, 9), (KeyPattern::Frames { regions: 3 }, 13), (KeyPattern::Frames { regions: 8 }, 9)] {
        let (b, h, hd) = (2, 3, 8);
        let d = h * hd;
        let shape = AttnShape { batch: b, heads: h, seq, head_dim: hd, pattern };
        let mut rng = Rng::new(21);
        let qkv = random_vec(&mut rng, b * seq * 3 * d, 1.5);
        let mut mask = vec![0.0f32; b * seq];
        mask[seq - 1] = -100.0;
        let drop: Vec<f32> = (0..shape.probs_len()).map(|_| if rng.uniform() < 0.2 { 0.0 } else { 1.25 }).collect();
        let dout_rows = random_vec(&mut rng, b * seq * d, 1.0);
        let mut probs = vec![0.0; shape.probs_len()];
        let mut out = vec![0.0; b * h * seq * hd];
        attention_forward(&shape, 0.3, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &mask, Some(&drop), &mut probs, &mut out);
        let mut dout = vec![0.0; b * h * seq * hd];
        split_heads(&dout_rows, d, 0, &mut dout, b, h, seq, hd);
        let n = b * h * seq * hd;
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        attention_backward(&shape, 0.3, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &probs, Some(&drop), &dout, &mut dq, &mut dk, &mut dv);
        let mut want = vec![0.0; b * seq * 3 * d];
        merge_heads(&dq, &mut want, 3 * d, 0, b, h, seq, hd);
        merge_heads(&dk, &mut want, 3 * d, d, b, h, seq, hd);
        merge_heads(&dv, &mut want, 3 * d, 2 * d, b, h, seq, hd);
        let mut got = vec![f32::NAN; b * seq * 3 * d];
        attention_backward_rows(&shape, 0.3, &qkv, &qkv[d..], &qkv[2 * d..], 3 * d, &probs, Some(&drop), &dout_rows, d, &mut got, 3 * d);
        assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{pattern:?}: token-row backward differs");
    }
}

/// The split token-row backward (separate q, k, v buffers of rows D wide, as the text tower
/// has them; dq, dk, dv written into three such buffers) equals the head-major backward plus
/// the merges bit for bit, and overwrites stale contents; masks and dropout included.
#[test]
fn attention_backward_rows_split_equals_head_major() {
    // Small shapes, and the published text attention's (L = 100, head_dim 64: GEMMs of
    // several micro-tiles and a partial one, as in training).
    let cases = [
        (KeyPattern::Full, 9, 2, 3, 8),
        (KeyPattern::Full, 17, 2, 3, 8),
        (KeyPattern::Frames { regions: 3 }, 13, 2, 3, 8),
        (KeyPattern::Full, 100, 2, 2, 64),
    ];
    for (pattern, seq, b, h, hd) in cases {
        let d = h * hd;
        let shape = AttnShape { batch: b, heads: h, seq, head_dim: hd, pattern };
        let mut rng = Rng::new(22);
        let (q, k, v) =
            (random_vec(&mut rng, b * seq * d, 1.5), random_vec(&mut rng, b * seq * d, 1.5), random_vec(&mut rng, b * seq * d, 1.5));
        let mut mask = vec![0.0f32; b * seq];
        mask[seq - 1] = -1e30;
        mask[2 * seq - 2] = -1e30;
        let drop: Vec<f32> = (0..shape.probs_len()).map(|_| if rng.uniform() < 0.2 { 0.0 } else { 1.25 }).collect();
        let dout_rows = random_vec(&mut rng, b * seq * d, 1.0);
        for dr in [None, Some(&drop[..])] {
            let mut probs = vec![0.0; shape.probs_len()];
            let mut out = vec![0.0; b * h * seq * hd];
            attention_forward(&shape, 0.3, &q, &k, &v, d, &mask, dr, &mut probs, &mut out);
            let mut dout = vec![0.0; b * h * seq * hd];
            split_heads(&dout_rows, d, 0, &mut dout, b, h, seq, hd);
            let n = b * h * seq * hd;
            let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            attention_backward(&shape, 0.3, &q, &k, &v, d, &probs, dr, &dout, &mut dq, &mut dk, &mut dv);
            let mut want = [vec![0.0; b * seq * d], vec![0.0; b * seq * d], vec![0.0; b * seq * d]];
            for (w, hm) in want.iter_mut().zip([&dq, &dk, &dv]) {
                merge_heads(hm, w, d, 0, b, h, seq, hd);
            }
            let mut got = [vec![f32::NAN; b * seq * d], vec![f32::NAN; b * seq * d], vec![f32::NAN; b * seq * d]];
            let [gq, gk, gv] = &mut got;
            attention_backward_rows_split(&shape, 0.3, &q, &k, &v, d, &probs, dr, &dout_rows, d, gq, gk, gv, d);
            for (name, g, w) in [("dq", &got[0], &want[0]), ("dk", &got[1], &want[1]), ("dv", &got[2], &want[2])] {
                assert!(g.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits()), "{pattern:?} {name}: split token-row backward differs");
            }
        }
    }
}
