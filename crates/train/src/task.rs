//! What a training task is to the loop ([`crate::trainer`]): its model and named parameter
//! groups, how a micro-batch's gradients are computed (and, where the task has one, a fused
//! step that updates while it back-propagates), its dropout seeding, its validation and the
//! value that picks the best model, what its log lines and plots show. The loop owns the
//! rest, once, for every task: epochs and steps, `max_steps`, accumulation, data-parallel
//! gradient sums, signals, the NaN report, checkpoints, resume, best model and early
//! stopping, log, progress, summary.
//!
//! Retrieval ([`crate::retrieval_task`]) and video QA ([`crate::qa_task`]) implement it.

use std::path::Path;

use anyhow::Result;
use demovlp_data::batches::Batch;
use demovlp_model::backend::LateRead;
use demovlp_model::{AdamW, Backend, ModelConfig, Params};

use crate::checkpoint::TrainerState;

/// Where a micro-batch sits in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepAt {
    /// Epoch in progress (1-based).
    pub epoch: usize,
    /// Optimiser steps taken before this one.
    pub step: u64,
    /// The step's index in its epoch's plan.
    pub batch_in_epoch: usize,
    /// This micro-batch's part of the step, and parts per step (world × accumulate).
    pub part: usize,
    pub parts: usize,
}

/// A micro-batch's losses (host scalars): the total, and up to two named terms
/// ([`Task::LOSS_TERMS`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Losses {
    pub total: f32,
    pub terms: [f32; 2],
}

/// A micro-batch's losses while its step may still be running on the device:
/// [`PendingLosses::read`] waits for them (the loop reads a step's after the next step is
/// queued, so the device never waits for the host between steps).
#[derive(Debug)]
pub struct PendingLosses {
    read: LateRead,
    /// The values read back, as [`Losses`].
    decode: fn(&[f32]) -> Losses,
}

impl PendingLosses {
    /// Losses still on the device: `read`'s values, turned into [`Losses`] by `decode`.
    pub fn late(read: LateRead, decode: fn(&[f32]) -> Losses) -> PendingLosses {
        PendingLosses { read, decode }
    }

    /// Losses already on the host.
    pub fn ready(l: Losses) -> PendingLosses {
        let decode = |v: &[f32]| Losses { total: v[0], terms: [v[1], v[2]] };
        PendingLosses { read: LateRead::ready(vec![l.total, l.terms[0], l.terms[1]]), decode }
    }

    /// The losses (waits for the device when they are not on the host yet).
    pub fn read(self) -> Losses {
        (self.decode)(&self.read.wait())
    }
}

/// How the monitored value is named and compared.
#[derive(Clone, Debug, PartialEq)]
pub struct Monitor {
    pub name: String,
    pub higher_is_better: bool,
}

/// One training task over the backend `B`.
pub trait Task<B: Backend> {
    /// The model trained (`Model<B>`, `QaModel<B>`).
    type Model;
    /// What validation measures.
    type Eval: Clone;
    /// The task's name in checkpoints (`retrieval`, `qa`).
    const KIND: &'static str;
    /// Names of the loss terms logged beside the total (`loss_global`, `loss_local`).
    const LOSS_TERMS: &'static [&'static str];
    /// Files or folders of its own the task writes into the output directory (a fresh run
    /// refuses a directory holding one, like a checkpoint).
    const OUTPUTS: &'static [&'static str];

    /// The model's parameter groups, each with its own AdamW, in update order.
    fn groups(m: &Self::Model) -> Vec<(&'static str, &Params<B>)>;
    fn groups_mut(m: &mut Self::Model) -> Vec<(&'static str, &mut Params<B>)>;
    /// The model's sizes and what else rebuilding it needs (checkpoints, other ranks).
    fn describe(m: &Self::Model) -> (ModelConfig, serde_json::Value);
    /// A model of those sizes (values to be filled in) on `be`.
    fn build(&self, be: &B, config: ModelConfig, extra: &serde_json::Value) -> Result<Self::Model>;
    /// The starting model of a fresh run, on `be`.
    fn init(&mut self, be: &B) -> Result<Self::Model>;

    /// Before the first step of this process: dropout generators as `state` left them.
    fn start(&mut self, _m: &mut Self::Model, _state: &TrainerState) {}
    /// Before a training micro-batch: dropout as the task draws it at `at` (`state` is the
    /// run's, with the dropout generator of single-part steps).
    fn set_dropout(&mut self, m: &mut Self::Model, at: StepAt, state: &TrainerState);
    /// The dropout generator state a checkpoint keeps (single-part steps that continue one
    /// generator), or None when the task derives every step's draws from the seed.
    fn dropout_state(&self, m: &Self::Model) -> Option<[u64; 4]>;
    /// Gradients of one micro-batch into the groups' gradient buffers (overwritten); the
    /// losses are read when the loop asks ([`PendingLosses::read`]): nothing waits for the
    /// device here.
    fn forward_backward(&mut self, m: &mut Self::Model, b: &Batch) -> Result<PendingLosses>;
    /// A whole step of one micro-batch with AdamW fused into the backward pass (the groups'
    /// optimisers, learning rates set), when the task has one. Its losses are read later, so
    /// the update is applied whatever they are: after a non-finite loss the loop stops
    /// before the parameters are saved or used.
    fn fused_step(&mut self, _m: &mut Self::Model, _b: &Batch, _opts: &mut [AdamW<B>]) -> Option<PendingLosses> {
        None
    }

    /// End-of-epoch validation (None without a validation set).
    fn validate(&mut self, m: &mut Self::Model) -> Result<Option<Self::Eval>>;
    /// The monitored value's name and direction.
    fn monitor(&self) -> Monitor;
    /// The monitored value of an epoch.
    fn monitored(&self, e: Option<&Self::Eval>, train_loss: f64, epoch: usize) -> f64;
    /// The log lines of an epoch's end (`line` holds the loop's fields: kind, epoch, step,
    /// train_loss, lr, seconds, best_epoch).
    fn epoch_lines(&self, line: serde_json::Value, e: Option<&Self::Eval>) -> Vec<serde_json::Value>;
    /// Called when an epoch's value is the best so far (after the best checkpoint is written):
    /// a task may also export the model in its own format.
    fn on_best(&self, _be: &B, _m: &Self::Model, _out: &Path) -> Result<()> {
        Ok(())
    }
    /// Plots and other files drawn from the log at the end of the run.
    fn write_plots(&self, out: &Path, name: &str) -> Result<()>;
    /// Lines of the summary table about the last evaluation.
    fn summary(&self, _e: &Self::Eval) -> String {
        String::new()
    }
}
