//! The single-batch steps of the training loop: a step queued without waiting for its
//! losses, the losses read one step later (NaN report, accounting, log line, periodic
//! checkpoint), and the accounting of a step of several parts.

use anyhow::Result;
use demovlp_data::batches::Batch;
use demovlp_model::Backend;
use serde_json::json;
use std::time::Instant;

use super::Trainer;
use crate::schedule::learning_rate;
use crate::task::{Losses, PendingLosses, Task};

impl<B: Backend, T: Task<B>> Trainer<'_, B, T> {
    /// Queues one optimiser step on one batch (of an epoch of `planned` batches): the task's
    /// fused step, or its gradients and then the groups' AdamW steps. Its losses are not
    /// read here (see [`Trainer::run_epoch`]).
    pub(super) fn queue_step(&mut self, batch: &Batch, planned: usize) -> Result<Queued> {
        let lr = learning_rate(&self.s.optim, self.state.epoch, self.state.step, self.total_steps);
        for o in &mut self.opt {
            o.lr = lr;
        }
        let at = self.at(0);
        self.task.set_dropout(&mut self.model, at, &self.state);
        let losses = match self.task.fused_step(&mut self.model, batch, &mut self.opt) {
            Some(l) => l,
            None => {
                let l = self.task.forward_backward(&mut self.model, batch)?;
                for ((_, p), o) in T::groups_mut(&mut self.model).into_iter().zip(&mut self.opt) {
                    o.step(p);
                }
                l
            }
        };
        let (batch_in_epoch, epoch) = (self.state.batch_in_epoch, self.state.epoch);
        self.state.step += 1;
        self.state.batch_in_epoch += 1;
        let info = StepInfo { step: self.state.step, epoch, lr, samples: batch.batch, last_of_epoch: self.state.batch_in_epoch == planned };
        let st = &self.state;
        let read_now = (self.s.checkpoint_every > 0 && st.step.is_multiple_of(self.s.checkpoint_every))
            || info.last_of_epoch
            || self.s.max_steps.is_some_and(|m| st.step >= m);
        Ok(Queued { losses, info, batch_in_epoch, clips: batch.clips.clone(), read_now })
    }

    /// Reads the losses of step `q` (when given): a non-finite loss is the run's error,
    /// else the step is accounted ([`Trainer::step_done`]).
    pub(super) fn read_losses(&mut self, q: Option<Queued>) -> Result<()> {
        let Some(q) = q else { return Ok(()) };
        let losses = q.losses.read();
        if !losses.total.is_finite() {
            let where_ = format!("batch {}", q.batch_in_epoch);
            return Err(self.nan_error(losses.total, q.info.step - 1, q.info.epoch, &where_, &q.clips.join(", ")));
        }
        self.step_done(&q.info, losses)
    }

    /// The error (and log line) of a non-finite loss at the step after `steps_before` steps.
    pub(super) fn nan_error(&mut self, loss: f32, steps_before: u64, epoch: usize, where_: &str, clips: &str) -> anyhow::Error {
        let last_good = if self.latest.exists() { self.latest.display().to_string() } else { "none (no checkpoint written yet)".into() };
        if let Err(e) =
            self.log.write(json!({"kind": "error", "step": steps_before, "loss": loss.to_string(), "where": where_, "clips": clips}))
        {
            return e;
        }
        self.pb.abandon();
        anyhow::anyhow!(
            "{}: loss is {loss} at step {} (epoch {epoch}, {where_}); batch clips: {clips}; last good checkpoint: {last_good}",
            self.s.name,
            steps_before + 1,
        )
    }

    /// The step just queued, its losses read at once when it must be (a checkpoint, the
    /// epoch's end or `max_steps` follows), else kept to be read after the next step.
    pub(super) fn read_now_or_keep(&mut self, q: Option<Queued>) -> Result<Option<Queued>> {
        match q {
            Some(q) if q.read_now => self.read_losses(Some(q)).map(|()| None),
            q => Ok(q),
        }
    }

    /// Step accounting of a step of several parts (its losses read in the step): counted,
    /// then [`Trainer::step_done`].
    pub(super) fn parts_step_done(&mut self, lr: f32, losses: Losses, samples: usize, planned: usize) -> Result<()> {
        self.state.step += 1;
        self.state.batch_in_epoch += 1;
        let info =
            StepInfo { step: self.state.step, epoch: self.state.epoch, lr, samples, last_of_epoch: self.state.batch_in_epoch == planned };
        self.step_done(&info, losses)
    }

    /// Step `info.step` (counted in `state.step` and `state.batch_in_epoch` when queued),
    /// once its losses are read: the epoch's and the log window's sums, log line, progress
    /// and periodic checkpoint (the parameters are those after this step: no later step
    /// is queued before a checkpoint step's losses are read).
    fn step_done(&mut self, info: &StepInfo, losses: Losses) -> Result<()> {
        let state = &mut self.state;
        state.samples_seen += info.samples as u64;
        state.epoch_loss_sum += losses.total as f64;
        state.epoch_steps += 1;
        let window = &mut self.window;
        window.0 += losses.total as f64;
        window.1 += 1;
        window.3 += info.samples;
        self.pb.set_position(info.step.min(self.total_steps));
        let lr = info.lr;
        if info.step.is_multiple_of(self.s.log_every.max(1)) || info.last_of_epoch {
            let secs = window.2.elapsed().as_secs_f64().max(1e-9);
            let sps = window.3 as f64 / secs;
            self.pb.set_message(format!("loss {:.4} lr {:.1e} {:.1} samples/s", window.0 / window.1 as f64, lr, sps));
            let mut line = json!({
                "kind": "step", "step": info.step, "epoch": info.epoch, "lr": lr, "loss": losses.total,
                "loss_avg": window.0 / window.1 as f64, "samples_per_s": sps, "elapsed_s": self.t0.elapsed().as_secs_f64(),
            });
            for (name, v) in T::LOSS_TERMS.iter().zip(losses.terms) {
                line[*name] = v.into();
            }
            self.log.write(line)?;
            *window = (0.0, 0, Instant::now(), 0);
        }
        // Without a terminal the bar draws nothing (logs of batch jobs): a plain line every
        // few seconds instead.
        if !self.opts.quiet && !self.tty && self.last_line.elapsed().as_secs_f64() >= demovlp_data::plain_progress_interval() {
            let elapsed = self.t0.elapsed().as_secs_f64();
            eprintln!(
                "{}{}: step {}/{} (epoch {}), lr {:.2e}, loss {:.4}, {:.0}s",
                self.prefix, self.s.name, info.step, self.total_steps, info.epoch, lr, losses.total, elapsed
            );
            self.last_line = Instant::now();
        }
        if self.s.checkpoint_every > 0 && info.step.is_multiple_of(self.s.checkpoint_every) {
            debug_assert_eq!(info.step, self.state.step, "a checkpoint step is read before the next step is queued");
            self.save(&self.latest)?;
        }
        Ok(())
    }
}

/// What the loop keeps of an optimiser step for when its losses are read.
pub(super) struct StepInfo {
    /// The step's number (1-based: `state.step` once it is counted) and epoch.
    step: u64,
    epoch: usize,
    lr: f32,
    samples: usize,
    /// The last step of its epoch's plan.
    last_of_epoch: bool,
}

/// A single-batch step queued, its losses not read yet.
pub(super) struct Queued {
    losses: PendingLosses,
    info: StepInfo,
    /// The batch's index in its epoch and its clips (for the NaN report).
    batch_in_epoch: usize,
    clips: Vec<String>,
    /// A checkpoint, the epoch's end or `max_steps` follows: read before the next step.
    read_now: bool,
}
