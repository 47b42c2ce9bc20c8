//! Every multiversioned kernel gives bit-identical results at every instruction-set level
//! this CPU has (the dispatch promise of `simd`): baseline against the detected level.
//! Its own test binary, so switching the process-wide level disturbs no other test.

use demovlp_kernels::activation::{gelu_backward, gelu_backward_in_place, gelu_forward};
use demovlp_kernels::dropout::mul_in_place;
use demovlp_kernels::layernorm::{layernorm_backward, layernorm_forward};
use demovlp_kernels::linear::{linear_backward, Grads};
use demovlp_kernels::simd::{self, Level};
use demovlp_kernels::softmax::{softmax_backward_in_place, softmax_in_place};
use demovlp_kernels::Rng;

fn randn(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * s).collect()
}

/// Every kernel output, flattened, computed at the current level.
fn run_all() -> Vec<Vec<f32>> {
    let mut rng = Rng::new(11);
    let (rows, d, h) = (37, 96, 4 * 96 + 5);
    let x = randn(&mut rng, rows * h, 2.5);
    let dy = randn(&mut rng, rows * h, 1.0);
    let mut out = Vec::new();
    // GELU
    let mut y = vec![0.0; x.len()];
    gelu_forward(&x, &mut y);
    let mut dx = randn(&mut Rng::new(3), x.len(), 0.1);
    gelu_backward(&x, &dy, &mut dx);
    let mut dg = dy.clone();
    gelu_backward_in_place(&x, &mut dg);
    out.extend([y, dx, dg]);
    // LayerNorm
    let xl = randn(&mut rng, rows * d, 3.0);
    let (w, b) = (randn(&mut rng, d, 1.0), randn(&mut rng, d, 1.0));
    let (mut yl, mut mean, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
    layernorm_forward(&xl, &w, &b, 1e-6, &mut yl, &mut mean, &mut rstd, d);
    let dyl = randn(&mut rng, rows * d, 1.0);
    let (mut dxl, mut dw, mut db) = (vec![0.0; rows * d], vec![0.5; d], vec![-0.25; d]);
    layernorm_backward(&xl, &w, &mean, &rstd, &dyl, &mut dxl, &mut dw, &mut db, d);
    out.extend([yl, mean, rstd, dxl, dw, db]);
    // Softmax rows (with a masked-out key) and their backward
    let mut s = randn(&mut rng, 31, 4.0);
    s[5] = -1e30;
    softmax_in_place(&mut s);
    let mut ds = randn(&mut rng, 31, 1.0);
    softmax_backward_in_place(&s, &mut ds, 0.125);
    out.extend([s, ds]);
    // Linear bias gradient (odd widths: partial column blocks)
    let (n, din, dout) = (23, 17, 131);
    let (xx, ww, dyy) = (randn(&mut rng, n * din, 1.0), randn(&mut rng, dout * din, 1.0), randn(&mut rng, n * dout, 1.0));
    let (mut dww, mut dbb) = (vec![0.0; dout * din], vec![0.0; dout]);
    linear_backward(&xx, din, &ww, &dyy, n, din, dout, None, &mut dww, Some(&mut dbb), Grads::Accumulate);
    out.push(dbb);
    // Dropout product
    let mut m = x.clone();
    mul_in_place(&mut m, &dy);
    out.push(m);
    out
}

#[test]
fn every_level_gives_the_same_bits() {
    let detected = simd::level();
    simd::set_level(Level::Baseline);
    assert_eq!(simd::level(), Level::Baseline);
    let base = run_all();
    simd::set_level(detected);
    let wide = run_all();
    for (i, (a, b)) in base.iter().zip(&wide).enumerate() {
        assert_eq!(a.len(), b.len());
        let diff = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(diff.is_none(), "output {i} differs between baseline and {detected:?} at {diff:?}");
    }
    eprintln!("checked {} outputs, baseline vs {detected:?}", base.len());
}
