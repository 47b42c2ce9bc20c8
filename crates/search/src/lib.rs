//! demovlp-search: search your own video collection with a trained DemoVLP model.
//!
//! - [`store`]: the index directory (segments of memory-mapped embeddings, boxes, masks).
//! - [`build`]: `demovlp index` — embed a collection, resumable, appendable, sharded, merged.
//! - [`captions`]: clip captions for display, from the annotation files the index was built from.
//! - [`ann`]: global top-N candidates (exact below a threshold, a graph index above).
//! - [`codes`]: the region codebook and the region-aware first stage built on it.
//! - [`search`]: query embedding, candidates, exact global + region-word re-rank.
//! - [`quality`]: agreement of search with exhaustive scoring.
//! - [`verify`]: `demovlp verify` — every file against its recorded checksum.
//! - [`explain`]: per word the regions it attends to, per region its best word, and an SVG.
//! - [`synth`], [`bench`]: a synthetic index and `demovlp bench search` over it.
//! - [`bench_model`]: `demovlp bench search` on a collection a trained model embedded.

pub mod ann;
pub mod bench;
pub mod bench_model;
pub mod build;
pub mod captions;
pub mod cascade;
pub mod codes;
pub mod explain;
pub mod quality;
pub mod search;
pub mod store;
pub mod synth;
pub mod text;
pub mod verify;
