//! Retrieval training (pre-training and fine-tuning, SPEC §6–7) as a [`Task`] of the one
//! loop: the two-tower model with the global contrastive and region-word losses, the fused
//! AdamW step for steps of one batch, text dropout continuing one generator (or drawn from
//! (step, part) in steps of several parts), validation by text→video and video→text recall.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use demovlp_data::batches::{Batch, Dataset, InputShape, LoaderConfig};
use demovlp_kernels::rng::Rng;
use demovlp_model::{AdamW, Backend, Cpu, Model, ModelConfig, Params, TextDropout};
use demovlp_retrieval::{LossConfig, RetrievalMetrics, ScoreMode};
use serde_json::json;

use crate::checkpoint::TrainerState;
use crate::config::{monitor_higher_is_better, TrainConfig};
use crate::eval::{evaluate, EvalOptions, EvalSet};
use crate::runlog::metrics_json;
use crate::task::{Losses, Monitor, PendingLosses, StepAt, Task};
use crate::text::Tokenizer;
use crate::trainer::{self, batch_ref, part_dropout_seed, Dist, LoopSettings, RunOptions, RunResult};
use crate::weights::build_model;

/// Everything a retrieval run trains and validates on.
pub struct TrainInputs {
    pub config: TrainConfig,
    pub train: Vec<Dataset>,
    pub val: Option<EvalSet>,
    pub tokenizer: Arc<Tokenizer>,
}

/// Train per `inputs.config` on the CPU. See [`train_on`].
pub fn train(inputs: &TrainInputs, opts: &RunOptions) -> Result<RunResult> {
    train_on(&Cpu, inputs, opts, None)
}

/// [`train`] as one rank of a data-parallel run (`dist`; None = a single process).
pub fn train_with(inputs: &TrainInputs, opts: &RunOptions, dist: Option<Dist>) -> Result<RunResult> {
    train_on(&Cpu, inputs, opts, dist)
}

/// Train per `inputs.config` on the backend `be` (see [`trainer::run`]).
pub fn train_on<B: Backend>(be: &B, inputs: &TrainInputs, opts: &RunOptions, dist: Option<Dist>) -> Result<RunResult> {
    let settings = loop_settings(&inputs.config);
    let mut task = RetrievalTask::new(&inputs.config, opts.init.as_deref(), inputs.val.as_ref(), &inputs.tokenizer);
    trainer::run(be, &mut task, &settings, (inputs.train.clone(), inputs.tokenizer.clone()), opts, dist)
}

/// The loop's settings of a retrieval config.
pub fn loop_settings(cfg: &TrainConfig) -> LoopSettings {
    let t = &cfg.train;
    LoopSettings {
        name: cfg.name.clone(),
        seed: cfg.seed,
        output_dir: cfg.output_dir.clone(),
        config_text: cfg.to_toml(),
        epochs: t.epochs,
        max_steps: t.max_steps,
        log_every: t.log_every,
        checkpoint_every: t.checkpoint_every,
        accumulate_steps: t.accumulate_steps,
        early_stopping_patience: t.early_stopping_patience,
        optim: cfg.optim.clone(),
        loader: LoaderConfig {
            batch_size: cfg.data.batch_size,
            shape: shape(cfg),
            samples_per_epoch: cfg.data.samples_per_epoch,
            threads: cfg.data.workers,
            prefetch: 2,
            skip_bad: cfg.data.skip_bad_samples,
            ..Default::default()
        },
    }
}

fn shape(cfg: &TrainConfig) -> InputShape {
    InputShape { frames: cfg.data.frames, regions: cfg.data.regions, text_len: cfg.data.text_len }
}

/// The retrieval task of one run.
pub struct RetrievalTask<'a> {
    cfg: &'a TrainConfig,
    init: Option<&'a Path>,
    val: Option<&'a EvalSet>,
    tok: &'a Tokenizer,
    loss: LossConfig,
    /// How long the last validation took (its log line).
    eval_seconds: f64,
}

impl<'a> RetrievalTask<'a> {
    pub fn new(cfg: &'a TrainConfig, init: Option<&'a Path>, val: Option<&'a EvalSet>, tok: &'a Tokenizer) -> Self {
        let loss = LossConfig { temperature: cfg.loss.temperature, lambda: cfg.loss.lambda, masked_mean: cfg.loss.masked_mean };
        RetrievalTask { cfg, init, val, tok, loss, eval_seconds: 0.0 }
    }

    fn with_dropout<B: Backend>(&self, mut m: Model<B>) -> Model<B> {
        let p = self.cfg.train.text_dropout;
        m.set_text_dropout(TextDropout { hidden: p, attention: p }, 0);
        m
    }
}

/// The losses of a step read late: `[loss_global, loss_local]`, the total their sum (as
/// `LossOutputs::loss_total`).
fn retrieval_losses(v: &[f32]) -> Losses {
    Losses { total: v[0] + v[1], terms: [v[0], v[1]] }
}

/// The value of the monitored metric `name` (`train_loss` without metrics).
pub fn monitored_value(name: &str, m: Option<&RetrievalMetrics>, train_loss: f64) -> f64 {
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

impl<B: Backend> Task<B> for RetrievalTask<'_> {
    type Model = Model<B>;
    type Eval = RetrievalMetrics;
    const KIND: &'static str = "retrieval";
    const LOSS_TERMS: &'static [&'static str] = &["loss_global", "loss_local"];
    const OUTPUTS: &'static [&'static str] = &["summary.txt", "recall.svg"];

    fn groups(m: &Model<B>) -> Vec<(&'static str, &Params<B>)> {
        vec![(crate::checkpoint::V1_GROUP, &m.params)]
    }
    fn groups_mut(m: &mut Model<B>) -> Vec<(&'static str, &mut Params<B>)> {
        vec![(crate::checkpoint::V1_GROUP, &mut m.params)]
    }
    fn describe(m: &Model<B>) -> (ModelConfig, serde_json::Value) {
        (m.config.clone(), serde_json::Value::Null)
    }
    fn build(&self, be: &B, config: ModelConfig, _extra: &serde_json::Value) -> Result<Model<B>> {
        if self.cfg.model_config()? != config {
            bail!("the checkpoint's model sizes differ from the config's [model]; resume with the config the run started with");
        }
        Ok(self.with_dropout(Model::new_on(be.clone(), config)))
    }
    fn init(&mut self, be: &B) -> Result<Model<B>> {
        Ok(self.with_dropout(build_model(self.cfg, self.init)?.on_backend(be)))
    }

    fn start(&mut self, m: &mut Model<B>, state: &TrainerState) {
        // Dropout draws continue exactly where the checkpoint left them (steps of one part;
        // steps of several draw each part's from (step, part)).
        m.set_dropout_rng(Rng::from_state(state.dropout_rng));
    }
    fn set_dropout(&mut self, m: &mut Model<B>, at: StepAt, _state: &TrainerState) {
        if at.parts > 1 {
            m.set_dropout_rng(Rng::new(part_dropout_seed(self.cfg.seed, at.step, at.part)));
        }
    }
    fn dropout_state(&self, m: &Model<B>) -> Option<[u64; 4]> {
        Some(m.dropout_rng().state())
    }
    fn forward_backward(&mut self, m: &mut Model<B>, b: &Batch) -> Result<PendingLosses> {
        let read = m.forward_backward_late(&batch_ref(b), &self.loss, self.cfg.loss.use_local);
        Ok(PendingLosses::late(read, retrieval_losses))
    }
    fn fused_step(&mut self, m: &mut Model<B>, b: &Batch, opts: &mut [AdamW<B>]) -> Option<PendingLosses> {
        // AdamW is fused into the backward pass (block by block; same results as a
        // separate step, less memory); the losses are read later.
        let read = m.train_step_fused_late(&batch_ref(b), &self.loss, self.cfg.loss.use_local, &mut opts[0]);
        Some(PendingLosses::late(read, retrieval_losses))
    }

    fn validate(&mut self, m: &mut Model<B>) -> Result<Option<RetrievalMetrics>> {
        let Some(val) = self.val else { return Ok(None) };
        let c = self.cfg;
        let eo = EvalOptions {
            shape: shape(c),
            batch_size: c.train.eval_batch_size,
            lambda: c.loss.lambda,
            mode: ScoreMode::Aligned,
            use_local: c.loss.use_local,
            masked_mean: c.loss.masked_mean,
            progress: false,
        };
        let r = evaluate(m, val, self.tok, &eo)?;
        self.eval_seconds = r.seconds;
        Ok(Some(r.metrics))
    }
    fn monitor(&self) -> Monitor {
        // Without a validation set only the training loss can be monitored.
        let name = if self.val.is_some() { self.cfg.train.monitor.clone() } else { "train_loss".into() };
        Monitor { higher_is_better: monitor_higher_is_better(&name), name }
    }
    fn monitored(&self, e: Option<&RetrievalMetrics>, train_loss: f64, _epoch: usize) -> f64 {
        monitored_value(&<Self as Task<B>>::monitor(self).name, e, train_loss)
    }
    fn epoch_lines(&self, line: serde_json::Value, e: Option<&RetrievalMetrics>) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        if let (Some(m), Some(val)) = (e, self.val) {
            lines.push(json!({
                "kind": "eval", "epoch": line["epoch"], "step": line["step"], "split": val.name,
                "train_loss": line["train_loss"], "seconds": self.eval_seconds, "metrics": metrics_json(m),
            }));
        }
        lines.push(line);
        lines
    }
    fn write_plots(&self, out: &Path, name: &str) -> Result<()> {
        crate::runlog::write_plots(out, name)
    }
    fn summary(&self, m: &RetrievalMetrics) -> String {
        let mut s = format!(" {:<10} {:>7} {:>7} {:>7} {:>7} {:>7}\n", "last val", "R@1", "R@5", "R@10", "MedR", "MeanR");
        for (n, d) in [("t2v", &m.t2v), ("v2t", &m.v2t)] {
            s += &format!(" {:<10} {:>7.2} {:>7.2} {:>7.2} {:>7.1} {:>7.1}\n", n, d.r1, d.r5, d.r10, d.medr, d.meanr);
        }
        s
    }
}
