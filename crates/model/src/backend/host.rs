//! Host implementations of the small kernels of the task heads (the QA head): what [`Cpu`](super::Cpu)
//! runs, written once over slices so a device backend's test can use them as its reference.
//! Each function's arithmetic (operation order, f64 where it says so) is the contract the
//! published-parity tests were recorded against.

/// `out[b, k] = max_t x[b, t, k]` over the `len` positions, `arg[b, k]` the position that won
/// (as an `f32`; the first maximum wins, as `torch.max`).
pub fn max_over_positions(x: &[f32], arg: &mut [f32], out: &mut [f32], batch: usize, len: usize, dim: usize) {
    for bi in 0..batch {
        for k in 0..dim {
            let (mut best, mut at) = (x[bi * len * dim + k], 0);
            for t in 1..len {
                let v = x[(bi * len + t) * dim + k];
                if v > best {
                    best = v;
                    at = t;
                }
            }
            out[bi * dim + k] = best;
            arg[bi * dim + k] = at as f32;
        }
    }
}

/// Backward of [`max_over_positions`]: `dx [B, len, dim]` is overwritten: `dout[b, k]` at the
/// winning position, 0 elsewhere.
pub fn max_over_positions_backward(dout: &[f32], arg: &[f32], dx: &mut [f32], batch: usize, len: usize, dim: usize) {
    dx.fill(0.0);
    for bi in 0..batch {
        for k in 0..dim {
            dx[(bi * len + arg[bi * dim + k] as usize) * dim + k] = dout[bi * dim + k];
        }
    }
}

/// ‖v‖_F in f64.
fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// Weight normalisation with one scalar gain: `w = g · v / ‖v‖_F` (the scale in f64, then
/// rounded to f32 once).
pub fn weight_norm(g: &[f32], v: &[f32], w: &mut [f32]) {
    let scale = (g[0] as f64 / norm(v)) as f32;
    w.iter_mut().zip(v).for_each(|(w, &x)| *w = x * scale);
}

/// Backward of [`weight_norm`] from `dw`: `dg += ⟨dw, v⟩ / ‖v‖`,
/// `dv += (g / ‖v‖)·dw − (g·⟨dw, v⟩ / ‖v‖³)·v` (f64 inside).
pub fn weight_norm_backward(g: &[f32], v: &[f32], dw: &[f32], dg: &mut [f32], dv: &mut [f32]) {
    let g = g[0] as f64;
    let norm = norm(v);
    let dot: f64 = dw.iter().zip(v).map(|(&a, &b)| a as f64 * b as f64).sum();
    dg[0] += (dot / norm) as f32;
    let (a, c) = (g / norm, g * dot / (norm * norm * norm));
    for (gv, (&d, &vv)) in dv.iter_mut().zip(dw.iter().zip(v)) {
        *gv += (a * d as f64 - c * vv as f64) as f32;
    }
}

/// `out[b, n, :] = x[b, n, :] ⊙ y[b, :]`.
pub fn mul_broadcast(x: &[f32], y: &[f32], out: &mut [f32], batch: usize, n: usize, h: usize) {
    for bi in 0..batch {
        let yr = &y[bi * h..(bi + 1) * h];
        for r in 0..n {
            let i = (bi * n + r) * h;
            out[i..i + h].iter_mut().zip(x[i..i + h].iter().zip(yr)).for_each(|(o, (a, b))| *o = a * b);
        }
    }
}

/// Backward of [`mul_broadcast`]: `dx = dout ⊙ y` (overwritten), `dy[b, :] += Σ_n dout ⊙ x`
/// (n in order).
pub fn mul_broadcast_backward(x: &[f32], y: &[f32], dout: &[f32], dx: &mut [f32], dy: &mut [f32], batch: usize, n: usize, h: usize) {
    for bi in 0..batch {
        let yr = &y[bi * h..(bi + 1) * h];
        for r in 0..n {
            let i = (bi * n + r) * h;
            for k in 0..h {
                dx[i + k] = dout[i + k] * yr[k];
                dy[bi * h + k] += dout[i + k] * x[i + k];
            }
        }
    }
}

/// Softmax of each run of `n` values (max-subtracted, f32 like `nn.functional.softmax`).
pub fn softmax_rows(x: &[f32], y: &mut [f32], n: usize) {
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut s = 0f32;
        for (o, &v) in y.iter_mut().zip(x) {
            *o = (v - m).exp();
            s += *o;
        }
        y.iter_mut().for_each(|o| *o /= s);
    }
}

/// Backward of [`softmax_rows`] from its output `y`: `dx = y ⊙ (dy − ⟨y, dy⟩)` (overwritten).
pub fn softmax_rows_backward(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
    for ((y, dy), dx) in y.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n)) {
        let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
        for r in 0..n {
            dx[r] = y[r] * (dy[r] - dot);
        }
    }
}

/// Attention pooling: `out[b, :] = Σ_n w[b, n] · o[b, n, :]` (n in order, from 0; overwritten).
pub fn weighted_sum(w: &[f32], o: &[f32], out: &mut [f32], batch: usize, n: usize, dim: usize) {
    out[..batch * dim].fill(0.0);
    for bi in 0..batch {
        for r in 0..n {
            let wgt = w[bi * n + r];
            let row = &o[(bi * n + r) * dim..(bi * n + r + 1) * dim];
            out[bi * dim..(bi + 1) * dim].iter_mut().zip(row).for_each(|(acc, x)| *acc += wgt * x);
        }
    }
}

/// Backward of [`weighted_sum`]: `dw[b, n] = ⟨o[b, n], dout[b]⟩` and `do[b, n] = w[b, n] · dout[b]`
/// (both overwritten).
pub fn weighted_sum_backward(w: &[f32], o: &[f32], dout: &[f32], dw: &mut [f32], d_o: &mut [f32], batch: usize, n: usize, dim: usize) {
    for bi in 0..batch {
        let dp = &dout[bi * dim..(bi + 1) * dim];
        for r in 0..n {
            let i = (bi * n + r) * dim;
            dw[bi * n + r] = o[i..i + dim].iter().zip(dp).map(|(x, y)| x * y).sum();
            let wgt = w[bi * n + r];
            d_o[i..i + dim].iter_mut().zip(dp).for_each(|(g, d)| *g = wgt * d);
        }
    }
}

/// Mean cross-entropy of `logits [B, answers]` against `labels` (f64 inside), and
/// d(loss)/d(logits) written into `d` (overwritten).
pub fn cross_entropy(logits: &[f32], labels: &[usize], answers: usize, d: &mut [f32]) -> f32 {
    let b = labels.len();
    assert_eq!(logits.len(), b * answers, "logits must be [B, answers]");
    assert_eq!(d.len(), b * answers, "d(logits) must be [B, answers]");
    let mut loss = 0f64;
    for (bi, &y) in labels.iter().enumerate() {
        assert!(y < answers, "label {y} outside the {answers} answers");
        let row = &logits[bi * answers..(bi + 1) * answers];
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let s: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        loss += s.ln() + m as f64 - row[y] as f64;
        for k in 0..answers {
            let pk = ((row[k] - m) as f64).exp() / s;
            d[bi * answers + k] = ((pk - (k == y) as u8 as f64) / b as f64) as f32;
        }
    }
    (loss / b as f64) as f32
}
