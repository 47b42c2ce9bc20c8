//! What a training run is given and gives back, apart from the loop itself
//! ([`crate::trainer`]): the loop's settings and options, the result, a data-parallel
//! rank's place, the parameters' hash, and the trainer state's start and epoch-end
//! book-keeping (deterministic epoch seeds, best value, patience).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use demovlp_data::batches::{derive_seed, epoch_seed_rng, Batch, LoaderConfig};
use demovlp_kernels::rng::Rng;
use demovlp_model::{Backend, BatchRef, Params};

use crate::checkpoint::TrainerState;
use crate::config::OptimConfig;
use crate::dist::Collective;

/// What the loop needs of a run's config, whatever the task.
#[derive(Clone, Debug)]
pub struct LoopSettings {
    pub name: String,
    pub seed: u64,
    pub output_dir: PathBuf,
    /// The run's config as TOML (saved beside the checkpoints and inside them).
    pub config_text: String,
    pub epochs: usize,
    pub max_steps: Option<u64>,
    pub log_every: u64,
    /// Also write the latest checkpoint every this many steps (0: at epoch ends only).
    pub checkpoint_every: u64,
    pub accumulate_steps: usize,
    pub early_stopping_patience: Option<usize>,
    pub optim: OptimConfig,
    /// Batches: size, input shape, workers, `samples_per_epoch`, `skip_bad` (`train` and
    /// `seed` are set by the loop).
    pub loader: LoaderConfig,
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from `output_dir/checkpoint_latest.safetensors` (an error when there is none).
    pub resume: bool,
    /// Weights to start from (overrides the config's initial model).
    pub init: Option<PathBuf>,
    /// Start over in an output directory that holds a run (its files are deleted first).
    pub force: bool,
    /// No progress bars and no summary on stderr.
    pub quiet: bool,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a resumable checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
}

#[derive(Clone, Debug)]
pub struct RunResult<E = demovlp_retrieval::RetrievalMetrics> {
    pub output_dir: PathBuf,
    pub steps: u64,
    pub epochs_done: usize,
    pub seconds: f64,
    pub interrupted: bool,
    /// Every epoch ran, or early stopping ended the run (not `max_steps`, not a signal).
    pub finished: bool,
    pub best: Option<f64>,
    pub best_epoch: Option<usize>,
    /// The metric `best` refers to.
    pub monitor: String,
    pub last_metrics: Option<E>,
    pub latest: PathBuf,
    pub best_checkpoint: Option<PathBuf>,
    /// FNV-1a of the final parameters' bytes, groups in order (hex): equal on every rank of
    /// a data-parallel run.
    pub params_hash: String,
    pub skipped_samples: usize,
}

impl<E> RunResult<E> {
    /// The result of a run whose checkpoint says it already finished (nothing to do).
    pub(crate) fn already_finished(
        out: &Path,
        state: &TrainerState,
        monitor: String,
        latest: PathBuf,
        best_checkpoint: Option<PathBuf>,
        params_hash: String,
    ) -> Self {
        RunResult {
            output_dir: out.to_path_buf(),
            steps: state.step,
            epochs_done: state.epoch.saturating_sub(1),
            seconds: 0.0,
            interrupted: false,
            finished: true,
            best: state.best,
            best_epoch: state.best_epoch,
            monitor,
            last_metrics: None,
            latest,
            best_checkpoint,
            params_hash,
            skipped_samples: 0,
        }
    }
}

/// FNV-1a of the parameters' bytes, hex.
pub fn params_hash(data: &[f32]) -> String {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    format!("{:016x}", crate::dist::fnv1a(&bytes))
}

/// [`params_hash`] of several groups' parameters on a backend, as if their values were one
/// buffer (read back one group at a time).
pub fn params_hash_on<B: Backend>(be: &B, groups: &[&Params<B>]) -> String {
    use crate::dist::{fnv1a_continue, FNV1A_START};
    let mut h = FNV1A_START;
    for p in groups {
        be.read_host(B::view(&p.data), |d| {
            for x in d {
                h = fnv1a_continue(h, &x.to_le_bytes());
            }
        });
    }
    format!("{h:016x}")
}

/// This process's place in a data-parallel run.
pub struct Dist {
    /// The process group (rank, world size, the engine).
    pub coll: Box<dyn Collective>,
    /// Rank within its node (the GPU is `local_rank % device_count` on the CUDA path;
    /// recorded in the log on the CPU).
    pub local_rank: usize,
}

/// The text-dropout seed of part `part` of step `step` (retrieval steps of several parts).
pub fn part_dropout_seed(seed: u64, step: u64, part: usize) -> u64 {
    derive_seed(seed ^ 0xD80_0C7, step, part as u64)
}

/// The model's view of a batch.
pub fn batch_ref(b: &Batch) -> BatchRef<'_> {
    BatchRef {
        batch: b.batch,
        frames: b.frames,
        regions: b.regions,
        text_len: b.text_len,
        object: &b.object,
        object_mask: &b.object_mask,
        input_ids: &b.input_ids,
        attention_mask: &b.attention_mask,
    }
}

/// The state of a run with seed `seed` before its first step: epoch 1, whose seed is the
/// first draw of the run's epoch-seed generator (`demovlp_data::batches::epoch_seed(seed, 1)`;
/// [`end_epoch`] draws the next ones), and the text-dropout generator.
pub fn fresh_state(seed: u64) -> TrainerState {
    let mut rng = epoch_seed_rng(seed);
    let epoch_seed = rng.next_u64();
    TrainerState {
        epoch: 1,
        batch_in_epoch: 0,
        step: 0,
        epoch_seed,
        rng: rng.state(),
        dropout_rng: Rng::new(seed ^ 0xD80_0C7).state(),
        samples_seen: 0,
        best: None,
        best_epoch: None,
        epochs_since_best: 0,
        finished: false,
        parts_per_step: 1,
        epoch_loss_sum: 0.0,
        epoch_steps: 0,
    }
}

/// Book-keeping at the end of an epoch: best value, patience, next epoch's seed.
/// Returns (improved, early stop).
pub fn end_epoch(state: &mut TrainerState, value: f64, higher: bool, patience: Option<usize>, epochs: usize) -> (bool, bool) {
    let improved = value.is_finite() && state.best.is_none_or(|b| if higher { value > b } else { value < b });
    if improved {
        state.best = Some(value);
        state.best_epoch = Some(state.epoch);
        state.epochs_since_best = 0;
    } else {
        state.epochs_since_best += 1;
    }
    state.epoch += 1;
    state.batch_in_epoch = 0;
    state.epoch_loss_sum = 0.0;
    state.epoch_steps = 0;
    let mut rng = Rng::from_state(state.rng);
    state.epoch_seed = rng.next_u64();
    state.rng = rng.state();
    let stop = patience.is_some_and(|p| state.epochs_since_best >= p);
    state.finished = stop || state.epoch > epochs;
    (improved, stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_seeds_of_the_state_are_the_batch_pipelines() {
        // The checkpointed epoch seeds are demovlp_data::batches::epoch_seed(seed, epoch), so a
        // batch is a pure function of (seed, epoch, index) for the trainer too.
        let mut st = fresh_state(3);
        for epoch in 1..5 {
            assert_eq!((st.epoch, st.epoch_seed), (epoch, demovlp_data::batches::epoch_seed(3, epoch)));
            end_epoch(&mut st, 1.0, true, None, 10);
        }
    }

    #[test]
    fn best_value_patience_and_early_stop() {
        let mut st = TrainerState { batch_in_epoch: 7, rng: Rng::new(1).state(), epoch_loss_sum: 3.0, epoch_steps: 2, ..fresh_state(0) };
        // Recall (higher is better), patience 2, 10 epochs.
        let seq = [(10.0, true, false), (12.0, true, false), (11.0, false, false), (12.0, false, true)];
        let mut seeds = vec![];
        for (v, imp, stop) in seq {
            assert_eq!(end_epoch(&mut st, v, true, Some(2), 10), (imp, stop), "value {v}");
            seeds.push(st.epoch_seed);
        }
        assert_eq!((st.best, st.best_epoch, st.epoch, st.batch_in_epoch, st.finished), (Some(12.0), Some(2), 5, 0, true));
        assert_eq!((st.epoch_loss_sum, st.epoch_steps), (0.0, 0), "a new epoch starts its loss sum afresh");
        seeds.dedup();
        assert_eq!(seeds.len(), 4, "every epoch gets a fresh order");
        // Losses: lower is better; NaN never counts as an improvement; the last epoch finishes.
        st.best = None;
        st.finished = false;
        assert!(end_epoch(&mut st, 3.0, false, None, 6).0);
        assert!(!st.finished && !end_epoch(&mut st, f64::NAN, false, None, 6).0);
        assert!(st.finished && st.epoch == 7);
    }
}
