//! Retrieval metrics (SPEC §8), computed the way the published evaluation does.
//!
//! Layout: `sims` is [texts, videos] (rows = text queries) with k = texts / videos
//! captions per video laid out caption-major per video: rows v·k … v·k + k − 1 belong to
//! video v. A query mask `[texts]` marks which caption slots exist.
//! - text → video: the rank of a query's own video among all videos, ties broken
//!   optimistically (rank = number of strictly higher scores); masked queries dropped.
//! - video → text: for each video, over its present captions, the rank of the caption
//!   among all present captions of the row with ties averaged (missing captions count as
//!   infinitely far); the best (smallest) of those ranks.
//!
//! Ranks are 0-based; R@K = 100·share of ranks < K (R@1: rank exactly 0); MedR and MeanR
//! add 1; the geometric mean of R@1, R@5, R@10 is exp(mean(log)) (0 if any is 0).

use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DirectionMetrics {
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
    pub r50: f64,
    pub medr: f64,
    pub meanr: f64,
    pub geometric_mean_r1_r5_r10: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RetrievalMetrics {
    pub t2v: DirectionMetrics,
    pub v2t: DirectionMetrics,
}

impl DirectionMetrics {
    /// From 0-based ranks (possibly fractional under averaged ties, ∞ for a video whose
    /// captions are all missing).
    pub fn from_ranks(ranks: &[f64]) -> Self {
        let nq = ranks.len() as f64;
        let share = |pred: &dyn Fn(f64) -> bool| 100.0 * ranks.iter().filter(|&&r| pred(r)).count() as f64 / nq;
        let (r1, r5, r10, r50) = (share(&|r| r == 0.0), share(&|r| r < 5.0), share(&|r| r < 10.0), share(&|r| r < 50.0));
        let mut sorted = ranks.to_vec();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let m = sorted.len();
        let median = if m == 0 {
            f64::NAN
        } else if m % 2 == 1 {
            sorted[m / 2]
        } else {
            (sorted[m / 2 - 1] + sorted[m / 2]) / 2.0
        };
        let mean = ranks.iter().sum::<f64>() / nq;
        let gm = if r1 > 0.0 && r5 > 0.0 && r10 > 0.0 { ((r1.ln() + r5.ln() + r10.ln()) / 3.0).exp() } else { 0.0 };
        DirectionMetrics { r1, r5, r10, r50, medr: median + 1.0, meanr: mean + 1.0, geometric_mean_r1_r5_r10: gm }
    }

    /// Keys as the published code names them.
    pub fn to_json(&self) -> Value {
        json!({
            "R1": self.r1, "R5": self.r5, "R10": self.r10, "R50": self.r50,
            "MedR": self.medr, "MeanR": self.meanr,
            "geometric_mean_R1-R5-R10": self.geometric_mean_r1_r5_r10,
        })
    }
}

impl RetrievalMetrics {
    /// `{"t2v": {...}, "v2t": {...}}`.
    pub fn to_json(&self) -> Value {
        json!({ "t2v": self.t2v.to_json(), "v2t": self.v2t.to_json() })
    }
}

/// Metrics of a [texts, videos] similarity matrix (f32 scores).
pub fn retrieval_metrics(sims_text_by_video: &[f32], texts: usize, videos: usize, query_mask: Option<&[bool]>) -> RetrievalMetrics {
    let s: Vec<f64> = sims_text_by_video.iter().map(|&x| x as f64).collect();
    retrieval_metrics_f64(&s, texts, videos, query_mask)
}

/// [`retrieval_metrics`] on f64 scores (the published code ranks in float64).
pub fn retrieval_metrics_f64(sims: &[f64], texts: usize, videos: usize, query_mask: Option<&[bool]>) -> RetrievalMetrics {
    assert_eq!(sims.len(), texts * videos, "similarity matrix has {} values, expected [{texts}, {videos}]", sims.len());
    assert!(videos > 0 && texts.is_multiple_of(videos), "{texts} texts are not a whole number of captions per video for {videos} videos");
    if let Some(m) = query_mask {
        assert_eq!(m.len(), texts, "query mask has {} entries, expected one per text ({texts})", m.len());
    }
    let k = texts / videos;
    let present = |i: usize| query_mask.is_none_or(|m| m[i]);

    // Text → video, optimistic ties.
    let t2v_ranks: Vec<f64> = (0..texts)
        .filter(|&i| present(i))
        .map(|i| {
            let row = &sims[i * videos..(i + 1) * videos];
            let gt = row[i / k];
            row.iter().filter(|&&x| x > gt).count() as f64
        })
        .collect();

    // Video → text: best caption, ties averaged among present captions.
    let v2t_ranks: Vec<f64> = (0..videos)
        .map(|v| {
            let col = |i: usize| sims[i * videos + v];
            let mut best = f64::INFINITY;
            for i in v * k..(v + 1) * k {
                if !present(i) {
                    continue;
                }
                let x = col(i);
                let (mut above, mut equal) = (0usize, 0usize);
                for j in (0..texts).filter(|&j| present(j)) {
                    let y = col(j);
                    if y > x {
                        above += 1;
                    } else if y == x {
                        equal += 1;
                    }
                }
                // Mean of the 0-based positions above..above+equal−1.
                let rank = above as f64 + (equal as f64 - 1.0) / 2.0;
                best = best.min(rank);
            }
            best
        })
        .collect();

    RetrievalMetrics { t2v: DirectionMetrics::from_ranks(&t2v_ranks), v2t: DirectionMetrics::from_ranks(&v2t_ranks) }
}
