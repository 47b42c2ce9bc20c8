//! Single-threaded and rayon-shared SGEMM on packed panels, BLIS style, for any register
//! micro-kernel ([`Kernel`]): the AVX-512 12×32 one ([`crate::gemm_avx512`]) and the AVX2
//! 6×16 one ([`crate::gemm_avx2`]).
//!
//! Arithmetic per element of C: `acc = Σ_p A[i,p]·B[p,j]` by FMAs in increasing p within
//! each `KC` block, then `C = alpha·acc + beta·C` as one FMA (beta = 1 after the first
//! block). Interior and edge tiles do exactly this, so a result never depends on where a
//! tile boundary falls (the caller's threading relies on it), and two kernels with the same
//! `KC` give the same bits.

use rayon::prelude::*;
use std::cell::RefCell;

/// A register micro-kernel and its packing routines.
///
/// # Safety
/// The methods may only run on a CPU with the kernel's instructions.
pub(crate) trait Kernel {
    /// Rows of the micro-tile (broadcast elements of A).
    const MR: usize;
    /// Columns of the micro-tile (vectors of B).
    const NR: usize;
    /// Depth of one packed slice (an MR × KC panel of A stays in L1).
    const KC: usize;
    /// Columns of B packed at once (the KC × NC block stays in L2).
    const NC: usize;
    /// Packs `count` rows of the A block into MR-wide panels `dst[panel][p][i]`, p < kc,
    /// zero-padded, where row i at depth p is `src[i·si + p·sp]` (si, sp = rsa, csa).
    unsafe fn pack_a(kc: usize, count: usize, src: *const f32, si: isize, sp: isize, dst: *mut f32);
    /// The same for `count` columns of the B block into NR-wide panels (si, sp = csb, rsb).
    unsafe fn pack_b(kc: usize, count: usize, src: *const f32, si: isize, sp: isize, dst: *mut f32);
    /// One MR × NR tile of C (`mr` × `nr` of it valid) from packed panels; `bias` (null or
    /// the tile's `nr` bias values) replaces `beta·C`.
    #[allow(clippy::too_many_arguments)]
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
    );
}

/// One R-wide panel by element loads, for strides of which neither is 1 (the kernels'
/// packers take vector paths otherwise): `dst[p·R + i]` = item i at depth p =
/// `src[i·si + p·sp]` for i < `n` ≤ R, zero for the padding items.
///
/// # Safety
/// Every item i < n, p < kc must be readable; `dst` must hold kc·R values.
#[inline(always)]
pub(crate) unsafe fn pack_strided<const R: usize>(kc: usize, n: usize, src: *const f32, si: isize, sp: isize, dst: *mut f32) {
    for p in 0..kc {
        for i in 0..R {
            *dst.add(p * R + i) = if i < n { *src.offset(i as isize * si + p as isize * sp) } else { 0.0 };
        }
    }
}

/// Test helper for the kernels' register transposes: `transpose` maps an n × n row-major
/// block to its rows after transposing; the result must be the transposed block.
#[cfg(test)]
pub(crate) fn check_transpose(n: usize, transpose: impl Fn(&[f32]) -> Vec<f32>) {
    let m: Vec<f32> = (0..n * n).map(|x| x as f32).collect();
    let out = transpose(&m);
    for i in 0..n {
        for j in 0..n {
            assert_eq!(out[n * j + i], m[n * i + j], "element ({i}, {j}) of {n} × {n}");
        }
    }
}

/// Parallel tasks per thread in each packing and compute phase.
const TASKS_PER_THREAD: usize = 16;

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
/// The CPU must support the kernel's instructions (its module's `available()`); every
/// strided access above must be in bounds; `c` must not overlap `a` or `b`; `k > 0`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm<K: Kernel>(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
    parallel: bool,
) {
    debug_assert!(bias.is_null() || beta == 0.0, "bias with beta != 0");
    let panels_m = m.div_ceil(K::MR);
    let run = |pa: *mut f32, pb: *mut f32| {
        let (pa, pb, c) = (SendPtr(pa), SendPtr(pb), SendPtr(c));
        let (a, b, bias) = (SendPtr(a as *mut f32), SendPtr(b as *mut f32), SendPtr(bias as *mut f32));
        // Row panels per task: many tasks per thread, so that when one core runs slower (a
        // busy neighbour on a shared host) the other takes over its share instead of idling
        // at the barrier that ends each block.
        let threads = if parallel { rayon::current_num_threads() } else { 1 };
        let tasks_m = (TASKS_PER_THREAD * threads).min(panels_m);
        for pc in (0..k).step_by(K::KC) {
            let kc = K::KC.min(k - pc);
            let beta_blk = if pc == 0 { beta } else { 1.0 };
            let bias_blk = SendPtr(if pc == 0 { bias.get() } else { std::ptr::null_mut() });
            // SAFETY (both packs): each task writes its own disjoint panels of pa / pb and
            // reads A / B within the caller's bounds.
            for_parts(tasks_m, parallel, |t| {
                let (p0, p1) = (t * panels_m / tasks_m, (t + 1) * panels_m / tasks_m);
                let (i0, i1) = (p0 * K::MR, (p1 * K::MR).min(m));
                if i1 > i0 {
                    K::pack_a(kc, i1 - i0, a.get().offset(i0 as isize * rsa + pc as isize * csa), rsa, csa, pa.get().add(p0 * K::MR * kc));
                }
            });
            for jc in (0..n).step_by(K::NC) {
                let nc = K::NC.min(n - jc);
                let panels_n = nc.div_ceil(K::NR);
                let tasks_n = (TASKS_PER_THREAD * threads).min(panels_n);
                for_parts(tasks_n, parallel, |t| {
                    let (p0, p1) = (t * panels_n / tasks_n, (t + 1) * panels_n / tasks_n);
                    let (j0, j1) = (p0 * K::NR, (p1 * K::NR).min(nc));
                    if j1 > j0 {
                        K::pack_b(
                            kc,
                            j1 - j0,
                            b.get().offset(pc as isize * rsb + (jc + j0) as isize * csb),
                            csb,
                            rsb,
                            pb.get().add(p0 * K::NR * kc),
                        );
                    }
                });
                // SAFETY: tasks write disjoint row ranges of C; the packed operands are only read.
                for_parts(tasks_m, parallel, |t| {
                    let (p0, p1) = (t * panels_m / tasks_m, (t + 1) * panels_m / tasks_m);
                    for panel in p0..p1 {
                        let ir = panel * K::MR;
                        let mr = K::MR.min(m - ir);
                        let ap = pa.get().add(panel * K::MR * kc);
                        for jr in (0..nc).step_by(K::NR) {
                            let nr = K::NR.min(nc - jr);
                            let ct = c.get().add(ir * ldc + jc + jr);
                            let bj = if bias_blk.get().is_null() { std::ptr::null() } else { bias_blk.get().add(jc + jr) as *const f32 };
                            K::tile(kc, ap, pb.get().add(jr * kc), ct, ldc, mr, nr, alpha, beta_blk, bj);
                        }
                    }
                });
            }
        }
    };
    let (len_a, len_b) = (panels_m * K::MR * K::KC, K::NC * K::KC);
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
