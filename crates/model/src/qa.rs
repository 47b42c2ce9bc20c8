//! Video question answering (SPEC §8): the published `ObjectQARelation` = the retrieval
//! model's two towers and `txt_proj`, plus the bottom-up-top-down head `BUTDQAHead`.
//!
//! Head, in data order (P = projection width, H = the head's hidden width, N = F·R regions):
//! 1. question `q [B, P]` = max over *all* L text positions (padding included) of the text tokens;
//! 2. regions `o [B, N, P]` = the video tokens without CLS, mask `m [B, N]` (1 real / 0 padded);
//! 3. attention: `a = WN(H→1)(Dropout_0.2(ReLU(WN(P→H)(o)) ⊙ ReLU(WN(P→H)(q))))`, then
//!    `a ⊙ m` — the mask *multiplies* the logits as published, so a padded region gets
//!    logit 0, not −∞ — and a softmax over the N regions; pooled `v = Σ_n softmax_n · o_n`;
//! 4. classifier: `ReLU(WN(P→H)(q)) ⊙ ReLU(WN(P→H)(v))` → Linear(H→2H) → ReLU → Dropout 0 →
//!    Linear(2H→answers);
//! 5. loss: cross-entropy against the answer index, mean over the batch.
//!
//! WN is weight normalisation with one scalar gain (`torch.nn.utils.weight_norm(dim=None)`):
//! the weight used is `W = g · V / ‖V‖_F`; the parameters are `weight_g` `[1]` and `weight_v`.
//! Its backward: `dg = ⟨dW, V⟩ / ‖V‖`, `dV = (g / ‖V‖)·dW − (g·⟨dW, V⟩ / ‖V‖³)·V`.
//! Parameter names are the published state_dict's (`head.v_att.v_proj.main.0.*`, …).

use demovlp_kernels::activation::{relu_backward, relu_forward};
use demovlp_kernels::dropout::dropout_mask;
use demovlp_kernels::linear::{linear_backward, linear_forward, Grads};
use demovlp_kernels::Rng;

use crate::layers::range;
use crate::model::{BatchRef, Model};
use crate::params::{Params, ParamsBuilder};
use std::ops::Range;

/// Sizes of the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QaHeadConfig {
    /// Input width: the model's projection width P (published 256).
    pub dim: usize,
    /// Hidden width H (published 256).
    pub hidden: usize,
    /// Size of the answer vocabulary.
    pub answers: usize,
}

/// The published attention dropout of the head (training only).
pub const ATTENTION_DROPOUT: f32 = 0.2;

/// Declares the head's tensors in the published state_dict order.
pub fn declare_head(pb: &mut ParamsBuilder, c: &QaHeadConfig) {
    let (p, h) = (c.dim, c.hidden);
    for (name, din, dout) in [("head.v_att.v_proj.main.0", p, h), ("head.v_att.q_proj.main.0", p, h)] {
        pb.add(format!("{name}.bias"), &[dout]);
        pb.add(format!("{name}.weight_g"), &[1]);
        pb.add(format!("{name}.weight_v"), &[dout, din]);
    }
    pb.add("head.v_att.linear.bias", &[1]);
    pb.add("head.v_att.linear.weight_g", &[1]);
    pb.add("head.v_att.linear.weight_v", &[1, h]);
    for name in ["head.classifier.q_net.main.0", "head.classifier.v_net.main.0"] {
        pb.add(format!("{name}.bias"), &[h]);
        pb.add(format!("{name}.weight_g"), &[1]);
        pb.add(format!("{name}.weight_v"), &[h, p]);
    }
    pb.add("head.classifier.main.0.weight", &[2 * h, h]);
    pb.add("head.classifier.main.0.bias", &[2 * h]);
    pb.add("head.classifier.main.3.weight", &[c.answers, 2 * h]);
    pb.add("head.classifier.main.3.bias", &[c.answers]);
}

/// A weight-normalised linear layer `y = x·(g·V/‖V‖)ᵀ + b`, located in the head's buffers.
#[derive(Clone, Debug)]
struct WnLinear {
    g: Range<usize>,
    v: Range<usize>,
    b: Range<usize>,
    din: usize,
    dout: usize,
}

impl WnLinear {
    fn new(p: &Params, prefix: &str, din: usize, dout: usize) -> Self {
        let v = range(p, &format!("{prefix}.weight_v"));
        assert_eq!(v.len(), din * dout, "{prefix}.weight_v: wrong size");
        WnLinear { g: range(p, &format!("{prefix}.weight_g")), v, b: range(p, &format!("{prefix}.bias")), din, dout }
    }

    /// ‖V‖_F in f64, and the effective weight `w [dout, din]` (written into `w`).
    fn weight(&self, data: &[f32], w: &mut Vec<f32>) -> f64 {
        let v = &data[self.v.clone()];
        let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let scale = (data[self.g.start] as f64 / norm) as f32;
        w.clear();
        w.extend(v.iter().map(|&x| x * scale));
        norm
    }

    /// Forward: `y [n, dout]`; keeps the effective weight in `w`.
    fn forward(&self, data: &[f32], x: &[f32], n: usize, w: &mut Vec<f32>, y: &mut [f32]) {
        self.weight(data, w);
        linear_forward(x, self.din, w, Some(&data[self.b.clone()]), y, n, self.din, self.dout);
    }

    /// Backward from `dy [n, dout]`: `dx += dy·W` (when given), and `dg`, `dV`, `db` accumulated
    /// into `grad` through the weight norm. `w` is the effective weight of the forward.
    #[allow(clippy::too_many_arguments)]
    fn backward(&self, data: &[f32], grad: &mut [f32], x: &[f32], n: usize, w: &[f32], dy: &[f32], dx: Option<&mut [f32]>) {
        let mut dw = vec![0f32; self.din * self.dout];
        let mut db = vec![0f32; self.dout];
        linear_backward(x, self.din, w, dy, n, self.din, self.dout, dx, &mut dw, Some(&mut db), Grads::Overwrite);
        let v = &data[self.v.clone()];
        let g = data[self.g.start] as f64;
        let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let dot: f64 = dw.iter().zip(v).map(|(&a, &b)| a as f64 * b as f64).sum();
        grad[self.g.start] += (dot / norm) as f32;
        let (a, c) = (g / norm, g * dot / (norm * norm * norm));
        for (gv, (&d, &vv)) in grad[self.v.clone()].iter_mut().zip(dw.iter().zip(v)) {
            *gv += (a * d as f64 - c * vv as f64) as f32;
        }
        for (gb, d) in grad[self.b.clone()].iter_mut().zip(&db) {
            *gb += d;
        }
    }
}

/// A plain `nn.Linear` of the head.
#[derive(Clone, Debug)]
struct PlainLinear {
    w: Range<usize>,
    b: Range<usize>,
    din: usize,
    dout: usize,
}

impl PlainLinear {
    fn new(p: &Params, prefix: &str, din: usize, dout: usize) -> Self {
        PlainLinear { w: range(p, &format!("{prefix}.weight")), b: range(p, &format!("{prefix}.bias")), din, dout }
    }

    fn forward(&self, data: &[f32], x: &[f32], n: usize, y: &mut [f32]) {
        linear_forward(x, self.din, &data[self.w.clone()], Some(&data[self.b.clone()]), y, n, self.din, self.dout);
    }

    fn backward(&self, data: &[f32], grad: &mut [f32], x: &[f32], n: usize, dy: &[f32], dx: Option<&mut [f32]>) {
        let (wr, br) = (self.w.clone(), self.b.clone());
        let mut db = vec![0f32; self.dout];
        let mut dw = vec![0f32; self.din * self.dout];
        linear_backward(x, self.din, &data[wr.clone()], dy, n, self.din, self.dout, dx, &mut dw, Some(&mut db), Grads::Overwrite);
        grad[wr].iter_mut().zip(&dw).for_each(|(g, d)| *g += d);
        grad[br].iter_mut().zip(&db).for_each(|(g, d)| *g += d);
    }
}

/// The head's inputs: the towers' tokens of one batch.
#[derive(Clone, Copy, Debug)]
pub struct HeadInput<'a> {
    pub batch: usize,
    pub text_len: usize,
    /// N = F·R region tokens per clip.
    pub regions: usize,
    /// `[B, L, P]` text tokens (after `txt_proj`).
    pub text: &'a [f32],
    /// `[B, 1+N, P]` video tokens (CLS first).
    pub video: &'a [f32],
    /// `[B, N]` 1 real / 0 padded region.
    pub object_mask: &'a [f32],
}

/// What the head computed for one batch (kept for the backward pass).
#[derive(Clone, Debug, Default)]
pub struct HeadActs {
    pub batch: usize,
    pub regions: usize,
    /// `q [B, P]`: max over text positions; `q_arg [B, P]` the position that won.
    pub question: Vec<f32>,
    q_arg: Vec<usize>,
    /// `o [B, N, P]`, `m [B, N]`.
    regions_in: Vec<f32>,
    mask: Vec<f32>,
    /// Attention branch: `vproj_pre/vproj [B, N, H]`, `qproj_pre/qproj [B, H]`,
    /// `joint [B, N, H]` (after dropout), `drop_mask [B, N, H]` (empty when off),
    /// `attention [B, N]` (softmax of the masked logits).
    vproj_pre: Vec<f32>,
    vproj: Vec<f32>,
    qproj_pre: Vec<f32>,
    qproj: Vec<f32>,
    joint: Vec<f32>,
    drop_mask: Vec<f32>,
    pub attention: Vec<f32>,
    /// `pooled [B, P]` = Σ attention · o.
    pooled: Vec<f32>,
    /// Classifier: `cq_pre/cq [B, H]`, `cv_pre/cv [B, H]`, `cjoint [B, H]`,
    /// `hid_pre/hid [B, 2H]`, `logits [B, answers]`.
    cq_pre: Vec<f32>,
    cq: Vec<f32>,
    cv_pre: Vec<f32>,
    cv: Vec<f32>,
    cjoint: Vec<f32>,
    hid_pre: Vec<f32>,
    hid: Vec<f32>,
    pub logits: Vec<f32>,
    /// Effective weights of the five weight-normalised layers.
    w: [Vec<f32>; 5],
}

/// The BUTD head with its own parameter buffers (`head.*`).
#[derive(Clone, Debug)]
pub struct QaHead {
    pub config: QaHeadConfig,
    pub params: Params,
    v_proj: WnLinear,
    q_proj: WnLinear,
    att_linear: WnLinear,
    cls_q: WnLinear,
    cls_v: WnLinear,
    main0: PlainLinear,
    main3: PlainLinear,
    pub acts: HeadActs,
}

impl QaHead {
    /// Declared, all zero.
    pub fn new(config: QaHeadConfig) -> QaHead {
        let mut pb = ParamsBuilder::new();
        declare_head(&mut pb, &config);
        QaHead::from_params(config, pb.build())
    }

    pub fn from_params(config: QaHeadConfig, params: Params) -> QaHead {
        let (p, h, a) = (config.dim, config.hidden, config.answers);
        QaHead {
            v_proj: WnLinear::new(&params, "head.v_att.v_proj.main.0", p, h),
            q_proj: WnLinear::new(&params, "head.v_att.q_proj.main.0", p, h),
            att_linear: WnLinear::new(&params, "head.v_att.linear", h, 1),
            cls_q: WnLinear::new(&params, "head.classifier.q_net.main.0", p, h),
            cls_v: WnLinear::new(&params, "head.classifier.v_net.main.0", p, h),
            main0: PlainLinear::new(&params, "head.classifier.main.0", h, 2 * h),
            main3: PlainLinear::new(&params, "head.classifier.main.3", 2 * h, a),
            config,
            params,
            acts: HeadActs::default(),
        }
    }

    /// Published-style initialisation: `nn.Linear`'s default (uniform ±1/√in for weights and
    /// biases); a weight-normalised layer's `g` starts at ‖V‖ (so W = V at first), as
    /// `weight_norm` initialises it.
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let specs = self.params.specs().to_vec();
        for s in &specs {
            if s.name.ends_with(".weight_g") {
                continue;
            }
            let fan_in = if s.name.ends_with(".bias") {
                let w = s.name.replace(
                    ".bias",
                    if self.params.id(&s.name.replace(".bias", ".weight_v")).is_some() { ".weight_v" } else { ".weight" },
                );
                self.params.spec(self.params.id(&w).expect("weight of a bias")).shape[1]
            } else {
                s.shape[1]
            };
            let bound = 1.0 / (fan_in as f32).sqrt();
            for x in &mut self.params.data[s.offset..s.offset + s.len] {
                *x = (2.0 * rng.uniform() - 1.0) * bound;
            }
        }
        for s in &specs {
            if let Some(prefix) = s.name.strip_suffix(".weight_g") {
                let v = self.params.get(self.params.id(&format!("{prefix}.weight_v")).unwrap());
                let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
                self.params.data[s.offset] = norm;
            }
        }
    }

    /// Forward from the towers' tokens. `dropout` = the attention dropout's generator in
    /// training (`None`: no dropout).
    pub fn forward(&mut self, x: &HeadInput, dropout: Option<&mut Rng>) {
        let (p, h, na) = (self.config.dim, self.config.hidden, self.config.answers);
        let (text, video, object_mask) = (x.text, x.video, x.object_mask);
        let (b, l, n) = (x.batch, x.text_len, x.regions);
        assert_eq!(text.len(), b * l * p, "text tokens must be [B, L, P]");
        assert_eq!(video.len(), b * (1 + n) * p, "video tokens must be [B, 1+N, P]");
        assert_eq!(object_mask.len(), b * n, "object mask must be [B, N]");
        let data = &self.params.data;
        let a = &mut self.acts;
        a.batch = b;
        a.regions = n;
        // 1. question = max over all L positions (the first maximum wins, as torch.max).
        a.question.clear();
        a.q_arg.clear();
        for bi in 0..b {
            for k in 0..p {
                let (mut best, mut arg) = (text[bi * l * p + k], 0);
                for t in 1..l {
                    let x = text[(bi * l + t) * p + k];
                    if x > best {
                        best = x;
                        arg = t;
                    }
                }
                a.question.push(best);
                a.q_arg.push(arg);
            }
        }
        // 2. regions without CLS.
        a.regions_in.clear();
        for bi in 0..b {
            a.regions_in.extend_from_slice(&video[(bi * (1 + n) + 1) * p..(bi + 1) * (1 + n) * p]);
        }
        a.mask.clear();
        a.mask.extend_from_slice(object_mask);
        // 3. attention.
        let [w_v, w_q, w_att, w_cq, w_cv] = &mut a.w;
        fit(&mut a.vproj_pre, b * n * h);
        self.v_proj.forward(data, &a.regions_in, b * n, w_v, &mut a.vproj_pre);
        fit(&mut a.vproj, b * n * h);
        relu_forward(&a.vproj_pre, &mut a.vproj);
        fit(&mut a.qproj_pre, b * h);
        self.q_proj.forward(data, &a.question, b, w_q, &mut a.qproj_pre);
        fit(&mut a.qproj, b * h);
        relu_forward(&a.qproj_pre, &mut a.qproj);
        fit(&mut a.joint, b * n * h);
        for bi in 0..b {
            for r in 0..n {
                let row = &mut a.joint[(bi * n + r) * h..(bi * n + r + 1) * h];
                let (vr, qr) = (&a.vproj[(bi * n + r) * h..(bi * n + r + 1) * h], &a.qproj[bi * h..(bi + 1) * h]);
                row.iter_mut().zip(vr.iter().zip(qr)).for_each(|(o, (x, y))| *o = x * y);
            }
        }
        a.drop_mask.clear();
        if let Some(rng) = dropout {
            a.drop_mask.resize(b * n * h, 0.0);
            dropout_mask(rng, ATTENTION_DROPOUT, &mut a.drop_mask);
            a.joint.iter_mut().zip(&a.drop_mask).for_each(|(x, m)| *x *= m);
        }
        let mut logits = vec![0f32; b * n];
        self.att_linear.forward(data, &a.joint, b * n, w_att, &mut logits);
        logits.iter_mut().zip(&a.mask).for_each(|(x, m)| *x *= m);
        fit(&mut a.attention, b * n);
        for bi in 0..b {
            softmax_row(&logits[bi * n..(bi + 1) * n], &mut a.attention[bi * n..(bi + 1) * n]);
        }
        a.pooled.clear();
        a.pooled.resize(b * p, 0.0);
        for bi in 0..b {
            for r in 0..n {
                let wgt = a.attention[bi * n + r];
                let o = &a.regions_in[(bi * n + r) * p..(bi * n + r + 1) * p];
                a.pooled[bi * p..(bi + 1) * p].iter_mut().zip(o).for_each(|(acc, x)| *acc += wgt * x);
            }
        }
        // 4. classifier.
        fit(&mut a.cq_pre, b * h);
        self.cls_q.forward(data, &a.question, b, w_cq, &mut a.cq_pre);
        fit(&mut a.cq, b * h);
        relu_forward(&a.cq_pre, &mut a.cq);
        fit(&mut a.cv_pre, b * h);
        self.cls_v.forward(data, &a.pooled, b, w_cv, &mut a.cv_pre);
        fit(&mut a.cv, b * h);
        relu_forward(&a.cv_pre, &mut a.cv);
        fit(&mut a.cjoint, b * h);
        a.cjoint.iter_mut().zip(a.cq.iter().zip(&a.cv)).for_each(|(o, (x, y))| *o = x * y);
        fit(&mut a.hid_pre, b * 2 * h);
        self.main0.forward(data, &a.cjoint, b, &mut a.hid_pre);
        fit(&mut a.hid, b * 2 * h);
        relu_forward(&a.hid_pre, &mut a.hid);
        fit(&mut a.logits, b * na);
        self.main3.forward(data, &a.hid, b, &mut a.logits);
    }

    /// Backward of the head from `d_logits [B, answers]`: accumulates into `self.params.grad`
    /// and writes d(text tokens) `[B, L, P]` and d(video tokens) `[B, 1+N, P]` (overwritten).
    pub fn backward(&mut self, d_logits: &[f32], l: usize, d_text: &mut [f32], d_video: &mut [f32]) {
        let (p, h) = (self.config.dim, self.config.hidden);
        let a = &self.acts;
        let (b, n) = (a.batch, a.regions);
        let data = &self.params.data;
        let grad = &mut self.params.grad;
        let [w_v, w_q, w_att, w_cq, w_cv] = &a.w;
        // 4. classifier.
        let mut d_hid = vec![0f32; b * 2 * h];
        self.main3.backward(data, grad, &a.hid, b, d_logits, Some(&mut d_hid));
        let mut d_hid_pre = vec![0f32; b * 2 * h];
        relu_backward(&a.hid_pre, &d_hid, &mut d_hid_pre);
        let mut d_cjoint = vec![0f32; b * h];
        self.main0.backward(data, grad, &a.cjoint, b, &d_hid_pre, Some(&mut d_cjoint));
        let d_cq: Vec<f32> = d_cjoint.iter().zip(&a.cv).map(|(d, y)| d * y).collect();
        let d_cv: Vec<f32> = d_cjoint.iter().zip(&a.cq).map(|(d, x)| d * x).collect();
        let mut d_cq_pre = vec![0f32; b * h];
        relu_backward(&a.cq_pre, &d_cq, &mut d_cq_pre);
        let mut d_cv_pre = vec![0f32; b * h];
        relu_backward(&a.cv_pre, &d_cv, &mut d_cv_pre);
        let mut d_question = vec![0f32; b * p];
        self.cls_q.backward(data, grad, &a.question, b, w_cq, &d_cq_pre, Some(&mut d_question));
        let mut d_pooled = vec![0f32; b * p];
        self.cls_v.backward(data, grad, &a.pooled, b, w_cv, &d_cv_pre, Some(&mut d_pooled));
        // 3. pooling: d o += attention · d_pooled; d attention = ⟨d_pooled, o⟩.
        let mut d_regions = vec![0f32; b * n * p];
        let mut d_att = vec![0f32; b * n];
        for bi in 0..b {
            let dp = &d_pooled[bi * p..(bi + 1) * p];
            for r in 0..n {
                let o = &a.regions_in[(bi * n + r) * p..(bi * n + r + 1) * p];
                d_att[bi * n + r] = o.iter().zip(dp).map(|(x, y)| x * y).sum();
                let wgt = a.attention[bi * n + r];
                d_regions[(bi * n + r) * p..(bi * n + r + 1) * p].iter_mut().zip(dp).for_each(|(g, d)| *g = wgt * d);
            }
        }
        // softmax backward per row, then the mask product.
        let mut d_logits_att = vec![0f32; b * n];
        for bi in 0..b {
            let (y, dy) = (&a.attention[bi * n..(bi + 1) * n], &d_att[bi * n..(bi + 1) * n]);
            let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
            for r in 0..n {
                d_logits_att[bi * n + r] = y[r] * (dy[r] - dot) * a.mask[bi * n + r];
            }
        }
        let mut d_joint = vec![0f32; b * n * h];
        self.att_linear.backward(data, grad, &a.joint, b * n, w_att, &d_logits_att, Some(&mut d_joint));
        if !a.drop_mask.is_empty() {
            d_joint.iter_mut().zip(&a.drop_mask).for_each(|(d, m)| *d *= m);
        }
        let mut d_vproj = vec![0f32; b * n * h];
        let mut d_qproj = vec![0f32; b * h];
        for bi in 0..b {
            let qr = &a.qproj[bi * h..(bi + 1) * h];
            for r in 0..n {
                let i = (bi * n + r) * h;
                for k in 0..h {
                    d_vproj[i + k] = d_joint[i + k] * qr[k];
                    d_qproj[bi * h + k] += d_joint[i + k] * a.vproj[i + k];
                }
            }
        }
        let mut d_vproj_pre = vec![0f32; b * n * h];
        relu_backward(&a.vproj_pre, &d_vproj, &mut d_vproj_pre);
        let mut d_qproj_pre = vec![0f32; b * h];
        relu_backward(&a.qproj_pre, &d_qproj, &mut d_qproj_pre);
        self.v_proj.backward(data, grad, &a.regions_in, b * n, w_v, &d_vproj_pre, Some(&mut d_regions));
        self.q_proj.backward(data, grad, &a.question, b, w_q, &d_qproj_pre, Some(&mut d_question));
        // 1–2. scatter onto the token layouts.
        assert_eq!(d_text.len(), b * l * p, "d_text must be [B, L, P]");
        assert_eq!(d_video.len(), b * (1 + n) * p, "d_video must be [B, 1+N, P]");
        d_text.fill(0.0);
        for bi in 0..b {
            for k in 0..p {
                d_text[(bi * l + a.q_arg[bi * p + k]) * p + k] = d_question[bi * p + k];
            }
        }
        for bi in 0..b {
            d_video[bi * (1 + n) * p..(bi * (1 + n) + 1) * p].fill(0.0);
            d_video[(bi * (1 + n) + 1) * p..(bi + 1) * (1 + n) * p].copy_from_slice(&d_regions[bi * n * p..(bi + 1) * n * p]);
        }
    }
}

fn fit(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Softmax of one row (max-subtracted, f32 like the published `nn.functional.softmax`).
fn softmax_row(x: &[f32], y: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut s = 0f32;
    for (o, &v) in y.iter_mut().zip(x) {
        *o = (v - m).exp();
        s += *o;
    }
    y.iter_mut().for_each(|o| *o /= s);
}

/// Mean cross-entropy of `logits [B, answers]` against `labels`, and d(loss)/d(logits).
pub fn cross_entropy(logits: &[f32], labels: &[usize], answers: usize) -> (f32, Vec<f32>) {
    let b = labels.len();
    assert_eq!(logits.len(), b * answers, "logits must be [B, answers]");
    let mut loss = 0f64;
    let mut d = vec![0f32; b * answers];
    for (bi, &y) in labels.iter().enumerate() {
        assert!(y < answers, "label {y} outside the {answers} answers");
        let row = &logits[bi * answers..(bi + 1) * answers];
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let s: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        loss += s.ln() + m as f64 - row[y] as f64;
        for k in 0..answers {
            let pk = ((row[k] - m) as f64).exp() / s;
            d[bi * answers + k] = ((pk - (k == y) as u8 as f64) / b as f64) as f32;
        }
    }
    ((loss / b as f64) as f32, d)
}

/// Everything one QA forward produced (borrowed from the model's buffers).
#[derive(Clone, Debug)]
pub struct QaOutputs {
    pub loss: f32,
    pub logits: Vec<f32>,
}

/// The published `ObjectQARelation`: the retrieval model plus the head.
#[derive(Clone, Debug)]
pub struct QaModel {
    pub base: Model,
    pub head: QaHead,
    dropout_rng: Rng,
    attention_dropout: bool,
}

impl QaModel {
    pub fn new(base: Model, head: QaHead) -> QaModel {
        assert_eq!(base.config.proj_dim, head.config.dim, "the head's width must be the model's projection width");
        QaModel { base, head, dropout_rng: Rng::new(0), attention_dropout: false }
    }

    /// The head's attention dropout in training steps (published: on, p = 0.2), seeded.
    pub fn set_attention_dropout(&mut self, on: bool, seed: u64) {
        self.attention_dropout = on;
        self.dropout_rng = Rng::new(seed);
    }

    /// Forward through both towers and the head. `train` applies the text and attention
    /// dropouts when set. Returns the logits `[B, answers]`.
    pub fn forward(&mut self, batch: &BatchRef, train: bool) -> &[f32] {
        let (b, l, n) = (batch.batch, batch.text_len, batch.frames * batch.regions);
        let (text, video) = self.base.forward_tokens(batch, train);
        let dropout = (train && self.attention_dropout).then_some(&mut self.dropout_rng);
        let input = HeadInput { batch: b, text_len: l, regions: n, text, video, object_mask: batch.object_mask };
        self.head.forward(&input, dropout);
        &self.head.acts.logits
    }

    /// Forward, cross-entropy against `labels`, and backward into both parameter sets'
    /// gradients (zeroed first).
    pub fn forward_backward(&mut self, batch: &BatchRef, labels: &[usize]) -> QaOutputs {
        self.base.params.zero_grad();
        self.head.params.zero_grad();
        self.forward(batch, true);
        let (loss, d_logits) = cross_entropy(&self.head.acts.logits, labels, self.head.config.answers);
        let (b, l, n, p) = (batch.batch, batch.text_len, batch.frames * batch.regions, self.head.config.dim);
        let mut d_text = vec![0f32; b * l * p];
        let mut d_video = vec![0f32; b * (1 + n) * p];
        self.head.backward(&d_logits, l, &mut d_text, &mut d_video);
        self.base.backward_tokens(batch, &d_text, &d_video);
        QaOutputs { loss, logits: self.head.acts.logits.clone() }
    }
}
