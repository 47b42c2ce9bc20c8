//! From samples to model-ready batches, deterministically and resumably.
//!
//! An epoch's plan (which samples form which batch, datasets alternating batch by batch as
//! the published pre-training does, capped at `samples_per_epoch`) is a pure function of
//! the epoch seed, and so is every random draw inside a batch (caption choice, frame
//! within each segment): sample `j` of batch `i` uses its own generator seeded from
//! (epoch seed, batch, position). A resumed run therefore rebuilds exactly the batches an
//! uninterrupted one would have seen, whatever the thread count. Batches are assembled in
//! parallel (rayon) and prefetched on a background thread while the model trains.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use demovlp_data::{select_clip, FeatureSource, FrameChoice, TOKEN_DIM};
use demovlp_kernels::rng::Rng;
use demovlp_model::BatchRef;
use rayon::prelude::*;

use crate::text::Tokenizer;

pub use demovlp_data::annotations::Sample;

/// One training dataset: samples and where their region features live.
#[derive(Clone)]
pub struct TrainSet {
    pub name: String,
    pub samples: Vec<Sample>,
    pub source: Arc<dyn FeatureSource>,
}

/// Shapes of the model input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputShape {
    pub frames: usize,
    pub regions: usize,
    pub text_len: usize,
}

/// Which samples of which dataset form one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSpec {
    pub dataset: usize,
    pub indices: Vec<usize>,
}

/// A batch in model layout (owned).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    pub text_len: usize,
    /// `[B, F, R, 2054]`; frames a clip does not have are zero with mask 0.
    pub object: Vec<f32>,
    /// `[B, F, R]`
    pub object_mask: Vec<f32>,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub clips: Vec<String>,
    /// Samples that failed to load and were skipped (`skip_bad_samples`), with the reason.
    pub skipped: Vec<String>,
}

impl Batch {
    pub fn as_ref(&self) -> BatchRef<'_> {
        BatchRef {
            batch: self.batch,
            frames: self.frames,
            regions: self.regions,
            text_len: self.text_len,
            object: &self.object,
            object_mask: &self.object_mask,
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
        }
    }
}

pub(crate) fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xD1B5_4A32_D192_ED03).rotate_left(29);
    // splitmix finaliser so nearby inputs give unrelated seeds
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The batches of one epoch. Each dataset is shuffled on its own and cut into batches
/// (a last batch of fewer than 2 samples is dropped: the contrastive loss needs negatives);
/// datasets then alternate batch by batch until all are used or `cap` samples are planned.
pub fn epoch_plan(sizes: &[usize], batch: usize, cap: Option<usize>, epoch_seed: u64) -> Vec<BatchSpec> {
    let per_ds: Vec<Vec<Vec<usize>>> = sizes
        .iter()
        .enumerate()
        .map(|(d, &n)| {
            let mut idx: Vec<usize> = (0..n).collect();
            Rng::new(mix(epoch_seed, 0xDA7A, d as u64)).shuffle(&mut idx);
            idx.chunks(batch).filter(|c| c.len() >= 2).map(|c| c.to_vec()).collect()
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
    /// Training: random caption, random frame in each segment, seeded per sample.
    Train { seed: u64 },
    /// Evaluation: first caption, middle frame of each segment.
    Eval,
}

/// Assemble one batch. Failing samples stop with an error naming the clip, unless `skip_bad`
/// (then they are left out and listed in `Batch::skipped`).
pub fn assemble(set: &TrainSet, indices: &[usize], shape: InputShape, tok: &Tokenizer, draw: Draw, skip_bad: bool) -> Result<Batch> {
    let (f, r, l) = (shape.frames, shape.regions, shape.text_len);
    type Loaded = (String, Vec<f32>, Vec<f32>, Vec<i64>, Vec<i64>);
    let loaded: Vec<Result<Loaded>> = indices
        .par_iter()
        .enumerate()
        .map(|(pos, &i)| {
            let s = set.samples.get(i).with_context(|| format!("{}: no sample {i}", set.name))?;
            if s.captions.is_empty() {
                bail!("{}: clip {} has no caption", set.name, s.clip);
            }
            let (caption, clip) = match draw {
                Draw::Train { seed } => {
                    let mut rng = Rng::new(mix(seed, pos as u64, i as u64));
                    let c = &s.captions[rng.below(s.captions.len())];
                    (c, select_clip(set.source.as_ref(), &s.clip, f, r, FrameChoice::Random(&mut rng)))
                }
                Draw::Eval => (&s.captions[0], select_clip(set.source.as_ref(), &s.clip, f, r, FrameChoice::Middle)),
            };
            let clip = clip.with_context(|| format!("{}: clip {} ({})", set.name, s.clip, set.source.describe()))?;
            let (ids, mask) = tok.encode(caption, l).with_context(|| format!("{}: tokenizing the caption of {}", set.name, s.clip))?;
            Ok((s.clip.clone(), clip.object, clip.mask, ids, mask))
        })
        .collect();
    let mut b = Batch { frames: f, regions: r, text_len: l, ..Default::default() };
    for item in loaded {
        match item {
            Ok((clip, object, mask, ids, am)) => {
                // k = min(F, V) frames came back; the rest stay zero with mask 0.
                b.object.extend_from_slice(&object);
                b.object.resize(b.object.len() + (f * r * TOKEN_DIM - object.len()), 0.0);
                b.object_mask.extend_from_slice(&mask);
                b.object_mask.resize(b.object_mask.len() + (f * r - mask.len()), 0.0);
                b.input_ids.extend_from_slice(&ids);
                b.attention_mask.extend_from_slice(&am);
                b.clips.push(clip);
                b.batch += 1;
            }
            Err(e) if skip_bad => b.skipped.push(format!("{e:#}")),
            Err(e) => return Err(e),
        }
    }
    Ok(b)
}

/// Assembles the batches of `plan[start..]` on a background thread, two ahead.
pub struct Prefetcher {
    rx: Receiver<(usize, Result<Batch>)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Prefetcher {
    /// `workers` > 0: assemble on a private pool of that many threads (else the global pool).
    /// Results do not depend on it.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        sets: Vec<TrainSet>,
        plan: Vec<BatchSpec>,
        start: usize,
        shape: InputShape,
        tok: Arc<Tokenizer>,
        epoch_seed: u64,
        skip_bad: bool,
        workers: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(2);
        let handle = std::thread::spawn(move || {
            let pool = (workers > 0).then(|| rayon::ThreadPoolBuilder::new().num_threads(workers).build()).and_then(Result::ok);
            for (i, spec) in plan.iter().enumerate().skip(start) {
                let seed = mix(epoch_seed, 0xBA7C, i as u64);
                let work = || assemble(&sets[spec.dataset], &spec.indices, shape, &tok, Draw::Train { seed }, skip_bad);
                let b = match &pool {
                    Some(p) => p.install(work),
                    None => work(),
                };
                if tx.send((i, b)).is_err() {
                    return; // consumer stopped early
                }
            }
        });
        Prefetcher { rx, handle: Some(handle) }
    }

    /// The next batch and its index in the plan; None when the plan is exhausted.
    pub fn next_batch(&mut self) -> Option<(usize, Result<Batch>)> {
        self.rx.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Unblock the producer (it exits on a closed channel), then wait for it.
        let (_, rx) = sync_channel(0);
        let old = std::mem::replace(&mut self.rx, rx);
        drop(old);
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
        let plan = epoch_plan(&[10, 4], 3, None, 5);
        // ds0: 3 full batches + [1] dropped; ds1: [3] + [1] dropped -> 0,1,0,0
        assert_eq!(plan.iter().map(|b| b.dataset).collect::<Vec<_>>(), vec![0, 1, 0, 0]);
        let mut seen: Vec<usize> = plan.iter().filter(|b| b.dataset == 0).flat_map(|b| b.indices.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        assert_eq!(epoch_plan(&[10, 4], 3, None, 5), plan);
        assert_ne!(epoch_plan(&[10, 4], 3, None, 6), plan);
        let capped = epoch_plan(&[10, 4], 3, Some(5), 5);
        assert_eq!(capped.len(), 2);
        assert_eq!(capped, plan[..2].to_vec());
    }
}
