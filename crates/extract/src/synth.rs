//! Seeded random detector weights of any size, named exactly as the published checkpoint:
//! what `demovlp bench extract` times (the published sizes, without downloading them) and
//! what tests use when they need a feature width the fixture model does not have.
//! Scaled so that activations stay O(1) through any depth (He-initialised convolutions,
//! the last BatchNorm of each residual branch at 0.2).

use std::collections::BTreeMap;

use demovlp_kernels::rng::Rng;
use demovlp_model::io::safetensors::Tensor;

use crate::weights::Arch;

/// py-faster-rcnn's `generate_anchors(16, ratios (0.5, 1, 2), scales (4, 8, 16, 32))`,
/// ratio-major: the buffer the published checkpoint carries.
pub fn caffe_cell_anchors() -> Vec<[f32; 4]> {
    let (w, h) = (16.0f64, 16.0f64);
    let (cx, cy) = (0.5 * (w - 1.0), 0.5 * (h - 1.0));
    let mut out = Vec::new();
    for ratio in [0.5f64, 1.0, 2.0] {
        let ws = (w * h / ratio).sqrt().round_ties_even();
        let hs = (ws * ratio).round_ties_even();
        for scale in [4.0f64, 8.0, 16.0, 32.0] {
            let (sw, sh) = (ws * scale, hs * scale);
            out.push([
                (cx - 0.5 * (sw - 1.0)) as f32,
                (cy - 0.5 * (sh - 1.0)) as f32,
                (cx + 0.5 * (sw - 1.0)) as f32,
                (cy + 0.5 * (sh - 1.0)) as f32,
            ]);
        }
    }
    out
}

struct Gen {
    rng: Rng,
    t: BTreeMap<String, Tensor>,
}

impl Gen {
    fn normal(&mut self, name: String, shape: Vec<usize>, std: f32) {
        let n = shape.iter().product();
        let v = (0..n).map(|_| self.rng.normal() * std).collect();
        self.t.insert(name, Tensor::f32(shape, v));
    }
    fn fill(&mut self, name: String, n: usize, v: f32) {
        self.t.insert(name, Tensor::f32(vec![n], vec![v; n]));
    }
    fn conv_bn(&mut self, name: &str, cout: usize, cin: usize, k: usize, gamma: f32) {
        self.normal(format!("{name}.weight"), vec![cout, cin, k, k], (2.0 / (cin * k * k) as f32).sqrt());
        self.fill(format!("{name}.norm.weight"), cout, gamma);
        self.normal(format!("{name}.norm.bias"), vec![cout], 0.1);
        self.fill(format!("{name}.norm.running_mean"), cout, 0.0);
        self.fill(format!("{name}.norm.running_var"), cout, 1.0);
    }
    fn linear(&mut self, name: &str, dout: usize, din: usize, std: f32) {
        self.normal(format!("{name}.weight"), vec![dout, din], std);
        self.normal(format!("{name}.bias"), vec![dout], 0.1);
    }
    fn stage(&mut self, prefix: &str, n: usize, cin: usize, b: usize, out: usize) {
        for i in 0..n {
            let p = format!("{prefix}.{i}");
            let inw = if i == 0 { cin } else { out };
            self.conv_bn(&format!("{p}.conv1"), b, inw, 1, 1.0);
            self.conv_bn(&format!("{p}.conv2"), b, b, 3, 1.0);
            self.conv_bn(&format!("{p}.conv3"), out, b, 1, 0.2);
            if inw != out {
                self.conv_bn(&format!("{p}.shortcut"), out, inw, 1, 1.0);
            }
        }
    }
}

/// A state dict of the given sizes with seeded random values (`a.anchors` must be 12: the
/// Caffe cell anchors).
pub fn random_state_dict(a: &Arch, seed: u64) -> BTreeMap<String, Tensor> {
    assert_eq!(a.anchors, 12, "the synthesised detector has the 12 Caffe anchors");
    let mut g = Gen { rng: Rng::new(seed), t: BTreeMap::new() };
    g.conv_bn("backbone.stem.conv1", a.stem, 3, 7, 1.0);
    let mut cin = a.stem;
    for (s, name) in ["res2", "res3", "res4"].iter().enumerate() {
        g.stage(&format!("backbone.{name}"), a.blocks[s], cin, a.bottlenecks[s], a.widths[s]);
        cin = a.widths[s];
    }
    let anchors = caffe_cell_anchors();
    let flat: Vec<f32> = anchors.iter().flatten().copied().collect();
    g.t.insert("proposal_generator.anchor_generator.cell_anchors.0".into(), Tensor::f32(vec![anchors.len(), 4], flat));
    let r = a.rpn_conv;
    let rpn = "proposal_generator.rpn_head";
    g.normal(format!("{rpn}.conv.weight"), vec![r, cin, 3, 3], (2.0 / (cin * 9) as f32).sqrt());
    g.fill(format!("{rpn}.conv.bias"), r, 0.0);
    g.normal(format!("{rpn}.objectness_logits.weight"), vec![2 * anchors.len(), r, 1, 1], (1.0 / r as f32).sqrt());
    g.fill(format!("{rpn}.objectness_logits.bias"), 2 * anchors.len(), 0.0);
    g.normal(format!("{rpn}.anchor_deltas.weight"), vec![4 * anchors.len(), r, 1, 1], 0.1 / (r as f32).sqrt());
    g.fill(format!("{rpn}.anchor_deltas.bias"), 4 * anchors.len(), 0.0);
    g.stage("roi_heads.res5", a.blocks[3], cin, a.bottlenecks[3], a.widths[3]);
    let c5 = a.widths[3];
    let p = "roi_heads.box_predictor";
    g.linear(&format!("{p}.cls_score"), a.classes, c5, (1.0 / c5 as f32).sqrt());
    g.linear(&format!("{p}.bbox_pred"), 4 * a.classes, c5, 0.01);
    g.normal(format!("{p}.cls_embed.weight"), vec![a.classes, a.cls_embed], 1.0);
    g.linear(&format!("{p}.attr_linear1"), a.attr_hidden, c5 + a.cls_embed, (1.0 / (c5 + a.cls_embed) as f32).sqrt());
    g.linear(&format!("{p}.attr_linear2"), a.attributes, a.attr_hidden, (1.0 / a.attr_hidden as f32).sqrt());
    g.t
}
