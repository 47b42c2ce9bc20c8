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

// ---- dropout masks on the device: the CPU's xoshiro256++ stream, bit for bit ------------
//
// `demovlp_kernels::Rng` is xoshiro256++, a sequential generator, not a counter-based one;
// but its state update is linear over GF(2) (256 bits), so jumping ahead by any number of
// draws is a 256 × 256 bit-matrix product. The device kernel (`dropout_xoshiro` in
// kernels/elementwise.cu) gives thread i the draws i·2^c … (i+1)·2^c − 1 (c =
// [`DROPOUT_CHUNK_LOG2`]): it jumps the given state ahead by i·2^c with the matrices
// T^(2^k) of [`jump_table`] (uploaded once when the device is opened), then draws its run as
// `Rng::uniform` does. The host then advances its generator by the mask's length
// ([`advance`]), so the next draw is the one the CPU would make. [`dropout_mask_by_threads`]
// is that kernel's algorithm on the host (the tests check it against
// `demovlp_kernels::dropout::dropout_mask`).

/// log2 of the draws per device thread of the dropout kernel.
pub const DROPOUT_CHUNK_LOG2: u32 = 12;

pub use demovlp_kernels::rng::{uniform_of, xoshiro_step};

/// `Rng::next_u64`: the output, then the update.
pub fn xoshiro_next(s: &mut [u64; 4]) -> u64 {
    let result = demovlp_kernels::rng::xoshiro_output(s);
    xoshiro_step(s);
    result
}

/// Matrix `k` of a jump table applied to `s`: the XOR of the columns of the set bits.
pub fn apply_jump(table: &[u64], k: usize, s: [u64; 4]) -> [u64; 4] {
    let m = &table[k * 256 * 4..(k + 1) * 256 * 4];
    let mut r = [0u64; 4];
    for b in 0..256 {
        if (s[b >> 6] >> (b & 63)) & 1 == 1 {
            for w in 0..4 {
                r[w] ^= m[b * 4 + w];
            }
        }
    }
    r
}

/// The columns of T^(2^k), k = 0..64, T the state update: `[64][256 bits][4 words]`
/// (column b = the image of the state with only bit b set). 512 KiB, computed once.
pub fn jump_table() -> &'static [u64] {
    static TABLE: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![0u64; 64 * 256 * 4];
        for b in 0..256 {
            let mut s = [0u64; 4];
            s[b >> 6] = 1 << (b & 63);
            xoshiro_step(&mut s);
            t[b * 4..b * 4 + 4].copy_from_slice(&s);
        }
        // T^(2^(k+1)) = T^(2^k) · T^(2^k), column by column.
        for k in 0..63 {
            for b in 0..256 {
                let col = [t[(k * 256 + b) * 4], t[(k * 256 + b) * 4 + 1], t[(k * 256 + b) * 4 + 2], t[(k * 256 + b) * 4 + 3]];
                let sq = apply_jump(&t, k, col);
                t[((k + 1) * 256 + b) * 4..((k + 1) * 256 + b) * 4 + 4].copy_from_slice(&sq);
            }
        }
        t
    })
}

/// The state after `n` more draws.
pub fn advance(mut s: [u64; 4], n: u64) -> [u64; 4] {
    let table = jump_table();
    for k in 0..64 {
        if (n >> k) & 1 == 1 {
            s = apply_jump(table, k, s);
        }
    }
    s
}

/// Device threads of a dropout mask of `n` values.
pub fn dropout_threads(n: usize) -> usize {
    n.div_ceil(1 << DROPOUT_CHUNK_LOG2)
}

/// The device kernel's algorithm on the host: thread by thread, each jumping from `s` to
/// its first draw, then drawing 0 (probability `p`) or 1/(1−p) as `dropout_mask` does.
pub fn dropout_mask_by_threads(s: [u64; 4], p: f32, out: &mut [f32]) {
    let keep = 1.0 / (1.0 - p);
    let table = jump_table();
    let (chunk, n) = (1usize << DROPOUT_CHUNK_LOG2, out.len());
    for i in 0..dropout_threads(n) {
        let mut st = s;
        let mut j = 0;
        while (i >> j) != 0 {
            if (i >> j) & 1 == 1 {
                st = apply_jump(table, j + DROPOUT_CHUNK_LOG2 as usize, st);
            }
            j += 1;
        }
        for o in out[i * chunk..((i + 1) * chunk).min(n)].iter_mut() {
            *o = if uniform_of(xoshiro_next(&mut st)) < p { 0.0 } else { keep };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use demovlp_kernels::Rng;

    #[test]
    fn xoshiro_port_is_rng() {
        let mut r = Rng::new(9);
        let mut s = r.state();
        for _ in 0..100 {
            assert_eq!(xoshiro_next(&mut s), r.next_u64());
        }
        let mut r2 = Rng::from_state(s);
        assert_eq!(uniform_of(xoshiro_next(&mut s)), r2.uniform());
    }

    #[test]
    fn jumps_match_stepping() {
        let s0 = Rng::new(77).state();
        for n in [0u64, 1, 2, 3, 5, 64, 1000, 4096, 4097, 12_345] {
            let mut s = s0;
            for _ in 0..n {
                xoshiro_step(&mut s);
            }
            assert_eq!(advance(s0, n), s, "n = {n}");
        }
        // Composition: 2^20 = 2^19 + 2^19.
        assert_eq!(advance(advance(s0, 1 << 19), 1 << 19), advance(s0, 1 << 20));
    }

    #[test]
    fn the_device_algorithm_draws_the_cpu_mask_bit_for_bit() {
        for (seed, n, p) in [(3u64, 999usize, 0.1f32), (4, 3 * 4096 + 17, 0.1), (5, 2 * 4096, 0.5), (6, 4096 * 9 + 1, 0.0)] {
            let mut r = Rng::new(seed);
            let s = r.state();
            let mut want = vec![0f32; n];
            demovlp_kernels::dropout::dropout_mask(&mut r, p, &mut want);
            let mut got = vec![0f32; n];
            dropout_mask_by_threads(s, p, &mut got);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}, n {n}");
            // The host generator lands where the CPU's is after the mask.
            assert_eq!(advance(s, n as u64), r.state());
        }
    }
}
