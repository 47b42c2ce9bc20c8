//! Multi-threaded prefetching batch loader.
//!
//! The order of everything is fixed by `(seed, epoch)` alone, never by thread timing:
//! each dataset's samples are shuffled per epoch (training), cut into batches, and the
//! datasets are interleaved batch by batch (round robin, as the published pre-training
//! alternates WebVid and CC3M); each sample's frame and caption draws come from its own
//! generator derived from (seed, epoch, dataset, sample). Workers build batches ahead of
//! the consumer (at most `prefetch` in flight) and batches are handed out in order.
//!
//! A sample that fails (missing clip, corrupt file, NaN, ...) is an error naming the clip
//! and the problem, or, with `skip_bad`, is left out of its batch and counted in
//! [`Loader::skipped`]. Nothing is ever substituted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use demovlp_kernels::rng::Rng;

use crate::annotations::Sample;
use crate::regions::{select_clip, FeatureSource, FrameChoice, TOKEN_DIM};
use crate::tokenizer::TextTokenizer;

/// One dataset: its samples and where their features come from.
#[derive(Clone)]
pub struct DatasetSpec {
    pub name: String,
    pub samples: Arc<Vec<Sample>>,
    pub source: Arc<dyn FeatureSource>,
}

/// Loader options.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Frames per clip S.
    pub segments: usize,
    /// Regions per frame R.
    pub regions: usize,
    /// Text length L.
    pub text_len: usize,
    /// Training: shuffle per epoch, random frame within each segment, random caption,
    /// drop the last incomplete batch. Otherwise: file order, middle frames, first caption.
    pub train: bool,
    pub seed: u64,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Batches built ahead of the consumer.
    pub prefetch: usize,
    /// Leave failing samples out (counted) instead of stopping with an error.
    pub skip_bad: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 32,
            segments: 8,
            regions: 30,
            text_len: 100,
            train: true,
            seed: 0,
            threads: 0,
            prefetch: 4,
            skip_bad: false,
        }
    }
}

/// A model-ready batch. A clip with fewer than S frames is padded with zero frames
/// whose mask is 0.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, S, R, 2054]`
    pub object: Vec<f32>,
    /// `[B, S, R]` 1 = real region
    pub object_mask: Vec<f32>,
    /// `[B, L]`
    pub input_ids: Vec<i64>,
    /// `[B, L]`
    pub attention_mask: Vec<i64>,
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    pub text_len: usize,
    pub clips: Vec<String>,
    /// Index of each sample in its dataset's sample list.
    pub sample_ids: Vec<usize>,
    /// The caption used for each sample.
    pub captions: Vec<String>,
    /// Which dataset (index into the loader's datasets) the batch comes from.
    pub dataset: usize,
}

/// A planned batch: dataset and sample indices.
#[derive(Clone, Debug, PartialEq)]
struct Plan {
    dataset: usize,
    samples: Vec<usize>,
}

/// The loader: datasets + options; iterate one epoch at a time with [`Loader::epoch`].
pub struct Loader {
    datasets: Vec<DatasetSpec>,
    tokenizer: Arc<TextTokenizer>,
    cfg: LoaderConfig,
    skipped: Arc<Mutex<Vec<(String, String)>>>,
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 finaliser over a combination: decorrelates nearby ids.
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Loader {
    pub fn new(datasets: Vec<DatasetSpec>, tokenizer: Arc<TextTokenizer>, cfg: LoaderConfig) -> Result<Loader> {
        if datasets.is_empty() {
            bail!("loader needs at least one dataset");
        }
        if cfg.batch_size == 0 || cfg.segments == 0 || cfg.regions == 0 || cfg.text_len < 2 {
            bail!("loader: batch_size, segments and regions must be ≥ 1 and text_len ≥ 2 ({cfg:?})");
        }
        for d in &datasets {
            if d.samples.is_empty() {
                bail!("dataset {:?} has no samples", d.name);
            }
        }
        Ok(Loader { datasets, tokenizer, cfg, skipped: Default::default() })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Samples left out so far (with `skip_bad`): `(clip, reason)`.
    pub fn skipped(&self) -> Vec<(String, String)> {
        self.skipped.lock().unwrap().clone()
    }

    /// The batch plan of an epoch (deterministic in seed and epoch).
    fn plan(&self, epoch: usize) -> Vec<Plan> {
        let per: Vec<Vec<Plan>> = self
            .datasets
            .iter()
            .enumerate()
            .map(|(d, ds)| {
                let mut order: Vec<usize> = (0..ds.samples.len()).collect();
                if self.cfg.train {
                    Rng::new(mix(self.cfg.seed, mix(epoch as u64, d as u64 + 1))).shuffle(&mut order);
                }
                order
                    .chunks(self.cfg.batch_size)
                    .filter(|c| !self.cfg.train || c.len() == self.cfg.batch_size || ds.samples.len() < self.cfg.batch_size)
                    .map(|c| Plan { dataset: d, samples: c.to_vec() })
                    .collect()
            })
            .collect();
        // Round robin over datasets, batch by batch, until every one is used up.
        let mut out = Vec::new();
        let longest = per.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            for p in &per {
                if let Some(b) = p.get(i) {
                    out.push(b.clone());
                }
            }
        }
        out
    }

    /// Number of batches in an epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.plan(0).len()
    }

    /// Iterates the batches of `epoch` (built by worker threads, yielded in order).
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        let plans = self.plan(epoch);
        let threads = if self.cfg.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { self.cfg.threads };
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<(usize, Plan)>();
        let (res_tx, res_rx) = crossbeam_channel::unbounded::<(usize, Result<Option<Batch>>)>();
        let workers = (0..threads.max(1))
            .map(|_| {
                let job_rx = job_rx.clone();
                let res_tx = res_tx.clone();
                let ctx = WorkerCtx {
                    datasets: self.datasets.clone(),
                    tokenizer: self.tokenizer.clone(),
                    cfg: self.cfg.clone(),
                    skipped: self.skipped.clone(),
                    epoch,
                };
                std::thread::spawn(move || {
                    for (i, plan) in job_rx.iter() {
                        let r = ctx.build(&plan);
                        if res_tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        let mut it =
            EpochIter { plans, next_job: 0, next_out: 0, done: BTreeMap::new(), job_tx: Some(job_tx), res_rx, workers, failed: false };
        for _ in 0..self.cfg.prefetch.max(1) {
            it.feed();
        }
        it
    }
}

struct WorkerCtx {
    datasets: Vec<DatasetSpec>,
    tokenizer: Arc<TextTokenizer>,
    cfg: LoaderConfig,
    skipped: Arc<Mutex<Vec<(String, String)>>>,
    epoch: usize,
}

impl WorkerCtx {
    /// Builds one batch; `Ok(None)` when every sample of it was skipped.
    fn build(&self, plan: &Plan) -> Result<Option<Batch>> {
        let c = &self.cfg;
        let ds = &self.datasets[plan.dataset];
        let (s, r, l) = (c.segments, c.regions, c.text_len);
        let per_clip = s * r * TOKEN_DIM;
        let mut b = Batch {
            object: Vec::with_capacity(plan.samples.len() * per_clip),
            object_mask: Vec::with_capacity(plan.samples.len() * s * r),
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            batch: 0,
            frames: s,
            regions: r,
            text_len: l,
            clips: Vec::new(),
            sample_ids: Vec::new(),
            captions: Vec::new(),
            dataset: plan.dataset,
        };
        for &si in &plan.samples {
            let sample = &ds.samples[si];
            let mut rng = Rng::new(mix(c.seed, mix(mix(self.epoch as u64, plan.dataset as u64 + 1), si as u64 + 1)));
            let one = (|| -> Result<(crate::regions::ClipInput, String, Vec<i64>, Vec<i64>)> {
                let caption = if c.train { sample.captions[rng.below(sample.captions.len())].clone() } else { sample.captions[0].clone() };
                if caption.trim().is_empty() {
                    bail!("empty caption");
                }
                let choice = if c.train { FrameChoice::Random(&mut rng) } else { FrameChoice::Middle };
                let clip = select_clip(ds.source.as_ref(), &sample.clip, s, r, choice)?;
                let (ids, mask) = self.tokenizer.encode(&caption, l)?;
                Ok((clip, caption, ids, mask))
            })();
            match one {
                Ok((clip, caption, ids, mask)) => {
                    b.object.extend_from_slice(&clip.object);
                    b.object.resize(b.object.len() + (s - clip.frames()) * r * TOKEN_DIM, 0.0);
                    b.object_mask.extend_from_slice(&clip.mask);
                    b.object_mask.resize(b.object_mask.len() + (s - clip.frames()) * r, 0.0);
                    b.input_ids.extend(ids);
                    b.attention_mask.extend(mask);
                    b.clips.push(sample.clip.clone());
                    b.sample_ids.push(si);
                    b.captions.push(caption);
                    b.batch += 1;
                }
                Err(e) if c.skip_bad => {
                    self.skipped.lock().unwrap().push((sample.clip.clone(), format!("{e:#}")));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("dataset {:?}, sample {si}, clip {:?} ({})", ds.name, sample.clip, ds.source.describe()))
                }
            }
        }
        Ok(if b.batch == 0 { None } else { Some(b) })
    }
}

/// Batches of one epoch, in plan order. Dropping it stops the workers.
pub struct EpochIter {
    plans: Vec<Plan>,
    next_job: usize,
    next_out: usize,
    done: BTreeMap<usize, Result<Option<Batch>>>,
    job_tx: Option<crossbeam_channel::Sender<(usize, Plan)>>,
    res_rx: crossbeam_channel::Receiver<(usize, Result<Option<Batch>>)>,
    workers: Vec<std::thread::JoinHandle<()>>,
    failed: bool,
}

impl EpochIter {
    fn feed(&mut self) {
        if self.next_job < self.plans.len() {
            if let Some(tx) = &self.job_tx {
                let _ = tx.send((self.next_job, self.plans[self.next_job].clone()));
            }
            self.next_job += 1;
        }
    }

    /// Batches planned for this epoch (skips may make fewer come out).
    pub fn planned(&self) -> usize {
        self.plans.len()
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        while !self.failed && self.next_out < self.plans.len() {
            let r = loop {
                if let Some(r) = self.done.remove(&self.next_out) {
                    break r;
                }
                match self.res_rx.recv() {
                    Ok((i, r)) => {
                        self.done.insert(i, r);
                    }
                    Err(_) => return Some(Err(anyhow::anyhow!("loader workers stopped unexpectedly"))),
                }
            };
            self.next_out += 1;
            self.feed();
            match r {
                Ok(Some(b)) => return Some(Ok(b)),
                Ok(None) => continue, // every sample of this batch was skipped
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.job_tx = None; // workers finish their current job and exit
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
