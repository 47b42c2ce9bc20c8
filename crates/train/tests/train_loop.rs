//! The training loop end to end on a tiny model and a tiny synthetic corpus: exact resume
//! (straight vs interrupted + resumed), Ctrl-C, NaN detection, and a small demo run that
//! must learn (recall far above chance).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use demovlp_data::batches::Dataset;
use demovlp_data::batches::{InputShape, Loader, LoaderConfig};
use demovlp_data::FeatureSource;
use demovlp_model::backend::sim::SimDevice;
use demovlp_testutil::assert_pinned;
use demovlp_train::checkpoint::{self, LATEST};
use demovlp_train::demo::{self, DemoOptions, DemoSizes, Stage};
use demovlp_train::eval::EvalSet;
use demovlp_train::retrieval_task::{train, train_on, TrainInputs};
use demovlp_train::synthetic::{CorpusConfig, Split, SyntheticCorpus};
use demovlp_train::text::builtin_tokenizer;
use demovlp_train::trainer::RunOptions;
use demovlp_train::TrainConfig;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("demovlp-train-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

const TINY: &str = r#"
name = "tiny"
seed = 3
output_dir = "OUT"
[model.config]
proj_dim = 8
[model.config.text]
kind = "distilbert"
vocab_size = 30522
dim = 16
layers = 1
heads = 2
hidden_dim = 32
max_position_embeddings = 16
layer_norm_eps = 1e-12
[model.config.video]
dim = 16
depth = 1
heads = 2
mlp_dim = 32
max_frames = 2
pos_embed_rows = 3
feature_dim = 2048
box_dim = 6
layer_norm_eps = 1e-6
[data]
tokenizer = "builtin"
text_len = 12
frames = 2
regions = 4
batch_size = 4
[[data.train]]
name = "synth_webvid"
format = "jsonl"
annotations = "synthetic"
features = "synthetic"
[[data.train]]
name = "synth_cc3m"
format = "jsonl"
annotations = "synthetic"
features = "synthetic"
[optim]
lr = 1e-3
first_epoch_lr = 5e-4
eps = 1e-6
weight_decay = 0.01
schedule = "step"
milestones = [1]
warmup_steps = 3
[train]
epochs = 3
log_every = 2
"#;

fn corpus() -> Arc<SyntheticCorpus> {
    let mut c = CorpusConfig::new(5);
    (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test) = (16, 8, 4, 6, 4);
    Arc::new(SyntheticCorpus::new(c))
}

/// A feature source that misbehaves on one clip: raises a flag (Ctrl-C) or returns NaN.
struct Faulty {
    inner: Arc<SyntheticCorpus>,
    clip: String,
    stop: Option<Arc<AtomicBool>>,
    nan: bool,
}

impl FeatureSource for Faulty {
    fn describe(&self) -> String {
        "faulty synthetic".into()
    }
    fn frame_count(&self, clip: &str) -> Result<usize> {
        self.inner.frame_count(clip)
    }
    fn frame_regions(
        &self,
        clip: &str,
        frame: usize,
        regions: usize,
        object: &mut [f32],
        mask: &mut [f32],
        rows: &mut Vec<usize>,
    ) -> Result<()> {
        self.inner.frame_regions(clip, frame, regions, object, mask, rows)?;
        if clip == self.clip {
            if let Some(s) = &self.stop {
                s.store(true, Ordering::SeqCst);
            }
            if self.nan {
                object[0] = f32::NAN;
            }
        }
        Ok(())
    }
}

fn inputs(out: &Path, max_steps: Option<u64>, source: Arc<dyn FeatureSource>, corpus: &SyntheticCorpus) -> TrainInputs {
    let mut cfg = TrainConfig::parse_str(&TINY.replace("OUT", &out.display().to_string())).unwrap();
    cfg.train.max_steps = max_steps;
    let set = |s: Split| Dataset::new(s.name(), corpus.samples(s), source.clone());
    TrainInputs {
        config: cfg,
        train: vec![set(Split::PretrainVideo), set(Split::PretrainImage)],
        val: Some(EvalSet::from_samples("val", &corpus.samples(Split::Val), 2, source.clone()).unwrap()),
        tokenizer: Arc::new(builtin_tokenizer().unwrap()),
    }
}

fn quiet() -> RunOptions {
    RunOptions { quiet: true, ..Default::default() }
}

type Params = Vec<(String, Vec<usize>, Vec<f32>)>;

fn final_state(out: &Path) -> (Params, Vec<f32>, Vec<f32>, u64, checkpoint::TrainerState) {
    let c = checkpoint::load(&out.join(LATEST)).unwrap();
    let o = c.optimizer().clone();
    (c.params, o.m, o.v, o.t, c.state)
}

/// The final parameters of the 10-step run (straight, resumed, and after Ctrl-C), pinned
/// before the training loops became one: every refactoring keeps these bits.
const PIN_RESUME: &[(&str, &str)] = &[("avx512", "190a8f171951dd3a")];

#[test]
fn resume_continues_exactly_and_ctrl_c_saves_a_resumable_checkpoint() {
    let corpus = corpus();
    // 6 batches per epoch (4 + 2 alternating); 10 steps cross an epoch end and a validation.
    let straight = tmp("straight");
    let r = train(&inputs(&straight, Some(10), corpus.clone(), &corpus), &quiet()).unwrap();
    assert_eq!(r.steps, 10);
    assert_pinned("train_loop/resume", &r.params_hash, PIN_RESUME);
    let want = final_state(&straight);

    // Half, then resume to the same total.
    let split = tmp("split");
    assert_eq!(train(&inputs(&split, Some(5), corpus.clone(), &corpus), &quiet()).unwrap().steps, 5);
    let mid = final_state(&split);
    assert_eq!(mid.4.step, 5);
    assert_ne!(mid.0, want.0, "half-way weights must differ from the final ones");
    // The resumed half assembles batches on a single loader thread: results must not care.
    let mut second = inputs(&split, Some(10), corpus.clone(), &corpus);
    second.config.data.workers = 1;
    let r = train(&second, &RunOptions { resume: true, ..quiet() }).unwrap();
    assert_eq!(r.steps, 10);
    assert_pinned("train_loop/resume", &r.params_hash, PIN_RESUME);
    let got = final_state(&split);
    assert!(got.0 == want.0, "weights differ after resume");
    assert!(got.1 == want.1 && got.2 == want.2 && got.3 == want.3, "optimiser state differs after resume");
    assert_eq!(got.4, want.4);

    // Ctrl-C while loading a clip of the 3rd epoch's data: stops with a resumable checkpoint;
    // resuming to the same step count again gives identical weights.
    let stop = Arc::new(AtomicBool::new(false));
    let victim = corpus.clips(Split::PretrainImage)[3].id.clone();
    let faulty = Arc::new(Faulty { inner: corpus.clone(), clip: victim, stop: Some(stop.clone()), nan: false });
    let ctrlc = tmp("ctrlc");
    let r = train(&inputs(&ctrlc, Some(10), faulty, &corpus), &RunOptions { stop: Some(stop), ..quiet() }).unwrap();
    assert!(r.interrupted && r.steps < 10, "{r:?}");
    let r = train(&inputs(&ctrlc, Some(10), corpus.clone(), &corpus), &RunOptions { resume: true, ..quiet() }).unwrap();
    assert_eq!(r.steps, 10);
    assert_pinned("train_loop/resume", &r.params_hash, PIN_RESUME);
    assert!(final_state(&ctrlc).0 == want.0, "weights differ after Ctrl-C + resume");

    // Logs and plots are written; the log holds steps and evaluations.
    let log = std::fs::read_to_string(straight.join("log.jsonl")).unwrap();
    assert!(log.lines().any(|l| l.contains("\"kind\":\"step\"")) && log.lines().any(|l| l.contains("\"kind\":\"eval\"")));
    for f in ["loss.svg", "recall.svg", "summary.txt", "config.toml", "checkpoint_best.safetensors"] {
        assert!(straight.join(f).is_file(), "{f} missing");
    }
    for d in [straight, split, ctrlc] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn a_checkpoint_of_the_earlier_release_resumes_to_the_same_bits() {
    // testdata/compat/retrieval_v1_step5.safetensors.gz: step 5 of the 10-step run above,
    // written by the release before the training loops became one (checkpoint layout v1).
    let corpus = corpus();
    let out = tmp("compat-v1");
    std::fs::create_dir_all(&out).unwrap();
    demovlp_testutil::gunzip(&testdata("compat/retrieval_v1_step5.safetensors.gz"), &out.join(LATEST));
    let c = checkpoint::load(&out.join(LATEST)).unwrap();
    assert_eq!((c.task.as_str(), c.state.step, c.optimizers.len()), ("retrieval", 5, 1));
    let r = train(&inputs(&out, Some(10), corpus.clone(), &corpus), &RunOptions { resume: true, ..quiet() }).unwrap();
    assert_eq!(r.steps, 10);
    assert_pinned("train_loop/resume", &r.params_hash, PIN_RESUME);
    // It is rewritten in the current layout, which loads the same way.
    let c = checkpoint::load(&out.join(LATEST)).unwrap();
    assert_eq!((c.task.as_str(), c.state.step, c.optimizers[0].0.as_str()), ("retrieval", 10, "model"));
    std::fs::remove_dir_all(&out).ok();
}

/// Distinct word ids other than [PAD] (0): the word-table rows a fused step updates by row.
fn distinct_ids(ids: &[i64]) -> u64 {
    let mut d: Vec<i64> = ids.iter().copied().filter(|&i| i != 0).collect();
    d.sort_unstable();
    d.dedup();
    d.len() as u64
}

#[test]
fn on_a_simulated_device_the_loop_gives_the_cpus_bits_and_a_step_moves_only_its_batch() {
    let corpus = corpus();
    let sim = SimDevice::new();
    // The 10-step run of the resume test, stopped at 5 and resumed, on a device whose memory
    // starts as NaN and is reachable only through transfers: the CPU's bits.
    let out = tmp("sim-resume");
    assert_eq!(train_on(&sim, &inputs(&out, Some(5), corpus.clone(), &corpus), &quiet(), None).unwrap().steps, 5);
    let r = train_on(&sim, &inputs(&out, Some(10), corpus.clone(), &corpus), &RunOptions { resume: true, ..quiet() }, None).unwrap();
    assert_eq!(r.steps, 10);
    assert_pinned("train_loop/resume", &r.params_hash, PIN_RESUME);
    // Validation scored on the device (Backend::eval_scores), with the CPU's metrics.
    assert!(sim.snapshot().score_runs >= 1, "validation scores were not computed on the device: {:?}", sim.snapshot());
    let cpu_out = tmp("sim-resume-cpu");
    let cpu = train_on(&demovlp_model::Cpu, &inputs(&cpu_out, Some(10), corpus.clone(), &corpus), &quiet(), None).unwrap();
    assert_eq!(cpu.params_hash, r.params_hash);
    assert!(r.last_metrics.is_some(), "the resumed run validated");
    assert_eq!(format!("{:?}", cpu.last_metrics), format!("{:?}", r.last_metrics), "validation metrics differ from the CPU's");
    std::fs::remove_dir_all(&cpu_out).ok();
    std::fs::remove_dir_all(&out).ok();

    // One step's cost: a run of 3 steps minus a run of 2 (no validation, the same start and
    // the same final checkpoint). Written down in bytes: what the batch must upload and the
    // scalars it must read back, plus what the model and the backend trait move today on
    // top, each term named (see crates/model/tests/sim_device.rs).
    let counts = |steps: u64| {
        let out = tmp(&format!("sim-steps{steps}"));
        let mut inp = inputs(&out, Some(steps), corpus.clone(), &corpus);
        inp.val = None;
        sim.reset();
        train_on(&sim, &inp, &quiet(), None).unwrap();
        std::fs::remove_dir_all(&out).ok();
        (sim.snapshot(), sim.late_reads(), inp)
    };
    let (two, reads_two, _) = counts(2);
    let (three, reads_three, inp) = counts(3);
    let step = three - two;
    assert_eq!(step.allocations, 0, "a training step after the first allocates nothing");
    assert_eq!(step.syncs, 1, "one synchronisation: the losses' read-back");
    // That synchronisation is the late read of the step's losses, waited for only once the
    // next step's kernels were all queued (the device has them to run while the host
    // waits); the last step's losses are read at once (max_steps: the run ends).
    assert_eq!((reads_two.len(), reads_three.len()), (2, 3), "one late read per step");
    let lag: Vec<u64> = reads_three.iter().map(|&(queued, waited)| waited - queued).collect();
    assert!(lag[0] > 0, "step 1's losses read after step 2 was queued: {reads_three:?}");
    assert_eq!(lag[1], step.launches, "step 2's losses read after all of step 3's kernels were queued");
    assert_eq!(lag[2], 0, "the last step's losses read at once");
    let cfg = &inp.config;
    let loader = Loader::new(
        inp.train.clone(),
        inp.tokenizer.clone(),
        LoaderConfig {
            batch_size: cfg.data.batch_size,
            shape: InputShape { frames: cfg.data.frames, regions: cfg.data.regions, text_len: cfg.data.text_len },
            seed: cfg.seed,
            ..Default::default()
        },
    )
    .unwrap();
    let b = loader.batch(1, 2).unwrap();
    let (n, nr, l) = (b.batch as u64, (b.frames * b.regions) as u64, b.text_len as u64);
    let (f32s, index) = (4u64, 8u64);
    let upload = n * nr * 2054 * f32s // region features, once per step
        + n * l * index // token ids
        + n * l * f32s // attention mask (the text tower's additive mask)
        + n * (1 + nr) * f32s; // object mask (the video tower's additive mask, CLS + regions)
    let upload_extra = n * (l - 1) * f32s // the losses' word mask, built again on the host
        + n * l * index // the token ids again: the embeddings' backward takes host values
        + 2 * distinct_ids(&b.input_ids) * index; // the fused step's word-table rows (backward, AdamW)
    let read_back = 2 * f32s; // loss_global, loss_local (the total is their sum)
    assert_eq!(step.h2d_bytes, upload + upload_extra, "bytes host→device of one step");
    assert_eq!(step.d2h_bytes, read_back, "bytes device→host of one step");
}

#[test]
fn nan_loss_stops_naming_step_clips_and_last_checkpoint() {
    let corpus = corpus();
    let victim = corpus.clips(Split::PretrainVideo)[2].id.clone();
    let out = tmp("nan");
    let faulty = Arc::new(Faulty { inner: corpus.clone(), clip: victim.clone(), stop: None, nan: true });
    let e = format!("{:#}", train(&inputs(&out, None, faulty, &corpus), &quiet()).unwrap_err());
    assert!(e.contains("loss is NaN") && e.contains(&victim) && e.contains("at step") && e.contains("last good checkpoint"), "{e}");
    std::fs::remove_dir_all(out).ok();
}

/// The step number in "loss is NaN at step N".
fn nan_step(e: &str) -> u64 {
    let rest = &e[e.find("at step ").expect(e) + 8..];
    rest[..rest.find(' ').unwrap()].parse().unwrap()
}

#[test]
fn a_nan_loss_read_one_step_late_still_stops_before_a_checkpoint_saves_it() {
    // A step's losses are read after the next step was queued, so a NaN step's update has
    // been applied (and the next step queued) when the NaN is seen. With a checkpoint every
    // 2 steps, a NaN at an odd step is read just before the next (checkpoint) step is
    // accounted, one at an even step at once: either way the run stops naming the NaN step,
    // its clip and the last checkpoint, which holds finite weights of the step before.
    let corpus = corpus();
    let mut parities = Vec::new();
    for i in 0..8 {
        let victim = corpus.clips(Split::PretrainVideo)[i].id.clone();
        let mut errors = Vec::new();
        for device in ["cpu", "sim"] {
            let out = tmp(&format!("nan-late-{i}-{device}"));
            let faulty = Arc::new(Faulty { inner: corpus.clone(), clip: victim.clone(), stop: None, nan: true });
            let mut inp = inputs(&out, None, faulty, &corpus);
            inp.config.train.checkpoint_every = 2;
            let r = if device == "cpu" { train(&inp, &quiet()) } else { train_on(&SimDevice::new(), &inp, &quiet(), None) };
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("loss is NaN") && e.contains(&victim), "{e}");
            let n = nan_step(&e);
            let saved = (n - 1) / 2 * 2; // the last checkpoint step before step n
            if saved == 0 {
                assert!(e.contains("last good checkpoint: none") && !out.join(LATEST).exists(), "{e}");
            } else {
                assert!(e.contains(&format!("last good checkpoint: {}", out.join(LATEST).display())), "{e}");
                let c = checkpoint::load(&out.join(LATEST)).unwrap();
                assert_eq!(c.state.step, saved, "{device}: the checkpoint is the last one before the NaN step");
                assert!(c.params.iter().all(|(_, _, v)| v.iter().all(|x| x.is_finite())), "{device}: NaN weights saved");
            }
            let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
            for line in log.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                match v["kind"].as_str() {
                    Some("step") => assert!(v["step"].as_u64().unwrap() < n, "{device}: a log line of step {n} or later: {line}"),
                    Some("error") => assert_eq!(v["step"].as_u64(), Some(n - 1), "{line}"),
                    _ => {}
                }
            }
            errors.push(e.replace(&out.display().to_string(), "OUT"));
            std::fs::remove_dir_all(&out).ok();
        }
        assert_eq!(errors[0], errors[1], "the CPU and the simulated device stop alike");
        parities.push(nan_step(&errors[0]) % 2);
        if parities.contains(&0) && parities.contains(&1) {
            return;
        }
    }
    panic!("no victim clip gave a NaN at both an odd and an even step: {parities:?}");
}

#[test]
fn tiny_demo_learns_far_above_chance() {
    let mut sizes = DemoSizes::quick(1);
    (sizes.corpus.pretrain_videos, sizes.corpus.pretrain_images, sizes.corpus.finetune_train, sizes.corpus.val, sizes.corpus.test) =
        (320, 160, 320, 40, 100);
    sizes.model.text.dim = 32;
    sizes.model.text.hidden_dim = 64;
    sizes.model.video.dim = 32;
    sizes.model.video.mlp_dim = 64;
    sizes.model.proj_dim = 32;
    sizes.pretrain = Stage { frames: 1, regions: 6, batch: 32, epochs: 8, lr: 2e-3, warmup_steps: 20, samples_per_epoch: None };
    sizes.finetune = Stage { frames: 2, regions: 6, batch: 32, epochs: 5, lr: 1e-3, warmup_steps: 5, samples_per_epoch: None };
    let r = demo::run(&DemoOptions { quiet: true, seed: 1, sizes: Some(sizes), ..Default::default() }).unwrap();
    assert_eq!(r.test_clips, 100);
    assert_eq!(r.rows.len(), 3);
    let chance = &r.rows[0].metrics.t2v;
    assert!(chance.r1 < 6.0, "chance row {chance:?}");
    let best = &r.final_metrics().t2v;
    // Chance R@1 is 1% on 100 clips.
    assert!(best.r1 >= 10.0 && best.medr <= 10.0, "global + region-word t2v {best:?}");
    let line: serde_json::Value = serde_json::from_str(&r.json_line()).unwrap();
    assert_eq!(line["test_clips"], 100);
    assert!(line["t2v"]["R1"].as_f64().unwrap() >= 10.0 && line["v2t"]["MedR"].is_number() && line["seconds"].is_number());
}

use demovlp_testutil::testdata;

#[test]
fn init_from_published_checkpoint_and_from_our_model_dir() {
    use demovlp_model::io;
    use demovlp_train::weights::{load_init, load_model};
    // `finetune --init model_tiny_checkpoint.pth`: the published trainer's file.
    let pth = testdata("model_tiny_checkpoint.pth");
    let reference = io::import_weights(&pth, None, 4, 4).unwrap();
    let mut model = demovlp_model::Model::new(reference.config.clone());
    model.init_random(9);
    load_init(&mut model.params, &pth).unwrap();
    assert!(model.params.data == reference.params.data);
    // More frames than the source: temporal_embed grows as the published loader's
    // load_temporal_fix says: zero rows after the copied ones, or interpolated rows.
    let mut wider = reference.config.clone();
    wider.video.max_frames += 2;
    wider.video.pos_embed_rows += 2;
    let mut m2 = demovlp_model::Model::new(wider.clone());
    m2.init_random(4);
    load_init(&mut m2.params, &pth).unwrap();
    let id = |m: &demovlp_model::Model| m.params.id("object_model.temporal_embed").unwrap();
    let (src, dst) = (reference.params.get(id(&reference)), m2.params.get(id(&m2)));
    let d = reference.config.video.dim;
    let rows = reference.config.video.max_frames;
    assert_eq!(&dst[..src.len()], src);
    assert!(dst[src.len()..].iter().all(|&x| x == 0.0) && dst.len() == src.len() + 2 * d);
    let mut m3 = demovlp_model::Model::new(wider);
    demovlp_train::weights::load_init_with(&mut m3.params, &pth, io::TemporalFix::Bilinear).unwrap();
    let dst = m3.params.get(id(&m3));
    // align_corners: the first and last rows are the source's, the middle ones in between.
    assert_eq!((&dst[..d], &dst[dst.len() - d..]), (&src[..d], &src[src.len() - d..]));
    let pos = (rows - 1) as f32 / (rows + 1) as f32; // output row 1
    let (i0, l) = (pos as usize, pos - (pos as usize) as f32);
    for k in 0..d {
        let want = (1.0 - l) * src[i0 * d + k] + l * src[(i0 + 1) * d + k];
        assert_eq!(dst[d + k], want);
    }
    // eval: a model of fewer frames is widened the same way.
    let fitted = demovlp_train::weights::fit_to_frames(reference.clone(), rows + 2, io::TemporalFix::Bilinear, &pth).unwrap();
    assert_eq!(fitted.config.video.max_frames, rows + 2);
    assert!(fitted.params.get(id(&fitted)) == m3.params.get(id(&m3)));
    // Our model directory round trip, read by `eval --model`.
    let dir = tmp("modeldir");
    io::save_model_dir(&reference, &dir).unwrap();
    assert!(load_model(&dir).unwrap().params.data == reference.params.data);
    let e = format!("{:#}", load_model(&testdata("retrieval_metrics.json")).err().unwrap());
    assert!(e.contains("retrieval_metrics.json"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}
