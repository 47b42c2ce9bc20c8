//! `demovlp finetune-qa` and `demovlp eval-qa` end to end (issue 13 C) on a small synthetic
//! corpus written in the extractor's layout with our QA JSONL: the run writes a QA model
//! directory, eval-qa on it reproduces the run's test accuracy, and its predictions file
//! agrees with the accuracy it prints; `import`-style refusals: a retrieval model directory
//! is not a QA model.

use std::process::Command;
use std::time::{Duration, Instant};

use demovlp_testutil::tmpdir;
use demovlp_train::synthetic::questions::{answer_vocabulary, questions};
use demovlp_train::synthetic::{CorpusConfig, Split, SyntheticCorpus};
use serde_json::Value;

fn demovlp(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The corpus, QA JSONL files, answer list and initial model in `dir`, and `qa.toml` for a
/// run of `epochs` epochs into `dir/run` (`train_extra`: more `[train]` lines).
fn setup(dir: &std::path::Path, epochs: usize, train_extra: &str) {
    let mut c = CorpusConfig::new(8);
    (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test, c.frames) = (1, 1, 32, 8, 10, 2);
    let corpus = SyntheticCorpus::new(c);
    corpus.write(&dir.join("corpus"), &|_, _| {}).unwrap();
    for (split, file) in [(Split::FinetuneTrain, "train.jsonl"), (Split::Val, "val.jsonl"), (Split::Test, "test.jsonl")] {
        let mut s = String::new();
        for clip in corpus.clips(split) {
            for q in questions(clip) {
                s += &format!(
                    "{}\n",
                    serde_json::json!({"clip": clip.id, "question": q.question, "answer": q.answer, "answer_type": q.answer_type})
                );
            }
        }
        if split == Split::Test {
            // An answer outside the vocabulary: counted in the ceiling, never right.
            s += &format!("{}\n", serde_json::json!({"clip": corpus.clips(split)[0].id, "question": "what is it?", "answer": "zebra"}));
        }
        std::fs::write(dir.join(file), s).unwrap();
    }
    std::fs::write(dir.join("answers.txt"), answer_vocabulary().join("\n") + "\n").unwrap();
    // A small retrieval model to start from.
    let mut cfg = demovlp_model::ModelConfig::published(2);
    (cfg.text.dim, cfg.text.layers, cfg.text.heads, cfg.text.hidden_dim, cfg.text.max_position_embeddings) = (16, 1, 2, 32, 16);
    (cfg.video.dim, cfg.video.depth, cfg.video.heads, cfg.video.mlp_dim) = (16, 1, 2, 32);
    cfg.proj_dim = 8;
    let mut m = demovlp_model::Model::new(cfg);
    m.init_random(2);
    demovlp_model::io::save_model_dir(&m, &dir.join("init")).unwrap();
    let p = |f: &str| dir.join(f).display().to_string();
    let ds = |name: &str, f: &str| {
        format!(
            "[data.{name}]\nname = \"{name}\"\nformat = \"jsonl\"\nannotations = \"{}\"\nfeatures = \"{}\"\n",
            p(f),
            p("corpus/features")
        )
    };
    let config = format!(
        "name = \"cli_qa\"\noutput_dir = \"{}\"\n[task]\nkind = \"qa\"\n[model]\nhidden = 8\n[data]\ntext_len = 12\nframes = 2\nregions = 5\n\
         batch_size = 8\nanswers = \"{}\"\n{}{}{}[optim]\nlr = 1e-3\nfirst_epoch_lr = 1e-3\neps = 1e-6\nweight_decay = 0.0\n\
         schedule = \"step\"\n[train]\nepochs = {epochs}\neval_batch_size = 7\n{train_extra}\n",
        p("run"),
        p("answers.txt"),
        ds("train", "train.jsonl"),
        ds("val", "val.jsonl"),
        ds("test", "test.jsonl"),
    );
    std::fs::write(dir.join("qa.toml"), config).unwrap();
}

#[test]
fn finetune_qa_then_eval_qa_agree() {
    let dir = tmpdir("qa-train-cli");
    setup(&dir, 2, "");
    let p = |f: &str| dir.join(f).display().to_string();

    let (ok, _, err) = demovlp(&["finetune-qa", "--config", &p("qa.toml")]);
    assert!(!ok && err.contains("--init"), "no initial model: {err}");
    let (ok, out, err) = demovlp(&["finetune-qa", "--config", &p("qa.toml"), "--init", &p("init")]);
    assert!(ok, "{err}");
    let run: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(run["task"], "qa");
    let n_test = std::fs::read_to_string(dir.join("test.jsonl")).unwrap().lines().count() as f64;
    assert!((run["out_of_vocabulary"].as_f64().unwrap() - 100.0 / n_test).abs() < 1e-9, "{run}");
    assert!(run["best_epoch"].as_u64().is_some_and(|e| (1..=2).contains(&e)));

    let (ok, out, err) = demovlp(&["eval-qa", "--model", &p("run/best"), "--config", &p("qa.toml"), "--predictions", &p("pred.jsonl")]);
    assert!(ok, "{err}");
    let ev: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(ev["accuracy"], run["accuracy"], "eval-qa on the best model = the run's test accuracy");
    let rows: Vec<Value> =
        std::fs::read_to_string(dir.join("pred.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len() as f64, n_test);
    let right = rows.iter().filter(|r| r["correct"].as_bool().unwrap()).count();
    assert!((ev["accuracy"].as_f64().unwrap() - 100.0 * right as f64 / n_test).abs() < 1e-9);
    assert!(rows.iter().all(|r| r["correct"].as_bool().unwrap() == (r["prediction"] == r["answer"])));
    assert!(rows.iter().any(|r| r["answer"] == "zebra" && r["correct"] == false));

    // A retrieval model directory is not a QA model.
    let (ok, _, err) = demovlp(&["eval-qa", "--model", &p("init"), "--config", &p("qa.toml")]);
    assert!(!ok && err.contains("not a QA model"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn finetune_qa_sigterm_mid_epoch_exits_143_and_resume_is_bit_exact() {
    let dir = tmpdir("qa-train-cli-sigterm");
    // 30 epochs, a step line every step: long enough to be stopped part-way.
    setup(&dir, 30, "log_every = 1");
    let p = |f: &str| dir.join(f).display().to_string();
    let (ok, out, err) = demovlp(&["finetune-qa", "--config", &p("qa.toml"), "--init", &p("init"), "--output-dir", &p("straight")]);
    assert!(ok, "{err}");
    // Pinned before the training loops became one: every refactoring keeps these bits.
    let straight: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    demovlp_testutil::assert_pinned("qa_cli/sigterm", straight["params_hash"].as_str().unwrap(), &[("avx512", "1985b835a666feed")]);

    let mut child = Command::new(env!("CARGO_BIN_EXE_demovlp"))
        .args(["finetune-qa", "--config", &p("qa.toml"), "--init", &p("init"), "--output-dir", &p("cut")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a step that is not at an epoch end (32 clips, several questions each: an
    // epoch has many steps), then send what a scheduler sends.
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("cut/log.jsonl")).unwrap_or_default();
        if log.lines().filter(|l| l.contains("\"kind\":\"step\"")).count() >= 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be stopped");
        assert!(t0.elapsed() < Duration::from_secs(120), "no training step logged");
        std::thread::sleep(Duration::from_millis(2));
    }
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let line: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(line["interrupted"], true, "{line}");
    let state = demovlp_train::checkpoint::load(&dir.join("cut/checkpoint_latest.safetensors")).unwrap().state;
    assert!(state.step >= 3 && state.epoch <= 30 && !state.finished, "{state:?}");

    let (ok, out, err) = demovlp(&["finetune-qa", "--config", &p("qa.toml"), "--output-dir", &p("cut"), "--resume"]);
    assert!(ok, "{err}");
    let resumed: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(resumed["params_hash"], straight["params_hash"], "parameters differ after SIGTERM + resume");
    let [a, b] =
        [dir.join("straight"), dir.join("cut")].map(|d| demovlp_train::checkpoint::load(&d.join("checkpoint_latest.safetensors")).unwrap());
    assert!(a.params == b.params && a.state == b.state, "the latest checkpoints differ after SIGTERM + resume");
    for ((na, oa), (nb, ob)) in a.optimizers.iter().zip(&b.optimizers) {
        assert!(na == nb && oa.m == ob.m && oa.v == ob.v && oa.t == ob.t, "optimiser {na} differs after SIGTERM + resume");
    }
    let best = |d: &str| std::fs::read(dir.join(d).join("best/model.safetensors")).unwrap();
    assert!(best("straight") == best("cut"), "best/ differs after SIGTERM + resume");
    assert!(dir.join("cut/loss.svg").exists() && dir.join("cut/accuracy.svg").exists());
    assert!(resumed["accuracy"].is_number(), "{resumed}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn finetune_qa_accumulating_two_parts_is_two_ranks_and_follows_its_schedule() {
    let dir = tmpdir("qa-train-cli-dist");
    setup(&dir, 2, "log_every = 1");
    let p = |f: &str| dir.join(f).display().to_string();
    // A cosine schedule with warm-up (the QA loop used to keep the rate constant).
    let text = std::fs::read_to_string(dir.join("qa.toml")).unwrap();
    let text = text.replace("schedule = \"step\"", "schedule = \"cosine\"\nwarmup_steps = 3\nmin_lr = 1e-5");
    std::fs::write(dir.join("ranks.toml"), &text).unwrap();
    std::fs::write(dir.join("accumulate.toml"), text.replace("log_every = 1", "log_every = 1\naccumulate_steps = 2")).unwrap();
    let (ok, out, err) = demovlp(&["finetune-qa", "--config", &p("accumulate.toml"), "--init", &p("init"), "--output-dir", &p("one")]);
    assert!(ok, "{err}");
    let one: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();

    // torchrun's variables; the rendezvous is on MASTER_PORT + 1.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_demovlp"));
            cmd.args(["finetune-qa", "--config", &p("ranks.toml"), "--init", &p("init"), "--output-dir", &p("two")]);
            for k in ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "LOCAL_RANK"] {
                cmd.env_remove(k);
            }
            cmd.env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", (free - 1).to_string());
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
        let line: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(line["params_hash"], one["params_hash"], "rank {r} vs one process accumulating two parts");
        assert_eq!((line["rank"].as_u64(), line["world_size"].as_u64()), (Some(r as u64), Some(2)));
    }

    // Every logged step carries its learning rate: a linear warm-up over 3 steps, then the
    // cosine decay towards min_lr.
    let lrs: Vec<f64> = std::fs::read_to_string(dir.join("one/log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["lr"].as_f64().unwrap())
        .collect();
    assert!(lrs.len() >= 6, "{lrs:?}");
    for (k, lr) in lrs[..3].iter().enumerate() {
        assert!((lr - 1e-3 * (k + 1) as f64 / 3.0).abs() < 1e-9, "warm-up step {k}: {lrs:?}");
    }
    assert!(lrs[3..].windows(2).all(|w| w[1] < w[0]) && *lrs.last().unwrap() < 0.5e-3, "cosine decay: {lrs:?}");
    std::fs::remove_dir_all(&dir).ok();
}
