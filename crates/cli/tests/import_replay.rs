//! The command-line contract of issue 3, end to end: `demovlp import` a recorded batch's
//! weights (`--key-prefix param.`) or the trainer's `.pth`, `demovlp replay` the batch with
//! `--grads --adamw`, and check what was written.
//!
//! Checked against the recording (made with the text tower's dropout off, so every tensor is
//! deterministic):
//! - every `out.*` (text and video embeddings, masks, similarities, losses);
//! - every `grad.*`, text tower included;
//! - that the written similarities belong to the written embeddings, and the losses add up;
//! - names and shapes of every `out.*`, `grad.*`, `after_adamw.*` as in the recording;
//! - `after_adamw.*` = one published AdamW step from `param.*` with the written `grad.*`;
//! - the `.pth` import replays identically to the safetensors import.

use std::path::Path;
use std::process::Command;

use demovlp_model::io::{read_safetensors, SafetensorsFile};
use demovlp_model::{AdamW, ParamsBuilder};

use demovlp_testutil::{max_abs, rel_err, rel_err_floor, testdata, Report};

fn demovlp(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).output().unwrap();
    assert!(out.status.success(), "demovlp {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    d / (n(a) * n(b)).max(1e-8)
}

struct Replayed {
    got: SafetensorsFile,
    log: String,
}

fn import_and_replay(tag: &str, input: &Path, key_prefix: Option<&str>, heads: (usize, usize), fixture: &Path, adamw: &str) -> Replayed {
    let dir = std::env::temp_dir().join(format!("demovlp-cli-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let model = dir.join("model");
    let out = dir.join("replay.safetensors");
    let (th, vh) = (heads.0.to_string(), heads.1.to_string());
    let mut args = vec!["import", input.to_str().unwrap(), "--out", model.to_str().unwrap(), "--text-heads", &th, "--video-heads", &vh];
    if let Some(p) = key_prefix {
        args.extend(["--key-prefix", p]);
    }
    let mut log = demovlp(&args);
    log += &demovlp(&[
        "replay",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        fixture.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--grads",
        "--adamw",
        adamw,
    ]);
    let got = read_safetensors(&out).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    Replayed { got, log }
}

fn adamw_arg(want: &SafetensorsFile) -> String {
    let meta: serde_json::Value = serde_json::from_str(&want.metadata["config"]).unwrap();
    let a = &meta["adamw"];
    format!("{},{},{},{},{}", a["lr"], a["beta1"], a["beta2"], a["eps"], a["weight_decay"])
}

fn check(fixture: &str, heads: (usize, usize), grad_tol: f64) -> SafetensorsFile {
    let fx = testdata(fixture);
    let want = read_safetensors(&fx).unwrap();
    let adamw = adamw_arg(&want);
    let Replayed { got, log } = import_and_replay(fixture, &fx, Some("param."), heads, &fx, &adamw);
    assert!(log.contains("76 loaded") || log.contains("74 loaded"), "{log}");

    // Every tensor the recording has (besides inputs and weights) is written, same shape.
    for (name, w) in want.tensors.iter().filter(|(k, _)| !k.starts_with("in.") && !k.starts_with("param.")) {
        let g = got.tensors.get(name).unwrap_or_else(|| panic!("{fixture}: replay did not write {name}"));
        assert_eq!(g.shape, w.shape, "{fixture}: {name}");
    }
    let grads_written = got.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    let grads_recorded = want.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grads_written, grads_recorded, "{fixture}: gradient set differs from the recording");

    // Every output and every gradient against the recording (recorded with dropout off, so
    // the text side is deterministic too); gradients relative to max(the tensor's max,
    // 1e-3 × the largest gradient), as the fixtures README prescribes (see
    // crates/model/tests/parity_model.rs for the measured errors and why model_tiny's are ~1e-4).
    let floor =
        1e-3 * want.tensors.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(_, t)| max_abs(t.as_f32().unwrap())).fold(0.0, f64::max);
    let mut rep = Report::default();
    for (name, w) in want.tensors.iter().filter(|(k, _)| k.starts_with("out.") || k.starts_with("grad.")) {
        let (g, w) = (got.tensors[name].as_f32().unwrap(), w.as_f32().unwrap());
        if name.starts_with("grad.") {
            rep.check(name, rel_err_floor(g, w, floor), grad_tol);
        } else {
            rep.check(name, rel_err(g, w), 5e-6);
        }
    }
    rep.finish(fixture);
    let p = want.tensors["out.global_text"].shape[1];
    let gt = got.tensors["out.global_text"].as_f32().unwrap();

    // The similarities belong to the written embeddings; the losses add up.
    let b = want.tensors["out.global_text"].shape[0];
    let gv = got.tensors["out.global_video"].as_f32().unwrap();
    let sim = got.tensors["out.global_sim_text_video"].as_f32().unwrap();
    for t in 0..b {
        for v in 0..b {
            let c = cos(&gt[t * p..(t + 1) * p], &gv[v * p..(v + 1) * p]);
            assert!((sim[t * b + v] - c).abs() < 1e-5, "{fixture}: global sim [{t},{v}] {} vs cosine {c}", sim[t * b + v]);
        }
    }
    let l = |k: &str| got.tensors[k].as_f32().unwrap()[0];
    assert!((l("out.loss_total") - l("out.loss_global") - l("out.loss_local")).abs() < 1e-5);
    assert!(l("out.loss_local") != 0.0 && l("out.loss_global") > 0.0);

    // after_adamw = one published AdamW step from the weights with the written gradients.
    let mut pb = ParamsBuilder::new();
    let names: Vec<&str> = want.tensors.keys().filter_map(|k| k.strip_prefix("param.")).collect();
    for n in &names {
        let shape = &want.tensors[&format!("param.{n}")].shape;
        if got.tensors.contains_key(&format!("grad.{n}")) {
            pb.add(*n, shape);
        } else {
            pb.add_unused(*n, shape);
        }
    }
    let mut params = pb.build();
    for n in &names {
        let id = params.id(n).unwrap();
        params.get_mut(id).copy_from_slice(want.tensors[&format!("param.{n}")].as_f32().unwrap());
        if let Some(g) = got.tensors.get(&format!("grad.{n}")) {
            params.grad_mut(id).copy_from_slice(g.as_f32().unwrap());
        }
    }
    let v: Vec<f32> = adamw.split(',').map(|x| x.parse().unwrap()).collect();
    AdamW::new(params.len(), v[0], v[1], v[2], v[3], v[4]).step(&mut params);
    for n in &names {
        let id = params.id(n).unwrap();
        assert_eq!(got.tensors[&format!("after_adamw.{n}")].as_f32().unwrap(), params.get(id), "{fixture}: after_adamw.{n}");
        if !params.spec(id).receives_grad {
            assert_eq!(params.get(id), want.tensors[&format!("after_adamw.{n}")].as_f32().unwrap(), "{fixture}: unused {n} changed");
        }
    }
    got
}

#[test]
fn import_and_replay_model_tiny_and_published_checkpoint() {
    let got = check("model_tiny.safetensors", (4, 4), 4e-4);
    // The trainer's .pth (module. prefix, pickled config object) holds the same weights:
    // replaying it writes exactly the same tensors.
    let fx = testdata("model_tiny.safetensors");
    let adamw = adamw_arg(&read_safetensors(&fx).unwrap());
    let pth = import_and_replay("pth", &testdata("model_tiny_checkpoint.pth"), None, (4, 4), &fx, &adamw);
    assert_eq!(pth.got.tensors, got.tensors);
}

#[test]
fn import_and_replay_model_tiny_1frame() {
    check("model_tiny_1frame.safetensors", (3, 2), 3e-5);
}

#[test]
fn replay_rejects_bad_adamw_settings() {
    let fx = testdata("model_tiny.safetensors");
    let dir = std::env::temp_dir().join(format!("demovlp-cli-bad-{}", std::process::id()));
    let model = dir.join("model");
    demovlp(&[
        "import",
        fx.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--key-prefix",
        "param.",
        "--text-heads",
        "4",
        "--video-heads",
        "4",
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_demovlp"))
        .args([
            "replay",
            "--model",
            model.to_str().unwrap(),
            "--batch",
            fx.to_str().unwrap(),
            "--out",
            dir.join("o.safetensors").to_str().unwrap(),
            "--adamw",
            "0.001,0.9",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected 5"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_commands_end_with_one_json_line() {
    let fx = testdata("model_tiny.safetensors");
    let dir = std::env::temp_dir().join(format!("demovlp-cli-bench-{}", std::process::id()));
    let model = dir.join("model");
    demovlp(&[
        "import",
        fx.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--key-prefix",
        "param.",
        "--text-heads",
        "4",
        "--video-heads",
        "4",
    ]);
    let m = model.to_str().unwrap();
    let sizes = ["--batch", "3", "--frames", "2", "--regions", "4", "--text-len", "9", "--runs", "3", "--json"];
    for (cmd, keys) in
        [("train-step", &["median_s", "min_s", "max_s", "peak_rss_mb"][..]), ("embed", &["texts_per_s", "clips_per_s", "peak_rss_mb"][..])]
    {
        let out = Command::new(env!("CARGO_BIN_EXE_demovlp")).args(["bench", cmd, "--model", m]).args(sizes).output().unwrap();
        assert!(out.status.success(), "bench {cmd}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(stdout.trim_end().lines().last().unwrap()).unwrap();
        for k in keys {
            let x = v[k].as_f64().unwrap_or_else(|| panic!("bench {cmd}: no number {k} in {v}"));
            assert!(x > 0.0 && x.is_finite(), "bench {cmd}: {k} = {x}");
        }
        assert_eq!(v["runs"], 3);
    }
    // The tiny model has temporal embeddings for 3 frames only: a clear refusal.
    let v = Command::new(env!("CARGO_BIN_EXE_demovlp"))
        .args(["bench", "train-step", "--model", m, "--frames", "4", "--json"])
        .output()
        .unwrap();
    assert!(!v.status.success() && String::from_utf8_lossy(&v.stderr).contains("--frames 4"));
    std::fs::remove_dir_all(&dir).ok();
}
