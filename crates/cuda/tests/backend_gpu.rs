//! On a machine with an NVIDIA GPU (and the libraries): every kernel and the whole model on
//! `CudaBackend` against `Cpu`, fp32 and bf16. Elsewhere a notice, and a pass (set
//! `DEMOVLP_REQUIRE_GPU=1` to fail instead).
#![cfg(feature = "cuda")]

use demovlp_cuda::{open, probe, Precision};
use demovlp_model::backend::{check, kernels_check};

fn gpu() -> bool {
    match probe(0) {
        Ok(info) => {
            eprintln!("GPU 0: {} (sm_{}{}), {} MiB", info.name, info.capability.0, info.capability.1, info.memory_bytes >> 20);
            true
        }
        Err(e) => {
            assert!(std::env::var_os("DEMOVLP_REQUIRE_GPU").is_none(), "DEMOVLP_REQUIRE_GPU is set but: {e}");
            eprintln!("notice: no GPU, the CUDA backend test is skipped: {e}");
            false
        }
    }
}

#[test]
fn cuda_backend_matches_cpu_fp32() {
    if !gpu() {
        return;
    }
    let be = open(0, Precision::Fp32).unwrap();
    let verdicts = kernels_check::compare_kernels_with_cpu(&be, 1e-4);
    let failed: Vec<String> =
        verdicts.iter().filter(|v| !v.ok).map(|v| format!("{}: {} ({:e})", v.name, v.detail, v.max_rel_err)).collect();
    assert!(failed.is_empty(), "{} kernels differ:\n{}", failed.len(), failed.join("\n"));
    check::compare_with_cpu(be, 5e-4).unwrap();
}

#[test]
fn cuda_backend_bf16_is_close() {
    if !gpu() {
        return;
    }
    // bf16 GEMM inputs (8 bits of mantissa): only the kernels without GEMMs keep fp32 parity.
    let be = open(0, Precision::Bf16).unwrap();
    let verdicts = kernels_check::compare_kernels_with_cpu(&be, 3e-2);
    for v in &verdicts {
        eprintln!("{}: ok {} max rel err {:e}", v.name, v.ok, v.max_rel_err);
    }
    assert!(verdicts.iter().all(|v| v.ok), "bf16 kernels off by more than 3e-2");
}
