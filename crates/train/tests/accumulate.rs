//! Steps of one batch and of several micro-batches against loops written here from the
//! public pieces (the loader's plans, the model's steps, the schedule): one part per step
//! is the fused single-batch loop as it always was; `accumulate_steps = 3` is the sum of
//! three micro-batch gradients in part order, scaled by 1/3, then one AdamW step.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use demovlp_data::batches::{part_range, Dataset, InputShape, Loader, LoaderConfig};
use demovlp_kernels::rng::Rng;
use demovlp_model::{AdamW, TextDropout};
use demovlp_retrieval::LossConfig;
use demovlp_testutil::assert_pinned;
use demovlp_train::checkpoint::{self, LATEST};
use demovlp_train::retrieval_task::{train, TrainInputs};
use demovlp_train::schedule::learning_rate;
use demovlp_train::synthetic::{CorpusConfig, Split, SyntheticCorpus};
use demovlp_train::text::builtin_tokenizer;
use demovlp_train::trainer::{batch_ref, fresh_state, part_dropout_seed, RunOptions};
use demovlp_train::weights::build_model;
use demovlp_train::TrainConfig;

/// The final parameters of each test's run, pinned before the training loops became one:
/// every refactoring keeps these bits.
const PIN_ONE_PART: &[(&str, &str)] = &[("avx512", "90740210aeb21243")];
const PIN_THREE_PARTS: &[(&str, &str)] = &[("avx512", "fea95c10b5183ff1")];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("demovlp-accumulate-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

const TINY: &str = r#"
name = "tiny"
seed = 7
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
eps = 1e-6
weight_decay = 0.01
schedule = "cosine"
warmup_steps = 2
[train]
epochs = 1
log_every = 1
"#;

fn inputs(out: &Path, accumulate: usize) -> TrainInputs {
    let mut c = CorpusConfig::new(5);
    // 17 clips and 9 images: short last batches of 1 sample, and with 3 parts of 4 a
    // global batch of 12 whose last one is 5 clips (parts of 4, 1, 0 samples).
    (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test) = (17, 9, 4, 4, 4);
    let corpus = Arc::new(SyntheticCorpus::new(c));
    let mut cfg = TrainConfig::parse_str(&TINY.replace("OUT", &out.display().to_string())).unwrap();
    cfg.train.accumulate_steps = accumulate;
    let source: Arc<dyn demovlp_data::FeatureSource> = corpus.clone();
    let set = |s: Split| Dataset::new(s.name(), corpus.samples(s), source.clone());
    TrainInputs {
        config: cfg,
        train: vec![set(Split::PretrainVideo), set(Split::PretrainImage)],
        val: None,
        tokenizer: Arc::new(builtin_tokenizer().unwrap()),
    }
}

fn loader(inp: &TrainInputs) -> Loader {
    let cfg = &inp.config;
    Loader::new(
        inp.train.clone(),
        inp.tokenizer.clone(),
        LoaderConfig {
            batch_size: cfg.data.batch_size,
            shape: InputShape { frames: cfg.data.frames, regions: cfg.data.regions, text_len: cfg.data.text_len },
            seed: cfg.seed,
            ..Default::default()
        },
    )
    .unwrap()
}

fn trained(inp: &TrainInputs) -> Vec<u32> {
    trained_hash(inp).0
}

/// The final parameters' bits and the run's `params_hash`.
fn trained_hash(inp: &TrainInputs) -> (Vec<u32>, String) {
    let r = train(inp, &RunOptions { quiet: true, ..Default::default() }).unwrap();
    assert!(!r.interrupted);
    let ck = checkpoint::load(&r.output_dir.join(LATEST)).unwrap();
    let mut m = build_model(&inp.config, None).unwrap();
    ck.fill_params(&mut m.params).unwrap();
    (m.params.data.iter().map(|x| x.to_bits()).collect(), r.params_hash)
}

fn loss_cfg(cfg: &TrainConfig) -> LossConfig {
    LossConfig { temperature: cfg.loss.temperature, lambda: cfg.loss.lambda, masked_mean: cfg.loss.masked_mean }
}

#[test]
fn one_part_per_step_is_the_fused_single_batch_loop() {
    let out = tmp("one");
    let inp = inputs(&out, 1);
    let (got, hash) = trained_hash(&inp);
    assert_pinned("accumulate/one_part", &hash, PIN_ONE_PART);

    let cfg = &inp.config;
    let l = loader(&inp);
    let mut model = build_model(cfg, None).unwrap();
    let o = &cfg.optim;
    let mut opt = AdamW::new(model.params.len(), o.lr, o.betas[0], o.betas[1], o.eps, o.weight_decay);
    let st = fresh_state(cfg.seed);
    let p = cfg.train.text_dropout;
    assert!(p > 0.0, "dropout on");
    model.set_text_dropout(TextDropout { hidden: p, attention: p }, 0);
    model.set_dropout_rng(Rng::from_state(st.dropout_rng));
    let total = l.batches_per_epoch() as u64;
    let mut step = 0u64;
    for i in 0..l.batches_per_epoch() {
        let b = l.batch(1, i).unwrap();
        if b.batch < 2 {
            continue;
        }
        opt.lr = learning_rate(o, 1, step, total);
        model.train_step_fused(&batch_ref(&b), &loss_cfg(cfg), cfg.loss.use_local, &mut opt);
        step += 1;
    }
    let want: Vec<u32> = model.params.data.iter().map(|x| x.to_bits()).collect();
    assert!(got == want, "accumulate_steps = 1 is not the fused single-batch loop");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn three_parts_are_summed_in_order_scaled_and_stepped_once() {
    let out = tmp("three");
    let inp = inputs(&out, 3);
    let (got, hash) = trained_hash(&inp);
    assert_pinned("accumulate/three_parts", &hash, PIN_THREE_PARTS);

    let cfg = &inp.config;
    let l = loader(&inp);
    let mut model = build_model(cfg, None).unwrap();
    let o = &cfg.optim;
    let mut opt = AdamW::new(model.params.len(), o.lr, o.betas[0], o.betas[1], o.eps, o.weight_decay);
    let p = cfg.train.text_dropout;
    model.set_text_dropout(TextDropout { hidden: p, attention: p }, 0);
    let es = demovlp_data::batches::epoch_seed(cfg.seed, 1);
    let plan = l.step_plan(es, 3);
    // 17 clips → global batches of 12 and 5; 9 images → 9: steps of (4,4,4), (4,1,0), (4,4,1).
    let mut sizes: Vec<Vec<usize>> = plan.iter().map(|s| (0..3).map(|q| part_range(s.indices.len(), 4, q).len()).collect()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![vec![4, 1, 0], vec![4, 4, 1], vec![4, 4, 4]]);
    let total = plan.len() as u64;
    let n = model.params.len();
    let mut parts_iter = l.epoch_parts_from(es, 0, 3, 0..3);
    for (step, _) in plan.iter().enumerate() {
        let parts = parts_iter.next().unwrap().unwrap();
        let mut acc = vec![0.0f32; n];
        let mut used = 0;
        for b in parts.iter().filter(|b| b.batch >= 2) {
            model.set_dropout_rng(Rng::new(part_dropout_seed(cfg.seed, step as u64, b.part)));
            model.forward_backward(&batch_ref(b), &loss_cfg(cfg), cfg.loss.use_local);
            acc.iter_mut().zip(&model.params.grad).for_each(|(a, g)| *a += *g);
            used += 1;
        }
        let inv = 1.0 / used as f32;
        model.params.grad.iter_mut().zip(&acc).for_each(|(g, a)| *g = *a * inv);
        opt.lr = learning_rate(o, 1, step as u64, total);
        opt.step(&mut model.params);
    }
    let want: Vec<u32> = model.params.data.iter().map(|x| x.to_bits()).collect();
    assert!(got == want, "accumulate_steps = 3 is not the documented sum");
    // And it is not the single-batch run (the steps really are different).
    assert!(trained(&inputs(&tmp("three-one"), 1)) != want);
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(tmp("three-one")).ok();
}

#[test]
fn on_a_simulated_device_three_parts_and_two_ranks_give_the_cpus_bits() {
    use demovlp_model::backend::sim::SimDevice;
    use demovlp_train::dist::{Identity, Launch, TcpCollective, Timeouts};
    use demovlp_train::retrieval_task::train_on;
    use demovlp_train::trainer::Dist;
    let quiet = RunOptions { quiet: true, ..Default::default() };
    // Accumulation on the device (add_in_place, scale): the pinned CPU bits.
    let out = tmp("sim-three");
    let r = train_on(&SimDevice::new(), &inputs(&out, 3), &quiet, None).unwrap();
    assert_pinned("accumulate/three_parts", &r.params_hash, PIN_THREE_PARTS);
    std::fs::remove_dir_all(&out).ok();

    // Two ranks (threads, the TCP engine over 127.0.0.1), each on its own simulated device,
    // against one CPU process accumulating two parts.
    let one = tmp("cpu-two-parts");
    let want = train(&inputs(&one, 2), &quiet).unwrap().params_hash;
    std::fs::remove_dir_all(&one).ok();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let two = tmp("sim-two-ranks");
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let out = two.clone();
            std::thread::spawn(move || {
                let launch = Launch { rank, world: 2, local_rank: rank, master_addr: "127.0.0.1".into(), rdzv_port: port, sources: vec![] };
                let t = Timeouts { io: std::time::Duration::from_secs(60), rendezvous: std::time::Duration::from_secs(60) };
                let id = Identity { config_hash: "c".into(), binary_hash: "b".into(), resume: false };
                let coll = TcpCollective::join(&launch, &id, t, &|_| {}).unwrap();
                let dist = Dist { coll: Box::new(coll), local_rank: rank };
                train_on(&SimDevice::new(), &inputs(&out, 1), &RunOptions { quiet: true, ..Default::default() }, Some(dist))
                    .unwrap()
                    .params_hash
            })
        })
        .collect();
    let hashes: Vec<String> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(hashes, [want.clone(), want.clone()], "2 ranks on simulated devices vs one CPU process accumulating 2 parts");
    std::fs::remove_dir_all(&two).ok();

    // An engine that sums the backend's own buffers in place (as NCCL does on CUDA
    // buffers), the statistics through its host path: the same bits.
    struct InPlace {
        tcp: TcpCollective,
        buffers: Arc<AtomicUsize>,
    }
    impl demovlp_train::dist::Collective for InPlace {
        fn rank(&self) -> usize {
            self.tcp.rank()
        }
        fn world(&self) -> usize {
            self.tcp.world()
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> anyhow::Result<()> {
            self.tcp.all_reduce_sum(buf)
        }
        fn broadcast_f32(&mut self, buf: &mut [f32]) -> anyhow::Result<()> {
            self.tcp.broadcast_f32(buf)
        }
        fn broadcast_bytes(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<()> {
            self.tcp.broadcast_bytes(buf)
        }
        fn engine(&self) -> &'static str {
            "in-place test engine"
        }
        fn all_reduce_buffers(&mut self, bufs: &mut [&mut dyn std::any::Any]) -> Option<anyhow::Result<()>> {
            for b in bufs.iter_mut() {
                let v = b.downcast_mut::<Vec<f32>>()?;
                if let Err(e) = self.tcp.all_reduce_sum(v) {
                    return Some(Err(e));
                }
                self.buffers.fetch_add(1, Ordering::SeqCst);
            }
            Some(Ok(()))
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let two = tmp("in-place-two-ranks");
    let used = Arc::new(AtomicUsize::new(0));
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (out, used) = (two.clone(), used.clone());
            std::thread::spawn(move || {
                let launch = Launch { rank, world: 2, local_rank: rank, master_addr: "127.0.0.1".into(), rdzv_port: port, sources: vec![] };
                let t = Timeouts { io: std::time::Duration::from_secs(60), rendezvous: std::time::Duration::from_secs(60) };
                let id = Identity { config_hash: "c".into(), binary_hash: "b".into(), resume: false };
                let tcp = TcpCollective::join(&launch, &id, t, &|_| {}).unwrap();
                let dist = Dist { coll: Box::new(InPlace { tcp, buffers: used }), local_rank: rank };
                train_on(&demovlp_model::Cpu, &inputs(&out, 1), &RunOptions { quiet: true, ..Default::default() }, Some(dist))
                    .unwrap()
                    .params_hash
            })
        })
        .collect();
    let hashes: Vec<String> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(hashes, [want.clone(), want], "2 ranks summing buffers in place vs one process accumulating 2 parts");
    assert!(used.load(Ordering::SeqCst) > 0, "the in-place path was not taken");
    std::fs::remove_dir_all(&two).ok();
}
