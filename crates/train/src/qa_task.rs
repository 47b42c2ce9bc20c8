//! Video QA fine-tuning (SPEC §8) as a [`Task`] of the one loop: the retrieval towers plus
//! the BUTD head, cross-entropy over the answer vocabulary, two parameter groups
//! (`towers`, then `head`, each with its own AdamW, unfused), dropout of the text tower and
//! of the head's attention reseeded from (seed, epoch, step) before every step (and from
//! the part too in steps of several parts), model selection on validation accuracy, and the
//! best model exported as a QA model directory (`best/`) that `eval-qa` reads. After
//! training the best model is evaluated on the test set.
//!
//! Runs written before the loop was shared kept a `last/` folder (QA model directory, two
//! optimiser files, `state.json`): `--resume` converts it into the shared checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use demovlp_data::batches::{derive_seed, epoch_seed_rng, Batch, LoaderConfig};
use demovlp_kernels::rng::Rng;
use demovlp_model::qa::{QaHead, QaHeadConfig, QaModel};
use demovlp_model::{AdamW, Backend, Cpu, Model, ModelConfig, Params, TextDropout};
use serde_json::json;

use crate::checkpoint::{self, CheckpointInfo, GroupRef, TrainerState, LATEST};
use crate::qa::{load_qa_dir, save_qa_dir_on, HEAD_KEY};
use crate::qa_train::{evaluate_qa, init_qa_model, read_qa_dataset, QaConfig, QaDatasetConfig, QaEval, QaSet, Vocabulary};
use crate::task::{Losses, Monitor, PendingLosses, StepAt, Task};
use crate::text::Tokenizer;
use crate::trainer::{self, batch_ref, Dist, LoopSettings, RunOptions, RunResult};

/// The folder the best model is exported to (a QA model directory with its vocabulary).
pub const BEST_DIR: &str = "best";

/// A QA run's outcome.
#[derive(Debug)]
pub struct QaRunReport {
    pub result: RunResult<QaEval>,
    /// The best model on the test set (a finished run with a test set).
    pub test: Option<QaEval>,
    /// Training questions left out: their answer is outside the vocabulary.
    pub skipped_out_of_vocabulary: usize,
}

/// Seeds of a step's dropout draws (`stream`: text tower or head attention).
fn step_seed(seed: u64, epoch: usize, step: usize, stream: u64) -> u64 {
    derive_seed(seed ^ stream, epoch as u64, step as u64)
}

/// The QA task of one run.
pub struct QaTask<'a> {
    cfg: &'a QaConfig,
    init: Option<&'a Path>,
    vocab: &'a Vocabulary,
    train: &'a QaSet,
    val: Option<&'a QaSet>,
    tok: &'a Tokenizer,
    /// The starting model when given in memory (else read from `init` / `[model] init`).
    initial: Option<QaModel>,
}

impl<'a> QaTask<'a> {
    pub fn new(
        cfg: &'a QaConfig,
        init: Option<&'a Path>,
        vocab: &'a Vocabulary,
        train: &'a QaSet,
        val: Option<&'a QaSet>,
        tok: &'a Tokenizer,
    ) -> Self {
        QaTask { cfg, init, vocab, train, val, tok, initial: None }
    }

    /// Starts a fresh run from `m` (on the CPU; moved to the run's backend).
    pub fn with_initial(mut self, m: QaModel) -> Self {
        self.initial = Some(m);
        self
    }
}

impl<B: Backend> Task<B> for QaTask<'_> {
    type Model = QaModel<B>;
    type Eval = QaEval;
    const KIND: &'static str = "qa";
    const LOSS_TERMS: &'static [&'static str] = &[];
    const OUTPUTS: &'static [&'static str] = &[BEST_DIR, "accuracy.svg"];

    fn groups(m: &QaModel<B>) -> Vec<(&'static str, &Params<B>)> {
        vec![("towers", &m.base.params), ("head", &m.head.params)]
    }
    fn groups_mut(m: &mut QaModel<B>) -> Vec<(&'static str, &mut Params<B>)> {
        vec![("towers", &mut m.base.params), ("head", &mut m.head.params)]
    }
    fn describe(m: &QaModel<B>) -> (ModelConfig, serde_json::Value) {
        (m.base.config.clone(), json!({ HEAD_KEY: m.head.config }))
    }
    fn build(&self, be: &B, config: ModelConfig, extra: &serde_json::Value) -> Result<QaModel<B>> {
        let head: QaHeadConfig = serde_json::from_value(extra[HEAD_KEY].clone()).context("the QA head's sizes")?;
        let na = self.vocab.label2ans.len();
        ensure!(head.answers == na, "the head has {} answers, the vocabulary {na}", head.answers);
        Ok(QaModel::new(Model::new_on(be.clone(), config), QaHead::new_on(be.clone(), head)))
    }
    fn init(&mut self, be: &B) -> Result<QaModel<B>> {
        let na = self.vocab.label2ans.len();
        let m = match self.initial.take() {
            Some(m) => m,
            None => {
                let init = self.init.or(self.cfg.model.init.as_deref()).context("no initial model: give --init or [model] init")?;
                init_qa_model(init, self.cfg.model.hidden, na, self.cfg.seed)?
            }
        };
        ensure!(m.head.config.answers == na, "the initial model's head has {} answers, the vocabulary {na}", m.head.config.answers);
        Ok(m.on_backend(be))
    }

    fn set_dropout(&mut self, m: &mut QaModel<B>, at: StepAt, _state: &TrainerState) {
        let (seed, p) = (self.cfg.seed, self.cfg.train.text_dropout);
        let mut text = step_seed(seed, at.epoch, at.batch_in_epoch, 0x7E47);
        let mut att = step_seed(seed, at.epoch, at.batch_in_epoch, 0xA77E);
        if at.parts > 1 {
            text = derive_seed(text, at.part as u64, 0x9A27);
            att = derive_seed(att, at.part as u64, 0x9A27);
        }
        m.base.set_text_dropout(TextDropout { hidden: p, attention: p }, text);
        m.set_attention_dropout(self.cfg.train.attention_dropout, att);
    }
    fn dropout_state(&self, _m: &QaModel<B>) -> Option<[u64; 4]> {
        None
    }
    fn forward_backward(&mut self, m: &mut QaModel<B>, b: &Batch) -> Result<PendingLosses> {
        let labels: Vec<usize> = b
            .sample_ids
            .iter()
            .map(|&i| self.train.questions[i].label.with_context(|| format!("{}: question {i} has no label", self.train.name)))
            .collect::<Result<_>>()?;
        // Only the loss comes back to the host (not the logits), when the loop reads it.
        let read = m.forward_backward_late(&batch_ref(b), &labels);
        Ok(PendingLosses::late(read, |v| Losses { total: v[0], terms: [0.0; 2] }))
    }

    fn validate(&mut self, m: &mut QaModel<B>) -> Result<Option<QaEval>> {
        let Some(val) = self.val else { return Ok(None) };
        evaluate_qa(m, val, self.vocab, self.tok, self.cfg.shape(), self.cfg.train.eval_batch_size).map(Some)
    }
    fn monitor(&self) -> Monitor {
        // Without a validation set the last epoch is the best.
        let name = if self.val.is_some() { "val_accuracy" } else { "epoch" };
        Monitor { name: name.into(), higher_is_better: true }
    }
    fn monitored(&self, e: Option<&QaEval>, _train_loss: f64, epoch: usize) -> f64 {
        e.map_or(epoch as f64, |e| e.accuracy)
    }
    fn epoch_lines(&self, mut line: serde_json::Value, e: Option<&QaEval>) -> Vec<serde_json::Value> {
        if let Some(e) = e {
            line["val_accuracy"] = e.accuracy.into();
            line["val_metrics"] = e.metrics.clone();
        }
        vec![line]
    }
    fn on_best(&self, be: &B, m: &QaModel<B>, out: &Path) -> Result<()> {
        save_qa_dir_on(be, m, Some(&self.vocab.label2ans), &out.join(BEST_DIR))
    }
    fn write_plots(&self, out: &Path, name: &str) -> Result<()> {
        crate::qa_train::write_qa_plots(out, name)
    }
    fn summary(&self, e: &QaEval) -> String {
        format!(" {:<24} {:.2}%\n", "last val accuracy", e.accuracy)
    }
}

/// The loop's settings of a QA config.
pub fn loop_settings(cfg: &QaConfig) -> Result<LoopSettings> {
    let t = &cfg.train;
    Ok(LoopSettings {
        name: cfg.name.clone(),
        seed: cfg.seed,
        output_dir: cfg.output_dir.clone(),
        config_text: toml::to_string_pretty(cfg)?,
        epochs: t.epochs,
        max_steps: t.max_steps,
        log_every: t.log_every,
        checkpoint_every: t.checkpoint_every,
        accumulate_steps: t.accumulate_steps,
        early_stopping_patience: t.early_stopping_patience,
        optim: cfg.optim.clone(),
        loader: LoaderConfig { batch_size: cfg.data.batch_size, shape: cfg.shape(), prefetch: 2, ..Default::default() },
    })
}

/// Question sets of a QA config, opened.
pub struct QaData {
    pub vocab: Vocabulary,
    pub tokenizer: std::sync::Arc<Tokenizer>,
    /// Answerable training questions, and how many were left out.
    pub train: QaSet,
    pub skipped: usize,
    pub val: Option<QaSet>,
    pub test: Option<QaSet>,
}

fn open_set(ds: &QaDatasetConfig, vocab: &Vocabulary, answers_path: &Path) -> Result<QaSet> {
    let q = read_qa_dataset(ds, vocab, answers_path)?;
    let src =
        crate::annotations::open_features(&ds.features).with_context(|| format!("{}: features {}", ds.name, ds.features.display()))?;
    Ok(QaSet::new(&ds.name, q, src))
}

impl QaData {
    pub fn open(cfg: &QaConfig) -> Result<QaData> {
        let vocab = Vocabulary::read(&cfg.data.answers)?;
        let tok = match &cfg.data.tokenizer {
            Some(p) => crate::text::load_tokenizer(p)?,
            None => crate::text::builtin_tokenizer()?,
        };
        let (train, skipped) = open_set(&cfg.data.train, &vocab, &cfg.data.answers)?.answerable();
        ensure!(!train.questions.is_empty(), "{}: no training question has its answer in the vocabulary", cfg.data.train.name);
        let val = cfg.data.val.as_ref().map(|d| open_set(d, &vocab, &cfg.data.answers)).transpose()?;
        let test = cfg.data.test.as_ref().map(|d| open_set(d, &vocab, &cfg.data.answers)).transpose()?;
        Ok(QaData { vocab, tokenizer: std::sync::Arc::new(tok), train, skipped, val, test })
    }
}

/// Fine-tune (or resume, `opts.resume`) a QA model as `cfg` says on the backend `be`, then
/// evaluate the best model on the test set (a finished run only). A stop (SIGINT/SIGTERM,
/// `max_steps`) writes a resumable checkpoint at the step it happens; resuming continues it
/// bit for bit, mid-epoch included.
pub fn run_qa_on<B: Backend>(be: &B, cfg: &QaConfig, data: &QaData, opts: &RunOptions, dist: Option<Dist>) -> Result<QaRunReport> {
    let out = &cfg.output_dir;
    let rank = dist.as_ref().map_or(0, |d| d.coll.rank());
    if opts.resume && rank == 0 && !out.join(LATEST).exists() {
        if let Some(last) = legacy_last_dir(out) {
            convert_legacy_last(cfg, &last, &data.vocab)?;
            if !opts.quiet {
                eprintln!("{}: converted the run's last/ folder into {LATEST}", out.display());
            }
        }
    }
    if !opts.quiet && rank == 0 && !opts.resume {
        eprintln!(
            "{}: {} training questions ({} skipped: answer outside the {}-answer vocabulary), {} per batch",
            cfg.name,
            data.train.questions.len(),
            data.skipped,
            data.vocab.label2ans.len(),
            cfg.data.batch_size
        );
    }
    let settings = loop_settings(cfg)?;
    let mut task = QaTask::new(cfg, opts.init.as_deref(), &data.vocab, &data.train, data.val.as_ref(), &data.tokenizer);
    let result = trainer::run(be, &mut task, &settings, (vec![data.train.dataset.clone()], data.tokenizer.clone()), opts, dist)?;
    let test = match (&data.test, result.finished && !result.interrupted && rank == 0) {
        (Some(t), true) => {
            let best = load_qa_dir(&out.join(BEST_DIR))?.model;
            let mut best = best.on_backend(be);
            let e = evaluate_qa(&mut best, t, &data.vocab, &data.tokenizer, cfg.shape(), cfg.train.eval_batch_size)?;
            let line = json!({"kind": "test", "test": t.name, "accuracy": e.accuracy, "out_of_vocabulary": e.out_of_vocabulary, "metrics": e.metrics});
            crate::runlog::Log::open(&out.join("log.jsonl"), true)?.write(line)?;
            Some(e)
        }
        _ => None,
    };
    Ok(QaRunReport { result, test, skipped_out_of_vocabulary: data.skipped })
}

/// [`run_qa_on`] on the CPU, opening the config's data.
pub fn run_qa(cfg: &QaConfig, opts: &RunOptions) -> Result<QaRunReport> {
    run_qa_on(&Cpu, cfg, &QaData::open(cfg)?, opts, None)
}

/// The `last/` folder of a run written before the loop was shared (`last.prev/` when a save
/// was cut off between its two renames).
pub fn legacy_last_dir(out: &Path) -> Option<PathBuf> {
    [out.join("last"), out.join("last.prev")].into_iter().find(|d| d.join("state.json").exists())
}

/// The resumable state of the earlier QA layout (`last/state.json`).
#[derive(serde::Deserialize)]
struct LegacyState {
    /// Epochs finished.
    epoch: usize,
    global_step: u64,
    best_accuracy: Option<f64>,
    best_epoch: Option<usize>,
    #[serde(default)]
    batch_in_epoch: usize,
    #[serde(default)]
    epoch_loss_sum: f64,
}

/// Writes `checkpoint_latest.safetensors` from an earlier run's `last/` folder: the same
/// weights, optimiser moments and position (epoch, step in the epoch, best value), so the
/// resumed run continues bit for bit. (The old layout did not count samples seen.)
pub fn convert_legacy_last(cfg: &QaConfig, last: &Path, vocab: &Vocabulary) -> Result<()> {
    let state_path = last.join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let old: LegacyState = serde_json::from_str(&text).with_context(|| format!("{}: not a QA run state", state_path.display()))?;
    let m = load_qa_dir(last)?.model;
    let na = vocab.label2ans.len();
    ensure!(m.head.config.answers == na, "{}: the head has {} answers, the vocabulary {na}", last.display(), m.head.config.answers);
    let towers = AdamW::load(&last.join("adamw_towers.safetensors"), m.base.params.len())?;
    let head = AdamW::load(&last.join("adamw_head.safetensors"), m.head.params.len())?;
    let epoch = old.epoch + 1;
    let mut rng = epoch_seed_rng(cfg.seed);
    let mut epoch_seed = rng.next_u64();
    for _ in 1..epoch {
        epoch_seed = rng.next_u64();
    }
    let has_val = cfg.data.val.is_some();
    let best = if has_val { old.best_accuracy } else { old.best_epoch.map(|e| e as f64) };
    if has_val && old.best_epoch.is_some() && old.best_accuracy.is_none() {
        bail!("{}: a best epoch without its accuracy", state_path.display());
    }
    let state = TrainerState {
        epoch,
        batch_in_epoch: old.batch_in_epoch,
        step: old.global_step,
        epoch_seed,
        rng: rng.state(),
        dropout_rng: Rng::new(cfg.seed ^ 0xD80_0C7).state(),
        samples_seen: 0,
        best,
        best_epoch: old.best_epoch,
        epochs_since_best: old.epoch - old.best_epoch.unwrap_or(0),
        finished: old.epoch >= cfg.train.epochs && old.batch_in_epoch == 0,
        parts_per_step: 1,
        epoch_loss_sum: old.epoch_loss_sum,
        epoch_steps: old.batch_in_epoch,
    };
    let (model_config, model_extra) = <QaTask as Task<Cpu>>::describe(&m);
    let settings = loop_settings(cfg)?;
    let info = CheckpointInfo { task: "qa", model_config: &model_config, model_extra, state: &state, config: &settings.config_text };
    let groups =
        [GroupRef { name: "towers", params: &m.base.params, opt: &towers }, GroupRef { name: "head", params: &m.head.params, opt: &head }];
    checkpoint::save_groups(&cfg.output_dir.join(LATEST), &Cpu, &info, &groups)
}
