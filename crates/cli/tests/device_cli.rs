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
        &["demo", "--quick", "--device", "cuda"],
        &["demo", "--task", "qa", "--device", "cuda"],
        &["index", "--model", "no-such-model", "--features", "f", "--all", "--out", "idx", "--device", "cuda"],
        // Search's text tower and re-rank, and the server's.
        &["search", "no-such-index", "a dog", "--device", "cuda"],
        &["serve", "no-such-index", "--device", "cuda"],
        // The detector: the device is checked before the weights are read.
        &["extract", "--images", "no-such-dir", "--weights", "no-such.pth", "--out", "o", "--device", "cuda"],
        &["bench", "extract", "--tiny", "--device", "cuda"],
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

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

#[test]
fn selftest_on_the_cpu_passes_every_check() {
    let out = demovlp(&["selftest", "--device", "cpu", "--tol", "0", "--model-tol", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    // Every kernel case, every published-shape case (and the linear one twice more, GEMM
    // epilogues fused and unfused), the whole-model check, the five evaluation-score cases
    // (`device::score_cases`) and the summary line.
    let shapes = demovlp_cuda::selftest::shapes::CASES.len() + 2;
    assert_eq!(lines.len(), demovlp_model::backend::kernels_check::CASES.len() + shapes + 1 + 5 + 1);
    assert!(lines.iter().filter(|l| l["name"].as_str().unwrap().starts_with("eval scores")).count() == 5, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l["name"].as_str().unwrap().starts_with("shape: ")).count(), shapes);
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
    assert_eq!(lines.last().unwrap()["not_run"], 0);
}

/// `--list` names every case once; `--case ID` runs exactly that case (each passes on the
/// CPU); an unknown case is an error before anything runs.
#[test]
fn selftest_cases_one_by_one() {
    let out = demovlp(&["selftest", "--list"]);
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    let ids: Vec<&str> = list.lines().map(|l| l.split('\t').next().unwrap()).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids must be unique: {list}");
    assert!(ids.len() >= demovlp_model::backend::kernels_check::CASES.len() + demovlp_cuda::selftest::shapes::CASES.len() + 6);
    for id in [
        "kernel_layernorm_backward",
        "shape_linear_forward_backward_241_x_768_3072_bias_gemm_epilogues_fused",
        "shape_dropout_mask_32_x_12_x_241_token_frame_probabilities_p_0_1",
        "eval_scores_global_only_31_x_17_p_48",
    ] {
        assert!(ids.contains(&id), "{id} not in {ids:?}");
        let out = demovlp(&["selftest", "--device", "cpu", "--case", id]);
        assert!(out.status.success(), "{id}: {}", String::from_utf8_lossy(&out.stderr));
        let lines = json_lines(&out);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(demovlp_cuda::selftest::case_id(lines[0]["name"].as_str().unwrap()), id);
        assert_eq!((lines[0]["ok"].as_bool(), lines[0]["status"].as_str()), (Some(true), Some("pass")));
    }
    let out = demovlp(&["selftest", "--device", "cpu", "--case", "no_such_case"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no case \"no_such_case\""));
    assert!(out.stdout.is_empty());
}

/// Faults injected into the CPU backend (`DEMOVLP_SELFTEST_FAULT`): every case still gets
/// its line; after a sticky fault the rest are "not run" with the reason; a non-sticky one
/// fails its own case only.
#[test]
fn selftest_reports_every_case_through_injected_faults() {
    let run = |fault: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_demovlp"))
            .args(["selftest", "--device", "cpu", "--quick"])
            .env("RUST_BACKTRACE", "0")
            .env("DEMOVLP_SELFTEST_FAULT", fault)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{fault}: {}", String::from_utf8_lossy(&out.stderr));
        json_lines(&out)
    };
    let cases = demovlp_model::backend::kernels_check::CASES.len() + 1 + 5;
    let lines = run("sticky:attention_forward");
    assert_eq!(lines.len(), cases + 1);
    let first = lines.iter().position(|l| l["ok"] == false).unwrap();
    assert!(lines[first]["name"].as_str().unwrap().starts_with("kernel: attention full"), "{:?}", lines[first]);
    assert!(lines[first]["detail"].as_str().unwrap().contains("ILLEGAL_ADDRESS"));
    for l in &lines[first + 1..cases] {
        assert_eq!(l["status"], "not run", "{l}");
        assert!(l["detail"].as_str().unwrap().contains("the device faulted during case \"kernel: attention full"), "{l}");
    }
    assert_eq!((lines[cases]["failed"].as_u64(), lines[cases]["not_run"].as_u64()), (Some(1), Some((cases - first - 1) as u64)));
    let lines = run("error:softmax_rows");
    let failed: Vec<&str> = lines[..cases].iter().filter(|l| l["ok"] == false).map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(failed, ["kernel: softmax_rows (+ backward)"]);
}

fn gpu_check(device: &str, dir: &std::path::Path) -> (std::process::Output, serde_json::Value, Vec<String>) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-check.sh");
    let syntax = Command::new("bash").arg("-n").arg(&script).status().expect("bash");
    assert!(syntax.success(), "bash -n {}", script.display());
    let out = Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_demovlp"))
        .arg(dir)
        .env("GPU_CHECK_DEVICE", device)
        .env("GPU_CHECK_CASES", "^kernel_(linear_forward|dropout_mask)$")
        .output()
        .expect("run gpu-check.sh");
    let files: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("gpu-check.json")).unwrap()).unwrap();
    (out, report, files)
}

/// The dry run of `scripts/gpu-check.sh` (GPU_CHECK_DEVICE=cpu): the report directory holds
/// one archive and one summary with an entry per check; the CPU checks pass.
#[test]
fn gpu_check_dry_run_leaves_one_archive_and_one_summary() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("notice: python3 is missing: the script's dry run is not exercised");
        return;
    }
    let dir = std::env::temp_dir().join(format!("demovlp-gpu-check-dry-{}", std::process::id()));
    let (out, report, mut files) = gpu_check("cpu", &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    files.sort_by_key(|f| f.ends_with(".tar.gz"));
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0], "gpu-check.json");
    assert!(files[1].starts_with("gpu-check-") && files[1].ends_with(".tar.gz"), "{files:?}");
    assert_eq!(report["archive"], files[1].as_str());
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(report["checks_total"].as_u64().unwrap() as usize, checks.len());
    let get = |name: &str| checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name} missing: {stderr}"));
    for ok in [
        "kernel: linear_forward",
        "kernel: dropout_mask",
        "bf16 kernel: layernorm_forward",
        "cublas kernel: gelu_forward",
        "replay model_tiny.safetensors fp32",
        "replay qa_tiny.safetensors fp32",
        "bench train-step B32 F8 R30 L100 fp32",
        "bench train-step B128 F1 R30 L100 bf16",
        "bench embed B32 F8 R30 L100 fp32",
        "bench extract tiny",
    ] {
        assert_eq!(get(ok)["ok"], true, "{ok}: {}", get(ok));
    }
    assert!(get("bench train-step B32 F8 R30 L100 fp32")["result"]["median_s"].is_number());
    // The training comparison's logic (CPU against itself): 8 steps, then 2 ranks over TCP.
    for ok in [
        "training: demo corpus",
        "training: finetune 8 steps --device cpu",
        "training: finetune 8 steps --device cpu --precision fp32 vs cpu",
        "training: 2 ranks (tcp) vs accumulate_steps = 2 (parameters)",
        "training: finetune-qa 8 steps --device cpu",
        "training: finetune-qa 8 steps --device cpu --precision fp32 vs cpu",
    ] {
        assert_eq!(get(ok)["ok"], true, "{ok}: {}", get(ok));
    }
    assert_eq!(get("training: finetune 8 steps --device cpu --precision fp32 vs cpu")["comparison"]["steps"], 8);
    assert_eq!(get("training: finetune-qa 8 steps --device cpu --precision fp32 vs cpu")["comparison"]["steps"], 8);
    for present in ["libraries", "compute-sanitizer memcheck: selftest --quick", "side by side train-step B32 F8 R30 L100 fp32"] {
        assert!(get(present)["ok"].is_boolean());
    }
    assert!(checks.iter().all(|c| c["ok"].is_boolean() && c["name"].is_string()));
    // The archive holds the logs: the per-case selftest output among them.
    let list = Command::new("tar").arg("-tzf").arg(dir.join(&files[1])).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("selftest/kernel_linear_forward.out") && list.contains("gpu-check.json"), "{list}");
    std::fs::remove_dir_all(&dir).ok();
}

/// On a machine without a GPU the script reports the missing GPU, check by check.
#[test]
fn gpu_check_script_reports_a_missing_gpu() {
    if demovlp_cuda::probe(0).is_ok() || Command::new("python3").arg("--version").output().is_err() {
        eprintln!("notice: a GPU is present or python3 is missing: the script's no-GPU run is not exercised");
        return;
    }
    let dir = std::env::temp_dir().join(format!("demovlp-gpu-check-{}", std::process::id()));
    let (out, report, files) = gpu_check("cuda", &dir);
    assert!(!out.status.success(), "no GPU here: the script must report failed checks");
    assert_eq!(files.len(), 2, "{files:?}");
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in
        ["libraries", "replay model_tiny.safetensors fp32", "bench train-step B32 F8 R30 L100 bf16", "bench embed B32 F8 R30 L100 fp32"]
    {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_eq!(checks.iter().find(|c| c["name"] == "libraries").unwrap()["ok"], false);
    assert!(checks.iter().all(|c| c["ok"].is_boolean()));
    std::fs::remove_dir_all(&dir).ok();
}
