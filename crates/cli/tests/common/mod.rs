//! What the CLI tests that train share: a tiny synthetic corpus written once per machine
//! (deterministic; staged under a private name and renamed into place), a tiny pre-training
//! config over it, and the final state of a run directory.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use demovlp_testutil::tmpdir;
use demovlp_train::checkpoint::{self, LATEST};
use demovlp_train::synthetic::{CorpusConfig, Split, SyntheticCorpus};

/// A tiny synthetic corpus in the extractor's layout, written once and shared by every run
/// of these tests (deterministic; staged under a private name and renamed into place).
pub fn corpus_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join("demovlp-test-cli-corpus-v1");
        if !root.join("annotations").join(format!("{}.jsonl", Split::Test.name())).is_file() {
            let stage = tmpdir("cli-corpus-stage");
            let mut c = CorpusConfig::new(5);
            (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test, c.frames, c.max_regions) = (16, 8, 8, 6, 4, 4, 8);
            SyntheticCorpus::new(c).write(&stage, &|_, _| {}).unwrap();
            if std::fs::rename(&stage, &root).is_err() {
                std::fs::remove_dir_all(&stage).ok(); // another test binary got there first
            }
        }
        root
    })
}

/// A tiny pre-training config over the corpus, with `train_extra` appended to `[train]`.
pub fn config(dir: &Path, out: &Path, epochs: usize, train_extra: &str) -> PathBuf {
    let root = corpus_root();
    let ann = |s: Split| root.join("annotations").join(format!("{}.jsonl", s.name())).display().to_string();
    let feats = root.join("features").display().to_string();
    let text = format!(
        r#"
name = "tiny"
seed = 3
output_dir = "{out}"
[model.config]
proj_dim = 8
[model.config.text]
kind = "distilbert"
vocab_size = 30522
dim = 16
layers = 1
heads = 2
hidden_dim = 32
max_position_embeddings = 16
layer_norm_eps = 1e-12
[model.config.video]
dim = 16
depth = 1
heads = 2
mlp_dim = 32
max_frames = 2
pos_embed_rows = 3
feature_dim = 2048
box_dim = 6
layer_norm_eps = 1e-6
[data]
tokenizer = "builtin:bert-base-uncased"
text_len = 12
frames = 2
regions = 4
batch_size = 4
[[data.train]]
name = "synth_webvid"
format = "jsonl"
annotations = "{a}"
features = "{feats}"
[[data.train]]
name = "synth_cc3m"
format = "jsonl"
annotations = "{b}"
features = "{feats}"
[data.val]
name = "synth_val"
format = "jsonl"
annotations = "{v}"
features = "{feats}"
[optim]
lr = 1e-3
eps = 1e-6
weight_decay = 0.01
schedule = "cosine"
warmup_steps = 3
[train]
epochs = {epochs}
log_every = 1
{train_extra}
"#,
        out = out.display(),
        a = ann(Split::PretrainVideo),
        b = ann(Split::PretrainImage),
        v = ann(Split::Val),
    );
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

pub type State = (Vec<(String, Vec<usize>, Vec<f32>)>, Vec<f32>, Vec<f32>, u64, checkpoint::TrainerState);

pub fn final_state(out: &Path) -> State {
    let c = checkpoint::load(&out.join(LATEST)).unwrap();
    let o = c.optimizer().clone();
    (c.params, o.m, o.v, o.t, c.state)
}
