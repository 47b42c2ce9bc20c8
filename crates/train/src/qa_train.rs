//! Video QA fine-tuning and evaluation (SPEC §8; issue 13 C): the retrieval model plus the
//! BUTD head ([`demovlp_model::qa`]), cross-entropy over the answer vocabulary.
//!
//! - Datasets: MSRVTT-QA and TGIF-FrameQA (JSONL), MSVD-QA (JSON list + answer set + YouTube
//!   mapping), and our own JSONL: one `{"clip", "question", "answer", "answer_type"?}` per
//!   line. Answer vocabularies: `{answer: label}` JSON (`*_ans2label.json`), a JSON list in
//!   label order, or a text file with one answer per line (line index = label).
//! - Training skips (and counts) questions whose answer is outside the vocabulary; the
//!   published loader fails on them.
//! - Schedule (published): AdamW, lr `first_epoch_lr` (1e-4) for the first epoch, then
//!   `lr × gamma^k` (2e-4 × 0.1 per milestone 2, 4, 8 passed) — [`crate::schedule::step_rate`].
//!   One AdamW for the towers, one for the head (unfused: the head is small).
//! - Dropout: text tower (published 0.1) and the head's attention dropout (0.2), both
//!   reseeded from (seed, epoch, step) before every step, and the epoch's batch plan drawn
//!   from (seed, epoch): resuming from the end of an epoch is bit-exact.
//! - Model selection on validation accuracy (the published monitor is a loss that is never
//!   accumulated). Evaluation: overall and per answer type via
//!   [`demovlp_retrieval::qa_metrics`], plus the share of questions whose answer is outside
//!   the vocabulary (the accuracy ceiling is 100 − that share).
//!
//! Run directory: `last/` (QA model directory + `adamw_towers.safetensors`,
//! `adamw_head.safetensors`, `state.json`), `best/` (QA model directory with the answer
//! vocabulary), `log.jsonl` (one JSON object per logged step and per epoch), `config.toml`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use demovlp_data::annotations::{read_jsonl_qa, read_msvd_qa, QaSample};
use demovlp_data::batches::{assemble, batch_seed, derive_seed, epoch_plan, epoch_seed, Dataset, Draw, InputShape};
use demovlp_data::{FeatureSource, Sample};
use demovlp_model::qa::{QaHead, QaHeadConfig, QaModel};
use demovlp_model::{AdamW, TextDropout};
use demovlp_retrieval::mc::argmax_first;
use demovlp_retrieval::qa_metrics::{qa_metrics, QaRecord};
use serde::Deserialize;

use crate::config::OptimConfig;
use crate::qa::{load_qa_dir, save_qa_dir};
use crate::text::Tokenizer;

// ---------------------------------------------------------------------------------------
// config

/// A QA run config (`configs/msrvtt_qa.toml`, `msvd_qa.toml`, `tgif_qa-frame.toml`).
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QaConfig {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    pub output_dir: PathBuf,
    pub task: QaTask,
    #[serde(default)]
    pub model: QaModelSection,
    pub data: QaDataSection,
    pub optim: OptimConfig,
    pub train: QaTrainSection,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QaTask {
    /// Must be `"qa"`.
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QaModelSection {
    /// A retrieval checkpoint / model directory (the head starts from scratch) or a QA model
    /// directory (head included). `--init` overrides it.
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// The head's hidden width (published 256).
    #[serde(default = "default_hidden")]
    pub hidden: usize,
}

impl Default for QaModelSection {
    fn default() -> Self {
        QaModelSection { init: None, hidden: 256 }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QaDataSection {
    /// `tokenizer.json`, `vocab.txt` or a directory; absent = the built-in uncased WordPiece.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(default = "default_text_len")]
    pub text_len: usize,
    #[serde(default = "default_frames")]
    pub frames: usize,
    #[serde(default = "default_regions")]
    pub regions: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// The answer vocabulary (`{answer: label}` JSON, JSON list, or one answer per line).
    pub answers: PathBuf,
    pub train: QaDatasetConfig,
    #[serde(default)]
    pub val: Option<QaDatasetConfig>,
    #[serde(default)]
    pub test: Option<QaDatasetConfig>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QaDatasetConfig {
    pub name: String,
    /// `msrvtt-qa`, `msvd-qa`, `tgif-frameqa` or `jsonl`.
    pub format: String,
    pub annotations: PathBuf,
    /// A packed store or an `.npz` tree.
    pub features: PathBuf,
    /// MSVD-QA: the YouTube mapping (`<clip id> vid<N>` per line).
    #[serde(default)]
    pub mapping: Option<PathBuf>,
    #[serde(default)]
    pub max_samples: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QaTrainSection {
    pub epochs: usize,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// The head's attention dropout (published 0.2).
    #[serde(default = "default_att_dropout")]
    pub attention_dropout: bool,
    /// The text tower's dropout (published 0.1).
    #[serde(default = "default_text_dropout")]
    pub text_dropout: f32,
    #[serde(default = "default_batch")]
    pub eval_batch_size: usize,
    /// Also write `last/` every this many steps inside an epoch (0: only at the end of each
    /// epoch and when interrupted).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Stop after this many optimiser steps in all (a resumable checkpoint is written there;
    /// `--resume` with a larger or no limit continues).
    #[serde(default)]
    pub max_steps: Option<u64>,
}

fn default_hidden() -> usize {
    256
}
fn default_text_len() -> usize {
    100
}
fn default_frames() -> usize {
    8
}
fn default_regions() -> usize {
    30
}
fn default_batch() -> usize {
    64
}
fn default_log_every() -> u64 {
    20
}
fn default_att_dropout() -> bool {
    true
}
fn default_text_dropout() -> f32 {
    0.1
}

pub const QA_FORMATS: &[&str] = &["msrvtt-qa", "msvd-qa", "tgif-frameqa", "jsonl"];

impl QaConfig {
    pub fn parse_str(text: &str) -> Result<QaConfig> {
        let c: QaConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(c.task.kind == "qa", "task.kind: {:?}, a QA config needs \"qa\"", c.task.kind);
        let d = &c.data;
        ensure!(
            d.frames > 0 && d.regions > 0 && d.batch_size > 0 && d.text_len >= 2,
            "data: frames, regions, batch_size > 0, text_len >= 2"
        );
        for (key, ds) in [("data.train", Some(&d.train)), ("data.val", d.val.as_ref()), ("data.test", d.test.as_ref())] {
            if let Some(ds) = ds {
                ensure!(QA_FORMATS.contains(&ds.format.as_str()), "{key}.format: {:?} (known: {})", ds.format, QA_FORMATS.join(", "));
                ensure!(ds.format != "msvd-qa" || ds.mapping.is_some(), "{key}: msvd-qa needs `mapping` (msvd_youtube_mapping.txt)");
            }
        }
        ensure!(c.train.epochs >= 1, "train.epochs must be >= 1");
        ensure!((0.0..1.0).contains(&c.train.text_dropout), "train.text_dropout must be in [0, 1)");
        ensure!(c.model.hidden >= 1, "model.hidden must be >= 1");
        let o = &c.optim;
        ensure!(o.lr > 0.0 && o.eps > 0.0 && o.weight_decay >= 0.0, "optim: lr and eps must be > 0, weight_decay >= 0");
        ensure!(o.milestones.windows(2).all(|w| w[0] < w[1]), "optim.milestones must be strictly increasing");
        Ok(c)
    }

    pub fn parse_file(path: &Path) -> Result<QaConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse_str(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn shape(&self) -> InputShape {
        InputShape { frames: self.data.frames, regions: self.data.regions, text_len: self.data.text_len }
    }
}

// ---------------------------------------------------------------------------------------
// data

/// An answer vocabulary: label → answer, and answer → label.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocabulary {
    pub label2ans: Vec<String>,
    pub ans2label: HashMap<String, usize>,
}

impl Vocabulary {
    pub fn from_list(label2ans: Vec<String>) -> Result<Vocabulary> {
        let mut ans2label = HashMap::new();
        for (i, a) in label2ans.iter().enumerate() {
            ensure!(ans2label.insert(a.clone(), i).is_none(), "answer {a:?} appears twice in the vocabulary");
        }
        ensure!(!label2ans.is_empty(), "empty answer vocabulary");
        Ok(Vocabulary { label2ans, ans2label })
    }

    /// `{answer: label}` JSON (labels 0..n, each once), a JSON list, or one answer per line.
    pub fn read(path: &Path) -> Result<Vocabulary> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        let list: Vec<String> = if is_json {
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
            match v {
                serde_json::Value::Array(a) => {
                    a.into_iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<_>>().context("a list of strings expected")?
                }
                serde_json::Value::Object(o) => {
                    let mut l = vec![None; o.len()];
                    for (a, i) in o {
                        let i = i
                            .as_u64()
                            .map(|i| i as usize)
                            .filter(|&i| i < l.len())
                            .with_context(|| format!("label of {a:?} is not 0..{}", l.len()))?;
                        ensure!(l[i].is_none(), "label {i} given twice");
                        l[i] = Some(a);
                    }
                    l.into_iter().map(|x| x.unwrap()).collect()
                }
                _ => bail!("expected {{answer: label}} or a list"),
            }
        } else {
            text.lines().map(|l| l.trim().to_string()).collect()
        };
        Vocabulary::from_list(list).with_context(|| path.display().to_string())
    }
}

/// Our own QA JSONL: `{"clip", "question", "answer", "answer_type"?}` per line.
pub fn read_own_qa(path: &Path, vocab: &Vocabulary) -> Result<Vec<QaSample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(l).with_context(|| format!("{}: not JSON", at()))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let clip = s("clip").with_context(|| format!("{}: missing string \"clip\"", at()))?;
        let question = s("question").with_context(|| format!("{}: missing string \"question\"", at()))?;
        let answer = s("answer").with_context(|| format!("{}: missing string \"answer\"", at()))?;
        out.push(QaSample {
            label: vocab.ans2label.get(&answer).copied(),
            clip,
            question,
            answer,
            answer_type: s("answer_type").unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Questions of a dataset in its format, labels from `vocab`.
pub fn read_qa_dataset(ds: &QaDatasetConfig, vocab: &Vocabulary, answers_path: &Path) -> Result<Vec<QaSample>> {
    let mut s = match ds.format.as_str() {
        "msrvtt-qa" | "tgif-frameqa" => read_jsonl_qa(&ds.annotations, &vocab.ans2label)?,
        "msvd-qa" => read_msvd_qa(&ds.annotations, answers_path, ds.mapping.as_deref().context("msvd-qa needs `mapping`")?)?,
        "jsonl" => read_own_qa(&ds.annotations, vocab)?,
        f => bail!("unknown QA format {f:?} (known: {})", QA_FORMATS.join(", ")),
    };
    if let Some(n) = ds.max_samples {
        s.truncate(n);
    }
    ensure!(!s.is_empty(), "{} ({}): no questions", ds.name, ds.annotations.display());
    Ok(s)
}

/// A question set ready for the batch pipeline: each question is a sample whose one
/// "caption" is the question.
#[derive(Clone)]
pub struct QaSet {
    pub name: String,
    pub questions: Vec<QaSample>,
    pub dataset: Dataset,
}

impl QaSet {
    pub fn new(name: &str, questions: Vec<QaSample>, source: Arc<dyn FeatureSource>) -> QaSet {
        let samples = questions.iter().map(|q| Sample { clip: q.clip.clone(), captions: vec![q.question.clone()] }).collect();
        QaSet { name: name.into(), dataset: Dataset::new(name, samples, source), questions }
    }

    /// The questions whose answer is in the vocabulary (training), and how many were not.
    pub fn answerable(&self) -> (QaSet, usize) {
        let keep: Vec<QaSample> = self.questions.iter().filter(|q| q.label.is_some()).cloned().collect();
        let skipped = self.questions.len() - keep.len();
        (QaSet::new(&self.name, keep, self.dataset.source.clone()), skipped)
    }

    /// Percent of questions whose answer is outside the vocabulary.
    pub fn out_of_vocabulary_percent(&self) -> f64 {
        100.0 * self.questions.iter().filter(|q| q.label.is_none()).count() as f64 / self.questions.len().max(1) as f64
    }
}

// ---------------------------------------------------------------------------------------
// training and evaluation

/// Options of the step loop.
#[derive(Clone, Copy, Debug)]
pub struct QaTrainOptions {
    pub shape: InputShape,
    pub batch_size: usize,
    pub seed: u64,
    pub text_dropout: f32,
    pub attention_dropout: bool,
}

/// Seeds of an epoch's batch plan and draws, and of every step's dropout.
fn step_seed(seed: u64, epoch: usize, step: usize, stream: u64) -> u64 {
    derive_seed(seed ^ stream, epoch as u64, step as u64)
}

/// Where an epoch stands: batches of its plan done and the sum of their losses (what a
/// mid-epoch checkpoint saves, so that resuming continues the same plan).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EpochProgress {
    pub done: usize,
    pub loss_sum: f64,
}

/// What [`train_epoch`] passes to its `after_step` callback after every optimiser step.
pub struct StepDone<'a> {
    /// The step's index in the epoch's plan (0-based).
    pub step: usize,
    /// Steps in the epoch's plan.
    pub planned: usize,
    pub loss: f32,
    pub model: &'a QaModel,
    pub opt_towers: &'a AdamW,
    pub opt_head: &'a AdamW,
    /// Progress including this step.
    pub progress: EpochProgress,
}

/// How an epoch ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EpochOutcome {
    /// Every batch done: the mean loss over the epoch's steps and their number.
    Finished { mean_loss: f64, steps: usize },
    /// `after_step` asked to stop; `progress` says where.
    Stopped,
}

/// One epoch (1-based) of training on `set` (answerable questions only) at learning rate
/// `lr`, starting after the `progress.done` batches of the epoch's plan already done (a
/// resumed run; 0 for a new epoch). After every step `after_step` is called (logging,
/// checkpoints); it returns `true` to stop there. Batches of fewer than 2 questions are
/// dropped, as in retrieval.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch(
    model: &mut QaModel,
    opt_towers: &mut AdamW,
    opt_head: &mut AdamW,
    set: &QaSet,
    tok: &Tokenizer,
    o: &QaTrainOptions,
    epoch: usize,
    lr: f32,
    progress: &mut EpochProgress,
    after_step: &mut dyn FnMut(StepDone<'_>) -> Result<bool>,
) -> Result<EpochOutcome> {
    ensure!(set.questions.iter().all(|q| q.label.is_some()), "{}: training questions need answers in the vocabulary", set.name);
    let es = epoch_seed(o.seed, epoch);
    let plan = epoch_plan(&[set.questions.len()], o.batch_size, None, es, true);
    ensure!(
        progress.done <= plan.len(),
        "{}: epoch {epoch} has {} batches, but {} are recorded as done (a checkpoint of another data set or batch size?)",
        set.name,
        plan.len(),
        progress.done
    );
    opt_towers.lr = lr;
    opt_head.lr = lr;
    for (step, spec) in plan.iter().enumerate().skip(progress.done) {
        let b = assemble(&set.dataset, &spec.indices, o.shape, tok, Draw::Train { seed: batch_seed(es, step) }, false)?;
        let labels: Vec<usize> = b.sample_ids.iter().map(|&i| set.questions[i].label.unwrap()).collect();
        let p = o.text_dropout;
        model.base.set_text_dropout(TextDropout { hidden: p, attention: p }, step_seed(o.seed, epoch, step, 0x7E47));
        model.set_attention_dropout(o.attention_dropout, step_seed(o.seed, epoch, step, 0xA77E));
        let batch = crate::trainer::batch_ref(&b);
        let out = model.forward_backward(&batch, &labels);
        ensure!(out.loss.is_finite(), "{}: loss is not finite at epoch {epoch} step {step}", set.name);
        opt_towers.step(&mut model.base.params);
        opt_head.step(&mut model.head.params);
        progress.done = step + 1;
        progress.loss_sum += out.loss as f64;
        let done = StepDone { step, planned: plan.len(), loss: out.loss, model, opt_towers, opt_head, progress: *progress };
        if after_step(done)? && progress.done < plan.len() {
            return Ok(EpochOutcome::Stopped);
        }
    }
    Ok(EpochOutcome::Finished { mean_loss: progress.loss_sum / plan.len().max(1) as f64, steps: plan.len() })
}

/// What an evaluation found.
#[derive(Clone, Debug)]
pub struct QaEval {
    /// The published metrics dict (fractions) + `questions`.
    pub metrics: serde_json::Value,
    /// Percent right.
    pub accuracy: f64,
    /// Percent of questions whose answer is outside the vocabulary (never right).
    pub out_of_vocabulary: f64,
    /// Predicted label per question.
    pub predictions: Vec<usize>,
    pub records: Vec<QaRecord>,
    pub seconds: f64,
}

/// Predict every question (no dropout; the middle frame of each segment) and score it as the
/// published `evaluate_qa` does.
pub fn evaluate_qa(
    model: &mut QaModel,
    set: &QaSet,
    vocab: &Vocabulary,
    tok: &Tokenizer,
    shape: InputShape,
    batch_size: usize,
) -> Result<QaEval> {
    let t0 = Instant::now();
    ensure!(
        vocab.label2ans.len() == model.head.config.answers,
        "the vocabulary has {} answers, the head {}",
        vocab.label2ans.len(),
        model.head.config.answers
    );
    let na = model.head.config.answers;
    let mut predictions = Vec::with_capacity(set.questions.len());
    let idx: Vec<usize> = (0..set.questions.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let b = assemble(&set.dataset, chunk, shape, tok, Draw::Eval, false)?;
        let batch = crate::trainer::batch_ref(&b);
        let logits = model.forward(&batch, false);
        ensure!(logits.iter().all(|x| x.is_finite()), "{}: non-finite logits", set.name);
        predictions.extend(logits.chunks(na).map(argmax_first));
    }
    let records: Vec<QaRecord> = set
        .questions
        .iter()
        .zip(&predictions)
        .enumerate()
        .map(|(i, (q, &p))| QaRecord {
            question_id: i.to_string(),
            prediction: vocab.label2ans[p].clone(),
            answer: q.answer.clone(),
            answer_type: (!q.answer_type.is_empty()).then(|| q.answer_type.clone()),
        })
        .collect();
    let metrics = qa_metrics(&records);
    let accuracy = 100.0 * metrics["overall_acc"].as_f64().unwrap_or(0.0);
    Ok(QaEval {
        metrics,
        accuracy,
        out_of_vocabulary: set.out_of_vocabulary_percent(),
        predictions,
        records,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A new QA model from an init path: a QA model directory (head included; its answer count
/// must be `answers`), else a retrieval model directory or checkpoint with a fresh head
/// (`QaHead::init_random(seed)`).
pub fn init_qa_model(init: &Path, hidden: usize, answers: usize, seed: u64) -> Result<QaModel> {
    if crate::qa::is_qa_dir(init) {
        let m = load_qa_dir(init)?.model;
        ensure!(
            m.head.config.answers == answers,
            "{}: the head has {} answers, the vocabulary {answers}",
            init.display(),
            m.head.config.answers
        );
        return Ok(m);
    }
    let base = crate::weights::load_model(init)?;
    let mut head = QaHead::new(QaHeadConfig { dim: base.config.proj_dim, hidden, answers });
    head.init_random(seed);
    Ok(QaModel::new(base, head))
}

// ---------------------------------------------------------------------------------------
// the run

/// The resumable state written at the end of every epoch (`last/state.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct QaRunState {
    /// Epochs finished.
    pub epoch: usize,
    pub global_step: u64,
    pub best_accuracy: Option<f64>,
    pub best_epoch: Option<usize>,
    pub skipped_out_of_vocabulary: usize,
    /// Batches of epoch `epoch + 1` already done (a mid-epoch checkpoint), and their loss sum.
    #[serde(default)]
    pub batch_in_epoch: usize,
    #[serde(default)]
    pub epoch_loss_sum: f64,
}

#[derive(Debug)]
pub struct QaRunReport {
    pub state: QaRunState,
    pub test: Option<QaEval>,
    pub output_dir: PathBuf,
    /// Stopped by SIGINT/SIGTERM (a resumable `last/` was written).
    pub interrupted: bool,
    /// Stopped at `max_steps` (a resumable `last/` was written).
    pub stopped_at_max_steps: bool,
}

fn log_line(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("{}: cannot append", path.display()))?;
    writeln!(f, "{v}")?;
    Ok(())
}

fn open_set(ds: &QaDatasetConfig, vocab: &Vocabulary, answers_path: &Path) -> Result<QaSet> {
    let q = read_qa_dataset(ds, vocab, answers_path)?;
    let src =
        crate::annotations::open_features(&ds.features).with_context(|| format!("{}: features {}", ds.name, ds.features.display()))?;
    Ok(QaSet::new(&ds.name, q, src))
}

/// `last/` of a run: written into `last.partial/` and swapped in by renames, so that an
/// interruption while saving leaves the previous `last/` (or `last.prev/`) whole.
fn save_last(out: &Path, model: &QaModel, vocab: &Vocabulary, opt_t: &AdamW, opt_h: &AdamW, state: &QaRunState) -> Result<()> {
    let (last, partial, prev) = (out.join("last"), out.join("last.partial"), out.join("last.prev"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    save_qa_dir(model, Some(&vocab.label2ans), &partial)?;
    opt_t.save(&partial.join("adamw_towers.safetensors"))?;
    opt_h.save(&partial.join("adamw_head.safetensors"))?;
    demovlp_model::io::atomic_write(&partial.join("state.json"), (serde_json::to_string_pretty(state)? + "\n").as_bytes())?;
    if last.exists() {
        if prev.exists() {
            std::fs::remove_dir_all(&prev).with_context(|| format!("cannot remove {}", prev.display()))?;
        }
        std::fs::rename(&last, &prev).with_context(|| format!("cannot rename {} to {}", last.display(), prev.display()))?;
    }
    std::fs::rename(&partial, &last).with_context(|| format!("cannot rename {} to {}", partial.display(), last.display()))?;
    if prev.exists() {
        std::fs::remove_dir_all(&prev).with_context(|| format!("cannot remove {}", prev.display()))?;
    }
    Ok(())
}

/// The directory a resume reads: `last/`, or `last.prev/` when a save was cut off between
/// its two renames.
fn resumable_dir(out: &Path) -> Option<PathBuf> {
    [out.join("last"), out.join("last.prev")].into_iter().find(|d| d.join("state.json").exists())
}

/// The loss and validation-accuracy plots of a QA run (`loss.svg`, `accuracy.svg`), drawn
/// from its `log.jsonl`.
pub fn write_qa_plots(out: &Path, name: &str) -> Result<()> {
    use crate::plot::{line_chart, Series};
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap_or_default();
    let (mut steps, mut epochs) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        match v["kind"].as_str() {
            Some("step") => {
                steps.insert(v["step"].as_u64().unwrap_or(0), v);
            }
            Some("epoch") => {
                epochs.insert(v["epoch"].as_u64().unwrap_or(0), v);
            }
            _ => {}
        }
    }
    let per_step =
        Series { name: "step".into(), points: steps.iter().filter_map(|(s, v)| Some((*s as f64, v["loss"].as_f64()?))).collect() };
    let per_epoch = Series {
        name: "epoch mean".into(),
        points: epochs.values().filter_map(|v| Some((v["step"].as_f64()?, v["train_loss"].as_f64()?))).collect(),
    };
    let svg = line_chart(&format!("{name}: training loss"), "step", "cross-entropy", &[per_step, per_epoch]);
    std::fs::write(out.join("loss.svg"), svg).with_context(|| format!("cannot write {}", out.join("loss.svg").display()))?;
    // Overall validation accuracy and each answer type's (the metrics dict holds fractions).
    let mut keys: Vec<String> = vec!["overall_acc".into()];
    for v in epochs.values() {
        if let Some(m) = v["val_metrics"].as_object() {
            for k in m.keys().filter(|k| k.ends_with("_acc") && *k != "overall_acc") {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
    }
    let series: Vec<Series> = keys
        .iter()
        .map(|k| Series {
            name: k.trim_end_matches("_acc").to_string(),
            points: epochs.iter().filter_map(|(e, v)| Some((*e as f64, 100.0 * v["val_metrics"][k].as_f64()?))).collect(),
        })
        .collect();
    let svg = line_chart(&format!("{name}: validation accuracy"), "epoch", "accuracy (%)", &series);
    std::fs::write(out.join("accuracy.svg"), svg).with_context(|| format!("cannot write {}", out.join("accuracy.svg").display()))?;
    Ok(())
}

/// Fine-tune (or resume) a QA model as `cfg` says; evaluate the best model on the test set.
/// A stop (the `stop` flag: SIGINT/SIGTERM, or `max_steps`) writes a resumable `last/` at
/// the step it happens and returns without testing (`interrupted` / `stopped_at_max_steps`);
/// `resume` continues it bit for bit, mid-epoch included.
pub fn run_qa(cfg: &QaConfig, init: Option<&Path>, resume: bool, stop: Option<&AtomicBool>, quiet: bool) -> Result<QaRunReport> {
    let vocab = Vocabulary::read(&cfg.data.answers)?;
    let tok = match &cfg.data.tokenizer {
        Some(p) => crate::text::load_tokenizer(p)?,
        None => crate::text::builtin_tokenizer()?,
    };
    let out = cfg.output_dir.clone();
    let log = out.join("log.jsonl");
    let train_all = open_set(&cfg.data.train, &vocab, &cfg.data.answers)?;
    let (train, skipped) = train_all.answerable();
    ensure!(!train.questions.is_empty(), "{}: no training question has its answer in the vocabulary", cfg.data.train.name);
    let val = cfg.data.val.as_ref().map(|d| open_set(d, &vocab, &cfg.data.answers)).transpose()?;
    let test = cfg.data.test.as_ref().map(|d| open_set(d, &vocab, &cfg.data.answers)).transpose()?;
    let na = vocab.label2ans.len();
    let s = cfg.optim.clone();
    let adamw = |n: usize| AdamW::new(n, s.lr, s.betas[0], s.betas[1], s.eps, s.weight_decay);

    let resume_dir = if resume { resumable_dir(&out) } else { None };
    let (mut model, mut opt_t, mut opt_h, mut state) = if let Some(last) = resume_dir {
        let state_path = last.join("state.json");
        let st: QaRunState =
            serde_json::from_str(&std::fs::read_to_string(&state_path)?).with_context(|| state_path.display().to_string())?;
        let m = load_qa_dir(&last)?.model;
        ensure!(m.head.config.answers == na, "{}: the head has {} answers, the vocabulary {na}", last.display(), m.head.config.answers);
        let ot = AdamW::load(&last.join("adamw_towers.safetensors"), m.base.params.len())?;
        let oh = AdamW::load(&last.join("adamw_head.safetensors"), m.head.params.len())?;
        if !quiet {
            let at = if st.batch_in_epoch > 0 {
                format!(" (step {}, batch {} of epoch {})", st.global_step, st.batch_in_epoch, st.epoch + 1)
            } else {
                String::new()
            };
            eprintln!("resuming {} after epoch {}{at}", out.display(), st.epoch);
        }
        (m, ot, oh, st)
    } else {
        ensure!(!resume || !log.exists(), "{}: --resume, but no last/state.json", out.display());
        ensure!(!log.exists(), "{}: holds a run already (log.jsonl); pass --resume or choose another output_dir", out.display());
        let init = init.or(cfg.model.init.as_deref()).context("no initial model: give --init or [model] init")?;
        let m = init_qa_model(init, cfg.model.hidden, na, cfg.seed)?;
        let (nt, nh) = (m.base.params.len(), m.head.params.len());
        let st = QaRunState {
            epoch: 0,
            global_step: 0,
            best_accuracy: None,
            best_epoch: None,
            skipped_out_of_vocabulary: skipped,
            batch_in_epoch: 0,
            epoch_loss_sum: 0.0,
        };
        (m, adamw(nt), adamw(nh), st)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.toml"), toml::to_string_pretty(cfg)?)?;
    if state.epoch == 0 && state.global_step == 0 && !quiet {
        eprintln!(
            "{}: {} training questions ({skipped} skipped: answer outside the {na}-answer vocabulary), {} per batch",
            cfg.name,
            train.questions.len(),
            cfg.data.batch_size
        );
    }
    let o = QaTrainOptions {
        shape: cfg.shape(),
        batch_size: cfg.data.batch_size,
        seed: cfg.seed,
        text_dropout: cfg.train.text_dropout,
        attention_dropout: cfg.train.attention_dropout,
    };
    let stopped = || stop.is_some_and(|s| s.load(Ordering::SeqCst));
    let at_max = |step: u64| cfg.train.max_steps.is_some_and(|m| step >= m);
    let (mut interrupted, mut stopped_at_max_steps) = (false, false);
    let every = cfg.train.log_every.max(1);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = Instant::now();
    let t_run = Instant::now();
    for epoch in state.epoch + 1..=cfg.train.epochs {
        if stopped() || at_max(state.global_step) {
            (interrupted, stopped_at_max_steps) = (stopped(), !stopped());
            break;
        }
        let t0 = Instant::now();
        let lr = crate::schedule::step_rate(&cfg.optim, epoch);
        let g0 = state.global_step - state.batch_in_epoch as u64;
        let mut progress = EpochProgress { done: state.batch_in_epoch, loss_sum: state.epoch_loss_sum };
        let mut save_error: Option<anyhow::Error> = None;
        let mut after_step = |d: StepDone<'_>| -> Result<bool> {
            let g = g0 + d.progress.done as u64;
            if g.is_multiple_of(every) {
                log_line(&log, &serde_json::json!({"kind": "step", "epoch": epoch, "step": g, "loss": d.loss, "lr": lr}))?;
                if !quiet {
                    last_line = Instant::now();
                    eprintln!("  epoch {epoch} step {g}: loss {:.4}, lr {lr:e}", d.loss);
                }
            }
            // Without a terminal: a plain progress line every few seconds (logs of batch jobs).
            if !quiet && !tty && last_line.elapsed().as_secs_f64() >= demovlp_data::plain_progress_interval() {
                eprintln!(
                    "{}: epoch {epoch}, batch {}/{}, step {g}, loss {:.4}, lr {lr:.2e}, {:.0}s",
                    cfg.name,
                    d.progress.done,
                    d.planned,
                    d.loss,
                    t_run.elapsed().as_secs_f64()
                );
                last_line = Instant::now();
            }
            let stop_here = stopped() || at_max(g);
            let periodic = cfg.train.checkpoint_every > 0 && g.is_multiple_of(cfg.train.checkpoint_every);
            if periodic && !stop_here && d.progress.done < d.planned {
                let mid =
                    QaRunState { global_step: g, batch_in_epoch: d.progress.done, epoch_loss_sum: d.progress.loss_sum, ..state.clone() };
                if let Err(e) = save_last(&out, d.model, &vocab, d.opt_towers, d.opt_head, &mid) {
                    save_error = Some(e);
                    return Ok(true);
                }
            }
            Ok(stop_here)
        };
        let outcome = train_epoch(&mut model, &mut opt_t, &mut opt_h, &train, &tok, &o, epoch, lr, &mut progress, &mut after_step)?;
        if let Some(e) = save_error {
            return Err(e.context(format!("{}: writing the mid-epoch checkpoint", out.display())));
        }
        let (loss, steps) = match outcome {
            EpochOutcome::Stopped => {
                state.global_step = g0 + progress.done as u64;
                state.batch_in_epoch = progress.done;
                state.epoch_loss_sum = progress.loss_sum;
                (interrupted, stopped_at_max_steps) = (stopped(), !stopped());
                let why = if interrupted { "interrupt" } else { "max_steps" };
                log_line(
                    &log,
                    &serde_json::json!({"kind": "stop", "reason": why, "epoch": epoch, "step": state.global_step, "batch_in_epoch": progress.done}),
                )?;
                break;
            }
            EpochOutcome::Finished { mean_loss, steps } => (mean_loss, steps),
        };
        state.global_step = g0 + steps as u64;
        state.batch_in_epoch = 0;
        state.epoch_loss_sum = 0.0;
        let val_eval = val.as_ref().map(|v| evaluate_qa(&mut model, v, &vocab, &tok, o.shape, cfg.train.eval_batch_size)).transpose()?;
        let mut line = serde_json::json!({
            "kind": "epoch", "epoch": epoch, "step": state.global_step, "train_loss": loss, "lr": lr, "seconds": t0.elapsed().as_secs_f64(),
        });
        let better = match &val_eval {
            Some(e) => {
                line["val_accuracy"] = e.accuracy.into();
                line["val_metrics"] = e.metrics.clone();
                state.best_accuracy.is_none_or(|b| e.accuracy > b)
            }
            None => true, // no validation set: the last epoch is the best
        };
        if better {
            state.best_accuracy = val_eval.as_ref().map(|e| e.accuracy);
            state.best_epoch = Some(epoch);
            save_qa_dir(&model, Some(&vocab.label2ans), &out.join("best"))?;
        }
        state.epoch = epoch;
        save_last(&out, &model, &vocab, &opt_t, &opt_h, &state)?;
        line["best_epoch"] = state.best_epoch.into();
        log_line(&log, &line)?;
        if !quiet {
            eprintln!(
                "epoch {epoch}: train loss {loss:.4}{}",
                val_eval.map(|e| format!(", val accuracy {:.2}%{}", e.accuracy, if better { " (best)" } else { "" })).unwrap_or_default()
            );
        }
    }
    if interrupted || stopped_at_max_steps {
        save_last(&out, &model, &vocab, &opt_t, &opt_h, &state)?;
        write_qa_plots(&out, &cfg.name)?;
        return Ok(QaRunReport { state, test: None, output_dir: out, interrupted, stopped_at_max_steps });
    }
    let test_eval = match &test {
        Some(t) => {
            let mut best = load_qa_dir(&out.join("best"))?.model;
            let e = evaluate_qa(&mut best, t, &vocab, &tok, o.shape, cfg.train.eval_batch_size)?;
            log_line(
                &log,
                &serde_json::json!({"kind": "test", "test": t.name, "accuracy": e.accuracy, "out_of_vocabulary": e.out_of_vocabulary, "metrics": e.metrics}),
            )?;
            Some(e)
        }
        None => None,
    };
    write_qa_plots(&out, &cfg.name)?;
    Ok(QaRunReport { state, test: test_eval, output_dir: out, interrupted: false, stopped_at_max_steps: false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::questions::{answer_vocabulary, questions};
    use crate::synthetic::{CorpusConfig, Split, SyntheticCorpus};

    fn repo(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
    }

    #[test]
    fn shipped_qa_configs_parse_with_the_published_recipe() {
        for (name, format) in [("msrvtt_qa", "msrvtt-qa"), ("msvd_qa", "msvd-qa"), ("tgif_qa-frame", "tgif-frameqa")] {
            let c = QaConfig::parse_file(&repo(&format!("configs/{name}.toml"))).unwrap();
            assert_eq!((c.name.as_str(), c.data.train.format.as_str()), (name, format));
            assert_eq!((c.data.batch_size, c.data.frames, c.data.regions, c.train.epochs, c.model.hidden), (64, 8, 30, 10, 256));
            // lr 1e-4 the first epoch, then 2e-4 × 0.1 per milestone passed (2, 4, 8).
            let lr: Vec<f32> = (1..=10).map(|e| crate::schedule::step_rate(&c.optim, e)).collect();
            let want = [1e-4, 2e-4, 2e-5, 2e-5, 2e-6, 2e-6, 2e-6, 2e-6, 2e-7, 2e-7];
            for (g, w) in lr.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6 * w, "{name}: {lr:?}");
            }
        }
        let text = std::fs::read_to_string(repo("configs/msrvtt_qa.toml")).unwrap();
        assert!(QaConfig::parse_str(&text.replace("kind = \"qa\"", "kind = \"mc\"")).unwrap_err().to_string().contains("task.kind"));
        assert!(QaConfig::parse_str(&text.replace("format = \"msrvtt-qa\"", "format = \"youtube\"")).is_err());
        assert!(QaConfig::parse_str(&text.replace("hidden = 256", "hiden = 256")).is_err());
        let msvd = std::fs::read_to_string(repo("configs/msvd_qa.toml")).unwrap();
        assert!(QaConfig::parse_str(&msvd.replace("mapping = ", "# mapping = ")).unwrap_err().to_string().contains("mapping"));
    }

    #[test]
    fn published_answer_vocabularies_and_annotations_read() {
        let ann = |f: &str| repo(&format!("testdata/annotations/{f}"));
        let msrvtt = Vocabulary::read(&ann("msrvtt_train_ans2label.json")).unwrap();
        let msvd = Vocabulary::read(&ann("msvd_answer_set.txt")).unwrap();
        let tgif = Vocabulary::read(&ann("frameqa_trainval_ans2label.json")).unwrap();
        assert_eq!((msrvtt.label2ans.len(), msvd.label2ans.len(), tgif.label2ans.len()), (1500, 1000, 1540));
        for v in [&msrvtt, &msvd, &tgif] {
            assert!(v.label2ans.iter().enumerate().all(|(i, a)| v.ans2label[a] == i));
        }
        let ds = |format: &str, a: &str, mapping: Option<&str>| QaDatasetConfig {
            name: "t".into(),
            format: format.into(),
            annotations: ann(a),
            features: PathBuf::from("unused"),
            mapping: mapping.map(ann),
            max_samples: None,
        };
        for (cfg, vocab, answers) in [
            (ds("msrvtt-qa", "msrvtt_qa_val.jsonl", None), &msrvtt, "msrvtt_train_ans2label.json"),
            (ds("msvd-qa", "msvd_val_qa_encode.json", Some("msvd_youtube_mapping.txt")), &msvd, "msvd_answer_set.txt"),
            (ds("tgif-frameqa", "frameqa_val.jsonl", None), &tgif, "frameqa_trainval_ans2label.json"),
        ] {
            let q = read_qa_dataset(&cfg, vocab, &ann(answers)).unwrap();
            let set = QaSet::new("t", q.clone(), Arc::new(SyntheticCorpus::new(CorpusConfig::new(0))));
            let oov = set.out_of_vocabulary_percent();
            if cfg.format == "tgif-frameqa" {
                assert_eq!(oov, 0.0, "the TGIF vocabulary is built on train + val");
            } else {
                assert!(oov > 0.0 && oov < 50.0, "{}: {oov}% outside the vocabulary", cfg.format);
            }
            let (ans, skipped) = set.answerable();
            assert_eq!(ans.questions.len() + skipped, q.len());
            assert!(ans.questions.iter().all(|x| vocab.label2ans[x.label.unwrap()] == x.answer));
        }
        // Duplicates and gaps are refused.
        let dir = std::env::temp_dir().join(format!("demovlp-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("gap.json"), r#"{"a": 0, "b": 2}"#).unwrap();
        assert!(Vocabulary::read(&dir.join("gap.json")).is_err());
        std::fs::write(dir.join("dup.txt"), "a\nb\na\n").unwrap();
        assert!(Vocabulary::read(&dir.join("dup.txt")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Writes a small synthetic corpus with QA annotations in our JSONL (plus one training
    /// question whose answer is outside the vocabulary) and returns a config for it.
    fn synthetic_run(dir: &Path, epochs: usize) -> QaConfig {
        let mut c = CorpusConfig::new(21);
        (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test, c.frames) = (1, 1, 48, 12, 12, 4);
        let corpus = SyntheticCorpus::new(c);
        corpus.write(&dir.join("corpus"), &|_, _| {}).unwrap();
        let lines = |split: Split| {
            let mut s = String::new();
            for clip in corpus.clips(split) {
                for q in questions(clip) {
                    let v = serde_json::json!({"clip": clip.id, "question": q.question, "answer": q.answer, "answer_type": q.answer_type});
                    s += &format!("{v}\n");
                }
            }
            s
        };
        let train = lines(Split::FinetuneTrain)
            + &format!(
                "{}\n",
                serde_json::json!({"clip": corpus.clips(Split::FinetuneTrain)[0].id, "question": "what?", "answer": "zebra"})
            );
        std::fs::write(dir.join("train.jsonl"), train).unwrap();
        std::fs::write(dir.join("val.jsonl"), lines(Split::Val)).unwrap();
        std::fs::write(dir.join("test.jsonl"), lines(Split::Test)).unwrap();
        std::fs::write(dir.join("answers.json"), serde_json::to_string(&answer_vocabulary()).unwrap()).unwrap();
        // A small retrieval model as the initial checkpoint (the head starts from scratch).
        let mut m = crate::qa::tests_support::tiny_retrieval_model(30522, 4);
        m.init_random(5);
        demovlp_model::io::save_model_dir(&m, &dir.join("init")).unwrap();
        let p = |f: &str| dir.join(f).display().to_string();
        let text = format!(
            r#"name = "synthetic_qa"
seed = 3
output_dir = "{out}"
[task]
kind = "qa"
[model]
init = "{init}"
hidden = 16
[data]
text_len = 12
frames = 2
regions = 6
batch_size = 16
answers = "{answers}"
[data.train]
name = "train"
format = "jsonl"
annotations = "{train}"
features = "{features}"
[data.val]
name = "val"
format = "jsonl"
annotations = "{val}"
features = "{features}"
[data.test]
name = "test"
format = "jsonl"
annotations = "{test}"
features = "{features}"
[optim]
lr = 2e-3
first_epoch_lr = 1e-3
eps = 1e-6
weight_decay = 0.0
schedule = "step"
milestones = [2]
[train]
epochs = {epochs}
log_every = 5
eval_batch_size = 20
"#,
            out = p("run"),
            init = p("init"),
            answers = p("answers.json"),
            train = p("train.jsonl"),
            val = p("val.jsonl"),
            test = p("test.jsonl"),
            features = dir.join("corpus/features").display(),
        );
        QaConfig::parse_str(&text).unwrap()
    }

    #[test]
    fn qa_training_skips_oov_selects_on_val_and_resumes_bit_exactly() {
        let dir = demovlp_testutil::tmpdir("qa-train");
        let mut cfg = synthetic_run(&dir, 3);
        let straight = run_qa(&cfg, None, false, None, true).unwrap();
        assert_eq!(straight.state.skipped_out_of_vocabulary, 1, "the zebra question is skipped and counted");
        assert_eq!(straight.state.epoch, 3);
        let test = straight.test.as_ref().unwrap();
        assert_eq!(test.out_of_vocabulary, 0.0);
        assert!(test.metrics["number_acc"].as_f64().is_some() && test.metrics["color_acc"].as_f64().is_some());
        // The log has a line per epoch with the validation accuracy, and the best epoch is the
        // one with the highest.
        let log = std::fs::read_to_string(dir.join("run/log.jsonl")).unwrap();
        let epochs: Vec<serde_json::Value> =
            log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v.get("train_loss").is_some()).collect();
        assert_eq!(epochs.len(), 3);
        let accs: Vec<f64> = epochs.iter().map(|e| e["val_accuracy"].as_f64().unwrap()).collect();
        let best = (0..3).fold(0, |b, i| if accs[i] > accs[b] { i } else { b });
        assert_eq!(straight.state.best_epoch, Some(best + 1), "{accs:?}");
        assert_eq!(straight.state.best_accuracy, Some(accs[best]));
        let last = load_qa_dir(&dir.join("run/last")).unwrap().model;

        // Interrupted after 1 epoch, resumed to 3: the same bits.
        cfg.output_dir = dir.join("run2");
        cfg.train.epochs = 1;
        run_qa(&cfg, None, false, None, true).unwrap();
        assert!(run_qa(&cfg, None, false, None, true).unwrap_err().to_string().contains("--resume"), "a second fresh run is refused");
        cfg.train.epochs = 3;
        let resumed = run_qa(&cfg, None, true, None, true).unwrap();
        assert_eq!(resumed.state, straight.state);
        let last2 = load_qa_dir(&dir.join("run2/last")).unwrap().model;
        assert!(last2.base.params.data == last.base.params.data, "towers differ after resuming");
        assert!(last2.head.params.data == last.head.params.data, "head differs after resuming");
        assert_eq!(resumed.test.unwrap().predictions, test.predictions);

        // Stopped mid-epoch (max_steps inside epoch 2, and a periodic checkpoint before it),
        // resumed: the same bits as the straight run.
        let per_epoch = epochs[0]["step"].as_u64().unwrap();
        assert!(per_epoch >= 3, "the test needs epochs of several steps ({per_epoch})");
        cfg.output_dir = dir.join("run3");
        cfg.train.checkpoint_every = 2;
        cfg.train.max_steps = Some(per_epoch + 1);
        let part = run_qa(&cfg, None, false, None, true).unwrap();
        assert!(part.stopped_at_max_steps && !part.interrupted && part.test.is_none());
        assert_eq!((part.state.epoch, part.state.batch_in_epoch, part.state.global_step), (1, 1, per_epoch + 1));
        let saved: QaRunState = serde_json::from_str(&std::fs::read_to_string(dir.join("run3/last/state.json")).unwrap()).unwrap();
        assert_eq!(saved, part.state, "last/ holds the stopping step");
        // A save cut off between its renames leaves last.prev/, which resume reads.
        std::fs::rename(dir.join("run3/last"), dir.join("run3/last.prev")).unwrap();
        cfg.train.max_steps = None;
        let resumed = run_qa(&cfg, None, true, None, true).unwrap();
        assert_eq!(resumed.state, straight.state);
        let last3 = load_qa_dir(&dir.join("run3/last")).unwrap().model;
        assert!(last3.base.params.data == last.base.params.data, "towers differ after a mid-epoch resume");
        assert!(last3.head.params.data == last.head.params.data, "head differs after a mid-epoch resume");
        assert!(!dir.join("run3/last.prev").exists() && !dir.join("run3/last.partial").exists());
        // The step lines of the resumed run continue the numbering: every logged step once.
        let log3 = std::fs::read_to_string(dir.join("run3/log.jsonl")).unwrap();
        let steps: Vec<u64> = log3
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "step")
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = (1..=3 * per_epoch).filter(|g| g % 5 == 0).collect();
        assert_eq!(steps, want);
        // Plots: the loss per step and the validation accuracy per epoch and answer type.
        let loss_svg = std::fs::read_to_string(dir.join("run3/loss.svg")).unwrap();
        assert!(loss_svg.starts_with("<svg") && loss_svg.contains("<polyline"), "{loss_svg}");
        let acc_svg = std::fs::read_to_string(dir.join("run3/accuracy.svg")).unwrap();
        assert!(acc_svg.contains(">overall<") && acc_svg.contains(">color<") && acc_svg.contains(">number<"), "{acc_svg}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
