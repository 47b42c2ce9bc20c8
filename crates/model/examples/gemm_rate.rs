//! GFLOP/s of the step's GEMM shapes (video tower, 8 clips × 241 tokens; text 8 × 100):
//! `cargo run --release -p demovlp-model --example gemm_rate`. `MATMUL_NUM_THREADS=1` shows
//! the single-thread rate, i.e. how well matrixmultiply's own threading scales.
use demovlp_kernels::gemm::{sgemm, Trans};
use std::time::Instant;

fn main() {
    let reps = 5;
    // (label, ta, tb, m, n, k) as linear forward (NT), backward dX (NN) and dW (TN).
    let shapes = [
        ("fc1 fwd  1928x3072x768 NT", Trans::No, Trans::Yes, 1928, 3072, 768),
        ("fc2 fwd  1928x768x3072 NT", Trans::No, Trans::Yes, 1928, 768, 3072),
        ("qkv fwd  1928x2304x768 NT", Trans::No, Trans::Yes, 1928, 2304, 768),
        ("fc1 dX   1928x768x3072 NN", Trans::No, Trans::No, 1928, 768, 3072),
        ("fc1 dW   3072x768x1928 TN", Trans::Yes, Trans::No, 3072, 768, 1928),
        ("fc2 dW   768x3072x1928 TN", Trans::Yes, Trans::No, 768, 3072, 1928),
        ("text q   800x768x768 NT", Trans::No, Trans::Yes, 800, 768, 768),
    ];
    for (label, ta, tb, m, n, k) in shapes {
        let a = vec![0.01f32; m * k];
        let b = vec![0.02f32; k * n];
        let mut c = vec![0.0f32; m * n];
        let lda = if ta == Trans::No { k } else { m };
        let ldb = if tb == Trans::No { n } else { k };
        sgemm(ta, tb, m, n, k, 1.0, &a, lda, &b, ldb, 0.0, &mut c, n);
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            sgemm(ta, tb, m, n, k, 1.0, &a, lda, &b, ldb, 0.0, &mut c, n);
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!("{label}: best {:.2} ms, {:.0} GFLOP/s", best * 1e3, 2.0 * (m * n * k) as f64 / best / 1e9);
    }
}
