//! Load + select throughput of a feature source (what `demovlp bench data` measures).

use std::time::Instant;

use anyhow::Result;
use demovlp_kernels::rng::Rng;

use crate::regions::{select_clip, FeatureSource, FrameChoice, FrameFile};

/// Writes a synthetic clip in the extractor's layout: `frames` deflated `.npz` files of
/// `regions` regions each (random features and boxes, distinct confidences).
pub fn write_synthetic_clip(root: &std::path::Path, clip: &str, frames: usize, regions: usize, seed: u64, compress: bool) -> Result<()> {
    let dir = root.join(clip);
    std::fs::create_dir_all(&dir)?;
    let mut rng = Rng::new(seed);
    for f in 0..frames {
        let n = regions;
        // Detector features are non-negative (post-ReLU pooling) and sparse-ish.
        let x: Vec<f32> = (0..n * 2048).map(|_| (rng.normal() * 0.8).max(0.0)).collect();
        let mut bbox = Vec::with_capacity(n * 4);
        for _ in 0..n {
            let (x1, y1) = (rng.uniform() * 500.0, rng.uniform() * 400.0);
            bbox.extend_from_slice(&[x1, y1, x1 + 1.0 + rng.uniform() * 139.0, y1 + 1.0 + rng.uniform() * 79.0]);
        }
        let mut conf: Vec<f32> = (0..n).map(|i| 0.2 + 0.79 * i as f32 / n as f32).collect();
        rng.shuffle(&mut conf);
        let ids: Vec<i64> = (0..n).map(|_| rng.below(1600) as i64).collect();
        let ff = FrameFile { x, bbox, conf, image_w: 640.0, image_h: 480.0, n };
        ff.write_with(&dir.join(format!("{f}.npz")), &format!("{clip}_{f}"), &ids, compress)?;
    }
    Ok(())
}

/// Clips per second selecting every clip of `clips` once with `threads` threads
/// (evaluation path: middle frames). One run; callers take medians.
pub fn clips_per_second(src: &dyn FeatureSource, clips: &[String], segments: usize, regions: usize, threads: usize) -> Result<f64> {
    let t = Instant::now();
    let per = clips.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = clips
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<()> {
                    for c in part {
                        let out = select_clip(src, c, segments, regions, FrameChoice::Middle)?;
                        std::hint::black_box(&out.object);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().expect("bench worker panicked")?;
        }
        Ok(())
    })?;
    Ok(clips.len() as f64 / t.elapsed().as_secs_f64())
}

/// Median of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}
