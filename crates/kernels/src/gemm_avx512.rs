//! Single-threaded AVX-512 SGEMM: BLIS loop order, packed panels, a 12×32 micro-kernel.
//!
//! Why our own: matrixmultiply's AVX-512 kernel is 16×16 (one vector of B per k, sixteen
//! broadcasts of A), so it issues about one load per FMA and stays near half of the FMA
//! peak; a 12×32 tile keeps 24 accumulators in registers and needs 14 loads per 24 FMAs.
//!
//! Arithmetic per element of C: `acc = Σ_p A[i,p]·B[p,j]` by FMAs in increasing p within
//! each `KC` block, then `C = alpha·acc + beta·C` as one FMA (beta = 1 after the first
//! block). Interior and edge tiles do exactly this, so a result never depends on where a
//! tile boundary falls (the caller's threading relies on it).

use std::arch::x86_64::*;
use rayon::prelude::*;
use std::cell::RefCell;

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

/// Parallel tasks per thread in each packing and compute phase.
const TASKS_PER_THREAD: usize = 16;

/// Whether this CPU runs the kernel (checked once; `is_x86_feature_detected` caches).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

thread_local! {
    /// Packing buffers of the calling thread, grown once and reused (no allocation per call).
    static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A 64-byte-aligned window of `len` floats inside `v` (grown as needed).
fn aligned(v: &mut Vec<f32>, len: usize) -> *mut f32 {
    if v.len() < len + 16 {
        v.resize(len + 16, 0.0);
    }
    let off = v.as_ptr().align_offset(64);
    // SAFETY: off < 16 and the vector holds len + 16 floats.
    unsafe { v.as_mut_ptr().add(off) }
}

/// Runs `f(0..parts)`, in parallel when asked (rayon), else in order on this thread.
fn for_parts(parts: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    if parallel && parts > 1 {
        (0..parts).into_par_iter().with_max_len(1).for_each(f);
    } else {
        (0..parts).for_each(f);
    }
}

/// Raw pointers handed to worker threads; every access pattern is documented at the use.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// `C[i,j] = alpha · Σ_p A[i,p]·B[p,j] + beta · C[i,j]` for `i < m`, `j < n`, with
/// `A[i,p] = a[i·rsa + p·csa]`, `B[p,j] = b[p·rsb + j·csb]`, `C[i,j] = c[i·ldc + j]`.
///
/// Loop order: for each KC-deep slice, all of A is packed once; for each NC-wide block of B,
/// B is packed once; then row panels of C are computed. With `parallel`, the packing and the
/// row panels are shared out over rayon's threads (one packed copy of each operand, not one
/// per thread).
///
/// With a non-null `bias` (`n` values; `beta` must be 0), the first KC slice adds
/// `bias[j]` where `beta·C` would go: `C = alpha·acc + bias`, exactly what presetting C to
/// the bias and using beta = 1 computes, without the extra pass over C.
///
/// # Safety
/// The CPU must support AVX-512F ([`available`]); every strided access above must be in
/// bounds; `c` must not overlap `a` or `b`; `k > 0`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(m: usize, n: usize, k: usize, alpha: f32, a: *const f32, rsa: isize, csa: isize, b: *const f32, rsb: isize, csb: isize, beta: f32, bias: *const f32, c: *mut f32, ldc: usize, parallel: bool) {
    debug_assert!(bias.is_null() || beta == 0.0, "bias with beta != 0");
    let panels_m = m.div_ceil(MR);
    let run = |pa: *mut f32, pb: *mut f32| {
        let (pa, pb, c) = (SendPtr(pa), SendPtr(pb), SendPtr(c));
        let (a, b, bias) = (SendPtr(a as *mut f32), SendPtr(b as *mut f32), SendPtr(bias as *mut f32));
        // Row panels per task: many tasks per thread, so that when one core runs slower (a
        // busy neighbour on a shared host) the other takes over its share instead of idling
        // at the barrier that ends each block.
        let threads = if parallel { rayon::current_num_threads() } else { 1 };
        let tasks_m = (TASKS_PER_THREAD * threads).min(panels_m);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let beta_blk = if pc == 0 { beta } else { 1.0 };
            let bias_blk = SendPtr(if pc == 0 { bias.get() } else { std::ptr::null_mut() });
            // SAFETY (both packs): each task writes its own disjoint panels of pa / pb and
            // reads A / B within the caller's bounds.
            for_parts(tasks_m, parallel, |t| {
                let (p0, p1) = (t * panels_m / tasks_m, (t + 1) * panels_m / tasks_m);
                let (i0, i1) = (p0 * MR, (p1 * MR).min(m));
                if i1 > i0 {
                    pack_panels::<MR>(kc, i1 - i0, a.get().offset(i0 as isize * rsa + pc as isize * csa), rsa, csa, pa.get().add(p0 * MR * kc));
                }
            });
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                let panels_n = nc.div_ceil(NR);
                let tasks_n = (TASKS_PER_THREAD * threads).min(panels_n);
                for_parts(tasks_n, parallel, |t| {
                    let (p0, p1) = (t * panels_n / tasks_n, (t + 1) * panels_n / tasks_n);
                    let (j0, j1) = (p0 * NR, (p1 * NR).min(nc));
                    if j1 > j0 {
                        pack_panels::<NR>(kc, j1 - j0, b.get().offset(pc as isize * rsb + (jc + j0) as isize * csb), csb, rsb, pb.get().add(p0 * NR * kc));
                    }
                });
                // SAFETY: tasks write disjoint row ranges of C; the packed operands are only read.
                for_parts(tasks_m, parallel, |t| {
                    let (p0, p1) = (t * panels_m / tasks_m, (t + 1) * panels_m / tasks_m);
                    for panel in p0..p1 {
                        let ir = panel * MR;
                        let mr = MR.min(m - ir);
                        let ap = pa.get().add(panel * MR * kc);
                        for jr in (0..nc).step_by(NR) {
                            let nr = NR.min(nc - jr);
                            let ct = c.get().add(ir * ldc + jc + jr);
                            let bj = if bias_blk.get().is_null() { std::ptr::null() } else { bias_blk.get().add(jc + jr) as *const f32 };
                            tile(kc, ap, pb.get().add(jr * kc), ct, ldc, mr, nr, alpha, beta_blk, bj);
                        }
                    }
                });
            }
        }
    };
    let (len_a, len_b) = (panels_m * MR * KC, NC * KC);
    PACK.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let (va, vb) = &mut *bufs;
            run(aligned(va, len_a), aligned(vb, len_b));
        }
        // Re-entered on this thread (a rayon worker stealing another GEMM while it waits
        // in ours): use fresh buffers rather than the ones in use.
        Err(_) => {
            let (mut va, mut vb) = (Vec::new(), Vec::new());
            run(aligned(&mut va, len_a), aligned(&mut vb, len_b));
        }
    });
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
            for p in 0..kc {
                for i in 0..R {
                    *d.add(p * R + i) = if i < n { *src.offset((i0 + i) as isize * si + p as isize * sp) } else { 0.0 };
                }
            }
        }
    }
}

macro_rules! unroll12 {
    ($i:ident, $body:block) => {{
        { #[allow(non_upper_case_globals)] const $i: usize = 0; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 1; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 2; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 3; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 4; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 5; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 6; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 7; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 8; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 9; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 10; $body }
        { #[allow(non_upper_case_globals)] const $i: usize = 11; $body }
    }};
}

/// One MR × NR tile of C (`mr` × `nr` of it valid) from packed panels; `bias` (null or the
/// tile's `nr` bias values) replaces `beta·C`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn tile(kc: usize, mut a: *const f32, mut b: *const f32, c: *mut f32, ldc: usize, mr: usize, nr: usize, alpha: f32, beta: f32, bias: *const f32) {
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
        let m: Vec<f32> = (0..256).map(|x| x as f32).collect();
        let mut out = [0.0f32; 256];
        // SAFETY: AVX-512F checked above; every load and store is within the 256 floats.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, ri) in r.iter_mut().enumerate() {
                *ri = _mm512_loadu_ps(m.as_ptr().add(16 * i));
            }
            transpose16(&mut r);
            for (c, rc) in r.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *rc);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * j + i], m[16 * i + j], "element ({i}, {j})");
            }
        }
    }
}
