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
//! compiled by NVRTC for sm_80 and sm_90 in the tests, the loss, dropout, LayerNorm and
//! attention kernels' algorithms checked on the host against the CPU ([`host_port`], [`plan`],
//! [`host_kernels`]), the launch geometry against the device limits ([`geometry`]), the
//! selftest's reporting under injected faults ([`selftest`]); **the backend itself has never
//! run on a GPU**.

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

/// Every kernel of [`SOURCES`]: the backend resolves them once, when the device is opened,
/// and launches them by index ([`kernel_index`], evaluated at compile time: a launch of a
/// kernel missing from this list does not build).
pub const KERNELS: &[&str] = &[
    "copy_2d",
    "gelu_forward",
    "gelu_forward_with_grad",
    "gelu_backward_in_place",
    "relu_forward",
    "relu_backward",
    "mul_in_place",
    "mul_into",
    "add_in_place",
    "scale",
    "add_to_rows",
    "col_sums_partial",
    "col_sums_finish",
    "adamw_update",
    "adamw_update_table_rows",
    "dropout_xoshiro",
    "layernorm_forward",
    "layernorm_backward_dx",
    "layernorm_dwdb_partial",
    "attention_forward",
    "attention_backward_rows_ds",
    "attention_backward_rows_dkv",
    "merge_heads",
    "embedding_forward",
    "embedding_backward",
    "embedding_backward_rows",
    "video_tokens_forward",
    "video_tokens_backward_regions",
    "video_tokens_backward_params",
    "set_rows",
    "to_bf16",
    "max_over_positions",
    "max_over_positions_backward",
    "weight_norm",
    "weight_norm_backward",
    "mul_broadcast",
    "mul_broadcast_backward",
    "softmax_rows",
    "softmax_rows_backward",
    "weighted_sum",
    "weighted_sum_backward_w",
    "weighted_sum_backward_o",
    "sgemm_tiled",
    "l2_rows",
    "l2_rows_backward",
    "global_loss_ce",
    "align_loss",
    "rwa_pair_forward",
    "rwa_pair_backward",
    "add_local_scores",
];

/// The index of kernel `name` in [`KERNELS`] (a `const fn`: panics at compile time when
/// used in a constant and the name is missing).
pub const fn kernel_index(name: &str) -> usize {
    let mut i = 0;
    while i < KERNELS.len() {
        let (a, b) = (KERNELS[i].as_bytes(), name.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("a kernel missing from KERNELS")
}

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

pub mod geometry;
pub mod host_kernels;
pub mod host_port;
pub mod plan;
pub mod selftest;
pub mod weights16;

/// Locks `m`, also when a panic poisoned it: a device error that panics while holding a lock
/// (GEMM plans, scratch, loss state) must fail its own call only, not every later one.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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

/// The CUDA libraries among the files mapped in a `/proc/PID/maps` text (libcuda, libnvrtc,
/// libcublas, libcublasLt, libnccl, libnvJitLink), each once, in order of appearance.
pub fn mapped_cuda_libraries(maps: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else { continue };
        let file = path.rsplit('/').next().unwrap_or(path);
        let cuda = ["libcuda.so", "libnvrtc", "libcublas", "libnccl", "libnvJitLink"].iter().any(|p| file.starts_with(p));
        if cuda && !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
    out
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

/// The number of CUDA devices this process sees (`Err` naming what is missing).
#[cfg(feature = "cuda")]
pub fn device_count() -> Result<usize, String> {
    libs::device_count()
}

/// Without the `cuda` feature: always [`NOT_BUILT`].
#[cfg(not(feature = "cuda"))]
pub fn device_count() -> Result<usize, String> {
    Err(NOT_BUILT.to_string())
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

    #[test]
    fn cuda_libraries_mapped_into_a_process() {
        let maps = "7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
7f01-7f02 r-xp 00001000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
7f02-7f03 r--p 00000000 08:01 2 /opt/py/nvidia/cublas/lib/libcublasLt.so.12
7f03-7f04 r--p 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libc.so.6
7f04-7f05 rw-p 00000000 00:00 0
7f05-7f06 r--p 00000000 08:01 4 /opt/py/nvidia/cuda_nvrtc/lib/libnvrtc.so.12";
        assert_eq!(
            super::mapped_cuda_libraries(maps),
            [
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
                "/opt/py/nvidia/cublas/lib/libcublasLt.so.12",
                "/opt/py/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
            ]
        );
    }

    #[test]
    fn the_kernel_table_is_every_kernel_of_the_sources_once() {
        let mut in_sources: Vec<&str> = super::SOURCES.iter().flat_map(|(_, s)| super::kernel_names(s)).collect();
        let mut table = super::KERNELS.to_vec();
        in_sources.sort_unstable();
        table.sort_unstable();
        let n = table.len();
        table.dedup();
        assert_eq!(table.len(), n, "a kernel listed twice");
        assert_eq!(table, in_sources);
        for (i, k) in super::KERNELS.iter().enumerate() {
            assert_eq!(super::kernel_index(k), i);
        }
    }
}
