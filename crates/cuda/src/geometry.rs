//! Launch geometry of the CUDA kernels whose grids, blocks or shared memory depend on the
//! problem's shape, as pure functions (the backend launches exactly these), and the
//! device limits they must respect — checked at the published model's shapes on any machine.

/// One launch: grid, block, and shared memory (static, as declared in the kernel, and
/// dynamic, passed at launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub dynamic_shared: u32,
    pub static_shared: u32,
}

/// Limits of every GPU the backend targets (compute capability 8.0 and up): grid y/z,
/// threads per block, and shared memory per block without an opt-in attribute (the
/// backend sets none).
pub const MAX_GRID: (u64, u64, u64) = ((1 << 31) - 1, 65_535, 65_535);
pub const MAX_BLOCK: (u32, u32, u32) = (1024, 1024, 64);
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub const MAX_SHARED_PER_BLOCK: u32 = 48 << 10;

impl Launch {
    /// `Err` naming the limit a launch exceeds (or an empty grid or block).
    pub fn check(&self, kernel: &str) -> Result<(), String> {
        let (g, b) = (self.grid, self.block);
        let err = |what: String| {
            Err(format!("{kernel}: {what} (grid {g:?}, block {b:?}, shared {} + {} B)", self.static_shared, self.dynamic_shared))
        };
        if [g.0, g.1, g.2, b.0, b.1, b.2].contains(&0) {
            return err("an empty grid or block".into());
        }
        if g.0 as u64 > MAX_GRID.0 || g.1 as u64 > MAX_GRID.1 || g.2 as u64 > MAX_GRID.2 {
            return err(format!("grid over {MAX_GRID:?}"));
        }
        if b.0 > MAX_BLOCK.0 || b.1 > MAX_BLOCK.1 || b.2 > MAX_BLOCK.2 || b.0 * b.1 * b.2 > MAX_THREADS_PER_BLOCK {
            return err(format!("block over {MAX_BLOCK:?} or {MAX_THREADS_PER_BLOCK} threads"));
        }
        if self.static_shared + self.dynamic_shared > MAX_SHARED_PER_BLOCK {
            return err(format!("shared memory over {MAX_SHARED_PER_BLOCK} B"));
        }
        Ok(())
    }
}

/// Threads per block of the elementwise (grid-stride) kernels, and their most blocks.
pub const ELEMENTWISE_THREADS: u32 = 256;
pub const ELEMENTWISE_MAX_BLOCKS: usize = 8192;

/// Blocks of 256 threads for `n` elements (grid-stride loops cover the rest).
pub fn elementwise(n: usize) -> Launch {
    Launch {
        grid: (n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, ELEMENTWISE_MAX_BLOCKS) as u32, 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
        dynamic_shared: 0,
        static_shared: 0,
    }
}

/// The attention kernels' block size (`THREADS` in attention.cu).
pub const ATTENTION_THREADS: u32 = 128;

/// `attention_forward`: one block per (query row, head, clip); the row's probabilities in
/// dynamic shared memory (`seq` floats), the reduction scratch static.
pub fn attention_forward(batch: usize, heads: usize, seq: usize) -> Launch {
    Launch {
        grid: (seq as u32, heads as u32, batch as u32),
        block: (ATTENTION_THREADS, 1, 1),
        dynamic_shared: (seq * 4) as u32,
        static_shared: ATTENTION_THREADS * 4,
    }
}

/// `attention_backward_rows_ds`: one block per (query row, head, clip).
pub fn attention_backward_ds(batch: usize, heads: usize, seq: usize) -> Launch {
    Launch { dynamic_shared: 0, ..attention_forward(batch, heads, seq) }
}

/// `attention_backward_rows_dkv`: one block per (key, head, clip), a thread per column.
pub fn attention_backward_dkv(batch: usize, heads: usize, seq: usize) -> Launch {
    Launch { grid: (seq as u32, heads as u32, batch as u32), block: (64, 1, 1), dynamic_shared: 0, static_shared: 0 }
}

/// LayerNorm forward and the backward's dx: one block of 256 per row (f64 reduction scratch).
pub fn layernorm_rows(rows: usize) -> Launch {
    Launch { grid: (rows as u32, 1, 1), block: (256, 1, 1), dynamic_shared: 0, static_shared: 256 * 8 }
}

// ---- two-pass column reductions (bias and LayerNorm-parameter gradients) ----------------
//
// Sums over rows of a `[rows, m]` matrix, deterministic and spread over many blocks: pass 1
// (`col_sums_partial`, `layernorm_dwdb_partial`) gives each block 32 columns of one chunk of
// rows; its 8 lanes of threads per column take the chunk's rows lane, lane + 8, ...; the
// lanes' sums are added in lane order into `partial[chunk, column]`. Pass 2
// (`col_sums_finish`) adds the chunks in order into the accumulator. [`column_sums`] is
// the same arithmetic on the host.

/// Columns per block and row lanes per column of pass 1.
pub const COL_WIDTH: usize = 32;
pub const COL_LANES: usize = 8;

/// Rows per chunk and chunks of a reduction over `rows` rows (at most 1024 chunks).
pub fn col_chunks(rows: usize) -> (usize, usize) {
    let chunk = 64.max(rows.div_ceil(1024));
    (chunk, rows.div_ceil(chunk).max(1))
}

/// Pass 1's launch for `rows × m`.
pub fn col_partial(rows: usize, m: usize) -> Launch {
    let (_, chunks) = col_chunks(rows);
    Launch {
        grid: (m.div_ceil(COL_WIDTH).max(1) as u32, chunks as u32, 1),
        block: (COL_WIDTH as u32, COL_LANES as u32, 1),
        dynamic_shared: 0,
        static_shared: (COL_LANES * (COL_WIDTH + 1) * 4) as u32,
    }
}

/// The two passes on the host: `acc[c] += Σ_rows x[r, c]` in the device's order, with the
/// per-element value `term(r, c)` (`x[r, c]` for a bias gradient, `dy·x̂` for LayerNorm's dw).
pub fn column_sums(rows: usize, m: usize, term: impl Fn(usize, usize) -> f32, acc: &mut [f32]) {
    let (chunk, chunks) = col_chunks(rows);
    let mut partial = vec![0f32; chunks * m];
    for c in 0..chunks {
        let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(rows));
        for col in 0..m {
            let mut lanes = [0f32; COL_LANES];
            for (lane, s) in lanes.iter_mut().enumerate() {
                let mut r = r0 + lane;
                while r < r1 {
                    *s += term(r, col);
                    r += COL_LANES;
                }
            }
            let mut t = lanes[0];
            for s in &lanes[1..] {
                t += s;
            }
            partial[c * m + col] = t;
        }
    }
    for col in 0..m {
        let mut s = 0f32;
        for c in 0..chunks {
            s += partial[c * m + col];
        }
        acc[col] += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published shapes: training batch 32 (fine-tuning, 8 × 30 regions, text 100) and
    /// 128 (pre-training, 1 × 30), evaluation batches of 256, texts up to the 512 positions
    /// of the text tower, 12 heads, width 768, MLP 3072, the 30 522-row word table.
    #[test]
    fn every_launch_at_the_published_shapes_is_within_the_device_limits() {
        let mut checked = 0;
        for (batch, seq) in [(32, 1 + 8 * 30), (32, 100), (128, 1 + 30), (128, 100), (256, 1 + 8 * 30), (256, 512), (32, 1 + 64 * 30)] {
            for (k, l) in [
                ("attention_forward", attention_forward(batch, 12, seq)),
                ("attention_backward_rows_ds", attention_backward_ds(batch, 12, seq)),
                ("attention_backward_rows_dkv", attention_backward_dkv(batch, 12, seq)),
                ("layernorm rows", layernorm_rows(batch * seq)),
                ("col_sums_partial", col_partial(batch * seq, 3072)),
                ("col_sums_partial (768)", col_partial(batch * seq, 768)),
                ("elementwise", elementwise(batch * seq * 3072)),
                ("word table", elementwise(30_522 * 768)),
            ] {
                l.check(k).unwrap_or_else(|e| panic!("B {batch}, seq {seq}: {e}"));
                checked += 1;
            }
        }
        assert_eq!(checked, 7 * 8);
        // What the limits catch: a 16k-token attention row overflows the shared memory, a
        // batch over 65 535 the grid's z.
        assert!(attention_forward(1, 12, 16_384).check("attention_forward").unwrap_err().contains("shared memory"));
        assert!(attention_forward(70_000, 12, 10).check("attention_forward").unwrap_err().contains("grid"));
        assert!(Launch { block: (1024, 2, 1), ..elementwise(10) }.check("x").is_err());
    }

    /// The block sizes and tiles here are the kernels' own (`#define`s of the CUDA sources).
    #[test]
    fn geometry_constants_are_the_kernel_sources() {
        let define = |module: &str, name: &str| -> u32 {
            let src = crate::SOURCES.iter().find(|(m, _)| *m == module).unwrap().1;
            let line = src.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap_or_else(|| panic!("{module}: no {name}"));
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        assert_eq!(define("attention", "THREADS"), ATTENTION_THREADS);
        assert_eq!(define("norm", "THREADS"), layernorm_rows(1).block.0);
        assert_eq!(define("elementwise", "COL_WIDTH") as usize, COL_WIDTH);
        assert_eq!(define("elementwise", "COL_LANES") as usize, COL_LANES);
        // layernorm_dwdb_partial spells the same tile out: [8][33].
        let norm = crate::SOURCES.iter().find(|(m, _)| *m == "norm").unwrap().1;
        assert!(norm.contains(&format!("shw[{COL_LANES}][{}]", COL_WIDTH + 1)) && norm.contains(&format!("r += {COL_LANES})")));
        assert_eq!(layernorm_rows(1).static_shared, 256 * 8, "norm.cu: __shared__ double sh[THREADS]");
    }

    #[test]
    fn the_reductions_spread_over_many_blocks() {
        // 7712 rows (32 clips of 241 tokens) × 768: 121 chunks × 24 column blocks.
        assert_eq!(col_chunks(7712), (64, 121));
        assert_eq!(col_partial(7712, 768).grid, (24, 121, 1));
        assert_eq!(col_chunks(1), (64, 1));
        assert_eq!(col_chunks(0).1, 1);
        let (chunk, chunks) = col_chunks(10_000_000);
        assert!(chunks <= 1024 && chunk * chunks >= 10_000_000);
    }

    #[test]
    fn two_pass_column_sums_are_the_cpus_at_7712_by_768() {
        // The device's order of additions against the CPU kernels' (rows in order).
        let (rows, m) = (7712, 768);
        let mut rng = demovlp_kernels::Rng::new(5);
        let x: Vec<f32> = (0..rows * m).map(|_| rng.normal()).collect();
        let mut got = vec![0.5f32; m];
        column_sums(rows, m, |r, c| x[r * m + c], &mut got);
        let mut want = vec![0.5f32; m];
        for row in x.chunks_exact(m) {
            want.iter_mut().zip(row).for_each(|(a, v)| *a += v); // the CPU backend's sum_rows_into
        }
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for c in 0..m {
            assert!((got[c] - want[c]).abs() <= 1e-4 * scale, "column {c}: {} vs {} (scale {scale})", got[c], want[c]);
        }
        // Odd sizes: rows not a multiple of the lanes or the chunk, columns not of 32.
        let (rows, m) = (131, 45);
        let mut got = vec![0f32; m];
        column_sums(rows, m, |r, c| (r * m + c) as f32, &mut got);
        for c in 0..m {
            assert_eq!(got[c], (0..rows).map(|r| (r * m + c) as f32).sum::<f32>(), "column {c}");
        }
    }
}
