//! The selftest's case runner: every case gets a verdict, printed the moment it is known,
//! whatever the device does.
//!
//! - A case is a closure returning its [`Verdict`]; a panic in it is caught and becomes its
//!   failure (the message kept).
//! - After every case the runner asks the device whether it is still usable (`health`: for
//!   the CUDA backend, [`crate::CudaBackend::fault`] — a sticky error such as an illegal
//!   address leaves the context unusable). From the first sticky fault on, the remaining
//!   cases are reported "not run" with the fault and the case it surfaced in, instead of
//!   failing one by one (or not being reported at all).
//! - [`Verdict::json`] is the one-line JSON record `demovlp selftest` prints and
//!   `scripts/gpu-check.sh` collects.
//!
//! Pure Rust and generic: the same runner drives the CPU backend, the CUDA backend, and
//! [`fault::Faulty`], the fault-injecting wrapper that tests all of this on the CPU.

pub mod fault;
pub mod shapes;

use demovlp_model::backend::kernels_check::{self, Worst};
use demovlp_model::backend::Backend;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// A case's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    /// Skipped: the device faulted (stickily) in an earlier case.
    NotRun,
}

/// One case's verdict.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub name: String,
    pub status: Status,
    /// Largest relative error over the case's outputs, when it compared any.
    pub max_rel_err: Option<f32>,
    /// The tolerance the case was held to.
    pub tol: Option<f32>,
    /// The element farthest from the CPU's.
    pub worst: Option<Worst>,
    /// Why it failed or was not run (empty when it passed), plus any case-specific figures.
    pub detail: String,
    pub seconds: f64,
}

impl Verdict {
    pub fn pass(name: &str) -> Self {
        Verdict {
            name: name.to_string(),
            status: Status::Pass,
            max_rel_err: None,
            tol: None,
            worst: None,
            detail: String::new(),
            seconds: 0.0,
        }
    }
    pub fn fail(name: &str, detail: impl Into<String>) -> Self {
        Verdict { status: Status::Fail, detail: detail.into(), ..Verdict::pass(name) }
    }
    pub fn ok(&self) -> bool {
        self.status == Status::Pass
    }

    /// The verdict of a comparison of outputs with the CPU's ([`kernels_check::compare_outputs`]).
    pub fn compared(name: &str, got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)], tol: f32) -> Self {
        let (ok, err, worst, detail) = kernels_check::compare_outputs(got, want, tol);
        Verdict {
            status: if ok { Status::Pass } else { Status::Fail },
            max_rel_err: Some(err),
            tol: Some(tol),
            worst,
            detail,
            ..Verdict::pass(name)
        }
    }

    /// The one-line JSON record: `name`, `ok` (false also when not run), `status`
    /// (`pass` / `fail` / `not run`), `seconds`, `detail`, and when known `max_rel_err`,
    /// `tol` and `worst` (`output`, `index`, `got`, `want`, `scale`). Non-finite numbers are
    /// written as strings.
    pub fn json(&self) -> String {
        use serde_json::{json, Value};
        // f32 values by their shortest decimal (1e-4, not 9.999999747378752e-5); non-finite as strings.
        let num = |x: f32| if x.is_finite() { json!(x.to_string().parse::<f64>().unwrap_or(x as f64)) } else { json!(x.to_string()) };
        let mut v = json!({
            "name": self.name,
            "ok": self.ok(),
            "status": match self.status { Status::Pass => "pass", Status::Fail => "fail", Status::NotRun => "not run" },
            "seconds": (self.seconds * 1e3).round() / 1e3,
            "detail": self.detail,
        });
        let o = v.as_object_mut().unwrap();
        if let Some(e) = self.max_rel_err {
            o.insert("max_rel_err".into(), num(e));
        }
        if let Some(t) = self.tol {
            o.insert("tol".into(), num(t));
        }
        if let Some(w) = &self.worst {
            o.insert(
                "worst".into(),
                json!({"output": w.output, "index": w.index, "got": num(w.got), "want": num(w.want), "scale": num(w.scale)}),
            );
        }
        Value::Object(o.clone()).to_string()
    }
}

/// A named case: the closure runs it and returns its verdict (it may panic).
pub struct Case<'a> {
    pub name: String,
    pub run: Box<dyn FnOnce() -> Verdict + 'a>,
}

impl<'a> Case<'a> {
    pub fn new(name: impl Into<String>, run: impl FnOnce() -> Verdict + 'a) -> Self {
        Case { name: name.into(), run: Box::new(run) }
    }
}

/// A short, shell-friendly id of a case name: lower case, runs of other characters as `_`
/// (`"linear_backward (accumulate, strided x)"` → `linear_backward_accumulate_strided_x`).
pub fn case_id(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

/// Runs `cases` in order, calling `emit` with each verdict as soon as it is known (also
/// for the cases not run), and returns them all. `health` says whether the device is still
/// usable after a case (`Err(reason)`: a sticky fault; every later case is then not run).
pub fn run_cases(cases: Vec<Case<'_>>, health: &dyn Fn() -> Result<(), String>, emit: &mut dyn FnMut(&Verdict)) -> Vec<Verdict> {
    let mut out = Vec::with_capacity(cases.len());
    let mut dead: Option<String> = None;
    for case in cases {
        let v = match &dead {
            Some(why) => Verdict { status: Status::NotRun, detail: format!("not run: {why}"), ..Verdict::pass(&case.name) },
            None => {
                let t0 = Instant::now();
                let mut v = catch_unwind(AssertUnwindSafe(case.run))
                    .unwrap_or_else(|e| Verdict::fail(&case.name, format!("panicked: {}", kernels_check::panic_text(e))));
                v.seconds = t0.elapsed().as_secs_f64();
                v.name = case.name.clone();
                // A panic while checking health is a fault too.
                let h = catch_unwind(AssertUnwindSafe(health)).unwrap_or_else(|e| Err(kernels_check::panic_text(e)));
                if let Err(why) = h {
                    let why = format!("the device faulted during case {:?}: {why}", case.name);
                    v.status = Status::Fail;
                    v.detail = if v.detail.is_empty() { why.clone() } else { format!("{}; {why}", v.detail) };
                    dead = Some(why);
                }
                v
            }
        };
        emit(&v);
        out.push(v);
    }
    out
}

/// The kernel cases of [`kernels_check::CASES`] and the published-shape cases
/// ([`shapes::CASES`]) on `be`, each against the CPU at `tol` (the shape cases at their own
/// tolerances, scaled by `tol / 1e-4` when looser or tighter parity is asked for).
pub fn kernel_cases<'a, B: Backend>(be: &'a B, tol: f32) -> Vec<Case<'a>> {
    let mut cases = Vec::new();
    for &name in kernels_check::CASES {
        cases.push(Case::new(format!("kernel: {name}"), move || {
            let k = kernels_check::compare_case_with_cpu(be, name, tol);
            let status = if k.ok { Status::Pass } else { Status::Fail };
            Verdict { status, max_rel_err: Some(k.max_rel_err), tol: Some(tol), worst: k.worst, detail: k.detail, ..Verdict::pass(name) }
        }));
    }
    for s in shapes::CASES {
        cases.push(Case::new(format!("shape: {}", s.name), move || {
            let got = shapes::run(be, s.name);
            let want = shapes::run(&demovlp_model::backend::Cpu, s.name);
            let t = if tol == 0.0 { 0.0 } else { s.tol * (tol / 1e-4).max(1.0) };
            Verdict::compared(s.name, &got, &want, t)
        }));
    }
    cases
}

/// The published-shape linear case whose GEMMs a device may fuse with epilogues.
pub const EPILOGUE_SHAPE: &str = "linear forward + backward (241 x 768 -> 3072, bias)";

/// The published-shape linear layer ([`EPILOGUE_SHAPE`]) run twice, with the GEMM
/// epilogues on and off, each against the CPU at the shape case's tolerance (scaled as in
/// [`kernel_cases`]). `mode(Some(on))` sets them on the device (CUDA: the bias and the
/// bias gradient fused into cuBLASLt GEMMs), `mode(None)` restores its default; both
/// return the number of GEMMs the device has run with an epilogue so far (the verdict
/// says how many ran in the case: 0 where the device has none, or no algorithm for them).
pub fn epilogue_cases<'a, B: Backend>(be: &'a B, tol: f32, mode: &'a (dyn Fn(Option<bool>) -> u64 + 'a)) -> Vec<Case<'a>> {
    let s = shapes::CASES.iter().find(|s| s.name == EPILOGUE_SHAPE).expect("the linear shape case");
    [true, false]
        .into_iter()
        .map(|on| {
            let name = format!("shape: {}, GEMM epilogues {}", s.name, if on { "fused" } else { "unfused" });
            Case::new(name.clone(), move || {
                let before = mode(Some(on));
                let got = std::panic::catch_unwind(AssertUnwindSafe(|| shapes::run(be, s.name)));
                let fused = mode(None) - before;
                let got = got.unwrap_or_else(|e| std::panic::resume_unwind(e));
                let want = shapes::run(&demovlp_model::backend::Cpu, s.name);
                let t = if tol == 0.0 { 0.0 } else { s.tol * (tol / 1e-4).max(1.0) };
                let mut v = Verdict::compared(&name, &got, &want, t);
                let note = format!("{fused} GEMMs ran with an epilogue");
                v.detail = if v.detail.is_empty() { note } else { format!("{}; {note}", v.detail) };
                v
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
