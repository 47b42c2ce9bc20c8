//! A deterministic synthetic corpus that behaves like detector output, for the built-in demo.
//!
//! World: object classes with fixed prototype 2048-d features (sparse, non-negative, like
//! ReLU-pooled Faster R-CNN features), colours as feature offsets, per-instance and
//! per-frame noise, a main object whose box moves across the frames (the caption's motion
//! words), an optional second, static object, and background clutter regions with low
//! detector confidence and features no caption names. Regions are stored in random order
//! with their confidences, so the loader's sort-by-confidence / top-R / edge padding all do
//! real work; some clips have few regions (padding) and some fewer frames (frame padding).
//! Captions come from English templates ("a red dog runs to the left past a blue car") and
//! go through the real WordPiece tokenizer.
//!
//! Everything is a pure function of the seed: clip specs are drawn from per-clip generators
//! and a frame's regions from a per-(clip, frame) generator, so any frame can be produced on
//! demand (the corpus never needs to sit in memory) and two runs see identical bytes.

use std::path::Path;

use anyhow::{bail, Context, Result};
use demovlp_data::regions::{FrameFile, FEAT_DIM};
use demovlp_data::{FeatureSource, Sample};
use demovlp_kernels::rng::Rng;
use rayon::prelude::*;

pub mod questions;
mod world;

pub use world::Motion;
use world::{caption, BACKGROUNDS, COLOURS, MOTIONS, OBJECTS};

/// Sizes of the corpus and its splits.
#[derive(Clone, Debug, PartialEq)]
pub struct CorpusConfig {
    pub seed: u64,
    pub feature_dim: usize,
    /// Frames stored per video clip (some clips have fewer).
    pub frames: usize,
    /// Most regions stored per frame.
    pub max_regions: usize,
    /// Pre-training: WebVid-like clips and CC3M-like single images.
    pub pretrain_videos: usize,
    pub pretrain_images: usize,
    /// Fine-tuning: MSR-VTT-like clips with several captions each, and held-out test clips.
    pub finetune_train: usize,
    /// Held out for per-epoch validation (best checkpoint, early stopping).
    pub val: usize,
    pub test: usize,
    pub captions_per_clip: usize,
}

impl CorpusConfig {
    /// The line the demos print about the corpus of a run with `seed`.
    pub fn describe(&self, seed: u64) -> String {
        format!(
            "synthetic corpus (seed {seed}): {} + {} pre-training clips/images, {} fine-tuning, {} validation, {} test clips",
            self.pretrain_videos, self.pretrain_images, self.finetune_train, self.val, self.test
        )
    }

    pub fn new(seed: u64) -> Self {
        CorpusConfig {
            seed,
            feature_dim: 2048,
            frames: 8,
            max_regions: 30,
            pretrain_videos: 2000,
            pretrain_images: 1000,
            finetune_train: 1500,
            val: 200,
            test: 500,
            captions_per_clip: 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    PretrainVideo,
    PretrainImage,
    FinetuneTrain,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 5] = [Split::PretrainVideo, Split::PretrainImage, Split::FinetuneTrain, Split::Val, Split::Test];

    /// Dataset name, also the first component of clip ids and the annotation file name.
    pub fn name(self) -> &'static str {
        match self {
            Split::PretrainVideo => "synth_webvid",
            Split::PretrainImage => "synth_cc3m",
            Split::FinetuneTrain => "synth_msrvtt_train",
            Split::Val => "synth_msrvtt_val",
            Split::Test => "synth_msrvtt_test",
        }
    }

    fn code(self) -> u64 {
        match self {
            Split::PretrainVideo => 1,
            Split::PretrainImage => 2,
            Split::FinetuneTrain => 3,
            Split::Test => 4,
            Split::Val => 5,
        }
    }
}

/// An object instance of a clip.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectSpec {
    pub class: usize,
    pub colour: usize,
    pub motion: Motion,
    /// Box centre at frame 0 and size, as fractions of the image.
    pub cx: f32,
    pub cy: f32,
    pub w: f32,
    pub h: f32,
    /// Detector boxes this object yields per frame (whole + parts).
    pub boxes: usize,
}

/// Everything that defines one clip; its frames are generated from it on demand.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipSpec {
    pub id: String,
    pub frames: usize,
    pub image_w: usize,
    pub image_h: usize,
    pub main: ObjectSpec,
    pub second: Option<ObjectSpec>,
    /// Clutter regions per frame.
    pub clutter: usize,
    pub captions: Vec<String>,
    seed: u64,
}

/// A sparse non-negative feature pattern: (dimension, value) pairs.
type Pattern = Vec<(usize, f32)>;

pub struct SyntheticCorpus {
    pub config: CorpusConfig,
    objects: Vec<Pattern>,
    colours: Vec<Pattern>,
    backgrounds: Vec<Pattern>,
    splits: Vec<(Split, Vec<ClipSpec>)>,
}

fn pattern(rng: &mut Rng, dim: usize, support: usize, lo: f32, hi: f32) -> Pattern {
    let mut dims: Vec<usize> = (0..dim).collect();
    rng.shuffle(&mut dims);
    let mut p: Pattern = dims[..support].iter().map(|&d| (d, lo + (hi - lo) * rng.uniform())).collect();
    p.sort_by_key(|&(d, _)| d);
    p
}

/// The corpus's own seed mixing for clip, instance and frame generators. It is not the
/// batch pipeline's `demovlp_data::batches::derive_seed` on purpose: every generated clip
/// (and so every recorded demo number) depends on this exact function.
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(17)
}

impl SyntheticCorpus {
    pub fn new(config: CorpusConfig) -> Self {
        let mut rng = Rng::new(config.seed);
        let d = config.feature_dim;
        let objects = (0..OBJECTS.len()).map(|_| pattern(&mut rng, d, 96, 1.0, 3.0)).collect();
        let colours = (0..COLOURS.len()).map(|_| pattern(&mut rng, d, 24, 1.0, 2.5)).collect();
        let backgrounds = (0..BACKGROUNDS).map(|_| pattern(&mut rng, d, 96, 0.5, 2.0)).collect();
        let mut corpus = SyntheticCorpus { config, objects, colours, backgrounds, splits: Vec::new() };
        for split in Split::ALL {
            let n = match split {
                Split::PretrainVideo => corpus.config.pretrain_videos,
                Split::PretrainImage => corpus.config.pretrain_images,
                Split::FinetuneTrain => corpus.config.finetune_train,
                Split::Val => corpus.config.val,
                Split::Test => corpus.config.test,
            };
            let clips = (0..n).map(|i| corpus.make_clip(split, i)).collect();
            corpus.splits.push((split, clips));
        }
        corpus
    }

    pub fn clips(&self, split: Split) -> &[ClipSpec] {
        &self.splits.iter().find(|(s, _)| *s == split).expect("every split is built").1
    }

    /// Look a clip up by id (`<split name>/<name>`).
    pub fn clip(&self, id: &str) -> Option<&ClipSpec> {
        let (split_name, rest) = id.split_once('/')?;
        let (_, clips) = self.splits.iter().find(|(s, _)| s.name() == split_name)?;
        let idx: usize = rest.get(1..)?.parse().ok()?;
        clips.get(idx).filter(|c| c.id == id)
    }

    fn make_clip(&self, split: Split, index: usize) -> ClipSpec {
        let cfg = &self.config;
        let seed = mix(cfg.seed, split.code(), index as u64 + 1);
        let mut rng = Rng::new(seed);
        let image = split == Split::PretrainImage;
        let frames = if image {
            1
        } else if rng.uniform() < 0.15 {
            // Some clips are short: exercises frame padding in the batch.
            3 + rng.below(cfg.frames.saturating_sub(3).max(1))
        } else {
            cfg.frames
        }
        .min(cfg.frames);
        let (image_w, image_h) = [(640, 480), (480, 360), (640, 360)][rng.below(3)];
        let motion = if image { Motion::Still } else { MOTIONS[rng.below(MOTIONS.len())] };
        let main = self.make_object(&mut rng, motion, frames, true);
        let second = if rng.uniform() < 0.75 { Some(self.make_object(&mut rng, Motion::Still, frames, false)) } else { None };
        // Most frames are busy; some are nearly empty (padding up to R regions).
        let clutter = if rng.uniform() < 0.3 { rng.below(5) } else { 8 + rng.below(cfg.max_regions.saturating_sub(12).max(1)) };
        let objects = main.boxes + second.as_ref().map_or(0, |s| s.boxes);
        let clutter = clutter.min(cfg.max_regions.saturating_sub(objects));
        let n_captions = if matches!(split, Split::FinetuneTrain | Split::Val | Split::Test) { cfg.captions_per_clip.max(1) } else { 1 };
        let captions = (0..n_captions).map(|k| caption(&mut rng, &main, second.as_ref(), image, k)).collect();
        let prefix = if image { 'i' } else { 'v' };
        ClipSpec { id: format!("{}/{prefix}{index:06}", split.name()), frames, image_w, image_h, main, second, clutter, captions, seed }
    }

    fn make_object(&self, rng: &mut Rng, motion: Motion, frames: usize, main: bool) -> ObjectSpec {
        let class = rng.below(OBJECTS.len());
        let colour = rng.below(COLOURS.len());
        let (w, h) = if main {
            (0.2 + 0.15 * rng.uniform(), 0.2 + 0.2 * rng.uniform())
        } else {
            (0.1 + 0.15 * rng.uniform(), 0.1 + 0.15 * rng.uniform())
        };
        // Start where the whole trajectory stays inside the image.
        let (vx, vy) = motion.velocity();
        let span_x = vx * (frames.saturating_sub(1)) as f32;
        let span_y = vy * (frames.saturating_sub(1)) as f32;
        let place = |rng: &mut Rng, half: f32, span: f32| {
            let lo = half - span.min(0.0);
            let hi = (1.0 - half - span.max(0.0)).max(lo);
            lo + (hi - lo) * rng.uniform()
        };
        let cx = place(rng, w / 2.0, span_x);
        let cy = place(rng, h / 2.0, span_y);
        let boxes = if main { 1 + rng.below(3) } else { 1 + rng.below(2) };
        ObjectSpec { class, colour, motion, cx, cy, w, h, boxes }
    }

    /// The detector output of one frame of a clip (SPEC §2: regions in detector order, not
    /// sorted), as the data crate's in-memory frame, and the class id of each region (the
    /// extractor's `info['objects_id']`).
    pub fn frame(&self, clip: &ClipSpec, frame: usize) -> (FrameFile, Vec<i64>) {
        assert!(frame < clip.frames, "clip {} has {} frames, asked for {frame}", clip.id, clip.frames);
        let d = self.config.feature_dim;
        let mut rng = Rng::new(mix(clip.seed, 0xF4A3E, frame as u64 + 1));
        let (iw, ih) = (clip.image_w as f32, clip.image_h as f32);
        let mut regions: Vec<(Vec<f32>, [f32; 4], f32, i64)> = Vec::new();
        for (k, obj) in std::iter::once(&clip.main).chain(clip.second.as_ref()).enumerate() {
            // Per-instance appearance: the same for every frame of the clip.
            let mut inst = Rng::new(mix(clip.seed, 0x1257, k as u64 + 1));
            let mut base = vec![0.0f32; d];
            for &(i, v) in &self.objects[obj.class] {
                base[i] += v + 0.3 * inst.normal();
            }
            for &(i, v) in &self.colours[obj.colour] {
                base[i] += v + 0.2 * inst.normal();
            }
            let (vx, vy) = obj.motion.velocity();
            let cx = obj.cx + vx * frame as f32;
            let cy = obj.cy + vy * frame as f32;
            for b in 0..obj.boxes {
                // Box 0 is the whole object; others are parts (smaller, shifted, weaker features).
                let (s, dx, dy) = if b == 0 {
                    (1.0, 0.0, 0.0)
                } else {
                    (0.5 + 0.2 * rng.uniform(), 0.2 * (rng.uniform() - 0.5), 0.2 * (rng.uniform() - 0.5))
                };
                let w = obj.w * s;
                let h = obj.h * s;
                let x0 = cx + dx * obj.w + 0.01 * rng.normal();
                let y0 = cy + dy * obj.h + 0.01 * rng.normal();
                let bx = [
                    ((x0 - w / 2.0) * iw).clamp(0.0, iw - 1.0),
                    ((y0 - h / 2.0) * ih).clamp(0.0, ih - 1.0),
                    ((x0 + w / 2.0) * iw).clamp(1.0, iw),
                    ((y0 + h / 2.0) * ih).clamp(1.0, ih),
                ];
                let scale = if b == 0 { 1.0 } else { 0.7 };
                let mut x: Vec<f32> = base.iter().map(|&v| v * scale).collect();
                self.add_frame_noise(&mut rng, &mut x);
                let conf = if k == 0 { 0.6 + 0.39 * rng.uniform() } else { 0.5 + 0.45 * rng.uniform() };
                regions.push((x, bx, conf, obj.class as i64));
            }
        }
        for _ in 0..clip.clutter {
            let bg = rng.below(BACKGROUNDS);
            let mut x = vec![0.0f32; d];
            for &(i, v) in &self.backgrounds[bg] {
                x[i] = v * (0.5 + rng.uniform());
            }
            self.add_frame_noise(&mut rng, &mut x);
            let (w, h) = (0.05 + 0.4 * rng.uniform(), 0.05 + 0.4 * rng.uniform());
            let (x0, y0) = ((1.0 - w) * rng.uniform(), (1.0 - h) * rng.uniform());
            let bx = [x0 * iw, y0 * ih, (x0 + w) * iw, (y0 + h) * ih];
            regions.push((x, bx, 0.02 + 0.43 * rng.uniform(), 1000 + bg as i64));
        }
        // Detector order is not confidence order.
        rng.shuffle(&mut regions);
        let n = regions.len();
        let mut out = FrameFile {
            x: Vec::with_capacity(n * d),
            bbox: Vec::with_capacity(n * 4),
            conf: Vec::with_capacity(n),
            n,
            image_w: clip.image_w as f32,
            image_h: clip.image_h as f32,
        };
        let mut objects_id = Vec::with_capacity(n);
        for (x, b, c, id) in regions {
            out.x.extend_from_slice(&x);
            out.bbox.extend_from_slice(&b);
            out.conf.push(c);
            objects_id.push(id);
        }
        (out, objects_id)
    }

    /// Per-frame noise on the active dimensions plus a few spurious activations, then ReLU.
    fn add_frame_noise(&self, rng: &mut Rng, x: &mut [f32]) {
        for v in x.iter_mut() {
            if *v != 0.0 {
                *v += 0.25 * rng.normal();
            }
        }
        for _ in 0..16 {
            let i = rng.below(x.len());
            x[i] += rng.uniform();
        }
        for v in x.iter_mut() {
            *v = v.max(0.0);
        }
    }
}

impl SyntheticCorpus {
    /// The samples (clip + captions) of a split, in clip order.
    pub fn samples(&self, split: Split) -> Vec<Sample> {
        self.clips(split).iter().map(|c| Sample { clip: c.id.clone(), captions: c.captions.clone() }).collect()
    }

    fn lookup(&self, clip: &str) -> Result<&ClipSpec> {
        self.clip(clip).with_context(|| format!("synthetic corpus (seed {}): no clip {clip:?}", self.config.seed))
    }

    /// Bytes of region features (`x`) the written corpus holds, roughly its size on disk.
    pub fn feature_bytes(&self) -> u64 {
        Split::ALL
            .iter()
            .flat_map(|&s| self.clips(s))
            .map(|c| {
                let regions = c.main.boxes + c.second.as_ref().map_or(0, |s| s.boxes) + c.clutter;
                (c.frames * regions * self.config.feature_dim * 4) as u64
            })
            .sum()
    }

    /// Write the corpus in the extractor's layout — `<root>/features/<clip>/<i>.npz` with
    /// `x`, `bbox`, `num_bbox`, `image_h`, `image_w` and the pickled `info` dict — and one
    /// JSONL annotation file per split, `<root>/annotations/<split>.jsonl`
    /// (`{"clip": ..., "captions": [...]}` per line). `progress(done, total)` counts clips.
    pub fn write(&self, root: &Path, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<()> {
        let features = root.join("features");
        let ann = root.join("annotations");
        std::fs::create_dir_all(&ann).with_context(|| format!("creating {}", ann.display()))?;
        let all: Vec<&ClipSpec> = Split::ALL.iter().flat_map(|&s| self.clips(s)).collect();
        let done = std::sync::atomic::AtomicUsize::new(0);
        all.par_iter().try_for_each(|clip| -> Result<()> {
            let dir = features.join(&clip.id);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in 0..clip.frames {
                self.write_frame(clip, f, &dir.join(format!("{f}.npz")))?;
            }
            progress(done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1, all.len());
            Ok(())
        })?;
        for split in Split::ALL {
            let mut text = String::new();
            for c in self.clips(split) {
                text += &serde_json::json!({"clip": c.id, "captions": c.captions}).to_string();
                text.push('\n');
            }
            let p = ann.join(format!("{}.jsonl", split.name()));
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }

    /// One frame in the extractor's layout, through the data crate's writer (the same one
    /// its tests use), so the demo's files are exactly what the real reader expects.
    fn write_frame(&self, clip: &ClipSpec, frame: usize, path: &Path) -> Result<()> {
        let (f, objects_id) = self.frame(clip, frame);
        let image_id = format!("{}_{frame}", clip.id.replace('/', "_"));
        f.write(path, &image_id, &objects_id).with_context(|| format!("writing {}", path.display()))
    }
}

/// The corpus is its own feature source: frames are generated on demand, then selected
/// exactly as frames read from `.npz` files are (sort by confidence, top-R, edge padding).
impl FeatureSource for SyntheticCorpus {
    fn describe(&self) -> String {
        format!("synthetic corpus (seed {})", self.config.seed)
    }

    fn frame_count(&self, clip: &str) -> Result<usize> {
        Ok(self.lookup(clip)?.frames)
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
        let spec = self.lookup(clip)?;
        if frame >= spec.frames {
            bail!("synthetic clip {clip}: frame {frame} of {}", spec.frames);
        }
        if self.config.feature_dim != FEAT_DIM {
            bail!("synthetic corpus: feature_dim {} but region tokens need {FEAT_DIM}", self.config.feature_dim);
        }
        self.frame(spec, frame).0.fill_regions(regions, object, mask, rows);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> SyntheticCorpus {
        let mut c = CorpusConfig::new(seed);
        c.pretrain_videos = 30;
        c.pretrain_images = 10;
        c.finetune_train = 20;
        c.val = 5;
        c.test = 20;
        SyntheticCorpus::new(c)
    }

    #[test]
    fn deterministic_from_seed() {
        let (a, b, c) = (small(7), small(7), small(8));
        for split in Split::ALL {
            assert_eq!(a.clips(split), b.clips(split));
        }
        let clip = &a.clips(Split::Test)[3];
        assert_eq!(a.frame(clip, 2), b.frame(&b.clips(Split::Test)[3], 2));
        assert_ne!(a.clips(Split::Test)[3].captions, c.clips(Split::Test)[3].captions);
        // Frames of one clip differ (noise, motion) but frames are reproducible in any order.
        let f5 = a.frame(clip, 5);
        let _ = a.frame(clip, 0);
        assert_eq!(a.frame(clip, 5), f5);
        assert_ne!(a.frame(clip, 4), f5);
    }

    #[test]
    fn frames_look_like_detector_output() {
        let corpus = small(1);
        let mut few_regions = 0;
        let mut short = 0;
        for clip in corpus.clips(Split::PretrainVideo).iter().chain(corpus.clips(Split::Test)) {
            assert!(clip.frames >= 1 && clip.frames <= 8);
            short += (clip.frames < 8) as usize;
            let (f, objects_id) = corpus.frame(clip, clip.frames - 1);
            assert!(f.n >= 1 && f.n <= 30, "{}", f.n);
            few_regions += (f.n < 10) as usize;
            assert_eq!(f.x.len(), f.n * 2048);
            assert!(f.x.iter().all(|v| v.is_finite() && *v >= 0.0));
            for b in f.bbox.chunks(4) {
                assert!(b[0] < b[2] && b[1] < b[3] && b[2] <= f.image_w && b[3] <= f.image_h, "{b:?}");
            }
            // The named objects are the confident detections.
            let top = f.conf.iter().cloned().fold(0.0, f32::max);
            let top_id = objects_id[f.conf.iter().position(|&c| c == top).unwrap()];
            assert!(top >= 0.45 && top_id < 1000);
        }
        assert!(few_regions > 0 && short > 0, "padding paths must be exercised: {few_regions} {short}");
    }

    #[test]
    fn boxes_move_as_the_caption_says() {
        let corpus = small(3);
        for clip in corpus.clips(Split::Test).iter().filter(|c| c.frames >= 4 && c.second.as_ref().is_none_or(|s| s.class != c.main.class))
        {
            let centre = |f: usize| {
                let (fr, ids) = corpus.frame(clip, f);
                // Main object's whole box = the detection with its class, first part scale 1.
                let idx = (0..fr.n)
                    .filter(|&i| ids[i] == clip.main.class as i64)
                    .max_by(|&a, &b| {
                        let area = |i: usize| (fr.bbox[4 * i + 2] - fr.bbox[4 * i]) * (fr.bbox[4 * i + 3] - fr.bbox[4 * i + 1]);
                        area(a).total_cmp(&area(b))
                    })
                    .unwrap();
                let b = &fr.bbox[4 * idx..4 * idx + 4];
                ((b[0] + b[2]) / 2.0 / fr.image_w, (b[1] + b[3]) / 2.0 / fr.image_h)
            };
            let (a, b) = (centre(0), centre(clip.frames - 1));
            let cap = &clip.captions[0];
            match clip.main.motion {
                Motion::Left => assert!(b.0 < a.0 - 0.1 && cap.contains("left"), "{cap} {a:?} {b:?}"),
                Motion::Right => assert!(b.0 > a.0 + 0.1 && cap.contains("right"), "{cap}"),
                Motion::Up => assert!(b.1 < a.1 - 0.1 && cap.contains("up"), "{cap}"),
                Motion::Down => assert!(b.1 > a.1 + 0.1 && cap.contains("down"), "{cap}"),
                Motion::Still => assert!((b.0 - a.0).abs() < 0.1 && (b.1 - a.1).abs() < 0.1, "{cap}"),
            }
            assert!(cap.contains(COLOURS[clip.main.colour]) && cap.contains(OBJECTS[clip.main.class].0), "{cap}");
        }
    }

    #[test]
    fn written_corpus_reads_back_identically() {
        use demovlp_data::{select_clip, FrameChoice, NpzTree};
        let mut c = CorpusConfig::new(11);
        (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test) = (3, 2, 2, 1, 2);
        let corpus = SyntheticCorpus::new(c);
        let dir = std::env::temp_dir().join(format!("demovlp-synth-{}", std::process::id()));
        corpus.write(&dir, &|_, _| {}).unwrap();
        let tree = NpzTree::new(dir.join("features"));
        for split in Split::ALL {
            for clip in corpus.clips(split) {
                for (segs, regs) in [(8, 30), (4, 10), (1, 5)] {
                    let a = select_clip(&corpus, &clip.id, segs, regs, FrameChoice::Middle).unwrap();
                    let b = select_clip(&tree, &clip.id, segs, regs, FrameChoice::Middle).unwrap();
                    assert_eq!((a.frame_indices, a.object, a.mask), (b.frame_indices, b.object, b.mask), "{}", clip.id);
                }
            }
            let lines = std::fs::read_to_string(dir.join("annotations").join(format!("{}.jsonl", split.name()))).unwrap();
            assert_eq!(lines.lines().count(), corpus.clips(split).len());
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn lookup_by_id() {
        let corpus = small(2);
        let c = &corpus.clips(Split::FinetuneTrain)[7];
        assert_eq!(corpus.clip(&c.id), Some(c));
        assert_eq!(corpus.clip("synth_msrvtt_train/v999999"), None);
        assert_eq!(c.captions.len(), 3);
    }
}
