//! The training loop: AdamW + schedule over interleaved datasets, validation after every
//! epoch, best/latest checkpoints, early stopping, exact resume, Ctrl-C and NaN handling,
//! JSONL log, progress bar, and SVG plots + a summary table at the end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_data::batches::{epoch_seed_rng, Batch, Dataset, InputShape, Loader, LoaderConfig};
use demovlp_kernels::rng::Rng;
use demovlp_model::{AdamW, BatchRef, Model, TextDropout};
use demovlp_retrieval::{LossConfig, RetrievalMetrics, ScoreMode};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::checkpoint::{self, TrainerState, BEST, LATEST};
use crate::config::{monitor_higher_is_better, TrainConfig};
use crate::eval::{evaluate, EvalOptions, EvalSet};
use crate::runlog::{metrics_json, summary_table, write_plots, Log};
use crate::schedule::learning_rate;
use crate::text::Tokenizer;
use crate::weights::build_model;

/// Everything a run trains and validates on.
pub struct TrainInputs {
    pub config: TrainConfig,
    pub train: Vec<Dataset>,
    pub val: Option<EvalSet>,
    pub tokenizer: Arc<Tokenizer>,
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from `output_dir/checkpoint_latest.safetensors` (an error when there is none).
    pub resume: bool,
    /// Weights to start from (overrides `model.init`).
    pub init: Option<PathBuf>,
    /// No progress bars and no summary on stderr.
    pub quiet: bool,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a resumable checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
}

#[derive(Clone, Debug)]
pub struct RunResult {
    pub output_dir: PathBuf,
    pub steps: u64,
    pub epochs_done: usize,
    pub seconds: f64,
    pub interrupted: bool,
    pub best: Option<f64>,
    pub best_epoch: Option<usize>,
    /// The metric `best` refers to.
    pub monitor: String,
    pub last_metrics: Option<RetrievalMetrics>,
    pub latest: PathBuf,
    pub best_checkpoint: Option<PathBuf>,
}

/// The signal that raised the stop flag (SIGINT or SIGTERM), 0 while none arrived.
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static STOP_FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Async-signal-safe only: atomics, write(2), _exit(2).
    if STOP_SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        unsafe { libc::_exit(128 + sig) };
    }
    if let Some(f) = STOP_FLAG.get() {
        f.store(true, Ordering::SeqCst);
    }
    let msg: &[u8] = if sig == libc::SIGTERM {
        b"\nSIGTERM: finishing this step and saving a resumable checkpoint (a second signal aborts)\n"
    } else {
        b"\ninterrupt: finishing this step and saving a resumable checkpoint (Ctrl-C again to abort)\n"
    };
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// SIGINT (Ctrl-C) and SIGTERM (what schedulers and `docker stop` send) handler: the first
/// signal raises the returned flag (the loop then finishes its step, saves a resumable
/// checkpoint and stops); a second one exits at once with 128 + its number.
/// [`stop_signal`] tells which signal it was.
pub fn install_ctrlc() -> Arc<AtomicBool> {
    let flag = STOP_FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        unsafe { libc::signal(sig, handler) };
    }
    flag
}

/// The signal that stopped the run (`libc::SIGINT` or `libc::SIGTERM`), if one did.
pub fn stop_signal() -> Option<i32> {
    Some(STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// The conventional exit status of a run stopped by the signal [`stop_signal`] reports
/// (130 for SIGINT, 143 for SIGTERM; 130 when the flag was raised otherwise).
pub fn stop_exit_code() -> i32 {
    128 + stop_signal().unwrap_or(libc::SIGINT)
}

fn monitored(name: &str, m: Option<&RetrievalMetrics>, train_loss: f64) -> f64 {
    let Some(m) = m else { return train_loss };
    let (dir, key) = match name.split_once('_') {
        Some((d @ ("t2v" | "v2t"), k)) => (if d == "t2v" { &m.t2v } else { &m.v2t }, k),
        _ if name == "geometric_mean" => return m.t2v.geometric_mean_r1_r5_r10,
        _ => return train_loss,
    };
    match key {
        "R1" => dir.r1,
        "R5" => dir.r5,
        "R10" => dir.r10,
        "R50" => dir.r50,
        "MedR" => dir.medr,
        _ => dir.meanr,
    }
}

/// Train per `inputs.config`. Returns when all epochs ran, early stopping triggered,
/// `max_steps` was reached, or the stop flag was raised (then `interrupted`).
///
/// Four stages: `Run::open` (a fresh model or the latest checkpoint), `Run::run_epoch`
/// (the optimiser steps of one epoch), `Run::validate` + `Run::end_epoch` (metrics,
/// best / latest checkpoints, early stopping) and `Run::finish` (log, plots, summary).
pub fn train(inputs: &TrainInputs, opts: &RunOptions) -> Result<RunResult> {
    let mut run = match Run::open(inputs, opts)? {
        Opened::AlreadyFinished(r) => return Ok(*r),
        Opened::Ready(run) => run,
    };
    while run.state.epoch <= inputs.config.train.epochs {
        let Some(train_loss) = run.run_epoch()? else { break };
        let metrics = run.validate(train_loss)?;
        if run.end_epoch(train_loss, metrics)? {
            break;
        }
    }
    run.finish()
}

/// What [`Run::open`] found.
enum Opened<'a> {
    /// The latest checkpoint says the run is over: nothing to do.
    AlreadyFinished(Box<RunResult>),
    Ready(Box<Run<'a>>),
}

/// A run in progress: the model, the optimiser, the state a checkpoint records, and the
/// book-keeping of the loop.
struct Run<'a> {
    inputs: &'a TrainInputs,
    opts: &'a RunOptions,
    t0: Instant,
    out: PathBuf,
    latest: PathBuf,
    best_path: PathBuf,
    config_text: String,
    shape: InputShape,
    model: Model,
    opt: AdamW,
    state: TrainerState,
    log: Log,
    loader: Loader,
    loss_cfg: LossConfig,
    total_steps: u64,
    /// The monitored metric (`train_loss` without a validation set).
    monitor: &'a str,
    pb: ProgressBar,
    interrupted: bool,
    stopped_early: bool,
    epochs_done: usize,
    last_metrics: Option<RetrievalMetrics>,
    skipped_total: usize,
    /// Since the last step log line: loss sum, steps, start, samples.
    window: (f64, usize, Instant, usize),
    /// Is stderr a terminal (else plain progress lines every few seconds)?
    tty: bool,
    last_line: Instant,
}

impl<'a> Run<'a> {
    /// Output directory and config copy, then a fresh model (or the latest checkpoint with
    /// `resume`), the dropout generator where the checkpoint left it, the log, the loader.
    fn open(inputs: &'a TrainInputs, opts: &'a RunOptions) -> Result<Opened<'a>> {
        let t0 = Instant::now();
        let cfg = &inputs.config;
        let out = cfg.output_dir.clone();
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let latest = out.join(LATEST);
        let best_path = out.join(BEST);
        for stale in checkpoint::remove_stale_temporaries(&out)? {
            if !opts.quiet {
                eprintln!("removed {}, a partial checkpoint of a run that is no longer alive", stale.display());
            }
        }
        if opts.resume && !latest.exists() {
            bail!(
                "--resume: there is no checkpoint to resume in {} ({LATEST} not found); start a fresh run without --resume",
                out.display()
            );
        }
        let config_text = cfg.to_toml();
        std::fs::write(out.join("config.toml"), &config_text).with_context(|| format!("writing {}", out.join("config.toml").display()))?;

        let shape = InputShape { frames: cfg.data.frames, regions: cfg.data.regions, text_len: cfg.data.text_len };
        let o = &cfg.optim;
        let (mut model, opt, state) = if opts.resume {
            resume_from(cfg, &latest)?
        } else {
            let model = build_model(cfg, opts.init.as_deref())?;
            let n = model.params.len();
            let opt = AdamW::new(n, o.lr, o.betas[0], o.betas[1], o.eps, o.weight_decay);
            (model, opt, fresh_state(cfg.seed))
        };
        // Dropout draws continue exactly where the checkpoint left them.
        let p = cfg.train.text_dropout;
        model.set_text_dropout(TextDropout { hidden: p, attention: p }, 0);
        model.set_dropout_rng(Rng::from_state(state.dropout_rng));
        let resumed = state.step > 0 || state.epoch > 1;
        let mut log = Log::open(&out.join("log.jsonl"), resumed)?;
        if state.finished {
            if !opts.quiet {
                eprintln!("{}: already finished ({} steps); nothing to do", latest.display(), state.step);
            }
            return Ok(Opened::AlreadyFinished(Box::new(RunResult {
                output_dir: out,
                steps: state.step,
                epochs_done: state.epoch.saturating_sub(1),
                seconds: 0.0,
                interrupted: false,
                best: state.best,
                best_epoch: state.best_epoch,
                monitor: cfg.train.monitor.clone(),
                last_metrics: None,
                latest,
                best_checkpoint: best_path.exists().then(|| best_path.clone()),
            })));
        }
        log.write(json!({"kind": "start", "name": cfg.name, "step": state.step, "epoch": state.epoch, "resumed": resumed, "params": model.params.len()}))?;

        let sizes: Vec<usize> = inputs.train.iter().map(|s| s.samples.len()).collect();
        let loader = Loader::new(
            inputs.train.clone(),
            inputs.tokenizer.clone(),
            LoaderConfig {
                batch_size: cfg.data.batch_size,
                shape,
                train: true,
                seed: cfg.seed,
                samples_per_epoch: cfg.data.samples_per_epoch,
                threads: cfg.data.workers,
                prefetch: 2,
                skip_bad: cfg.data.skip_bad_samples,
            },
        )
        .with_context(|| format!("{}: training data", cfg.name))?;
        let batches_per_epoch = loader.batches_per_epoch() as u64;
        if batches_per_epoch == 0 {
            bail!("{}: no training batch (datasets have {sizes:?} samples, batch size {})", cfg.name, cfg.data.batch_size);
        }
        let total_steps = (batches_per_epoch * cfg.train.epochs as u64).min(cfg.train.max_steps.unwrap_or(u64::MAX));
        let loss_cfg = LossConfig { temperature: cfg.loss.temperature, lambda: cfg.loss.lambda, masked_mean: cfg.loss.masked_mean };
        // Without a validation set only the training loss can be monitored.
        let monitor = if inputs.val.is_some() { cfg.train.monitor.as_str() } else { "train_loss" };

        let pb = if opts.quiet { ProgressBar::hidden() } else { ProgressBar::new(total_steps) };
        pb.set_style(ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ETA {eta}").unwrap().progress_chars("=> "));
        pb.set_prefix(cfg.name.clone());
        pb.set_position(state.step.min(total_steps));
        let epochs_done = state.epoch - 1;
        Ok(Opened::Ready(Box::new(Run {
            inputs,
            opts,
            t0,
            out,
            latest,
            best_path,
            config_text,
            shape,
            model,
            opt,
            state,
            log,
            loader,
            loss_cfg,
            total_steps,
            monitor,
            pb,
            interrupted: false,
            stopped_early: false,
            epochs_done,
            last_metrics: None,
            skipped_total: 0,
            window: (0.0, 0, Instant::now(), 0),
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last_line: Instant::now(),
        })))
    }

    /// A checkpoint of the current weights, optimiser and state (with the dropout
    /// generator as it is now).
    fn save(&self, path: &Path) -> Result<()> {
        let mut st = self.state.clone();
        st.dropout_rng = self.model.dropout_rng().state();
        checkpoint::save(path, &self.model.config, &self.model.params, &self.opt, &st, &self.config_text)
    }

    /// The optimiser steps of the epoch in progress, from `state.batch_in_epoch` on.
    /// Returns the epoch's mean training loss (NaN without a step), or None when the run
    /// stopped inside it (`max_steps` reached, or the stop flag: then `interrupted`).
    fn run_epoch(&mut self) -> Result<Option<f64>> {
        let cfg = &self.inputs.config;
        // The epoch seed the state (checkpoint) carries: epoch_seed(cfg.seed, epoch) for runs of this code.
        let mut pre = self.loader.epoch_from(self.state.epoch_seed, self.state.batch_in_epoch);
        let planned = pre.planned();
        let (mut epoch_loss, mut epoch_steps) = (0.0f64, 0usize);
        while self.state.batch_in_epoch < planned {
            if cfg.train.max_steps.is_some_and(|m| self.state.step >= m) {
                return Ok(None);
            }
            if self.opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                self.interrupted = true;
                return Ok(None);
            }
            let batch = pre.next().context("batch loader stopped")??;
            debug_assert_eq!(batch.index, self.state.batch_in_epoch);
            self.skipped_total += batch.skipped.len();
            for s in &batch.skipped {
                self.log.write(json!({"kind": "skipped", "step": self.state.step, "clip": s.clip, "reason": s.reason}))?;
            }
            if batch.batch < 2 {
                self.state.batch_in_epoch += 1;
                continue;
            }
            let loss = self.step(&batch, planned)?;
            epoch_loss += loss as f64;
            epoch_steps += 1;
        }
        Ok(Some(if epoch_steps > 0 { epoch_loss / epoch_steps as f64 } else { f64::NAN }))
    }

    /// One optimiser step on `batch` (of an epoch of `planned` batches); returns its loss.
    fn step(&mut self, batch: &Batch, planned: usize) -> Result<f32> {
        let cfg = &self.inputs.config;
        let state = &mut self.state;
        let lr = learning_rate(&cfg.optim, state.epoch, state.step, self.total_steps);
        // AdamW is fused into the backward pass (block by block; same results as a
        // separate step, less memory). A non-finite loss returns before any update.
        self.opt.lr = lr;
        let outp = self.model.train_step_fused(&batch_ref(batch), &self.loss_cfg, cfg.loss.use_local, &mut self.opt);
        if !outp.loss_total.is_finite() {
            let last_good =
                if self.latest.exists() { self.latest.display().to_string() } else { "none (no checkpoint written yet)".into() };
            self.log.write(json!({"kind": "error", "step": state.step, "loss": outp.loss_total.to_string(), "clips": batch.clips}))?;
            self.pb.abandon();
            bail!(
                "{}: loss is {} at step {} (epoch {}, batch {}); batch clips: {}; last good checkpoint: {}",
                cfg.name,
                outp.loss_total,
                state.step + 1,
                state.epoch,
                state.batch_in_epoch,
                batch.clips.join(", "),
                last_good
            );
        }
        state.step += 1;
        state.batch_in_epoch += 1;
        state.samples_seen += batch.batch as u64;
        let window = &mut self.window;
        window.0 += outp.loss_total as f64;
        window.1 += 1;
        window.3 += batch.batch;
        self.pb.set_position(state.step.min(self.total_steps));
        if state.step.is_multiple_of(cfg.train.log_every.max(1)) || state.batch_in_epoch == planned {
            let secs = window.2.elapsed().as_secs_f64().max(1e-9);
            let sps = window.3 as f64 / secs;
            self.pb.set_message(format!("loss {:.4} lr {:.1e} {:.1} samples/s", window.0 / window.1 as f64, lr, sps));
            self.log.write(json!({
                "kind": "step", "step": state.step, "epoch": state.epoch, "lr": lr,
                "loss": outp.loss_total, "loss_global": outp.loss_global, "loss_local": outp.loss_local,
                "loss_avg": window.0 / window.1 as f64, "samples_per_s": sps, "elapsed_s": self.t0.elapsed().as_secs_f64(),
            }))?;
            *window = (0.0, 0, Instant::now(), 0);
        }
        // Without a terminal the bar draws nothing (logs of batch jobs): a plain line every
        // few seconds instead.
        if !self.opts.quiet && !self.tty && self.last_line.elapsed().as_secs_f64() >= demovlp_data::plain_progress_interval() {
            let elapsed = self.t0.elapsed().as_secs_f64();
            eprintln!(
                "{}: step {}/{} (epoch {}), lr {:.2e}, loss {:.4}, {:.0}s",
                cfg.name, state.step, self.total_steps, state.epoch, lr, outp.loss_total, elapsed
            );
            self.last_line = Instant::now();
        }
        if cfg.train.checkpoint_every > 0 && state.step.is_multiple_of(cfg.train.checkpoint_every) {
            self.save(&self.latest)?;
        }
        Ok(outp.loss_total)
    }

    /// End of an epoch: the validation metrics (None without a validation set), logged
    /// with the epoch's training loss.
    fn validate(&mut self, train_loss: f64) -> Result<Option<RetrievalMetrics>> {
        let cfg = &self.inputs.config;
        let state = &self.state;
        let Some(val) = &self.inputs.val else {
            self.log.write(json!({"kind": "epoch", "epoch": state.epoch, "step": state.step, "train_loss": train_loss}))?;
            return Ok(None);
        };
        self.pb.set_message("validating");
        let eo = EvalOptions {
            shape: self.shape,
            batch_size: cfg.train.eval_batch_size,
            lambda: cfg.loss.lambda,
            mode: ScoreMode::Aligned,
            use_local: cfg.loss.use_local,
            masked_mean: cfg.loss.masked_mean,
            progress: false,
        };
        let r = evaluate(&mut self.model, val, &self.inputs.tokenizer, &eo)?;
        self.log.write(json!({"kind": "eval", "epoch": state.epoch, "step": state.step, "split": val.name, "train_loss": train_loss, "seconds": r.seconds, "metrics": metrics_json(&r.metrics)}))?;
        Ok(Some(r.metrics))
    }

    /// Keep the best, save the latest, move to the next epoch ([`end_epoch`]). Returns
    /// whether early stopping ends the run.
    fn end_epoch(&mut self, train_loss: f64, metrics: Option<RetrievalMetrics>) -> Result<bool> {
        let cfg = &self.inputs.config;
        let value = monitored(self.monitor, metrics.as_ref(), train_loss);
        self.last_metrics = metrics;
        self.epochs_done = self.state.epoch;
        let higher = monitor_higher_is_better(self.monitor);
        let (improved, stop) = end_epoch(&mut self.state, value, higher, cfg.train.early_stopping_patience, cfg.train.epochs);
        self.stopped_early = stop;
        if improved {
            self.save(&self.best_path)?;
        }
        self.save(&self.latest)?;
        if stop {
            let st = &self.state;
            self.log.write(json!({"kind": "early_stop", "epoch": self.epochs_done, "best_epoch": st.best_epoch, "best": st.best}))?;
        }
        Ok(stop)
    }

    /// A resumable checkpoint when the run stopped inside an epoch, then the end of the
    /// log, the plots and the summary table.
    fn finish(mut self) -> Result<RunResult> {
        let cfg = &self.inputs.config;
        let state = &self.state;
        if self.interrupted || cfg.train.max_steps.is_some_and(|m| state.step >= m) && !state.finished {
            self.save(&self.latest)?;
        }
        self.pb.finish_and_clear();
        let seconds = self.t0.elapsed().as_secs_f64();
        self.log.write(json!({"kind": "end", "step": state.step, "epoch": self.epochs_done, "interrupted": self.interrupted, "early_stopped": self.stopped_early, "seconds": seconds, "skipped_samples": self.skipped_total}))?;
        drop(self.log);
        write_plots(&self.out, &cfg.name)?;
        let result = RunResult {
            output_dir: self.out.clone(),
            steps: state.step,
            epochs_done: self.epochs_done,
            seconds,
            interrupted: self.interrupted,
            best: state.best,
            best_epoch: state.best_epoch,
            monitor: self.monitor.to_string(),
            last_metrics: self.last_metrics,
            latest: self.latest.clone(),
            best_checkpoint: self.best_path.exists().then(|| self.best_path.clone()),
        };
        let table = summary_table(cfg, &result, self.skipped_total);
        let summary = self.out.join("summary.txt");
        std::fs::write(&summary, &table).with_context(|| format!("cannot write {}", summary.display()))?;
        if !self.opts.quiet {
            eprint!("{table}");
        }
        Ok(result)
    }
}

/// The model, optimiser and state of the checkpoint at `latest`, refused when its model
/// sizes are not the config's.
fn resume_from(cfg: &TrainConfig, latest: &Path) -> Result<(Model, AdamW, TrainerState)> {
    let ck = checkpoint::load(latest)?;
    if cfg.model_config()? != ck.model_config {
        bail!(
            "{}: the checkpoint's model sizes differ from the config's [model]; resume with the config the run started with",
            latest.display()
        );
    }
    let mut model = Model::new(ck.model_config.clone());
    ck.fill_params(&mut model.params)?;
    Ok((model, ck.optimizer, ck.state))
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
    }
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
        let mut st = TrainerState {
            epoch: 1,
            batch_in_epoch: 7,
            step: 0,
            epoch_seed: 0,
            rng: Rng::new(1).state(),
            dropout_rng: [0; 4],
            samples_seen: 0,
            best: None,
            best_epoch: None,
            epochs_since_best: 0,
            finished: false,
        };
        // Recall (higher is better), patience 2, 10 epochs.
        let seq = [(10.0, true, false), (12.0, true, false), (11.0, false, false), (12.0, false, true)];
        let mut seeds = vec![];
        for (v, imp, stop) in seq {
            assert_eq!(end_epoch(&mut st, v, true, Some(2), 10), (imp, stop), "value {v}");
            seeds.push(st.epoch_seed);
        }
        assert_eq!((st.best, st.best_epoch, st.epoch, st.batch_in_epoch, st.finished), (Some(12.0), Some(2), 5, 0, true));
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
