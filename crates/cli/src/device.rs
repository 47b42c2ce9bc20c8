//! `--device cpu|cuda[:N]` (and `--precision fp32|bf16`) for every command that computes,
//! the one dispatch helper that puts a model on the chosen backend ([`run_model`]), the
//! evaluation scores on any device (and their selftest cases), and the benchmarks on any
//! backend.
//!
//! Without the `cuda` feature, or without a GPU, `--device cuda` exits 1 with a message
//! naming what is missing.

use anyhow::Result;
use demovlp_cuda::selftest::{Status, Verdict};
use demovlp_model::backend::Backend;
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
            "cuda" => Ok(Device::Cuda(local_gpu(&|k| std::env::var(k).ok(), demovlp_cuda::device_count))),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: cpu, cuda or cuda:N")),
            },
        }
    }
}

/// The GPU `cuda` (without an index) means: under a launcher (`LOCAL_RANK` of torchrun,
/// `SLURM_LOCALID` of srun) the local rank modulo the GPUs this process sees (the one the
/// NCCL engine joins on too), else GPU 0.
pub fn local_gpu(env: &dyn Fn(&str) -> Option<String>, count: impl FnOnce() -> Result<usize, String>) -> usize {
    let local = ["LOCAL_RANK", "SLURM_LOCALID"].iter().find_map(|k| env(k)?.trim().parse::<usize>().ok());
    local.map_or(0, |l| gpu_of_local_rank(l, count))
}

/// Local rank `l`'s GPU: `l` modulo the GPUs counted (0 when none, or no CUDA: opening it
/// then names what is missing).
pub fn gpu_of_local_rank(l: usize, count: impl FnOnce() -> Result<usize, String>) -> usize {
    match count() {
        Ok(c) if c > 0 => l % c,
        _ => 0,
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
pub(crate) fn open(n: usize, precision: Precision) -> Result<demovlp_cuda::CudaBackend> {
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
        Device::Cuda(n) => anyhow::bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}

/// Runs `job` with `model` on the device of `d` (the weights are copied there once).
pub fn run_model(d: &DeviceArgs, model: Model, job: impl OnModel) -> Result<()> {
    match d.device {
        Device::Cpu => job.run(model, "cpu"),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let be = open(n, d.precision)?;
            let name = format!("cuda:{n} {} ({:?}, GEMMs by {})", be.info().name, d.precision, be.gemm_library());
            job.run(model.on_backend(&be), &name)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => anyhow::bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}

/// A job that runs on whichever backend [`with_backend`] opened (training builds its
/// model there itself).
pub trait OnBackend {
    type Out;
    fn run<B: Backend>(self, be: &B, device: &str) -> Result<Self::Out>;
}

/// Runs `job` on the backend of the device `d` names.
pub fn with_backend<J: OnBackend>(d: &DeviceArgs, job: J) -> Result<J::Out> {
    match d.device {
        Device::Cpu => job.run(&demovlp_model::Cpu, "cpu"),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let be = open(n, d.precision)?;
            let name = format!("cuda:{n} {} ({:?}, GEMMs by {})", be.info().name, d.precision, be.gemm_library());
            job.run(&be, &name)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => {
            drop(job);
            anyhow::bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT)
        }
    }
}

/// Where `serve` computes: `None` on the CPU, the GPU of `d` otherwise (`Err` naming what
/// is missing).
pub fn placement(d: &DeviceArgs) -> Result<Option<std::sync::Arc<dyn demovlp_serve::Placement>>> {
    match d.device {
        Device::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            check_available(d)?;
            let backend = open(n, d.precision)?;
            let name = format!("cuda:{n} {} ({:?}, GEMMs by {})", backend.info().name, d.precision, backend.gemm_library());
            Ok(Some(std::sync::Arc::new(demovlp_serve::OnBackend { backend, name })))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => anyhow::bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
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
            let be = open(n, d.precision)?;
            let name = format!("cuda:{n} {} ({:?})", be.info().name, d.precision);
            job.run(model.on_backend(&be), &name)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => anyhow::bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}

// ---------------------------------------------------------------------------------------
// evaluation scores and `eval` on any device

/// Where evaluation scores are computed: the CPU's blocked kernel, or the GPU's pair kernels
/// (`demovlp_cuda::CudaBackend::eval_scores`, the same semantics).
pub enum ScoreDevice {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(demovlp_cuda::CudaBackend),
}

impl ScoreDevice {
    /// Opens the device of `d` (`Err` naming what is missing).
    pub fn open(d: &DeviceArgs) -> Result<Self> {
        match d.device {
            Device::Cpu => Ok(ScoreDevice::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                check_available(d)?;
                Ok(ScoreDevice::Cuda(open(n, d.precision)?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(n) => anyhow::bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
        }
    }

    pub fn name(&self) -> String {
        match self {
            ScoreDevice::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            ScoreDevice::Cuda(be) => format!("cuda:{} {}", be.info().ordinal, be.info().name),
        }
    }

    /// Score matrix `[T, V]` (rows = texts), as `demovlp_retrieval::eval_scores_with`.
    pub fn scores(
        &self,
        texts: &demovlp_retrieval::EmbeddingSet,
        videos: &demovlp_retrieval::EmbeddingSet,
        opts: &demovlp_retrieval::EvalOptions,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<f32>> {
        match self {
            ScoreDevice::Cpu => Backend::eval_scores(&demovlp_model::Cpu, texts, videos, opts, progress).map_err(anyhow::Error::msg),
            #[cfg(feature = "cuda")]
            ScoreDevice::Cuda(be) => {
                Backend::eval_scores(be, texts, videos, opts, progress).map_err(|e| anyhow::anyhow!("CUDA evaluation scores: {e}"))
            }
        }
    }
}

/// `eval` on the device of `d`: embeddings by the model on that backend, scores there too
/// ([`Backend::eval_scores`]).
pub fn evaluate_on(
    d: &DeviceArgs,
    mut model: Model,
    set: &demovlp_train::eval::EvalSet,
    tok: &demovlp_train::text::Tokenizer,
    opts: &demovlp_train::eval::EvalOptions,
) -> Result<demovlp_train::eval::EvalResult> {
    match d.device {
        Device::Cpu => demovlp_train::eval::evaluate(&mut model, set, tok, opts),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            check_available(d)?;
            let be = open(n, d.precision)?;
            let mut m = model.on_backend(&be);
            drop(model);
            eprintln!("evaluating on cuda:{n} {} ({:?})", be.info().name, d.precision);
            demovlp_train::eval::evaluate(&mut m, set, tok, opts)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => anyhow::bail!("--device cuda:{n}: {}", demovlp_cuda::NOT_BUILT),
    }
}

/// The evaluation-score cases the selftest compares with the CPU: (name, texts, videos,
/// words, regions, width, options).
pub fn score_cases() -> Vec<(&'static str, usize, usize, usize, usize, usize, demovlp_retrieval::EvalOptions)> {
    use demovlp_retrieval::{EvalOptions, ScoreMode};
    let o = |mode, use_local, masked_mean| EvalOptions { lambda: 20.0, mode, use_local, masked_mean };
    vec![
        ("eval scores aligned (37 texts x 29 videos, W 20, N 48, P 32)", 37, 29, 20, 48, 32, o(ScoreMode::Aligned, true, false)),
        ("eval scores reference (24 x 24, W 11, N 30, P 16)", 24, 24, 11, 30, 16, o(ScoreMode::Reference, true, false)),
        ("eval scores masked mean (19 x 23, W 15, N 40, P 24)", 19, 23, 15, 40, 24, o(ScoreMode::Aligned, true, true)),
        ("eval scores global only (31 x 17, P 48)", 31, 17, 5, 6, 48, o(ScoreMode::Aligned, false, false)),
        ("eval scores at the eval-sims shape (64 x 64, W 99, N 240, P 256)", 64, 64, 99, 240, 256, o(ScoreMode::Aligned, true, false)),
    ]
}

/// Synthetic embeddings for [`score_cases`]: `count` items of `len` positions, a random
/// number of them real (the rest padded, −100), normal values.
pub fn synthetic_set(rng: &mut demovlp_kernels::Rng, count: usize, len: usize, dim: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let global = (0..count * dim).map(|_| rng.normal()).collect();
    let local = (0..count * len * dim).map(|_| rng.normal()).collect();
    let mut mask = Vec::with_capacity(count * len);
    for _ in 0..count {
        let real = 1 + rng.below(len);
        mask.extend((0..len).map(|i| if i < real { 0.0 } else { -100.0 }));
    }
    (global, local, mask)
}

/// Score case `i` of [`score_cases`] on `dev` and on the CPU, as a selftest verdict: the
/// largest |diff| relative to the largest CPU score, the share of scores off by more than
/// `tol` of it, and the worst score (text × video index, both values).
pub fn compare_score_case(dev: &ScoreDevice, i: usize, tol: f32) -> Verdict {
    use demovlp_retrieval::EmbeddingSet;
    let (name, nt, nv, w, n, p, opts) = score_cases().swap_remove(i);
    let mut rng = demovlp_kernels::Rng::new(0x5c0e ^ (nt * 1000 + nv) as u64);
    let (tg, tl, tm) = synthetic_set(&mut rng, nt, w, p);
    let (vg, vl, vm) = synthetic_set(&mut rng, nv, n, p);
    let texts = EmbeddingSet { count: nt, len: w, dim: p, global: &tg, local: &tl, mask_additive: &tm };
    let videos = EmbeddingSet { count: nv, len: n, dim: p, global: &vg, local: &vl, mask_additive: &vm };
    let want = demovlp_retrieval::eval_scores_with(&texts, &videos, &opts, &|_, _| {});
    let got = match dev.scores(&texts, &videos, &opts, &|_, _| {}) {
        Ok(g) => g,
        Err(e) => return Verdict::fail(name, e.to_string()),
    };
    let mut v = Verdict::compared(name, &[("scores".to_string(), got.clone())], &[("scores".to_string(), want.clone())], tol);
    if got.len() != want.len() {
        return v;
    }
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let off =
        got.iter().zip(&want).filter(|(g, w)| !g.is_finite() || (*g - *w).abs() / scale > tol).count() as f64 / want.len().max(1) as f64;
    let worst = v.max_rel_err.unwrap_or(0.0);
    // The focal keep test is a hard threshold: a P within an ulp of it can round to the
    // other side on another device and move that one score; a real error moves many.
    let ok = off <= 2e-3 && worst < 0.05;
    v.status = if ok { Status::Pass } else { Status::Fail };
    v.detail = format!("{:.3} % of scores off by more than {tol:e} of the largest", 100.0 * off);
    if let Some(w) = &mut v.worst {
        w.output = format!("scores (text {} x video {})", w.index / nv, w.index % nv);
    }
    v
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
        let (median, min, max) = crate::measure::median_min_max(times);
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
        let (tm, _, _) = crate::measure::median_min_max(tt);
        let (vm, _, _) = crate::measure::median_min_max(vt);
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

    #[test]
    fn cuda_without_an_index_is_the_local_ranks_gpu_under_a_launcher() {
        use super::local_gpu;
        let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string());
        let never = || -> Result<usize, String> { panic!("no launcher: the GPUs are not counted") };
        assert_eq!(local_gpu(&env(&[]), never), 0);
        assert_eq!(local_gpu(&env(&[("LOCAL_RANK", "5")]), || Ok(4)), 1);
        assert_eq!(local_gpu(&env(&[("SLURM_LOCALID", "2")]), || Ok(8)), 2);
        assert_eq!(local_gpu(&env(&[("LOCAL_RANK", "3"), ("SLURM_LOCALID", "1")]), || Ok(2)), 1, "LOCAL_RANK first");
        // No GPU or no CUDA: GPU 0, whose opening then names what is missing.
        assert_eq!(local_gpu(&env(&[("LOCAL_RANK", "3")]), || Err("built without CUDA".into())), 0);
        assert_eq!(local_gpu(&env(&[("LOCAL_RANK", "3")]), || Ok(0)), 0);
    }
}
