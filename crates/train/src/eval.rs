//! Retrieval evaluation (SPEC §8): embed every test text and clip in batches, score
//! global + local similarity (blocked, with progress), and compute t2v / v2t metrics.
//!
//! Several captions per video are laid out caption-major (rows v·k … v·k+k−1 belong to
//! video v); videos with fewer than k captions get empty slots, embedded as empty text but
//! dropped from the metrics by the query mask.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use demovlp_data::batches::{assemble_videos, InputShape};
use demovlp_data::{FeatureSource, Sample};
use demovlp_model::backend::Backend;
use demovlp_model::Model;
use demovlp_retrieval::{retrieval_metrics, EmbeddingSet, RetrievalMetrics, ScoreMode};
use indicatif::{ProgressBar, ProgressStyle};

use crate::text::Tokenizer;

/// A test set: videos and k caption slots per video.
#[derive(Clone)]
pub struct EvalSet {
    pub name: String,
    pub videos: Vec<String>,
    /// `[videos · k]`, caption-major per video; None = missing caption.
    pub captions: Vec<Option<String>>,
    pub captions_per_video: usize,
    pub source: Arc<dyn FeatureSource>,
}

impl EvalSet {
    /// k = 1: the first caption of each sample (SPEC §4: "the first at test").
    /// k > 1: the first k captions of each sample, missing ones masked.
    pub fn from_samples(name: &str, samples: &[Sample], k: usize, source: Arc<dyn FeatureSource>) -> Result<EvalSet> {
        if samples.is_empty() {
            bail!("{name}: test set is empty");
        }
        let k = k.max(1);
        let mut captions = Vec::with_capacity(samples.len() * k);
        for s in samples {
            for j in 0..k {
                captions.push(s.captions.get(j).cloned());
            }
        }
        Ok(EvalSet { name: name.into(), videos: samples.iter().map(|s| s.clip.clone()).collect(), captions, captions_per_video: k, source })
    }

    pub fn query_mask(&self) -> Vec<bool> {
        self.captions.iter().map(Option::is_some).collect()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    pub shape: InputShape,
    pub batch_size: usize,
    pub lambda: f32,
    pub mode: ScoreMode,
    /// Add the local (region-word) similarity to the global one.
    pub use_local: bool,
    /// Local means over real positions only (must match the loss the model was trained with).
    pub masked_mean: bool,
    pub progress: bool,
}

pub struct EvalResult {
    pub metrics: RetrievalMetrics,
    /// `[texts, videos]`, rows = caption slots.
    pub sims: Vec<f32>,
    pub texts: usize,
    pub videos: usize,
    pub seconds: f64,
}

/// Without a terminal the bars draw nothing: one plain line per phase and every few seconds.
struct PlainProgress {
    on: bool,
    last: std::cell::Cell<Instant>,
}

impl PlainProgress {
    fn new(show: bool) -> Self {
        PlainProgress { on: show && !std::io::IsTerminal::is_terminal(&std::io::stderr()), last: std::cell::Cell::new(Instant::now()) }
    }

    fn tick(&self, what: &str, done: usize, total: usize) {
        if self.on && (done == total || self.last.get().elapsed().as_secs_f64() >= demovlp_data::plain_progress_interval()) {
            eprintln!("{what}: {done}/{total}");
            self.last.set(Instant::now());
        }
    }
}

fn bar(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}").unwrap().progress_chars("=> "));
    pb.set_prefix(what.to_string());
    pb
}

/// Embed, score and measure, all on the model's backend (the scores by
/// [`Backend::eval_scores`]: the CPU's blocked kernel, a GPU's pair kernels).
pub fn evaluate<B: Backend>(model: &mut Model<B>, set: &EvalSet, tok: &Tokenizer, opt: &EvalOptions) -> Result<EvalResult> {
    let t0 = Instant::now();
    let (nv, nt) = (set.videos.len(), set.captions.len());
    let (l, p) = (opt.shape.text_len, model.config.proj_dim);
    let n_loc = opt.shape.frames * opt.shape.regions;
    let bs = opt.batch_size.max(1);
    let plain = PlainProgress::new(opt.progress);

    // Videos: middle frame of each segment, through the video-only assembler.
    let (mut vg, mut vl, mut vm) = (Vec::with_capacity(nv * p), Vec::with_capacity(nv * n_loc * p), Vec::with_capacity(nv * n_loc));
    let pb = bar(opt.progress, nv, "embed clips");
    for clips in set.videos.chunks(bs) {
        let b = assemble_videos(&set.name, set.source.as_ref(), clips, opt.shape)?;
        let e = model.embed_video_inference(&b.object, &b.object_mask, b.batch, b.frames, b.regions);
        vg.extend_from_slice(&e.global);
        vl.extend_from_slice(&e.local);
        vm.extend_from_slice(&e.mask_additive);
        pb.inc(clips.len() as u64);
        plain.tick("embed clips", vm.len() / n_loc.max(1), nv);
    }
    pb.finish_and_clear();

    // Texts (missing captions embedded as empty text, masked out of the metrics).
    let (mut tg, mut tl, mut tm) = (Vec::with_capacity(nt * p), Vec::with_capacity(nt * (l - 1) * p), Vec::with_capacity(nt * (l - 1)));
    let pb = bar(opt.progress, nt, "embed texts");
    for chunk in set.captions.chunks(bs) {
        let mut ids = Vec::with_capacity(chunk.len() * l);
        let mut am = Vec::with_capacity(chunk.len() * l);
        for c in chunk {
            let (i, m) = tok.encode(c.as_deref().unwrap_or(""), l)?;
            ids.extend(i);
            am.extend(m);
        }
        let e = model.embed_text(&ids, &am, chunk.len(), l);
        tg.extend_from_slice(&e.global);
        tl.extend_from_slice(&e.local);
        tm.extend_from_slice(&e.mask_additive);
        pb.inc(chunk.len() as u64);
        plain.tick("embed texts", tg.len() / p.max(1), nt);
    }
    pb.finish_and_clear();

    let texts = EmbeddingSet { count: nt, len: l - 1, dim: p, global: &tg, local: &tl, mask_additive: &tm };
    let videos = EmbeddingSet { count: nv, len: n_loc, dim: p, global: &vg, local: &vl, mask_additive: &vm };
    let pb = bar(opt.progress && opt.use_local, nt, "score");
    let progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        plain.tick("score", done, total);
    };
    if opt.mode == ScoreMode::Reference && opt.use_local && nt != nv {
        bail!("{}: the published (reference) score combination needs as many texts as videos, got {nt} texts and {nv} videos", set.name);
    }
    let so = demovlp_retrieval::EvalOptions { lambda: opt.lambda, mode: opt.mode, use_local: opt.use_local, masked_mean: opt.masked_mean };
    let sims = model.backend().eval_scores(&texts, &videos, &so, &progress).map_err(|e| anyhow::anyhow!("evaluation scores: {e}"))?;
    pb.finish_and_clear();
    if let Some(i) = sims.iter().position(|x| !x.is_finite()) {
        let (t, v) = (i / nv, i % nv);
        bail!(
            "{}: the similarity of text {t} and video {v} ({}) is {}: the model's embeddings are not finite, no metrics computed",
            set.name,
            set.videos[v],
            sims[i]
        );
    }
    let mask = set.query_mask();
    let all = mask.iter().all(|&m| m);
    let metrics = retrieval_metrics(&sims, nt, nv, if all { None } else { Some(&mask) });
    Ok(EvalResult { metrics, sims, texts: nt, videos: nv, seconds: t0.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{CorpusConfig, SyntheticCorpus};

    #[test]
    fn several_captions_per_video_are_caption_major_and_missing_ones_masked() {
        let mut c = CorpusConfig::new(0);
        (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test) = (1, 1, 1, 1, 1);
        let src: Arc<dyn FeatureSource> = Arc::new(SyntheticCorpus::new(c));
        let s = |clip: &str, caps: &[&str]| Sample { clip: clip.into(), captions: caps.iter().map(|c| c.to_string()).collect() };
        let samples = [s("a", &["a0", "a1", "a2"]), s("b", &["b0"]), s("c", &["c0", "c1"])];
        let set = EvalSet::from_samples("t", &samples, 2, src.clone()).unwrap();
        assert_eq!(set.videos, ["a", "b", "c"]);
        let caps: Vec<Option<&str>> = set.captions.iter().map(|c| c.as_deref()).collect();
        assert_eq!(caps, [Some("a0"), Some("a1"), Some("b0"), None, Some("c0"), Some("c1")]);
        assert_eq!(set.query_mask(), [true, true, true, false, true, true]);
        let one = EvalSet::from_samples("t", &samples, 1, src).unwrap();
        assert_eq!(one.captions, [Some("a0".to_string()), Some("b0".into()), Some("c0".into())]);
    }
}
