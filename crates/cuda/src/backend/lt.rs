//! GEMMs through cuBLASLt: fp32 (compute type `CUBLAS_COMPUTE_32F`: no TF32) and bf16
//! inputs with fp32 accumulation and fp32 outputs. One plan per GEMM shape (descriptor,
//! layouts and the heuristic's algorithm, made once and reused: the steady state of
//! same-shaped batches allocates nothing), a 32 MiB workspace. A shape cuBLASLt has no
//! algorithm for goes through plain cuBLAS instead (`setup.rs`), as does everything when
//! libcublasLt is missing or `DEMOVLP_CUDA_GEMM=cublas` is set.
//!
//! Epilogues ([`Epilogue`]): the bias added by the GEMM (`CUBLASLT_EPILOGUE_BIAS`) and the
//! bias gradient reduced by it (`CUBLASLT_EPILOGUE_BGRADB`), each a plan of its own; a
//! shape with no epilogue algorithm is remembered and its callers run the unfused kernels.
//! cuBLASLt's GELU epilogues compute the tanh approximation of GELU; the model's GELU is
//! the exact (erf) one, so they are not used.

use super::mem::ck;
use cudarc::cublaslt::{result as lt, sys};
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::Mutex;

/// Workspace handed to cuBLASLt's algorithms.
pub(super) const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLASLt epilogue fused into a GEMM `D = op(A)·op(B) (+ beta·C)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(super) enum Epilogue {
    #[default]
    None,
    /// `+ bias`: one value per row of D (column-major), broadcast over its columns.
    Bias,
    /// Also writes the bias gradient: the sums of op(B) over k, one per column of D.
    BgradB,
}

/// What a plan is keyed by: the whole problem description.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub bf16: bool,
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub accumulate: bool,
    /// Byte alignments of A, B and C (cuBLASLt's heuristic assumes 256 unless told: a view
    /// into the middle of a buffer, e.g. the k block of fused qkv rows, is less aligned).
    pub align: [u32; 3],
    pub epilogue: Epilogue,
}

/// The largest power of two (≤ 256) dividing a device address: what the plan's algorithm
/// may assume about that operand.
pub(super) fn alignment(ptr: u64) -> u32 {
    1u32 << ptr.trailing_zeros().min(8)
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub(super) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    /// `None`: cuBLASLt has no algorithm for that shape (plain cuBLAS runs it).
    plans: Mutex<HashMap<Key, Option<Plan>>>,
    /// Epilogue problems (alignments left out) cuBLASLt had no algorithm for.
    no_epilogue: Mutex<HashSet<Key>>,
}

// SAFETY: cuBLASLt handles and descriptors may be used from any thread; calls are serialised
// on the backend's one stream and the plan map is behind a mutex.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Lt {
    /// A handle and its workspace (`workspace` is device memory of [`WORKSPACE_BYTES`]).
    pub(super) fn new(workspace: u64) -> Result<Self, String> {
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        Ok(Lt { handle, workspace, plans: Mutex::default(), no_epilogue: Mutex::default() })
    }

    fn plan(&self, key: &Key) -> Result<Plan, String> {
        let (dt_in, dt_out) =
            (if key.bf16 { sys::cudaDataType::CUDA_R_16BF } else { sys::cudaDataType::CUDA_R_32F }, sys::cudaDataType::CUDA_R_32F);
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(|e| format!("cublasLtMatmulDescCreate: {e:?}"))?;
        // cublasOperation_t: N = 0, T = 1.
        let (opa, opb) = (key.ta as i32, key.tb as i32);
        // Stored shapes (rows, cols) of A and B, column-major.
        let (ar, ac) = if key.ta { (key.k, key.m) } else { (key.m, key.k) };
        let (br, bc) = if key.tb { (key.n, key.k) } else { (key.k, key.n) };
        // SAFETY: a live descriptor; the attribute values are i32 / u64 as cuBLASLt documents.
        unsafe {
            for (attr, v) in [
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &opa),
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &opb),
            ] {
                lt::set_matmul_desc_attribute(desc, attr, v as *const i32 as *const c_void, 4)
                    .map_err(|e| format!("cublasLtMatmulDescSetAttribute: {e:?}"))?;
            }
            let epilogue = match key.epilogue {
                Epilogue::None => None,
                Epilogue::Bias => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
                Epilogue::BgradB => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB),
            };
            if let Some(e) = epilogue {
                let v = e as u32;
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &v as *const u32 as *const c_void,
                    4,
                )
                .map_err(|e| format!("cublasLtMatmulDescSetAttribute (epilogue): {e:?}"))?;
            }
            let layout = |t, r: usize, c: usize, ld: usize| {
                lt::create_matrix_layout(t, r as u64, c as u64, ld as i64).map_err(|e| format!("cublasLtMatrixLayoutCreate: {e:?}"))
            };
            let a = layout(dt_in, ar, ac, key.lda)?;
            let b = layout(dt_in, br, bc, key.ldb)?;
            let c = layout(dt_out, key.m, key.n, key.ldc)?;
            let pref = lt::create_matmul_pref().map_err(|e| format!("cublasLtMatmulPreferenceCreate: {e:?}"))?;
            let ws = WORKSPACE_BYTES as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(|e| format!("cublasLtMatmulPreferenceSetAttribute: {e:?}"))?;
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let [aa, ab, ac] = key.align;
            for (attr, v) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aa),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ab),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ac),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ac),
            ] {
                lt::set_matmul_pref_attribute(pref, attr, &v as *const u32 as *const c_void, 4)
                    .map_err(|e| format!("cublasLtMatmulPreferenceSetAttribute (alignment): {e:?}"))?;
            }
            let heur = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            let _ = lt::destroy_matmul_pref(pref);
            match heur {
                Ok(h) => Ok(Plan { desc, a, b, c, algo: h.algo }),
                Err(e) => {
                    let _ = (
                        lt::destroy_matrix_layout(a),
                        lt::destroy_matrix_layout(b),
                        lt::destroy_matrix_layout(c),
                        lt::destroy_matmul_desc(desc),
                    );
                    Err(format!("no cuBLASLt algorithm for {key:?}: {e:?}"))
                }
            }
        }
    }

    /// Whether an epilogue problem (`key`, alignments aside) is known to have no algorithm.
    pub(super) fn epilogue_unsupported(&self, key: &Key) -> bool {
        crate::lock(&self.no_epilogue).contains(&Key { align: [0; 3], ..*key })
    }

    /// `C = op(A)·op(B) + beta·C` (column-major, in place in C), with `key.epilogue` (its
    /// bias or bias-gradient vector at `bias`), if cuBLASLt has an algorithm for the shape;
    /// `false` when it has none (the caller runs plain cuBLAS, or the unfused kernels).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(&self, key: Key, a: u64, b: u64, beta: f32, c: u64, bias: u64, stream: sys::cudaStream_t) -> bool {
        let key = Key { align: [alignment(a), alignment(b), alignment(c)], ..key };
        let mut plans = crate::lock(&self.plans);
        let entry = plans.entry(key).or_insert_with(|| {
            let what = if key.epilogue == Epilogue::None { "this shape runs on plain cuBLAS" } else { "the unfused kernels run instead" };
            self.plan(&key).map_err(|e| eprintln!("CUDA backend: {e}; {what}")).ok()
        });
        let Some(p) = entry.as_ref() else {
            if key.epilogue != Epilogue::None {
                crate::lock(&self.no_epilogue).insert(Key { align: [0; 3], ..key });
            }
            return false;
        };
        if key.epilogue != Epilogue::None {
            // SAFETY: a live descriptor (used under the plans' lock); the value is a device address.
            ck(
                unsafe {
                    lt::set_matmul_desc_attribute(
                        p.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bias as *const u64 as *const c_void,
                        8,
                    )
                },
                "cublasLtMatmulDescSetAttribute (bias pointer)",
            );
        }
        let alpha = 1.0f32;
        // SAFETY: the plan's layouts describe these matrices (the trait's conventions); C is
        // read and written in place with the same layout, as cuBLASLt allows.
        ck(
            unsafe {
                lt::matmul(
                    self.handle,
                    p.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    a as *const c_void,
                    p.a,
                    b as *const c_void,
                    p.b,
                    c as *const c_void,
                    p.c,
                    c as *mut c_void,
                    p.c,
                    &p.algo,
                    self.workspace as *mut c_void,
                    WORKSPACE_BYTES,
                    stream,
                )
            },
            "cublasLtMatmul",
        );
        true
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn alignment_of_device_addresses() {
        assert_eq!(super::alignment(0x7f00_0000_0000), 256);
        assert_eq!(super::alignment(0x7f00_0000_0100 + 4), 4);
        assert_eq!(super::alignment(0x7f00_0000_0000 + 3 * 64 * 4), 256);
        assert_eq!(super::alignment(0x7f00_0000_0000 + 48 * 4), 64);
        assert_eq!(super::alignment(0), 256);
    }
}
