//! `--device`: on a machine without a usable GPU (or a build without the `cuda` feature),
//! `--device cuda` exits 1 with a message naming what is missing, never a panic; the hidden
//! `selftest` runs every kernel check on the CPU.

use std::process::Command;

fn demovlp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).env("RUST_BACKTRACE", "0").output().expect("run demovlp")
}

#[test]
fn device_cuda_without_a_gpu_exits_1_with_the_reason() {
    if demovlp_cuda::probe(0).is_ok() {
        eprintln!("notice: a CUDA device is present; the no-GPU path is not exercised here");
        return;
    }
    for args in [
        &["bench", "train-step", "--device", "cuda"][..],
        &["bench", "embed", "--device", "cuda:0"],
        &["bench", "eval-sims", "--device", "cuda"],
        &["selftest", "--device", "cuda"],
        // The device is checked before the model and the config are read.
        &["eval", "--model", "no-such-model", "--config", "no-such.toml", "--device", "cuda"],
        // Training and the downstream evaluations: no more "CPU only".
        &["pretrain", "--config", "no-such.toml", "--device", "cuda"],
        &["finetune", "--config", "no-such.toml", "--device", "cuda"],
        &["finetune-qa", "--config", "no-such.toml", "--device", "cuda"],
        &["eval-qa", "--model", "no-such-model", "--config", "no-such.toml", "--device", "cuda"],
        &["eval-mc", "--model", "no-such-model", "--questions", "q.jsonl", "--features", "f", "--device", "cuda"],
    ] {
        let out = demovlp(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let named = if demovlp_cuda::BUILT_WITH_CUDA { "CUDA library not found" } else { "built without CUDA support" };
        assert!(
            stderr.contains("--device cuda")
                && (stderr.contains(named) || stderr.contains("no CUDA device") || stderr.contains("CUDA driver")),
            "{args:?}: {stderr}"
        );
    }
    let out = demovlp(&["selftest", "--device", "cuda"]);
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().next().expect("a JSON line")).unwrap();
    assert_eq!(v["ok"], false);
}

#[test]
fn unknown_device_is_a_usage_error() {
    let out = demovlp(&["bench", "train-step", "--device", "gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpu, cuda or cuda:N"));
}

#[test]
fn selftest_on_the_cpu_passes_every_check() {
    let out = demovlp(&["selftest", "--device", "cpu", "--tol", "0", "--model-tol", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // Every kernel case, the whole-model check, the five evaluation-score cases
    // (`device::score_cases`) and the summary line.
    assert_eq!(lines.len(), demovlp_model::backend::kernels_check::CASES.len() + 1 + 5 + 1);
    assert!(lines.iter().filter(|l| l["name"].as_str().unwrap().starts_with("eval scores")).count() == 5, "{lines:?}");
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
}

/// `scripts/gpu-check.sh` parses, and on a machine without a GPU it reports the missing GPU
/// and still writes `gpu-check.json` with a verdict per check.
#[test]
fn gpu_check_script_reports_a_missing_gpu_and_writes_the_json() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-check.sh");
    let syntax = Command::new("bash").arg("-n").arg(&script).status().expect("bash");
    assert!(syntax.success(), "bash -n {}", script.display());
    if demovlp_cuda::probe(0).is_ok() || Command::new("python3").arg("--version").output().is_err() {
        eprintln!("notice: a GPU is present or python3 is missing: the script's no-GPU run is not exercised");
        return;
    }
    let dir = std::env::temp_dir().join(format!("demovlp-gpu-check-{}", std::process::id()));
    let out = Command::new("bash").arg(&script).arg(env!("CARGO_BIN_EXE_demovlp")).arg(&dir).output().expect("run gpu-check.sh");
    assert!(!out.status.success(), "no GPU here: the script must report failed checks");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("gpu-check.json")).unwrap()).unwrap();
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "libraries",
        "replay model_tiny.safetensors fp32",
        "replay qa_tiny.safetensors fp32",
        "bench train-step B32 F8 R30 L100 bf16",
        "bench embed B32 F8 R30 L100 fp32",
        "bench eval-sims n1000 cuda",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(checks.iter().all(|c| c["ok"].is_boolean()));
    assert_eq!(report["checks_total"].as_u64().unwrap() as usize, checks.len());
    std::fs::remove_dir_all(&dir).ok();
}
