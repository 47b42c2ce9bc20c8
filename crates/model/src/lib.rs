//! The DemoVLP model: a text tower (DistilBERT or BERT), the object-transformer video
//! tower, their projections, explicit forward and backward passes, AdamW, and weights I/O.
//!
//! Every kernel the model runs and every buffer it holds (parameters, gradients, AdamW
//! moments, activations) belong to one [`Backend`] ([`backend`]: what a backend must
//! provide, and the conventions). [`Cpu`] is today's `demovlp_kernels`; `Model`, `Params`
//! and `AdamW` default to it (`Model` = `Model<Cpu>`), so `params.data` is a `Vec<f32>` there.
//! Weights I/O ([`io`], [`hf`], [`torch`]) works on host parameters (`Params<Cpu>`); another
//! backend takes them with [`Params::to_backend`].
//!
//! Layout: [`layers`] (Linear, LayerNorm over parameter ranges), [`text`] and [`video`] (the
//! towers: each layer's `forward` and `backward` side by side, the towers' loops over them,
//! their activation arenas in `text/acts.rs` and `video/acts.rs`), [`model`] (heads, losses,
//! the training step with AdamW fused into the backward pass), [`adamw`], [`mask`] (the
//! additive padding masks), [`params`] (the flat parameter store).

pub mod adamw;
pub mod backend;
pub mod config;
pub mod io;
pub mod layers;
pub mod mask;
pub mod model;
pub mod params;
pub mod qa;
pub mod text;
pub mod video;

/// Moved under [`io`] (`io/hf.rs`, `io/torch.rs`); the old paths still name them.
pub use io::{hf, torch};

pub use adamw::{AdamW, AdamWSettings};
pub use backend::{Backend, Cpu};
pub use config::{ModelConfig, TextConfig, TextKind, VideoConfig};
pub use model::{declare_params, BatchRef, Model, TextEmbeddings, VideoEmbeddings, DEFAULT_RECOMPUTE_MLP_BLOCKS};
pub use params::{ParamId, Params, ParamsBuilder};
pub use text::TextDropout;
