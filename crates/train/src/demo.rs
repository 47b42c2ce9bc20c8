//! The built-in demo: a deterministic synthetic corpus, pre-training from scratch of a small
//! model, fine-tuning, and retrieval evaluation on held-out clips — once with the global
//! contrastive loss only and once with global + region-word alignment — against chance.
//! Needs no files: the corpus is generated on demand and the WordPiece vocabulary is
//! embedded. With `out`, the corpus is first written in the extractor's `.npz` layout with
//! JSONL annotations and training reads it back through the real data path.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_data::{FeatureSource, NpzTree};
use demovlp_kernels::rng::Rng;
use demovlp_model::ModelConfig;
use demovlp_retrieval::{retrieval_metrics, RetrievalMetrics, ScoreMode};

use crate::config::{
    small_model, DataSection, DatasetConfig, LossSection, ModelSection, OptimConfig, ScheduleKind, TrainConfig, TrainSection,
};
use crate::eval::{evaluate, EvalOptions, EvalSet};
use crate::retrieval_task::{train_on, TrainInputs};
use crate::synthetic::{CorpusConfig, Split, SyntheticCorpus};
use crate::text::builtin_tokenizer;
use crate::trainer::RunOptions;
use demovlp_data::batches::{Dataset, InputShape};
use demovlp_data::Sample;

/// One training stage of the demo.
#[derive(Clone, Debug)]
pub struct Stage {
    pub frames: usize,
    pub regions: usize,
    pub batch: usize,
    pub epochs: usize,
    pub lr: f32,
    pub warmup_steps: u64,
    pub samples_per_epoch: Option<usize>,
}

/// Everything the demo's size depends on.
#[derive(Clone, Debug)]
pub struct DemoSizes {
    pub corpus: CorpusConfig,
    pub model: ModelConfig,
    pub text_len: usize,
    pub pretrain: Stage,
    pub finetune: Stage,
}

impl DemoSizes {
    /// A DistilBERT-like text tower (random init, the real 30522-token vocabulary) and a
    /// small object transformer; sized so the whole demo takes a few minutes on 2 cores.
    pub fn full(seed: u64) -> Self {
        let mut corpus = CorpusConfig::new(seed);
        corpus.pretrain_videos = 3000;
        corpus.pretrain_images = 1500;
        corpus.finetune_train = 2000;
        corpus.val = 200;
        corpus.test = 500;
        DemoSizes {
            corpus,
            model: small_model(128, 2, 8),
            text_len: 24,
            pretrain: Stage { frames: 1, regions: 12, batch: 32, epochs: 3, lr: 1e-3, warmup_steps: 30, samples_per_epoch: None },
            finetune: Stage { frames: 8, regions: 10, batch: 32, epochs: 4, lr: 5e-4, warmup_steps: 10, samples_per_epoch: None },
        }
    }

    /// The `--quick` version: same pipeline, far fewer clips and steps.
    pub fn quick(seed: u64) -> Self {
        let mut s = Self::full(seed);
        s.corpus.pretrain_videos = 600;
        s.corpus.pretrain_images = 300;
        s.corpus.finetune_train = 400;
        s.corpus.val = 100;
        s.corpus.test = 500;
        s.model = small_model(64, 2, 8);
        s.finetune.frames = 4;
        s.pretrain.epochs = 4;
        s.finetune.epochs = 4;
        s
    }
}

#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    pub quick: bool,
    /// Keep the corpus, checkpoints, logs and plots here.
    pub out: Option<PathBuf>,
    pub seed: u64,
    pub quiet: bool,
    pub stop: Option<Arc<AtomicBool>>,
    /// Override the sizes (tests).
    pub sizes: Option<DemoSizes>,
}

impl DemoOptions {
    /// The sizes a run uses: the override, else the quick or the full demo's.
    pub fn sizes(&self) -> DemoSizes {
        self.sizes.clone().unwrap_or_else(|| if self.quick { DemoSizes::quick(self.seed) } else { DemoSizes::full(self.seed) })
    }
}

pub struct DemoRow {
    pub name: String,
    pub metrics: RetrievalMetrics,
}

pub struct DemoReport {
    pub test_clips: usize,
    pub test_texts: usize,
    pub rows: Vec<DemoRow>,
    pub seconds: f64,
    pub out: Option<PathBuf>,
}

impl DemoReport {
    /// The final model = global + region-word loss (last row).
    pub fn final_metrics(&self) -> &RetrievalMetrics {
        &self.rows.last().expect("demo has rows").metrics
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "DemoVLP demo: text<->video retrieval on {} held-out synthetic clips ({} captions)\n",
            self.test_clips, self.test_texts
        );
        s += &format!("{:<22} | {:^30} | {:^30}\n", "", "text -> video", "video -> text");
        s += &format!(
            "{:<22} | {:>6} {:>6} {:>7} {:>8} | {:>6} {:>6} {:>7} {:>8}\n",
            "model", "R@1", "R@5", "R@10", "MedR", "R@1", "R@5", "R@10", "MedR"
        );
        s += &format!("{}\n", "-".repeat(88));
        for r in &self.rows {
            let (t, v) = (&r.metrics.t2v, &r.metrics.v2t);
            s += &format!(
                "{:<22} | {:>6.1} {:>6.1} {:>7.1} {:>8.1} | {:>6.1} {:>6.1} {:>7.1} {:>8.1}\n",
                r.name, t.r1, t.r5, t.r10, t.medr, v.r1, v.r5, v.r10, v.medr
            );
        }
        s
    }

    /// The last stdout line: the final model's metrics.
    pub fn json_line(&self) -> String {
        let m = self.final_metrics();
        let d = |x: &demovlp_retrieval::DirectionMetrics| serde_json::json!({"R1": x.r1, "R5": x.r5, "R10": x.r10, "MedR": x.medr});
        serde_json::json!({"test_clips": self.test_clips, "t2v": d(&m.t2v), "v2t": d(&m.v2t), "seconds": (self.seconds * 10.0).round() / 10.0}).to_string()
    }
}

/// Scores of a random model: uniform noise through the same metric code.
fn chance(texts: usize, videos: usize, mask: &[bool], seed: u64) -> RetrievalMetrics {
    let mut rng = Rng::new(seed ^ 0xC4A4CE);
    let sims: Vec<f32> = (0..texts * videos).map(|_| rng.uniform()).collect();
    let all = mask.iter().all(|&m| m);
    retrieval_metrics(&sims, texts, videos, if all { None } else { Some(mask) })
}

pub(crate) fn stage_config(
    name: &str,
    out: &Path,
    seed: u64,
    sizes: &DemoSizes,
    st: &Stage,
    use_local: bool,
    data: (&[DatasetConfig], &DatasetConfig, PathBuf),
) -> TrainConfig {
    let mut model = sizes.model.clone();
    model.video.max_frames = sizes.finetune.frames.max(sizes.pretrain.frames);
    model.video.pos_embed_rows = 1 + model.video.max_frames;
    TrainConfig {
        name: name.into(),
        seed,
        output_dir: out.join(name),
        model: ModelSection {
            preset: None,
            config: Some(model),
            init: None,
            text_init: None,
            video_init: None,
            load_temporal_fix: Default::default(),
        },
        data: DataSection {
            tokenizer: data.2,
            text_len: sizes.text_len,
            frames: st.frames,
            regions: st.regions,
            batch_size: st.batch,
            samples_per_epoch: st.samples_per_epoch,
            workers: 0,
            skip_bad_samples: false,
            clip_boxes: false,
            train: data.0.to_vec(),
            val: Some(data.1.clone()),
            test: None,
        },
        optim: OptimConfig {
            lr: st.lr,
            first_epoch_lr: None,
            betas: [0.9, 0.999],
            eps: 1e-6,
            weight_decay: 0.0,
            schedule: ScheduleKind::Cosine,
            milestones: vec![],
            gamma: 0.1,
            warmup_steps: st.warmup_steps,
            min_lr: st.lr * 0.05,
        },
        loss: LossSection { use_local, ..LossSection::default() },
        train: TrainSection {
            epochs: st.epochs,
            log_every: 10,
            early_stopping_patience: None,
            monitor: "t2v_R1".into(),
            max_steps: None,
            eval_batch_size: 64,
            checkpoint_every: 0,
            text_dropout: 0.1,
            accumulate_steps: 1,
        },
        dist: Default::default(),
    }
}

/// Run the demo; prints progress to stderr unless `quiet`.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    run_on(&demovlp_model::Cpu, opts)
}

/// [`run`] with training and evaluation on the backend `be`.
pub fn run_on<B: demovlp_model::Backend>(be: &B, opts: &DemoOptions) -> Result<DemoReport> {
    let t0 = Instant::now();
    let sizes = opts.sizes();
    let say = |s: String| {
        if !opts.quiet {
            eprintln!("[{:>6.1}s] {s}", t0.elapsed().as_secs_f64());
        }
    };
    let (work, keep) = match &opts.out {
        Some(d) => (d.clone(), true),
        None => (std::env::temp_dir().join(format!("demovlp-demo-{}", std::process::id())), false),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let tok = Arc::new(builtin_tokenizer()?);
    let corpus = Arc::new(SyntheticCorpus::new(sizes.corpus.clone()));
    say(sizes.corpus.describe(opts.seed));

    // Where features and annotations come from: generated on demand, or written and read back.
    type Samples = Box<dyn Fn(Split) -> Result<Vec<Sample>>>;
    type Paths = Box<dyn Fn(Split) -> (PathBuf, PathBuf)>;
    let (source, samples, ds_paths): (Arc<dyn FeatureSource>, Samples, Paths) = if keep {
        let root = work.join("corpus");
        say(format!(
            "writing the corpus to {} (.npz per frame + JSONL annotations, about {:.1} GB)",
            root.display(),
            corpus.feature_bytes() as f64 / 1e9
        ));
        corpus.write(&root, &|_, _| {})?;
        let r1 = root.clone();
        let r2 = root.clone();
        (
            Arc::new(NpzTree::new(root.join("features"))),
            Box::new(move |s: Split| read_jsonl(&r1.join("annotations").join(format!("{}.jsonl", s.name())))),
            Box::new(move |s: Split| (r2.join("annotations").join(format!("{}.jsonl", s.name())), r2.join("features"))),
        )
    } else {
        let c = corpus.clone();
        (
            corpus.clone() as Arc<dyn FeatureSource>,
            Box::new(move |s: Split| Ok(c.samples(s))),
            Box::new(|s: Split| (PathBuf::from(format!("synthetic:{}", s.name())), PathBuf::from("synthetic:features"))),
        )
    };
    let tok_path = PathBuf::from("builtin:bert-base-uncased");
    let ds_cfg = |s: Split, k: usize| {
        let (a, f) = ds_paths(s);
        DatasetConfig {
            name: s.name().into(),
            format: "jsonl".into(),
            annotations: a,
            features: f,
            cut: None,
            max_samples: None,
            captions_per_video: k,
        }
    };
    let set = |s: Split| -> Result<Dataset> { Ok(Dataset::new(s.name(), samples(s)?, source.clone())) };
    let val = EvalSet::from_samples(Split::Val.name(), &samples(Split::Val)?, 1, source.clone())?;
    let test = EvalSet::from_samples(Split::Test.name(), &samples(Split::Test)?, 1, source.clone())?;

    let mut rows =
        vec![DemoRow { name: "chance".into(), metrics: chance(test.captions.len(), test.videos.len(), &test.query_mask(), opts.seed) }];
    for (label, tag, use_local) in [("global loss only", "global", false), ("global + region-word", "global_rwa", true)] {
        let pre_cfg = stage_config(
            &format!("{tag}_pretrain"),
            &work,
            opts.seed,
            &sizes,
            &sizes.pretrain,
            use_local,
            (&[ds_cfg(Split::PretrainVideo, 1), ds_cfg(Split::PretrainImage, 1)], &ds_cfg(Split::Val, 1), tok_path.clone()),
        );
        say(format!("{label}: pre-training ({} epochs, 1 frame) ...", sizes.pretrain.epochs));
        let inputs = TrainInputs {
            config: pre_cfg,
            train: vec![set(Split::PretrainVideo)?, set(Split::PretrainImage)?],
            val: Some(val.clone()),
            tokenizer: tok.clone(),
        };
        // The demo owns its run directories: a rerun replaces them.
        let run_opts = RunOptions { resume: false, init: None, force: true, quiet: opts.quiet, stop: opts.stop.clone() };
        let pre = train_on(be, &inputs, &run_opts, None)?;
        if pre.interrupted {
            bail!("interrupted during pre-training; resumable checkpoint: {}", pre.latest.display());
        }
        let init = pre.best_checkpoint.clone().unwrap_or(pre.latest.clone());
        let fine_cfg = stage_config(
            &format!("{tag}_finetune"),
            &work,
            opts.seed,
            &sizes,
            &sizes.finetune,
            use_local,
            (&[ds_cfg(Split::FinetuneTrain, 1)], &ds_cfg(Split::Val, 1), tok_path.clone()),
        );
        say(format!(
            "{label}: fine-tuning ({} epochs, {} frames) from {} ...",
            sizes.finetune.epochs,
            sizes.finetune.frames,
            init.display()
        ));
        let inputs = TrainInputs {
            config: fine_cfg.clone(),
            train: vec![set(Split::FinetuneTrain)?],
            val: Some(val.clone()),
            tokenizer: tok.clone(),
        };
        let fine = train_on(be, &inputs, &RunOptions { init: Some(init), ..run_opts.clone() }, None)?;
        if fine.interrupted {
            bail!("interrupted during fine-tuning; resumable checkpoint: {}", fine.latest.display());
        }
        let best = fine.best_checkpoint.clone().unwrap_or(fine.latest.clone());
        let ck = crate::checkpoint::load(&best)?;
        let mut cpu_model = demovlp_model::Model::new(ck.model_config.clone());
        ck.fill_params(&mut cpu_model.params)?;
        let mut model = cpu_model.on_backend(be);
        say(format!("{label}: evaluating on {} test clips ...", test.videos.len()));
        let eo = EvalOptions {
            shape: InputShape { frames: sizes.finetune.frames, regions: sizes.finetune.regions, text_len: sizes.text_len },
            batch_size: 64,
            lambda: fine_cfg.loss.lambda,
            mode: ScoreMode::Aligned,
            use_local,
            masked_mean: false,
            progress: !opts.quiet,
        };
        let r = evaluate(&mut model, &test, &tok, &eo)?;
        if keep {
            let dir = work.join(format!("{tag}_model"));
            demovlp_model::io::save_model_dir(&cpu_model, &dir)?;
            // The training config next to the weights: `demovlp index` takes λ / masked-mean from it.
            let p = dir.join("train_config.toml");
            std::fs::write(&p, fine_cfg.to_toml()).with_context(|| format!("writing {}", p.display()))?;
            std::fs::write(work.join(format!("{tag}_test_metrics.json")), crate::runlog::metrics_json(&r.metrics).to_string())?;
        }
        say(format!("{label}: t2v R@1 {:.1}, v2t R@1 {:.1}", r.metrics.t2v.r1, r.metrics.v2t.r1));
        rows.push(DemoRow { name: label.into(), metrics: r.metrics });
    }
    if !keep {
        std::fs::remove_dir_all(&work).ok();
    }
    Ok(DemoReport {
        test_clips: test.videos.len(),
        test_texts: test.captions.len(),
        rows,
        seconds: t0.elapsed().as_secs_f64(),
        out: keep.then_some(work),
    })
}

/// The user JSONL layout (`{"clip": ..., "captions": [...]}` per line), via the data crate.
pub fn read_jsonl(path: &Path) -> Result<Vec<Sample>> {
    Ok(demovlp_data::annotations::read_annotations(path, Some(demovlp_data::annotations::Layout::Jsonl), false)?.samples)
}
