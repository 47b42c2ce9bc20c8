//! The training loop: AdamW + schedule over interleaved datasets, validation after every
//! epoch, best/latest checkpoints, early stopping, exact resume, Ctrl-C and NaN handling,
//! JSONL log, progress bar, and SVG plots + a summary table at the end.
//!
//! **Steps of several micro-batches** (`[train] accumulate_steps = N`, and data-parallel
//! runs of W processes, [`train_with`]): a step's global batch of `batch_size × W × N`
//! samples (one dataset; the datasets still alternate step by step) is cut into P = W·N
//! contiguous parts of `batch_size` (`demovlp_data::batches::part_range`); rank r takes
//! parts r·N … r·N+N−1. Each part is its own contrastive batch (negatives from the part
//! only, as the published trainer), with its text dropout drawn from
//! `derive_seed(seed ^ 0xD80_0C7, step, part)` and its captions and frames from the
//! sample's position in the global batch, so a part is the same wherever it is computed.
//! The step's gradient is `(((0 + g_a) + g_b) + …) × (1 / parts)`: each rank adds its
//! parts in order, rank 0 adds the ranks' sums in rank order (the TCP engine), and the
//! sum is scaled by the reciprocal of the number of parts that had ≥ 2 samples (a part
//! with fewer — the short last step of an epoch, or samples skipped by `skip_bad_samples`
//! — counts as the single-process pipeline counts a short batch: not at all). Then one
//! AdamW step, the same on every rank. So W ranks with N = 1 compute bit for bit what one
//! process with `accumulate_steps = W` computes; W ranks with N > 1 what one process with
//! W·N does up to float round-off (the sum is associated per rank first). With P = 1 the
//! step is the fused one (AdamW inside the backward pass), as before.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_data::batches::{derive_seed, epoch_seed_rng, Batch, Dataset, InputShape, Loader, LoaderConfig};
use demovlp_kernels::rng::Rng;
use demovlp_model::{AdamW, BatchRef, Model, TextDropout};
use demovlp_retrieval::{LossConfig, RetrievalMetrics, ScoreMode};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::checkpoint::{self, TrainerState, BEST, LATEST};
use crate::config::{monitor_higher_is_better, TrainConfig};
use crate::dist::Collective;
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
    /// FNV-1a of the final parameters' bytes (hex): equal on every rank of a data-parallel run.
    pub params_hash: String,
}

/// FNV-1a of the parameters' bytes, hex.
pub fn params_hash(data: &[f32]) -> String {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    format!("{:016x}", crate::dist::fnv1a(&bytes))
}

/// The signal another rank of a data-parallel run received when the ranks agreed to stop
/// (0: none).
static PEER_STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

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
/// (130 for SIGINT, 143 for SIGTERM; in a data-parallel run, the signal any rank received;
/// 130 when the flag was raised otherwise).
pub fn stop_exit_code() -> i32 {
    let peer = Some(PEER_STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0);
    128 + stop_signal().or(peer).unwrap_or(libc::SIGINT)
}

/// This process's place in a data-parallel run.
pub struct Dist {
    /// The process group (rank, world size, the engine).
    pub coll: Box<dyn Collective>,
    /// Rank within its node (the GPU is `local_rank % device_count` on the CUDA path;
    /// recorded in the log on the CPU).
    pub local_rank: usize,
}

/// Indices of the step statistics appended to the gradient buffer of a multi-part step
/// (summed over ranks with it).
const ST_PARTS: usize = 0;
const ST_LOSS: usize = 1;
const ST_GLOBAL: usize = 2;
const ST_LOCAL: usize = 3;
const ST_SAMPLES: usize = 4;
const ST_SKIPPED: usize = 5;
const ST_STOP: usize = 6;
const ST_SIGTERM: usize = 7;
const N_STATS: usize = 8;

/// The text-dropout seed of part `part` of step `step` (steps of several parts).
pub fn part_dropout_seed(seed: u64, step: u64, part: usize) -> u64 {
    derive_seed(seed ^ 0xD80_0C7, step, part as u64)
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
    train_with(inputs, opts, None)
}

/// [`train`] as one rank of a data-parallel run (`dist`; None = a single process): the
/// ranks start from rank 0's weights, optimiser and state (broadcast), each computes its
/// parts of every step, gradients are summed across ranks before the one AdamW step, and
/// only rank 0 writes the output directory (checkpoints, log, plots, summary). A stop flag
/// raised on any rank stops every rank after the same step, rank 0 saving one resumable
/// checkpoint. Every rank validates (so none waits idle for rank 0), and rank 0's
/// monitored value decides best checkpoint and early stopping for all.
pub fn train_with(inputs: &TrainInputs, opts: &RunOptions, mut dist: Option<Dist>) -> Result<RunResult> {
    // An error on this rank is told to the others before it is returned (they stop with it
    // instead of finding a closed connection).
    let mut run = match Run::open(inputs, opts, &mut dist) {
        Ok(Opened::AlreadyFinished(r)) => return Ok(*r),
        Ok(Opened::Ready(run)) => run,
        Err(e) => return Err(tell(dist.as_mut().map(|d| &mut *d.coll), e)),
    };
    let epochs = (|| -> Result<()> {
        while run.state.epoch <= inputs.config.train.epochs {
            let Some(train_loss) = run.run_epoch()? else { break };
            let metrics = run.validate(train_loss)?;
            if run.end_epoch(train_loss, metrics)? {
                break;
            }
        }
        Ok(())
    })();
    if let Err(e) = epochs {
        return Err(tell(run.coll.as_deref_mut(), e));
    }
    run.finish()
}

/// `e`, after telling the other ranks (if any) about it.
fn tell(c: Option<&mut (dyn Collective + '_)>, e: anyhow::Error) -> anyhow::Error {
    if let Some(c) = c {
        c.abort(&format!("{e:#}"));
    }
    e
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
    /// The process group of a data-parallel run (None: one process).
    coll: Option<Box<dyn Collective>>,
    rank: usize,
    /// Micro-batches per step over all ranks (world × accumulate_steps) and this rank's.
    parts: usize,
    my_parts: std::ops::Range<usize>,
    /// Gradient sum of a multi-part step, with the step statistics after it.
    acc: Vec<f32>,
    /// `[rank r] ` in data-parallel runs (progress lines of every rank).
    prefix: String,
    /// `DEMOVLP_DIST_VERIFY=1`: after every step each rank checks its parameters against
    /// rank 0's (a hash of all of them: a debugging aid, it costs a pass over the weights).
    verify: bool,
}

impl<'a> Run<'a> {
    /// Output directory and config copy, then a fresh model (or the latest checkpoint with
    /// `resume`), the dropout generator where the checkpoint left it, the log, the loader.
    fn open(inputs: &'a TrainInputs, opts: &'a RunOptions, dist: &mut Option<Dist>) -> Result<Opened<'a>> {
        let t0 = Instant::now();
        let cfg = &inputs.config;
        let local_rank = dist.as_ref().map(|d| d.local_rank);
        let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.coll.rank(), d.coll.world()));
        let prefix = if world > 1 { format!("[rank {rank}] ") } else { String::new() };
        let accum = cfg.train.accumulate_steps.max(1);
        let parts = world * accum;
        let my_parts = rank * accum..(rank + 1) * accum;
        let out = cfg.output_dir.clone();
        let latest = out.join(LATEST);
        let best_path = out.join(BEST);
        let config_text = cfg.to_toml();
        // Only rank 0 touches the output directory.
        if rank == 0 {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for stale in checkpoint::remove_stale_temporaries(&out)? {
                if !opts.quiet {
                    eprintln!("{prefix}removed {}, a partial checkpoint of a run that is no longer alive", stale.display());
                }
            }
            if opts.resume && !latest.exists() {
                bail!(
                    "--resume: there is no checkpoint to resume in {} ({LATEST} not found); start a fresh run without --resume",
                    out.display()
                );
            }
            std::fs::write(out.join("config.toml"), &config_text)
                .with_context(|| format!("writing {}", out.join("config.toml").display()))?;
        }

        let shape = InputShape { frames: cfg.data.frames, regions: cfg.data.regions, text_len: cfg.data.text_len };
        let o = &cfg.optim;
        let mut coll = dist.as_mut().map(|d| &mut d.coll);
        let (mut model, opt, state) = if rank != 0 {
            // Rank 0's weights, optimiser and state, whatever this process could load.
            receive_start(coll.as_deref_mut().map(|c| &mut **c).expect("rank > 0 has a process group"))?
        } else {
            let start = if opts.resume {
                resume_from(cfg, &latest)?
            } else {
                let model = build_model(cfg, opts.init.as_deref())?;
                let n = model.params.len();
                let opt = AdamW::new(n, o.lr, o.betas[0], o.betas[1], o.eps, o.weight_decay);
                (model, opt, fresh_state(cfg.seed))
            };
            if let Some(c) = coll.as_deref_mut() {
                send_start(&mut **c, &start.0, &start.1, &start.2)?;
            }
            start
        };
        if state.batch_in_epoch > 0 && !state.finished && state.parts_per_step != parts {
            bail!(
                "{}: the checkpoint stopped inside an epoch of steps of {} micro-batches; this run has {parts}                  (world size {world} × accumulate_steps {accum}), which cuts the epoch differently: resume with the                  world size × accumulate_steps it ran with (or from an end-of-epoch checkpoint)",
                latest.display(),
                state.parts_per_step
            );
        }
        // Dropout draws continue exactly where the checkpoint left them (steps of one part;
        // steps of several draw each part's from (step, part)).
        let p = cfg.train.text_dropout;
        model.set_text_dropout(TextDropout { hidden: p, attention: p }, 0);
        model.set_dropout_rng(Rng::from_state(state.dropout_rng));
        let resumed = state.step > 0 || state.epoch > 1;
        let mut log = if rank == 0 { Log::open(&out.join("log.jsonl"), resumed)? } else { Log::disabled() };
        if state.finished {
            if !opts.quiet {
                eprintln!("{prefix}{}: already finished ({} steps); nothing to do", latest.display(), state.step);
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
                params_hash: params_hash(&model.params.data),
            })));
        }
        let mut start = json!({"kind": "start", "name": cfg.name, "step": state.step, "epoch": state.epoch, "resumed": resumed, "params": model.params.len()});
        if parts > 1 {
            start["world_size"] = world.into();
            start["accumulate_steps"] = accum.into();
            start["global_batch"] = (cfg.data.batch_size * parts).into();
        }
        if let (Some(c), Some(lr)) = (coll.as_ref(), local_rank) {
            start["engine"] = c.engine().into();
            start["local_rank_of_rank_0"] = lr.into();
        }
        log.write(start)?;

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
        let batches_per_epoch = loader.steps_per_epoch(parts) as u64;
        if batches_per_epoch == 0 {
            bail!(
                "{}: no training step (datasets have {sizes:?} samples, global batch {} = batch size {} × {parts} parts)",
                cfg.name,
                cfg.data.batch_size * parts,
                cfg.data.batch_size
            );
        }
        let total_steps = (batches_per_epoch * cfg.train.epochs as u64).min(cfg.train.max_steps.unwrap_or(u64::MAX));
        let loss_cfg = LossConfig { temperature: cfg.loss.temperature, lambda: cfg.loss.lambda, masked_mean: cfg.loss.masked_mean };
        // Without a validation set only the training loss can be monitored.
        let monitor = if inputs.val.is_some() { cfg.train.monitor.as_str() } else { "train_loss" };

        let pb = if opts.quiet || world > 1 { ProgressBar::hidden() } else { ProgressBar::new(total_steps) };
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
            tty: world == 1 && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last_line: Instant::now(),
            coll: dist.take().map(|d| d.coll),
            rank,
            parts,
            my_parts,
            acc: Vec::new(),
            prefix,
            verify: std::env::var("DEMOVLP_DIST_VERIFY").is_ok_and(|v| v == "1"),
        })))
    }

    /// A checkpoint of the current weights, optimiser and state (with the dropout
    /// generator as it is now).
    /// Only rank 0 writes; the other ranks of a data-parallel run return at once.
    fn save(&self, path: &Path) -> Result<()> {
        if self.rank != 0 {
            return Ok(());
        }
        let mut st = self.state.clone();
        // Steps of several parts draw their dropout from (step, part): the generator of the
        // state is then unused and kept as it was, so equal runs write equal states.
        if self.parts == 1 {
            st.dropout_rng = self.model.dropout_rng().state();
        }
        st.parts_per_step = self.parts;
        checkpoint::save(path, &self.model.config, &self.model.params, &self.opt, &st, &self.config_text)
    }

    /// The optimiser steps of the epoch in progress, from `state.batch_in_epoch` on.
    /// Returns the epoch's mean training loss (NaN without a step), or None when the run
    /// stopped inside it (`max_steps` reached, or the stop flag: then `interrupted`).
    fn run_epoch(&mut self) -> Result<Option<f64>> {
        if self.parts > 1 {
            return self.run_epoch_parts();
        }
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
        self.after_step(lr, [outp.loss_total, outp.loss_global, outp.loss_local], batch.batch, planned)?;
        Ok(outp.loss_total)
    }

    /// The epoch's steps with several micro-batches each (accumulation and/or ranks); see
    /// the module doc. Returns as [`Run::run_epoch`].
    fn run_epoch_parts(&mut self) -> Result<Option<f64>> {
        let cfg = &self.inputs.config;
        let mut pre = self.loader.epoch_parts_from(self.state.epoch_seed, self.state.batch_in_epoch, self.parts, self.my_parts.clone());
        let planned = pre.planned();
        let (mut epoch_loss, mut epoch_steps) = (0.0f64, 0usize);
        while self.state.batch_in_epoch < planned {
            // Every rank has the same step count: they all stop here together.
            if cfg.train.max_steps.is_some_and(|m| self.state.step >= m) {
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
            let (loss, stop) = self.step_parts(&parts, planned)?;
            if let Some(loss) = loss {
                epoch_loss += loss as f64;
                epoch_steps += 1;
            }
            if stop {
                self.interrupted = true;
                return Ok(None);
            }
        }
        Ok(Some(if epoch_steps > 0 { epoch_loss / epoch_steps as f64 } else { f64::NAN }))
    }

    /// One optimiser step from this rank's `parts` of the step (and the other ranks'):
    /// returns its mean loss over the parts (None when no part had 2 samples: no step) and
    /// whether the ranks agreed to stop after it (a stop flag raised on any of them).
    fn step_parts(&mut self, parts: &[Batch], planned: usize) -> Result<(Option<f32>, bool)> {
        let cfg = &self.inputs.config;
        let n = self.model.params.len();
        let mut acc = std::mem::take(&mut self.acc);
        acc.clear();
        acc.resize(n + N_STATS, 0.0);
        let mut bad_here = None;
        for b in parts {
            if b.batch < 2 {
                continue;
            }
            self.model.set_dropout_rng(Rng::new(part_dropout_seed(cfg.seed, self.state.step, b.part)));
            let out = self.model.forward_backward(&batch_ref(b), &self.loss_cfg, cfg.loss.use_local);
            if !out.loss_total.is_finite() && bad_here.is_none() {
                bad_here = Some((b.part, out.loss_total, b.clips.join(", ")));
            }
            for (a, g) in acc[..n].iter_mut().zip(&self.model.params.grad) {
                *a += *g;
            }
            let st = &mut acc[n..];
            st[ST_PARTS] += 1.0;
            st[ST_LOSS] += out.loss_total;
            st[ST_GLOBAL] += out.loss_global;
            st[ST_LOCAL] += out.loss_local;
            st[ST_SAMPLES] += b.batch as f32;
        }
        let st = &mut acc[n..];
        st[ST_SKIPPED] = parts.iter().map(|b| b.skipped.len()).sum::<usize>() as f32;
        if self.opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            st[ST_STOP] = 1.0;
            st[ST_SIGTERM] = (stop_signal() == Some(libc::SIGTERM)) as u8 as f32;
        }
        if let Some(c) = self.coll.as_deref_mut() {
            c.all_reduce_sum(&mut acc).with_context(|| format!("{}: step {}", cfg.name, self.state.step + 1))?;
        }
        let st: [f32; N_STATS] = acc[n..].try_into().unwrap();
        self.skipped_total += st[ST_SKIPPED] as usize;
        let stop = st[ST_STOP] > 0.0;
        if stop && stop_signal().is_none() {
            PEER_STOP_SIGNAL.store(if st[ST_SIGTERM] > 0.0 { libc::SIGTERM } else { libc::SIGINT }, Ordering::SeqCst);
        }
        if st[ST_PARTS] == 0.0 {
            self.acc = acc;
            self.state.batch_in_epoch += 1;
            return Ok((None, stop));
        }
        if !st[ST_LOSS].is_finite() {
            let state = &self.state;
            let last_good =
                if self.latest.exists() { self.latest.display().to_string() } else { "none (no checkpoint written yet)".into() };
            let (where_, clips) = match &bad_here {
                Some((part, loss, clips)) => (format!("part {part}, loss {loss}"), clips.clone()),
                None => ("on another rank".to_string(), "see that rank's message".to_string()),
            };
            self.log.write(json!({"kind": "error", "step": state.step, "loss": st[ST_LOSS].to_string(), "where": where_}))?;
            bail!(
                "{}: loss is not finite at step {} (epoch {}, step {} of the epoch; {where_}); batch clips: {clips}; last good checkpoint: {}",
                cfg.name,
                state.step + 1,
                state.epoch,
                state.batch_in_epoch,
                last_good
            );
        }
        let lr = learning_rate(&cfg.optim, self.state.epoch, self.state.step, self.total_steps);
        let inv = 1.0 / st[ST_PARTS];
        for (g, a) in self.model.params.grad.iter_mut().zip(&acc[..n]) {
            *g = *a * inv;
        }
        self.acc = acc;
        self.opt.lr = lr;
        self.opt.step(&mut self.model.params);
        if self.verify {
            self.verify_params()?;
        }
        let loss = st[ST_LOSS] / st[ST_PARTS];
        let losses = [loss, st[ST_GLOBAL] / st[ST_PARTS], st[ST_LOCAL] / st[ST_PARTS]];
        self.after_step(lr, losses, st[ST_SAMPLES] as usize, planned)?;
        Ok((Some(loss), stop))
    }

    /// Compares this rank's parameters with rank 0's (their hash), after step `state.step + 1`.
    fn verify_params(&mut self) -> Result<()> {
        let Some(c) = self.coll.as_deref_mut() else { return Ok(()) };
        let mine = params_hash(&self.model.params.data);
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

    /// Counters, log line, progress and periodic checkpoint after an optimiser step of
    /// `samples` samples with losses (total, global, local).
    fn after_step(&mut self, lr: f32, [loss_total, loss_global, loss_local]: [f32; 3], samples: usize, planned: usize) -> Result<()> {
        let cfg = &self.inputs.config;
        let state = &mut self.state;
        state.step += 1;
        state.batch_in_epoch += 1;
        state.samples_seen += samples as u64;
        let window = &mut self.window;
        window.0 += loss_total as f64;
        window.1 += 1;
        window.3 += samples;
        self.pb.set_position(state.step.min(self.total_steps));
        if state.step.is_multiple_of(cfg.train.log_every.max(1)) || state.batch_in_epoch == planned {
            let secs = window.2.elapsed().as_secs_f64().max(1e-9);
            let sps = window.3 as f64 / secs;
            self.pb.set_message(format!("loss {:.4} lr {:.1e} {:.1} samples/s", window.0 / window.1 as f64, lr, sps));
            self.log.write(json!({
                "kind": "step", "step": state.step, "epoch": state.epoch, "lr": lr,
                "loss": loss_total, "loss_global": loss_global, "loss_local": loss_local,
                "loss_avg": window.0 / window.1 as f64, "samples_per_s": sps, "elapsed_s": self.t0.elapsed().as_secs_f64(),
            }))?;
            *window = (0.0, 0, Instant::now(), 0);
        }
        // Without a terminal the bar draws nothing (logs of batch jobs): a plain line every
        // few seconds instead.
        if !self.opts.quiet && !self.tty && self.last_line.elapsed().as_secs_f64() >= demovlp_data::plain_progress_interval() {
            let elapsed = self.t0.elapsed().as_secs_f64();
            eprintln!(
                "{}{}: step {}/{} (epoch {}), lr {:.2e}, loss {:.4}, {:.0}s",
                self.prefix, cfg.name, state.step, self.total_steps, state.epoch, lr, loss_total, elapsed
            );
            self.last_line = Instant::now();
        }
        if cfg.train.checkpoint_every > 0 && state.step.is_multiple_of(cfg.train.checkpoint_every) {
            self.save(&self.latest)?;
        }
        Ok(())
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
        let mut value = monitored(self.monitor, metrics.as_ref(), train_loss);
        // Rank 0's value decides for every rank (they computed the same, but decisions
        // must not depend on it).
        if let Some(c) = self.coll.as_deref_mut() {
            let mut b = value.to_le_bytes().to_vec();
            c.broadcast_bytes(&mut b).context("sharing the epoch's monitored value")?;
            value = f64::from_le_bytes(b.as_slice().try_into().context("monitored value: 8 bytes expected")?);
        }
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
        // No rank leaves before rank 0 has written its checkpoint (a launcher may stop the
        // others as soon as one exits).
        if let Some(c) = self.coll.as_deref_mut() {
            c.barrier().context("the end of the run")?;
        }
        self.pb.finish_and_clear();
        let seconds = self.t0.elapsed().as_secs_f64();
        self.log.write(json!({"kind": "end", "step": state.step, "epoch": self.epochs_done, "interrupted": self.interrupted, "early_stopped": self.stopped_early, "seconds": seconds, "skipped_samples": self.skipped_total}))?;
        drop(self.log);
        if self.rank == 0 {
            write_plots(&self.out, &cfg.name)?;
        }
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
            params_hash: params_hash(&self.model.params.data),
        };
        if self.rank == 0 {
            let table = summary_table(cfg, &result, self.skipped_total);
            let summary = self.out.join("summary.txt");
            std::fs::write(&summary, &table).with_context(|| format!("cannot write {}", summary.display()))?;
            if !self.opts.quiet {
                eprint!("{table}");
            }
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
        parts_per_step: 1,
    }
}

/// Rank 0's side of the start of a data-parallel run: model sizes, optimiser settings and
/// trainer state (JSON), then the weights and both AdamW moments.
fn send_start(c: &mut dyn Collective, model: &Model, opt: &AdamW, state: &TrainerState) -> Result<()> {
    let head = json!({
        "model_config": model.config, "state": state, "adam_t": opt.t,
        "adam": [opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay],
    });
    let mut bytes = head.to_string().into_bytes();
    c.broadcast_bytes(&mut bytes).context("sending the starting state to the other ranks")?;
    let mut data = model.params.data.clone();
    let (mut m, mut v) = (opt.m.clone(), opt.v.clone());
    for (what, buf) in [("weights", &mut data), ("AdamW m", &mut m), ("AdamW v", &mut v)] {
        c.broadcast_f32(buf).with_context(|| format!("sending the starting {what} to the other ranks"))?;
    }
    Ok(())
}

/// The other ranks' side of [`send_start`].
fn receive_start(c: &mut dyn Collective) -> Result<(Model, AdamW, TrainerState)> {
    let mut bytes = Vec::new();
    c.broadcast_bytes(&mut bytes).context("receiving the starting state from rank 0")?;
    let head: serde_json::Value = serde_json::from_slice(&bytes).context("rank 0's starting state")?;
    let config = serde_json::from_value(head["model_config"].clone()).context("rank 0's model sizes")?;
    let state: TrainerState = serde_json::from_value(head["state"].clone()).context("rank 0's trainer state")?;
    let a: Vec<f32> = serde_json::from_value(head["adam"].clone()).context("rank 0's AdamW settings")?;
    if a.len() != 5 {
        bail!("rank 0's AdamW settings: 5 values expected, got {}", a.len());
    }
    let mut model = Model::new(config);
    let n = model.params.len();
    let mut opt = AdamW::new(n, a[0], a[1], a[2], a[3], a[4]);
    opt.t = head["adam_t"].as_u64().context("rank 0's AdamW step count")?;
    c.broadcast_f32(&mut model.params.data).context("receiving the starting weights from rank 0")?;
    c.broadcast_f32(&mut opt.m).context("receiving the starting AdamW m from rank 0")?;
    c.broadcast_f32(&mut opt.v).context("receiving the starting AdamW v from rank 0")?;
    Ok((model, opt, state))
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
            parts_per_step: 1,
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
