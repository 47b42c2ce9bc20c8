//! The whole DemoVLP model: text tower → ReLU → `txt_proj` Linear(D→P) on every token, video
//! tower with its own projection, the retrieval losses, and explicit backward passes into
//! `params.grad`. Activations live in an arena of reusable buffers sized by the largest
//! batch seen so far, so steady-state training steps allocate nothing here. Every buffer is
//! one of the backend `B` and every kernel runs through it ([`crate::backend`]); the default
//! `Model` is `Model<Cpu>`. Evaluation embeddings are in `model/embed.rs`.

mod embed;

use crate::adamw::{updated_ranges, AdamW, FusedStep};
use crate::backend::{zeroed, Backend, Cpu, LateRead, LossDims, LossGradBufs, LossViews, StagingPair};
use crate::config::{ModelConfig, TextKind};
use crate::layers::{Grads, Linear};
use crate::mask::{additive_mask, PAD_SCORE};
use crate::params::{Params, ParamsBuilder};
use crate::text::{self, TextActs, TextDropout, TextInput, TextShape, TextTower};
use crate::video::{self, VideoActs, VideoInput, VideoShape, VideoTower};
use demovlp_kernels::Rng;
use demovlp_retrieval::{LossConfig, LossOutputs};
use std::ops::Range;
use std::time::Instant;

/// One training/evaluation batch (borrowed).
#[derive(Clone, Copy, Debug)]
pub struct BatchRef<'a> {
    pub batch: usize,
    pub frames: usize,
    pub regions: usize,
    pub text_len: usize,
    /// `[B, F, R, 2054]`
    pub object: &'a [f32],
    /// `[B, F, R]`, 1 real / 0 padding
    pub object_mask: &'a [f32],
    /// `[B, L]`
    pub input_ids: &'a [i64],
    /// `[B, L]`
    pub attention_mask: &'a [i64],
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextEmbeddings {
    /// `[B, P]` (token 0)
    pub global: Vec<f32>,
    /// `[B, L-1, P]` (tokens 1.., padding included)
    pub local: Vec<f32>,
    /// `[B, L-1]`: 0 real / −100 padding
    pub mask_additive: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VideoEmbeddings {
    /// `[B, P]` (the CLS token)
    pub global: Vec<f32>,
    /// `[B, F·R, P]`
    pub local: Vec<f32>,
    /// `[B, F·R]`: 0 real / −100 padding
    pub mask_additive: Vec<f32>,
}

/// Wall-clock seconds of each phase of the last [`Model::forward_backward`] or
/// [`Model::train_step_fused`] call (for profiling; `bench train-step` prints them).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    pub text_forward: f64,
    pub video_forward: f64,
    pub loss: f64,
    pub text_backward: f64,
    pub video_backward: f64,
}

/// Reused buffers: the towers' arenas, the heads, and the loss's inputs and gradients.
#[derive(Clone, Debug, Default)]
struct Arena<B: Backend> {
    text: TextActs<B>,
    video: VideoActs<B>,
    /// ReLU(last hidden state) `[B, L, D]`
    relu: B::Buf,
    /// txt_proj output `[B, L, P]`
    text_out: B::Buf,
    /// The loss's inputs: `[B, P]` token 0 of each tower, `[B, L-1, P]` the words,
    /// `[B, F·R, P]` the regions, `[B, L-1]` and `[B, F·R]` their additive masks.
    global_text: B::Buf,
    local_text: B::Buf,
    text_mask: B::Buf,
    global_video: B::Buf,
    local_video: B::Buf,
    video_mask: B::Buf,
    /// The loss's gradients on its inputs (same layouts), kept across steps.
    loss_grads: LossGradBufs<B>,
    /// `[loss_global, loss_local]` on the device, of a step whose losses are read late.
    loss_scalars: B::Buf,
    /// The loss's gradients on the token layouts: `[B, L, P]` and `[B, 1+F·R, P]`.
    d_text_out: B::Buf,
    d_video_out: B::Buf,
    /// `[B, L, D]` each: d(ReLU output), d(last hidden state).
    d_relu: B::Buf,
    d_hidden: B::Buf,
}

/// Where host inputs land on a device backend for one batch (unused on the CPU, whose
/// views of host memory are the host slices themselves).
#[derive(Clone, Debug, Default)]
struct Staging<B: Backend> {
    /// `[B, F, R, 2054]` region features (two buffers, consecutive batches in turn).
    object: StagingPair<B>,
    /// Token gradients given to [`Model::backward_tokens`].
    d_text: B::Buf,
    d_video: B::Buf,
}

#[derive(Clone, Debug)]
pub struct Model<B: Backend = Cpu> {
    pub config: ModelConfig,
    pub params: Params<B>,
    backend: B,
    text: TextTower,
    video: VideoTower,
    txt_proj: Linear,
    arena: Box<Arena<B>>,
    staging: Staging<B>,
    /// Text dropout of training steps (off by default; see [`TextDropout::PUBLISHED`]).
    text_dropout: TextDropout,
    dropout_rng: Rng,
    /// Phase timings of the last `forward_backward` / `train_step_fused`.
    pub phase_times: PhaseTimes,
    /// Element ranges AdamW updates, and those of them outside every transformer block and
    /// the word table (the fused step updates these from `params.grad` at the end).
    updated_ranges: Vec<(usize, usize)>,
    rest_ranges: Vec<(usize, usize)>,
    /// The word-embedding table: the fused step updates it from its gradient rows.
    word_range: Range<usize>,
    /// One block's gradients during [`Model::train_step_fused`].
    grad_scratch: B::Buf,
}

/// Video blocks that recompute their MLP activations by default: none. Since the word
/// table's gradient is kept by row, a published-size training step (batch 8, 8 × 30
/// regions) keeps every video block's and still peaks near 2.73 GiB, under 0.6 × what the
/// PyTorch implementation needs. Each recomputing block saves ~23 MiB for 9.4 GFLOP.
pub const DEFAULT_RECOMPUTE_MLP_BLOCKS: usize = 0;

/// The parts of `ranges` (sorted, disjoint) outside every window of `windows` (sorted).
fn subtract_windows(ranges: &[(usize, usize)], windows: &[Range<usize>]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &(mut r0, r1) in ranges {
        for w in windows {
            if w.end <= r0 || w.start >= r1 {
                continue;
            }
            if w.start > r0 {
                out.push((r0, w.start));
            }
            r0 = r0.max(w.end);
        }
        if r0 < r1 {
            out.push((r0, r1));
        }
    }
    out
}

/// The tensors of `config` in published state_dict order (`text_model.*`, `object_model.*`,
/// `txt_proj.1.*`), not yet allocated.
fn param_builder(config: &ModelConfig) -> ParamsBuilder {
    let mut pb = ParamsBuilder::new();
    text::declare(&mut pb, &config.text);
    video::declare(&mut pb, &config.video, config.proj_dim);
    pb.add("txt_proj.1.weight", &[config.proj_dim, config.text.dim]);
    pb.add("txt_proj.1.bias", &[config.proj_dim]);
    pb
}

/// Declares every parameter of `config` in published state_dict order
/// (`text_model.*`, `object_model.*`, `txt_proj.1.*`).
pub fn declare_params(config: &ModelConfig) -> Params {
    param_builder(config).build()
}

impl Model<Cpu> {
    /// All parameters declared and zero.
    pub fn new(config: ModelConfig) -> Model {
        Model::new_on(Cpu, config)
    }

    /// Wraps parameters declared by [`declare_params`] for the same config (e.g. loaded ones).
    pub fn from_params(config: ModelConfig, params: Params) -> Model {
        Model::from_params_on(Cpu, config, params)
    }

    /// A copy of this model's weights on `be` (one transfer per parameter buffer).
    pub fn on_backend<C: Backend>(&self, be: &C) -> Model<C> {
        Model::from_params_on(be.clone(), self.config.clone(), self.params.to_backend(&Cpu, be))
    }
}

impl<B: Backend> Model<B> {
    /// All parameters declared and zero, on `backend`.
    pub fn new_on(backend: B, config: ModelConfig) -> Self {
        let params = param_builder(&config).build_on(&backend);
        Model::from_params_on(backend, config, params)
    }

    /// Wraps parameters of `backend` declared by [`declare_params`] for the same config.
    pub fn from_params_on(backend: B, config: ModelConfig, params: Params<B>) -> Self {
        let text = TextTower::new(&params, &config.text);
        let video = VideoTower::new(&params, &config.video, config.proj_dim);
        let txt_proj = Linear::new(&params, "txt_proj.1", config.text.dim, config.proj_dim, true);
        // By default the first DEFAULT_RECOMPUTE_MLP_BLOCKS video blocks recompute their MLP
        // hidden activations in the backward pass (see `set_recompute_mlp_blocks`).
        let mut arena: Box<Arena<B>> = Box::default();
        arena.video.recompute_mlp_blocks = DEFAULT_RECOMPUTE_MLP_BLOCKS;
        let updated_ranges = updated_ranges(&params);
        let word_range = text.word_range();
        assert!(
            updated_ranges.iter().any(|&(r0, r1)| r0 <= word_range.start && word_range.end <= r1),
            "the word-embedding table must be trained as a whole"
        );
        let mut windows: Vec<Range<usize>> =
            text.layer_windows().iter().chain(video.block_windows()).chain([&word_range]).cloned().collect();
        windows.sort_by_key(|w| w.start);
        let rest_ranges = subtract_windows(&updated_ranges, &windows);
        Model {
            config,
            params,
            backend,
            text,
            video,
            txt_proj,
            arena,
            staging: Staging::default(),
            text_dropout: TextDropout::default(),
            dropout_rng: Rng::new(0),
            phase_times: PhaseTimes::default(),
            updated_ranges,
            rest_ranges,
            word_range,
            grad_scratch: B::Buf::default(),
        }
    }

    /// The backend every buffer and kernel of this model lives on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Published-style initialisation for training from scratch: weights of linears and
    /// embeddings ~ N(0, 0.02) truncated at ±2σ (timm `trunc_normal_(std=.02)` / HF
    /// `normal_(0.02)`), biases 0, LayerNorm weight 1 / bias 0, `temporal_embed` 0 (as
    /// declared in the published code), the word embedding of the padding id 0 zeroed (HF).
    pub fn init_random(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let specs = self.params.specs().to_vec();
        for s in &specs {
            let n = &s.name;
            let is_norm = n.contains("LayerNorm") || n.contains("layer_norm") || n.contains(".norm");
            self.backend.modify_host(&mut self.params.data, s.offset..s.offset + s.len, |v| {
                if is_norm && n.ends_with(".weight") {
                    v.fill(1.0);
                } else if n.ends_with(".bias") || n == "object_model.temporal_embed" {
                    v.fill(0.0);
                } else {
                    for x in v.iter_mut() {
                        *x = loop {
                            let z = rng.normal();
                            if z.abs() <= 2.0 {
                                break 0.02 * z;
                            }
                        };
                    }
                }
            });
        }
        let word = self.params.id("text_model.embeddings.word_embeddings.weight").expect("word embeddings declared");
        let start = self.params.range(word).start;
        self.backend.modify_host(&mut self.params.data, start..start + self.config.text.dim, |v| v.fill(0.0));
    }

    /// Text dropout used by training steps ([`Model::forward_backward`], and
    /// [`Model::forward_tokens`] with `train`); masks are drawn from a generator seeded here.
    /// Evaluation paths never drop.
    pub fn set_text_dropout(&mut self, dropout: TextDropout, seed: u64) {
        self.text_dropout = dropout;
        self.dropout_rng = Rng::new(seed);
    }

    pub fn text_dropout(&self) -> TextDropout {
        self.text_dropout
    }

    /// Trade arithmetic for memory: the video tower keeps no MLP hidden activations and
    /// recomputes them in the backward pass (results are identical; ~9 % more FLOPs, about
    /// 4·D floats less per video token and block), in every block (`true`) or none.
    pub fn set_recompute_mlp(&mut self, on: bool) {
        self.arena.video.recompute_mlp_blocks = if on { usize::MAX } else { 0 };
    }

    /// Recompute the MLP hidden activations in the first `n` video blocks only (0 = keep
    /// all, ≥ depth = recompute all). Each block recomputed costs ~0.75 % more arithmetic
    /// and saves 4·D floats per token (24 MB at the published training size). Default:
    /// [`DEFAULT_RECOMPUTE_MLP_BLOCKS`].
    pub fn set_recompute_mlp_blocks(&mut self, n: usize) {
        self.arena.video.recompute_mlp_blocks = n;
    }

    /// Whether training recomputes the text FFN hidden activations in the backward pass
    /// (default: kept, 9.8 MB per layer at the published size).
    pub fn set_text_recompute_ffn(&mut self, recompute: bool) {
        self.arena.text.recompute_ffn = recompute;
    }

    pub fn recompute_mlp_blocks(&self) -> usize {
        self.arena.video.recompute_mlp_blocks.min(self.config.video.depth)
    }

    /// The dropout generator, for saving and restoring a run's exact state.
    pub fn dropout_rng(&self) -> &Rng {
        &self.dropout_rng
    }

    pub fn set_dropout_rng(&mut self, rng: Rng) {
        self.dropout_rng = rng;
    }

    /// Runs both towers; returns the projected tokens: text `[B, L, P]`, video `[B, 1+F·R, P]`.
    /// `train` applies the text dropout (when set).
    pub fn forward_tokens(&mut self, batch: &BatchRef, train: bool) -> (B::View<'_>, B::View<'_>) {
        self.forward_text(batch.input_ids, batch.attention_mask, batch.batch, batch.text_len, train);
        self.forward_video(batch.object, batch.object_mask, batch.batch, batch.frames, batch.regions);
        (B::view(&self.arena.text_out), B::view(&self.arena.video.out))
    }

    fn forward_text(&mut self, ids: &[i64], mask: &[i64], b: usize, l: usize, train: bool) {
        let (be, a) = (&self.backend, &mut *self.arena);
        let data = B::view(&self.params.data);
        let (d, p) = (self.config.text.dim, self.config.proj_dim);
        let dropout = (train && self.text_dropout != TextDropout::default()).then_some((self.text_dropout, &mut self.dropout_rng));
        // Training keeps the FFN hidden activations for the backward pass (+9.8 MB per layer
        // at the published size, 1.5 % less arithmetic per step); inference does not.
        let keep = train && !a.text.recompute_ffn;
        self.text.forward(be, data, &mut a.text, TextInput { ids, mask, shape: TextShape { batch: b, len: l } }, dropout, keep);
        be.fit(&mut a.relu, b * l * d);
        be.relu_forward(a.text.last_hidden(), B::view_mut(&mut a.relu));
        be.fit(&mut a.text_out, b * l * p);
        self.txt_proj.forward(be, data, B::view(&a.relu), d, b * l, B::view_mut(&mut a.text_out));
    }

    fn forward_video(&mut self, object: &[f32], mask: &[f32], b: usize, f: usize, r: usize) {
        let be = &self.backend;
        let object = be.input_batch(object, &mut self.staging.object);
        let input = VideoInput { object, mask, shape: VideoShape { batch: b, frames: f, regions: r } };
        self.video.forward(be, B::view(&self.params.data), &mut self.arena.video, input);
    }

    /// Accumulates into `params.grad` the gradient of Σ d_text·text_tokens + Σ d_video·video_tokens
    /// for the batch of the preceding [`Model::forward_tokens`].
    pub fn backward_tokens(&mut self, batch: &BatchRef, d_text: &[f32], d_video: &[f32]) {
        self.backward_text_tokens(batch.input_ids, d_text);
        self.backward_video_tokens(batch.object, d_video);
    }

    /// [`Model::backward_tokens`] from token gradients already on the backend (a head's
    /// backward pass wrote them there): nothing crosses to the host.
    pub fn backward_tokens_on(&mut self, batch: &BatchRef, d_text: B::View<'_>, d_video: B::View<'_>) {
        self.backward_text_tokens_on(batch.input_ids, d_text);
        self.backward_video_tokens_on(batch.object, d_video);
    }

    /// Text half of [`Model::backward_tokens`]: `d_text` `[B, L, P]`, `input_ids` of the forward.
    pub fn backward_text_tokens(&mut self, input_ids: &[i64], d_text: &[f32]) {
        let mut staging = std::mem::take(&mut self.staging.d_text);
        let d = self.backend.input(d_text, &mut staging);
        self.backward_text_tokens_on(input_ids, d);
        self.staging.d_text = staging;
    }

    fn backward_text_tokens_on(&mut self, input_ids: &[i64], d_text: B::View<'_>) {
        let (be, a, params) = (&self.backend, &mut *self.arena, &mut self.params);
        Self::text_head_backward(be, &self.txt_proj, &self.config, params, a, d_text);
        self.text.backward(be, B::view(&params.data), B::view_mut(&mut params.grad), &mut a.text, input_ids, B::view(&a.d_hidden));
    }

    /// Video half of [`Model::backward_tokens`]: `d_video` `[B, 1+F·R, P]`, `object` of the forward.
    pub fn backward_video_tokens(&mut self, object: &[f32], d_video: &[f32]) {
        let mut staging = std::mem::take(&mut self.staging.d_video);
        let d = self.backend.input(d_video, &mut staging);
        self.backward_video_tokens_on(object, d);
        self.staging.d_video = staging;
    }

    fn backward_video_tokens_on(&mut self, object: &[f32], d_video: B::View<'_>) {
        let be = &self.backend;
        let object = be.input_batch_again(object, &mut self.staging.object);
        let a = &mut self.arena.video;
        assert_eq!(B::view_len(d_video), B::buf_len(&a.out), "d_video must be [B, 1+F·R, P]");
        self.video.backward(be, B::view(&self.params.data), B::view_mut(&mut self.params.grad), a, object, d_video);
    }

    /// `txt_proj`'s gradients and d(last hidden state) in `a.d_hidden`, from d(text tokens).
    fn text_head_backward(be: &B, txt_proj: &Linear, config: &ModelConfig, params: &mut Params<B>, a: &mut Arena<B>, d_text: B::View<'_>) {
        let (b, l) = (a.text.batch, a.text.len);
        let (d, p) = (config.text.dim, config.proj_dim);
        assert_eq!(B::view_len(d_text), b * l * p, "d_text must be [B, L, P]");
        let d_relu = zeroed(be, &mut a.d_relu, b * l * d);
        let (data, grad) = (B::view(&params.data), B::view_mut(&mut params.grad));
        txt_proj.backward(be, data, grad, B::view(&a.relu), d, b * l, d_text, Some(d_relu), Grads::Accumulate);
        let d_hidden = zeroed(be, &mut a.d_hidden, b * l * d);
        be.relu_backward(a.text.last_hidden(), B::view(&a.d_relu), d_hidden);
    }

    /// Splits the projected tokens into the loss's global/local embeddings and masks (arena).
    fn gather_embeddings(&mut self, batch: &BatchRef) {
        let (be, a) = (&self.backend, &mut *self.arena);
        let p = self.config.proj_dim;
        let (b, l) = (batch.batch, batch.text_len);
        let nr = batch.frames * batch.regions;
        be.fit(&mut a.global_text, b * p);
        be.fit(&mut a.local_text, b * (l - 1) * p);
        be.fit(&mut a.global_video, b * p);
        be.fit(&mut a.local_video, b * nr * p);
        be.fit(&mut a.video_mask, b * nr);
        let (t, v) = (B::view(&a.text_out), B::view(&a.video.out));
        be.copy_2d(t, 0, l * p, B::view_mut(&mut a.global_text), 0, p, b, p);
        be.copy_2d(t, p, l * p, B::view_mut(&mut a.local_text), 0, (l - 1) * p, b, (l - 1) * p);
        be.copy_2d(v, 0, (1 + nr) * p, B::view_mut(&mut a.global_video), 0, p, b, p);
        be.copy_2d(v, p, (1 + nr) * p, B::view_mut(&mut a.local_video), 0, nr * p, b, nr * p);
        be.copy_2d(B::view(&a.video.mask_add), 1, 1 + nr, B::view_mut(&mut a.video_mask), 0, nr, b, nr);
        be.write_host(&mut a.text_mask, b * (l - 1), |text_mask| {
            for bi in 0..b {
                for j in 1..l {
                    text_mask[bi * (l - 1) + j - 1] = additive_mask(batch.attention_mask[bi * l + j] as f32, PAD_SCORE);
                }
            }
        });
    }

    fn loss_views<'a>(a: &'a Arena<B>, batch: &BatchRef, p: usize) -> LossViews<'a, B> {
        LossViews {
            dims: LossDims { batch: batch.batch, words: batch.text_len - 1, regions: batch.frames * batch.regions, dim: p },
            global_text: B::view(&a.global_text),
            global_video: B::view(&a.global_video),
            local_text: B::view(&a.local_text),
            local_video: B::view(&a.local_video),
            text_mask: B::view(&a.text_mask),
            video_mask: B::view(&a.video_mask),
        }
    }

    fn check_batch(&self, batch: &BatchRef) {
        assert!(batch.text_len >= 2, "text length must be at least 2 (CLS + words)");
        assert!(batch.batch >= 1, "empty batch");
    }

    /// Forward, losses, and backward: zeroes then fills `params.grad`.
    pub fn forward_backward(&mut self, batch: &BatchRef, loss: &LossConfig, use_local: bool) -> LossOutputs {
        self.forward_backward_with(batch, loss, use_local, false).expect("losses read at once")
    }

    /// [`Model::forward_backward`] that reads nothing back: the losses
    /// `[loss_global, loss_local]` (the total is their sum) come with [`LateRead::wait`], so
    /// a training loop can queue the next step before it waits for this one's.
    pub fn forward_backward_late(&mut self, batch: &BatchRef, loss: &LossConfig, use_local: bool) -> LateRead {
        self.forward_backward_with(batch, loss, use_local, true);
        self.backend.read_late(B::view(&self.arena.loss_scalars))
    }

    /// Forward, losses (read back unless `late`) and backward.
    fn forward_backward_with(&mut self, batch: &BatchRef, loss: &LossConfig, use_local: bool, late: bool) -> Option<LossOutputs> {
        let clock = Instant::now();
        self.backend.fill_zero(B::view_mut(&mut self.params.grad));
        let (out, t_text, t_video) = self.forward_loss_grads(batch, loss, use_local, clock, late);
        let t_loss = clock.elapsed().as_secs_f64();
        let be = &self.backend;
        let a = &mut *self.arena;
        let (dt, dv) = (std::mem::take(&mut a.d_text_out), std::mem::take(&mut a.d_video_out));
        let params = &mut self.params;
        Self::text_head_backward(be, &self.txt_proj, &self.config, params, a, B::view(&dt));
        self.text.backward(be, B::view(&params.data), B::view_mut(&mut params.grad), &mut a.text, batch.input_ids, B::view(&a.d_hidden));
        let t_text_bwd = clock.elapsed().as_secs_f64();
        let object = be.input_batch_again(batch.object, &mut self.staging.object);
        let (data, grad) = (B::view(&self.params.data), B::view_mut(&mut self.params.grad));
        self.video.backward(be, data, grad, &mut a.video, object, B::view(&dv));
        (a.d_text_out, a.d_video_out) = (dt, dv);
        self.set_phase_times([t_text, t_video, t_loss, t_text_bwd, clock.elapsed().as_secs_f64()]);
        out
    }

    /// One whole training step — forward, losses, backward and the AdamW update of `opt` —
    /// with the update fused into the backward pass: each transformer block's gradients
    /// live in one block-sized scratch buffer and its update is applied as soon as they are
    /// final; the word table's gradient is kept by row (only looked-up rows are nonzero);
    /// the remaining tensors (other embeddings, projections) accumulate in `params.grad`; all
    /// these are updated at the end. Parameters and optimiser state end exactly as after
    /// [`Model::forward_backward`] + [`AdamW::step`], but the whole-model gradient is never
    /// held (peak memory is lower by most of one parameter copy) and the update costs no
    /// separate pass over memory. `params.grad` afterwards holds only the gradients of the
    /// tensors outside the blocks and the word table. A non-finite loss returns before any
    /// update (nothing is changed but the dropout generator and the arena).
    pub fn train_step_fused(&mut self, batch: &BatchRef, loss: &LossConfig, use_local: bool, opt: &mut AdamW<B>) -> LossOutputs {
        self.train_step_fused_with(batch, loss, use_local, opt, false).expect("losses read at once")
    }

    /// [`Model::train_step_fused`] that reads nothing back: the losses
    /// `[loss_global, loss_local]` (the total is their sum) come with [`LateRead::wait`], so
    /// a training loop can queue the next step before it waits for this one's. The update is
    /// applied whatever the losses are: after a non-finite loss the parameters are not to be
    /// kept (the training loop stops before it saves them).
    pub fn train_step_fused_late(&mut self, batch: &BatchRef, loss: &LossConfig, use_local: bool, opt: &mut AdamW<B>) -> LateRead {
        self.train_step_fused_with(batch, loss, use_local, opt, true);
        self.backend.read_late(B::view(&self.arena.loss_scalars))
    }

    /// The fused step, its losses read back (and a non-finite one stopping it before any
    /// update) unless `late`.
    fn train_step_fused_with(
        &mut self,
        batch: &BatchRef,
        loss: &LossConfig,
        use_local: bool,
        opt: &mut AdamW<B>,
        late: bool,
    ) -> Option<LossOutputs> {
        assert_eq!(opt.len(), self.params.len(), "AdamW state has {} values, model has {}", opt.len(), self.params.len());
        let clock = Instant::now();
        for &(r0, r1) in &self.rest_ranges {
            self.backend.fill_zero(B::slice_mut(B::view_mut(&mut self.params.grad), r0..r1));
        }
        let (out, t_text, t_video) = self.forward_loss_grads(batch, loss, use_local, clock, late);
        let t_loss = clock.elapsed().as_secs_f64();
        if out.as_ref().is_some_and(|o| !o.loss_total.is_finite()) {
            return out;
        }
        let be = &self.backend;
        let a = &mut *self.arena;
        let updated = std::mem::take(&mut self.updated_ranges);
        let mut step = FusedStep::begin(opt, &updated, &mut self.grad_scratch);
        let params = &mut self.params;
        let (dt, dv) = (std::mem::take(&mut a.d_text_out), std::mem::take(&mut a.d_video_out));
        Self::text_head_backward(be, &self.txt_proj, &self.config, params, a, B::view(&dt));
        let d_hidden = B::view(&a.d_hidden);
        self.text.backward_fused(be, params, &mut a.text, batch.input_ids, d_hidden, &mut step);
        let t_text_bwd = clock.elapsed().as_secs_f64();
        let object = be.input_batch_again(batch.object, &mut self.staging.object);
        self.video.backward_fused(be, params, &mut a.video, object, B::view(&dv), &mut step);
        let coeffs = step.coeffs;
        opt.update_window(&coeffs, &self.rest_ranges, B::view_mut(&mut params.data), B::view(&params.grad), 0);
        let word = self.word_range.clone();
        let rows = &a.text.word_grad;
        let table = B::slice_mut(B::view_mut(&mut params.data), word.clone());
        opt.update_table_rows(&coeffs, word, table, self.config.text.dim, &rows.ids, B::view(&rows.grad));
        self.updated_ranges = updated;
        (a.d_text_out, a.d_video_out) = (dt, dv);
        self.set_phase_times([t_text, t_video, t_loss, t_text_bwd, clock.elapsed().as_secs_f64()]);
        out
    }

    fn set_phase_times(&mut self, [t_text, t_video, t_loss, t_text_bwd, t_end]: [f64; 5]) {
        self.phase_times = PhaseTimes {
            text_forward: t_text,
            video_forward: t_video - t_text,
            loss: t_loss - t_video,
            text_backward: t_text_bwd - t_loss,
            video_backward: t_end - t_text_bwd,
        };
    }

    /// Forward through both towers and the losses; leaves d(text tokens) and d(video tokens)
    /// in the arena. Returns the losses (None when `late`: they stay on the device in
    /// `arena.loss_scalars`) and the clock readings after each tower.
    fn forward_loss_grads(
        &mut self,
        batch: &BatchRef,
        loss: &LossConfig,
        use_local: bool,
        clock: Instant,
        late: bool,
    ) -> (Option<LossOutputs>, f64, f64) {
        self.check_batch(batch);
        self.forward_text(batch.input_ids, batch.attention_mask, batch.batch, batch.text_len, true);
        let t_text = clock.elapsed().as_secs_f64();
        self.forward_video(batch.object, batch.object_mask, batch.batch, batch.frames, batch.regions);
        let t_video = clock.elapsed().as_secs_f64();
        self.gather_embeddings(batch);
        let p = self.config.proj_dim;
        let be = &self.backend;
        let mut g = std::mem::take(&mut self.arena.loss_grads);
        let out = if late {
            let mut scalars = std::mem::take(&mut self.arena.loss_scalars);
            be.losses_late(loss, &Self::loss_views(&self.arena, batch, p), use_local, Some(&mut g), &mut scalars);
            self.arena.loss_scalars = scalars;
            None
        } else {
            Some(be.losses_into(loss, &Self::loss_views(&self.arena, batch, p), use_local, Some(&mut g)))
        };
        // Scatter the embedding gradients back onto the token layouts.
        let a = &mut *self.arena;
        let (b, l) = (batch.batch, batch.text_len);
        let nr = batch.frames * batch.regions;
        be.fit(&mut a.d_text_out, b * l * p);
        be.fit(&mut a.d_video_out, b * (1 + nr) * p);
        be.copy_2d(B::view(&g.global_text), 0, p, B::view_mut(&mut a.d_text_out), 0, l * p, b, p);
        be.copy_2d(B::view(&g.local_text), 0, (l - 1) * p, B::view_mut(&mut a.d_text_out), p, l * p, b, (l - 1) * p);
        be.copy_2d(B::view(&g.global_video), 0, p, B::view_mut(&mut a.d_video_out), 0, (1 + nr) * p, b, p);
        be.copy_2d(B::view(&g.local_video), 0, nr * p, B::view_mut(&mut a.d_video_out), p, (1 + nr) * p, b, nr * p);
        a.loss_grads = g;
        (out, t_text, t_video)
    }

    /// Forward and losses only, in evaluation mode (no dropout, no gradients touched).
    pub fn forward_loss(&mut self, batch: &BatchRef, loss: &LossConfig, use_local: bool) -> LossOutputs {
        self.check_batch(batch);
        self.forward_tokens(batch, false);
        self.gather_embeddings(batch);
        self.backend.losses(loss, &Self::loss_views(&self.arena, batch, self.config.proj_dim), use_local, false).0
    }

    pub fn text_kind(&self) -> TextKind {
        self.config.text.kind
    }
}

#[cfg(test)]
mod tests;
