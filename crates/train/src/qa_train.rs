//! Video QA configs, data and evaluation (SPEC §8): the retrieval model plus the BUTD head
//! ([`demovlp_model::qa`]), cross-entropy over the answer vocabulary. Training runs in the
//! shared loop as [`crate::qa_task::QaTask`].
//!
//! - Datasets: MSRVTT-QA and TGIF-FrameQA (JSONL), MSVD-QA (JSON list + answer set + YouTube
//!   mapping), and our own JSONL: one `{"clip", "question", "answer", "answer_type"?}` per
//!   line. Answer vocabularies: `{answer: label}` JSON (`*_ans2label.json`), a JSON list in
//!   label order, or a text file with one answer per line (line index = label).
//! - Training skips (and counts) questions whose answer is outside the vocabulary; the
//!   published loader fails on them.
//! - Schedule (published): AdamW, lr `first_epoch_lr` (1e-4) for the first epoch, then
//!   `lr × gamma^k` (2e-4 × 0.1 per milestone 2, 4, 8 passed); `schedule = "cosine"` and
//!   `warmup_steps` as for retrieval ([`crate::schedule::learning_rate`]).
//! - Model selection on validation accuracy (the published monitor is a loss that is never
//!   accumulated). Evaluation: overall and per answer type via
//!   [`demovlp_retrieval::qa_metrics`], plus the share of questions whose answer is outside
//!   the vocabulary (the accuracy ceiling is 100 − that share).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use demovlp_data::annotations::{read_jsonl_qa, read_msvd_qa, QaSample};
use demovlp_data::batches::{assemble, Dataset, Draw, InputShape};
use demovlp_data::{FeatureSource, Sample};
use demovlp_model::qa::{QaHead, QaHeadConfig, QaModel};
use demovlp_model::Backend;
use demovlp_retrieval::mc::argmax_first;
use demovlp_retrieval::qa_metrics::{qa_metrics, QaRecord};
use serde::Deserialize;

use crate::config::{DistSection, OptimConfig};
use crate::qa::load_qa_dir;
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
    pub task: QaTaskSection,
    #[serde(default)]
    pub model: QaModelSection,
    pub data: QaDataSection,
    pub optim: OptimConfig,
    pub train: QaTrainSection,
    /// Data-parallel runs: timeouts (see the retrieval config's `[dist]`).
    #[serde(default)]
    pub dist: DistSection,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QaTaskSection {
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
    /// Micro-batches per optimiser step (their gradients averaged; see retrieval's
    /// `accumulate_steps`): a step's global batch is `batch_size × world size × this`.
    #[serde(default = "default_one")]
    pub accumulate_steps: usize,
    /// Stop after this many epochs without a better validation accuracy.
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
}

fn default_one() -> usize {
    1
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
        ensure!(c.train.accumulate_steps >= 1, "train.accumulate_steps must be >= 1");
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
// evaluation

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
pub fn evaluate_qa<B: Backend>(
    model: &mut QaModel<B>,
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
        let be = model.base.backend().clone();
        let logits = be.to_host(model.forward(&batch, false));
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
        use crate::checkpoint::{self, LATEST};
        use crate::qa_task::run_qa;
        use crate::trainer::RunOptions;
        let quiet = || RunOptions { quiet: true, ..Default::default() };
        let state = |d: &Path| checkpoint::load(&d.join(LATEST)).unwrap().state;
        let dir = demovlp_testutil::tmpdir("qa-train");
        let mut cfg = synthetic_run(&dir, 3);
        let straight = run_qa(&cfg, &quiet()).unwrap();
        assert_eq!(straight.skipped_out_of_vocabulary, 1, "the zebra question is skipped and counted");
        assert_eq!(straight.result.epochs_done, 3);
        // Pinned before the training loops became one: every refactoring keeps these bits.
        demovlp_testutil::assert_pinned("qa/resume", &straight.result.params_hash, &[("avx512", "6ee6221bf376e190")]);
        let test = straight.test.as_ref().unwrap();
        assert_eq!(test.out_of_vocabulary, 0.0);
        assert!(test.metrics["number_acc"].as_f64().is_some() && test.metrics["color_acc"].as_f64().is_some());
        // The log has a line per epoch with the validation accuracy, and the best epoch is the
        // one with the highest.
        let log = std::fs::read_to_string(dir.join("run/log.jsonl")).unwrap();
        let epochs: Vec<serde_json::Value> =
            log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["kind"] == "epoch").collect();
        assert_eq!(epochs.len(), 3);
        let accs: Vec<f64> = epochs.iter().map(|e| e["val_accuracy"].as_f64().unwrap()).collect();
        let best = (0..3).fold(0, |b, i| if accs[i] > accs[b] { i } else { b });
        assert_eq!(straight.result.best_epoch, Some(best + 1), "{accs:?}");
        assert_eq!(straight.result.best, Some(accs[best]));
        assert!(dir.join("run/best/model.safetensors").is_file() && dir.join("run/best/answers.json").is_file());
        let want = state(&dir.join("run"));

        // Interrupted after 1 epoch, resumed to 3: the same bits.
        cfg.output_dir = dir.join("run2");
        cfg.train.epochs = 1;
        run_qa(&cfg, &quiet()).unwrap();
        let e = run_qa(&cfg, &quiet()).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--force"), "a second fresh run is refused: {e}");
        cfg.train.epochs = 3;
        let resumed = run_qa(&cfg, &RunOptions { resume: true, ..quiet() }).unwrap();
        assert_eq!(resumed.result.params_hash, straight.result.params_hash, "parameters differ after resuming");
        assert_eq!(state(&dir.join("run2")), want);
        assert_eq!(resumed.test.unwrap().predictions, test.predictions);

        // Stopped mid-epoch (max_steps inside epoch 2, and a periodic checkpoint before it),
        // resumed: the same bits as the straight run.
        let per_epoch = epochs[0]["step"].as_u64().unwrap();
        assert!(per_epoch >= 3, "the test needs epochs of several steps ({per_epoch})");
        cfg.output_dir = dir.join("run3");
        cfg.train.checkpoint_every = 2;
        cfg.train.max_steps = Some(per_epoch + 1);
        let part = run_qa(&cfg, &quiet()).unwrap();
        assert!(!part.result.finished && !part.result.interrupted && part.test.is_none());
        let mid = state(&dir.join("run3"));
        assert_eq!((mid.epoch, mid.batch_in_epoch, mid.step), (2, 1, per_epoch + 1), "the checkpoint holds the stopping step");
        cfg.train.max_steps = None;
        let resumed = run_qa(&cfg, &RunOptions { resume: true, ..quiet() }).unwrap();
        assert_eq!(resumed.result.params_hash, straight.result.params_hash, "parameters differ after a mid-epoch resume");
        assert_eq!(state(&dir.join("run3")), want);
        // The step lines of the resumed run continue the numbering: every logged step once
        // (every 5th, and each epoch's last).
        let log3 = std::fs::read_to_string(dir.join("run3/log.jsonl")).unwrap();
        let steps: Vec<u64> = log3
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "step")
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        let want_steps: Vec<u64> = (1..=3 * per_epoch).filter(|g| g % 5 == 0 || g % per_epoch == 0).collect();
        assert_eq!(steps, want_steps);
        // Plots: the loss per step and the validation accuracy per epoch and answer type.
        let loss_svg = std::fs::read_to_string(dir.join("run3/loss.svg")).unwrap();
        assert!(loss_svg.starts_with("<svg") && loss_svg.contains("<polyline"), "{loss_svg}");
        let acc_svg = std::fs::read_to_string(dir.join("run3/accuracy.svg")).unwrap();
        assert!(acc_svg.contains(">overall<") && acc_svg.contains(">color<") && acc_svg.contains(">number<"), "{acc_svg}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_last_folder_of_the_earlier_release_resumes_to_the_same_bits() {
        use crate::qa_task::run_qa;
        use crate::trainer::RunOptions;
        // testdata/compat/qa_last: the `last/` folder the release before the training loops
        // became one wrote when the 3-epoch run of the test above stopped at max_steps in
        // epoch 2 (its model and both optimisers gzipped).
        let dir = demovlp_testutil::tmpdir("qa-compat");
        let cfg = synthetic_run(&dir, 3);
        let last = cfg.output_dir.join("last");
        std::fs::create_dir_all(&last).unwrap();
        let src = demovlp_testutil::testdata("compat/qa_last");
        for f in ["model.safetensors", "adamw_towers.safetensors", "adamw_head.safetensors"] {
            demovlp_testutil::gunzip(&src.join(format!("{f}.gz")), &last.join(f));
        }
        for f in ["state.json", "config.json", "answers.json"] {
            std::fs::copy(src.join(f), last.join(f)).unwrap();
        }
        std::fs::write(cfg.output_dir.join("log.jsonl"), "").unwrap();
        let r = run_qa(&cfg, &RunOptions { resume: true, quiet: true, ..Default::default() }).unwrap();
        assert!(r.result.finished && r.test.is_some());
        demovlp_testutil::assert_pinned("qa/resume", &r.result.params_hash, &[("avx512", "6ee6221bf376e190")]);
        let c = crate::checkpoint::load(&cfg.output_dir.join(crate::checkpoint::LATEST)).unwrap();
        assert_eq!(c.task, "qa");
        assert_eq!(c.optimizers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["towers", "head"]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn qa_training_on_a_simulated_device_gives_the_cpus_bits() {
        use crate::qa_task::{run_qa_on, QaData};
        use crate::trainer::RunOptions;
        use demovlp_model::backend::sim::SimDevice;
        let dir = demovlp_testutil::tmpdir("qa-sim");
        let cfg = synthetic_run(&dir, 3);
        let quiet = RunOptions { quiet: true, ..Default::default() };
        let r = run_qa_on(&SimDevice::new(), &cfg, &QaData::open(&cfg).unwrap(), &quiet, None).unwrap();
        assert!(r.result.finished && r.test.is_some());
        demovlp_testutil::assert_pinned("qa/resume", &r.result.params_hash, &[("avx512", "6ee6221bf376e190")]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
