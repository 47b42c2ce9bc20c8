//! Numeric kernels: plain functions over `f32` slices, forward and backward,
//! parallel with rayon where it pays. No model knowledge lives here.
//!
//! Conventions: row-major; weights in PyTorch's `[out, in]` layout; backward functions
//! *accumulate* (`+=`) into their gradient outputs, so callers zero them first — except
//! where documented: the attention backward overwrites dq/dk/dv, and a linear layer's
//! parameter gradients follow [`linear::Grads`].

pub mod activation;
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod fastmath;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
pub mod gemm_avx2;
#[cfg(target_arch = "x86_64")]
pub mod gemm_avx512;
#[cfg(target_arch = "x86_64")]
mod gemm_packed;
pub mod gradcheck;
pub mod layernorm;
pub mod linear;
pub mod rng;
pub mod simd;
pub mod softmax;

pub use attention::{
    attention_backward, attention_backward_rows, attention_backward_rows_split, attention_forward, merge_heads, split_heads, AttnShape,
    KeyPattern,
};
pub use gemm::{sgemm, Trans};
pub use rng::Rng;
