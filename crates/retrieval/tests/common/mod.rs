//! Test helpers: fixture loading and tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;

pub use demovlp_testutil::testdata;

/// Every tensor of a safetensors file as (shape, f32 values).
pub fn load(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let path = testdata(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let vals: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            safetensors::Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            d => panic!("{}: tensor {name} has unsupported dtype {d:?}", path.display()),
        };
        out.insert(name.to_string(), (view.shape().to_vec(), vals));
    }
    out
}

/// max |a − b| / max |b|.
pub fn rel_to_max(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Share of elements whose |a − b| exceeds `tol` × max |b|.
pub fn share_above(a: &[f32], b: &[f32], tol: f32) -> f64 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).filter(|(x, y)| (*x - *y).abs() > tol * scale).count() as f64 / a.len() as f64
}

/// Deterministic pseudo-random values (tests only).
pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = demovlp_kernels::rng::Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}
