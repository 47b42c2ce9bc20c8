//! Region-word row kernels, shared by the training loss ([`crate::local`], one pair at a
//! time) and the blocked scores that evaluation and the loss's forward use
//! ([`crate::blocked`]): one query row's masked softmax over its contexts (logits in the
//! published order, [`fastmath::cephes_exp`], the normalisation), the focal rule, the
//! step-3 norms and the Gram-weighted sum of the implicit context norm. Each is a portable
//! loop over whole 8-lane chunks plus an AVX2 version with the same operations in the same
//! order, so both give the same bits.
//!
//! Which runs is `simd_available`: the level `demovlp_kernels::simd` selected (so
//! `DEMOVLP_SIMD=baseline` forces the portable loops here as it does in the kernels), unless
//! a test forced the portable path with [`force_portable_path`].

use std::sync::atomic::{AtomicBool, Ordering};

use crate::fastmath;
use crate::local::LEAKY_SLOPE;

/// The focal "equal" rule of step 5, the only place it is written: context s of a query
/// row is kept when its attention is above the row mean, `P[s] > ΣP / Lc`, evaluated as the
/// published `P·Lc − ΣP > 0` in f32 (so exactly the same entries are kept). The kept
/// weights are then renormalised to sum to 1 ([`focal_renormalise`]); the dropped ones get
/// weight 0, and the keep/drop decision passes no gradient.
#[inline(always)]
pub fn focal_keep(p: f32, lc: f32, total: f32) -> bool {
    p * lc - total > 0.0
}

/// The second half of the focal rule: the kept weights divided by their sum `kept_sum`
/// (dropped entries, 0, stay 0). Its own loop so the divisions vectorise; each is exact
/// per lane.
#[inline(always)]
pub fn focal_renormalise(weights: &mut [f32], kept_sum: f32) {
    for w in weights.iter_mut() {
        *w /= kept_sum;
    }
}

/// Testing hook: route every row through the portable loops even where AVX2 runs.
static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);

#[doc(hidden)]
pub fn force_portable_path(on: bool) {
    FORCE_PORTABLE.store(on, Ordering::Relaxed);
}

/// Whether the AVX2 row kernels run: `demovlp_kernels::simd::level()` is AVX2 or AVX-512
/// (both imply AVX2 + FMA on this CPU) and no test forced the portable path.
pub(crate) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !FORCE_PORTABLE.load(Ordering::Relaxed) && demovlp_kernels::simd::level() != demovlp_kernels::simd::Level::Baseline
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = &FORCE_PORTABLE;
        false
    }
}

/// `x` rounded up to whole 8-lane chunks.
pub(crate) fn pad8(x: usize) -> usize {
    x.div_ceil(8) * 8
}

#[inline(always)]
pub(crate) fn leaky(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        LEAKY_SLOPE * x
    }
}

#[inline(always)]
pub(crate) fn sum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// z ← softmax_s(((LeakyReLU(m[s]) / norms[s] + mq) + mc[s])·λ) on one padded row; returns
/// Σ_s z[s] (in 8 lane sums). The one softmax of the alignment, for both callers.
#[inline(always)]
pub(crate) fn softmax_lanes<const AVX2: bool>(z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
    let mx = logits::<AVX2>(z, m, norms, mq, mc, lambda);
    let acc = exp_shifted::<AVX2>(z, mx);
    let inv = 1.0 / sum8(&acc);
    sum8(&scale_sum::<AVX2>(z, inv))
}

/// One padded row (length a multiple of 8, padding masked with −∞ in `mc`):
/// [`softmax_lanes`] on the path `simd` names; `simd` must come from [`simd_available`].
pub(crate) fn softmax_row(simd: bool, z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
    if simd {
        softmax_lanes::<true>(z, m, norms, mq, mc, lambda)
    } else {
        softmax_lanes::<false>(z, m, norms, mq, mc, lambda)
    }
}

/// Σ_j w[j]·grow[idx[j]] in four partial sums (lane j mod 4, then (0+1)+(2+3)), the same
/// order on both paths.
///
/// # Safety
/// grow[idx[j]] must be in bounds for every j.
#[inline(always)]
pub(crate) unsafe fn gram_off<const AVX2: bool>(w: &[f32], idx: &[u32], grow: *const f32) -> f32 {
    let n = w.len().min(idx.len());
    let full = n / 4 * 4;
    let mut off = [0f32; 4];
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        use std::arch::x86_64::*;
        let mut acc = _mm_setzero_ps();
        for j in (0..full).step_by(4) {
            let g = _mm_set_ps(
                *grow.add(*idx.get_unchecked(j + 3) as usize),
                *grow.add(*idx.get_unchecked(j + 2) as usize),
                *grow.add(*idx.get_unchecked(j + 1) as usize),
                *grow.add(*idx.get_unchecked(j) as usize),
            );
            acc = _mm_add_ps(acc, _mm_mul_ps(_mm_loadu_ps(w.as_ptr().add(j)), g));
        }
        _mm_storeu_ps(off.as_mut_ptr(), acc);
    }
    if !AVX2 || cfg!(not(target_arch = "x86_64")) {
        for j in (0..full).step_by(4) {
            for (q, o) in off.iter_mut().enumerate() {
                *o += *w.get_unchecked(j + q) * *grow.add(*idx.get_unchecked(j + q) as usize);
            }
        }
    }
    for j in full..n {
        off[j - full] += *w.get_unchecked(j) * *grow.add(*idx.get_unchecked(j) as usize);
    }
    (off[0] + off[1]) + (off[2] + off[3])
}

/// Bit q set iff [`focal_keep`]`(p[q], lc, total)` (NaN → unset).
#[inline(always)]
pub(crate) fn focal_bits<const AVX2: bool>(p: &[f32; 8], lc: f32, total: f32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { focal_bits_avx2(p, lc, total) };
    }
    let mut bits = 0u32;
    for (q, &x) in p.iter().enumerate() {
        bits |= (focal_keep(x, lc, total) as u32) << q;
    }
    bits
}

/// [`focal_keep`] on 8 lanes: the same operations (mul, then sub, no FMA), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn focal_bits_avx2(p: &[f32; 8], lc: f32, total: f32) -> u32 {
    use std::arch::x86_64::*;
    let x = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p.as_ptr()), _mm256_set1_ps(lc)), _mm256_set1_ps(total));
    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_setzero_ps())) as u32
}

/// z[s] = ((LeakyReLU(m[s]) / norms[s] + mq) + mc[s])·λ; returns max z.
#[inline(always)]
pub(crate) fn logits<const AVX2: bool>(z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { logits_avx2(z, m, norms, mq, mc, lambda) };
    }
    let mut mx = [f32::NEG_INFINITY; 8];
    for (((zc, mr), nr), mcr) in z.chunks_exact_mut(8).zip(m.chunks_exact(8)).zip(norms.chunks_exact(8)).zip(mc.chunks_exact(8)) {
        for k in 0..8 {
            let v = ((leaky(mr[k]) / nr[k] + mq) + mcr[k]) * lambda;
            zc[k] = v;
            mx[k] = if v > mx[k] { v } else { mx[k] };
        }
    }
    mx.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn logits_avx2(z: &mut [f32], m: &[f32], norms: &[f32], mq: f32, mc: &[f32], lambda: f32) -> f32 {
    use std::arch::x86_64::*;
    let (zero, slope, vmq, vl) = (_mm256_setzero_ps(), _mm256_set1_ps(LEAKY_SLOPE), _mm256_set1_ps(mq), _mm256_set1_ps(lambda));
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    let n = z.len() / 8 * 8;
    assert!(m.len() >= n && norms.len() >= n && mc.len() >= n);
    for o in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(m.as_ptr().add(o));
        let y = _mm256_blendv_ps(_mm256_mul_ps(slope, x), x, _mm256_cmp_ps::<_CMP_GT_OQ>(x, zero));
        let a = _mm256_div_ps(y, _mm256_loadu_ps(norms.as_ptr().add(o)));
        let v = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(a, vmq), _mm256_loadu_ps(mc.as_ptr().add(o))), vl);
        _mm256_storeu_ps(z.as_mut_ptr().add(o), v);
        mx = _mm256_max_ps(v, mx);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), mx);
    out.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// z ← z·inv; returns the 8 lane sums of the result.
#[inline(always)]
pub(crate) fn scale_sum<const AVX2: bool>(z: &mut [f32], inv: f32) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { scale_sum_avx2(z, inv) };
    }
    let mut acc = [0f32; 8];
    for zc in z.chunks_exact_mut(8) {
        for k in 0..8 {
            zc[k] *= inv;
            acc[k] += zc[k];
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn scale_sum_avx2(z: &mut [f32], inv: f32) -> [f32; 8] {
    use std::arch::x86_64::*;
    let vi = _mm256_set1_ps(inv);
    let mut acc = _mm256_setzero_ps();
    for zc in z.chunks_exact_mut(8) {
        let p = _mm256_mul_ps(_mm256_loadu_ps(zc.as_ptr()), vi);
        _mm256_storeu_ps(zc.as_mut_ptr(), p);
        acc = _mm256_add_ps(acc, p);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Σ LeakyReLU(row)² per lane, and per column into `col`.
#[inline(always)]
pub(crate) fn sq_norms<const AVX2: bool>(row: &[f32], col: &mut [f32]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: see `exp_shifted`.
        return unsafe { sq_norms_avx2(row, col) };
    }
    let mut acc = [0f32; 8];
    for (cn, x) in col.chunks_exact_mut(8).zip(row.chunks_exact(8)) {
        for k in 0..8 {
            let y = leaky(x[k]);
            cn[k] += y * y;
            acc[k] += y * y;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sq_norms_avx2(row: &[f32], col: &mut [f32]) -> [f32; 8] {
    use std::arch::x86_64::*;
    let (zero, slope) = (_mm256_setzero_ps(), _mm256_set1_ps(LEAKY_SLOPE));
    let mut acc = _mm256_setzero_ps();
    let n = col.len() / 8 * 8;
    assert!(row.len() >= n);
    for o in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(row.as_ptr().add(o));
        let y = _mm256_blendv_ps(_mm256_mul_ps(slope, x), x, _mm256_cmp_ps::<_CMP_GT_OQ>(x, zero));
        let y2 = _mm256_mul_ps(y, y);
        _mm256_storeu_ps(col.as_mut_ptr().add(o), _mm256_add_ps(_mm256_loadu_ps(col.as_ptr().add(o)), y2));
        acc = _mm256_add_ps(acc, y2);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// z ← exp(z − mx) in place; returns the 8 lane sums (lane k sums the elements ≡ k mod 8,
/// identically on both paths).
#[inline(always)]
pub(crate) fn exp_shifted<const AVX2: bool>(z: &mut [f32], mx: f32) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 = true is only instantiated inside `blocked::pair_avx2` and behind
        // `simd_available()`, both only reached when `simd_available()` said so.
        return unsafe { exp_shifted_avx2(z, mx) };
    }
    let mut acc = [0f32; 8];
    for zc in z.chunks_exact_mut(8) {
        let zc: &mut [f32; 8] = zc.try_into().unwrap();
        for k in 0..8 {
            let e = fastmath::cephes_exp(zc[k] - mx);
            zc[k] = e;
            acc[k] += e;
        }
    }
    acc
}

/// `z ← exp(z − mx)` on 8 lanes at a time, returning the lanes' sums ([`cephes_exp_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn exp_shifted_avx2(z: &mut [f32], mx: f32) -> [f32; 8] {
    use std::arch::x86_64::*;
    let vmx = _mm256_set1_ps(mx);
    let mut acc = _mm256_setzero_ps();
    for zc in z.chunks_exact_mut(8) {
        let e = cephes_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(zc.as_ptr()), vmx));
        _mm256_storeu_ps(zc.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// [`fastmath::cephes_exp`] on 8 lanes with the same operations in the same order (no FMA), so
/// results are bit-identical to the scalar path.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn cephes_exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = |x: f32| _mm256_set1_ps(x);
    let (lo, hi, log2e, magic) = (set(-87.0), set(88.0), set(std::f32::consts::LOG2_E), set(12_582_912.0));
    let (ln2_hi, ln2_lo) = (set(0.693_359_4), set(-2.121_944_4e-4));
    let c = [1.398_199_9e-3f32, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
    let (p0, one) = (set(1.987_569_1e-4), set(1.0));
    let magic_bits = _mm256_set1_epi32(12_582_912.0f32.to_bits() as i32);
    let bias = _mm256_set1_epi32(127);
    let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    let t = _mm256_add_ps(_mm256_mul_ps(xc, log2e), magic);
    let n = _mm256_sub_ps(t, magic);
    let r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, ln2_hi)), _mm256_mul_ps(n, ln2_lo));
    let mut p = p0;
    for &ck in &c {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), set(ck));
    }
    let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), one);
    let ni = _mm256_sub_epi32(_mm256_castps_si256(t), magic_bits);
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(ni, bias)));
    let e = _mm256_mul_ps(y, scale);
    _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, lo), e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use demovlp_kernels::simd::{level, set_level, Level};

    #[test]
    fn the_kernels_simd_level_decides_the_row_path() {
        let before = level();
        set_level(Level::Baseline); // what DEMOVLP_SIMD=baseline selects
        assert!(!simd_available());
        set_level(Level::Avx512); // clamped to what the CPU has
        #[cfg(target_arch = "x86_64")]
        assert_eq!(simd_available(), level() != Level::Baseline);
        set_level(before);
    }

    #[test]
    fn focal_rule_keeps_above_the_row_mean() {
        // Four contexts, ΣP = 1: keep P > 1/4, written as P·4 − 1 > 0.
        let p = [0.4f32, 0.25, 0.2, 0.15];
        let kept: Vec<bool> = p.iter().map(|&x| focal_keep(x, 4.0, 1.0)).collect();
        assert_eq!(kept, [true, false, false, false]);
        assert!(!focal_keep(f32::NAN, 4.0, 1.0));
        let lanes = [0.4f32, 0.25, 0.2, 0.15, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(focal_bits::<false>(&lanes, 4.0, 1.0), 1);
        #[cfg(target_arch = "x86_64")]
        if simd_available() {
            assert_eq!(focal_bits::<true>(&lanes, 4.0, 1.0), 1);
        }
    }
}
