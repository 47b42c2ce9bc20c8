//! The bottom-up-attention detector (Caffe-converted ResNet-101 C4 Faster R-CNN), one
//! frame at a time: blob → stem (7×7/2 conv, Caffe max pool) → res2..res4 → RPN proposals
//! → RoIPool 14×14 at 1/16 → res5 (dilation 2, stride 1) → mean-pooled features `x` →
//! class and attribute heads → per-class NMS and box selection.
//!
//! Convolutions, the heads' linear layers, ReLUs and residual adds run on a [`Backend`]
//! (see [`crate::conv`]); RoIPool, proposal decoding, NMS and softmaxes run on the host.
//! res5 runs over the proposals in chunks of [`DetectorConfig::roi_chunk`], so memory stays
//! bounded whatever the proposal count.

use demovlp_model::Backend;

use crate::conv::{max_pool, upload, Block, Conv, Map, Pool};
use crate::image::{blob_scale, make_blob, Blob, Frame};
use crate::nms::{select, BoxF, SelectConfig};
use crate::roi::roi_pool_into;
use crate::rpn::{proposals, Proposals, RpnConfig};
use crate::weights::{Arch, DetectorWeights};

/// Every setting of the extraction, with the published defaults.
#[derive(Clone, Copy, Debug)]
pub struct DetectorConfig {
    /// Target short side of the blob (600).
    pub scale: usize,
    /// Longest blob side allowed (1000).
    pub max_size: usize,
    pub rpn: RpnConfig,
    pub select: SelectConfig,
    /// RoIPool output size (14) and map scale (1/16).
    pub pool: usize,
    pub pool_scale: f32,
    /// Proposals per res5 pass (memory bound only; results do not depend on it).
    pub roi_chunk: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            scale: 600,
            max_size: 1000,
            rpn: RpnConfig::default(),
            select: SelectConfig::default(),
            pool: 14,
            pool_scale: 1.0 / 16.0,
            roi_chunk: 32,
        }
    }
}

/// What a frame gives: the selected regions, as the published extractor saves them.
#[derive(Clone, Debug)]
pub struct Regions {
    pub image_h: usize,
    pub image_w: usize,
    /// `[N, C5]` mean-pooled res5 features.
    pub x: Vec<f32>,
    pub dim: usize,
    /// Proposal boxes in frame pixels (proposals / scale).
    pub bbox: Vec<BoxF>,
    /// 0-based over the non-background classes / attributes.
    pub objects_id: Vec<i64>,
    pub objects_conf: Vec<f32>,
    pub attrs_id: Vec<i64>,
    pub attrs_conf: Vec<f32>,
}

impl Regions {
    pub fn len(&self) -> usize {
        self.bbox.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bbox.is_empty()
    }
}

/// One frame's run with its intermediate results (for inspection and tests).
pub struct Trace {
    pub blob: Blob,
    /// `[h, w, C4]` backbone output, and its size.
    pub res4: Vec<f32>,
    pub res4_hw: (usize, usize),
    pub proposals: Proposals,
    /// `[P, C5]` features of every proposal.
    pub x: Vec<f32>,
    /// `[P, classes]` class probabilities and `[P, attributes]` attribute probabilities.
    pub cls_prob: Vec<f32>,
    pub attr_prob: Vec<f32>,
    /// Argmax over all class logits (background included): the label fed to `cls_embed`.
    pub cls_argmax: Vec<usize>,
    /// Proposals / scale.
    pub dets: Vec<BoxF>,
    pub max_conf: Vec<f32>,
    pub selected: Vec<usize>,
    pub regions: Regions,
}

/// The detector on backend `B`.
pub struct Detector<B: Backend> {
    be: B,
    pub arch: Arch,
    pub cfg: DetectorConfig,
    stem: Conv<B>,
    stages: Vec<Vec<Block<B>>>,
    res5: Vec<Block<B>>,
    rpn_conv: Conv<B>,
    rpn_obj: Conv<B>,
    rpn_deltas: Conv<B>,
    cells: Vec<BoxF>,
    cls_w: B::Buf,
    cls_b: B::Buf,
    cls_embed: Vec<f32>,
    attr1_w: B::Buf,
    attr1_b: B::Buf,
    attr2_w: B::Buf,
    attr2_b: B::Buf,
    /// Buffers of finished layers, reused frame after frame.
    pool: Pool<B>,
}

fn softmax_rows(v: &mut [f32], cols: usize) {
    for row in v.chunks_mut(cols) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = 0f32;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            s += *x;
        }
        for x in row.iter_mut() {
            *x /= s;
        }
    }
}

/// (argmax, max) of a row, first index on ties.
fn argmax(row: &[f32]) -> (usize, f32) {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
}

impl<B: Backend> Detector<B> {
    pub fn new(be: B, w: &DetectorWeights, cfg: DetectorConfig) -> Detector<B> {
        let blocks = |bs: &[crate::weights::HostBlock]| bs.iter().map(|b| Block::new(&be, b)).collect::<Vec<_>>();
        Detector {
            arch: w.arch.clone(),
            cfg,
            stem: Conv::new(&be, &w.stem),
            stages: w.stages.iter().map(|s| blocks(s)).collect(),
            res5: blocks(&w.res5),
            rpn_conv: Conv::new(&be, &w.rpn_conv),
            rpn_obj: Conv::new(&be, &w.rpn_objectness),
            rpn_deltas: Conv::new(&be, &w.rpn_deltas),
            cells: w.cell_anchors.clone(),
            cls_w: upload(&be, &w.cls_w),
            cls_b: upload(&be, &w.cls_b),
            cls_embed: w.cls_embed.clone(),
            attr1_w: upload(&be, &w.attr1_w),
            attr1_b: upload(&be, &w.attr1_b),
            attr2_w: upload(&be, &w.attr2_w),
            attr2_b: upload(&be, &w.attr2_b),
            pool: Pool::default(),
            be,
        }
    }

    /// Blob → res4 `[h, w, C4]`.
    pub fn backbone(&self, blob: &Blob) -> Map<B> {
        let (be, pool) = (&self.be, &self.pool);
        let x = Map::filled(be, pool, 1, blob.h, blob.w, 3, |d| d.copy_from_slice(&blob.data));
        let y = self.stem.forward(be, &x, true, pool);
        pool.give_map(x);
        let mut x = max_pool(be, &y, pool);
        pool.give_map(y);
        for stage in &self.stages {
            x = Block::chain(stage, be, x, pool);
        }
        x
    }

    /// RPN head on res4 and the proposals of a blob.
    pub fn propose(&self, res4: &Map<B>, blob: &Blob) -> Proposals {
        let (be, pool) = (&self.be, &self.pool);
        let t = self.rpn_conv.forward(be, res4, true, pool);
        let host = |m: Map<B>| {
            let v = m.to_host(be);
            pool.give_map(m);
            v
        };
        let obj = host(self.rpn_obj.forward(be, &t, false, pool));
        let del = host(self.rpn_deltas.forward(be, &t, false, pool));
        pool.give_map(t);
        proposals(&obj, &del, res4.h, res4.w, &self.cells, blob.h, blob.w, blob.scale, &self.cfg.rpn)
    }

    /// Mean-pooled res5 features `[P, C5]` of boxes (blob coordinates) on res4 `[h, w, C4]`.
    pub fn box_features(&self, res4: &[f32], h: usize, w: usize, boxes: &[BoxF]) -> Vec<f32> {
        let (be, pool) = (&self.be, &self.pool);
        let (c4, c5, out) = (self.arch.widths[2], self.arch.widths[3], self.cfg.pool);
        let mut x = Vec::with_capacity(boxes.len() * c5);
        for chunk in boxes.chunks(self.cfg.roi_chunk.max(1)) {
            let pooled =
                Map::filled(be, pool, chunk.len(), out, out, c4, |d| roi_pool_into(res4, h, w, c4, chunk, out, self.cfg.pool_scale, d));
            let m = Block::chain(&self.res5, be, pooled, pool);
            be.read_host(B::view(&m.buf), |v| {
                let cells = m.h * m.w;
                for r in 0..chunk.len() {
                    let mut acc = vec![0f64; c5];
                    for p in 0..cells {
                        for (a, &y) in acc.iter_mut().zip(&v[(r * cells + p) * c5..(r * cells + p + 1) * c5]) {
                            *a += y as f64;
                        }
                    }
                    x.extend(acc.iter().map(|&a| (a / cells as f64) as f32));
                }
            });
            pool.give_map(m);
        }
        x
    }

    /// Class probabilities, attribute probabilities and the class argmax (background
    /// included) of features `[P, C5]`.
    pub fn heads(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
        let be = &self.be;
        let a = &self.arch;
        let c5 = a.widths[3];
        let p = x.len() / c5;
        let xin = upload(be, x);
        let mut logits = be.zeros(p * a.classes);
        be.linear_forward(B::view(&xin), c5, B::view(&self.cls_w), Some(B::view(&self.cls_b)), B::view_mut(&mut logits), p, c5, a.classes);
        let mut cls = be.to_host(B::view(&logits));
        let labels: Vec<usize> = cls.chunks(a.classes).map(|r| argmax(r).0).collect();
        softmax_rows(&mut cls, a.classes);
        let din = c5 + a.cls_embed;
        let mut cat = vec![0f32; p * din];
        for i in 0..p {
            cat[i * din..i * din + c5].copy_from_slice(&x[i * c5..(i + 1) * c5]);
            cat[i * din + c5..(i + 1) * din].copy_from_slice(&self.cls_embed[labels[i] * a.cls_embed..(labels[i] + 1) * a.cls_embed]);
        }
        let cat = upload(be, &cat);
        let mut hid = be.zeros(p * a.attr_hidden);
        be.linear_forward(
            B::view(&cat),
            din,
            B::view(&self.attr1_w),
            Some(B::view(&self.attr1_b)),
            B::view_mut(&mut hid),
            p,
            din,
            a.attr_hidden,
        );
        let mut hid_r = be.zeros(p * a.attr_hidden);
        be.relu_forward(B::view(&hid), B::view_mut(&mut hid_r));
        let mut al = be.zeros(p * a.attributes);
        be.linear_forward(
            B::view(&hid_r),
            a.attr_hidden,
            B::view(&self.attr2_w),
            Some(B::view(&self.attr2_b)),
            B::view_mut(&mut al),
            p,
            a.attr_hidden,
            a.attributes,
        );
        let mut attr = be.to_host(B::view(&al));
        softmax_rows(&mut attr, a.attributes);
        (cls, attr, labels)
    }

    /// FLOPs of one frame whose blob is `h × w` with `proposals` proposals: (backbone and
    /// RPN, res5 and heads). Convolutions and linear layers only (2 per multiply-add).
    pub fn flops(&self, h: usize, w: usize, proposals: usize) -> (f64, f64) {
        let (mut f, mut h, mut w) = self.stem.flops(h, w);
        (h, w) = (crate::conv::pool_out_len(h, 3, 2), crate::conv::pool_out_len(w, 3, 2));
        for b in self.stages.iter().flatten() {
            let (bf, bh, bw) = b.flops(h, w);
            (f, h, w) = (f + bf, bh, bw);
        }
        for c in [&self.rpn_conv, &self.rpn_obj, &self.rpn_deltas] {
            f += c.flops(h, w).0;
        }
        let (mut g, mut ph, mut pw) = (0.0, self.cfg.pool, self.cfg.pool);
        for b in &self.res5 {
            let (bf, bh, bw) = b.flops(ph, pw);
            (g, ph, pw) = (g + bf, bh, bw);
        }
        let a = &self.arch;
        let heads = 2.0 * (a.widths[3] * a.classes + (a.widths[3] + a.cls_embed) * a.attr_hidden + a.attr_hidden * a.attributes) as f64;
        (f, (g + heads) * proposals as f64)
    }

    /// The whole frame, every stage kept.
    pub fn trace(&self, frame: &Frame) -> Trace {
        let a = &self.arch;
        let scale = blob_scale(frame.h, frame.w, self.cfg.scale, self.cfg.max_size);
        let blob = make_blob(frame, scale);
        let res4m = self.backbone(&blob);
        let props = self.propose(&res4m, &blob);
        let res4 = res4m.to_host(&self.be);
        let res4_hw = (res4m.h, res4m.w);
        self.pool.give_map(res4m);
        let x = self.box_features(&res4, res4_hw.0, res4_hw.1, &props.boxes);
        let (cls_prob, attr_prob, cls_argmax) = self.heads(&x);
        let s32 = scale as f32;
        let dets: Vec<BoxF> = props.boxes.iter().map(|b| [b[0] / s32, b[1] / s32, b[2] / s32, b[3] / s32]).collect();
        let (selected, max_conf) = select(&dets, &cls_prob, a.classes, &self.cfg.select);
        let c5 = a.widths[3];
        let mut r = Regions {
            image_h: frame.h,
            image_w: frame.w,
            x: Vec::with_capacity(selected.len() * c5),
            dim: c5,
            bbox: Vec::with_capacity(selected.len()),
            objects_id: vec![],
            objects_conf: vec![],
            attrs_id: vec![],
            attrs_conf: vec![],
        };
        for &i in &selected {
            r.x.extend_from_slice(&x[i * c5..(i + 1) * c5]);
            r.bbox.push(dets[i]);
            let (oi, oc) = argmax(&cls_prob[i * a.classes + 1..(i + 1) * a.classes]);
            let (ai, ac) = argmax(&attr_prob[i * a.attributes + 1..(i + 1) * a.attributes]);
            r.objects_id.push(oi as i64);
            r.objects_conf.push(oc);
            r.attrs_id.push(ai as i64);
            r.attrs_conf.push(ac);
        }
        Trace { blob, res4, res4_hw, proposals: props, x, cls_prob, attr_prob, cls_argmax, dets, max_conf, selected, regions: r }
    }

    /// The selected regions of a frame.
    pub fn detect(&self, frame: &Frame) -> Regions {
        self.trace(frame).regions
    }
}
