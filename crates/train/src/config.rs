//! Training configuration (TOML). Mirrors the published JSON configs: one file says which
//! model, which data, which optimiser and schedule, and how long to train.
//!
//! Every table rejects unknown keys (a typo must not silently fall back to a default), and
//! every input path is checked before any work starts, so a bad config fails in
//! milliseconds with the key or path named instead of hours into a run.
//! Relative paths are resolved against the current directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use demovlp_model::{ModelConfig, TextConfig, TextKind, VideoConfig};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Run name, used in logs and the summary.
    pub name: String,
    /// Seeds model initialisation, data order, frame choice and caption choice.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoints, logs and plots go here.
    pub output_dir: PathBuf,
    pub model: ModelSection,
    pub data: DataSection,
    pub optim: OptimConfig,
    #[serde(default)]
    pub loss: LossSection,
    pub train: TrainSection,
    /// Data-parallel runs (several processes): how long a rank waits for the others.
    #[serde(default)]
    pub dist: DistSection,
}

/// `[dist]`: time bounds of a data-parallel run (see the README's "Data-parallel training").
/// `DEMOVLP_DIST_TIMEOUT` / `DEMOVLP_RDZV_TIMEOUT` (seconds) or the `--dist-timeout` flag
/// override them without changing the config (its hash, which every rank must share).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistSection {
    /// Longest wait for another rank in any collective (a gradient all-reduce, a broadcast, a
    /// barrier) before the run stops with an error naming that rank. It must exceed the
    /// longest time one rank spends alone: rank 0 writing a checkpoint.
    #[serde(default = "default_dist_timeout")]
    pub timeout_s: f64,
    /// Longest wait at the start for every rank to join (rank 0) or for rank 0 to answer.
    #[serde(default = "default_rdzv_timeout")]
    pub rendezvous_timeout_s: f64,
}

impl Default for DistSection {
    fn default() -> Self {
        DistSection { timeout_s: default_dist_timeout(), rendezvous_timeout_s: default_rdzv_timeout() }
    }
}

fn default_dist_timeout() -> f64 {
    120.0
}
fn default_rdzv_timeout() -> f64 {
    300.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `"published"`: DistilBERT-base text tower, 12-layer ViT-B-sized video tower, P = 256.
    /// `"tiny"`: the full demo's sizes (width 128, 2 layers and 2 heads per tower, P = 64;
    /// position table of max(64, text_len) rows), for a first run on a laptop.
    /// Leave out and give `[model.config]` for any other size.
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub config: Option<ModelConfig>,
    /// Whole-model weights to start from: a model directory, a `.pth` from the published
    /// trainer, or a training checkpoint of ours. `finetune --init` overrides it.
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// Text tower only, from a Hugging Face DistilBERT/BERT directory (the published
    /// recipe starts from `distilbert-base-uncased`).
    #[serde(default)]
    pub text_init: Option<PathBuf>,
    /// Video-tower transformer blocks from a timm ViT checkpoint (the published recipe
    /// starts from `jx_vit_base_p16_224`).
    #[serde(default)]
    pub video_init: Option<PathBuf>,
    /// Weights pre-trained on fewer frames than `data.frames`: how `temporal_embed` grows,
    /// as the published loader's `load_temporal_fix` — `"zeros"` (default: the new rows
    /// start at zero) or `"bilinear"` (interpolated over the frame axis).
    #[serde(default)]
    pub load_temporal_fix: demovlp_model::io::TemporalFix,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// `tokenizer.json`, `vocab.txt` or a directory holding one.
    pub tokenizer: PathBuf,
    #[serde(default = "default_text_len")]
    pub text_len: usize,
    /// Segments (frames) per clip fed to the model.
    pub frames: usize,
    /// Regions kept per frame (top by detector confidence).
    #[serde(default = "default_regions")]
    pub regions: usize,
    /// Batch size of each training dataset (datasets alternate batch by batch).
    pub batch_size: usize,
    /// Cap on training samples per epoch over all datasets (published pre-training: 1M).
    #[serde(default)]
    pub samples_per_epoch: Option<usize>,
    /// Loader threads (0 = one per core).
    #[serde(default)]
    pub workers: usize,
    /// Skip (and count) clips that fail to load instead of stopping the run.
    #[serde(default)]
    pub skip_bad_samples: bool,
    /// `.npz` features: clip boxes that reach outside the image to it (by default such a
    /// frame is an error, or a counted skip with `skip_bad_samples`).
    #[serde(default)]
    pub clip_boxes: bool,
    pub train: Vec<DatasetConfig>,
    /// Evaluated after every epoch; its metrics drive best-checkpoint selection.
    #[serde(default)]
    pub val: Option<DatasetConfig>,
    /// Used by `demovlp eval` (falls back to `val`).
    #[serde(default)]
    pub test: Option<DatasetConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub name: String,
    /// Annotation layout: webvid, cc3m, msrvtt, didemo, msvd, lsmdc or jsonl.
    pub format: String,
    pub annotations: PathBuf,
    /// A tree of `<clip>/<i>.npz` files or a packed store directory.
    pub features: PathBuf,
    /// Dataset-specific split or cut (MSR-VTT: jsfusion, miech, full-val, full-test).
    #[serde(default)]
    pub cut: Option<String>,
    /// Use at most this many samples (first ones, in annotation order).
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Evaluation: captions per video laid out caption-major (missing ones masked).
    /// 1 = the first caption of each video only.
    #[serde(default = "default_one")]
    pub captions_per_video: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Published: first-epoch lr, then base × gamma per milestone passed, set per epoch.
    Step,
    /// Cosine decay from base to `min_lr` over all steps (after warm-up).
    Cosine,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Base learning rate (published: 2e-4).
    pub lr: f32,
    /// Learning rate of the whole first epoch (published: 1e-5); none = base.
    #[serde(default)]
    pub first_epoch_lr: Option<f32>,
    #[serde(default = "default_betas")]
    pub betas: [f32; 2],
    pub eps: f32,
    pub weight_decay: f32,
    pub schedule: ScheduleKind,
    /// Epochs (1-based) after which the step schedule multiplies the rate by `gamma`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    #[serde(default = "default_gamma")]
    pub gamma: f32,
    /// Linear warm-up from 0 over this many optimiser steps (0 = none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Floor of the cosine schedule.
    #[serde(default)]
    pub min_lr: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    #[serde(default = "default_lambda")]
    pub lambda: f32,
    /// Add the region-word alignment loss (false = the "global loss only" ablation).
    #[serde(default = "default_true")]
    pub use_local: bool,
    /// Average the local similarity over real words/regions only (not the published behaviour).
    #[serde(default)]
    pub masked_mean: bool,
}

impl Default for LossSection {
    fn default() -> Self {
        LossSection { temperature: 0.05, lambda: 20.0, use_local: true, masked_mean: false }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: usize,
    /// Log (JSONL + progress bar) every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Stop after this many epochs without improvement of the monitored metric.
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    /// Monitored metric: `<t2v|v2t>_<R1|R5|R10|R50|MedR|MeanR>`, `geometric_mean` (of t2v
    /// R1/R5/R10) or `train_loss`. Without a validation set the training loss is monitored.
    #[serde(default = "default_monitor")]
    pub monitor: String,
    /// Stop after this many optimiser steps in total (tests, smoke runs).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Batch size for embedding during evaluation.
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    /// Also write a resumable checkpoint every this many steps (0 = only at epoch ends).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Text-tower dropout (hidden and attention) during training steps. The published model
    /// trains DistilBERT in train mode with the Hugging Face default 0.1.
    #[serde(default = "default_dropout")]
    pub text_dropout: f32,
    /// Micro-batches per optimiser step: each is its own contrastive batch of
    /// `data.batch_size`, their gradients are averaged, then one AdamW step. A step's global
    /// batch is `batch_size × world size × accumulate_steps` samples (see the README's
    /// "Data-parallel training"). 1 = one batch per step (the fused AdamW path).
    #[serde(default = "default_one")]
    pub accumulate_steps: usize,
}

fn default_text_len() -> usize {
    100
}
fn default_regions() -> usize {
    30
}
fn default_one() -> usize {
    1
}
fn default_betas() -> [f32; 2] {
    [0.9, 0.999]
}
fn default_gamma() -> f32 {
    0.1
}
fn default_temperature() -> f32 {
    0.05
}
fn default_lambda() -> f32 {
    20.0
}
fn default_true() -> bool {
    true
}
fn default_log_every() -> u64 {
    10
}
fn default_monitor() -> String {
    "t2v_R1".into()
}
fn default_dropout() -> f32 {
    0.1
}
fn default_eval_batch() -> usize {
    64
}

/// Is `monitor` a higher-is-better metric?
pub fn monitor_higher_is_better(monitor: &str) -> bool {
    !(monitor.ends_with("MedR") || monitor.ends_with("MeanR") || monitor.ends_with("loss"))
}

const MONITORS: &[&str] = &[
    "train_loss",
    "geometric_mean",
    "t2v_R1",
    "t2v_R5",
    "t2v_R10",
    "t2v_R50",
    "t2v_MedR",
    "t2v_MeanR",
    "v2t_R1",
    "v2t_R5",
    "v2t_R10",
    "v2t_R50",
    "v2t_MedR",
    "v2t_MeanR",
];

const FORMATS: &[&str] = &["webvid", "cc3m", "msrvtt", "didemo", "msvd", "lsmdc", "jsonl"];

impl TrainConfig {
    /// Parse and check a config file: unknown keys, bad values and missing paths are errors
    /// naming the file and the key or path.
    pub fn load(path: &Path) -> Result<Self> {
        let cfg = Self::parse_file(path)?;
        cfg.check_paths().with_context(|| format!("config {}", path.display()))?;
        Ok(cfg)
    }

    /// Parse and check values, without touching the file system beyond `path` itself.
    pub fn parse_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse_str(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse_str(text: &str) -> Result<Self> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.check_values()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// The model sizes this config asks for.
    pub fn model_config(&self) -> Result<ModelConfig> {
        match (&self.model.preset, &self.model.config) {
            (Some(p), None) if p == "published" => Ok(ModelConfig::published(self.data.frames.max(1))),
            (Some(p), None) if p == "tiny" => {
                let mut c = small_model(128, 2, self.data.frames.max(1));
                c.text.max_position_embeddings = c.text.max_position_embeddings.max(self.data.text_len);
                Ok(c)
            }
            (Some(p), None) => bail!("model.preset: unknown preset {p:?} (known: \"published\", \"tiny\")"),
            (None, Some(c)) => Ok(c.clone()),
            (Some(_), Some(_)) => bail!("model: give either `preset` or `[model.config]`, not both"),
            (None, None) => bail!("model: missing `preset` or `[model.config]`"),
        }
    }

    fn check_values(&self) -> Result<()> {
        let d = &self.data;
        if d.frames == 0 || d.regions == 0 || d.batch_size == 0 || d.text_len < 2 {
            bail!("data: frames, regions and batch_size must be > 0 and text_len >= 2");
        }
        if d.train.is_empty() {
            bail!("data.train: at least one training dataset is needed");
        }
        for (key, ds) in self.datasets() {
            if !FORMATS.contains(&ds.format.as_str()) {
                bail!("{key}.format: unknown annotation format {:?} (known: {})", ds.format, FORMATS.join(", "));
            }
            if ds.captions_per_video == 0 {
                bail!("{key}.captions_per_video must be >= 1");
            }
        }
        if !MONITORS.contains(&self.train.monitor.as_str()) {
            bail!("train.monitor: unknown metric {:?} (known: {})", self.train.monitor, MONITORS.join(", "));
        }
        if !(0.0..1.0).contains(&self.train.text_dropout) {
            bail!("train.text_dropout must be in [0, 1), got {}", self.train.text_dropout);
        }
        if self.train.epochs == 0 {
            bail!("train.epochs must be >= 1");
        }
        if self.train.accumulate_steps == 0 {
            bail!("train.accumulate_steps must be >= 1");
        }
        for (key, v) in [("dist.timeout_s", self.dist.timeout_s), ("dist.rendezvous_timeout_s", self.dist.rendezvous_timeout_s)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{key} must be a number of seconds > 0, got {v}");
            }
        }
        let o = &self.optim;
        if o.lr.is_nan() || o.lr <= 0.0 || o.eps <= 0.0 || o.weight_decay < 0.0 {
            bail!("optim: lr and eps must be > 0, weight_decay >= 0");
        }
        if !o.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            bail!("optim.betas must each be in [0, 1), got {:?}", o.betas);
        }
        if !(o.gamma.is_finite() && o.gamma > 0.0 && o.min_lr.is_finite() && o.min_lr >= 0.0) {
            bail!("optim: gamma must be > 0 and min_lr >= 0, got gamma {} and min_lr {}", o.gamma, o.min_lr);
        }
        if o.first_epoch_lr.is_some_and(|l| !(l.is_finite() && l > 0.0)) || !o.lr.is_finite() {
            bail!("optim: lr and first_epoch_lr must be finite and > 0");
        }
        let l = &self.loss;
        if !(l.temperature.is_finite() && l.temperature > 0.0) {
            bail!("loss.temperature must be > 0, got {}", l.temperature);
        }
        if !(l.lambda.is_finite() && l.lambda >= 0.0) {
            bail!("loss.lambda must be finite and >= 0, got {}", l.lambda);
        }
        if o.milestones.windows(2).any(|w| w[0] >= w[1]) {
            bail!("optim.milestones must be strictly increasing, got {:?}", o.milestones);
        }
        let mc = self.model_config()?;
        let key = if self.model.preset.is_some() { "model.preset" } else { "model.config" };
        demovlp_model::io::check_model_config(&mc, key)?;
        demovlp_model::io::check_inputs_fit(&mc, d.frames, d.text_len, None, ["data.frames", "data.text_len"], key)?;
        Ok(())
    }

    fn datasets(&self) -> Vec<(String, &DatasetConfig)> {
        let mut v: Vec<(String, &DatasetConfig)> =
            self.data.train.iter().enumerate().map(|(i, d)| (format!("data.train[{i}]"), d)).collect();
        if let Some(d) = &self.data.val {
            v.push(("data.val".into(), d));
        }
        if let Some(d) = &self.data.test {
            v.push(("data.test".into(), d));
        }
        v
    }

    /// Every input path must exist (outputs are created).
    pub fn check_paths(&self) -> Result<()> {
        let mut paths: Vec<(String, &Path)> = Vec::new();
        if !crate::text::is_builtin(&self.data.tokenizer) {
            paths.push(("data.tokenizer".into(), self.data.tokenizer.as_path()));
        }
        for (key, ds) in self.datasets() {
            paths.push((format!("{key}.annotations"), ds.annotations.as_path()));
            paths.push((format!("{key}.features"), ds.features.as_path()));
        }
        if let Some(p) = &self.model.init {
            paths.push(("model.init".into(), p));
        }
        if let Some(p) = &self.model.text_init {
            paths.push(("model.text_init".into(), p));
        }
        if let Some(p) = &self.model.video_init {
            paths.push(("model.video_init".into(), p));
        }
        for (key, p) in paths {
            if !p.exists() {
                bail!("{key}: path does not exist: {}", p.display());
            }
        }
        Ok(())
    }
}

/// The `tiny` preset's shape (and the demo's models): a DistilBERT-style text tower and a
/// video tower of `layers` blocks of width `dim`, P = 64.
pub(crate) fn small_model(dim: usize, layers: usize, max_frames: usize) -> ModelConfig {
    ModelConfig {
        text: TextConfig {
            kind: TextKind::Distilbert,
            vocab_size: 30522,
            dim,
            layers,
            heads: 2,
            hidden_dim: 2 * dim,
            max_position_embeddings: 64,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
        },
        video: VideoConfig {
            dim,
            depth: layers,
            heads: 2,
            mlp_dim: 2 * dim,
            max_frames,
            pos_embed_rows: 1 + max_frames,
            feature_dim: 2048,
            box_dim: 6,
            layer_norm_eps: 1e-6,
        },
        proj_dim: 64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
name = "t"
output_dir = "out"
[model]
preset = "published"
[data]
tokenizer = "tok.json"
frames = 8
batch_size = 4
[[data.train]]
name = "a"
format = "jsonl"
annotations = "a.jsonl"
features = "feats"
[optim]
lr = 2e-4
eps = 1e-6
weight_decay = 0.0
schedule = "step"
[train]
epochs = 2
"#;

    #[test]
    fn minimal_config_parses_with_published_defaults() {
        let c = TrainConfig::parse_str(MINIMAL).unwrap();
        assert_eq!(c.data.text_len, 100);
        assert_eq!(c.data.regions, 30);
        assert_eq!(c.loss, LossSection::default());
        assert_eq!(c.optim.betas, [0.9, 0.999]);
        assert_eq!(c.model_config().unwrap().video.max_frames, 8);
        // Round trip through TOML keeps every value.
        assert_eq!(TrainConfig::parse_str(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn unknown_key_is_rejected_and_named() {
        let bad = MINIMAL.replace("eps = 1e-6", "eps = 1e-6\nwarmup = 3");
        let e = format!("{:#}", TrainConfig::parse_str(&bad).unwrap_err());
        assert!(e.contains("warmup"), "{e}");
        let bad = MINIMAL.replace("[train]", "[train]\nepochz = 3");
        let e = format!("{:#}", TrainConfig::parse_str(&bad).unwrap_err());
        assert!(e.contains("epochz"), "{e}");
    }

    fn shipped(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(name)
    }

    #[test]
    fn shipped_configs_mirror_the_published_recipes() {
        let p = TrainConfig::parse_file(&shipped("pretrain_webvid_cc3m.toml")).unwrap();
        assert_eq!((p.data.batch_size, p.data.frames, p.data.regions, p.data.text_len), (128, 1, 30, 100));
        assert_eq!(p.data.samples_per_epoch, Some(1_000_000));
        assert_eq!(p.data.train.iter().map(|d| d.format.as_str()).collect::<Vec<_>>(), ["webvid", "cc3m"]);
        assert_eq!((p.train.epochs, p.optim.milestones.clone()), (50, vec![30, 40]));
        assert_eq!(p.model_config().unwrap(), ModelConfig::published(1));
        let mut all = vec![p];
        for name in ["msrvtt", "didemo", "msvd", "lsmdc"] {
            let c = TrainConfig::parse_file(&shipped(&format!("finetune_{name}.toml"))).unwrap();
            assert_eq!((c.data.batch_size, c.data.frames, c.train.epochs), (32, 8, 10), "{name}");
            assert_eq!(c.optim.milestones, vec![2, 4, 8], "{name}");
            assert_eq!(c.data.train[0].format, name);
            assert!(c.data.test.is_some() && c.data.val.is_some());
            assert_eq!(c.model_config().unwrap(), ModelConfig::published(8));
            all.push(c);
        }
        for c in &all {
            assert_eq!((c.optim.lr, c.optim.first_epoch_lr, c.optim.eps, c.optim.weight_decay), (2e-4, Some(1e-5), 1e-6, 0.0));
            assert_eq!((c.optim.schedule, c.optim.betas), (ScheduleKind::Step, [0.9, 0.999]));
            assert_eq!((c.loss.temperature, c.loss.lambda, c.loss.use_local, c.loss.masked_mean), (0.05, 20.0, true, false));
        }
    }

    #[test]
    fn the_own_data_example_uses_the_tiny_preset_and_jsonl() {
        let c = TrainConfig::parse_file(&shipped("own_data_tiny.toml")).unwrap();
        let m = c.model_config().unwrap();
        assert_eq!((m.text.dim, m.text.layers, m.text.heads, m.video.dim, m.video.depth, m.proj_dim), (128, 2, 2, 128, 2, 64));
        assert_eq!((m.video.max_frames, m.text.max_position_embeddings), (c.data.frames, 64));
        assert!(crate::text::is_builtin(&c.data.tokenizer));
        assert!(c.datasets().iter().all(|(_, d)| d.format == "jsonl"));
        // The preset follows the run's frames and text length.
        let t = TrainConfig::parse_str(&MINIMAL.replace("preset = \"published\"", "preset = \"tiny\"")).unwrap();
        assert_eq!((t.model_config().unwrap().video.max_frames, t.model_config().unwrap().text.max_position_embeddings), (8, 100));
    }

    #[test]
    fn missing_path_is_rejected_before_any_work_and_named() {
        // The shipped configs point at data this checkout does not have.
        let e = format!("{:#}", TrainConfig::load(&shipped("finetune_didemo.toml")).unwrap_err());
        assert!(
            e.contains("finetune_didemo.toml") && e.contains("data.tokenizer") && e.contains("pretrained/distilbert-base-uncased"),
            "{e}"
        );
        // With the tokenizer present, the first missing dataset path is named.
        let tok = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/bert-base-uncased");
        let ann = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/annotations/DiDeMo_train.tsv");
        let text = MINIMAL.replace("tok.json", &tok.display().to_string()).replace("a.jsonl", &ann.display().to_string());
        let dir = std::env::temp_dir().join(format!("demovlp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, text).unwrap();
        let e = format!("{:#}", TrainConfig::load(&path).unwrap_err());
        assert!(e.contains("data.train[0].features") && e.contains("feats"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_values_are_rejected() {
        let bad = MINIMAL.replace("format = \"jsonl\"", "format = \"youtube\"");
        assert!(format!("{:#}", TrainConfig::parse_str(&bad).unwrap_err()).contains("data.train[0].format"));
        let bad = MINIMAL.replace("schedule = \"step\"", "schedule = \"step\"\nmilestones = [4, 2]");
        assert!(format!("{:#}", TrainConfig::parse_str(&bad).unwrap_err()).contains("milestones"));
        let bad = MINIMAL.replace("epochs = 2", "epochs = 2\nmonitor = \"t2v_R2\"");
        assert!(format!("{:#}", TrainConfig::parse_str(&bad).unwrap_err()).contains("train.monitor"));
        for (from, to, key) in [
            ("schedule = \"step\"", "schedule = \"step\"\nbetas = [0.9, 1.0]", "optim.betas"),
            ("schedule = \"step\"", "schedule = \"step\"\ngamma = 0.0", "gamma"),
            ("lr = 2e-4", "lr = inf", "lr"),
            ("epochs = 2", "epochs = 2\n[loss]\ntemperature = 0.0", "loss.temperature"),
            ("epochs = 2", "epochs = 2\n[loss]\nlambda = nan", "loss.lambda"),
        ] {
            let e = format!("{:#}", TrainConfig::parse_str(&MINIMAL.replace(from, to)).unwrap_err());
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn model_sizes_that_cannot_work_are_rejected_with_the_key() {
        let cfg = |model: &str, data_extra: &str| {
            let text = MINIMAL
                .replace("[model]\npreset = \"published\"", model)
                .replace("batch_size = 4", &format!("batch_size = 4\n{data_extra}"));
            TrainConfig::parse_str(&text).map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        let own = |text: &str, video: &str| {
            format!(
                "[model.config]\nproj_dim = 8\n[model.config.text]\nkind = \"distilbert\"\nvocab_size = 30522\ndim = 16\nlayers = 1\n{text}\nhidden_dim = 32\nlayer_norm_eps = 1e-12\n[model.config.video]\ndim = 16\ndepth = 1\nmlp_dim = 32\npos_embed_rows = 9\nfeature_dim = 2048\nbox_dim = 6\nlayer_norm_eps = 1e-6\n{video}"
            )
        };
        let good = own("heads = 2\nmax_position_embeddings = 100", "heads = 2\nmax_frames = 8");
        cfg(&good, "").unwrap();
        for (model, data, key) in [
            (own("heads = 0\nmax_position_embeddings = 100", "heads = 2\nmax_frames = 8"), "", "model.config.text.heads"),
            (own("heads = 3\nmax_position_embeddings = 100", "heads = 2\nmax_frames = 8"), "", "model.config.text.dim"),
            (own("heads = 2\nmax_position_embeddings = 100", "heads = 5\nmax_frames = 8"), "", "model.config.video.dim"),
            (own("heads = 2\nmax_position_embeddings = 100", "heads = 2\nmax_frames = 4"), "", "data.frames = 8"),
            (own("heads = 2\nmax_position_embeddings = 50", "heads = 2\nmax_frames = 8"), "", "data.text_len = 100"),
            ("[model]\npreset = \"published\"".to_string(), "text_len = 600", "data.text_len = 600"),
        ] {
            let e = cfg(&model, data).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
