//! Host-side plans of the CUDA kernels: pure Rust (built without the `cuda` feature too),
//! so their logic is tested on any machine: the sizes and grids of the loss / score pair
//! kernels (`kernels/losses.cu`).

/// Values of the word × region cosine blocks made at once (256 MB).
pub const M_BUDGET: usize = 64 << 20;

/// Per-block scratch of the pair kernels (the layout of `Scratch` in losses.cu).
pub fn rwa_scratch_len(w: usize, n: usize, dim: usize) -> usize {
    4 * w * n + (w + n) * (dim + 6)
}

/// Blocks of a pair kernel for `pairs` pairs on a GPU with `sms` multiprocessors: two per
/// multiprocessor (one pair per block at a time, grid-stride), never more than the pairs.
pub fn pair_grid(pairs: usize, sms: usize) -> usize {
    pairs.clamp(1, 2 * sms.max(1))
}

/// Videos per chunk: as many as keep the chunk's cosine blocks `[nt·w, nvc·n]` within
/// [`M_BUDGET`], at least 1, at most `nv`.
pub fn videos_per_chunk(nt: usize, w: usize, n: usize, nv: usize) -> usize {
    (M_BUDGET / (nt * w * n).max(1)).clamp(1, nv.max(1))
}

/// log(1 + 1e-6) and log(1e-6) as the published code evaluates them (f32 logs), the
/// constants of the `align_loss` kernel's targets (crates/retrieval/src/loss.rs).
pub fn align_logs() -> (f32, f32) {
    ((1.0f32 + 1e-6f32).ln(), 1e-6f32.ln())
}
