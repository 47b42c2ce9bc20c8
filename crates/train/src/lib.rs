//! Training, evaluation and the built-in demo: TOML configs, the training loop with
//! resumable checkpoints, the retrieval evaluation runner, logs and plots, and a
//! deterministic synthetic corpus that needs no downloads.
//!
//! - [`config`]: the TOML run config, strict (unknown keys, missing paths rejected).
//! - [`schedule`]: the learning rate — the one place it is computed (the published step
//!   schedule, warm-up, cosine); the trainer asks it before every optimiser step.
//! - batches come from the data crate's one pipeline, `demovlp_data::batches`
//!   (deterministic, resumable epoch plans, batch assembly, prefetching).
//! - [`checkpoint`]: single-file, atomic, exactly-resumable checkpoints.
//! - [`trainer`]: the training loop.
//! - [`dist`]: data-parallel runs: the collective interface, its TCP engine, launch variables.
//! - [`runlog`]: the run's JSONL log, plots and summary table.
//! - [`weights`]: where a run's weights come from (config, checkpoint, model-crate formats).
//! - [`eval`]: the retrieval evaluation runner.
//! - [`synthetic`] + [`demo`]: the built-in demo.

pub mod annotations;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod demo_tasks;
pub mod dist;
pub mod eval;
pub mod mc;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plot;
pub mod qa;
pub mod qa_train;
pub mod runlog;
pub mod schedule;
pub mod synthetic;
pub mod text;
pub mod trainer;
pub mod weights;

pub use config::TrainConfig;
