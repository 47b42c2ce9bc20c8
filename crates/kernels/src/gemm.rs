//! Row-major single-precision GEMM: our packed-panel GEMM ([`crate::gemm_packed`]) with the
//! AVX-512 12×32 kernel ([`crate::gemm_avx512`]) or, on CPUs without AVX-512, the AVX2 6×16
//! kernel ([`crate::gemm_avx2`]) — the two give the same bits; `matrixmultiply` (pure Rust)
//! on other CPUs or when asked ([`set_backend`]).
//!
//! Threading is ours. The packed GEMM packs each operand once and shares the row panels
//! of C over rayon's threads. For matrixmultiply, a large product is cut into tiles of C that
//! rayon runs as independent single-threaded GEMMs. Measured on the step's shapes (2 cores), this
//! beats matrixmultiply's own thread pool, which synchronises every k-block (a busy core
//! stalls the other) and, called from inside rayon loops (attention, losses), oversubscribes
//! the cores. Every element of C sees the same arithmetic whatever the tiling (the k order is
//! fixed), so results do not depend on the thread count.

use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which single-threaded GEMM runs the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Our AVX-512 12×32 kernel when the CPU has AVX-512F, else our AVX2 6×16 kernel when
    /// it has AVX2 and FMA, else matrixmultiply.
    Auto,
    /// matrixmultiply everywhere (its own AVX-512/FMA/AVX kernels): the baseline of
    /// `demovlp bench gemm` and a reference in tests.
    MatrixMultiply,
    /// Our AVX2 kernel even where AVX-512 is available (tests and benchmarks of the path
    /// that AVX2-only CPUs take); matrixmultiply if the CPU lacks AVX2/FMA.
    Avx2,
}

/// 0 unset (read `DEMOVLP_GEMM` on first use), else `Backend as u8 + 1`.
static BACKEND: AtomicU8 = AtomicU8::new(0);

/// Selects the GEMM backend for the whole process (benchmarks and tests compare them).
/// Without a call, the environment variable `DEMOVLP_GEMM` selects it: `matrixmultiply`
/// or `avx2`; anything else (or nothing) means [`Backend::Auto`].
pub fn set_backend(b: Backend) {
    BACKEND.store(b as u8 + 1, Ordering::Relaxed);
}

fn backend() -> Backend {
    match BACKEND.load(Ordering::Relaxed) {
        0 => {
            let b = match std::env::var("DEMOVLP_GEMM").as_deref() {
                Ok("matrixmultiply") => Backend::MatrixMultiply,
                Ok("avx2") => Backend::Avx2,
                _ => Backend::Auto,
            };
            BACKEND.store(b as u8 + 1, Ordering::Relaxed);
            b
        }
        1 => Backend::Auto,
        2 => Backend::MatrixMultiply,
        _ => Backend::Avx2,
    }
}

/// Which kernel runs the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
    MatrixMultiply,
}

/// The backend resolved to what this CPU supports.
fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        match backend() {
            Backend::Auto if crate::gemm_avx512::available() => return Kernel::Avx512,
            Backend::Auto | Backend::Avx2 if crate::gemm_avx2::available() => return Kernel::Avx2,
            _ => {}
        }
    }
    Kernel::MatrixMultiply
}

/// The backend that runs now: `Auto` resolved to what this CPU supports.
pub fn backend_name() -> &'static str {
    match kernel() {
        Kernel::Avx512 => "avx512-12x32",
        Kernel::Avx2 => "avx2-6x16",
        Kernel::MatrixMultiply => "matrixmultiply",
    }
}

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    No,
    Yes,
}

/// C[m,n] = alpha · op(A)[m,k] · op(B)[k,n] + beta · C, all row-major.
///
/// `a` is stored as [m,k] (`Trans::No`) or [k,m] (`Trans::Yes`); likewise `b` as
/// [k,n] or [n,k]. Leading dimensions are the stored row lengths.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, None, c, ldc);
}

/// C[m,n] = op(A)[m,k] · op(B)[k,n] + bias (broadcast over rows): a linear layer's forward.
/// Same result as presetting every row of C to `bias` and calling [`sgemm`] with beta = 1,
/// without that pass over C where the AVX-512 kernel runs.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_bias(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    bias: &[f32],
    c: &mut [f32],
    ldc: usize,
) {
    assert_eq!(bias.len(), n, "sgemm_bias: bias has {} values, C has {n} columns", bias.len());
    gemm(ta, tb, m, n, k, 1.0, a, lda, b, ldb, 0.0, Some(bias), c, ldc);
}

/// Both forms: with `bias`, `beta` is 0 and the bias takes the place of `beta · C`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let ((rsa, csa), (rsb, csb)) = (strides(ta, lda), strides(tb, ldb));
    // Bounds: the furthest element each operand's strides reach must be in the slice.
    let a_need = if k == 0 { 0 } else { (m - 1) * rsa.unsigned_abs() + (k - 1) * csa.unsigned_abs() + 1 };
    let b_need = if k == 0 { 0 } else { (k - 1) * rsb.unsigned_abs() + (n - 1) * csb.unsigned_abs() + 1 };
    let c_need = (m - 1) * ldc + n;
    assert!(a.len() >= a_need, "sgemm: A has {} elements, needs {a_need}", a.len());
    assert!(b.len() >= b_need, "sgemm: B has {} elements, needs {b_need}", b.len());
    assert!(c.len() >= c_need, "sgemm: C has {} elements, needs {c_need}", c.len());
    // SAFETY: the asserts keep every strided access inside the slices (the bias has n values,
    // checked by `sgemm_bias`), and `c` is borrowed mutably so it cannot alias `a` or `b`.
    unsafe { gemm_raw(ta, tb, m, n, k, alpha, a.as_ptr(), lda, b.as_ptr(), ldb, beta, bias.map(|b| b.as_ptr()), c.as_mut_ptr(), ldc) }
}

/// (row stride, column stride) of an operand stored row-major with leading dimension `ld`.
fn strides(t: Trans, ld: usize) -> (isize, isize) {
    match t {
        Trans::No => (ld as isize, 1),
        Trans::Yes => (1, ld as isize),
    }
}

/// [`sgemm`] on raw pointers, for a caller whose C rows interleave with other threads'
/// (the attention backward writes one head's columns of row-major gradient rows).
///
/// # Safety
/// Every strided access of A, B and C must be in bounds; C must not overlap A or B, nor
/// anything another thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_raw(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    if m > 0 && n > 0 {
        gemm_raw(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, None, c, ldc)
    }
}

/// # Safety
/// As [`sgemm_raw`]; `m`, `n` > 0; a bias has `n` values.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    mut beta: f32,
    bias: Option<*const f32>,
    c: *mut f32,
    ldc: usize,
) {
    let ((rsa, csa), (rsb, csb)) = (strides(ta, lda), strides(tb, ldb));
    #[cfg(target_arch = "x86_64")]
    if k > 0 {
        use crate::gemm_packed::sgemm as packed;
        let (parallel, bias_ptr) = (parallel_worth_it(m, n, k), bias.unwrap_or(std::ptr::null()));
        // SAFETY: the CPU has the kernel's instructions (`kernel` checked); the caller keeps
        // every access in bounds and C apart from A and B.
        match kernel() {
            Kernel::Avx512 => {
                return packed::<crate::gemm_avx512::Avx512>(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, bias_ptr, c, ldc, parallel)
            }
            Kernel::Avx2 => {
                return packed::<crate::gemm_avx2::Avx2>(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, bias_ptr, c, ldc, parallel)
            }
            Kernel::MatrixMultiply => {}
        }
    }
    if let Some(bias) = bias {
        for i in 0..m {
            std::ptr::copy_nonoverlapping(bias, c.add(i * ldc), n);
        }
        beta = 1.0;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let x = c.add(i * ldc + j);
                *x = if beta == 0.0 { 0.0 } else { *x * beta };
            }
        }
        return;
    }
    let (tm, tn) = tiles(m, n, k, rayon::current_num_threads());
    let (a_ptr, b_ptr, c_ptr) = (a as usize, b as usize, c as usize);
    let tile = |t: usize| {
        let (i0, j0) = ((t / n.div_ceil(tn)) * tm, (t % n.div_ceil(tn)) * tn);
        let (mi, nj) = (tm.min(m - i0), tn.min(n - j0));
        // SAFETY: the caller keeps every strided access of the full product in bounds; a
        // tile reads a sub-block of A and B and writes the disjoint C block
        // [i0..i0+mi, j0..j0+nj], so tiles never write the same element.
        unsafe {
            matrixmultiply::sgemm(
                mi,
                k,
                nj,
                alpha,
                (a_ptr as *const f32).offset(i0 as isize * rsa),
                rsa,
                csa,
                (b_ptr as *const f32).offset(j0 as isize * csb),
                rsb,
                csb,
                beta,
                (c_ptr as *mut f32).add(i0 * ldc + j0),
                ldc as isize,
                1,
            );
        }
    };
    let count = m.div_ceil(tm) * n.div_ceil(tn);
    if count == 1 {
        tile(0);
    } else {
        (0..count).into_par_iter().with_max_len(1).for_each(tile);
    }
}

/// Whether the AVX-512 path shares one product over rayon's threads: large products only,
/// and never from inside a rayon task — the caller is then one of many parallel tasks
/// (e.g. evaluation's per-video GEMMs), and nesting would only add synchronisation.
fn parallel_worth_it(m: usize, n: usize, k: usize) -> bool {
    rayon::current_num_threads() > 1 && m * n * k >= PAR_MIN_MACS && rayon::current_thread_index().is_none()
}

/// Products below this many multiply-adds run as one single-threaded GEMM (splitting costs
/// more than it gains; the callers of small GEMMs are usually rayon loops already).
const PAR_MIN_MACS: usize = 1 << 23;
/// Columns per tile: matrixmultiply packs B in panels of 1024 columns anyway, so cutting N
/// at that width adds no packing; cutting M re-packs B once per extra row block.
const TILE_N: usize = 1024;
/// Tile edges are multiples of the micro-kernels' tiles (12 × 32 ours, 16 × 16
/// matrixmultiply's AVX-512 one): rows of 48, columns of 32.
const ALIGN_M: usize = 48;
const ALIGN_N: usize = 32;

/// Tile shape (rows, columns) of C: column panels of at most `TILE_N`, and the fewest row
/// cuts that make the tile count a multiple of the thread count (equal shares). Every row cut
/// re-packs B: on an idle 2-core machine two row blocks beat four by ~2 % on the step's shapes.
fn tiles(m: usize, n: usize, k: usize, threads: usize) -> (usize, usize) {
    if threads <= 1 || m * n * k < PAR_MIN_MACS {
        return (m, n);
    }
    let cn = n.div_ceil(TILE_N);
    let tn = n.div_ceil(cn).next_multiple_of(ALIGN_N).min(n);
    let cn = n.div_ceil(tn);
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let cm = (threads / gcd(cn, threads)).min(m.div_ceil(4 * ALIGN_M)).max(1);
    let tm = m.div_ceil(cm).next_multiple_of(ALIGN_M).min(m);
    (tm, tn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: Trans, tb: Trans, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta == Trans::No { a[i * k + p] } else { a[p * m + i] };
                    let bv = if tb == Trans::No { b[p * n + j] } else { b[j * k + p] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// Large enough to be tiled (several row and column blocks, ragged edges): the tiled
    /// product must equal the untiled one bit for bit, for every transpose and beta.
    #[test]
    fn tiled_equals_untiled_exactly() {
        let (m, n, k) = (301, 2100, 40);
        let (tm, tn) = tiles(m, n, k, 2);
        assert!(tm < m && tn < n, "shape too small to exercise row and column cuts");
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 97) as f32 - 48.0) * 0.021).collect();
        let pool1 = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let pool2 = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let lda = if ta == Trans::No { k } else { m };
                let ldb = if tb == Trans::No { n } else { k };
                for beta in [0.0, 0.5] {
                    let init: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
                    let (mut c1, mut c2) = (init.clone(), init.clone());
                    pool1.install(|| sgemm(ta, tb, m, n, k, 1.5, &a, lda, &b, ldb, beta, &mut c1, n));
                    pool2.install(|| sgemm(ta, tb, m, n, k, 1.5, &a, lda, &b, ldb, beta, &mut c2, n));
                    assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{ta:?} {tb:?} beta {beta}");
                    let want = naive(ta, tb, m, n, k, &a, &b);
                    for ((x, w), i) in c2.iter().zip(&want).zip(&init) {
                        assert!((x - (1.5 * w + beta * i)).abs() < 1e-3 * (1.0 + w.abs()), "{x} vs {w}");
                    }
                }
            }
        }
    }

    /// Each packed-GEMM kernel this CPU has, directly: ragged edges in every dimension,
    /// several KC-deep slices and NC-wide blocks, every transpose, beta 0 and not, the bias
    /// form; serial and parallel runs equal bit for bit, and the AVX2 and AVX-512 kernels
    /// give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn packed_kernels_match_naive_and_each_other_on_ragged_shapes() {
        use crate::gemm_packed::{sgemm as packed, Kernel};
        #[allow(clippy::too_many_arguments)] // the GEMM signature itself, plus the kernel under test
        fn run<K: Kernel>(
            m: usize,
            n: usize,
            k: usize,
            a: &[f32],
            b: &[f32],
            ta: Trans,
            tb: Trans,
            beta: f32,
            bias: Option<&[f32]>,
            init: &[f32],
        ) -> Vec<f32> {
            let (rsa, csa) = strides(ta, if ta == Trans::No { k } else { m });
            let (rsb, csb) = strides(tb, if tb == Trans::No { n } else { k });
            let bias_ptr = |b: Option<&[f32]>| b.map_or(std::ptr::null(), |b| b.as_ptr());
            let pool2 = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let (mut c1, mut c2) = (init.to_vec(), init.to_vec());
            // SAFETY: the caller checked the CPU; all strides stay inside a, b, c and bias.
            unsafe {
                packed::<K>(m, n, k, 1.5, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, bias_ptr(bias), c1.as_mut_ptr(), n, false)
            };
            pool2.install(|| unsafe {
                packed::<K>(m, n, k, 1.5, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, bias_ptr(bias), c2.as_mut_ptr(), n, true)
            });
            assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{n}x{k} {ta:?} {tb:?}: serial != parallel");
            c1
        }
        let (has512, has2) = (crate::gemm_avx512::available(), crate::gemm_avx2::available());
        if !has512 && !has2 {
            eprintln!("neither AVX-512F nor AVX2/FMA on this CPU: packed kernels not exercised");
            return;
        }
        for (m, n, k) in [(1, 1, 1), (13, 33, 257), (25, 1030, 600), (12, 32, 256), (50, 70, 3), (7, 300, 800)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 97) as f32 - 48.0) * 0.021).collect();
            let bias: Vec<f32> = (0..n).map(|j| (j % 11) as f32 * 0.37 - 1.0).collect();
            for ta in [Trans::No, Trans::Yes] {
                for tb in [Trans::No, Trans::Yes] {
                    let want = naive(ta, tb, m, n, k, &a, &b);
                    for (beta, with_bias) in [(0.0f32, false), (0.5, false), (0.0, true)] {
                        let init: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
                        let bias = with_bias.then_some(&bias[..]);
                        let outs: Vec<Vec<f32>> = [
                            has512.then(|| run::<crate::gemm_avx512::Avx512>(m, n, k, &a, &b, ta, tb, beta, bias, &init)),
                            has2.then(|| run::<crate::gemm_avx2::Avx2>(m, n, k, &a, &b, ta, tb, beta, bias, &init)),
                        ]
                        .into_iter()
                        .flatten()
                        .collect();
                        for (idx, (x, w)) in outs[0].iter().zip(&want).enumerate() {
                            let e = 1.5 * w + bias.map_or(beta * init[idx], |b| b[idx % n]);
                            assert!((x - e).abs() < 1e-3 * (1.0 + e.abs()), "{m}x{n}x{k} {ta:?} {tb:?} beta {beta}: {x} vs {e}");
                        }
                        if let [x, y] = &outs[..] {
                            assert!(
                                x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                                "{m}x{n}x{k} {ta:?} {tb:?} beta {beta} bias {with_bias}: AVX2 != AVX-512"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The bias form equals presetting C to the bias and accumulating, bit for bit, on the
    /// AVX-512 path and the fallback alike (edges, several KC slices, both transposes of B).
    #[test]
    fn bias_form_equals_preset_and_accumulate() {
        for (m, n, k) in [(13, 33, 257), (50, 70, 3), (25, 1030, 600)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 97) as f32 - 48.0) * 0.021).collect();
            let bias: Vec<f32> = (0..n).map(|j| (j % 11) as f32 * 0.37 - 1.0).collect();
            for tb in [Trans::No, Trans::Yes] {
                let ldb = if tb == Trans::No { n } else { k };
                let mut want = vec![0.0; m * n];
                for row in want.chunks_exact_mut(n) {
                    row.copy_from_slice(&bias);
                }
                sgemm(Trans::No, tb, m, n, k, 1.0, &a, k, &b, ldb, 1.0, &mut want, n);
                let mut got = vec![f32::NAN; m * n];
                sgemm_bias(Trans::No, tb, m, n, k, &a, k, &b, ldb, &bias, &mut got, n);
                assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{n}x{k} {tb:?}");
            }
        }
    }

    #[test]
    fn matches_naive_for_all_transposes() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2).collect();
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let lda = if ta == Trans::No { k } else { m };
                let ldb = if tb == Trans::No { n } else { k };
                let want = naive(ta, tb, m, n, k, &a, &b);
                let mut c = vec![1.0; m * n];
                sgemm(ta, tb, m, n, k, 1.0, &a, lda, &b, ldb, 0.0, &mut c, n);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-5, "{ta:?} {tb:?}: {x} vs {y}");
                }
                // beta = 1 accumulates.
                let mut c2 = vec![1.0; m * n];
                sgemm(ta, tb, m, n, k, 2.0, &a, lda, &b, ldb, 1.0, &mut c2, n);
                for (x, y) in c2.iter().zip(&want) {
                    assert!((x - (1.0 + 2.0 * y)).abs() < 1e-4);
                }
            }
        }
    }
}
