//! `demovlp demo | pretrain | finetune | eval`: the training and evaluation commands.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use demovlp_data::batches::{Dataset, InputShape};
use demovlp_data::FeatureSource;
use demovlp_data::Sample;
use demovlp_retrieval::ScoreMode;
use demovlp_train::config::DatasetConfig;
use demovlp_train::eval::{EvalOptions, EvalSet};
use demovlp_train::retrieval_task::{train_on, TrainInputs};
use demovlp_train::runlog::metrics_json;
use demovlp_train::trainer::{Dist, RunOptions};
use demovlp_train::{demo, TrainConfig};

use crate::launch::{guard_output_dir, join_ranks, resolve_launch, DistArgs};

#[derive(clap::Args)]
#[command(after_help = "Prints a results table; the last stdout line is one JSON object:\n  \
{\"test_clips\": N, \"t2v\": {\"R1\",\"R5\",\"R10\",\"MedR\"}, \"v2t\": {...}, \"seconds\": S}")]
pub struct DemoArgs {
    /// A one-minute version (fewer clips, smaller model).
    #[arg(long)]
    quick: bool,
    /// Keep the corpus (.npz tree + JSONL annotations), checkpoints, logs and plots here;
    /// training then reads the corpus back from disk.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the corpus, the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress output on stderr.
    #[arg(long)]
    quiet: bool,
    /// A downstream task instead of retrieval, after the same retrieval training: `qa`
    /// (video QA about what the test clips show, against always answering the most frequent
    /// training answer) or `mc` (5-way multiple choice of captions, against chance). Last
    /// stdout line: {"task", "accuracy", "baseline", "test_questions", "seconds"}.
    #[arg(long, value_parser = ["qa", "mc"])]
    task: Option<String>,
    /// Where the retrieval demo trains and evaluates (and the GEMM precision on a GPU);
    /// `--task` demos run on the CPU.
    #[command(flatten)]
    device: crate::device::DeviceArgs,
}

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// TOML run config (see configs/pretrain_webvid_cc3m.toml).
    #[arg(long)]
    config: PathBuf,
    /// Continue from <output_dir>/checkpoint_latest.safetensors (an error when there is none).
    #[arg(long)]
    resume: bool,
    /// Start over in an output_dir that already holds a run: its checkpoints, log, summary
    /// and plots are deleted first.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Override the config's output_dir.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    #[command(flatten)]
    dist: DistArgs,
}

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// TOML run config (see configs/finetune_*.toml).
    #[arg(long)]
    config: PathBuf,
    /// Weights to start from: a training checkpoint, a model directory or a published .pth.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue from <output_dir>/checkpoint_latest.safetensors (an error when there is none).
    #[arg(long)]
    resume: bool,
    /// Start over in an output_dir that already holds a run: its checkpoints, log, summary
    /// and plots are deleted first.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Override the config's output_dir.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    #[command(flatten)]
    dist: DistArgs,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A model directory (model.safetensors + config.json) or a training checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Run config naming the test set (`[data.test]`, else `[data.val]`), tokenizer, frames, regions.
    #[arg(long)]
    config: PathBuf,
    /// Combine scores as the published evaluation does (G + S_loc untransposed; SPEC §8).
    /// Its local term for (text t, video v) is the one of (text v, video t): on a square test
    /// set a text's local terms compare its own video with the other texts, so the ground
    /// truth leaks in and recall comes out too high. The default adds it aligned.
    #[arg(long)]
    reference_eval: bool,
    /// Global similarity only (no region-word term).
    #[arg(long)]
    global_only: bool,
    /// Write the metrics JSON here (default: <model>/eval_<test set>.json or next to the checkpoint).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the [texts, videos] score matrix as safetensors (tensor `sims`).
    #[arg(long)]
    save_sims: Option<PathBuf>,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

fn stop_flag() -> Arc<AtomicBool> {
    demovlp_train::trainer::install_ctrlc()
}

/// The retrieval demo on the chosen backend.
struct DemoJob<'a>(&'a demo::DemoOptions);

impl crate::device::OnBackend for DemoJob<'_> {
    type Out = demo::DemoReport;
    fn run<B: demovlp_model::Backend>(self, be: &B, device: &str) -> Result<Self::Out> {
        if device != "cpu" {
            eprintln!("demo: training and evaluating on {device}");
        }
        demo::run_on(be, self.0)
    }
}

/// A task demo (`demo --task`) on the chosen backend.
struct TaskJob<'a>(demovlp_train::demo_tasks::DemoTask, &'a demo::DemoOptions);

impl crate::device::OnBackend for TaskJob<'_> {
    type Out = demovlp_train::demo_tasks::TaskDemoReport;
    fn run<B: demovlp_model::Backend>(self, be: &B, device: &str) -> Result<Self::Out> {
        if device != "cpu" {
            eprintln!("demo --task: training and evaluating on {device}");
        }
        demovlp_train::demo_tasks::run_task_on(be, self.0, self.1)
    }
}

pub fn demo(a: DemoArgs) -> Result<()> {
    crate::device::check_available(&a.device)?;
    if let Some(t) = a.task.as_deref() {
        return demo_task(&a.device, t, a.quick, a.out.is_some(), a.seed, a.quiet, stop_flag());
    }
    let opts = demo::DemoOptions { quick: a.quick, out: a.out, seed: a.seed, quiet: a.quiet, stop: Some(stop_flag()), sizes: None };
    let report = crate::device::with_backend(&a.device, DemoJob(&opts))?;
    print!("{}", report.table());
    if let Some(o) = &report.out {
        println!("corpus, checkpoints, logs and plots: {}", o.display());
        let qa = demovlp_train::demo_tasks::write_qa_corpus(o, &opts.sizes(), a.seed, &o.join("global_rwa_model"))?;
        println!("video QA on the same clips: demovlp finetune-qa --config {}", qa.display());
    }
    println!("{}", report.json_line());
    Ok(())
}

fn read_samples(ds: &DatasetConfig, train: bool, skip_bad: bool) -> Result<Vec<Sample>> {
    let (samples, skipped) = demovlp_train::annotations::read_dataset(ds, train, skip_bad)?;
    if !skipped.is_empty() {
        eprintln!("{}: skipped {} bad annotation records, e.g. {}", ds.name, skipped.len(), skipped[0]);
    }
    Ok(samples)
}

fn open_source(ds: &DatasetConfig, clip_boxes: bool) -> Result<Arc<dyn FeatureSource>> {
    demovlp_train::annotations::open_features_with(&ds.features, clip_boxes)
        .with_context(|| format!("{}: features {}", ds.name, ds.features.display()))
}

/// A retrieval run on the chosen backend.
struct TrainJob<'a> {
    inputs: &'a TrainInputs,
    opts: &'a RunOptions,
    dist: Option<Dist>,
}

impl crate::device::OnBackend for TrainJob<'_> {
    type Out = demovlp_train::trainer::RunResult;
    fn run<B: demovlp_model::Backend>(self, be: &B, device: &str) -> Result<Self::Out> {
        if device != "cpu" {
            eprintln!("{}: training on {device}", self.inputs.config.name);
        }
        train_on(be, self.inputs, self.opts, self.dist)
    }
}

#[allow(clippy::too_many_arguments)]
fn run_training(
    device: &crate::device::DeviceArgs,
    config: &Path,
    resume: bool,
    force: bool,
    init: Option<PathBuf>,
    output_dir: Option<PathBuf>,
    finetune: bool,
    dist: &DistArgs,
) -> Result<()> {
    let mut cfg = TrainConfig::load(config)?;
    if let Some(o) = output_dir {
        cfg.output_dir = o;
    }
    let launch = resolve_launch(dist)?;
    let rank = launch.as_ref().map_or(0, |l| l.rank);
    if let Some(p) = &init {
        if !p.exists() {
            bail!("--init: path does not exist: {}", p.display());
        }
    }
    let tokenizer = Arc::new(demovlp_train::text::load_tokenizer(&cfg.data.tokenizer)?);
    demovlp_model::io::check_inputs_fit(
        &cfg.model_config()?,
        cfg.data.frames,
        cfg.data.text_len,
        Some(tokenizer.vocab_size()),
        ["data.frames", "data.text_len"],
        "the config's [model]",
    )
    .with_context(|| format!("config {}", config.display()))?;
    // Only rank 0 writes the output directory.
    if rank == 0 {
        guard_output_dir(&cfg.output_dir, resume, force, &["summary.txt", "recall.svg"])?;
    }
    if finetune && rank == 0 && !resume && init.is_none() && cfg.model.init.is_none() {
        let m = &cfg.model;
        let what = match (&m.text_init, &m.video_init) {
            (None, None) => "random weights".to_string(),
            (t, v) => format!(
                "random weights except {}",
                [
                    t.as_ref().map(|p| format!("the text tower ({})", p.display())),
                    v.as_ref().map(|p| format!("the video blocks ({})", p.display()))
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" and ")
            ),
        };
        eprintln!("warning: fine-tuning without --init (and no model.init in {}): starting from {what}", config.display());
    }
    let mut train_sets = Vec::new();
    for ds in &cfg.data.train {
        train_sets.push(Dataset::new(
            ds.name.clone(),
            read_samples(ds, true, cfg.data.skip_bad_samples)?,
            open_source(ds, cfg.data.clip_boxes)?,
        ));
    }
    let val = match &cfg.data.val {
        Some(ds) => Some(EvalSet::from_samples(
            &ds.name,
            &read_samples(ds, false, false)?,
            ds.captions_per_video,
            open_source(ds, cfg.data.clip_boxes)?,
        )?),
        None => None,
    };
    // The stop flag first: a SIGTERM during the rendezvous already counts.
    let stop = stop_flag();
    let d = match &launch {
        Some(l) => Some(join_ranks(l, dist, device, &cfg.dist, &cfg.to_toml(), resume)?),
        None => None,
    };
    let inputs = TrainInputs { config: cfg, train: train_sets, val, tokenizer };
    let name = inputs.config.name.clone();
    // --force already cleared the directory (guard_output_dir above).
    let opts = RunOptions { resume, init, force: false, quiet: false, stop: Some(stop) };
    let r = crate::device::with_backend(device, TrainJob { inputs: &inputs, opts: &opts, dist: d })?;
    let mut j = serde_json::json!({
        "name": name, "output_dir": r.output_dir.display().to_string(), "steps": r.steps, "epochs_done": r.epochs_done,
        "interrupted": r.interrupted, "monitor": r.monitor, "best": r.best, "best_epoch": r.best_epoch,
        "latest": r.latest.display().to_string(), "best_checkpoint": r.best_checkpoint.as_ref().map(|p| p.display().to_string()),
        "seconds": r.seconds, "params_hash": r.params_hash,
    });
    if let Some(m) = &r.last_metrics {
        j["last_val"] = metrics_json(m);
    }
    if let Some(l) = &launch {
        j["rank"] = l.rank.into();
        j["world_size"] = l.world.into();
    }
    println!("{j}");
    if r.interrupted {
        eprintln!("interrupted; continue with the same command plus --resume (checkpoint {})", r.latest.display());
        // The conventional status of a run stopped by a signal (SIGINT 130, SIGTERM 143), so
        // schedulers and scripts can tell.
        std::process::exit(demovlp_train::trainer::stop_exit_code());
    }
    Ok(())
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    crate::device::check_available(&a.device)?;
    run_training(&a.device, &a.config, a.resume, a.force, None, a.output_dir, false, &a.dist)
}

pub fn finetune(a: FinetuneArgs) -> Result<()> {
    crate::device::check_available(&a.device)?;
    run_training(&a.device, &a.config, a.resume, a.force, a.init, a.output_dir, true, &a.dist)
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let cfg = TrainConfig::parse_file(&a.config)?;
    let ds = cfg
        .data
        .test
        .as_ref()
        .or(cfg.data.val.as_ref())
        .with_context(|| format!("{}: no [data.test] or [data.val] section", a.config.display()))?;
    let builtin_tok = demovlp_train::text::is_builtin(&cfg.data.tokenizer);
    for (key, p) in [
        ("data.tokenizer", &cfg.data.tokenizer),
        ("test annotations", &ds.annotations),
        ("test features", &ds.features),
        ("--model", &a.model),
    ] {
        if !(p.exists() || key == "data.tokenizer" && builtin_tok) {
            bail!("{key}: path does not exist: {}", p.display());
        }
    }
    let model = demovlp_train::weights::load_model(&a.model)?;
    // A model pre-trained on fewer frames: inflate its temporal embedding as training would.
    let model = demovlp_train::weights::fit_to_frames(model, cfg.data.frames, cfg.model.load_temporal_fix, &a.model)?;
    let tok = demovlp_train::text::load_tokenizer(&cfg.data.tokenizer)?;
    demovlp_model::io::check_inputs_fit(
        &model.config,
        cfg.data.frames,
        cfg.data.text_len,
        Some(tok.vocab_size()),
        ["data.frames", "data.text_len"],
        &a.model.display().to_string(),
    )
    .with_context(|| format!("config {}", a.config.display()))?;
    let set =
        EvalSet::from_samples(&ds.name, &read_samples(ds, false, false)?, ds.captions_per_video, open_source(ds, cfg.data.clip_boxes)?)?;
    let opts = EvalOptions {
        shape: InputShape { frames: cfg.data.frames, regions: cfg.data.regions, text_len: cfg.data.text_len },
        batch_size: cfg.train.eval_batch_size,
        lambda: cfg.loss.lambda,
        mode: if a.reference_eval { ScoreMode::Reference } else { ScoreMode::Aligned },
        use_local: !a.global_only,
        masked_mean: cfg.loss.masked_mean,
        progress: true,
    };
    eprintln!("evaluating {} on {}: {} videos, {} caption slots", a.model.display(), ds.name, set.videos.len(), set.captions.len());
    let r = crate::device::evaluate_on(&a.device, model, &set, &tok, &opts)?;
    let m = &r.metrics;
    let mode = match (a.global_only, a.reference_eval) {
        (true, _) => "global",
        (false, true) => "reference",
        (false, false) => "aligned",
    };
    println!("{}: {} videos, {} texts, scores: {}", ds.name, set.videos.len(), set.captions.len(), mode_description(mode));
    let w = ds.name.chars().count().max(3);
    println!("{:<w$} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}", ds.name, "R@1", "R@5", "R@10", "R@50", "MedR", "MeanR");
    for (n, d) in [("t2v", &m.t2v), ("v2t", &m.v2t)] {
        println!("{:<w$} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.1} {:>8.1}", n, d.r1, d.r5, d.r10, d.r50, d.medr, d.meanr);
    }
    let mut j = metrics_json(m);
    j["test_set"] = ds.name.clone().into();
    j["videos"] = set.videos.len().into();
    j["texts"] = set.captions.len().into();
    j["mode"] = mode.into();
    j["seconds"] = r.seconds.into();
    let out = a.out.unwrap_or_else(|| {
        let base = if a.model.is_dir() { a.model.clone() } else { a.model.parent().map(Path::to_path_buf).unwrap_or_default() };
        base.join(format!("eval_{}.json", ds.name))
    });
    std::fs::write(&out, serde_json::to_string_pretty(&j)? + "\n").with_context(|| format!("writing {}", out.display()))?;
    if let Some(p) = a.save_sims {
        use demovlp_model::io::{write_safetensors_refs, TensorRef};
        write_safetensors_refs(&p, &[("sims".into(), vec![r.texts, r.videos], TensorRef::F32(&r.sims))], &[])?;
    }
    eprintln!("metrics written to {}", out.display());
    println!(
        "{}",
        serde_json::json!({"test_set": ds.name, "videos": set.videos.len(), "texts": set.captions.len(), "mode": mode, "t2v": j["t2v"], "v2t": j["v2t"], "seconds": r.seconds})
    );
    Ok(())
}

/// What each scoring mode of `eval` computes (printed with its results).
fn mode_description(mode: &str) -> &'static str {
    match mode {
        "global" => "global (video-sentence cosine only, no region-word term)",
        "reference" => {
            "reference (global + region-word similarity added untransposed, as the published evaluation; \
             leaks the ground truth on square test sets, see --help)"
        }
        _ => "aligned (global + region-word similarity of the same text-video pair)",
    }
}

/// `demovlp demo --task qa|mc`.
pub fn demo_task(
    device: &crate::device::DeviceArgs,
    task: &str,
    quick: bool,
    has_out: bool,
    seed: u64,
    quiet: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    use demovlp_train::demo_tasks::DemoTask;
    ensure!(!has_out, "--out is for the retrieval demo; `demo --task` keeps nothing on disk");
    let t = match task {
        "qa" => DemoTask::Qa,
        "mc" => DemoTask::Mc,
        _ => bail!("--task: qa or mc"),
    };
    let opts = demovlp_train::demo::DemoOptions { quick, out: None, seed, quiet, stop: Some(stop), sizes: None };
    let r = crate::device::with_backend(device, TaskJob(t, &opts))?;
    print!("{}", r.table);
    println!("{}", r.json_line());
    Ok(())
}
