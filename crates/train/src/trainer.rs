//! The training loop: AdamW + schedule over interleaved datasets, validation after every
//! epoch, best/latest checkpoints, early stopping, exact resume, Ctrl-C and NaN handling,
//! JSONL log, progress bar, and SVG plots + a summary table at the end.

use std::io::Write;
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
use crate::plot::{line_chart, Series};
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
    /// Continue from `output_dir/checkpoint_latest.safetensors` if present.
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

/// Ctrl-C handler: the first press raises the returned flag (the loop then saves a
/// resumable checkpoint and stops); a second press exits at once.
pub fn install_ctrlc() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step and saving a resumable checkpoint (Ctrl-C again to abort)");
    });
    flag
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

struct Log {
    file: std::fs::File,
}

impl Log {
    fn open(path: &Path, append: bool) -> Result<Log> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("opening log {}", path.display()))?;
        Ok(Log { file })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        Ok(())
    }
}

pub fn metrics_json(m: &RetrievalMetrics) -> serde_json::Value {
    let d = |x: &demovlp_retrieval::DirectionMetrics| json!({"R1": x.r1, "R5": x.r5, "R10": x.r10, "R50": x.r50, "MedR": x.medr, "MeanR": x.meanr, "geometric_mean_R1-R5-R10": x.geometric_mean_r1_r5_r10});
    json!({"t2v": d(&m.t2v), "v2t": d(&m.v2t)})
}

/// Train per `inputs.config`. Returns when all epochs ran, early stopping triggered,
/// `max_steps` was reached, or the stop flag was raised (then `interrupted`).
pub fn train(inputs: &TrainInputs, opts: &RunOptions) -> Result<RunResult> {
    let t0 = Instant::now();
    let cfg = &inputs.config;
    let out = cfg.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let latest = out.join(LATEST);
    let best_path = out.join(BEST);
    let config_text = cfg.to_toml();
    std::fs::write(out.join("config.toml"), &config_text).with_context(|| format!("writing {}", out.join("config.toml").display()))?;

    let shape = InputShape { frames: cfg.data.frames, regions: cfg.data.regions, text_len: cfg.data.text_len };
    let o = &cfg.optim;
    let (mut model, mut opt, mut state) = if opts.resume && latest.exists() {
        let ck = checkpoint::load(&latest)?;
        if cfg.model_config()? != ck.model_config {
            bail!(
                "{}: the checkpoint's model sizes differ from the config's [model]; resume with the config the run started with",
                latest.display()
            );
        }
        let mut model = Model::new(ck.model_config.clone());
        ck.fill_params(&mut model.params)?;
        (model, ck.optimizer, ck.state)
    } else {
        let model = build_model(cfg, opts.init.as_deref())?;
        let n = model.params.len();
        let opt = AdamW::new(n, o.lr, o.betas[0], o.betas[1], o.eps, o.weight_decay);
        let mut rng = epoch_seed_rng(cfg.seed);
        let epoch_seed = rng.next_u64();
        let state = TrainerState {
            epoch: 1,
            batch_in_epoch: 0,
            step: 0,
            epoch_seed,
            rng: rng.state(),
            dropout_rng: Rng::new(cfg.seed ^ 0xD80_0C7).state(),
            samples_seen: 0,
            best: None,
            best_epoch: None,
            epochs_since_best: 0,
            finished: false,
        };
        (model, opt, state)
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
        return Ok(RunResult {
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
        });
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
    let higher = monitor_higher_is_better(monitor);
    let save = |model: &Model, opt: &AdamW, st: &TrainerState, path: &Path| {
        let mut st = st.clone();
        st.dropout_rng = model.dropout_rng().state();
        checkpoint::save(path, &model.config, &model.params, opt, &st, &config_text)
    };

    let pb = if opts.quiet { ProgressBar::hidden() } else { ProgressBar::new(total_steps) };
    pb.set_style(ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ETA {eta}").unwrap().progress_chars("=> "));
    pb.set_prefix(cfg.name.clone());
    pb.set_position(state.step.min(total_steps));

    let mut interrupted = false;
    let mut last_metrics = None;
    let mut skipped_total = 0usize;
    let mut stopped_early = false;
    let mut epochs_done = state.epoch - 1;
    let mut window = (0.0f64, 0usize, Instant::now(), 0usize); // loss sum, steps, since, samples
    'epochs: while state.epoch <= cfg.train.epochs {
        // The epoch seed the state (checkpoint) carries: epoch_seed(cfg.seed, epoch) for runs of this code.
        let mut pre = loader.epoch_from(state.epoch_seed, state.batch_in_epoch);
        let planned = pre.planned();
        let (mut epoch_loss, mut epoch_steps) = (0.0f64, 0usize);
        while state.batch_in_epoch < planned {
            if cfg.train.max_steps.is_some_and(|m| state.step >= m) {
                break 'epochs;
            }
            if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                interrupted = true;
                break 'epochs;
            }
            let batch = pre.next().context("batch loader stopped")??;
            debug_assert_eq!(batch.index, state.batch_in_epoch);
            skipped_total += batch.skipped.len();
            for s in &batch.skipped {
                log.write(json!({"kind": "skipped", "step": state.step, "clip": s.clip, "reason": s.reason}))?;
            }
            if batch.batch < 2 {
                state.batch_in_epoch += 1;
                continue;
            }
            let lr = learning_rate(o, state.epoch, state.step, total_steps);
            // AdamW is fused into the backward pass (block by block; same results as a
            // separate step, less memory). A non-finite loss returns before any update.
            opt.lr = lr;
            let outp = model.train_step_fused(&batch_ref(&batch), &loss_cfg, cfg.loss.use_local, &mut opt);
            if !outp.loss_total.is_finite() {
                let last_good = if latest.exists() { latest.display().to_string() } else { "none (no checkpoint written yet)".into() };
                log.write(json!({"kind": "error", "step": state.step, "loss": outp.loss_total.to_string(), "clips": batch.clips}))?;
                pb.abandon();
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
            epoch_loss += outp.loss_total as f64;
            epoch_steps += 1;
            window.0 += outp.loss_total as f64;
            window.1 += 1;
            window.3 += batch.batch;
            pb.set_position(state.step.min(total_steps));
            if state.step % cfg.train.log_every.max(1) == 0 || state.batch_in_epoch == planned {
                let secs = window.2.elapsed().as_secs_f64().max(1e-9);
                let sps = window.3 as f64 / secs;
                pb.set_message(format!("loss {:.4} lr {:.1e} {:.1} samples/s", window.0 / window.1 as f64, lr, sps));
                log.write(json!({
                    "kind": "step", "step": state.step, "epoch": state.epoch, "lr": lr,
                    "loss": outp.loss_total, "loss_global": outp.loss_global, "loss_local": outp.loss_local,
                    "loss_avg": window.0 / window.1 as f64, "samples_per_s": sps, "elapsed_s": t0.elapsed().as_secs_f64(),
                }))?;
                window = (0.0, 0, Instant::now(), 0);
            }
            if cfg.train.checkpoint_every > 0 && state.step % cfg.train.checkpoint_every == 0 {
                save(&model, &opt, &state, &latest)?;
            }
        }
        drop(pre);

        // End of epoch: validate, keep the best, move on.
        let train_loss = if epoch_steps > 0 { epoch_loss / epoch_steps as f64 } else { f64::NAN };
        let mut metrics = None;
        if let Some(val) = &inputs.val {
            pb.set_message("validating");
            let eo = EvalOptions {
                shape,
                batch_size: cfg.train.eval_batch_size,
                lambda: cfg.loss.lambda,
                mode: ScoreMode::Aligned,
                use_local: cfg.loss.use_local,
                masked_mean: cfg.loss.masked_mean,
                progress: false,
            };
            let r = evaluate(&mut model, val, &inputs.tokenizer, &eo)?;
            log.write(json!({"kind": "eval", "epoch": state.epoch, "step": state.step, "split": val.name, "train_loss": train_loss, "seconds": r.seconds, "metrics": metrics_json(&r.metrics)}))?;
            metrics = Some(r.metrics);
        } else {
            log.write(json!({"kind": "epoch", "epoch": state.epoch, "step": state.step, "train_loss": train_loss}))?;
        }
        let value = monitored(monitor, metrics.as_ref(), train_loss);
        last_metrics = metrics;
        epochs_done = state.epoch;
        let (improved, stop) = end_epoch(&mut state, value, higher, cfg.train.early_stopping_patience, cfg.train.epochs);
        stopped_early = stop;
        if improved {
            save(&model, &opt, &state, &best_path)?;
        }
        save(&model, &opt, &state, &latest)?;
        if stopped_early {
            log.write(json!({"kind": "early_stop", "epoch": epochs_done, "best_epoch": state.best_epoch, "best": state.best}))?;
            break;
        }
    }
    if interrupted || cfg.train.max_steps.is_some_and(|m| state.step >= m) && !state.finished {
        save(&model, &opt, &state, &latest)?;
    }
    pb.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    log.write(json!({"kind": "end", "step": state.step, "epoch": epochs_done, "interrupted": interrupted, "early_stopped": stopped_early, "seconds": seconds, "skipped_samples": skipped_total}))?;
    drop(log);
    write_plots(&out, &cfg.name)?;
    let result = RunResult {
        output_dir: out.clone(),
        steps: state.step,
        epochs_done,
        seconds,
        interrupted,
        best: state.best,
        best_epoch: state.best_epoch,
        monitor: monitor.to_string(),
        last_metrics,
        latest: latest.clone(),
        best_checkpoint: best_path.exists().then(|| best_path.clone()),
    };
    let table = summary_table(cfg, &result, skipped_total);
    std::fs::write(out.join("summary.txt"), &table)?;
    if !opts.quiet {
        eprint!("{table}");
    }
    Ok(result)
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

/// Loss curves and recall per epoch from the JSONL log (last entry per step wins, so a
/// resumed run's re-done steps replace the old ones).
pub fn write_plots(out: &Path, name: &str) -> Result<()> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap_or_default();
    let mut steps = std::collections::BTreeMap::new();
    let mut evals = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match v["kind"].as_str() {
            Some("step") => {
                steps.insert(v["step"].as_u64().unwrap_or(0), v);
            }
            Some("eval") => {
                evals.insert(v["epoch"].as_u64().unwrap_or(0), v);
            }
            _ => {}
        }
    }
    let series = |key: &str| Series {
        name: key.into(),
        points: steps.iter().filter_map(|(s, v)| v[key].as_f64().map(|y| (*s as f64, y))).collect(),
    };
    let svg =
        line_chart(&format!("{name}: training loss"), "step", "loss", &[series("loss_avg"), series("loss_global"), series("loss_local")]);
    std::fs::write(out.join("loss.svg"), svg)?;
    let mut rs = Vec::new();
    for dir in ["t2v", "v2t"] {
        for k in ["R1", "R5", "R10"] {
            rs.push(Series {
                name: format!("{dir} {k}"),
                points: evals.iter().filter_map(|(e, v)| v["metrics"][dir][k].as_f64().map(|y| (*e as f64, y))).collect(),
            });
        }
    }
    let svg = line_chart(&format!("{name}: validation recall"), "epoch", "recall (%)", &rs);
    std::fs::write(out.join("recall.svg"), svg)?;
    Ok(())
}

fn summary_table(cfg: &TrainConfig, r: &RunResult, skipped: usize) -> String {
    let mut s = String::new();
    let line = "-".repeat(60);
    s += &format!("{line}\n run {:<30} {}\n{line}\n", cfg.name, if r.interrupted { "INTERRUPTED (resumable)" } else { "done" });
    s += &format!(" {:<24} {}\n", "steps", r.steps);
    s += &format!(" {:<24} {}\n", "epochs", r.epochs_done);
    s += &format!(" {:<24} {:.1}\n", "seconds", r.seconds);
    s += &format!(" {:<24} {}\n", "skipped samples", skipped);
    if let Some(b) = r.best {
        s += &format!(" {:<24} {b:.3} (epoch {})\n", format!("best {}", r.monitor), r.best_epoch.unwrap_or(0));
    }
    if let Some(m) = &r.last_metrics {
        s += &format!(" {:<10} {:>7} {:>7} {:>7} {:>7} {:>7}\n", "last val", "R@1", "R@5", "R@10", "MedR", "MeanR");
        for (n, d) in [("t2v", &m.t2v), ("v2t", &m.v2t)] {
            s += &format!(" {:<10} {:>7.2} {:>7.2} {:>7.2} {:>7.1} {:>7.1}\n", n, d.r1, d.r5, d.r10, d.medr, d.meanr);
        }
    }
    s += &format!(" {:<24} {}\n", "latest checkpoint", r.latest.display());
    if let Some(b) = &r.best_checkpoint {
        s += &format!(" {:<24} {}\n", "best checkpoint", b.display());
    }
    s += &format!(" {:<24} {}\n", "log / plots", r.output_dir.join("log.jsonl, loss.svg, recall.svg").display());
    s += &format!("{line}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
