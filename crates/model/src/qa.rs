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

use demovlp_kernels::Rng;

use crate::backend::{host, zeroed, Backend, Cpu, LateRead, StagingPair};
use crate::model::{BatchRef, Model};
use crate::params::{Params, ParamsBuilder};

mod layers;
use layers::{GradScratch, PlainLinear, WnLinear};

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

/// The head's inputs: the towers' tokens of one batch (views of the backend `B`).
pub struct HeadInput<'a, B: Backend = Cpu> {
    pub batch: usize,
    pub text_len: usize,
    /// N = F·R region tokens per clip.
    pub regions: usize,
    /// `[B, L, P]` text tokens (after `txt_proj`).
    pub text: B::View<'a>,
    /// `[B, 1+N, P]` video tokens (CLS first).
    pub video: B::View<'a>,
    /// `[B, N]` 1 real / 0 padded region.
    pub object_mask: B::View<'a>,
}

impl<B: Backend> Clone for HeadInput<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for HeadInput<'_, B> {}

/// What the head computed for one batch (kept for the backward pass), in buffers of `B`.
#[derive(Clone, Debug, Default)]
pub struct HeadActs<B: Backend = Cpu> {
    pub batch: usize,
    pub regions: usize,
    /// `q [B, P]`: max over text positions; `q_arg [B, P]` the position that won (as f32).
    pub question: B::Buf,
    q_arg: B::Buf,
    /// `o [B, N, P]`, `m [B, N]`.
    regions_in: B::Buf,
    mask: B::Buf,
    /// Attention branch: `vproj_pre/vproj [B, N, H]`, `qproj_pre/qproj [B, H]`,
    /// `joint [B, N, H]` (after dropout), `drop_mask [B, N, H]` (unused when off),
    /// `att_logits [B, N]` (masked), `attention [B, N]` (their softmax).
    vproj_pre: B::Buf,
    vproj: B::Buf,
    qproj_pre: B::Buf,
    qproj: B::Buf,
    joint: B::Buf,
    drop_mask: B::Buf,
    dropped: bool,
    att_logits: B::Buf,
    pub attention: B::Buf,
    /// `pooled [B, P]` = Σ attention · o.
    pooled: B::Buf,
    /// Classifier: `cq_pre/cq [B, H]`, `cv_pre/cv [B, H]`, `cjoint [B, H]`,
    /// `hid_pre/hid [B, 2H]`, `logits [B, answers]`.
    cq_pre: B::Buf,
    cq: B::Buf,
    cv_pre: B::Buf,
    cv: B::Buf,
    cjoint: B::Buf,
    hid_pre: B::Buf,
    hid: B::Buf,
    pub logits: B::Buf,
    /// Effective weights of the five weight-normalised layers.
    w: [B::Buf; 5],
}

/// The backward pass's buffers (fitted once per shape, reused).
#[derive(Clone, Debug, Default)]
struct HeadGrads<B: Backend> {
    scratch: GradScratch<B>,
    hid: B::Buf,
    hid_pre: B::Buf,
    cjoint: B::Buf,
    cq: B::Buf,
    cv: B::Buf,
    cq_pre: B::Buf,
    cv_pre: B::Buf,
    question: B::Buf,
    pooled: B::Buf,
    regions: B::Buf,
    att: B::Buf,
    att_logits: B::Buf,
    joint: B::Buf,
    vproj: B::Buf,
    qproj: B::Buf,
    vproj_pre: B::Buf,
    qproj_pre: B::Buf,
}

/// The BUTD head with its own parameter buffers (`head.*`) on the backend `B`.
#[derive(Clone, Debug)]
pub struct QaHead<B: Backend = Cpu> {
    pub config: QaHeadConfig,
    pub params: Params<B>,
    backend: B,
    v_proj: WnLinear,
    q_proj: WnLinear,
    att_linear: WnLinear,
    cls_q: WnLinear,
    cls_v: WnLinear,
    main0: PlainLinear,
    main3: PlainLinear,
    pub acts: HeadActs<B>,
    grads: HeadGrads<B>,
}

impl QaHead<Cpu> {
    /// Declared, all zero.
    pub fn new(config: QaHeadConfig) -> QaHead {
        QaHead::new_on(Cpu, config)
    }

    pub fn from_params(config: QaHeadConfig, params: Params) -> QaHead {
        QaHead::from_params_on(Cpu, config, params)
    }
}

impl<B: Backend> QaHead<B> {
    /// Declared, all zero, on `backend`.
    pub fn new_on(backend: B, config: QaHeadConfig) -> Self {
        let mut pb = ParamsBuilder::new();
        declare_head(&mut pb, &config);
        let params = pb.build_on(&backend);
        QaHead::from_params_on(backend, config, params)
    }

    pub fn from_params_on(backend: B, config: QaHeadConfig, params: Params<B>) -> Self {
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
            backend,
            acts: HeadActs::default(),
            grads: HeadGrads::default(),
        }
    }

    /// The backend every buffer and kernel of this head lives on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Sets every parameter gradient to 0.
    pub fn zero_grad(&mut self) {
        self.backend.fill_zero(B::view_mut(&mut self.params.grad));
    }

    /// Published-style initialisation: `nn.Linear`'s default (uniform ±1/√in for weights and
    /// biases); a weight-normalised layer's `g` starts at ‖V‖ (so W = V at first), as
    /// `weight_norm` initialises it. Drawn on the host, then written to the backend.
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let be = self.backend.clone();
        let mut data = be.to_host(B::view(&self.params.data));
        let specs = self.params.specs().to_vec();
        let p = &self.params;
        for s in &specs {
            if s.name.ends_with(".weight_g") {
                continue;
            }
            let fan_in = if s.name.ends_with(".bias") {
                let w =
                    s.name.replace(".bias", if p.id(&s.name.replace(".bias", ".weight_v")).is_some() { ".weight_v" } else { ".weight" });
                p.spec(p.id(&w).expect("weight of a bias")).shape[1]
            } else {
                s.shape[1]
            };
            let bound = 1.0 / (fan_in as f32).sqrt();
            for x in &mut data[s.offset..s.offset + s.len] {
                *x = (2.0 * rng.uniform() - 1.0) * bound;
            }
        }
        for s in &specs {
            if let Some(prefix) = s.name.strip_suffix(".weight_g") {
                let v = p.range(p.id(&format!("{prefix}.weight_v")).unwrap());
                let norm = data[v].iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
                data[s.offset] = norm;
            }
        }
        let n = data.len();
        be.write_host(&mut self.params.data, n, |d| d.copy_from_slice(&data));
    }

    /// Forward from the towers' tokens. `dropout` = the attention dropout's generator in
    /// training (`None`: no dropout).
    pub fn forward(&mut self, x: &HeadInput<'_, B>, dropout: Option<&mut Rng>) {
        let (p, h, na) = (self.config.dim, self.config.hidden, self.config.answers);
        let (b, l, n) = (x.batch, x.text_len, x.regions);
        assert_eq!(B::view_len(x.text), b * l * p, "text tokens must be [B, L, P]");
        assert_eq!(B::view_len(x.video), b * (1 + n) * p, "video tokens must be [B, 1+N, P]");
        assert_eq!(B::view_len(x.object_mask), b * n, "object mask must be [B, N]");
        let be = &self.backend;
        let data = B::view(&self.params.data);
        let a = &mut self.acts;
        a.batch = b;
        a.regions = n;
        let fit = |buf: &mut B::Buf, len: usize| {
            be.fit(buf, len);
        };
        // 1. question = max over all L positions (the first maximum wins, as torch.max).
        fit(&mut a.question, b * p);
        fit(&mut a.q_arg, b * p);
        be.max_over_positions(x.text, B::view_mut(&mut a.q_arg), B::view_mut(&mut a.question), b, l, p);
        // 2. regions without CLS.
        fit(&mut a.regions_in, b * n * p);
        be.copy_2d(x.video, p, (1 + n) * p, B::view_mut(&mut a.regions_in), 0, n * p, b, n * p);
        fit(&mut a.mask, b * n);
        be.copy(x.object_mask, B::view_mut(&mut a.mask));
        // 3. attention.
        let [w_v, w_q, w_att, w_cq, w_cv] = &mut a.w;
        fit(&mut a.vproj_pre, b * n * h);
        self.v_proj.forward(be, data, B::view(&a.regions_in), b * n, w_v, B::view_mut(&mut a.vproj_pre));
        fit(&mut a.vproj, b * n * h);
        be.relu_forward(B::view(&a.vproj_pre), B::view_mut(&mut a.vproj));
        fit(&mut a.qproj_pre, b * h);
        self.q_proj.forward(be, data, B::view(&a.question), b, w_q, B::view_mut(&mut a.qproj_pre));
        fit(&mut a.qproj, b * h);
        be.relu_forward(B::view(&a.qproj_pre), B::view_mut(&mut a.qproj));
        fit(&mut a.joint, b * n * h);
        be.mul_broadcast(B::view(&a.vproj), B::view(&a.qproj), B::view_mut(&mut a.joint), b, n, h);
        a.dropped = dropout.is_some();
        if let Some(rng) = dropout {
            be.dropout_mask(rng, ATTENTION_DROPOUT, &mut a.drop_mask, b * n * h);
            be.mul_in_place(B::view_mut(&mut a.joint), B::view(&a.drop_mask));
        }
        fit(&mut a.att_logits, b * n);
        self.att_linear.forward(be, data, B::view(&a.joint), b * n, w_att, B::view_mut(&mut a.att_logits));
        be.mul_in_place(B::view_mut(&mut a.att_logits), B::view(&a.mask));
        fit(&mut a.attention, b * n);
        be.softmax_rows(B::view(&a.att_logits), B::view_mut(&mut a.attention), n);
        fit(&mut a.pooled, b * p);
        be.weighted_sum(B::view(&a.attention), B::view(&a.regions_in), B::view_mut(&mut a.pooled), b, n, p);
        // 4. classifier.
        fit(&mut a.cq_pre, b * h);
        self.cls_q.forward(be, data, B::view(&a.question), b, w_cq, B::view_mut(&mut a.cq_pre));
        fit(&mut a.cq, b * h);
        be.relu_forward(B::view(&a.cq_pre), B::view_mut(&mut a.cq));
        fit(&mut a.cv_pre, b * h);
        self.cls_v.forward(be, data, B::view(&a.pooled), b, w_cv, B::view_mut(&mut a.cv_pre));
        fit(&mut a.cv, b * h);
        be.relu_forward(B::view(&a.cv_pre), B::view_mut(&mut a.cv));
        fit(&mut a.cjoint, b * h);
        be.copy(B::view(&a.cq), B::view_mut(&mut a.cjoint));
        be.mul_in_place(B::view_mut(&mut a.cjoint), B::view(&a.cv));
        fit(&mut a.hid_pre, b * 2 * h);
        self.main0.forward(be, data, B::view(&a.cjoint), b, B::view_mut(&mut a.hid_pre));
        fit(&mut a.hid, b * 2 * h);
        be.relu_forward(B::view(&a.hid_pre), B::view_mut(&mut a.hid));
        fit(&mut a.logits, b * na);
        self.main3.forward(be, data, B::view(&a.hid), b, B::view_mut(&mut a.logits));
    }

    /// Backward of the head from `d_logits [B, answers]`: accumulates into `self.params.grad`
    /// and writes d(text tokens) `[B, L, P]` and d(video tokens) `[B, 1+N, P]` (overwritten).
    pub fn backward(&mut self, d_logits: B::View<'_>, l: usize, d_text: B::ViewMut<'_>, mut d_video: B::ViewMut<'_>) {
        let (p, h) = (self.config.dim, self.config.hidden);
        let be = &self.backend;
        let a = &self.acts;
        let (b, n) = (a.batch, a.regions);
        let data = B::view(&self.params.data);
        let mut grad = B::view_mut(&mut self.params.grad);
        let g = &mut self.grads;
        let [w_v, w_q, w_att, w_cq, w_cv] = &a.w;
        // 4. classifier.
        let d_hid = zeroed(be, &mut g.hid, b * 2 * h);
        self.main3.backward(be, data, B::reborrow(&mut grad), &mut g.scratch, v::<B>(&a.hid), b, d_logits, Some(d_hid));
        let d_hid_pre = zeroed(be, &mut g.hid_pre, b * 2 * h);
        be.relu_backward(v::<B>(&a.hid_pre), v::<B>(&g.hid), d_hid_pre);
        let d_cjoint = zeroed(be, &mut g.cjoint, b * h);
        self.main0.backward(be, data, B::reborrow(&mut grad), &mut g.scratch, v::<B>(&a.cjoint), b, v::<B>(&g.hid_pre), Some(d_cjoint));
        be.fit(&mut g.cq, b * h);
        be.copy(v::<B>(&g.cjoint), B::view_mut(&mut g.cq));
        be.mul_in_place(B::view_mut(&mut g.cq), v::<B>(&a.cv));
        be.fit(&mut g.cv, b * h);
        be.copy(v::<B>(&g.cjoint), B::view_mut(&mut g.cv));
        be.mul_in_place(B::view_mut(&mut g.cv), v::<B>(&a.cq));
        let d_cq_pre = zeroed(be, &mut g.cq_pre, b * h);
        be.relu_backward(v::<B>(&a.cq_pre), v::<B>(&g.cq), d_cq_pre);
        let d_cv_pre = zeroed(be, &mut g.cv_pre, b * h);
        be.relu_backward(v::<B>(&a.cv_pre), v::<B>(&g.cv), d_cv_pre);
        let d_question = zeroed(be, &mut g.question, b * p);
        self.cls_q.backward(
            be,
            data,
            B::reborrow(&mut grad),
            &mut g.scratch,
            v::<B>(&a.question),
            b,
            w_cq,
            v::<B>(&g.cq_pre),
            Some(d_question),
        );
        let d_pooled = zeroed(be, &mut g.pooled, b * p);
        self.cls_v.backward(
            be,
            data,
            B::reborrow(&mut grad),
            &mut g.scratch,
            v::<B>(&a.pooled),
            b,
            w_cv,
            v::<B>(&g.cv_pre),
            Some(d_pooled),
        );
        // 3. pooling: d o = attention · d_pooled; d attention = ⟨d_pooled, o⟩.
        be.fit(&mut g.regions, b * n * p);
        be.fit(&mut g.att, b * n);
        be.weighted_sum_backward(
            v::<B>(&a.attention),
            v::<B>(&a.regions_in),
            v::<B>(&g.pooled),
            B::view_mut(&mut g.att),
            B::view_mut(&mut g.regions),
            b,
            n,
            p,
        );
        // softmax backward per row, then the mask product.
        be.fit(&mut g.att_logits, b * n);
        be.softmax_rows_backward(v::<B>(&a.attention), v::<B>(&g.att), B::view_mut(&mut g.att_logits), n);
        be.mul_in_place(B::view_mut(&mut g.att_logits), v::<B>(&a.mask));
        let d_joint = zeroed(be, &mut g.joint, b * n * h);
        self.att_linear.backward(
            be,
            data,
            B::reborrow(&mut grad),
            &mut g.scratch,
            v::<B>(&a.joint),
            b * n,
            w_att,
            v::<B>(&g.att_logits),
            Some(d_joint),
        );
        if a.dropped {
            be.mul_in_place(B::view_mut(&mut g.joint), v::<B>(&a.drop_mask));
        }
        be.fit(&mut g.vproj, b * n * h);
        let d_qproj = zeroed(be, &mut g.qproj, b * h);
        be.mul_broadcast_backward(v::<B>(&a.vproj), v::<B>(&a.qproj), v::<B>(&g.joint), B::view_mut(&mut g.vproj), d_qproj, b, n, h);
        let d_vproj_pre = zeroed(be, &mut g.vproj_pre, b * n * h);
        be.relu_backward(v::<B>(&a.vproj_pre), v::<B>(&g.vproj), d_vproj_pre);
        let d_qproj_pre = zeroed(be, &mut g.qproj_pre, b * h);
        be.relu_backward(v::<B>(&a.qproj_pre), v::<B>(&g.qproj), d_qproj_pre);
        let d_regions = B::view_mut(&mut g.regions);
        self.v_proj.backward(
            be,
            data,
            B::reborrow(&mut grad),
            &mut g.scratch,
            v::<B>(&a.regions_in),
            b * n,
            w_v,
            v::<B>(&g.vproj_pre),
            Some(d_regions),
        );
        let d_question = B::view_mut(&mut g.question);
        self.q_proj.backward(be, data, grad, &mut g.scratch, v::<B>(&a.question), b, w_q, v::<B>(&g.qproj_pre), Some(d_question));
        // 1–2. scatter onto the token layouts.
        assert_eq!(B::view_mut_len(&d_text), b * l * p, "d_text must be [B, L, P]");
        assert_eq!(B::view_mut_len(&d_video), b * (1 + n) * p, "d_video must be [B, 1+N, P]");
        be.max_over_positions_backward(v::<B>(&g.question), v::<B>(&a.q_arg), d_text, b, l, p);
        be.fill_zero(B::reborrow(&mut d_video));
        be.copy_2d(v::<B>(&g.regions), 0, n * p, d_video, p, (1 + n) * p, b, n * p);
    }
}

fn v<B: Backend>(x: &B::Buf) -> B::View<'_> {
    B::view(x)
}

/// Mean cross-entropy of `logits [B, answers]` against `labels`, and d(loss)/d(logits).
pub fn cross_entropy(logits: &[f32], labels: &[usize], answers: usize) -> (f32, Vec<f32>) {
    let mut d = vec![0f32; labels.len() * answers];
    let loss = host::cross_entropy(logits, labels, answers, &mut d);
    (loss, d)
}

/// Everything one QA forward produced (on the host).
#[derive(Clone, Debug)]
pub struct QaOutputs {
    pub loss: f32,
    pub logits: Vec<f32>,
}

/// The published `ObjectQARelation`: the retrieval model plus the head, on the backend `B`.
#[derive(Clone, Debug)]
pub struct QaModel<B: Backend = Cpu> {
    pub base: Model<B>,
    pub head: QaHead<B>,
    dropout_rng: Rng,
    attention_dropout: bool,
    /// The batch's object mask uploaded, d(logits), d(text tokens), d(video tokens), the
    /// loss of a step read late.
    mask: StagingPair<B>,
    d_logits: B::Buf,
    loss: B::Buf,
    d_text: B::Buf,
    d_video: B::Buf,
}

impl QaModel {
    /// A copy of both parameter sets on `be`.
    pub fn on_backend<C: Backend>(&self, be: &C) -> QaModel<C> {
        let head = QaHead::from_params_on(be.clone(), self.head.config, self.head.params.to_backend(&Cpu, be));
        QaModel::new(self.base.on_backend(be), head)
    }
}

impl<B: Backend> QaModel<B> {
    pub fn new(base: Model<B>, head: QaHead<B>) -> Self {
        assert_eq!(base.config.proj_dim, head.config.dim, "the head's width must be the model's projection width");
        QaModel {
            base,
            head,
            dropout_rng: Rng::new(0),
            attention_dropout: false,
            mask: StagingPair::default(),
            d_logits: B::Buf::default(),
            loss: B::Buf::default(),
            d_text: B::Buf::default(),
            d_video: B::Buf::default(),
        }
    }

    /// The head's attention dropout in training steps (published: on, p = 0.2), seeded.
    pub fn set_attention_dropout(&mut self, on: bool, seed: u64) {
        self.attention_dropout = on;
        self.dropout_rng = Rng::new(seed);
    }

    /// Forward through both towers and the head. `train` applies the text and attention
    /// dropouts when set. Returns the logits `[B, answers]`.
    pub fn forward(&mut self, batch: &BatchRef, train: bool) -> B::View<'_> {
        let (b, l, n) = (batch.batch, batch.text_len, batch.frames * batch.regions);
        let be = self.base.backend().clone();
        let (text, video) = self.base.forward_tokens(batch, train);
        let object_mask = be.input_batch(batch.object_mask, &mut self.mask);
        let dropout = (train && self.attention_dropout).then_some(&mut self.dropout_rng);
        let input = HeadInput { batch: b, text_len: l, regions: n, text, video, object_mask };
        self.head.forward(&input, dropout);
        B::view(&self.head.acts.logits)
    }

    /// Forward, cross-entropy against `labels`, and backward into both parameter sets'
    /// gradients (zeroed first). The token gradients stay on the backend; the logits are read
    /// back (see [`QaModel::forward_backward_loss`] for a training step that needs only the loss).
    pub fn forward_backward(&mut self, batch: &BatchRef, labels: &[usize]) -> QaOutputs {
        let loss = self.forward_backward_loss(batch, labels);
        QaOutputs { loss, logits: self.base.backend().to_host(B::view(&self.head.acts.logits)) }
    }

    /// [`QaModel::forward_backward`] returning the loss only: nothing but the loss is read
    /// back from the backend (the logits stay in `head.acts.logits`).
    pub fn forward_backward_loss(&mut self, batch: &BatchRef, labels: &[usize]) -> f32 {
        let be = self.base.backend().clone();
        self.forward_logits(batch);
        let answers = self.head.config.answers;
        let loss = be.cross_entropy(B::view(&self.head.acts.logits), labels, answers, &mut self.d_logits);
        self.backward_from_logits(batch);
        loss
    }

    /// [`QaModel::forward_backward_loss`] that reads nothing back: the loss (one value)
    /// comes with [`LateRead::wait`], so a training loop can queue the next step before it
    /// waits for this one's.
    pub fn forward_backward_late(&mut self, batch: &BatchRef, labels: &[usize]) -> LateRead {
        let be = self.base.backend().clone();
        self.forward_logits(batch);
        let answers = self.head.config.answers;
        be.cross_entropy_late(B::view(&self.head.acts.logits), labels, answers, &mut self.d_logits, &mut self.loss);
        self.backward_from_logits(batch);
        be.read_late(B::view(&self.loss))
    }

    /// Gradients zeroed, then the training forward pass to the logits.
    fn forward_logits(&mut self, batch: &BatchRef) {
        let be = self.base.backend().clone();
        be.fill_zero(B::view_mut(&mut self.base.params.grad));
        self.head.zero_grad();
        self.forward(batch, true);
    }

    /// The backward pass from d(logits) in `d_logits` into both parameter sets' gradients.
    fn backward_from_logits(&mut self, batch: &BatchRef) {
        let be = self.base.backend().clone();
        let (b, l, n, p) = (batch.batch, batch.text_len, batch.frames * batch.regions, self.head.config.dim);
        be.fit(&mut self.d_text, b * l * p);
        be.fit(&mut self.d_video, b * (1 + n) * p);
        self.head.backward(B::view(&self.d_logits), l, B::view_mut(&mut self.d_text), B::view_mut(&mut self.d_video));
        self.base.backward_tokens_on(batch, B::view(&self.d_text), B::view(&self.d_video));
    }
}
