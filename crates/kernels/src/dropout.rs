//! Inverted dropout: a multiplier mask of 0 (probability p) or 1/(1−p), drawn from [`Rng`]
//! so a run is reproducible from its seed; applying it forward and backward is a product.

use crate::rng::Rng;
use rayon::prelude::*;

/// Fills `mask` with 0 (probability `p`) or 1/(1−p). p = 0 gives all ones.
pub fn dropout_mask(rng: &mut Rng, p: f32, mask: &mut [f32]) {
    assert!((0.0..1.0).contains(&p), "dropout probability {p} outside [0, 1)");
    let keep = 1.0 / (1.0 - p);
    for m in mask.iter_mut() {
        *m = if rng.uniform() < p { 0.0 } else { keep };
    }
}

/// x ⊙= mask (a dropout mask, or any elementwise factor such as GELU's derivative), in
/// parallel chunks when long.
pub fn mul_in_place(x: &mut [f32], mask: &[f32]) {
    const CHUNK: usize = 1 << 14;
    assert_eq!(x.len(), mask.len(), "elementwise product: lengths {} and {}", x.len(), mask.len());
    if x.len() >= 4 * CHUNK {
        x.par_chunks_mut(CHUNK).zip(mask.par_chunks(CHUNK)).for_each(|(x, m)| mul_run(x, m));
    } else {
        mul_run(x, mask);
    }
}

crate::multiversion! {
    fn mul_run(x: &mut [f32], mask: &[f32]) {
        x.iter_mut().zip(mask).for_each(|(x, m)| *x *= m);
    }
}

/// `x ⊙ mask` written to `buf` when a mask is given, else `x` itself (no copy): a tensor
/// taken through a dropout site that may be inactive.
pub fn masked<'a>(x: &'a [f32], mask: Option<&[f32]>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    let Some(mask) = mask else { return x };
    assert_eq!(x.len(), mask.len(), "dropout: mask length");
    buf.clear();
    buf.extend(x.iter().zip(mask).map(|(x, m)| x * m));
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_about_p_and_keeps_the_mean() {
        let mut rng = Rng::new(3);
        let mut m = vec![0.0; 100_000];
        dropout_mask(&mut rng, 0.1, &mut m);
        let zeros = m.iter().filter(|&&x| x == 0.0).count() as f64 / m.len() as f64;
        let mean = m.iter().map(|&x| x as f64).sum::<f64>() / m.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "{zeros}");
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
        dropout_mask(&mut rng, 0.0, &mut m);
        assert!(m.iter().all(|&x| x == 1.0));
    }
}
