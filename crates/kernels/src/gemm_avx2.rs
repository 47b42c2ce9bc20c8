//! The AVX2/FMA micro-kernel (6×16) and its packing, driven by [`crate::gemm_packed`]: the
//! GEMM of CPUs without AVX-512 (AMD Zen 1–3, Intel before Skylake-SP and most client parts).
//!
//! Why our own: matrixmultiply's FMA kernel is 8×8 (one vector of B per k, eight broadcasts
//! of A): nine loads per eight FMAs and only eight accumulators, so it is bound by loads
//! and by FMA latency. A 6×16 tile (the BLIS Haswell shape) keeps twelve accumulators and
//! needs eight loads per twelve FMAs. The depth `KC` is the AVX-512 kernel's, so both give
//! the same bits ([`crate::gemm_packed`]).

use crate::gemm_packed::Kernel;
use std::arch::x86_64::*;

/// Rows of the micro-tile (broadcast elements of A).
const MR: usize = 6;
/// Columns of the micro-tile (two 8-lane vectors of B).
const NR: usize = 16;
/// Depth of one packed slice (A micro-panel 9 KB in a 32 KB L1); equal to the AVX-512
/// kernel's so that results do not depend on the instruction set.
const KC: usize = 384;
/// Columns of B packed at once: KC × NC = 384 KB, inside the 512 KB L2 of Zen 2/3 cores.
const NC: usize = 256;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// The AVX2 6×16 micro-kernel for [`crate::gemm_packed::sgemm`].
pub(crate) struct Avx2;

impl Kernel for Avx2 {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = KC;
    const NC: usize = NC;
    unsafe fn pack_a(kc: usize, count: usize, src: *const f32, si: isize, sp: isize, dst: *mut f32) {
        pack_panels::<MR>(kc, count, src, si, sp, dst)
    }
    unsafe fn pack_b(kc: usize, count: usize, src: *const f32, si: isize, sp: isize, dst: *mut f32) {
        pack_panels::<NR>(kc, count, src, si, sp, dst)
    }
    unsafe fn tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        alpha: f32,
        beta: f32,
        bias: *const f32,
    ) {
        tile(kc, a, b, c, ldc, mr, nr, alpha, beta, bias)
    }
}

/// Lane mask (all bits set in each of the first `n` ≤ 8 lanes) for masked loads and stores.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), idx)
}

/// Transposes the 8×8 block held as 8 row vectors: afterwards `r[c]` holds column c.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(r: &mut [__m256; 8]) {
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(x, y)
        } else {
            _mm256_unpackhi_ps(x, y)
        }
    });
    // u[4h + s]: rows 4h..4h+4 at column 4L + s in 128-bit lane L.
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for s in 0..4 {
        r[s] = _mm256_permute2f128_ps::<0x20>(u[s], u[4 + s]);
        r[4 + s] = _mm256_permute2f128_ps::<0x31>(u[s], u[4 + s]);
    }
}

/// Packs `count` items into R-wide panels `dst[panel][p][i]`, p < kc, zero-padded, where
/// item i at depth p is `src[i·si + p·sp]` (the contract of [`Kernel::pack_a`]).
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_panels<const R: usize>(kc: usize, count: usize, src: *const f32, si: isize, sp: isize, dst: *mut f32) {
    if si == 1 && sp != 1 {
        // Items contiguous at each depth: each source run is cut into the panels' rows.
        for p in 0..kc {
            let s = src.offset(p as isize * sp);
            for (panel, i0) in (0..count).step_by(R).enumerate() {
                let n = R.min(count - i0);
                let d = dst.add(panel * R * kc + p * R);
                for i in 0..R {
                    *d.add(i) = if i < n { *s.add(i0 + i) } else { 0.0 };
                }
            }
        }
        return;
    }
    for (panel, i0) in (0..count).step_by(R).enumerate() {
        let n = R.min(count - i0);
        let d = dst.add(panel * R * kc);
        if sp == 1 {
            // Items contiguous along p: 8-deep blocks of 8 items loaded (masked), transposed
            // in registers and stored as panel rows.
            let mut p0 = 0;
            while p0 < kc {
                let depth = 8.min(kc - p0);
                for g in (0..R).step_by(8) {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, ri) in r.iter_mut().enumerate() {
                        if g + i < n {
                            let row = src.offset((i0 + g + i) as isize * si).add(p0);
                            *ri = if depth == 8 { _mm256_loadu_ps(row) } else { _mm256_maskload_ps(row, lanes(depth)) };
                        }
                    }
                    transpose8(&mut r);
                    // Masked stores are slow (microcoded on AMD Zen): a row narrower than 8
                    // (R = 6) is stored whole when the next panel row follows, which the next
                    // store then overwrites; only the panel's last row is masked.
                    let keep = lanes(R - g);
                    for (pp, col) in r.iter().enumerate().take(depth) {
                        let at = d.add((p0 + pp) * R + g);
                        if R - g >= 8 || p0 + pp + 1 < kc {
                            _mm256_storeu_ps(at, *col);
                        } else {
                            _mm256_maskstore_ps(at, keep, *col);
                        }
                    }
                }
                p0 += depth;
            }
        } else {
            crate::gemm_packed::pack_strided::<R>(kc, n, src.offset(i0 as isize * si), si, sp, d);
        }
    }
}

macro_rules! unroll6 {
    ($i:ident, $body:block) => {{
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 0;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 1;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 2;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 3;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 4;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 5;
            $body
        }
    }};
}

/// One MR × NR tile of C (`mr` × `nr` of it valid) from packed panels; `bias` (null or the
/// tile's `nr` bias values) replaces `beta·C`. The same arithmetic as the AVX-512 tile.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(
    kc: usize,
    mut a: *const f32,
    mut b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    alpha: f32,
    beta: f32,
    bias: *const f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // The C rows are only touched after the k loop: ask for them in L2 now (see the
    // AVX-512 tile). A prefetch never faults, so rows past C are harmless (wrapping_add).
    for i in 0..mr {
        _mm_prefetch::<_MM_HINT_T1>(c.wrapping_add(i * ldc) as *const i8);
    }
    for _ in 0..kc {
        let b0 = _mm256_load_ps(b);
        let b1 = _mm256_load_ps(b.add(8));
        unroll6!(i, {
            let av = _mm256_broadcast_ss(&*a.add(i));
            acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
        });
        a = a.add(MR);
        b = b.add(NR);
    }
    // C = alpha·acc + (bias | beta·C | 0) through masked loads and stores, as the AVX-512 tile.
    let alphav = _mm256_set1_ps(alpha);
    let betav = _mm256_set1_ps(beta);
    for (i, acc_row) in acc.iter().enumerate().take(mr) {
        let row = c.add(i * ldc);
        for (h, &v) in acc_row.iter().enumerate() {
            let n = nr.saturating_sub(8 * h).min(8);
            if n == 0 {
                break;
            }
            // Full vectors on interior tiles (masked moves are slow on AMD); the same
            // arithmetic either way.
            let mask = lanes(n);
            let load = |p: *const f32| if n == 8 { _mm256_loadu_ps(p) } else { _mm256_maskload_ps(p, mask) };
            let out = if !bias.is_null() {
                _mm256_fmadd_ps(alphav, v, load(bias.add(8 * h)))
            } else if beta == 0.0 {
                _mm256_mul_ps(alphav, v)
            } else {
                _mm256_fmadd_ps(alphav, v, _mm256_mul_ps(load(row.add(8 * h)), betav))
            };
            if n == 8 {
                _mm256_storeu_ps(row.add(8 * h), out);
            } else {
                _mm256_maskstore_ps(row.add(8 * h), mask, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose8_transposes() {
        if !available() {
            return;
        }
        crate::gemm_packed::check_transpose(8, |m| {
            let mut out = vec![0.0f32; 64];
            // SAFETY: AVX2 checked above; every load and store is within the 64 floats.
            unsafe {
                let mut r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(m.as_ptr().add(8 * i)));
                transpose8(&mut r);
                for (c, rc) in r.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), *rc);
                }
            }
            out
        });
    }
}
