//! The detector's weights: MILVLG/bottom-up-attention.pytorch's Caffe-converted
//! ResNet-101 C4 Faster R-CNN state dict (detectron2 names), read from a `torch.save` file
//! (zip or legacy format; bare state dict or `{"model": ...}`) or from safetensors.
//!
//! Nothing about the network's size is assumed: the block count of each stage comes from
//! the keys (`backbone.res3.<i>.conv1.weight` for i = 0, 1, ...), every width from the
//! shapes, and each stage's input width must equal the previous output. A block has a
//! projection shortcut exactly when its input and output widths differ (detectron2's rule).
//! Every expected key is checked for presence and shape; errors name the key.
//!
//! Frozen BatchNorm, y = (x − mean)/sqrt(var + eps)·w + b, is folded into the convolution
//! it follows: W' = W·s, b' = b − mean·s with s = w/sqrt(var + eps) (f32, as detectron2's
//! `FrozenBatchNorm2d` computes its scale). Convolution weights are stored as
//! `[out, kh, kw, in]` so that an im2col row of an NHWC map is a contiguous run per tap.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use demovlp_model::io::safetensors::{read_safetensors, Tensor};
use demovlp_model::torch::read_torch_state_dict;

/// BatchNorm epsilon of the published model (detectron2's default).
pub const BN_EPS: f32 = 1e-5;

/// Geometry of one convolution (square kernel, same stride and padding both ways).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub dilation: usize,
}

impl ConvSpec {
    /// Output size along an axis of `n` input cells.
    pub fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.pad).saturating_sub(self.dilation * (self.k - 1) + 1) / self.stride + 1
    }
    /// Columns of the im2col matrix: k·k·cin.
    pub fn patch(&self) -> usize {
        self.k * self.k * self.cin
    }
}

/// A convolution with its BatchNorm (or bias) folded in: weight `[cout, k, k, cin]`, bias `[cout]`.
#[derive(Clone, Debug)]
pub struct HostConv {
    pub spec: ConvSpec,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// A detectron2 `BottleneckBlock`: 1×1 (stride here), 3×3 (dilation), 1×1, optional projection.
#[derive(Clone, Debug)]
pub struct HostBlock {
    pub conv1: HostConv,
    pub conv2: HostConv,
    pub conv3: HostConv,
    pub shortcut: Option<HostConv>,
}

/// Sizes read from the weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arch {
    /// Stem output width.
    pub stem: usize,
    /// Blocks of res2, res3, res4, res5.
    pub blocks: [usize; 4],
    /// Output widths of res2..res5.
    pub widths: [usize; 4],
    /// Bottleneck widths of res2..res5.
    pub bottlenecks: [usize; 4],
    pub rpn_conv: usize,
    pub anchors: usize,
    /// Classes including background (index 0).
    pub classes: usize,
    /// Attribute classes including "no attribute" (index 0).
    pub attributes: usize,
    pub cls_embed: usize,
    pub attr_hidden: usize,
}

impl Arch {
    /// The published model: ResNet-101 C4, Visual Genome 1600 objects + 400 attributes.
    pub fn published() -> Arch {
        Arch {
            stem: 64,
            blocks: [3, 4, 23, 3],
            widths: [256, 512, 1024, 2048],
            bottlenecks: [64, 128, 256, 512],
            rpn_conv: 512,
            anchors: 12,
            classes: 1601,
            attributes: 401,
            cls_embed: 256,
            attr_hidden: 512,
        }
    }

    /// The reduced model of the extraction fixture (same topology and heads, narrow and shallow).
    pub fn fixture_tiny() -> Arch {
        Arch { stem: 8, blocks: [1, 1, 2, 2], widths: [8, 16, 32, 64], bottlenecks: [4, 8, 16, 32], rpn_conv: 32, ..Arch::published() }
    }

    /// One line naming the sizes.
    pub fn describe(&self) -> String {
        format!(
            "stem {}, blocks {:?}, widths {:?}, rpn {} x {} anchors, {} classes, {} attributes",
            self.stem, self.blocks, self.widths, self.rpn_conv, self.anchors, self.classes, self.attributes
        )
    }
}

/// Every weight the extractor uses, on the host.
#[derive(Clone, Debug)]
pub struct DetectorWeights {
    pub arch: Arch,
    pub stem: HostConv,
    /// res2, res3, res4.
    pub stages: Vec<Vec<HostBlock>>,
    pub res5: Vec<HostBlock>,
    pub rpn_conv: HostConv,
    /// `[2A, rpn]` objectness logits (channel c·A + a).
    pub rpn_objectness: HostConv,
    /// `[4A, rpn]` anchor deltas (channel 4a + k).
    pub rpn_deltas: HostConv,
    /// `[A, 4]` cell anchors (x1, y1, x2, y2) of the checkpoint buffer.
    pub cell_anchors: Vec<[f32; 4]>,
    /// `[classes, C5]`, `[classes]`.
    pub cls_w: Vec<f32>,
    pub cls_b: Vec<f32>,
    /// `[classes, E]`.
    pub cls_embed: Vec<f32>,
    /// `[hidden, C5 + E]`, `[hidden]`.
    pub attr1_w: Vec<f32>,
    pub attr1_b: Vec<f32>,
    /// `[attributes, hidden]`, `[attributes]`.
    pub attr2_w: Vec<f32>,
    pub attr2_b: Vec<f32>,
    /// Keys of the file that the extractor does not use (reported, not an error).
    pub unused: Vec<String>,
    /// Which top-level entry held the state dict (`model`, or empty for a bare dict).
    pub source_key: String,
}

/// Reads the detector weights from `path` (`.safetensors`, else a `torch.save` file).
pub fn load_weights(path: &Path) -> Result<DetectorWeights> {
    let is_st = path.extension().is_some_and(|e| e == "safetensors");
    let (tensors, source_key) = if is_st {
        (read_safetensors(path)?.tensors, String::new())
    } else {
        let sd = read_torch_state_dict(path)?;
        (sd.tensors, sd.source_key)
    };
    let mut w = from_tensors(tensors).with_context(|| format!("{}: detector weights", path.display()))?;
    w.source_key = source_key;
    Ok(w)
}

/// Looks tensors up by name, remembering which were used.
struct Keys {
    tensors: BTreeMap<String, Tensor>,
    used: std::collections::BTreeSet<String>,
}

impl Keys {
    fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
    /// The tensor `key` as f32, its shape checked against `want` (None = any extent).
    fn get(&mut self, key: &str, want: &[Option<usize>]) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.tensors.get(key).with_context(|| format!("missing weight key {key}"))?;
        let ok = t.shape.len() == want.len() && t.shape.iter().zip(want).all(|(&s, w)| w.is_none_or(|w| w == s));
        if !ok {
            let want: Vec<String> = want.iter().map(|w| w.map_or("?".to_string(), |w| w.to_string())).collect();
            bail!("weight {key} has shape {:?}, expected [{}]", t.shape, want.join(", "));
        }
        let v = t.to_f32().with_context(|| format!("weight {key}"))?;
        self.used.insert(key.to_string());
        Ok((t.shape.clone(), v))
    }
}

/// `[cout, cin, k, k]` → `[cout, k, k, cin]`.
fn to_ohwi(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for o in 0..cout {
        for i in 0..cin {
            for t in 0..k * k {
                out[(o * k * k + t) * cin + i] = w[(o * cin + i) * k * k + t];
            }
        }
    }
    out
}

/// A bias-free convolution `<name>.weight` followed by BatchNorm `<name>.norm.*`, folded.
fn conv_bn(
    keys: &mut Keys,
    name: &str,
    cin: Option<usize>,
    cout: Option<usize>,
    k: usize,
    stride: usize,
    dilation: usize,
) -> Result<HostConv> {
    let (shape, w) = keys.get(&format!("{name}.weight"), &[cout, cin, Some(k), Some(k)])?;
    let (cout, cin) = (shape[0], shape[1]);
    let mut bn = |p: &str| keys.get(&format!("{name}.norm.{p}"), &[Some(cout)]).map(|(_, v)| v);
    let (gamma, beta, mean, var) = (bn("weight")?, bn("bias")?, bn("running_mean")?, bn("running_var")?);
    let scale: Vec<f32> = (0..cout).map(|o| gamma[o] * (1.0 / (var[o] + BN_EPS).sqrt())).collect();
    let b: Vec<f32> = (0..cout).map(|o| beta[o] - mean[o] * scale[o]).collect();
    let per = cin * k * k;
    let folded: Vec<f32> = w.iter().enumerate().map(|(i, &x)| x * scale[i / per]).collect();
    let pad = dilation * (k - 1) / 2;
    Ok(HostConv { spec: ConvSpec { cin, cout, k, stride, pad, dilation }, w: to_ohwi(&folded, cout, cin, k), b })
}

/// A convolution with a bias (the RPN head).
fn conv_bias(keys: &mut Keys, name: &str, cin: usize, cout: Option<usize>, k: usize) -> Result<HostConv> {
    let (shape, w) = keys.get(&format!("{name}.weight"), &[cout, Some(cin), Some(k), Some(k)])?;
    let cout = shape[0];
    let (_, b) = keys.get(&format!("{name}.bias"), &[Some(cout)])?;
    Ok(HostConv { spec: ConvSpec { cin, cout, k, stride: 1, pad: (k - 1) / 2, dilation: 1 }, w: to_ohwi(&w, cout, cin, k), b })
}

/// The blocks `<prefix>.0`, `<prefix>.1`, ... of one stage.
fn stage(keys: &mut Keys, prefix: &str, cin: usize, first_stride: usize, dilation: usize) -> Result<(Vec<HostBlock>, usize, usize)> {
    let n = (0..).take_while(|i| keys.has(&format!("{prefix}.{i}.conv1.weight"))).count();
    if n == 0 {
        bail!("missing weight key {prefix}.0.conv1.weight (stage {prefix} has no blocks)");
    }
    let mut blocks = Vec::with_capacity(n);
    let (mut width, mut bottleneck) = (cin, 0);
    for i in 0..n {
        let p = format!("{prefix}.{i}");
        let stride = if i == 0 { first_stride } else { 1 };
        let conv1 = conv_bn(keys, &format!("{p}.conv1"), Some(width), None, 1, stride, 1)?;
        let b = conv1.spec.cout;
        if i > 0 && b != bottleneck {
            bail!("weight {p}.conv1.weight has {b} outputs, block 0 of {prefix} has {bottleneck}");
        }
        bottleneck = b;
        let conv2 = conv_bn(keys, &format!("{p}.conv2"), Some(b), Some(b), 3, 1, dilation)?;
        let conv3 = conv_bn(keys, &format!("{p}.conv3"), Some(b), None, 1, 1, 1)?;
        let out = conv3.spec.cout;
        if i > 0 && out != width {
            bail!("weight {p}.conv3.weight has {out} outputs, the stage's blocks output {width}");
        }
        let shortcut = if out != width {
            Some(conv_bn(keys, &format!("{p}.shortcut"), Some(width), Some(out), 1, stride, 1)?)
        } else {
            if keys.has(&format!("{p}.shortcut.weight")) {
                bail!("weight {p}.shortcut.weight is present but block {p} keeps its width {width} (no projection expected)");
            }
            None
        };
        width = out;
        blocks.push(HostBlock { conv1, conv2, conv3, shortcut });
    }
    Ok((blocks, width, bottleneck))
}

fn linear(keys: &mut Keys, name: &str, dout: Option<usize>, din: usize) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let (shape, w) = keys.get(&format!("{name}.weight"), &[dout, Some(din)])?;
    let (_, b) = keys.get(&format!("{name}.bias"), &[Some(shape[0])])?;
    Ok((w, b, shape[0]))
}

/// Builds the detector from a state dict's tensors; see the module docs.
pub fn from_tensors(tensors: BTreeMap<String, Tensor>) -> Result<DetectorWeights> {
    let mut keys = Keys { tensors, used: Default::default() };
    let stem = conv_bn(&mut keys, "backbone.stem.conv1", Some(3), None, 7, 2, 1)?;
    let stem_w = stem.spec.cout;
    let stem = HostConv { spec: ConvSpec { pad: 3, ..stem.spec }, ..stem };
    let mut stages = Vec::new();
    let (mut width, mut blocks, mut widths, mut bottlenecks) = (stem_w, [0; 4], [0; 4], [0; 4]);
    for (s, name) in ["res2", "res3", "res4"].iter().enumerate() {
        let (b, w, bn) = stage(&mut keys, &format!("backbone.{name}"), width, if s == 0 { 1 } else { 2 }, 1)?;
        (blocks[s], widths[s], bottlenecks[s]) = (b.len(), w, bn);
        width = w;
        stages.push(b);
    }
    let c4 = width;
    let rpn_conv = conv_bias(&mut keys, "proposal_generator.rpn_head.conv", c4, None, 3)?;
    let r = rpn_conv.spec.cout;
    let (ashape, cells) = keys.get("proposal_generator.anchor_generator.cell_anchors.0", &[None, Some(4)])?;
    let a = ashape[0];
    let rpn_objectness = conv_bias(&mut keys, "proposal_generator.rpn_head.objectness_logits", r, Some(2 * a), 1)?;
    let rpn_deltas = conv_bias(&mut keys, "proposal_generator.rpn_head.anchor_deltas", r, Some(4 * a), 1)?;
    let (res5, c5, b5) = stage(&mut keys, "roi_heads.res5", c4, 1, 2)?;
    (blocks[3], widths[3], bottlenecks[3]) = (res5.len(), c5, b5);

    let p = "roi_heads.box_predictor";
    let (cls_w, cls_b, classes) = linear(&mut keys, &format!("{p}.cls_score"), None, c5)?;
    if classes < 2 {
        bail!("weight {p}.cls_score.weight has {classes} classes (background + at least one expected)");
    }
    // Loaded to check the file; extraction keeps the proposal boxes, as the published extractor does.
    linear(&mut keys, &format!("{p}.bbox_pred"), Some(4 * classes), c5)?;
    let (eshape, cls_embed) = keys.get(&format!("{p}.cls_embed.weight"), &[Some(classes), None])?;
    let e = eshape[1];
    let (attr1_w, attr1_b, hidden) = linear(&mut keys, &format!("{p}.attr_linear1"), None, c5 + e)?;
    let (attr2_w, attr2_b, attributes) = linear(&mut keys, &format!("{p}.attr_linear2"), None, hidden)?;
    if attributes < 2 {
        bail!("weight {p}.attr_linear2.weight has {attributes} attribute classes (\"no attribute\" + at least one expected)");
    }
    let unused = keys.tensors.keys().filter(|k| !keys.used.contains(*k)).cloned().collect();
    Ok(DetectorWeights {
        arch: Arch {
            stem: stem_w,
            blocks,
            widths,
            bottlenecks,
            rpn_conv: r,
            anchors: a,
            classes,
            attributes,
            cls_embed: e,
            attr_hidden: hidden,
        },
        stem,
        stages,
        res5,
        rpn_conv,
        rpn_objectness,
        rpn_deltas,
        cell_anchors: cells.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect(),
        cls_w,
        cls_b,
        cls_embed,
        attr1_w,
        attr1_b,
        attr2_w,
        attr2_b,
        unused,
        source_key: String::new(),
    })
}
