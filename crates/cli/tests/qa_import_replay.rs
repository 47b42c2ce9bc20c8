//! Issue 13 A, end to end: `demovlp import` the published QA model (`qa_tiny`: from the
//! recording with `--key-prefix param.`, and from the trainer's `.pth` whose `weight_g` are
//! 0-d tensors) into a QA model directory, `demovlp replay --grads` the recorded batch, and
//! compare every tensor the recording has (outputs, loss, the gradient of every parameter,
//! `weight_g` / `weight_v` included) with the published implementation's values.

use std::path::Path;
use std::process::Command;

use demovlp_model::io::{read_safetensors, SafetensorsFile};
use demovlp_testutil::{max_abs, rel_err, rel_err_floor, testdata, tmpdir, Report};

fn demovlp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = demovlp(args);
    assert!(out.status.success(), "demovlp {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn import(input: &Path, prefix: Option<&str>, dir: &Path) -> String {
    let mut args = vec!["import", input.to_str().unwrap(), "--out", dir.to_str().unwrap(), "--text-heads", "4", "--video-heads", "4"];
    if let Some(p) = prefix {
        args.extend(["--key-prefix", p]);
    }
    ok(&args)
}

fn replay(model: &Path, out: &Path) -> SafetensorsFile {
    let fx = testdata("qa_tiny.safetensors");
    ok(&["replay", "--model", model.to_str().unwrap(), "--batch", fx.to_str().unwrap(), "--out", out.to_str().unwrap(), "--grads"]);
    read_safetensors(out).unwrap()
}

fn compare(got: &SafetensorsFile, want: &SafetensorsFile, what: &str) {
    // Same names and shapes as the recording (besides inputs and weights), nothing more.
    let recorded: Vec<&String> = want.tensors.keys().filter(|k| !k.starts_with("in.") && !k.starts_with("param.")).collect();
    let written: Vec<&String> = got.tensors.keys().collect();
    assert_eq!(written, recorded, "{what}: written tensor names");
    for k in recorded {
        assert_eq!(got.tensors[k].shape, want.tensors[k].shape, "{what}: {k}");
    }
    // Gradients against max(the tensor's max, 1e-3 × the largest gradient) (fixtures README).
    let floor =
        1e-3 * want.tensors.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(_, t)| max_abs(t.as_f32().unwrap())).fold(0.0, f64::max);
    let mut rep = Report::default();
    let mut grads = 0;
    for (name, w) in want.tensors.iter().filter(|(k, _)| k.starts_with("out.") || k.starts_with("grad.")) {
        let (g, w) = (got.tensors[name].as_f32().unwrap(), w.as_f32().unwrap());
        if name.starts_with("grad.") {
            grads += 1;
            // measured worst 9.7e-6 (head.v_att.linear.bias), as crates/model/tests/parity_qa.rs
            rep.check(name, rel_err_floor(g, w, floor), 3e-5);
        } else {
            rep.check(name, rel_err(g, w), 2e-6); // measured ≤ 5e-7
        }
    }
    assert!(grads > 60, "{what}: only {grads} gradients compared");
    assert!(want.tensors.keys().any(|k| k.ends_with(".weight_g") && k.starts_with("grad.head.")));
    rep.finish(what);
}

#[test]
fn import_and_replay_qa_tiny_from_safetensors_and_pth() {
    let dir = tmpdir("qa-import-replay");
    let want = read_safetensors(&testdata("qa_tiny.safetensors")).unwrap();

    let st_dir = dir.join("from_safetensors");
    let log = import(&testdata("qa_tiny.safetensors"), Some("param."), &st_dir);
    assert!(log.contains("as a QA model") && log.contains("11 answers"), "{log}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(st_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["qa_head"], serde_json::json!({"dim": 32, "hidden": 24, "answers": 11}));
    let got = replay(&st_dir, &dir.join("st.safetensors"));
    compare(&got, &want, "qa_tiny (safetensors import)");
    // Scalar gains are written as [1].
    assert_eq!(got.tensors["grad.head.v_att.linear.weight_g"].shape, [1]);

    // The .pth (module. prefix, foreign config object, 0-d weight_g) holds the same weights:
    // its replay writes exactly the same tensors.
    let pth_dir = dir.join("from_pth");
    import(&testdata("qa_tiny_checkpoint.pth"), None, &pth_dir);
    let got_pth = replay(&pth_dir, &dir.join("pth.safetensors"));
    assert_eq!(got_pth.tensors, got.tensors);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn qa_replay_needs_labels_and_a_qa_model() {
    let dir = tmpdir("qa-replay-refusals");
    // The QA model on a batch without labels (model_tiny's): refused, naming in.labels.
    let qa = dir.join("qa");
    import(&testdata("qa_tiny.safetensors"), Some("param."), &qa);
    let no_labels = testdata("model_tiny.safetensors");
    let out = demovlp(&["replay", "--model", qa.to_str().unwrap(), "--batch", no_labels.to_str().unwrap(), "--out", "/dev/null"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in.labels"), "{err}");
    // --adamw (a retrieval-replay option) on a QA model: refused, not ignored.
    let out = demovlp(&[
        "replay",
        "--model",
        qa.to_str().unwrap(),
        "--batch",
        testdata("qa_tiny.safetensors").to_str().unwrap(),
        "--out",
        dir.join("x.safetensors").to_str().unwrap(),
        "--adamw",
        "0.001,0.9,0.999,1e-6,0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--adamw"));
    // --device is honoured, not ignored: without a usable GPU, cuda is exit 1 naming why
    // (and nothing is written).
    if demovlp_cuda::probe(0).is_err() {
        let x = dir.join("cuda.safetensors");
        let fx = testdata("qa_tiny.safetensors");
        let out = demovlp(&[
            "replay",
            "--model",
            qa.to_str().unwrap(),
            "--batch",
            fx.to_str().unwrap(),
            "--out",
            x.to_str().unwrap(),
            "--device",
            "cuda",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("--device cuda") && !err.contains("panicked"), "{err}");
        assert!(!x.exists());
    }
    std::fs::remove_dir_all(&dir).ok();
}
