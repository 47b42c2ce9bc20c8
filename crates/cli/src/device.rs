//! `--device cpu|cuda[:N]` (and `--precision fp32|bf16`) for every command that computes,
//! the one dispatch helper that puts a model on the chosen backend ([`run_model`]), and the
//! hidden `selftest` command (every kernel and the whole model against the CPU).
//!
//! Without the `cuda` feature, or without a GPU, `--device cuda` exits 1 with a message
//! naming what is missing. Commands the CUDA backend is not wired into yet say so
//! ([`cpu_only`]).

use anyhow::{bail, Result};
use demovlp_model::backend::{check, kernels_check, Backend};
use demovlp_model::{AdamW, AdamWSettings, BatchRef, Model};
use demovlp_retrieval::LossConfig;
use std::str::FromStr;
use std::time::Instant;

pub use demovlp_cuda::Precision;

/// Where a command computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// GPU ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The shared `--device` / `--precision` arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where to compute: `cpu`, or `cuda` / `cuda:N` (GPU N: needs a build with
    /// `--features cuda`, the NVIDIA driver, and libnvrtc + libcublas on the library path).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    /// GEMM precision on a GPU: `fp32` (parity mode, TF32 off) or `bf16` (bf16 inputs,
    /// fp32 accumulation and master weights: the speed mode).
    #[arg(long, default_value = "fp32", value_name = "fp32|bf16")]
    pub precision: Precision,
}

impl Default for DeviceArgs {
    fn default() -> Self {
        DeviceArgs { device: Device::Cpu, precision: Precision::Fp32 }
    }
}

/// Something to run with a model on whichever backend [`run_model`] picked.
pub trait OnModel {
    fn run<B: Backend>(self, model: Model<B>, device: &str) -> Result<()>;
}

#[cfg(feature = "cuda")]
fn open(n: usize, precision: Precision) -> Result<demovlp_cuda::CudaBackend> {
    demovlp_cuda::open(n, precision).map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))
}

/// Fails early (before a model is built) when the device of `d` cannot be used: the build
/// lacks CUDA, a library is missing, or there is no such GPU.
pub fn check_available(d: &DeviceArgs) -> Result<()> {
    match d.device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            use demovlp_cuda::libs::{require, Lib};
            require(&[Lib::Driver, Lib::Nvrtc, Lib::Cublas, Lib::CublasLt])
                .and_then(|()| demovlp_cuda::probe(n).map(|_| ()))
                .map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}

/// Runs `job` with `model` on the device of `d` (the weights are copied there once).
pub fn run_model(d: &DeviceArgs, model: Model, job: impl OnModel) -> Result<()> {
    match d.device {
        Device::Cpu => job.run(model, "cpu"),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let be = open(n, d.precision)?;
            let params = model.params.to_backend(&demovlp_model::Cpu, &be);
            let name = format!("cuda:{n} {} ({:?})", be.info().name, d.precision);
            job.run(Model::from_params_on(be, model.config.clone(), params), &name)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}

/// A job on a QA model (towers + head), generic over the backend.
pub trait OnQaModel {
    fn run<B: Backend>(self, model: demovlp_model::qa::QaModel<B>, device: &str) -> Result<()>;
}

/// [`run_model`] for a QA model: both parameter sets are copied to the device once.
pub fn run_qa_model(d: &DeviceArgs, model: demovlp_model::qa::QaModel, job: impl OnQaModel) -> Result<()> {
    match d.device {
        Device::Cpu => job.run(model, "cpu"),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            use demovlp_model::qa::{QaHead, QaModel};
            let be = open(n, d.precision)?;
            let cpu = demovlp_model::Cpu;
            let base = Model::from_params_on(be.clone(), model.base.config.clone(), model.base.params.to_backend(&cpu, &be));
            let head = QaHead::from_params_on(be.clone(), model.head.config, model.head.params.to_backend(&cpu, &be));
            let name = format!("cuda:{n} {} ({:?})", be.info().name, d.precision);
            job.run(QaModel::new(base, head), &name)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}

/// For commands the CUDA backend is not wired into yet: `Ok` on the CPU; on `cuda` the
/// error says what is missing, or that this command runs on the CPU only for now.
pub fn cpu_only(d: &DeviceArgs, command: &str) -> Result<()> {
    match d.device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            open(n, d.precision)?;
            bail!(
                "`{command} --device cuda`: the CUDA backend is not wired into {command} yet (it runs `replay`, `bench train-step`, \
                 `bench embed` and `selftest`); use --device cpu"
            )
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => {
            let _ = command;
            bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT)
        }
    }
}

// ---------------------------------------------------------------------------------------
// selftest

#[derive(clap::Args)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tolerance of the kernel-by-kernel comparison (relative to each output's largest
    /// magnitude; 0 compares bits).
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f32,
    /// Tolerance of the whole-model comparison (`backend::check::compare_with_cpu`).
    #[arg(long, default_value_t = 5e-4)]
    pub model_tol: f32,
}

struct Selftest {
    tol: f32,
    model_tol: f32,
}

impl OnModel for Selftest {
    fn run<B: Backend>(self, model: Model<B>, device: &str) -> Result<()> {
        let be = model.backend().clone();
        drop(model);
        let t0 = Instant::now();
        let verdicts = kernels_check::compare_kernels_with_cpu(&be, self.tol);
        let mut failed = 0;
        for v in &verdicts {
            failed += !v.ok as usize;
            let err =
                if v.max_rel_err.is_finite() { serde_json::json!(v.max_rel_err) } else { serde_json::json!(v.max_rel_err.to_string()) };
            println!(
                "{}",
                serde_json::json!({"name": format!("kernel: {}", v.name), "ok": v.ok, "max_rel_err": err, "tol": self.tol, "detail": v.detail})
            );
        }
        let model_check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check::compare_with_cpu(be.clone(), self.model_tol)));
        let (ok, detail) = match model_check {
            Ok(Ok(())) => (true, String::new()),
            Ok(Err(e)) => (false, e),
            Err(p) => (
                false,
                format!(
                    "panicked: {}",
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
                ),
            ),
        };
        failed += !ok as usize;
        println!(
            "{}",
            serde_json::json!({"name": "model: backend::check::compare_with_cpu (towers, token API, embeddings, fused steps, QA model)", "ok": ok, "tol": self.model_tol, "detail": detail})
        );
        let total = verdicts.len() + 1;
        println!(
            "{}",
            serde_json::json!({"name": "selftest", "ok": failed == 0, "device": device, "checks": total, "failed": failed, "seconds": t0.elapsed().as_secs_f64()})
        );
        if failed > 0 {
            bail!("selftest on {device}: {failed} of {total} checks failed");
        }
        Ok(())
    }
}

pub fn selftest(a: SelftestArgs) -> Result<()> {
    if let Err(e) = check_available(&a.device) {
        println!("{}", serde_json::json!({"name": "open", "ok": false, "device": a.device.device.to_string(), "detail": e.to_string()}));
        return Err(e);
    }
    // A tiny model: only the backend handle is used, the checks build their own.
    let tiny = Model::new(check::tiny_config(demovlp_model::TextKind::Distilbert));
    run_model(&a.device, tiny, Selftest { tol: a.tol, model_tol: a.model_tol })
}

// ---------------------------------------------------------------------------------------
// benchmarks on any backend

/// Host inputs of a benchmark batch.
pub struct BenchInputs<'a> {
    pub batch: BatchRef<'a>,
    pub runs: usize,
    pub json: bool,
}

/// `bench train-step` on any backend: fused training steps (forward, losses, backward with
/// AdamW), each timed to the end of its device work.
pub struct TrainStepBench<'a>(pub BenchInputs<'a>);

impl OnModel for TrainStepBench<'_> {
    fn run<B: Backend>(self, mut model: Model<B>, device: &str) -> Result<()> {
        let x = self.0;
        let be = model.backend().clone();
        let mut opt = AdamW::new_on(be.clone(), model.params.len(), AdamWSettings::published(1e-5));
        let loss = LossConfig::default();
        let b = &x.batch;
        eprintln!(
            "bench train-step on {device}: B={} F={} R={} L={}, 1 warm-up + {} timed steps",
            b.batch, b.frames, b.regions, b.text_len, x.runs
        );
        let mut times = Vec::new();
        let mut last = 0.0;
        for i in 0..=x.runs {
            let t0 = Instant::now();
            let lo = model.train_step_fused(b, &loss, true, &mut opt);
            // Reading one parameter back waits for the step's device work.
            let _ = be.to_host(B::slice(B::view(&model.params.data), 0..1));
            let dt = t0.elapsed().as_secs_f64();
            anyhow::ensure!(lo.loss_total.is_finite(), "loss is not finite at step {i}");
            last = lo.loss_total;
            eprintln!("  step {i}{}: {dt:.4} s, loss {:.4}", if i == 0 { " (warm-up)" } else { "" }, lo.loss_total);
            if i > 0 {
                times.push(dt);
            }
        }
        let (median, min, max) = crate::bench::median_min_max(times);
        if !x.json {
            println!("train step on {device}: median {median:.4} s (min {min:.4}, max {max:.4})");
        }
        println!(
            "{}",
            serde_json::json!({"bench": "train-step", "device": device, "median_s": median, "min_s": min, "max_s": max,
                "batch": b.batch, "frames": b.frames, "regions": b.regions, "text_len": b.text_len, "runs": x.runs,
                "params": model.params.len(), "last_loss": last, "steps_per_s": 1.0 / median})
        );
        Ok(())
    }
}

/// `bench embed` on any backend: texts/s and clips/s of the evaluation towers.
pub struct EmbedBench<'a>(pub BenchInputs<'a>);

impl OnModel for EmbedBench<'_> {
    fn run<B: Backend>(self, mut model: Model<B>, device: &str) -> Result<()> {
        let x = self.0;
        let b = &x.batch;
        let (mut tt, mut vt) = (Vec::new(), Vec::new());
        for i in 0..=x.runs {
            let t0 = Instant::now();
            let te = model.embed_text(b.input_ids, b.attention_mask, b.batch, b.text_len);
            let t1 = Instant::now();
            let ve = model.embed_video_inference(b.object, b.object_mask, b.batch, b.frames, b.regions);
            let t2 = Instant::now();
            anyhow::ensure!(te.global.iter().chain(&ve.global).all(|v| v.is_finite()), "non-finite embeddings");
            if i > 0 {
                tt.push((t1 - t0).as_secs_f64());
                vt.push((t2 - t1).as_secs_f64());
            }
        }
        let (tm, _, _) = crate::bench::median_min_max(tt);
        let (vm, _, _) = crate::bench::median_min_max(vt);
        let (tps, cps) = (b.batch as f64 / tm, b.batch as f64 / vm);
        if !x.json {
            println!("embed on {device}: {tps:.1} texts/s, {cps:.1} clips/s (median of {} calls of {})", x.runs, b.batch);
        }
        println!(
            "{}",
            serde_json::json!({"bench": "embed", "device": device, "texts_per_s": tps, "clips_per_s": cps, "text_median_s": tm,
                "video_median_s": vm, "batch": b.batch, "frames": b.frames, "regions": b.regions, "text_len": b.text_len, "runs": x.runs})
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn device_names() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("gpu".parse::<Device>().is_err() && "cuda:x".parse::<Device>().is_err());
    }
}
