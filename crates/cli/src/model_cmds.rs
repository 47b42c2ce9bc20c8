//! Model commands: `import` (published .pth / safetensors → model directory), `replay`
//! (one recorded batch through a model: outputs, gradients, one AdamW step), and the
//! `bench train-step` / `bench embed` benchmarks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use demovlp_kernels::Rng;
use demovlp_model::io::{self, TensorRef};
use demovlp_model::{AdamW, AdamWSettings, Backend, Model, ModelConfig};
use demovlp_retrieval::LossConfig;

use crate::measure::{median_min_max, peak_rss_mb};
use crate::model_args::{read_batch, ImportArgs, RecordedBatch, ReplayArgs};

// ---------------------------------------------------------------------------------------
// import

/// One of our training checkpoints: its weights with the sizes its saved config gives.
fn import_training_checkpoint(a: &ImportArgs) -> Result<(Model, io::LoadReport)> {
    let ck = demovlp_train::checkpoint::load(&a.input)?;
    let c = &ck.model_config;
    for (flag, given, saved) in [("--text-heads", a.text_heads, c.text.heads), ("--video-heads", a.video_heads, c.video.heads)] {
        if let Some(g) = given.filter(|&g| g != saved) {
            bail!("{flag} {g}: {} is a training checkpoint whose saved config has {saved} heads; leave {flag} out", a.input.display());
        }
    }
    io::check_model_config(c, "").with_context(|| format!("{}: saved model config", a.input.display()))?;
    let mut model = Model::new(c.clone());
    ck.fill_params(&mut model.params)?;
    let loaded = ck.params.iter().map(|p| p.0.clone()).collect();
    Ok((model, io::LoadReport { loaded, ..Default::default() }))
}

pub fn import(a: ImportArgs) -> Result<()> {
    for (flag, h) in [("--text-heads", a.text_heads), ("--video-heads", a.video_heads)] {
        if h == Some(0) {
            bail!("{flag} 0: a model needs at least one attention head");
        }
    }
    if crate::qa_cmds::import_qa(&a)? {
        return Ok(());
    }
    let (model, report) = if !a.input.is_dir() && demovlp_train::checkpoint::is_checkpoint(&a.input) {
        import_training_checkpoint(&a)?
    } else {
        let (th, vh) = (a.text_heads.unwrap_or(12), a.video_heads.unwrap_or(12));
        for (flag, h) in [("--text-heads", th), ("--video-heads", vh)] {
            if h == 0 {
                bail!("{flag}: must be at least 1, got 0");
            }
        }
        io::import_weights_report(&a.input, a.key_prefix.as_deref(), th, vh)?
    };
    io::save_model_dir(&model, &a.out)?;
    let c = &model.config;
    eprintln!(
        "imported {}: {:?} text tower {}x{} ({} heads), video tower {}x{} ({} heads, {} frames), P = {}; {}",
        a.input.display(),
        c.text.kind,
        c.text.layers,
        c.text.dim,
        c.text.heads,
        c.video.depth,
        c.video.dim,
        c.video.heads,
        c.video.max_frames,
        c.proj_dim,
        report.summary()
    );
    if !report.skipped.is_empty() {
        eprintln!("skipped (no place in the model): {}", report.skipped.join(", "));
    }
    if !report.missing.is_empty() {
        eprintln!("absent from the input, left zero (unused by the model): {}", report.missing.join(", "));
    }
    println!("{}", a.out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// replay

pub fn replay(a: ReplayArgs) -> Result<()> {
    if demovlp_train::qa::is_qa_dir(&a.model) {
        return crate::qa_cmds::replay_qa(a);
    }
    crate::device::check_available(&a.device)?;
    let model = io::load_model_dir(&a.model)?;
    let device = a.device.clone();
    crate::device::run_model(&device, model, Replay(a))
}

struct Replay(ReplayArgs);

impl crate::device::OnModel for Replay {
    fn run<B: Backend>(self, model: Model<B>, _device: &str) -> Result<()> {
        replay_on(self.0, model)
    }
}

fn replay_on<B: Backend>(a: ReplayArgs, mut model: Model<B>) -> Result<()> {
    let x = read_batch(&a.batch)?;
    x.check_fits(&model.config, &a.batch)?;
    let adamw = a.adamw.as_deref().map(AdamWSettings::parse).transpose()?;
    let loss_cfg = LossConfig { masked_mean: a.masked_mean, ..LossConfig::default() };
    let use_local = !a.global_only;
    let batch = x.batch_ref();

    // Embeddings first (a forward pass each), then the loss pass that fills the gradients.
    let te = model.embed_text(&x.input_ids, &x.attention_mask, x.b, x.l);
    let ve = model.embed_video(&x.object, &x.object_mask, x.b, x.f, x.r);
    let need_grads = a.grads || adamw.is_some();
    let lo =
        if need_grads { model.forward_backward(&batch, &loss_cfg, use_local) } else { model.forward_loss(&batch, &loss_cfg, use_local) };

    let (b, p, l, n) = (x.b, model.config.proj_dim, x.l, x.f * x.r);
    let losses = [[lo.loss_total], [lo.loss_global], [lo.loss_local]];
    let mut out: Vec<(String, Vec<usize>, TensorRef)> = vec![
        ("out.global_text".into(), vec![b, p], TensorRef::F32(&te.global)),
        ("out.local_text".into(), vec![b, l - 1, p], TensorRef::F32(&te.local)),
        ("out.text_mask_additive".into(), vec![b, l - 1], TensorRef::F32(&te.mask_additive)),
        ("out.global_video".into(), vec![b, p], TensorRef::F32(&ve.global)),
        ("out.local_video".into(), vec![b, n, p], TensorRef::F32(&ve.local)),
        ("out.video_mask_additive".into(), vec![b, n], TensorRef::F32(&ve.mask_additive)),
        ("out.global_sim_text_video".into(), vec![b, b], TensorRef::F32(&lo.global_sim_text_video)),
        ("out.local_sim_video_text".into(), vec![b, b], TensorRef::F32(&lo.local_sim_video_text)),
        ("out.loss_total".into(), vec![1], TensorRef::F32(&losses[0])),
        ("out.loss_global".into(), vec![1], TensorRef::F32(&losses[1])),
        ("out.loss_local".into(), vec![1], TensorRef::F32(&losses[2])),
    ];
    let grads_copy;
    if a.grads {
        grads_copy = model.backend().to_host(B::view(&model.params.grad));
        out.extend(
            model
                .params
                .specs()
                .iter()
                .filter(|s| s.receives_grad)
                .map(|s| (format!("grad.{}", s.name), s.shape.clone(), TensorRef::F32(&grads_copy[s.offset..s.offset + s.len]))),
        );
    }
    let after_adamw;
    if let Some(s) = adamw {
        let mut opt = AdamW::new_on(model.backend().clone(), model.params.len(), s);
        opt.step(&mut model.params);
        after_adamw = model.backend().to_host(B::view(&model.params.data));
        out.extend(
            model.params.specs().iter().map(|sp| {
                (format!("after_adamw.{}", sp.name), sp.shape.clone(), TensorRef::F32(&after_adamw[sp.offset..sp.offset + sp.len]))
            }),
        );
    }
    io::write_safetensors_refs(&a.out, &out, &[])?;
    eprintln!(
        "replayed {} (B={b}, F={}, R={}, L={l}): loss_total {:.6} (global {:.6}, local {:.6}); wrote {} tensors to {}",
        a.batch.display(),
        x.f,
        x.r,
        lo.loss_total,
        lo.loss_global,
        lo.loss_local,
        out.len(),
        a.out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// benchmarks

/// A synthetic batch with the published input layout: detector-like non-negative
/// features, boxes in [0,1], a few padded regions; captions of varied length.
fn synthetic_batch(c: &ModelConfig, b: usize, f: usize, r: usize, l: usize, seed: u64) -> RecordedBatch {
    let mut rng = Rng::new(seed);
    let width = c.video.feature_dim + c.video.box_dim;
    let mut object = vec![0.0f32; b * f * r * width];
    let mut object_mask = vec![0.0f32; b * f * r];
    for (slot, row) in object.chunks_mut(width).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = if j < c.video.feature_dim { rng.normal().abs() } else { rng.uniform() };
        }
        // About one region in eight is padding.
        object_mask[slot] = if slot % r == 0 || rng.below(8) != 0 { 1.0 } else { 0.0 };
    }
    // Word-piece ids past the special tokens (published vocab: past the [unused] block too).
    let lo = if c.text.vocab_size > 2000 { 1000 } else { 103 };
    let mut input_ids = vec![0i64; b * l];
    let mut attention_mask = vec![0i64; b * l];
    for i in 0..b {
        let len = 2 + rng.below(l - 1); // CLS .. SEP, 2..=l tokens
        for t in 0..len {
            input_ids[i * l + t] = if t == 0 {
                101
            } else if t == len - 1 {
                102
            } else {
                (lo + rng.below(c.text.vocab_size - lo)) as i64
            };
            attention_mask[i * l + t] = 1;
        }
    }
    RecordedBatch { b, f, r, l, object, object_mask, input_ids, attention_mask }
}

#[derive(clap::Args)]
pub struct BenchTrainStepArgs {
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    #[arg(long, default_value_t = 30)]
    pub regions: usize,
    #[arg(long, default_value_t = 100)]
    pub text_len: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Load this model directory instead of the published size with random init.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print only the JSON line on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Keep the video MLP hidden activations in every block (same as
    /// --recompute-mlp-blocks 0, the default).
    #[arg(long)]
    pub keep_mlp: bool,
    /// Video blocks that recompute their MLP hidden activations in the backward pass
    /// instead of keeping them: each costs ~0.8 % more arithmetic (9.4 GFLOP) and saves
    /// ~23 MiB at the published size (12 = all, lowest memory).
    #[arg(long, default_value_t = demovlp_model::DEFAULT_RECOMPUTE_MLP_BLOCKS)]
    pub recompute_mlp_blocks: usize,
    /// Run the backward pass into a whole-model gradient, then AdamW as a separate pass
    /// (the default fuses each block's AdamW update into the backward pass: same results,
    /// one parameter copy less memory).
    #[arg(long)]
    pub unfused: bool,
    #[command(flatten)]
    pub baseline: crate::bench_pytorch::BaselineArgs,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

fn bench_model(dir: &Option<PathBuf>, frames: usize) -> Result<Model> {
    Ok(match dir {
        Some(d) => io::load_model_dir(d)?,
        None => {
            let mut m = Model::new(ModelConfig::published(frames));
            m.init_random(0);
            m
        }
    })
}

fn check_sizes(m: &Model, frames: usize, text_len: usize) -> Result<()> {
    ensure!(
        frames >= 1 && frames <= m.config.video.max_frames,
        "--frames {frames}: the model has temporal embeddings for 1..={}",
        m.config.video.max_frames
    );
    ensure!(
        text_len >= 2 && text_len <= m.config.text.max_position_embeddings,
        "--text-len {text_len}: must be 2..={}",
        m.config.text.max_position_embeddings
    );
    ensure!(m.config.text.vocab_size > 103, "vocabulary of {} is too small for synthetic captions", m.config.text.vocab_size);
    Ok(())
}

pub fn bench_train_step(a: BenchTrainStepArgs) -> Result<()> {
    ensure!(a.runs >= 1 && a.batch >= 2 && a.regions >= 1, "need --runs ≥ 1, --batch ≥ 2 (contrastive loss), --regions ≥ 1");
    crate::device::check_available(&a.device)?;
    let mut model = bench_model(&a.model, a.frames)?;
    model.set_recompute_mlp_blocks(if a.keep_mlp { 0 } else { a.recompute_mlp_blocks });
    check_sizes(&model, a.frames, a.text_len)?;
    let x = synthetic_batch(&model.config, a.batch, a.frames, a.regions, a.text_len, 1);
    let batch = x.batch_ref();
    if a.device.device != crate::device::Device::Cpu {
        let inputs = crate::device::BenchInputs { batch, runs: a.runs, json: a.json };
        return crate::device::run_model(&a.device, model, crate::device::TrainStepBench(inputs));
    }
    let loss_cfg = LossConfig::default();
    let mut opt = AdamW::with_settings(model.params.len(), AdamWSettings::published(1e-5));
    let threads = rayon::current_num_threads();
    eprintln!(
        "bench train-step: {} parameters, B={} F={} R={} L={}, {threads} threads, 1 warm-up + {} timed steps",
        model.params.len(),
        a.batch,
        a.frames,
        a.regions,
        a.text_len,
        a.runs
    );
    // The PyTorch baseline has the published size built in; a loaded model would not compare.
    // It starts now (building its model while we build ours) and, once both have warmed up,
    // its timed steps alternate with ours.
    let mut torch = match a.model {
        None => {
            crate::bench_pytorch::serve(&a.baseline, &torch_mode("--bench", a.batch, a.frames, a.regions, a.text_len, a.runs, threads))?
        }
        Some(_) => None,
    };
    let mut times = Vec::with_capacity(a.runs);
    let mut torch_times = Vec::with_capacity(a.runs);
    let mut last_loss = 0.0;
    for i in 0..=a.runs {
        if i == 1 {
            if let Some(t) = torch.as_mut() {
                t.wait_ready()?;
            }
        }
        let t0 = Instant::now();
        let (lo, dt_opt) = if a.unfused {
            let lo = model.forward_backward(&batch, &loss_cfg, true);
            let t_opt = Instant::now();
            opt.step(&mut model.params);
            (lo, t_opt.elapsed().as_secs_f64())
        } else {
            (model.train_step_fused(&batch, &loss_cfg, true, &mut opt), 0.0)
        };
        let dt = t0.elapsed().as_secs_f64();
        let ph = model.phase_times;
        eprintln!(
            "    phases: text fwd {:.3}, video fwd {:.3}, loss fwd+bwd {:.3}, text bwd {:.3}, video bwd {:.3}, AdamW {}",
            ph.text_forward,
            ph.video_forward,
            ph.loss,
            ph.text_backward,
            ph.video_backward,
            if a.unfused { format!("{dt_opt:.3} s") } else { "fused into the backward passes".into() }
        );
        ensure!(lo.loss_total.is_finite(), "loss is not finite at step {i}");
        last_loss = lo.loss_total;
        if i > 0 {
            times.push(dt);
        }
        eprintln!("  step {i}{}: {dt:.3} s, loss {:.4}", if i == 0 { " (warm-up)" } else { "" }, lo.loss_total);
        if let (Some(t), true) = (torch.as_mut(), i > 0) {
            let s = t.step()?;
            eprintln!("  PyTorch step {i}: {s:.3} s");
            torch_times.push(s);
        }
    }
    // Paired statistic: each of our steps against the PyTorch step right after it.
    let paired: Vec<f64> = times.iter().zip(&torch_times).map(|(a, b)| a / b).collect();
    let (median, min, max) = median_min_max(times);
    let rss = peak_rss_mb();
    if !a.json {
        println!("train step: median {median:.3} s (min {min:.3}, max {max:.3}), peak RSS {rss:.0} MiB");
    }
    let mut out = serde_json::json!({
        "bench": "train-step", "median_s": median, "min_s": min, "max_s": max, "peak_rss_mb": rss,
        "batch": a.batch, "frames": a.frames, "regions": a.regions, "text_len": a.text_len,
        "runs": a.runs, "threads": threads, "params": model.params.len(), "last_loss": last_loss,
        "recompute_mlp_blocks": model.recompute_mlp_blocks(), "fused_adamw": !a.unfused,
    });
    if let Some(t) = torch {
        let summary = t.finish()?;
        if !a.json {
            println!("timed steps interleaved: demovlp, PyTorch, demovlp, PyTorch, … (each after its own warm-up)");
        }
        out.as_object_mut().unwrap().extend(crate::bench_pytorch::compare(median, rss, &summary)?);
        out["interleaved"] = true.into();
        let pairs = paired.len();
        let (paired_median, _, _) = median_min_max(paired);
        println!("paired: median of per-step time ratios (ours / the PyTorch step after it) {paired_median:.3}x over {pairs} pairs");
        out["paired_time_ratio_median"] = paired_median.into();
    }
    println!("{out}");
    Ok(())
}

/// Arguments of `bench/pytorch_baseline.py` for the same sizes and thread count.
fn torch_mode(mode: &str, batch: usize, frames: usize, regions: usize, text_len: usize, runs: usize, threads: usize) -> Vec<String> {
    let n = |x: usize| x.to_string();
    vec![
        mode.into(),
        "--batch".into(),
        n(batch),
        "--frames".into(),
        n(frames),
        "--regions".into(),
        n(regions),
        "--text-len".into(),
        n(text_len),
        "--runs".into(),
        n(runs),
        "--threads".into(),
        n(threads),
    ]
}

#[derive(clap::Args)]
pub struct BenchEmbedArgs {
    /// Texts / clips per forward call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    #[arg(long, default_value_t = 30)]
    pub regions: usize,
    #[arg(long, default_value_t = 100)]
    pub text_len: usize,
    /// Timed calls of each tower (after one untimed warm-up call each).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Load this model directory instead of the published size with random init.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print only the JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub baseline: crate::bench_pytorch::BaselineArgs,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

pub fn bench_embed(a: BenchEmbedArgs) -> Result<()> {
    ensure!(a.runs >= 1 && a.batch >= 1 && a.regions >= 1, "need --runs ≥ 1, --batch ≥ 1, --regions ≥ 1");
    crate::device::check_available(&a.device)?;
    let mut model = bench_model(&a.model, a.frames)?;
    check_sizes(&model, a.frames, a.text_len)?;
    let x = synthetic_batch(&model.config, a.batch, a.frames, a.regions, a.text_len, 2);
    if a.device.device != crate::device::Device::Cpu {
        let batch = x.batch_ref();
        let inputs = crate::device::BenchInputs { batch, runs: a.runs, json: a.json };
        return crate::device::run_model(&a.device, model, crate::device::EmbedBench(inputs));
    }
    let threads = rayon::current_num_threads();
    eprintln!(
        "bench embed: batch {} (F={} R={} L={}), {threads} threads, 1 warm-up + {} timed calls per tower",
        a.batch, a.frames, a.regions, a.text_len, a.runs
    );
    let mut text_t = Vec::new();
    let mut video_t = Vec::new();
    for i in 0..=a.runs {
        let t0 = Instant::now();
        let te = model.embed_text(&x.input_ids, &x.attention_mask, a.batch, a.text_len);
        let dt_text = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let ve = model.embed_video_inference(&x.object, &x.object_mask, a.batch, a.frames, a.regions);
        let dt_video = t1.elapsed().as_secs_f64();
        ensure!(te.global.iter().chain(&ve.global).all(|v| v.is_finite()), "non-finite embeddings");
        if i > 0 {
            text_t.push(dt_text);
            video_t.push(dt_video);
        }
        eprintln!("  call {i}{}: text {dt_text:.3} s, video {dt_video:.3} s", if i == 0 { " (warm-up)" } else { "" });
    }
    let (tm, tmin, tmax) = median_min_max(text_t);
    let (vm, vmin, vmax) = median_min_max(video_t);
    let (tps, cps) = (a.batch as f64 / tm, a.batch as f64 / vm);
    let rss = peak_rss_mb();
    if !a.json {
        println!("embed: {tps:.1} texts/s, {cps:.1} clips/s (median of {} calls of {}), peak RSS {rss:.0} MiB", a.runs, a.batch);
    }
    let mut out = serde_json::json!({
        "bench": "embed", "texts_per_s": tps, "clips_per_s": cps,
        "text_median_s": tm, "text_min_s": tmin, "text_max_s": tmax,
        "video_median_s": vm, "video_min_s": vmin, "video_max_s": vmax, "peak_rss_mb": rss,
        "batch": a.batch, "frames": a.frames, "regions": a.regions, "text_len": a.text_len,
        "runs": a.runs, "threads": threads,
    });
    if a.model.is_none() {
        let mode = torch_mode("--bench-embed", a.batch, a.frames, a.regions, a.text_len, a.runs, threads);
        if let Some(torch) = crate::bench_pytorch::run(&a.baseline, &mode)? {
            let (t_tps, t_cps) =
                (crate::bench_pytorch::number(&torch, "texts_per_s")?, crate::bench_pytorch::number(&torch, "clips_per_s")?);
            println!(
                "side by side (same run): demovlp {tps:.1} texts/s, {cps:.1} clips/s | PyTorch {t_tps:.1} texts/s, {t_cps:.1} clips/s"
            );
            println!("throughput ratio demovlp/PyTorch: texts {:.2}x, clips {:.2}x", tps / t_tps, cps / t_cps);
            let o = out.as_object_mut().unwrap();
            o.insert("pytorch_texts_per_s".into(), t_tps.into());
            o.insert("pytorch_clips_per_s".into(), t_cps.into());
            o.insert("pytorch_peak_rss_mb".into(), crate::bench_pytorch::number(&torch, "peak_rss_mb")?.into());
        }
    }
    println!("{out}");
    Ok(())
}
