//! The training loop, once for every task ([`Task`]) and every backend: epochs of optimiser
//! steps over interleaved datasets, `max_steps`, gradient accumulation and data-parallel
//! gradient sums ([`GradSync`]), validation after every epoch, best / latest checkpoints
//! ([`crate::checkpoint`]), early stopping, exact resume, SIGINT / SIGTERM and NaN
//! handling, the JSONL log, progress, plots and the summary table.
//!
//! **Steps of several micro-batches** (`accumulate_steps = N`, and data-parallel runs of W
//! processes): a step's global batch of `batch_size × W × N` samples (one dataset; the
//! datasets still alternate step by step) is cut into P = W·N contiguous parts of
//! `batch_size` (`demovlp_data::batches::part_range`); rank r takes parts r·N … r·N+N−1.
//! Each part is its own batch (for retrieval: its own contrastive batch, negatives from the
//! part only, as the published trainer), with its dropout drawn from (step, part) by the
//! task and its captions and frames from the sample's position in the global batch, so a
//! part is the same wherever it is computed. The step's gradient is
//! `(((0 + g_a) + g_b) + …) × (1 / parts)`: each rank adds its parts in order, rank 0 adds
//! the ranks' sums in rank order (the TCP engine), and the sum is scaled by the reciprocal
//! of the number of parts that had ≥ 2 samples (a part with fewer — the short last step of
//! an epoch, or samples skipped by `skip_bad_samples` — counts as the single-process
//! pipeline counts a short batch: not at all). Then one AdamW step per parameter group,
//! the same on every rank. So W ranks with N = 1 compute bit for bit what one process with
//! `accumulate_steps = W` computes; W ranks with N > 1 what one process with W·N does up to
//! float round-off (the sum is associated per rank first). With P = 1 the step is the
//! task's fused one (AdamW inside the backward pass) where it has one, else its
//! gradients followed by the groups' AdamW steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_data::batches::{Batch, Dataset, Loader, LoaderConfig};
use demovlp_model::{AdamW, AdamWSettings, Backend, Params};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::checkpoint::{self, CheckpointInfo, GroupRef, TrainerState, BEST, LATEST};
use crate::dist::Collective;
use crate::grad_sync::{GradSync, StepStats};
use crate::runlog::Log;
use crate::schedule::learning_rate;
use crate::task::{Losses, Monitor, StepAt, Task};
use crate::text::Tokenizer;

pub use crate::run_types::{
    batch_ref, end_epoch, fresh_state, params_hash, params_hash_on, part_dropout_seed, Dist, LoopSettings, RunOptions, RunResult,
};
pub use crate::signals::{install_ctrlc, stop_exit_code, stop_signal};

mod steps;

/// Train `task` as `settings` say, on the backend `be`, as one rank of a data-parallel run
/// (`dist`; None = a single process). Returns when all epochs ran, early stopping
/// triggered, `max_steps` was reached, or the stop flag was raised (then `interrupted`).
///
/// The ranks start from rank 0's weights, optimisers and state (broadcast), each computes
/// its parts of every step, gradients are summed across ranks before the AdamW steps, and
/// only rank 0 writes the output directory (checkpoints, log, plots, summary). A stop flag
/// raised on any rank stops every rank after the same step, rank 0 saving one resumable
/// checkpoint. Every rank validates (so none waits idle for rank 0), and rank 0's
/// monitored value decides best checkpoint and early stopping for all.
pub fn run<B: Backend, T: Task<B>>(
    be: &B,
    task: &mut T,
    settings: &LoopSettings,
    data: (Vec<Dataset>, Arc<Tokenizer>),
    opts: &RunOptions,
    mut dist: Option<Dist>,
) -> Result<RunResult<T::Eval>> {
    // An error on this rank is told to the others before it is returned (they stop with it
    // instead of finding a closed connection).
    let mut tr = match Trainer::open(be, task, settings, data, opts, &mut dist) {
        Ok(Opened::AlreadyFinished(r)) => return Ok(*r),
        Ok(Opened::Ready(t)) => t,
        Err(e) => return Err(tell(dist.as_mut().map(|d| &mut *d.coll), e)),
    };
    let epochs = (|| -> Result<()> {
        while tr.state.epoch <= settings.epochs {
            let Some(train_loss) = tr.run_epoch()? else { break };
            let eval = tr.validate()?;
            if tr.end_epoch(train_loss, eval)? {
                break;
            }
        }
        Ok(())
    })();
    if let Err(e) = epochs {
        return Err(tell(tr.coll.as_deref_mut(), e));
    }
    tr.finish()
}

/// A run resumed inside an epoch must cut it into the same steps: `world × accum` parts.
fn check_parts(state: &TrainerState, latest: &Path, world: usize, accum: usize) -> Result<()> {
    let parts = world * accum;
    if state.batch_in_epoch > 0 && !state.finished && state.parts_per_step != parts {
        bail!(
            "{}: the checkpoint stopped inside an epoch of steps of {} micro-batches; this run has {parts} \
             (world size {world} × accumulate_steps {accum}), which cuts the epoch differently: resume with the \
             world size × accumulate_steps it ran with (or from an end-of-epoch checkpoint)",
            latest.display(),
            state.parts_per_step
        );
    }
    Ok(())
}

/// The run's progress bar at `step` of `total` (hidden when quiet or one of several ranks).
fn progress_bar(name: &str, total: u64, step: u64, hidden: bool) -> ProgressBar {
    let pb = if hidden { ProgressBar::hidden() } else { ProgressBar::new(total) };
    pb.set_style(ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ETA {eta}").unwrap().progress_chars("=> "));
    pb.set_prefix(name.to_string());
    pb.set_position(step.min(total));
    pb
}

/// `e`, after telling the other ranks (if any) about it.
fn tell(c: Option<&mut (dyn Collective + '_)>, e: anyhow::Error) -> anyhow::Error {
    if let Some(c) = c {
        c.abort(&format!("{e:#}"));
    }
    e
}

/// What [`Trainer::open`] found.
enum Opened<'a, B: Backend, T: Task<B>> {
    /// The latest checkpoint says the run is over: nothing to do.
    AlreadyFinished(Box<RunResult<T::Eval>>),
    Ready(Box<Trainer<'a, B, T>>),
}

/// A run in progress: the model and its groups' optimisers, the state a checkpoint
/// records, and the book-keeping of the loop.
struct Trainer<'a, B: Backend, T: Task<B>> {
    be: &'a B,
    task: &'a mut T,
    s: &'a LoopSettings,
    opts: &'a RunOptions,
    t0: Instant,
    latest: PathBuf,
    best_path: PathBuf,
    model: T::Model,
    /// One AdamW per parameter group, in [`Task::groups`] order.
    opt: Vec<AdamW<B>>,
    state: TrainerState,
    log: Log,
    loader: Loader,
    total_steps: u64,
    monitor: Monitor,
    pb: ProgressBar,
    interrupted: bool,
    stopped_early: bool,
    epochs_done: usize,
    last_eval: Option<T::Eval>,
    skipped_total: usize,
    /// Since the last step log line: loss sum, steps, start, samples.
    window: (f64, usize, Instant, usize),
    /// Is stderr a terminal (else plain progress lines every few seconds)?
    tty: bool,
    last_line: Instant,
    /// The process group of a data-parallel run (None: one process).
    coll: Option<Box<dyn Collective>>,
    rank: usize,
    /// Micro-batches per step over all ranks (world × accumulate_steps) and this rank's.
    parts: usize,
    my_parts: std::ops::Range<usize>,
    /// Gradient sums of a multi-part step, one buffer per group.
    sync: GradSync<B>,
    /// `[rank r] ` in data-parallel runs (progress lines of every rank).
    prefix: String,
    /// `DEMOVLP_DIST_VERIFY=1`: after every step each rank checks its parameters against
    /// rank 0's (a hash of all of them: a debugging aid, it costs a pass over the weights).
    verify: bool,
}

impl<'a, B: Backend, T: Task<B>> Trainer<'a, B, T> {
    /// Output directory and config copy, then a fresh model (or the latest checkpoint with
    /// `resume`), the dropout generators where the checkpoint left them, the log, the loader.
    fn open(
        be: &'a B,
        task: &'a mut T,
        s: &'a LoopSettings,
        (datasets, tokenizer): (Vec<Dataset>, Arc<Tokenizer>),
        opts: &'a RunOptions,
        dist: &mut Option<Dist>,
    ) -> Result<Opened<'a, B, T>> {
        let t0 = Instant::now();
        let local_rank = dist.as_ref().map(|d| d.local_rank);
        let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.coll.rank(), d.coll.world()));
        let prefix = if world > 1 { format!("[rank {rank}] ") } else { String::new() };
        let accum = s.accumulate_steps.max(1);
        let parts = world * accum;
        let out = &s.output_dir;
        let (latest, best_path) = (out.join(LATEST), out.join(BEST));
        if rank == 0 {
            if let Some(note) = crate::run_dir::guard_output_dir(out, opts.resume, opts.force, T::OUTPUTS)? {
                if !opts.quiet {
                    eprintln!("{prefix}{note}");
                }
            }
            prepare_output_dir(out, opts, &prefix, &s.config_text)?;
        }
        let coll = dist.as_mut().map(|d| &mut *d.coll);
        let (mut model, opt, mut state) = start_model(be, task, s, opts, &latest, coll)?;
        // A run that ended after its last epoch goes on when resumed with more epochs (one
        // that stopped early stays stopped).
        let early_stopped = s.early_stopping_patience.is_some_and(|p| state.epochs_since_best >= p);
        if state.finished && state.epoch <= s.epochs && !early_stopped {
            state.finished = false;
        }
        check_parts(&state, &latest, world, accum)?;
        task.start(&mut model, &state);
        let resumed = state.step > 0 || state.epoch > 1;
        let mut log = if rank == 0 { Log::open(&out.join("log.jsonl"), resumed)? } else { Log::disabled() };
        let monitor = task.monitor();
        if state.finished {
            if !opts.quiet {
                eprintln!("{prefix}{}: already finished ({} steps); nothing to do", latest.display(), state.step);
            }
            let groups: Vec<&Params<B>> = T::groups(&model).into_iter().map(|(_, p)| p).collect();
            let best_checkpoint = best_path.exists().then(|| best_path.clone());
            return Ok(Opened::AlreadyFinished(Box::new(RunResult::already_finished(
                out,
                &state,
                monitor.name,
                latest,
                best_checkpoint,
                params_hash_on(be, &groups),
            ))));
        }
        let n_params: usize = T::groups(&model).iter().map(|(_, p)| p.len()).sum();
        let mut start = json!({"kind": "start", "name": s.name, "task": T::KIND, "step": state.step, "epoch": state.epoch, "resumed": resumed, "params": n_params});
        if parts > 1 {
            start["world_size"] = world.into();
            start["accumulate_steps"] = accum.into();
            start["global_batch"] = (s.loader.batch_size * parts).into();
        }
        if let (Some(c), Some(lr)) = (dist.as_ref(), local_rank) {
            start["engine"] = c.coll.engine().into();
            start["local_rank_of_rank_0"] = lr.into();
        }
        log.write(start)?;

        let sizes: Vec<usize> = datasets.iter().map(|d| d.samples.len()).collect();
        let loader = Loader::new(datasets, tokenizer, LoaderConfig { train: true, seed: s.seed, ..s.loader.clone() })
            .with_context(|| format!("{}: training data", s.name))?;
        let batches_per_epoch = loader.steps_per_epoch(parts) as u64;
        if batches_per_epoch == 0 {
            bail!(
                "{}: no training step (datasets have {sizes:?} samples, global batch {} = batch size {} × {parts} parts)",
                s.name,
                s.loader.batch_size * parts,
                s.loader.batch_size
            );
        }
        let total_steps = (batches_per_epoch * s.epochs as u64).min(s.max_steps.unwrap_or(u64::MAX));
        let pb = progress_bar(&s.name, total_steps, state.step, opts.quiet || world > 1);
        let epochs_done = state.epoch - 1;
        Ok(Opened::Ready(Box::new(Trainer {
            be,
            task,
            s,
            opts,
            t0,
            latest,
            best_path,
            model,
            opt,
            state,
            log,
            loader,
            total_steps,
            monitor,
            pb,
            interrupted: false,
            stopped_early: false,
            epochs_done,
            last_eval: None,
            skipped_total: 0,
            window: (0.0, 0, Instant::now(), 0),
            tty: world == 1 && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last_line: Instant::now(),
            coll: dist.take().map(|d| d.coll),
            rank,
            parts,
            my_parts: rank * accum..(rank + 1) * accum,
            sync: GradSync::default(),
            prefix,
            verify: std::env::var("DEMOVLP_DIST_VERIFY").is_ok_and(|v| v == "1"),
        })))
    }

    /// A checkpoint of the current weights, optimisers and state (with the dropout
    /// generator as it is now). Only rank 0 writes; the other ranks return at once.
    fn save(&self, path: &Path) -> Result<()> {
        if self.rank != 0 {
            return Ok(());
        }
        let mut st = self.state.clone();
        // Steps of several parts draw their dropout from (step, part): the generator of the
        // state is then unused and kept as it was, so equal runs write equal states.
        if self.parts == 1 {
            if let Some(d) = self.task.dropout_state(&self.model) {
                st.dropout_rng = d;
            }
        }
        st.parts_per_step = self.parts;
        let (model_config, model_extra) = T::describe(&self.model);
        let info = CheckpointInfo { task: T::KIND, model_config: &model_config, model_extra, state: &st, config: &self.s.config_text };
        let groups: Vec<GroupRef<'_, B>> =
            T::groups(&self.model).into_iter().zip(&self.opt).map(|((name, params), opt)| GroupRef { name, params, opt }).collect();
        checkpoint::save_groups(path, self.be, &info, &groups)
    }

    fn stop_requested(&self) -> bool {
        self.opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// The optimiser steps of the epoch in progress, from `state.batch_in_epoch` on.
    /// Returns the epoch's mean training loss (NaN without a step), or None when the run
    /// stopped inside it (`max_steps` reached, or the stop flag: then `interrupted`).
    ///
    /// A step's losses are read once the next step is queued ([`Trainer::queue_step`]), so
    /// the device never waits for the host between steps; its NaN check, log line and
    /// progress come then. Before anything that saves or uses the parameters (a periodic
    /// checkpoint, the end of the epoch, `max_steps`, a stop) the losses of the step just
    /// queued are read at once: a non-finite loss stops the run before that, and a
    /// checkpoint holds the parameters after exactly the steps it counts.
    fn run_epoch(&mut self) -> Result<Option<f64>> {
        if self.parts > 1 {
            return self.run_epoch_parts();
        }
        // The epoch seed the state (checkpoint) carries: epoch_seed(seed, epoch) for runs of this code.
        let mut pre = self.loader.epoch_from(self.state.epoch_seed, self.state.batch_in_epoch);
        let planned = pre.planned();
        // The step queued last, its losses not read yet.
        let mut queued = None;
        while self.state.batch_in_epoch < planned {
            if self.s.max_steps.is_some_and(|m| self.state.step >= m) {
                self.read_losses(queued.take())?;
                return Ok(None);
            }
            if self.stop_requested() {
                self.read_losses(queued.take())?;
                self.interrupted = true;
                return Ok(None);
            }
            let batch = pre.next().context("batch loader stopped")??;
            debug_assert_eq!(batch.index, self.state.batch_in_epoch);
            let step_before = self.state.step;
            let this = if batch.batch < 2 {
                self.state.batch_in_epoch += 1;
                None
            } else {
                Some(self.queue_step(&batch, planned)?)
            };
            // The step before, now that this one is queued.
            self.read_losses(queued.take())?;
            self.skipped_total += batch.skipped.len();
            for s in &batch.skipped {
                self.log.write(json!({"kind": "skipped", "step": step_before, "clip": s.clip, "reason": s.reason}))?;
            }
            queued = self.read_now_or_keep(this)?;
        }
        self.read_losses(queued.take())?;
        Ok(Some(self.epoch_mean_loss()))
    }

    fn epoch_mean_loss(&self) -> f64 {
        let st = &self.state;
        if st.epoch_steps > 0 {
            st.epoch_loss_sum / st.epoch_steps as f64
        } else {
            f64::NAN
        }
    }

    fn at(&self, part: usize) -> StepAt {
        let st = &self.state;
        StepAt { epoch: st.epoch, step: st.step, batch_in_epoch: st.batch_in_epoch, part, parts: self.parts }
    }

    /// The epoch's steps with several micro-batches each (accumulation and/or ranks); see
    /// the module doc. Returns as [`Trainer::run_epoch`].
    fn run_epoch_parts(&mut self) -> Result<Option<f64>> {
        let mut pre = self.loader.epoch_parts_from(self.state.epoch_seed, self.state.batch_in_epoch, self.parts, self.my_parts.clone());
        let planned = pre.planned();
        while self.state.batch_in_epoch < planned {
            // Every rank has the same step count: they all stop here together.
            if self.s.max_steps.is_some_and(|m| self.state.step >= m) {
                return Ok(None);
            }
            let parts = pre.next().context("batch loader stopped")??;
            for b in &parts {
                for s in &b.skipped {
                    if self.rank == 0 {
                        self.log.write(json!({"kind": "skipped", "step": self.state.step, "clip": s.clip, "reason": s.reason}))?;
                    } else if !self.opts.quiet {
                        eprintln!("{}skipped {} at step {}: {}", self.prefix, s.clip, self.state.step, s.reason);
                    }
                }
            }
            if self.step_parts(&parts, planned)? {
                self.interrupted = true;
                return Ok(None);
            }
        }
        Ok(Some(self.epoch_mean_loss()))
    }

    /// One optimiser step from this rank's `parts` of the step (and the other ranks'):
    /// returns whether the ranks agreed to stop after it (a stop flag raised on any of them).
    fn step_parts(&mut self, parts: &[Batch], planned: usize) -> Result<bool> {
        let mut st = StepStats::default();
        let mut bad_here = None;
        {
            let groups: Vec<&Params<B>> = T::groups(&self.model).into_iter().map(|(_, p)| p).collect();
            self.sync.begin(self.be, &groups);
        }
        for b in parts {
            if b.batch < 2 {
                continue;
            }
            let at = self.at(b.part);
            self.task.set_dropout(&mut self.model, at, &self.state);
            // The part's gradients are summed and reduced across ranks with its losses
            // in this step: read at once.
            let l = self.task.forward_backward(&mut self.model, b)?.read();
            if !l.total.is_finite() && bad_here.is_none() {
                bad_here = Some((b.part, l.total, b.clips.join(", ")));
            }
            let groups: Vec<&Params<B>> = T::groups(&self.model).into_iter().map(|(_, p)| p).collect();
            self.sync.add(self.be, &groups);
            st.add_part(&l, b.batch);
        }
        st.skipped = parts.iter().map(|b| b.skipped.len()).sum::<usize>() as f32;
        if self.stop_requested() {
            st.stop = 1.0;
            st.sigterm = (stop_signal() == Some(libc::SIGTERM)) as u8 as f32;
        }
        let what = format!("{}: step {}", self.s.name, self.state.step + 1);
        let st = self.sync.all_reduce(self.be, self.coll.as_deref_mut(), st).context(what)?;
        self.skipped_total += st.skipped as usize;
        let stop = st.stop > 0.0;
        if stop && stop_signal().is_none() {
            crate::signals::set_peer_stop_signal(if st.sigterm > 0.0 { libc::SIGTERM } else { libc::SIGINT });
        }
        if st.parts == 0.0 {
            self.state.batch_in_epoch += 1;
            return Ok(stop);
        }
        if !st.loss.is_finite() {
            let (where_, clips) = match &bad_here {
                Some((part, loss, clips)) => {
                    (format!("step {} of the epoch, part {part}, loss {loss}", self.state.batch_in_epoch), clips.clone())
                }
                None => {
                    (format!("step {} of the epoch, on another rank", self.state.batch_in_epoch), "see that rank's message".to_string())
                }
            };
            return Err(self.nan_error(st.loss, self.state.step, self.state.epoch, &where_, &clips));
        }
        let lr = learning_rate(&self.s.optim, self.state.epoch, self.state.step, self.total_steps);
        let inv = 1.0 / st.parts;
        for (g, ((_, p), o)) in T::groups_mut(&mut self.model).into_iter().zip(&mut self.opt).enumerate() {
            self.sync.write_mean(self.be, g, inv, p);
            o.lr = lr;
            o.step(p);
        }
        if self.verify {
            self.verify_params()?;
        }
        let n = st.parts;
        let losses = Losses { total: st.loss / n, terms: [st.terms[0] / n, st.terms[1] / n] };
        self.parts_step_done(lr, losses, st.samples as usize, planned)?;
        Ok(stop)
    }

    /// Compares this rank's parameters with rank 0's (their hash), after step `state.step`.
    fn verify_params(&mut self) -> Result<()> {
        let groups: Vec<&Params<B>> = T::groups(&self.model).into_iter().map(|(_, p)| p).collect();
        let mine = params_hash_on(self.be, &groups);
        let Some(c) = self.coll.as_deref_mut() else { return Ok(()) };
        let mut theirs = mine.clone().into_bytes();
        c.broadcast_bytes(&mut theirs).context("DEMOVLP_DIST_VERIFY: rank 0's parameter hash")?;
        let theirs = String::from_utf8_lossy(&theirs).into_owned();
        if theirs != mine {
            bail!(
                "DEMOVLP_DIST_VERIFY: after step {} rank {}'s parameters (hash {mine}) differ from rank 0's ({theirs})",
                self.state.step + 1,
                self.rank
            );
        }
        Ok(())
    }

    /// End of an epoch: the task's validation (None without a validation set).
    fn validate(&mut self) -> Result<Option<T::Eval>> {
        self.pb.set_message("validating");
        self.task.validate(&mut self.model)
    }

    /// Keep the best, save the latest, log the epoch, move to the next epoch
    /// ([`end_epoch`]). Returns whether early stopping ends the run.
    fn end_epoch(&mut self, train_loss: f64, eval: Option<T::Eval>) -> Result<bool> {
        let epoch = self.state.epoch;
        let mut value = self.task.monitored(eval.as_ref(), train_loss, epoch);
        // Rank 0's value decides for every rank (they computed the same, but decisions
        // must not depend on it).
        if let Some(c) = self.coll.as_deref_mut() {
            let mut b = value.to_le_bytes().to_vec();
            c.broadcast_bytes(&mut b).context("sharing the epoch's monitored value")?;
            value = f64::from_le_bytes(b.as_slice().try_into().context("monitored value: 8 bytes expected")?);
        }
        self.epochs_done = epoch;
        let lr = learning_rate(&self.s.optim, epoch, self.state.step.saturating_sub(1), self.total_steps);
        let (improved, stop) =
            end_epoch(&mut self.state, value, self.monitor.higher_is_better, self.s.early_stopping_patience, self.s.epochs);
        self.stopped_early = stop;
        if improved {
            self.save(&self.best_path)?;
            if self.rank == 0 {
                self.task.on_best(self.be, &self.model, &self.s.output_dir)?;
            }
        }
        self.save(&self.latest)?;
        let line = json!({
            "kind": "epoch", "epoch": epoch, "step": self.state.step, "train_loss": train_loss, "lr": lr,
            "seconds": self.t0.elapsed().as_secs_f64(), "best_epoch": self.state.best_epoch, "best": self.state.best,
        });
        for l in self.task.epoch_lines(line, eval.as_ref()) {
            self.log.write(l)?;
        }
        self.last_eval = eval;
        if stop {
            let st = &self.state;
            self.log.write(json!({"kind": "early_stop", "epoch": self.epochs_done, "best_epoch": st.best_epoch, "best": st.best}))?;
        }
        Ok(stop)
    }

    /// A resumable checkpoint when the run stopped inside an epoch, then the end of the
    /// log, the plots and the summary table.
    fn finish(mut self) -> Result<RunResult<T::Eval>> {
        let s = self.s;
        let at_max = s.max_steps.is_some_and(|m| self.state.step >= m) && !self.state.finished;
        if self.interrupted || at_max {
            self.save(&self.latest)?;
        }
        // No rank leaves before rank 0 has written its checkpoint (a launcher may stop the
        // others as soon as one exits).
        if let Some(c) = self.coll.as_deref_mut() {
            c.barrier().context("the end of the run")?;
        }
        self.pb.finish_and_clear();
        let seconds = self.t0.elapsed().as_secs_f64();
        let state = &self.state;
        self.log.write(json!({"kind": "end", "step": state.step, "epoch": self.epochs_done, "interrupted": self.interrupted, "early_stopped": self.stopped_early, "seconds": seconds, "skipped_samples": self.skipped_total}))?;
        drop(self.log);
        if self.rank == 0 {
            self.task.write_plots(&s.output_dir, &s.name)?;
        }
        let groups: Vec<&Params<B>> = T::groups(&self.model).into_iter().map(|(_, p)| p).collect();
        let result = RunResult {
            output_dir: s.output_dir.clone(),
            steps: state.step,
            epochs_done: self.epochs_done,
            seconds,
            interrupted: self.interrupted,
            finished: state.finished,
            best: state.best,
            best_epoch: state.best_epoch,
            monitor: self.monitor.name.clone(),
            last_metrics: self.last_eval.clone(),
            latest: self.latest.clone(),
            best_checkpoint: self.best_path.exists().then(|| self.best_path.clone()),
            params_hash: params_hash_on(self.be, &groups),
            skipped_samples: self.skipped_total,
        };
        if self.rank == 0 {
            let task_lines = result.last_metrics.as_ref().map(|e| self.task.summary(e)).unwrap_or_default();
            let table = crate::runlog::summary_table(&s.name, &result, &task_lines);
            let summary = s.output_dir.join("summary.txt");
            std::fs::write(&summary, &table).with_context(|| format!("cannot write {}", summary.display()))?;
            if !self.opts.quiet {
                eprint!("{table}");
            }
        }
        Ok(result)
    }
}

/// Rank 0's start (after [`crate::run_dir::guard_output_dir`]): the output directory
/// exists, temporaries of dead runs are gone, the config is saved.
fn prepare_output_dir(out: &Path, opts: &RunOptions, prefix: &str, config_text: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for stale in checkpoint::remove_stale_temporaries(out)? {
        if !opts.quiet {
            eprintln!("{prefix}removed {}, a partial checkpoint of a run that is no longer alive", stale.display());
        }
    }
    std::fs::write(out.join("config.toml"), config_text).with_context(|| format!("writing {}", out.join("config.toml").display()))
}

/// The model, its groups' optimisers and the state a run starts from: rank 0's (a fresh
/// model, or the latest checkpoint with `resume`), sent to the other ranks of a
/// data-parallel run.
fn start_model<B: Backend, T: Task<B>>(
    be: &B,
    task: &mut T,
    s: &LoopSettings,
    opts: &RunOptions,
    latest: &Path,
    coll: Option<&mut (dyn Collective + '_)>,
) -> Result<(T::Model, Vec<AdamW<B>>, TrainerState)> {
    if let Some(c) = coll.as_ref() {
        if c.rank() != 0 {
            let c = coll.expect("checked");
            return crate::grad_sync::receive_start(be, task, c);
        }
    }
    let start = if opts.resume {
        let ck = checkpoint::load(latest)?;
        if ck.task != T::KIND {
            bail!("{}: a checkpoint of a {} run, not of a {} run", latest.display(), ck.task, T::KIND);
        }
        let mut model = task.build(be, ck.model_config.clone(), &ck.model_extra).with_context(|| latest.display().to_string())?;
        let mut opt = Vec::new();
        let mut used = 0;
        for (name, p) in T::groups_mut(&mut model) {
            used += ck.fill_group(be, p)?;
            let o = ck.group_optimizer(name)?;
            opt.push(crate::grad_sync::adamw_on(be, o, p.len()).with_context(|| format!("{}: group {name}", latest.display()))?);
        }
        if used != ck.params.len() {
            bail!("{}: {} parameters in the file, the model has {used}", latest.display(), ck.params.len());
        }
        (model, opt, ck.state)
    } else {
        let model = task.init(be)?;
        let o = &s.optim;
        let settings = AdamWSettings { lr: o.lr, beta1: o.betas[0], beta2: o.betas[1], eps: o.eps, weight_decay: o.weight_decay };
        let opt = T::groups(&model).iter().map(|(_, p)| AdamW::new_on(be.clone(), p.len(), settings)).collect();
        (model, opt, fresh_state(s.seed))
    };
    if let Some(c) = coll {
        crate::grad_sync::send_start::<B, T>(be, c, &start.0, &start.1, &start.2)?;
    }
    Ok(start)
}
