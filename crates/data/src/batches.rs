//! The one batch pipeline: datasets → model-ready batches, deterministic, resumable and
//! built ahead of the consumer. Training (`demovlp-train`'s trainer) reads its batches from
//! a [`Loader`]; evaluation embeds its videos through [`assemble_videos`].
//!
//! - **Plan** ([`epoch_plan`]): which samples of which dataset form each batch of an epoch.
//!   Training shuffles every dataset on its own and cuts it into batches of `batch_size`
//!   (a last batch of fewer than 2 samples is dropped: the contrastive loss needs
//!   negatives); the datasets then alternate batch by batch, as the published pre-training
//!   alternates WebVid and CC3M, until all are used or `samples_per_epoch` samples are
//!   planned. Outside training: file order, every sample, nothing dropped.
//! - **Seeds**: every seed below the run seed comes from one function, [`derive_seed`]. The
//!   epoch seed is [`epoch_seed`]`(seed, epoch)`; batch i of the epoch has
//!   [`batch_seed`]`(epoch seed, i)`; sample j of that batch draws its caption, then its
//!   frames, from `Rng::new(derive_seed(batch seed, j, sample index))`. So every batch is a
//!   pure function of (seed, epoch, batch index) — [`Loader::batch`] builds any one of them
//!   on its own — and a resumed run rebuilds exactly the batches an uninterrupted one saw,
//!   whatever the thread count.
//! - **Prefetch**: [`Loader::epoch_from`] assembles the batches of an epoch from a given
//!   index on a background thread, `prefetch` ahead, each batch's samples in parallel
//!   (rayon: the global pool, or a private one of `threads` threads), and hands them out in
//!   plan order; every planned batch comes out, with its index.
//! - **Bad samples**: a sample that fails (no caption, an empty caption, a missing clip, a
//!   corrupt file, NaN, …) is an error naming the dataset, the clip and the problem, or,
//!   with `skip_bad`, is left out of its batch and listed in [`Batch::skipped`] (and counted
//!   in [`Loader::skipped`]). Nothing is ever substituted.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use demovlp_kernels::rng::Rng;
use rayon::prelude::*;

use crate::annotations::Sample;
use crate::regions::{select_clip, ClipInput, FeatureSource, FrameChoice, TOKEN_DIM};
use crate::tokenizer::TextTokenizer;

/// One dataset: its samples and where their region features live.
#[derive(Clone)]
pub struct Dataset {
    pub name: String,
    pub samples: Arc<Vec<Sample>>,
    pub source: Arc<dyn FeatureSource>,
}

impl Dataset {
    pub fn new(name: impl Into<String>, samples: Vec<Sample>, source: Arc<dyn FeatureSource>) -> Dataset {
        Dataset { name: name.into(), samples: Arc::new(samples), source }
    }
}

/// Shapes of the model input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputShape {
    /// Frames (segments) per clip S.
    pub frames: usize,
    /// Regions per frame R.
    pub regions: usize,
    /// Text length L.
    pub text_len: usize,
}

/// Which samples of which dataset form one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSpec {
    pub dataset: usize,
    pub indices: Vec<usize>,
}

/// A sample left out of its batch (`skip_bad`): its clip and the whole error.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub clip: String,
    pub reason: String,
}

/// A model-ready batch. A clip with fewer than S frames is padded with zero frames whose
/// mask is 0.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Samples in the batch (those skipped are not counted).
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    pub text_len: usize,
    /// `[B, S, R, 2054]`
    pub object: Vec<f32>,
    /// `[B, S, R]`, 1 = real region
    pub object_mask: Vec<f32>,
    /// `[B, L]`
    pub input_ids: Vec<i64>,
    /// `[B, L]`
    pub attention_mask: Vec<i64>,
    pub clips: Vec<String>,
    /// Index of each sample in its dataset's sample list.
    pub sample_ids: Vec<usize>,
    /// The caption used for each sample.
    pub captions: Vec<String>,
    /// Which dataset (index into the loader's datasets) the batch comes from.
    pub dataset: usize,
    /// Position of the batch in its epoch's plan.
    pub index: usize,
    /// Which micro-batch (part) of that planned step's global batch this is (0 when a step
    /// is one batch; see [`Loader::epoch_parts_from`]).
    pub part: usize,
    /// Samples that failed and were left out (`skip_bad`).
    pub skipped: Vec<Skipped>,
}

/// Videos only, for evaluation: `[B, S, R, 2054]` tokens and `[B, S, R]` mask, padded like
/// [`Batch`] (middle frame of each segment).
#[derive(Clone, Debug, Default)]
pub struct VideoBatch {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    pub object: Vec<f32>,
    pub object_mask: Vec<f32>,
    pub clips: Vec<String>,
}

/// The one seed derivation: a seed for `(a, b, c)` (splitmix finaliser, so nearby inputs
/// give unrelated seeds).
pub fn derive_seed(a: u64, b: u64, c: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xD1B5_4A32_D192_ED03).rotate_left(29);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The generator whose successive draws are the epoch seeds of a run with seed `seed`
/// (epoch 1 gets the first draw). The trainer keeps its state in checkpoints.
pub fn epoch_seed_rng(seed: u64) -> Rng {
    Rng::new(seed ^ 0x7EA1_5EED)
}

/// The seed of epoch `epoch` (1-based) of a run with seed `seed`: the `epoch`-th draw of
/// [`epoch_seed_rng`].
pub fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    assert!(epoch >= 1, "epochs are 1-based");
    let mut rng = epoch_seed_rng(seed);
    let mut s = rng.next_u64();
    for _ in 1..epoch {
        s = rng.next_u64();
    }
    s
}

/// The seed of batch `index` of an epoch.
pub fn batch_seed(epoch_seed: u64, index: usize) -> u64 {
    derive_seed(epoch_seed, 0xBA7C, index as u64)
}

/// The batches of one epoch (see the module doc). `shuffle` = training: shuffled datasets,
/// batches of fewer than 2 dropped; otherwise file order and every sample.
pub fn epoch_plan(sizes: &[usize], batch: usize, cap: Option<usize>, epoch_seed: u64, shuffle: bool) -> Vec<BatchSpec> {
    let per_ds: Vec<Vec<Vec<usize>>> = sizes
        .iter()
        .enumerate()
        .map(|(d, &n)| {
            let mut idx: Vec<usize> = (0..n).collect();
            if shuffle {
                Rng::new(derive_seed(epoch_seed, 0xDA7A, d as u64)).shuffle(&mut idx);
            }
            idx.chunks(batch.max(1)).filter(|c| !shuffle || c.len() >= 2).map(|c| c.to_vec()).collect()
        })
        .collect();
    let mut plan = Vec::new();
    let mut planned = 0usize;
    let longest = per_ds.iter().map(Vec::len).max().unwrap_or(0);
    'outer: for i in 0..longest {
        for (d, batches) in per_ds.iter().enumerate() {
            if let Some(b) = batches.get(i) {
                if cap.is_some_and(|c| planned >= c) {
                    break 'outer;
                }
                planned += b.len();
                plan.push(BatchSpec { dataset: d, indices: b.clone() });
            }
        }
    }
    plan
}

/// How a batch's random choices are made.
#[derive(Clone, Copy, Debug)]
pub enum Draw {
    /// Training: random caption, random frame in each segment, from the batch seed.
    Train { seed: u64 },
    /// Evaluation: first caption, middle frame of each segment.
    Eval,
}

/// Appends one clip's `[k, R, 2054]` tokens and `[k, R]` mask, padded to S frames with
/// zero tokens of mask 0.
fn push_clip(object: &mut Vec<f32>, mask: &mut Vec<f32>, clip: &ClipInput, frames: usize, regions: usize) {
    object.extend_from_slice(&clip.object);
    object.resize(object.len() + (frames * regions * TOKEN_DIM - clip.object.len()), 0.0);
    mask.extend_from_slice(&clip.mask);
    mask.resize(mask.len() + (frames * regions - clip.mask.len()), 0.0);
}

fn load_clip(set_name: &str, source: &dyn FeatureSource, clip: &str, shape: InputShape, choice: FrameChoice) -> Result<ClipInput> {
    select_clip(source, clip, shape.frames, shape.regions, choice)
        .with_context(|| format!("{set_name}: clip {clip} ({})", source.describe()))
}

/// Assembles one batch of `set` (its `dataset` and `index` fields are left 0). A failing
/// sample stops with an error naming the clip, unless `skip_bad` (then it is left out and
/// listed in [`Batch::skipped`]).
pub fn assemble(set: &Dataset, indices: &[usize], shape: InputShape, tok: &TextTokenizer, draw: Draw, skip_bad: bool) -> Result<Batch> {
    assemble_at(set, indices, 0, shape, tok, draw, skip_bad)
}

/// [`assemble`] of samples that sit at positions `first_pos..` of their planned batch: the
/// sample at position p draws from `derive_seed(seed, p, sample index)`, so a micro-batch
/// cut out of a step's global batch draws exactly what the whole batch would.
pub fn assemble_at(
    set: &Dataset,
    indices: &[usize],
    first_pos: usize,
    shape: InputShape,
    tok: &TextTokenizer,
    draw: Draw,
    skip_bad: bool,
) -> Result<Batch> {
    let (f, r, l) = (shape.frames, shape.regions, shape.text_len);
    type Loaded = (String, ClipInput, String, Vec<i64>, Vec<i64>);
    let loaded: Vec<(usize, String, Result<Loaded>)> = indices
        .par_iter()
        .enumerate()
        .map(|(pos, &i)| {
            let clip_name = set.samples.get(i).map_or_else(String::new, |s| s.clip.clone());
            let one = || -> Result<Loaded> {
                let s = set.samples.get(i).with_context(|| format!("{}: no sample {i}", set.name))?;
                if s.captions.is_empty() {
                    bail!("{}: clip {} has no caption", set.name, s.clip);
                }
                let mut rng = match draw {
                    Draw::Train { seed } => Some(Rng::new(derive_seed(seed, (first_pos + pos) as u64, i as u64))),
                    Draw::Eval => None,
                };
                // The caption is drawn first, then the frames, from the same generator.
                let caption = match rng.as_mut() {
                    Some(rng) => &s.captions[rng.below(s.captions.len())],
                    None => &s.captions[0],
                };
                if caption.trim().is_empty() {
                    bail!("{}: clip {} has an empty caption", set.name, s.clip);
                }
                let choice = match rng.as_mut() {
                    Some(rng) => FrameChoice::Random(rng),
                    None => FrameChoice::Middle,
                };
                let clip = load_clip(&set.name, set.source.as_ref(), &s.clip, shape, choice)?;
                let (ids, mask) = tok.encode(caption, l).with_context(|| format!("{}: tokenizing the caption of {}", set.name, s.clip))?;
                Ok((s.clip.clone(), clip, caption.clone(), ids, mask))
            };
            (i, clip_name, one())
        })
        .collect();
    let mut b = Batch { frames: f, regions: r, text_len: l, ..Default::default() };
    for (i, clip_name, item) in loaded {
        match item {
            Ok((clip, input, caption, ids, am)) => {
                push_clip(&mut b.object, &mut b.object_mask, &input, f, r);
                b.input_ids.extend_from_slice(&ids);
                b.attention_mask.extend_from_slice(&am);
                b.clips.push(clip);
                b.sample_ids.push(i);
                b.captions.push(caption);
                b.batch += 1;
            }
            Err(e) if skip_bad => b.skipped.push(Skipped { clip: clip_name, reason: format!("{e:#}") }),
            Err(e) => return Err(e),
        }
    }
    Ok(b)
}

/// The video-only assembler evaluation uses: the middle frame of each segment of every
/// clip, padded exactly as in [`assemble`]. Any failing clip is an error naming it.
pub fn assemble_videos(set_name: &str, source: &dyn FeatureSource, clips: &[String], shape: InputShape) -> Result<VideoBatch> {
    let loaded: Vec<Result<ClipInput>> = clips.par_iter().map(|c| load_clip(set_name, source, c, shape, FrameChoice::Middle)).collect();
    let (f, r) = (shape.frames, shape.regions);
    let mut b = VideoBatch { frames: f, regions: r, ..Default::default() };
    for (clip, input) in clips.iter().zip(loaded) {
        push_clip(&mut b.object, &mut b.object_mask, &input?, f, r);
        b.clips.push(clip.clone());
        b.batch += 1;
    }
    Ok(b)
}

/// Loader options.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Samples per batch (per dataset; datasets alternate batch by batch).
    pub batch_size: usize,
    pub shape: InputShape,
    /// Training: shuffled plan, random caption and frames (see the module doc).
    /// Otherwise: file order, first caption, middle frames, every sample.
    pub train: bool,
    /// The run seed.
    pub seed: u64,
    /// Cap on the samples planned per epoch, over all datasets.
    pub samples_per_epoch: Option<usize>,
    /// Threads assembling a batch's samples: 0 = rayon's global pool, else a private pool.
    /// Results do not depend on it.
    pub threads: usize,
    /// Batches built ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// Leave failing samples out (listed and counted) instead of stopping with an error.
    pub skip_bad: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 32,
            shape: InputShape { frames: 8, regions: 30, text_len: 100 },
            train: true,
            seed: 0,
            samples_per_epoch: None,
            threads: 0,
            prefetch: 2,
            skip_bad: false,
        }
    }
}

/// Datasets + options. [`Loader::epoch`] / [`Loader::epoch_from`] iterate an epoch with
/// prefetching; [`Loader::batch`] builds one batch on its own.
pub struct Loader {
    datasets: Arc<Vec<Dataset>>,
    tokenizer: Arc<TextTokenizer>,
    cfg: LoaderConfig,
    skipped: Arc<Mutex<Vec<Skipped>>>,
}

impl Loader {
    pub fn new(datasets: Vec<Dataset>, tokenizer: Arc<TextTokenizer>, cfg: LoaderConfig) -> Result<Loader> {
        if datasets.is_empty() {
            bail!("loader needs at least one dataset");
        }
        let s = cfg.shape;
        if cfg.batch_size == 0 || s.frames == 0 || s.regions == 0 || s.text_len < 2 {
            bail!("loader: batch_size, frames and regions must be ≥ 1 and text_len ≥ 2 ({cfg:?})");
        }
        for d in &datasets {
            if d.samples.is_empty() {
                bail!("dataset {:?} has no samples", d.name);
            }
        }
        Ok(Loader { datasets: Arc::new(datasets), tokenizer, cfg, skipped: Default::default() })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn datasets(&self) -> &[Dataset] {
        &self.datasets
    }

    /// Samples left out so far (with `skip_bad`), in the order their batches were handed out.
    pub fn skipped(&self) -> Vec<Skipped> {
        self.skipped.lock().unwrap().clone()
    }

    /// The plan of the epoch with seed `epoch_seed`.
    pub fn plan(&self, epoch_seed: u64) -> Vec<BatchSpec> {
        let sizes: Vec<usize> = self.datasets.iter().map(|d| d.samples.len()).collect();
        epoch_plan(&sizes, self.cfg.batch_size, self.cfg.samples_per_epoch, epoch_seed, self.cfg.train)
    }

    /// Batches per epoch (the same for every epoch).
    pub fn batches_per_epoch(&self) -> usize {
        self.plan(0).len()
    }

    /// Batch `index` of epoch `epoch` (1-based), built here and now: the same batch the
    /// epoch's iterator hands out at that index.
    pub fn batch(&self, epoch: usize, index: usize) -> Result<Batch> {
        let es = epoch_seed(self.cfg.seed, epoch);
        let plan = self.plan(es);
        let spec = plan.get(index).with_context(|| format!("epoch {epoch} has {} batches, asked for batch {index}", plan.len()))?;
        build(&self.datasets, &self.tokenizer, &self.cfg, es, index, spec)
    }

    /// The batches of epoch `epoch` (1-based), in plan order.
    pub fn epoch(&self, epoch: usize) -> Batches {
        self.epoch_from(epoch_seed(self.cfg.seed, epoch), 0)
    }

    /// The batches `start..` of the epoch whose seed is `epoch_seed` (a resumed run passes
    /// the seed its checkpoint recorded: [`epoch_seed`] of its epoch for runs of this code).
    pub fn epoch_from(&self, epoch_seed: u64, start: usize) -> Batches {
        let plan = self.plan(epoch_seed);
        self.prefetch(plan, start, move |datasets, tok, cfg, i, spec| build(datasets, tok, cfg, epoch_seed, i, spec))
    }

    /// The plan of an epoch whose steps take `parts` micro-batches each: the datasets cut
    /// into global batches of `batch_size × parts` samples (alternating batch by batch, a
    /// last global batch of fewer than 2 dropped, `samples_per_epoch` counting all of them).
    /// With `parts = 1` it is [`Loader::plan`].
    pub fn step_plan(&self, epoch_seed: u64, parts: usize) -> Vec<BatchSpec> {
        let sizes: Vec<usize> = self.datasets.iter().map(|d| d.samples.len()).collect();
        epoch_plan(&sizes, self.cfg.batch_size * parts.max(1), self.cfg.samples_per_epoch, epoch_seed, self.cfg.train)
    }

    /// Steps per epoch with `parts` micro-batches per step (the same for every epoch).
    pub fn steps_per_epoch(&self, parts: usize) -> usize {
        self.step_plan(0, parts).len()
    }

    /// Data-parallel / accumulated steps: for each planned step `start..` of the epoch
    /// ([`Loader::step_plan`] with `parts` parts), the micro-batches `take` of its global
    /// batch, in order. Part p holds the contiguous samples `[p·batch_size, (p+1)·batch_size)`
    /// of the global batch ([`part_range`]: the parts of a short last batch may be short or
    /// empty), and every sample draws its caption and frames from its position in the
    /// global batch, so a part is the same whichever process builds it.
    pub fn epoch_parts_from(&self, epoch_seed: u64, start: usize, parts: usize, take: std::ops::Range<usize>) -> StepParts {
        let plan = self.step_plan(epoch_seed, parts);
        self.prefetch(plan, start, move |datasets, tok, cfg, i, spec| {
            take.clone().map(|p| build_part(datasets, tok, cfg, epoch_seed, i, spec, p)).collect::<Result<Vec<Batch>>>()
        })
    }

    fn prefetch<T: HasSkipped + Send + 'static>(
        &self,
        plan: Vec<BatchSpec>,
        start: usize,
        make: impl Fn(&[Dataset], &TextTokenizer, &LoaderConfig, usize, &BatchSpec) -> Result<T> + Send + Sync + 'static,
    ) -> Prefetched<T> {
        let planned = plan.len();
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let (datasets, tok, cfg) = (self.datasets.clone(), self.tokenizer.clone(), self.cfg.clone());
        let handle = std::thread::spawn(move || {
            let pool = (cfg.threads > 0).then(|| rayon::ThreadPoolBuilder::new().num_threads(cfg.threads).build()).and_then(Result::ok);
            for (i, spec) in plan.iter().enumerate().skip(start) {
                let work = || make(&datasets, &tok, &cfg, i, spec);
                let b = match &pool {
                    Some(p) => p.install(work),
                    None => work(),
                };
                let failed = b.is_err();
                if tx.send(b).is_err() || failed {
                    return; // consumer stopped early, or nothing after an error
                }
            }
        });
        Prefetched { rx, handle: Some(handle), skipped: self.skipped.clone(), planned, next: start, failed: false }
    }
}

/// The samples of part `part` of a global batch of `len` samples cut into parts of
/// `batch_size`: `[part·batch_size, (part+1)·batch_size)` clipped to `len` (empty past it).
pub fn part_range(len: usize, batch_size: usize, part: usize) -> std::ops::Range<usize> {
    (part * batch_size).min(len)..((part + 1) * batch_size).min(len)
}

fn build(datasets: &[Dataset], tok: &TextTokenizer, cfg: &LoaderConfig, epoch_seed: u64, index: usize, spec: &BatchSpec) -> Result<Batch> {
    let draw = if cfg.train { Draw::Train { seed: batch_seed(epoch_seed, index) } } else { Draw::Eval };
    let mut b = assemble(&datasets[spec.dataset], &spec.indices, cfg.shape, tok, draw, cfg.skip_bad)?;
    b.dataset = spec.dataset;
    b.index = index;
    Ok(b)
}

fn build_part(
    datasets: &[Dataset],
    tok: &TextTokenizer,
    cfg: &LoaderConfig,
    epoch_seed: u64,
    index: usize,
    spec: &BatchSpec,
    part: usize,
) -> Result<Batch> {
    let draw = if cfg.train { Draw::Train { seed: batch_seed(epoch_seed, index) } } else { Draw::Eval };
    let r = part_range(spec.indices.len(), cfg.batch_size, part);
    let mut b = assemble_at(&datasets[spec.dataset], &spec.indices[r.clone()], r.start, cfg.shape, tok, draw, cfg.skip_bad)?;
    (b.dataset, b.index, b.part) = (spec.dataset, index, part);
    Ok(b)
}

/// What a prefetched item reports as left out (`skip_bad`).
pub trait HasSkipped {
    fn skipped(&self) -> Vec<Skipped>;
}

impl HasSkipped for Batch {
    fn skipped(&self) -> Vec<Skipped> {
        self.skipped.clone()
    }
}

impl HasSkipped for Vec<Batch> {
    fn skipped(&self) -> Vec<Skipped> {
        self.iter().flat_map(|b| b.skipped.iter().cloned()).collect()
    }
}

/// The batches of one epoch from some index on, in plan order (every planned batch,
/// possibly with fewer samples than planned when some were skipped). After an error
/// nothing more comes. Dropping it stops the background thread.
pub type Batches = Prefetched<Batch>;

/// The micro-batches a process takes of each planned step from some step on
/// ([`Loader::epoch_parts_from`]).
pub type StepParts = Prefetched<Vec<Batch>>;

/// Items built ahead on a background thread, in plan order.
pub struct Prefetched<T> {
    rx: Receiver<Result<T>>,
    handle: Option<std::thread::JoinHandle<()>>,
    skipped: Arc<Mutex<Vec<Skipped>>>,
    planned: usize,
    next: usize,
    failed: bool,
}

impl<T> Prefetched<T> {
    /// Batches (steps) in the epoch's plan (including those before the start index).
    pub fn planned(&self) -> usize {
        self.planned
    }
}

impl<T: HasSkipped> Iterator for Prefetched<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.failed || self.next >= self.planned {
            return None;
        }
        let r = match self.rx.recv() {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("batch loader stopped unexpectedly")),
        };
        self.next += 1;
        match &r {
            Ok(b) => self.skipped.lock().unwrap().extend(b.skipped()),
            Err(_) => self.failed = true,
        }
        Some(r)
    }
}

impl<T> Drop for Prefetched<T> {
    fn drop(&mut self) {
        // Unblock the producer (it exits on a closed channel), then wait for it.
        let (_, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            h.join().ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_alternates_datasets_and_respects_the_cap() {
        let plan = epoch_plan(&[10, 4], 3, None, 5, true);
        // ds0: 3 full batches + [1] dropped; ds1: [3] + [1] dropped -> 0,1,0,0
        assert_eq!(plan.iter().map(|b| b.dataset).collect::<Vec<_>>(), vec![0, 1, 0, 0]);
        let mut seen: Vec<usize> = plan.iter().filter(|b| b.dataset == 0).flat_map(|b| b.indices.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        assert_eq!(epoch_plan(&[10, 4], 3, None, 5, true), plan);
        assert_ne!(epoch_plan(&[10, 4], 3, None, 6, true), plan);
        let capped = epoch_plan(&[10, 4], 3, Some(5), 5, true);
        assert_eq!(capped.len(), 2);
        assert_eq!(capped, plan[..2].to_vec());
        // Outside training: file order, every sample, the short last batches kept.
        let eval = epoch_plan(&[4, 2], 3, None, 5, false);
        let want = [(0, vec![0, 1, 2]), (1, vec![0, 1]), (0, vec![3])];
        assert_eq!(eval, want.map(|(dataset, indices)| BatchSpec { dataset, indices }).to_vec());
    }

    #[test]
    fn parts_of_a_step_are_disjoint_contiguous_and_cover_it() {
        // A global batch of 4 parts × 3 (and a short last one of 7): every sample in exactly
        // one part, in order; rank r with N parts per rank takes parts r·N..r·N+N.
        for len in [12, 7, 2] {
            let (world, n, bs) = (2, 2, 3);
            let mut seen = vec![];
            for rank in 0..world {
                for p in rank * n..rank * n + n {
                    let r = part_range(len, bs, p);
                    assert!(r.len() <= bs);
                    seen.extend(r);
                }
            }
            assert_eq!(seen, (0..len).collect::<Vec<_>>(), "len {len}");
        }
        assert_eq!(part_range(7, 3, 2), 6..7);
        assert_eq!(part_range(7, 3, 3), 7..7);
        // One part per step is the single-process plan.
        let one = epoch_plan(&[10, 4], 3, None, 5, true);
        assert_eq!(epoch_plan(&[10, 4], 3, None, 5, true), one);
        let two = epoch_plan(&[10, 4], 6, None, 5, true);
        assert_eq!(two.iter().map(|b| b.indices.len()).collect::<Vec<_>>(), vec![6, 4, 4]);
    }

    #[test]
    fn epoch_seeds_are_the_draws_of_the_run_generator() {
        let mut rng = epoch_seed_rng(3);
        for epoch in 1..5 {
            assert_eq!(epoch_seed(3, epoch), rng.next_u64(), "epoch {epoch}");
        }
        assert_ne!(epoch_seed(3, 1), epoch_seed(4, 1));
    }
}
