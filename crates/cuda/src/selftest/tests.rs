use super::fault::{FaultKind, FaultPlan, Faulty};
use super::{case_id, kernel_cases, run_cases, Case, Status, Verdict};
use demovlp_model::backend::{check, Cpu};

/// The kernel cases (not the published-shape ones: those are for `demovlp selftest`) and the
/// whole-model comparison, on `be`, with every emitted verdict recorded.
fn run_on(be: &Faulty<Cpu>) -> (Vec<Verdict>, Vec<String>) {
    let mut cases: Vec<Case<'_>> = kernel_cases(be, 0.0).into_iter().filter(|c| c.name.starts_with("kernel: ")).collect();
    cases.push(Case::new("model", move || match check::compare_with_cpu(be.clone(), 0.0) {
        Ok(()) => Verdict::pass("model"),
        Err(e) => Verdict::fail("model", e),
    }));
    let mut emitted = Vec::new();
    let health = || be.fault();
    let verdicts = run_cases(cases, &health, &mut |v| emitted.push(v.json()));
    (verdicts, emitted)
}

fn names() -> Vec<&'static str> {
    demovlp_model::backend::kernels_check::CASES.to_vec()
}

#[test]
fn every_case_reports_after_a_sticky_fault() {
    let be = Faulty::new(Cpu, FaultPlan::parse("sticky:layernorm_forward").unwrap());
    let (v, emitted) = run_on(&be);
    let all = names();
    assert_eq!(v.len(), all.len() + 1);
    assert_eq!(emitted.len(), v.len(), "one JSON line per case, not run ones included");
    let at = all.iter().position(|n| *n == "layernorm_forward").unwrap();
    for (i, x) in v.iter().enumerate() {
        match i.cmp(&at) {
            std::cmp::Ordering::Less => assert!(x.ok(), "{}: {}", x.name, x.detail),
            std::cmp::Ordering::Equal => {
                assert_eq!(x.status, Status::Fail);
                assert!(x.detail.contains("ILLEGAL_ADDRESS") && x.detail.contains("the device faulted during case"), "{}", x.detail);
            }
            std::cmp::Ordering::Greater => {
                assert_eq!(x.status, Status::NotRun, "{}", x.name);
                assert!(x.detail.starts_with("not run: the device faulted during case \"kernel: layernorm_forward\""), "{}", x.detail);
            }
        }
    }
    let last: serde_json::Value = serde_json::from_str(emitted.last().unwrap()).unwrap();
    assert_eq!((last["ok"].as_bool(), last["status"].as_str()), (Some(false), Some("not run")));
    assert!(be.fault().is_err());
}

#[test]
fn a_non_sticky_fault_fails_its_case_only() {
    // The injected error panics while holding the wrapper's scratch lock: later cases take
    // it through `crate::lock` and must pass.
    let be = Faulty::new(Cpu, FaultPlan::parse("error:gelu_forward").unwrap());
    let (v, _) = run_on(&be);
    let failed: Vec<&str> = v.iter().filter(|x| !x.ok()).map(|x| x.name.as_str()).collect();
    assert_eq!(failed, ["kernel: gelu_forward"], "{:?}", v.iter().map(|x| (&x.name, &x.detail)).collect::<Vec<_>>());
    let g = v.iter().find(|x| x.name == "kernel: gelu_forward").unwrap();
    assert!(g.detail.starts_with("panicked: CUDA backend: gelu_forward failed: CUDA_ERROR_INVALID_VALUE"), "{}", g.detail);
    assert!(be.fault().is_ok());
}

#[test]
fn a_sticky_fault_in_a_later_call_and_in_the_model_check() {
    // The third to_host of the run: inside the first case (memory) — and a fault that
    // first fires inside the whole-model check.
    let be = Faulty::new(Cpu, FaultPlan::parse("sticky:to_host#2").unwrap());
    let (v, _) = run_on(&be);
    assert_eq!(v[0].status, Status::Fail);
    assert!(v[1..].iter().all(|x| x.status == Status::NotRun));
    let be = Faulty::new(Cpu, FaultPlan { kind: FaultKind::Sticky, method: "adamw_update".into(), skip: 2 });
    let (v, _) = run_on(&be);
    let model = v.last().unwrap();
    assert_eq!(model.status, Status::Fail, "{}", model.detail);
    assert!(model.detail.contains("ILLEGAL_ADDRESS"), "{}", model.detail);
    assert_eq!(v.iter().filter(|x| !x.ok()).count(), 1, "the adamw_update case makes 1 call, the model check the next ones");
}

#[test]
fn fault_plans_parse() {
    assert_eq!(
        FaultPlan::parse("error:gelu_forward#2").unwrap(),
        FaultPlan { kind: FaultKind::Error, method: "gelu_forward".into(), skip: 2 }
    );
    for bad in ["gelu_forward", "fatal:x", "sticky:", "error:x#y"] {
        assert!(FaultPlan::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn case_ids_and_json() {
    assert_eq!(case_id("kernel: linear_backward (accumulate, strided x)"), "kernel_linear_backward_accumulate_strided_x");
    assert_eq!(case_id("shape: gelu (7712 x 3072)"), "shape_gelu_7712_x_3072");
    let got = vec![("y".to_string(), vec![1.0, 2.5])];
    let want = vec![("y".to_string(), vec![1.0, 2.0])];
    let v: serde_json::Value = serde_json::from_str(&Verdict::compared("c", &got, &want, 1e-3).json()).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["worst"]["index"], 1);
    assert_eq!((v["worst"]["got"].as_f64(), v["worst"]["want"].as_f64()), (Some(2.5), Some(2.0)));
    assert_eq!(v["tol"].as_f64().unwrap() as f32, 1e-3);
    let nan = vec![("y".to_string(), vec![1.0, f32::NAN])];
    let v: serde_json::Value = serde_json::from_str(&Verdict::compared("c", &nan, &want, 1e-3).json()).unwrap();
    assert_eq!((v["max_rel_err"].as_str(), v["worst"]["got"].as_str()), (Some("inf"), Some("NaN")));
}

#[test]
fn every_shape_case_runs_on_the_cpu_deterministically() {
    // Each published-shape case twice on the CPU: the same outputs bit for bit (what
    // `demovlp selftest --device cpu` checks), every output non-empty and finite.
    for s in super::shapes::CASES.iter().filter(|s| s.name.starts_with("dropout") || s.name.starts_with("word table")) {
        let (a, b) = (super::shapes::run(&Cpu, s.name), super::shapes::run(&Cpu, s.name));
        let (ok, _, _, detail) = demovlp_model::backend::kernels_check::compare_outputs(&a, &b, 0.0);
        assert!(ok, "{}: {detail}", s.name);
        assert!(a.iter().all(|(_, v)| !v.is_empty() && v.iter().all(|x| x.is_finite())), "{}", s.name);
    }
}

#[test]
fn the_epilogue_cases_set_the_mode_around_the_run_and_count_fused_gemms() {
    // On the CPU both variants are the CPU's own outputs; the mode callback is called on
    // and back, and the verdict reports the GEMMs it says ran fused.
    let calls = std::sync::Mutex::new(Vec::new());
    let mode = |m: Option<bool>| {
        let mut c = calls.lock().unwrap();
        c.push(m);
        if m.is_none() && c.len() == 2 {
            2 // the fused run: two GEMMs with an epilogue
        } else {
            0
        }
    };
    let cases = super::epilogue_cases(&Cpu, 1e-4, &mode);
    assert_eq!(cases.len(), 2);
    assert!(cases[0].name.ends_with("GEMM epilogues fused") && cases[1].name.ends_with("GEMM epilogues unfused"));
    let verdicts = run_cases(cases, &|| Ok(()), &mut |_| {});
    assert!(verdicts.iter().all(|v| v.ok()), "{verdicts:?}");
    assert_eq!(*calls.lock().unwrap(), [Some(true), None, Some(false), None]);
    assert!(verdicts[0].detail.contains("2 GEMMs ran with an epilogue") && verdicts[1].detail.contains("0 GEMMs"), "{verdicts:?}");
}
