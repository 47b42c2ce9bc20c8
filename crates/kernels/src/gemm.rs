//! Row-major single-precision GEMM on top of `matrixmultiply` (pure Rust, threaded).

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
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = match ta {
        Trans::No => (lda as isize, 1),
        Trans::Yes => (1, lda as isize),
    };
    let (rsb, csb) = match tb {
        Trans::No => (ldb as isize, 1),
        Trans::Yes => (1, ldb as isize),
    };
    // Bounds: the furthest element each operand's strides reach must be in the slice.
    let a_need = if k == 0 { 0 } else { (m - 1) * rsa.unsigned_abs() + (k - 1) * csa.unsigned_abs() + 1 };
    let b_need = if k == 0 { 0 } else { (k - 1) * rsb.unsigned_abs() + (n - 1) * csb.unsigned_abs() + 1 };
    let c_need = (m - 1) * ldc + n;
    assert!(a.len() >= a_need, "sgemm: A has {} elements, needs {a_need}", a.len());
    assert!(b.len() >= b_need, "sgemm: B has {} elements, needs {b_need}", b.len());
    assert!(c.len() >= c_need, "sgemm: C has {} elements, needs {c_need}", c.len());
    if k == 0 {
        for i in 0..m {
            for x in &mut c[i * ldc..i * ldc + n] {
                *x = if beta == 0.0 { 0.0 } else { *x * beta };
            }
        }
        return;
    }
    // SAFETY: the asserts above guarantee every strided access stays inside the slices,
    // and `c` is borrowed mutably so it cannot alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
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
