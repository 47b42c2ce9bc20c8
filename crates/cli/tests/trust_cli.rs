//! Issue 12, end to end against the built binary: a run never destroys earlier work, a bad
//! setting is exit code 1 with a message (never a panic, 101), SIGTERM stops with a
//! resumable checkpoint and exit code 143, and resuming it equals an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use demovlp_testutil::tmpdir;
use demovlp_train::checkpoint::{self, LATEST};
use demovlp_train::synthetic::{CorpusConfig, Split, SyntheticCorpus};

fn demovlp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tiny synthetic corpus written once per test binary in the extractor's layout.
fn corpus_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = tmpdir("trust-corpus");
        let mut c = CorpusConfig::new(5);
        (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test, c.frames) = (16, 8, 8, 6, 4, 4);
        SyntheticCorpus::new(c).write(&root, &|_, _| {}).unwrap();
        root
    })
}

/// A tiny pre-training config over the corpus, with `train_extra` appended to `[train]`.
fn config(dir: &Path, out: &Path, epochs: usize, train_extra: &str) -> PathBuf {
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

type State = (Vec<(String, Vec<usize>, Vec<f32>)>, Vec<f32>, Vec<f32>, u64, checkpoint::TrainerState);

fn final_state(out: &Path) -> State {
    let c = checkpoint::load(&out.join(LATEST)).unwrap();
    (c.params, c.optimizer.m, c.optimizer.v, c.optimizer.t, c.state)
}

#[test]
fn a_second_run_never_replaces_the_first_and_resume_needs_a_checkpoint() {
    let dir = tmpdir("trust-lost-work");
    let out = dir.join("run");
    let cfg = config(&dir, &out, 3, "max_steps = 2");
    let cfg = cfg.to_str().unwrap();

    // --resume with nothing to resume is an error, not a fresh start.
    let o = demovlp(&["pretrain", "--config", cfg, "--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no checkpoint to resume") && stderr(&o).contains(&out.display().to_string()), "{}", stderr(&o));
    assert!(!out.join(LATEST).exists());

    let o = demovlp(&["pretrain", "--config", cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read(out.join(LATEST)).unwrap();
    let best = std::fs::read(out.join(checkpoint::BEST)).ok();

    // The same command again is refused, naming the directory and the choices; nothing changes.
    let o = demovlp(&["pretrain", "--config", cfg]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(&out.display().to_string()) && e.contains("--resume") && e.contains("--force") && e.contains("--output-dir"), "{e}");
    assert!(std::fs::read(out.join(LATEST)).unwrap() == first);
    assert!(std::fs::read(out.join(checkpoint::BEST)).ok() == best);
    // So is fine-tuning into it.
    let o = demovlp(&["finetune", "--config", cfg]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(std::fs::read(out.join(LATEST)).unwrap() == first);

    // --force starts over; --force with --resume is a usage error.
    let o = demovlp(&["pretrain", "--config", cfg, "--force", "--resume"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = demovlp(&["pretrain", "--config", cfg, "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--force: removed"), "{}", stderr(&o));
    // Same seed, same run: the same checkpoint state.
    assert_eq!(checkpoint::load(&out.join(LATEST)).unwrap().state.step, 2);

    // Fine-tuning without --init says it starts from random weights.
    let o = demovlp(&["finetune", "--config", cfg, "--output-dir", dir.join("ft").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("without --init") && stderr(&o).contains("random weights"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_saves_a_resumable_checkpoint_exits_143_and_resume_is_bit_exact() {
    let dir = tmpdir("trust-sigterm");
    // 40 epochs of 6 batches, validation after each: long enough to be stopped part-way.
    let max = 200;
    let straight = dir.join("straight");
    let cfg = config(&dir.join("a"), &straight, 40, &format!("max_steps = {max}"));
    let o = demovlp(&["pretrain", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = final_state(&straight);
    assert_eq!(want.4.step, max);

    let cut = dir.join("cut");
    let cfg = config(&dir.join("b"), &cut, 40, &format!("max_steps = {max}"));
    let cfg = cfg.to_str().unwrap();
    // A dead run's partial checkpoint must not survive the next start.
    std::fs::create_dir_all(&cut).unwrap();
    let stale = cut.join(format!(".{LATEST}.{}.tmp", (1u32 << 22) + 5));
    std::fs::write(&stale, b"partial").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_demovlp"))
        .args(["pretrain", "--config", cfg])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the third step in the log, then send what a scheduler sends.
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(cut.join("log.jsonl")).unwrap_or_default();
        if log.lines().filter(|l| l.contains("\"kind\":\"step\"")).count() >= 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be stopped");
        assert!(t0.elapsed() < Duration::from_secs(120), "no training step logged");
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{e}");
    assert!(e.contains("SIGTERM") && e.contains("--resume"), "{e}");
    assert!(!stale.exists(), "stale temporary left behind");
    let mid = final_state(&cut);
    assert!(mid.4.step >= 3 && mid.4.step < max, "stopped at step {}", mid.4.step);

    let o = demovlp(&["pretrain", "--config", cfg, "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = final_state(&cut);
    assert!(got.0 == want.0, "weights differ after SIGTERM + resume");
    assert!(got.1 == want.1 && got.2 == want.2 && got.3 == want.3, "optimiser state differs after SIGTERM + resume");
    assert_eq!(got.4, want.4);
    std::fs::remove_dir_all(&dir).ok();
}
