//! demovlp-data: from files on disk to model-ready batches.
//!
//! - [`regions`]: clip → `[k, R, 2054]` region tokens + mask (SPEC §3), the
//!   [`FeatureSource`] trait and the `.npz` tree source.
//! - [`pack`]: the packed, memory-mapped feature store (same trait).
//! - [`annotations`]: per-dataset annotation readers → [`Sample`]s.
//! - [`tokenizer`]: uncased WordPiece, padded/truncated (SPEC §4).
//! - [`batches`]: the one batch pipeline — epoch plans, seeds, batch assembly (and the
//!   video-only assembler evaluation uses), prefetching [`Loader`]; every batch a pure
//!   function of (seed, epoch, batch index).

pub mod annotations;
pub mod batches;
pub mod bench;
pub mod pack;
pub mod regions;
pub mod tokenizer;

pub use annotations::Sample;
pub use batches::{assemble_videos, Batch, Dataset, InputShape, Loader, LoaderConfig, VideoBatch};
pub use pack::PackedStore;
pub use regions::{select_clip, ClipInput, FeatureSource, FrameChoice, NpzTree, TOKEN_DIM};
pub use tokenizer::TextTokenizer;

/// Seconds between the plain progress lines long commands print when stderr is not a
/// terminal: 5, or `DEMOVLP_PROGRESS_SECS`.
pub fn plain_progress_interval() -> f64 {
    std::env::var("DEMOVLP_PROGRESS_SECS").ok().and_then(|v| v.parse::<f64>().ok()).filter(|v| *v >= 0.0).unwrap_or(5.0)
}
