//! The AVX-512 micro-kernel (12×32) and its packing, driven by [`crate::gemm_packed`].
//!
//! Why our own: matrixmultiply's AVX-512 kernel is 16×16 (one vector of B per k, sixteen
//! broadcasts of A), so it issues about one load per FMA and stays near half of the FMA
//! peak; a 12×32 tile keeps 24 accumulators in registers and needs 14 loads per 24 FMAs.
//! Per element of C it computes what [`crate::gemm_packed`] describes.

use crate::gemm_packed::Kernel;
use std::arch::x86_64::*;

/// Rows of the micro-tile (broadcast elements of A).
const MR: usize = 12;
/// Columns of the micro-tile (two 16-lane vectors of B).
const NR: usize = 32;
/// Depth of one packed slice: an A micro-panel (MR × KC, 18 KB) stays in the 48 KB L1 while
/// B micro-panels stream from L2; deeper slices mean fewer read-modify-write passes over C.
/// (Measured with `bench gemm` against 256/1024 and 512/512: 384/768 was best; a whole-width
/// B block, NC 3072, saves parallel regions but was 1.11× slower: B must stay in L2.)
const KC: usize = 384;
/// Columns of B packed at once (KC × NC = 1.1 MB, in each core's 2 MB L2).
const NC: usize = 768;

/// Whether this CPU runs the kernel (checked once; `is_x86_feature_detected` caches).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// The AVX-512 12×32 micro-kernel for [`crate::gemm_packed::sgemm`].
pub(crate) struct Avx512;

impl Kernel for Avx512 {
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

/// Lane mask of the first `n` (≤ 16) lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// Transposes the 16×16 block held as 16 row vectors: afterwards `r[c]` holds column c.
/// (Pairs of rows interleaved by 32 and by 64 bits, then 128-bit lanes regrouped twice.)
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + s]: rows 4g..4g+4 at column 4L + s in 128-bit lane L.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a0, a1, b0, b1) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a0), _mm512_castps_pd(b0)));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a0), _mm512_castps_pd(b0)));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a1), _mm512_castps_pd(b1)));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a1), _mm512_castps_pd(b1)));
    }
    for s in 0..4 {
        let v88 = _mm512_shuffle_f32x4::<0x88>(u[s], u[4 + s]);
        let vdd = _mm512_shuffle_f32x4::<0xdd>(u[s], u[4 + s]);
        let w88 = _mm512_shuffle_f32x4::<0x88>(u[8 + s], u[12 + s]);
        let wdd = _mm512_shuffle_f32x4::<0xdd>(u[8 + s], u[12 + s]);
        r[s] = _mm512_shuffle_f32x4::<0x88>(v88, w88);
        r[4 + s] = _mm512_shuffle_f32x4::<0x88>(vdd, wdd);
        r[8 + s] = _mm512_shuffle_f32x4::<0xdd>(v88, w88);
        r[12 + s] = _mm512_shuffle_f32x4::<0xdd>(vdd, wdd);
    }
}

/// Packs `rows` (≤ R) source rows, each contiguous along p (`row(i)` points at its p = 0),
/// into one R-wide panel `dst[p·R + i]`, p < kc, zero-padding rows ≥ `rows`: 16-deep blocks
/// of 16 rows are loaded (masked), transposed in registers and stored as rows of the panel.
#[target_feature(enable = "avx512f")]
unsafe fn pack_transposed<const R: usize>(kc: usize, rows: usize, row: impl Fn(usize) -> *const f32, dst: *mut f32) {
    let mut p0 = 0;
    while p0 < kc {
        let depth = 16.min(kc - p0);
        let out = dst.add(p0 * R);
        for g in (0..R).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, ri) in r.iter_mut().enumerate() {
                if g + i < rows {
                    *ri = _mm512_maskz_loadu_ps(lanes(depth), row(g + i).add(p0));
                }
            }
            transpose16(&mut r);
            let keep = lanes(R - g);
            for (pp, col) in r.iter().enumerate().take(depth) {
                _mm512_mask_storeu_ps(out.add(pp * R + g), keep, *col);
            }
        }
        p0 += depth;
    }
}

/// Packs `count` items — rows of the A block (R = MR) or columns of the B block (R = NR) —
/// into R-wide panels `dst[panel][p][i]`, p < kc, zero-padded, where item i at depth p is
/// `src[i·si + p·sp]`. For A: si, sp = rsa, csa; for B: si, sp = csb, rsb.
#[target_feature(enable = "avx512f")]
unsafe fn pack_panels<const R: usize>(kc: usize, count: usize, src: *const f32, si: isize, sp: isize, dst: *mut f32) {
    if si == 1 && sp != 1 {
        // The items are contiguous at each depth (B row-major, or Aᵀ stored row-major as
        // the weight gradient's dYᵀ): for each p the count values are one run, cut into the
        // panels' R-wide rows (p outer: each source line is read once).
        for p in 0..kc {
            let s = src.offset(p as isize * sp);
            for (panel, i0) in (0..count).step_by(R).enumerate() {
                let n = R.min(count - i0);
                let d = dst.add(panel * R * kc + p * R);
                for g in (0..R).step_by(16) {
                    let v = _mm512_maskz_loadu_ps(lanes(n.saturating_sub(g)), s.wrapping_add(i0 + g));
                    _mm512_mask_storeu_ps(d.add(g), lanes(R - g), v);
                }
            }
        }
        return;
    }
    for (panel, i0) in (0..count).step_by(R).enumerate() {
        let n = R.min(count - i0);
        let d = dst.add(panel * R * kc);
        if sp == 1 {
            // Each item contiguous along p (A row-major, or a weight used as `x·Wᵀ`).
            pack_transposed::<R>(kc, n, |i| src.offset((i0 + i) as isize * si), d);
        } else {
            crate::gemm_packed::pack_strided::<R>(kc, n, src.offset(i0 as isize * si), si, sp, d);
        }
    }
}

macro_rules! unroll12 {
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
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 6;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 7;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 8;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 9;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 10;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $i: usize = 11;
            $body
        }
    }};
}

/// One MR × NR tile of C (`mr` × `nr` of it valid) from packed panels; `bias` (null or the
/// tile's `nr` bias values) replaces `beta·C`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
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
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // The tile of C is read and written only after the k loop; its rows lie ldc apart
    // (often a multiple of 4 KB, so they compete for the same L1 sets). Asking for them in
    // L2 now and in L1 shortly before the end hides that latency (bench: 2–3 % overall,
    // up to 10 % on fc2's input gradient). A prefetch never faults, so the second half-row
    // of a narrow edge tile may point past C (wrapping_add: no in-bounds promise).
    let l1_at = kc.saturating_sub(24);
    for i in 0..mr {
        _mm_prefetch::<_MM_HINT_T1>(c.wrapping_add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T1>(c.wrapping_add(i * ldc + 16) as *const i8);
    }
    for kk in 0..kc {
        if kk == l1_at {
            for i in 0..mr {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + 16) as *const i8);
            }
        }
        let b0 = _mm512_load_ps(b);
        let b1 = _mm512_load_ps(b.add(16));
        unroll12!(i, {
            let av = _mm512_set1_ps(*a.add(i));
            acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
        });
        a = a.add(MR);
        b = b.add(NR);
    }
    // C = alpha·acc + (bias | beta·C | 0) through masked loads and stores, all 16 lanes on
    // interior tiles: edge tiles get exactly the same per-element arithmetic.
    let alphav = _mm512_set1_ps(alpha);
    let betav = _mm512_set1_ps(beta);
    for (i, acc_row) in acc.iter().enumerate().take(mr) {
        let row = c.add(i * ldc);
        for (h, &v) in acc_row.iter().enumerate() {
            let lanes = nr.saturating_sub(16 * h).min(16);
            if lanes == 0 {
                break;
            }
            let mask: __mmask16 = if lanes == 16 { 0xffff } else { (1u16 << lanes) - 1 };
            let out = if !bias.is_null() {
                _mm512_fmadd_ps(alphav, v, _mm512_maskz_loadu_ps(mask, bias.add(16 * h)))
            } else if beta == 0.0 {
                _mm512_mul_ps(alphav, v)
            } else {
                _mm512_fmadd_ps(alphav, v, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row.add(16 * h)), betav))
            };
            _mm512_mask_storeu_ps(row.add(16 * h), mask, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !available() {
            return;
        }
        crate::gemm_packed::check_transpose(16, |m| {
            let mut out = vec![0.0f32; 256];
            // SAFETY: AVX-512F checked above; every load and store is within the 256 floats.
            unsafe {
                let mut r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
                transpose16(&mut r);
                for (c, rc) in r.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *rc);
                }
            }
            out
        });
    }
}
