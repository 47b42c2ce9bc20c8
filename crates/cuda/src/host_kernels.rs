//! The block algorithms of `kernels/norm.cu` (LayerNorm forward, backward dx, the two-pass
//! dw/db reduction) and `kernels/attention.cu` (forward, and the backward's two phases, both
//! key patterns) run on the host thread by thread, with the device's order of additions
//! (strided per-thread partial sums, shared-memory trees), so that their arithmetic at the
//! published shapes (7712 × 768 rows; 12 heads of 64 over 1 + 8 × 30 and 100 tokens) is
//! checked against the CPU kernels on any machine. What it
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

/// `row_keys` of attention.cu: (offset in the head's probabilities, lead key, start, count).
fn row_keys(i: usize, seq: usize, regions: usize) -> (usize, bool, usize, usize) {
    if regions == 0 {
        (i * seq, false, 0, seq)
    } else if i == 0 {
        (0, false, 0, seq)
    } else {
        (seq + (i - 1) * (regions + 1), true, 1 + (i - 1) / regions * regions, regions)
    }
}

fn key_at(lead: bool, start: usize, n: usize) -> usize {
    if lead {
        if n == 0 {
            0
        } else {
            start + n - 1
        }
    } else {
        start + n
    }
}

/// `pos_of` of attention.cu: key `j`'s position among row `i`'s keys.
fn pos_of(i: usize, j: usize, regions: usize) -> Option<usize> {
    if regions == 0 || i == 0 {
        return Some(j);
    }
    if j == 0 {
        return Some(0);
    }
    let start = 1 + (i - 1) / regions * regions;
    (j >= start && j < start + regions).then(|| 1 + j - start)
}

/// Shape of the attention ports: `regions` 0 is the `Full` pattern, else `Frames`.
#[derive(Clone, Copy, Debug)]
pub struct Attn {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub hd: usize,
    pub regions: usize,
}

impl Attn {
    fn probs_per_head(&self) -> usize {
        if self.regions == 0 {
            self.seq * self.seq
        } else {
            self.seq + (self.seq - 1) * (self.regions + 1)
        }
    }
}

/// `attention_forward`: one block of [`crate::geometry::ATTENTION_THREADS`] per (row, head,
/// clip); `q`, `k`, `v` rows `ld` apart (head h at column h·hd), output head-major.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    a: Attn,
    scale: f32,
    [q, k, v]: [&[f32]; 3],
    ld: usize,
    mask: &[f32],
    drop: Option<&[f32]>,
    probs: &mut [f32],
    out: &mut [f32],
) {
    let threads = crate::geometry::ATTENTION_THREADS as usize;
    let (seq, hd) = (a.seq, a.hd);
    for b in 0..a.batch {
        for h in 0..a.heads {
            let bh = b * a.heads + h;
            for i in 0..seq {
                let (offset, lead, start, count) = row_keys(i, seq, a.regions);
                let nk = count + lead as usize;
                let base = bh * a.probs_per_head() + offset;
                let qi = &q[(b * seq + i) * ld + h * hd..][..hd];
                let mut p = vec![0f32; nk];
                let mut m = vec![f32::NEG_INFINITY; threads];
                for t in 0..threads {
                    for n in (t..nk).step_by(threads) {
                        let j = key_at(lead, start, n);
                        let kj = &k[(b * seq + j) * ld + h * hd..][..hd];
                        let mut s = 0f32;
                        for c in 0..hd {
                            s += qi[c] * kj[c];
                        }
                        p[n] = scale * s + mask[b * seq + j];
                        m[t] = m[t].max(p[n]);
                    }
                }
                let mx = tree_f32(m, true);
                let mut sum = vec![0f32; threads];
                for t in 0..threads {
                    for n in (t..nk).step_by(threads) {
                        p[n] = (p[n] - mx).exp();
                        sum[t] += p[n];
                    }
                }
                let total = tree_f32(sum, false);
                p.iter_mut().for_each(|x| *x /= total);
                probs[base..base + nk].copy_from_slice(&p);
                for c in 0..hd {
                    let mut acc = 0f32;
                    for n in 0..nk {
                        let w = p[n] * drop.map_or(1.0, |d| d[base + n]);
                        acc += w * v[(b * seq + key_at(lead, start, n)) * ld + h * hd + c];
                    }
                    out[(bh * seq + i) * hd + c] = acc;
                }
            }
        }
    }
}

/// `attention_backward_rows_ds` then `attention_backward_rows_dkv`: dq, dk, dv (rows `ld_d`
/// apart, overwritten) from d(out) rows `ld_dout` apart.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    a: Attn,
    scale: f32,
    [q, k, v]: [&[f32]; 3],
    ld: usize,
    probs: &[f32],
    drop: Option<&[f32]>,
    dout: &[f32],
    ld_dout: usize,
    [dq, dk, dv]: [&mut [f32]; 3],
    ld_d: usize,
) {
    let threads = crate::geometry::ATTENTION_THREADS as usize;
    let (seq, hd, pph) = (a.seq, a.hd, a.probs_per_head());
    let mut ds = vec![0f32; a.batch * a.heads * pph];
    for b in 0..a.batch {
        for h in 0..a.heads {
            let bh = b * a.heads + h;
            for i in 0..seq {
                let (offset, lead, start, count) = row_keys(i, seq, a.regions);
                let nk = count + lead as usize;
                let base = bh * pph + offset;
                let doi = &dout[(b * seq + i) * ld_dout + h * hd..][..hd];
                let mut pdp = vec![0f32; threads];
                for t in 0..threads {
                    for n in (t..nk).step_by(threads) {
                        let vj = &v[(b * seq + key_at(lead, start, n)) * ld + h * hd..][..hd];
                        let mut s = 0f32;
                        for c in 0..hd {
                            s += doi[c] * vj[c];
                        }
                        let dp = drop.map_or(1.0, |d| d[base + n]) * s;
                        ds[base + n] = dp;
                        pdp[t] += probs[base + n] * dp;
                    }
                }
                let pdp = tree_f32(pdp, false);
                for n in 0..nk {
                    ds[base + n] = scale * probs[base + n] * (ds[base + n] - pdp);
                }
                for c in 0..hd {
                    let mut acc = 0f32;
                    for n in 0..nk {
                        acc += ds[base + n] * k[(b * seq + key_at(lead, start, n)) * ld + h * hd + c];
                    }
                    dq[(b * seq + i) * ld_d + h * hd + c] = acc;
                }
            }
            for j in 0..seq {
                for c in 0..hd {
                    let (mut ak, mut av) = (0f32, 0f32);
                    for i in 0..seq {
                        let Some(n) = pos_of(i, j, a.regions) else { continue };
                        let at = bh * pph + row_keys(i, seq, a.regions).0 + n;
                        ak += ds[at] * q[(b * seq + i) * ld + h * hd + c];
                        av += probs[at] * drop.map_or(1.0, |d| d[at]) * dout[(b * seq + i) * ld_dout + h * hd + c];
                    }
                    dk[(b * seq + j) * ld_d + h * hd + c] = ak;
                    dv[(b * seq + j) * ld_d + h * hd + c] = av;
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

    /// Both key patterns at the published head size: 12 heads of 64 over the video tower's
    /// 1 + 8 × 30 tokens (frames, with attention dropout) and the text tower's 100 (full, padded
    /// keys); 2 clips each (the block algorithm does not depend on the batch). Forward and
    /// backward against the CPU kernels.
    #[test]
    fn attention_block_algorithms_at_the_published_shapes() {
        use demovlp_kernels::attention::{self as cpu, AttnShape, KeyPattern};
        for (seq, regions) in [(1 + 8 * 30, 30), (100, 0)] {
            let (batch, heads, hd) = (2, 12, 64);
            let d = heads * hd;
            let a = super::Attn { batch, heads, seq, hd, regions };
            let pattern = if regions == 0 { KeyPattern::Full } else { KeyPattern::Frames { regions } };
            let s = AttnShape { batch, heads, seq, head_dim: hd, pattern };
            let mut rng = Rng::new(12 + regions as u64);
            let qkv: Vec<f32> = (0..batch * seq * 3 * d).map(|_| rng.normal()).collect();
            let dout: Vec<f32> = (0..batch * seq * d).map(|_| rng.normal()).collect();
            let mask: Vec<f32> = (0..batch * seq).map(|i| if i % seq < 20 + 50 * (i / seq) { 0.0 } else { -100.0 }).collect();
            let mut drop = vec![0f32; s.probs_len()];
            if regions > 0 {
                demovlp_kernels::dropout::dropout_mask(&mut Rng::new(3), 0.1, &mut drop);
            }
            let drop = (regions > 0).then_some(&drop[..]);
            let (q, k, v) = (&qkv[..], &qkv[d..], &qkv[2 * d..]);
            let scale = 0.125;
            let (mut p, mut o) = (vec![0f32; s.probs_len()], vec![0f32; batch * seq * d]);
            let (mut p2, mut o2) = (p.clone(), o.clone());
            super::attention_forward(a, scale, [q, k, v], 3 * d, &mask, drop, &mut p, &mut o);
            cpu::attention_forward(&s, scale, q, k, v, 3 * d, &mask, drop, &mut p2, &mut o2);
            close("probs", &p, &p2, 1e-5);
            close("out", &o, &o2, 1e-5);
            let n = batch * seq * d;
            let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            let (mut dq2, mut dk2, mut dv2) = (vec![1f32; n], vec![1f32; n], vec![1f32; n]);
            super::attention_backward(a, scale, [q, k, v], 3 * d, &p2, drop, &dout, d, [&mut dq, &mut dk, &mut dv], d);
            cpu::attention_backward_rows_split(&s, scale, q, k, v, 3 * d, &p2, drop, &dout, d, &mut dq2, &mut dk2, &mut dv2, d);
            close("dq", &dq, &dq2, 1e-5);
            close("dk", &dk, &dk2, 1e-5);
            close("dv", &dv, &dv2, 1e-5);
        }
    }
}
