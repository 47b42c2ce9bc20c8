//! The CUDA backend of demovlp's device seam ([`demovlp_model::backend::Backend`]).
//!
//! Everything GPU-specific sits behind the non-default cargo feature `cuda`, which builds on
//! any machine: `cudarc` opens `libcuda`, `libnvrtc` and `libcublas` at run time (no CUDA
//! toolkit and no `nvcc` at build time). The kernels are CUDA C sources in `kernels/*.cu`,
//! compiled by NVRTC at run time to a CUBIN for the detected GPU and cached on disk
//! (module `nvrtc`). Without the feature, or without a GPU, `open` / [`probe`] return an error that names
//! what is missing (never a panic).
//!
//! Status (the workspace README's GPU section): compiled and linted everywhere, the kernels
//! compiled by NVRTC for sm_80 and sm_90 in the tests, the loss and dropout kernels'
//! algorithms checked on the host against the CPU ([`host_port`], [`plan`]); **the backend
//! itself has never run on a GPU**.

/// The kernel sources: (module name, CUDA C source).
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../kernels/elementwise.cu")),
    ("norm", include_str!("../kernels/norm.cu")),
    ("attention", include_str!("../kernels/attention.cu")),
    ("tokens", include_str!("../kernels/tokens.cu")),
    ("heads", include_str!("../kernels/heads.cu")),
    ("gemm", include_str!("../kernels/gemm.cu")),
    ("losses", include_str!("../kernels/losses.cu")),
];

/// The `extern "C" __global__` kernel names of a source, in order.
pub fn kernel_names(source: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("__global__ void ") {
        rest = &rest[i + "__global__ void ".len()..];
        if let Some(end) = rest.find('(') {
            out.push(rest[..end].trim());
        }
    }
    out
}

/// GEMM precision of the CUDA backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// fp32 GEMMs with TF32 off: the parity mode.
    #[default]
    Fp32,
    /// bf16 GEMM inputs with fp32 accumulation and fp32 outputs: the speed mode.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?} (fp32 or bf16)")),
        }
    }
}

/// How to provide the CUDA libraries (part of every "missing library" message).
pub const LIBRARY_HINT: &str = "the NVIDIA driver provides libcuda.so.1; libnvrtc and libcublas/libcublasLt come from a CUDA \
toolkit or from the PyPI wheels (`pip install nvidia-cuda-nvrtc-cu12 nvidia-cublas-cu12`, or the -cu13 ones): put their \
`lib` folders (site-packages/nvidia/*/lib) on LD_LIBRARY_PATH";

pub mod host_port;
pub mod plan;

#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
pub mod libs;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub use backend::{CudaBackend, DevBuf, DevView, DevViewMut};

/// What [`probe`] found.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub memory_bytes: usize,
    /// Streaming multiprocessors (sizes the grids of the pair kernels).
    pub multiprocessors: usize,
}

/// Whether this build has the CUDA backend at all.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// The message of a build without the `cuda` feature.
pub const NOT_BUILT: &str = "this demovlp was built without CUDA support: rebuild with `cargo build --release --features cuda` \
(it builds without a CUDA toolkit; the libraries are opened at run time)";

/// Opens GPU `ordinal`: checks the libraries, the driver and the device, compiles (or loads
/// from the cache) the kernels. `Err` says what is missing.
#[cfg(feature = "cuda")]
pub fn open(ordinal: usize, precision: Precision) -> Result<CudaBackend, String> {
    CudaBackend::open(ordinal, precision)
}

/// Without the `cuda` feature: always [`NOT_BUILT`].
#[cfg(not(feature = "cuda"))]
pub fn probe(_ordinal: usize) -> Result<DeviceInfo, String> {
    Err(NOT_BUILT.to_string())
}

/// The device `ordinal`, without compiling kernels: libraries, driver, device count.
#[cfg(feature = "cuda")]
pub fn probe(ordinal: usize) -> Result<DeviceInfo, String> {
    libs::probe(ordinal)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_source_declares_kernels() {
        for (name, src) in super::SOURCES {
            assert!(!super::kernel_names(src).is_empty(), "{name}");
        }
        assert!(super::kernel_names(super::SOURCES[0].1).contains(&"adamw_update"));
    }
}
