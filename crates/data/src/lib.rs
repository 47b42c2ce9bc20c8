//! demovlp-data: from files on disk to model-ready batches.
//!
//! - [`regions`]: clip → `[k, R, 2054]` region tokens + mask (SPEC §3), the
//!   [`FeatureSource`] trait and the `.npz` tree source.
//! - [`pack`]: the packed, memory-mapped feature store (same trait).
//! - [`annotations`]: per-dataset annotation readers → [`Sample`]s.
//! - [`tokenizer`]: uncased WordPiece, padded/truncated (SPEC §4).
//! - [`loader`]: multi-threaded prefetching batches, deterministic given a seed.

pub mod annotations;
pub mod bench;
pub mod loader;
pub mod pack;
pub mod regions;
pub mod tokenizer;

pub use annotations::Sample;
pub use loader::{Batch, DatasetSpec, Loader, LoaderConfig};
pub use pack::PackedStore;
pub use regions::{select_clip, ClipInput, FeatureSource, FrameChoice, NpzTree, TOKEN_DIM};
pub use tokenizer::TextTokenizer;
