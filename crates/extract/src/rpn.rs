//! Region proposals from the RPN head's outputs, as the Caffe-mode extractor makes them:
//! anchors = cell anchors shifted by the stride (grid offset 0), foreground probability =
//! softmax over each anchor's (background, foreground) logit pair, box decode with +1
//! widths (dw, dh clamped at log(1000/16)), clip to the blob, drop degenerate and small
//! boxes (w + 1 ≤ 16·scale, compared in f32), sort by probability, keep the top
//! `pre_nms`, Caffe NMS, keep the first `post_nms` survivors (descending score).
//!
//! Anchor order: flattened index (y·W + x)·A + a. Objectness channel c·A + a (c = 0
//! background, 1 foreground); delta channel 4a + k for k = dx, dy, dw, dh.

use crate::nms::{nms, order_desc, BoxF};

/// Proposal settings (published defaults: 6000, 300, 0.7, 16).
#[derive(Clone, Copy, Debug)]
pub struct RpnConfig {
    pub pre_nms: usize,
    pub post_nms: usize,
    pub nms: f32,
    /// Minimum box side in frame pixels (scaled by the blob scale).
    pub min_size: f64,
    /// Feature stride of res4.
    pub stride: usize,
}

impl Default for RpnConfig {
    fn default() -> Self {
        RpnConfig { pre_nms: 6000, post_nms: 300, nms: 0.7, min_size: 16.0, stride: 16 }
    }
}

/// Everything the proposal step decides, kept for inspection and tests.
#[derive(Clone, Debug, Default)]
pub struct Proposals {
    /// Foreground probability of every anchor, (y, x, a) order.
    pub fg_prob: Vec<f32>,
    /// Anchor index of each of the sorted top-`pre_nms` candidates.
    pub topk_index: Vec<usize>,
    /// Their decoded, clipped boxes (blob coordinates) and probabilities.
    pub topk_boxes: Vec<BoxF>,
    pub topk_scores: Vec<f32>,
    /// Positions in the top-k list of the proposals kept.
    pub nms_keep: Vec<usize>,
    /// The proposals (blob coordinates), descending score, and their probabilities.
    pub boxes: Vec<BoxF>,
    pub scores: Vec<f32>,
}

/// `log(1000/16)`, the delta clamp.
pub fn scale_clamp() -> f32 {
    (1000.0f64 / 16.0).ln() as f32
}

/// Decodes one anchor's deltas (weights 1).
pub fn decode(anchor: &BoxF, d: [f32; 4]) -> BoxF {
    let clamp = scale_clamp();
    let w = anchor[2] - anchor[0] + 1.0;
    let h = anchor[3] - anchor[1] + 1.0;
    let cx = anchor[0] + 0.5 * w;
    let cy = anchor[1] + 0.5 * h;
    let (dw, dh) = (d[2].min(clamp), d[3].min(clamp));
    let pcx = d[0] * w + cx;
    let pcy = d[1] * h + cy;
    let pw = dw.exp() * w;
    let ph = dh.exp() * h;
    [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]
}

/// Proposals of one image. `objectness` is `[H·W, 2A]` and `deltas` `[H·W, 4A]` (NHWC rows),
/// `cells` the `A` cell anchors, the blob `blob_h × blob_w` at `scale`.
#[allow(clippy::too_many_arguments)]
pub fn proposals(
    objectness: &[f32],
    deltas: &[f32],
    fh: usize,
    fw: usize,
    cells: &[BoxF],
    blob_h: usize,
    blob_w: usize,
    scale: f64,
    cfg: &RpnConfig,
) -> Proposals {
    let a = cells.len();
    let n = fh * fw * a;
    assert_eq!(objectness.len(), fh * fw * 2 * a);
    assert_eq!(deltas.len(), fh * fw * 4 * a);
    let mut fg_prob = vec![0f32; n];
    for pos in 0..fh * fw {
        for k in 0..a {
            let (bg, fg) = (objectness[pos * 2 * a + k], objectness[pos * 2 * a + a + k]);
            let m = bg.max(fg);
            let (eb, ef) = ((bg - m).exp(), (fg - m).exp());
            fg_prob[pos * a + k] = ef / (eb + ef);
        }
    }
    let (xmax, ymax) = ((blob_w - 1) as f32, (blob_h - 1) as f32);
    let min_side = (cfg.min_size * scale) as f32;
    let mut cand: Vec<(usize, BoxF)> = Vec::new();
    for y in 0..fh {
        for x in 0..fw {
            let (sx, sy) = ((x * cfg.stride) as f32, (y * cfg.stride) as f32);
            for (k, c) in cells.iter().enumerate() {
                let idx = (y * fw + x) * a + k;
                let anchor = [c[0] + sx, c[1] + sy, c[2] + sx, c[3] + sy];
                let d = &deltas[(y * fw + x) * 4 * a + 4 * k..][..4];
                let b = decode(&anchor, [d[0], d[1], d[2], d[3]]);
                let b = [b[0].clamp(0.0, xmax), b[1].clamp(0.0, ymax), b[2].clamp(0.0, xmax), b[3].clamp(0.0, ymax)];
                if b[2] <= b[0] || b[3] <= b[1] {
                    continue;
                }
                if b[2] - b[0] + 1.0 <= min_side || b[3] - b[1] + 1.0 <= min_side {
                    continue;
                }
                cand.push((idx, b));
            }
        }
    }
    let scores: Vec<f32> = cand.iter().map(|(i, _)| fg_prob[*i]).collect();
    let mut order = order_desc(&scores);
    order.truncate(cfg.pre_nms);
    let topk_index: Vec<usize> = order.iter().map(|&o| cand[o].0).collect();
    let topk_boxes: Vec<BoxF> = order.iter().map(|&o| cand[o].1).collect();
    let topk_scores: Vec<f32> = order.iter().map(|&o| scores[o]).collect();
    let mut nms_keep = nms(&topk_boxes, &topk_scores, cfg.nms);
    nms_keep.truncate(cfg.post_nms);
    let boxes = nms_keep.iter().map(|&i| topk_boxes[i]).collect();
    let scores = nms_keep.iter().map(|&i| topk_scores[i]).collect();
    Proposals { fg_prob, topk_index, topk_boxes, topk_scores, nms_keep, boxes, scores }
}
