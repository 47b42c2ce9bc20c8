//! The hidden `selftest` command: every backend kernel (at small shapes and at the
//! published model's), the whole model, and the evaluation scores against the CPU, one
//! JSON line per case, printed as soon as the case is decided (`demovlp_cuda::selftest`:
//! after a sticky device fault the remaining cases are reported "not run").
//!
//! `--list` prints the case ids; `--case ID` (repeatable) runs only those, so a script can
//! run each case in its own process. With `--device cpu` the CPU is compared with itself
//! (every case passes); `DEMOVLP_SELFTEST_FAULT=sticky:METHOD[#N]` or `error:METHOD[#N]`
//! wraps the CPU backend in `demovlp_cuda::selftest::fault::Faulty`, which fails that call
//! as a device would (a test of the reporting itself).

use crate::device::{compare_score_case, score_cases, DeviceArgs, ScoreDevice};
use anyhow::{bail, Result};
use demovlp_cuda::selftest::fault::{FaultPlan, Faulty};
use demovlp_cuda::selftest::{case_id, epilogue_cases, kernel_cases, run_cases, Case, Status, Verdict};
use demovlp_model::backend::{check, Backend, Cpu};
use std::time::Instant;

#[derive(clap::Args)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tolerance of the kernel-by-kernel comparison (relative to each output's largest
    /// magnitude; 0 compares bits). The published-shape cases have their own (looser by the
    /// same factor when this is looser than 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f32,
    /// Tolerance of the whole-model comparison (`backend::check::compare_with_cpu`).
    #[arg(long, default_value_t = 5e-4)]
    pub model_tol: f32,
    /// Print every case's id and name (tab-separated, one per line) and exit.
    #[arg(long)]
    pub list: bool,
    /// Run only this case (an id from --list, or the full name); repeatable.
    #[arg(long = "case", value_name = "ID")]
    pub cases: Vec<String>,
    /// Print one JSON line about the CUDA libraries and exit: the versions the driver, NVRTC,
    /// cuBLAS and cuBLASLt report, the library files this process then has mapped, and the
    /// device (ordinal of --device, 0 for cpu).
    #[arg(long)]
    pub libraries: bool,
    /// Leave out the published-shape cases (`shape: ...`): a quick pass, e.g. under
    /// compute-sanitizer.
    #[arg(long)]
    pub quick: bool,
}

/// Sets a device's GEMM epilogues for a case (see `demovlp_cuda::selftest::epilogue_cases`).
type EpilogueMode<'a> = &'a (dyn Fn(Option<bool>) -> u64 + 'a);

/// Every case on `be` (the scores on `scores`, the GEMM epilogues set by `epilogues`), in order.
fn cases<'a, B: Backend>(be: &'a B, scores: &'a ScoreDevice, epilogues: EpilogueMode<'a>, a: &SelftestArgs) -> Vec<Case<'a>> {
    let mut out = kernel_cases(be, a.tol);
    out.extend(epilogue_cases(be, a.tol, epilogues));
    let model_tol = a.model_tol;
    let model = "model: backend::check::compare_with_cpu (towers, token API, embeddings, fused steps, QA model)";
    out.push(Case::new(model, move || {
        let mut v = match check::compare_with_cpu(be.clone(), model_tol) {
            Ok(()) => Verdict::pass(model),
            Err(e) => Verdict::fail(model, e),
        };
        v.tol = Some(model_tol);
        v
    }));
    let tol = a.tol;
    for (i, c) in score_cases().into_iter().enumerate() {
        out.push(Case::new(c.0, move || compare_score_case(scores, i, tol)));
    }
    out
}

/// `cases` narrowed to `--case` / `--quick`; `Err` names an unknown case.
fn select<'a>(all: Vec<Case<'a>>, a: &SelftestArgs) -> Result<Vec<Case<'a>>> {
    for want in &a.cases {
        if !all.iter().any(|c| &c.name == want || &case_id(&c.name) == want) {
            bail!("selftest: no case {want:?} (`demovlp selftest --list` lists them)");
        }
    }
    Ok(all
        .into_iter()
        .filter(|c| {
            let id = case_id(&c.name);
            if a.cases.is_empty() {
                !(a.quick && c.name.starts_with("shape: "))
            } else {
                a.cases.iter().any(|w| *w == c.name || *w == id)
            }
        })
        .collect())
}

/// Runs the selected cases, each verdict printed when known, then the summary line.
fn run<B: Backend>(
    be: &B,
    health: &dyn Fn() -> Result<(), String>,
    (scores, epilogues): (&ScoreDevice, EpilogueMode<'_>),
    device: &str,
    a: &SelftestArgs,
) -> Result<()> {
    let t0 = Instant::now();
    let chosen = select(cases(be, scores, epilogues, a), a)?;
    let verdicts = run_cases(chosen, health, &mut |v| println!("{}", v.json()));
    let failed = verdicts.iter().filter(|v| v.status == Status::Fail).count();
    let not_run = verdicts.iter().filter(|v| v.status == Status::NotRun).count();
    let total = verdicts.len();
    println!(
        "{}",
        serde_json::json!({"name": "selftest", "ok": failed + not_run == 0, "device": device, "checks": total, "failed": failed,
            "not_run": not_run, "seconds": t0.elapsed().as_secs_f64()})
    );
    if failed + not_run > 0 {
        bail!("selftest on {device}: {failed} of {total} checks failed, {not_run} not run");
    }
    Ok(())
}

/// `--libraries`: the JSON line; `Err` when a library or the device is missing.
fn libraries(a: &SelftestArgs) -> Result<()> {
    let n = match a.device.device {
        crate::device::Device::Cuda(n) => n,
        crate::device::Device::Cpu => 0,
    };
    let line = libraries_json(n);
    println!("{line}");
    if line["ok"] != true {
        bail!("CUDA libraries or device missing: {}", line["detail"]);
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn libraries_json(n: usize) -> serde_json::Value {
    let r = demovlp_cuda::libs::report();
    let device = demovlp_cuda::probe(n);
    let (dev, dev_err) = match &device {
        Ok(i) => (
            serde_json::json!({"ordinal": i.ordinal, "name": i.name, "capability": format!("{}.{}", i.capability.0, i.capability.1),
                "memory_mib": i.memory_bytes >> 20, "multiprocessors": i.multiprocessors}),
            String::new(),
        ),
        Err(e) => (serde_json::Value::Null, e.clone()),
    };
    let ok =
        r.missing.is_empty() && r.driver.is_some() && r.nvrtc.is_some() && r.cublas.is_some() && r.cublaslt.is_some() && device.is_ok();
    let detail = if r.missing.is_empty() { dev_err } else { format!("missing: {}; {dev_err}", r.missing.join(", ")) };
    serde_json::json!({"name": "libraries", "ok": ok, "driver_version": r.driver, "nvrtc_version": r.nvrtc.map(|(a, b)| format!("{a}.{b}")),
        "cublas_version": r.cublas.map(|(a, b, c)| format!("{a}.{b}.{c}")), "cublaslt_version": r.cublaslt, "opened": r.opened,
        "missing": r.missing, "device": dev, "detail": detail})
}

#[cfg(not(feature = "cuda"))]
fn libraries_json(_n: usize) -> serde_json::Value {
    serde_json::json!({"name": "libraries", "ok": false, "detail": demovlp_cuda::NOT_BUILT})
}

pub fn selftest(a: SelftestArgs) -> Result<()> {
    if a.libraries {
        return libraries(&a);
    }
    if a.list {
        for c in select(cases(&Cpu, &ScoreDevice::Cpu, &|_| 0, &a), &a)? {
            println!("{}\t{}", case_id(&c.name), c.name);
        }
        return Ok(());
    }
    // Unknown case names are a usage error before any device is opened.
    select(cases(&Cpu, &ScoreDevice::Cpu, &|_| 0, &a), &a)?;
    if let Err(e) = crate::device::check_available(&a.device) {
        println!("{}", serde_json::json!({"name": "open", "ok": false, "device": a.device.device.to_string(), "detail": e.to_string()}));
        return Err(e);
    }
    let fault = std::env::var("DEMOVLP_SELFTEST_FAULT").ok().filter(|s| !s.is_empty());
    match a.device.device {
        crate::device::Device::Cpu => match fault {
            Some(f) => {
                let plan = FaultPlan::parse(&f).map_err(|e| anyhow::anyhow!("DEMOVLP_SELFTEST_FAULT: {e}"))?;
                let be = Faulty::new(Cpu, plan);
                run(&be, &|| be.fault(), (&ScoreDevice::Cpu, &|_| 0), &format!("cpu (fault injected: {f})"), &a)
            }
            None => run(&Cpu, &|| Ok(()), (&ScoreDevice::Cpu, &|_| 0), "cpu", &a),
        },
        #[cfg(feature = "cuda")]
        crate::device::Device::Cuda(n) => {
            if fault.is_some() {
                bail!("DEMOVLP_SELFTEST_FAULT injects faults into the CPU backend only (--device cpu)");
            }
            let be = crate::device::open(n, a.device.precision)?;
            let name = format!(
                "cuda:{n} {} ({:?}, GEMMs by {}{})",
                be.info().name,
                a.device.precision,
                be.gemm_library(),
                if be.synchronous() { ", DEMOVLP_CUDA_SYNC=1" } else { "" }
            );
            let scores = ScoreDevice::Cuda(be.clone());
            let default = be.epilogues();
            let epilogues = |on: Option<bool>| {
                be.set_epilogues(on.unwrap_or(default));
                be.epilogue_gemms()
            };
            run(&be, &|| be.fault(), (&scores, &epilogues), &name, &a)
        }
        #[cfg(not(feature = "cuda"))]
        crate::device::Device::Cuda(n) => bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}
