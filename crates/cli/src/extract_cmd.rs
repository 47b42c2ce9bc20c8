//! `demovlp extract` (region features from videos or images) and `demovlp bench extract`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use demovlp_extract::detector::DetectorConfig;
use demovlp_extract::packed::extract_packed;
use demovlp_extract::run::{extract as run_extract, ExtractOptions, Source, Summary};
use demovlp_extract::{load_weights, Detector, DetectorWeights};
use demovlp_model::{Backend, Cpu};

use crate::device::{check_available, with_backend, DeviceArgs, OnBackend};

pub const EXTRACT_HELP: &str = "Runs the bottom-up-attention detector (the Caffe-converted ResNet-101 C4 Faster R-CNN of \
MILVLG/bottom-up-attention.pytorch, Visual Genome 1600 objects / 400 attributes) on the uniformly sampled frames of \
every video (the middle frame of each of --frames equal segments) or on every still image, and writes \
<out>/<clip>/<i>.npz in the layout that extractor writes and DemoVLP's loaders read: x [N,2048] f32, bbox [N,4] \
(the RPN proposal boxes, in frame pixels), num_bbox, image_h, image_w, info (pickled dict: image_id, image_h, \
image_w, num_boxes, objects_id, objects_conf, attrs_id, attrs_conf). <clip> is the file's path relative to the \
folder, without its extension.

Needs the `ffmpeg` program at run time (Debian/Ubuntu: apt-get install ffmpeg) to decode any format it reads \
(mp4, webm, avi, mkv, gif, png, jpg, ...). Weights: the extractor's published .pth \
(bua-caffe-frcn-r101_with_attributes.pth; zip or legacy torch.save format) or a safetensors file with the same names.

--packed writes the packed store `demovlp pack` would make of that tree (f32 features, at most --max-boxes \
regions per frame) at --out instead: the same bytes as `extract` then `pack`. Its .npz files are staged in \
<out>/.extract-npz/ until every clip is done, then packed and removed; thumbnails land in <out>/<clip>/<i>.jpg.

--device cuda runs the detector's convolutions, linear layers, ReLUs and residual adds on the GPU (im2col, max \
pool, RoIPool, proposals and NMS stay on the host, with transfers in between).

Resumable: each clip is written to a temporary folder and renamed into place when complete; a rerun skips clips \
already there. A file that cannot be decoded stops the run with its name, or with --skip-bad is counted and skipped. \
Progress (frames/s, ETA) goes to stderr; --json prints a one-line summary on stdout.

Cost: the published model does about 2 TFLOP per frame at the default scale (90% in res5 over 300 proposals); \
see docs/extract.md for what that means per hour of video.";

#[derive(Args)]
pub struct ExtractArgs {
    /// Folder of videos (searched recursively), or a text file listing video paths one per line.
    #[arg(long, conflicts_with = "images", required_unless_present = "images")]
    pub videos: Option<PathBuf>,
    /// Folder of still images (png, jpg; recursively): one frame each, written as <image>/0.npz.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Detector weights: the published .pth (either torch.save format) or .safetensors.
    #[arg(long)]
    pub weights: PathBuf,
    /// Output folder of clip features.
    #[arg(long)]
    pub out: PathBuf,
    /// Frames sampled per video (the middle frame of each of N equal segments).
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Target short side of the resized frame.
    #[arg(long, default_value_t = 600)]
    pub scale: usize,
    /// Longest side allowed after resizing.
    #[arg(long, default_value_t = 1000)]
    pub max_size: usize,
    /// Region proposals kept after the RPN's NMS (post-NMS top N).
    #[arg(long, default_value_t = 300)]
    pub proposals: usize,
    /// Proposals considered before the RPN's NMS (pre-NMS top N).
    #[arg(long, default_value_t = 6000)]
    pub pre_nms: usize,
    /// Fewest regions kept per frame.
    #[arg(long, default_value_t = 10)]
    pub min_boxes: usize,
    /// Most regions kept per frame.
    #[arg(long, default_value_t = 100)]
    pub max_boxes: usize,
    /// Class confidence a region needs to be kept (between --min-boxes and --max-boxes).
    #[arg(long, default_value_t = 0.2)]
    pub conf: f32,
    /// Count files ffmpeg cannot decode and go on (they are listed in the summary).
    #[arg(long)]
    pub skip_bad: bool,
    /// Keep each sampled frame as <i>.jpg (at most 320 pixels wide) beside its .npz, as
    /// `explain --images` and `serve --images` read them (they draw the regions on it).
    #[arg(long)]
    pub thumbnails: bool,
    /// Write a packed store at --out (as `demovlp pack --all` makes of the .npz tree) instead
    /// of the .npz tree.
    #[arg(long)]
    pub packed: bool,
    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl ExtractArgs {
    fn config(&self) -> Result<DetectorConfig> {
        if self.frames == 0 || self.scale == 0 || self.max_size == 0 || self.proposals == 0 || self.pre_nms == 0 {
            bail!("--frames, --scale, --max-size, --proposals and --pre-nms must be at least 1");
        }
        if self.min_boxes > self.max_boxes {
            bail!("--min-boxes {} is above --max-boxes {}", self.min_boxes, self.max_boxes);
        }
        let mut c = DetectorConfig { scale: self.scale, max_size: self.max_size, ..Default::default() };
        c.rpn.post_nms = self.proposals;
        c.rpn.pre_nms = self.pre_nms;
        c.select.min_boxes = self.min_boxes;
        c.select.max_boxes = self.max_boxes;
        c.select.conf = self.conf;
        Ok(c)
    }
}

pub fn extract(a: ExtractArgs) -> Result<()> {
    let cfg = a.config()?;
    check_available(&a.device)?;
    let w = load_weights(&a.weights)?;
    if !a.json {
        eprintln!("extract: {} ({})", a.weights.display(), w.arch.describe());
    }
    if !w.unused.is_empty() {
        eprintln!("extract: {} weight(s) in the file are not used: {}", w.unused.len(), w.unused.join(", "));
    }
    let device = a.device.clone();
    with_backend(&device, ExtractJob { a, w, cfg })
}

/// An extraction on whichever backend `--device` opened.
struct ExtractJob {
    a: ExtractArgs,
    w: DetectorWeights,
    cfg: DetectorConfig,
}

impl OnBackend for ExtractJob {
    type Out = ();
    fn run<B: Backend>(self, be: &B, device: &str) -> Result<()> {
        let ExtractJob { a, w, cfg } = self;
        if !a.json && device != "cpu" {
            eprintln!("extract: detector on {device}");
        }
        let det = Detector::new(be.clone(), &w, cfg);
        drop(w);
        let src = match (&a.videos, &a.images) {
            (Some(v), None) => Source::Videos(v.clone()),
            (None, Some(i)) => Source::Images(i.clone()),
            _ => bail!("give one of --videos DIR and --images DIR"),
        };
        let opt = ExtractOptions { frames: a.frames, skip_bad: a.skip_bad, thumbnails: a.thumbnails, progress: true };
        let (s, store) = if a.packed {
            let (s, p) = extract_packed(&det, &src, &a.out, &opt, cfg.select.max_boxes)?;
            (s, Some(p))
        } else {
            (run_extract(&det, &src, &a.out, &opt)?, None)
        };
        report(&a, &s, store.as_ref(), device);
        Ok(())
    }
}

fn report(a: &ExtractArgs, s: &Summary, store: Option<&demovlp_data::pack::PackSummary>, device: &str) {
    if a.json {
        let mut j = s.to_json();
        j["out"] = a.out.display().to_string().into();
        j["device"] = device.into();
        if let Some(p) = store {
            j["packed"] = serde_json::json!({"clips": p.clips, "frames": p.frames, "regions": p.regions, "bytes": p.bytes});
        }
        println!("{j}");
        return;
    }
    eprintln!(
        "extract: {} clips: {} extracted, {} already there, {} skipped as undecodable; {} frames, {} regions in {:.1}s -> {}",
        s.clips,
        s.extracted,
        s.skipped_existing,
        s.skipped_bad,
        s.frames,
        s.regions,
        s.seconds,
        a.out.display()
    );
    if let Some(p) = store {
        eprintln!(
            "extract: packed store of {} clips, {} frames, {} regions, {:.1} MiB",
            p.clips,
            p.frames,
            p.regions,
            p.bytes as f64 / (1 << 20) as f64
        );
    }
}

#[derive(Args)]
pub struct BenchExtractArgs {
    /// Timed frames (after one warm-up frame).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Frame height and width (a 480x640 frame becomes a 600x800 blob at the default scale).
    #[arg(long, default_value_t = 480)]
    pub height: usize,
    #[arg(long, default_value_t = 640)]
    pub width: usize,
    /// Run the reduced model of the test fixture instead of the published sizes (quick check).
    #[arg(long)]
    pub tiny: bool,
    /// Print only one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    /// The PyTorch side (`bench/extract_pytorch.py`, the same network in PyTorch, checked against
    /// the fixtures with its `--check`): `auto` runs it when python3 can import torch.
    #[command(flatten)]
    pub baseline: crate::bench_pytorch::BaselineArgs,
    /// Off the CPU, the same frame also runs once on the CPU and the JSON line gets `vs_cpu`
    /// (the largest feature difference relative to the largest feature, and whether the
    /// proposals and selected regions agree).
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Seconds per frame of the published network's sizes (seeded random weights, so no
/// download is needed; the cost does not depend on the values) at the default settings,
/// with the RPN's NMS off so that res5 runs on all 300 proposals, as with trained weights.
pub fn bench_extract(a: BenchExtractArgs) -> Result<()> {
    use demovlp_extract::synth::random_state_dict;
    use demovlp_extract::weights::Arch;
    anyhow::ensure!(a.runs >= 1 && a.height >= 1 && a.width >= 1, "need --runs, --height and --width ≥ 1");
    check_available(&a.device)?;
    let arch = if a.tiny { Arch::fixture_tiny() } else { Arch::published() };
    let w = demovlp_extract::weights::from_tensors(random_state_dict(&arch, 1))?;
    // A smooth synthetic frame (gradients and a checkerboard), the same every run.
    let (h, wd) = (a.height, a.width);
    let bgr: Vec<u8> = (0..h * wd * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            let (y, x) = (p / wd, p % wd);
            ((x * 255 / wd + y * 128 / h + c * 40 + ((x / 32 + y / 32) % 2) * 60) % 256) as u8
        })
        .collect();
    let frame = demovlp_extract::Frame { h, w: wd, bgr };
    let device = a.device.clone();
    with_backend(&device, BenchJob { a, w, frame })
}

struct BenchJob {
    a: BenchExtractArgs,
    w: DetectorWeights,
    frame: demovlp_extract::Frame,
}

/// The bench's settings: the defaults, with the RPN's NMS off. Random weights propose
/// near-copies of the anchors, which the RPN's NMS thins to far fewer than the 300 proposals
/// a trained model keeps; without that NMS (milliseconds of the frame) res5 runs on the
/// full 300, the default cost.
fn bench_config() -> DetectorConfig {
    let mut cfg = DetectorConfig::default();
    cfg.rpn.nms = 1.01;
    cfg
}

/// How far a device's frame is from the CPU's: the largest feature difference relative to the
/// largest feature, and whether both kept the same proposals and selected the same regions.
fn compare_with_cpu(w: &DetectorWeights, frame: &demovlp_extract::Frame, t: &demovlp_extract::Trace) -> serde_json::Value {
    let c = Detector::new(Cpu, w, bench_config()).trace(frame);
    let scale = c.x.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let x_rel =
        if c.x.len() == t.x.len() { c.x.iter().zip(&t.x).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale } else { f32::INFINITY };
    let cls_abs = c.cls_prob.iter().zip(&t.cls_prob).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    serde_json::json!({
        "x_max_rel_diff": x_rel,
        "cls_prob_max_abs_diff": cls_abs,
        "same_proposal_count": c.proposals.boxes.len() == t.proposals.boxes.len(),
        "same_selection": c.selected == t.selected,
    })
}

impl OnBackend for BenchJob {
    type Out = ();
    fn run<B: Backend>(self, be: &B, device: &str) -> Result<()> {
        let BenchJob { a, w, frame } = self;
        let det = Detector::new(be.clone(), &w, bench_config());
        let (h, wd) = (frame.h, frame.w);
        let threads = rayon::current_num_threads();
        if !a.json {
            eprintln!(
                "bench extract: {} on {device} ({threads} threads), frame {h}x{wd}, {} timed runs after a warm-up",
                w.arch.describe(),
                a.runs
            );
        }
        let mut times = Vec::with_capacity(a.runs);
        let (mut regions, mut proposals, mut blob, mut last) = (0, 0, (0, 0), None);
        for i in 0..=a.runs {
            let t0 = Instant::now();
            let t = det.trace(&frame);
            let dt = t0.elapsed().as_secs_f64();
            (regions, proposals, blob) = (t.regions.len(), t.proposals.boxes.len(), (t.blob.h, t.blob.w));
            if i > 0 {
                times.push(dt);
            }
            if !a.json {
                eprintln!("  run {i}{}: {dt:.3}s, {proposals} proposals, {regions} regions", if i == 0 { " (warm-up)" } else { "" });
            }
            last = Some(t);
        }
        // Off the CPU, the same frame on the CPU: how far the device's results are.
        let vs_cpu = (device != "cpu").then(|| compare_with_cpu(&w, &frame, last.as_ref().expect("one run at least")));
        if let (Some(v), false) = (&vs_cpu, a.json) {
            eprintln!("  vs the CPU: {v}");
        }
        drop(last);
        let (median, min, max) = crate::measure::median_min_max(times);
        let (backbone, res5) = det.flops(blob.0, blob.1, proposals);
        let gflop = (backbone + res5) * 1e-9;
        if !a.json {
            eprintln!(
                "  {gflop:.0} GFLOP per frame ({:.0} backbone + RPN, {:.0} res5 + heads over {proposals} proposals): {:.1} GFLOP/s",
                backbone * 1e-9,
                res5 * 1e-9,
                gflop / median
            );
        }
        let rust_peak = crate::measure::peak_rss_mb();
        let mut j = serde_json::json!({
            "bench": "extract",
            "model": if a.tiny { "tiny" } else { "published" },
            "frame": [h, wd],
            "threads": threads,
            "runs": a.runs,
            "frame_s": median,
            "frame_s_min": min,
            "frame_s_max": max,
            "regions": regions,
            "proposals": proposals,
            "blob": [blob.0, blob.1],
            "gflop_per_frame": gflop,
            "gflop_per_s": gflop / median,
            "peak_rss_mb": rust_peak,
            "device": device,
        });
        if let Some(v) = vs_cpu {
            j["vs_cpu"] = v;
        }
        if a.tiny || device != "cpu" {
            if a.baseline.pytorch == crate::bench_pytorch::Baseline::Always {
                bail!("--tiny and --device cuda have no PyTorch counterpart (its side times the published sizes on the CPU)");
            }
        } else {
            let mode = ["--bench", "--runs", &a.runs.to_string(), "--height", &h.to_string(), "--width", &wd.to_string()].map(String::from);
            if let Some(t) = crate::bench_pytorch::run_script(&a.baseline, "extract_pytorch.py", &mode)? {
                let t_med = crate::bench_pytorch::number(&t, "median_s")?;
                let t_peak = crate::bench_pytorch::number(&t, "peak_rss_mb")?;
                if !a.json {
                    eprintln!(
                    "  side by side (same run): demovlp {median:.3} s/frame, peak {rust_peak:.0} MB | PyTorch {t_med:.3} s/frame, peak {t_peak:.0} MB: time ratio {:.3}x",
                    median / t_med
                );
                }
                j["pytorch_frame_s"] = t_med.into();
                j["pytorch_peak_rss_mb"] = t_peak.into();
                j["pytorch_threads"] = t.get("threads").cloned().unwrap_or_default();
                j["time_ratio_vs_pytorch"] = (median / t_med).into();
            }
        }
        println!("{j}");
        Ok(())
    }
}
