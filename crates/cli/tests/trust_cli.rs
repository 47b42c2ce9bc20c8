//! Issue 12, end to end against the built binary: a run never destroys earlier work, a bad
//! setting is exit code 1 with a message (never a panic, 101), SIGTERM stops with a
//! resumable checkpoint and exit code 143, and resuming it equals an uninterrupted run.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use demovlp_testutil::tmpdir;
use demovlp_train::checkpoint::{self, LATEST};
use demovlp_train::synthetic::Split;

fn demovlp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

mod common;
use common::{config, corpus_root, final_state};

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

    let o =
        Command::new(env!("CARGO_BIN_EXE_demovlp")).args(["pretrain", "--config", cfg]).env("DEMOVLP_PROGRESS_SECS", "0").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // stderr is a pipe: progress comes as plain lines (here after every step).
    assert!(stderr(&o).contains("tiny: step 1/2 (epoch 1)") && stderr(&o).contains("tiny: step 2/2"), "{}", stderr(&o));
    // One JSON summary line ends stdout.
    let last: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!((last["steps"].as_u64(), last["interrupted"].as_bool()), (Some(2), Some(false)), "{last}");
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
    let line: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    // Pinned before the training loops became one: every refactoring keeps these bits.
    demovlp_testutil::assert_pinned("trust/sigterm", line["params_hash"].as_str().unwrap(), &[("avx512", "6f47df843044920c")]);
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

/// Write a [texts, videos] f32 similarity matrix as safetensors.
fn sims_file(path: &Path, texts: usize, videos: usize, v: &[f32]) {
    use demovlp_model::io::{write_safetensors_refs, TensorRef};
    write_safetensors_refs(path, &[("sims".into(), vec![texts, videos], TensorRef::F32(v))], &[]).unwrap();
}

#[test]
fn every_subcommand_answers_bad_settings_with_exit_code_1_and_a_message() {
    let dir = tmpdir("trust-bad");
    let out = dir.join("run");
    let good = config(&dir.join("good"), &out, 1, "max_steps = 1");
    let text = std::fs::read_to_string(&good).unwrap();
    // A variant of the good config; the key the message must name.
    let variant = |tag: &str, from: &str, to: &str| {
        assert!(text.contains(from), "{from}");
        let p = dir.join(format!("{tag}.toml"));
        std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
        p.display().to_string()
    };
    let zero_heads = variant("zero_heads", "heads = 2\nhidden_dim", "heads = 0\nhidden_dim");
    let odd_heads = variant("odd_heads", "heads = 2\nmlp_dim", "heads = 3\nmlp_dim");
    let frames = variant("frames", "frames = 2\nregions", "frames = 3\nregions");
    let text_len = variant("text_len", "text_len = 12", "text_len = 17");
    let vocab = variant("vocab", "vocab_size = 30522", "vocab_size = 1000");
    let eps = variant("eps", "layer_norm_eps = 1e-6", "layer_norm_eps = 0.0");
    let feature_dim = variant("feature_dim", "feature_dim = 2048", "feature_dim = 1024");
    let tokenizer = variant("tokenizer", "builtin:bert-base-uncased", "builtin:gpt2");

    // A model directory whose config.json cannot work.
    let o = demovlp(&["pretrain", "--config", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = out.join(LATEST).display().to_string();
    let model_dir = dir.join("model");
    let m = demovlp_train::weights::load_model(&out.join(LATEST)).unwrap();
    demovlp_model::io::save_model_dir(&m, &model_dir).unwrap();
    let cfg_json = model_dir.join("config.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_json).unwrap()).unwrap();
    j["text"]["heads"] = 0.into();
    std::fs::write(&cfg_json, j.to_string()).unwrap();
    let model_dir = model_dir.display().to_string();

    let nan = dir.join("nan.safetensors");
    sims_file(&nan, 3, 3, &[f32::NAN; 9]);
    let inf = dir.join("inf.safetensors");
    sims_file(&inf, 2, 2, &[1.0, 0.0, 0.5, f32::INFINITY]);
    let (nan, inf) = (nan.display().to_string(), inf.display().to_string());
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"junk").unwrap();
    let junk = junk.display().to_string();
    let legacy = dir.join("legacy.pth");
    std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]).unwrap();
    let legacy = legacy.display().to_string();
    let missing = dir.join("missing").display().to_string();
    let feats = corpus_root().join("features").display().to_string();
    let clip = corpus_root().join("features").join(Split::Val.name()).join("v000000").display().to_string();
    let o1 = dir.join("o1").display().to_string();
    let good = good.display().to_string();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["pretrain", "--config", &zero_heads], "model.config.text.heads"),
        (vec!["finetune", "--config", &zero_heads], "model.config.text.heads"),
        (vec!["pretrain", "--config", &odd_heads], "model.config.video.dim"),
        (vec!["pretrain", "--config", &frames], "data.frames = 3"),
        (vec!["pretrain", "--config", &text_len], "data.text_len = 17"),
        (vec!["pretrain", "--config", &vocab], "text.vocab_size = 1000"),
        (vec!["pretrain", "--config", &eps], "model.config.video.layer_norm_eps"),
        (vec!["pretrain", "--config", &feature_dim], "model.config.video.feature_dim"),
        (vec!["pretrain", "--config", &tokenizer], "gpt2"),
        (vec!["pretrain", "--config", &missing], "missing"),
        (vec!["eval", "--model", &ckpt, "--config", &zero_heads], "model.config.text.heads"),
        (vec!["eval", "--model", &ckpt, "--config", &text_len], "data.text_len = 17"),
        (vec!["eval", "--model", &model_dir, "--config", &good], "text.heads"),
        (vec!["eval", "--model", &missing, "--config", &good], "--model"),
        (vec!["eval", "--model", &junk, "--config", &good], "junk.safetensors"),
        (vec!["metrics", "--sims", &nan], "entry [0, 0]"),
        (vec!["metrics", "--sims", &inf], "entry [1, 1]"),
        (vec!["metrics", "--sims", &junk], "junk.safetensors"),
        (vec!["tokenize", "--tokenizer", &missing], "missing"),
        (vec!["tokenize", "--tokenizer", "builtin", "--max-len", "1"], "--max-len"),
        (vec!["regions", &missing, "--segments", "4", "--regions", "3", "--out", &o1], "missing"),
        (vec!["pack", "--features", &missing, "--annotations", &missing, "--out", &o1], "missing"),
        (vec!["pack", "--features", &feats, "--all", "--max-regions", "0", "--out", &o1], "max_regions"),
        (vec!["regions", &clip, "--segments", "0", "--regions", "3", "--out", &o1], "0 segments"),
        (vec!["regions", &clip, "--segments", "2", "--regions", "0", "--out", &o1], "regions per frame"),
        (
            vec!["eval", "--model", &ckpt, "--config", &good, "--reference-eval", "--save-sims", "/nonexistent/s.safetensors"],
            "/nonexistent/s.safetensors",
        ),
        (vec!["import", &junk, "--out", &o1], "junk.safetensors"),
        (vec!["import", &ckpt, "--out", &o1, "--text-heads", "0"], "--text-heads 0"),
        (vec!["import", &legacy, "--out", &o1, "--text-heads", "2"], "legacy (non-zip) torch.save"),
        (vec!["import", &junk, "--out", &o1, "--video-heads", "0"], "--video-heads"),
        (vec!["replay", "--model", &missing, "--batch", &missing, "--out", &o1], "missing"),
        (vec!["mc-scores", "--embeddings", &missing, "--out", &o1], "missing"),
        (vec!["qa-metrics", "--predictions", &missing], "missing"),
        (vec!["demo", "--quick", "--out", "/dev/null/x"], "/dev/null/x"),
        (vec!["bench", "gemm", "--runs", "0"], "--runs"),
        (vec!["bench", "embed", "--batch", "0"], "--batch"),
        (vec!["bench", "train-step", "--batch", "0"], "--batch"),
    ];
    let mut failures = Vec::new();
    for (args, want) in &cases {
        let o = Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).env("RUST_BACKTRACE", "0").output().unwrap();
        let e = stderr(&o);
        if o.status.code() != Some(1) || !e.contains(want) || e.contains("panicked") {
            failures.push(format!("demovlp {}: exit {:?}, want 1 and {want:?} in:\n{e}", args.join(" "), o.status.code()));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
    // `import` of a training checkpoint takes the heads from its saved config.
    let imported = dir.join("imported");
    let o = demovlp(&["import", &ckpt, "--out", imported.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let back = demovlp_model::io::load_model_dir(&imported).unwrap();
    assert_eq!((back.config.text.heads, back.config.video.heads), (2, 2));
    assert!(back.params.data == m.params.data);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_of_a_model_trained_on_fewer_frames_inflates_it_and_names_the_scoring_mode() {
    let dir = tmpdir("trust-eval");
    let out = dir.join("run");
    let cfg = config(&dir, &out, 1, "max_steps = 2");
    let o = demovlp(&["pretrain", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same data with 4 frames, beyond the checkpoint's 2 temporal_embed rows.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen("frames = 2\nregions", "frames = 4\nregions", 1);
    let text = text.replacen("max_frames = 2\npos_embed_rows = 3", "max_frames = 4\npos_embed_rows = 5", 1);
    for (fix, mode_flag, mode) in
        [("zeros", None, "aligned"), ("bilinear", Some("--reference-eval"), "reference"), ("zeros", Some("--global-only"), "global")]
    {
        let p = dir.join(format!("eval_{fix}.toml"));
        std::fs::write(&p, text.replacen("[model.config]", &format!("[model]\nload_temporal_fix = \"{fix}\"\n[model.config]"), 1)).unwrap();
        let ck = out.join(LATEST);
        let mut args = vec!["eval", "--model", ck.to_str().unwrap(), "--config", p.to_str().unwrap()];
        args.extend(mode_flag);
        let o = demovlp(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!((last["mode"].as_str(), last["test_set"].as_str()), (Some(mode), Some("synth_val")), "{stdout}");
        assert!(last["t2v"]["R1"].as_f64().unwrap().is_finite());
        assert!(stdout.contains(&format!("scores: {mode}")) && stdout.contains("synth_val "), "{stdout}");
        // stderr is a pipe here: progress comes as plain lines.
        assert!(stderr(&o).contains("embed clips: 6/6") && stderr(&o).contains("embed texts: 6/6"), "{}", stderr(&o));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pack_exits_1_when_it_drops_what_was_not_allowed_or_packs_nothing() {
    let dir = tmpdir("trust-pack");
    let root = corpus_root();
    let feats = root.join("features");
    let good = std::fs::read_to_string(root.join("annotations").join(format!("{}.jsonl", Split::Test.name()))).unwrap();
    let ann = dir.join("clips.jsonl");
    std::fs::write(&ann, format!("{good}{{\"clip\": \"no/such/clip\", \"captions\": [\"x\"]}}\nnot json\n")).unwrap();
    let pack = |out: &str, ann: &Path, extra: &[&str]| {
        let mut args = vec!["pack", "--features", feats.to_str().unwrap(), "--annotations", ann.to_str().unwrap(), "--layout", "jsonl"];
        let out = dir.join(out);
        args.extend(["--out", out.to_str().unwrap(), "--quiet"]);
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_demovlp")).args(&args).env("RUST_BACKTRACE", "0").output().unwrap()
    };
    let last_json =
        |o: &Output| -> serde_json::Value { serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap() };
    // One missing clip and one bad line: the store is written, the status says what was lost.
    let o = pack("a", &ann, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("--skip-bad") && e.contains("1 annotation records and 1 clips"), "{e}");
    let j = last_json(&o);
    assert_eq!((j["clips"].as_u64(), j["skipped_clips"].as_u64(), j["skipped_annotation_records"].as_u64()), (Some(4), Some(1), Some(1)));
    // The whole reason is printed, not its last fragment.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.lines().any(|l| l.trim_start().starts_with("1  ") && l.contains("features/<clip>: clip directory missing")), "{stdout}");
    // Allowed: exit 0.
    let o = pack("b", &ann, &["--skip-bad"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(last_json(&o)["skipped_clips"].as_u64(), Some(1));
    // Nothing packed is a failure even with --skip-bad.
    let none = dir.join("none.jsonl");
    std::fs::write(&none, "{\"clip\": \"no/such/clip\", \"captions\": [\"x\"]}\n").unwrap();
    let o = pack("c", &none, &["--skip-bad"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("packed nothing"), "{}", stderr(&o));

    // An unknown layout lists exactly the layouts --help lists.
    let o = Command::new(env!("CARGO_BIN_EXE_demovlp"))
        .args(["pack", "--features", feats.to_str().unwrap(), "--annotations", ann.to_str().unwrap(), "--layout", "youtube"])
        .args(["--out", dir.join("d").to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let listed = e.split("(known: ").nth(1).and_then(|r| r.split(')').next()).unwrap_or_else(|| panic!("{e}"));
    let help = String::from_utf8_lossy(&demovlp(&["pack", "--help"]).stdout).into_owned();
    let options = help.split("Options:").nth(1).unwrap();
    let help_layouts = options.split("--layout <LAYOUT>").nth(1).unwrap().split("--msrvtt-cut").next().unwrap().to_string();
    let words = |t: &str| -> Vec<String> {
        t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).filter(|w| !w.is_empty()).map(String::from).collect()
    };
    let names: Vec<String> = listed.split(", ").map(String::from).collect();
    assert_eq!(names.len(), 10, "{listed}");
    for n in &names {
        assert!(words(&help_layouts).contains(n), "{n} missing from --help:\n{help_layouts}");
    }
    let o = pack("d", &dir.join("clips.tsv.unknown"), &[]);
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    // An interrupted pack (no manifest yet) reads as such where a run opens it.
    let store = dir.join("b");
    std::fs::remove_file(store.join("manifest.json")).unwrap();
    let cfg = config(&dir, &dir.join("run"), 1, "max_steps = 1");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(feats.to_str().unwrap(), store.to_str().unwrap());
    std::fs::write(&cfg, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_demovlp"))
        .args(["pretrain", "--config", cfg.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("incomplete store: re-run pack"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}
