//! Caffe's NMS and the extractor's box selection.
//!
//! NMS (the Caffe build's `nms_cpu`): area = (x2−x1+1)(y2−y1+1), intersection with the same
//! +1, IoU = inter/(area_i + area_j − inter), all in f32; a box is suppressed when its IoU
//! with a kept box is ≥ the threshold (as f32). Candidates are visited by descending score
//! (a stable sort: equal scores in index order); the kept indices come back in ascending
//! index order.
//!
//! Selection (`save_roi_features`): for each class c ≥ 1 in order, NMS 0.3 of the boxes by
//! that class's probability, and each kept box's `max_conf` raised to its probability;
//! then the boxes with `max_conf ≥ conf` in index order, or, when fewer than `min_boxes`
//! or more than `max_boxes`, the top of `argsort(max_conf)` reversed.

/// A box (x1, y1, x2, y2) in pixels, Caffe convention (inclusive ends).
pub type BoxF = [f32; 4];

fn area(b: &BoxF) -> f32 {
    (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
}

/// IoU with Caffe's +1 convention, in `nms_cpu`'s order of operations.
pub fn iou(a: &BoxF, b: &BoxF, area_a: f32, area_b: f32) -> f32 {
    let xx1 = a[0].max(b[0]);
    let yy1 = a[1].max(b[1]);
    let xx2 = a[2].min(b[2]);
    let yy2 = a[3].min(b[3]);
    let w = (xx2 - xx1 + 1.0).max(0.0);
    let h = (yy2 - yy1 + 1.0).max(0.0);
    let inter = w * h;
    inter / (area_a + area_b - inter)
}

/// Indices sorted by descending score, ties in index order.
pub fn order_desc(scores: &[f32]) -> Vec<usize> {
    let mut o: Vec<usize> = (0..scores.len()).collect();
    o.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    o
}

/// Caffe NMS; see the module docs. Returns kept indices in ascending order.
pub fn nms(boxes: &[BoxF], scores: &[f32], thresh: f32) -> Vec<usize> {
    assert_eq!(boxes.len(), scores.len());
    let areas: Vec<f32> = boxes.iter().map(area).collect();
    let order = order_desc(scores);
    let mut suppressed = vec![false; boxes.len()];
    for (p, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        for &j in &order[p + 1..] {
            if !suppressed[j] && iou(&boxes[i], &boxes[j], areas[i], areas[j]) >= thresh {
                suppressed[j] = true;
            }
        }
    }
    (0..boxes.len()).filter(|&i| !suppressed[i]).collect()
}

/// Selection settings (the published defaults: 10, 100, 0.2, 0.3).
#[derive(Clone, Copy, Debug)]
pub struct SelectConfig {
    pub min_boxes: usize,
    pub max_boxes: usize,
    pub conf: f32,
    pub nms: f32,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig { min_boxes: 10, max_boxes: 100, conf: 0.2, nms: 0.3 }
    }
}

/// The selected rows (in output order) and every box's `max_conf`. `probs` is `[P, K]`,
/// column 0 the background.
pub fn select(boxes: &[BoxF], probs: &[f32], classes: usize, cfg: &SelectConfig) -> (Vec<usize>, Vec<f32>) {
    let p = boxes.len();
    assert_eq!(probs.len(), p * classes);
    let areas: Vec<f32> = boxes.iter().map(area).collect();
    // The pairwise suppression test is the same for every class: compute it once, as each
    // box's list of the boxes it would suppress (IoU is symmetric: a + b = b + a in f32).
    let nbrs: Vec<Vec<usize>> =
        (0..p).map(|i| (0..p).filter(|&j| j != i && iou(&boxes[i], &boxes[j], areas[i], areas[j]) >= cfg.nms).collect()).collect();
    let mut max_conf = vec![0f32; p];
    let mut scores = vec![0f32; p];
    let mut suppressed = vec![false; p];
    let mut rank = vec![0usize; p];
    for c in 1..classes {
        for i in 0..p {
            scores[i] = probs[i * classes + c];
        }
        let order = order_desc(&scores);
        for (q, &i) in order.iter().enumerate() {
            rank[i] = q;
        }
        suppressed.fill(false);
        // Visiting in score order, a kept box suppresses its neighbours that come later.
        for &i in &order {
            if suppressed[i] {
                continue;
            }
            for &j in &nbrs[i] {
                if rank[j] > rank[i] {
                    suppressed[j] = true;
                }
            }
        }
        for i in 0..p {
            if !suppressed[i] && scores[i] > max_conf[i] {
                max_conf[i] = scores[i];
            }
        }
    }
    let over: Vec<usize> = (0..p).filter(|&i| max_conf[i] >= cfg.conf).collect();
    let keep = if over.len() < cfg.min_boxes {
        top_by_argsort(&max_conf, cfg.min_boxes)
    } else if over.len() > cfg.max_boxes {
        top_by_argsort(&max_conf, cfg.max_boxes)
    } else {
        over
    };
    (keep, max_conf)
}

/// `np.argsort(v)[::-1][:n]`: descending, ties in reverse index order.
fn top_by_argsort(v: &[f32], n: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..v.len()).collect();
    o.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    o.reverse();
    o.truncate(n);
    o
}
