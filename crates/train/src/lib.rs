//! Training, evaluation and the built-in demo: TOML configs, the training loop with
//! resumable checkpoints, the retrieval evaluation runner, logs and plots, and a
//! deterministic synthetic corpus that needs no downloads.

pub mod config;
pub mod schedule;
pub mod synthetic;

pub use config::TrainConfig;
