//! Small branch-free float helpers that the compiler can vectorise.
//!
//! The softmaxes of the region-word alignment take two exponentials per (word, region)
//! entry of every pair — at evaluation time ~5·10¹⁰ of them for 1000 × 1000 — so `exp`
//! must vectorise. `std`'s `f32::exp` is a libm call per element.

/// exp(x) in f32, relative error ≲ 2 ulp over the whole range (Cephes `expf` polynomial,
/// the same scheme PyTorch's vectorised CPU `exp` uses). Returns 0 below the f32 range
/// (e.g. the −2000 logits of padded positions), like `f32::exp`.
///
/// Why a second `exp` beside `demovlp_kernels::fastmath::exp` (the towers' softmax and
/// GELU): the two are different polynomials (Cephes degree-5 minimax with a −87 / 88 clamp
/// here, a degree-6 Taylor with −87.3 / 88.7 there), so they round differently in the last
/// bit. The alignment softmax has always used this one, and its AVX2 form
/// (`rows::exp_shifted_avx2`) repeats exactly these operations; switching either to the
/// other would move every loss, score and trained weight by an ulp, so the retrieval
/// numbers would no longer be bit-identical to the recorded runs.
#[inline(always)]
pub fn cephes_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// The vectorisable dot product with a fixed summation order, shared with the kernels.
pub use demovlp_kernels::fastmath::dot;

/// Euclidean norm, accumulated like [`dot`].
#[inline(always)]
pub fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (cephes_exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(cephes_exp(-2000.0), 0.0);
        assert_eq!(cephes_exp(-100.0), 0.0);
        assert_eq!(cephes_exp(0.0), 1.0);
    }

    #[test]
    fn dot_and_norm() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..19).map(|i| (i % 5) as f32 - 2.0).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
        assert!((norm(&[3.0, 4.0]) - 5.0).abs() < 1e-6);
    }
}
