//! The block algorithms of `kernels/norm.cu` (LayerNorm forward, backward dx, the two-pass
//! dw/db reduction) and `kernels/attention.cu` (the forward) run on the host thread by
//! thread, with the device's order of additions (strided per-thread partial sums, shared-
//! memory trees), so that their arithmetic at the published shapes (7712 × 768 rows; 12
//! heads of 64 over 241 tokens) is checked against the CPU kernels on any machine. What it
//! cannot check is the CUDA C transliteration itself (`demovlp selftest --device cuda`).

/// `block_sum` of norm.cu: 256 per-thread values, halved in a tree (`sh[t] += sh[t + s]`).
fn tree_sum_f64(mut sh: Vec<f64>) -> f64 {
    let mut s = sh.len() / 2;
    while s > 0 {
        for t in 0..s {
            sh[t] += sh[t + s];
        }
        s /= 2;
    }
    sh[0]
}

const LN_THREADS: usize = 256;

/// `layernorm_forward` for `rows` rows of `d`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], d: usize) {
    for row in 0..x.len() / d {
        let xr = &x[row * d..(row + 1) * d];
        let per_thread = |f: &dyn Fn(f64) -> f64| -> Vec<f64> {
            (0..LN_THREADS).map(|t| (t..d).step_by(LN_THREADS).fold(0.0, |s, i| s + f(xr[i] as f64))).collect()
        };
        let mu = tree_sum_f64(per_thread(&|v| v)) / d as f64;
        let var = tree_sum_f64(per_thread(&|v| (v - mu) * (v - mu))) / d as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for i in 0..d {
            y[row * d + i] = (((xr[i] as f64 - mu) * rs) as f32) * w[i] + b[i];
        }
        (mean[row], rstd[row]) = (mu as f32, rs as f32);
    }
}

/// `layernorm_backward_dx` (dx accumulates), then the two-pass dw/db reduction
/// (`layernorm_dwdb_partial` + `col_sums_finish`, [`crate::geometry::column_sums`]).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    d: usize,
) {
    let rows = x.len() / d;
    for row in 0..rows {
        let (xr, dyr) = (&x[row * d..(row + 1) * d], &dy[row * d..(row + 1) * d]);
        let (mu, rs) = (mean[row], rstd[row]);
        let (mut a, mut c) = (vec![0f64; LN_THREADS], vec![0f64; LN_THREADS]);
        for t in 0..LN_THREADS {
            for i in (t..d).step_by(LN_THREADS) {
                let xh = (xr[i] - mu) * rs;
                let g = dyr[i] * w[i];
                a[t] += g as f64;
                c[t] += g as f64 * xh as f64;
            }
        }
        let mg = (tree_sum_f64(a) / d as f64) as f32;
        let mgx = (tree_sum_f64(c) / d as f64) as f32;
        for i in 0..d {
            let xh = (xr[i] - mu) * rs;
            dx[row * d + i] += rs * (dyr[i] * w[i] - mg - xh * mgx);
        }
    }
    crate::geometry::column_sums(rows, d, |r, c| dy[r * d + c] * ((x[r * d + c] - mean[r]) * rstd[r]), dw);
    crate::geometry::column_sums(rows, d, |r, c| dy[r * d + c], db);
}

/// `block_reduce` of attention.cu over 128 threads (max or sum, f32).
fn tree_f32(mut sh: Vec<f32>, is_max: bool) -> f32 {
    let mut s = sh.len() / 2;
    while s > 0 {
        for t in 0..s {
            sh[t] = if is_max { sh[t].max(sh[t + s]) } else { sh[t] + sh[t + s] };
        }
        s /= 2;
    }
    sh[0]
}

/// `attention_forward` with the `Full` key pattern (every query row sees every key), no
/// dropout: one block of [`crate::geometry::ATTENTION_THREADS`] per (row, head, clip).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_full(
    batch: usize,
    heads: usize,
    seq: usize,
    hd: usize,
    scale: f32,
    qkv: &[f32],
    ld: usize,
    mask: &[f32],
    probs: &mut [f32],
    out: &mut [f32],
) {
    let threads = crate::geometry::ATTENTION_THREADS as usize;
    let d = heads * hd;
    for b in 0..batch {
        for h in 0..heads {
            let bh = b * heads + h;
            for i in 0..seq {
                let qi = &qkv[(b * seq + i) * ld + h * hd..][..hd];
                let mut p = vec![0f32; seq];
                let mut m = vec![f32::NEG_INFINITY; threads];
                for t in 0..threads {
                    for n in (t..seq).step_by(threads) {
                        let kj = &qkv[(b * seq + n) * ld + d + h * hd..][..hd];
                        let mut s = 0f32;
                        for c in 0..hd {
                            s += qi[c] * kj[c];
                        }
                        p[n] = scale * s + mask[b * seq + n];
                        m[t] = m[t].max(p[n]);
                    }
                }
                let mx = tree_f32(m, true);
                let mut sum = vec![0f32; threads];
                for t in 0..threads {
                    for n in (t..seq).step_by(threads) {
                        p[n] = (p[n] - mx).exp();
                        sum[t] += p[n];
                    }
                }
                let total = tree_f32(sum, false);
                for n in 0..seq {
                    p[n] /= total;
                    probs[bh * seq * seq + i * seq + n] = p[n];
                }
                for c in 0..hd {
                    let mut acc = 0f32;
                    for n in 0..seq {
                        acc += p[n] * qkv[(b * seq + n) * ld + 2 * d + h * hd + c];
                    }
                    out[(bh * seq + i) * hd + c] = acc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use demovlp_kernels::Rng;

    fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * scale, "{what}[{i}]: {g} vs {w} (scale {scale}, tolerance {tol})");
        }
    }

    #[test]
    fn layernorm_block_algorithm_at_7712_by_768() {
        // 32 clips × 241 tokens of width 768: the device's sums against the CPU kernels'.
        let (rows, d) = (7712, 768);
        let mut rng = Rng::new(11);
        let mut r = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| s * rng.normal()).collect() };
        let (x, w, b, dy) = (r(rows * d, 2.0), r(d, 1.0), r(d, 1.0), r(rows * d, 1.0));
        let (dx0, dw0, db0) = (r(rows * d, 1.0), r(d, 1.0), r(d, 1.0));
        let (mut y, mut mean, mut rstd) = (vec![0f32; rows * d], vec![0f32; rows], vec![0f32; rows]);
        let (mut y2, mut mean2, mut rstd2) = (y.clone(), mean.clone(), rstd.clone());
        super::layernorm_forward(&x, &w, &b, 1e-6, &mut y, &mut mean, &mut rstd, d);
        demovlp_kernels::layernorm::layernorm_forward(&x, &w, &b, 1e-6, &mut y2, &mut mean2, &mut rstd2, d);
        close("y", &y, &y2, 1e-6);
        close("mean", &mean, &mean2, 1e-6);
        close("rstd", &rstd, &rstd2, 1e-6);
        let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
        let (mut dx2, mut dw2, mut db2) = (dx0, dw0, db0);
        super::layernorm_backward(&x, &w, &mean, &rstd, &dy, &mut dx, &mut dw, &mut db, d);
        demovlp_kernels::layernorm::layernorm_backward(&x, &w, &mean, &rstd, &dy, &mut dx2, &mut dw2, &mut db2, d);
        close("dx", &dx, &dx2, 1e-6);
        close("dw", &dw, &dw2, 1e-4);
        close("db", &db, &db2, 1e-4);
    }

    #[test]
    fn attention_block_algorithm_at_head_dim_64() {
        // 12 heads of 64 over the text tower's 100 tokens (2 clips: the block algorithm does
        // not depend on the batch), padded keys.
        use demovlp_kernels::attention::{AttnShape, KeyPattern};
        let (batch, heads, seq, hd) = (2, 12, 100, 64);
        let d = heads * hd;
        let mut rng = Rng::new(12);
        let qkv: Vec<f32> = (0..batch * seq * 3 * d).map(|_| rng.normal()).collect();
        let mask: Vec<f32> = (0..batch * seq).map(|i| if i % seq < 20 + 50 * (i / seq) { 0.0 } else { -100.0 }).collect();
        let s = AttnShape { batch, heads, seq, head_dim: hd, pattern: KeyPattern::Full };
        let scale = 0.125;
        let (mut p, mut o) = (vec![0f32; s.probs_len()], vec![0f32; batch * seq * d]);
        let (mut p2, mut o2) = (p.clone(), o.clone());
        super::attention_forward_full(batch, heads, seq, hd, scale, &qkv, 3 * d, &mask, &mut p, &mut o);
        let (q, k, v) = (&qkv[..], &qkv[d..], &qkv[2 * d..]);
        demovlp_kernels::attention::attention_forward(&s, scale, q, k, v, 3 * d, &mask, None, &mut p2, &mut o2);
        close("probs", &p, &p2, 1e-5);
        close("out", &o, &o2, 1e-5);
    }
}
