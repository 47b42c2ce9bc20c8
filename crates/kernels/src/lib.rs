//! Numeric kernels: plain functions over `f32` slices, forward and backward,
//! parallel with rayon where it pays. No model knowledge lives here.

pub mod gemm;
pub mod rng;

pub use gemm::{sgemm, Trans};
