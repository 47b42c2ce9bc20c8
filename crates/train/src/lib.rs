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
//! - [`task`]: what a training task is to the loop; [`retrieval_task`] and [`qa_task`]
//!   are the two tasks.
//! - [`trainer`]: the training loop, one for every task and backend; [`grad_sync`] its
//!   steps of several micro-batches; [`run_dir`] the output directory's guard; [`run_types`] its settings, result and state book-keeping;
//!   [`signals`] SIGINT / SIGTERM.
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
pub mod grad_sync;
pub mod mc;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plot;
pub mod qa;
pub mod qa_task;
pub mod qa_train;
pub mod retrieval_task;
pub mod run_dir;
pub mod run_types;
pub mod runlog;
pub mod schedule;
pub mod signals;
pub mod synthetic;
pub mod task;
pub mod text;
pub mod trainer;
pub mod weights;

pub use config::TrainConfig;
