//! The DemoVLP model: a text tower (DistilBERT or BERT), the object-transformer video
//! tower, their projections, explicit forward and backward passes, AdamW, and weights I/O.

pub mod adamw;
pub mod backend;
pub mod config;
pub mod hf;
pub mod io;
pub mod layers;
pub mod mask;
pub mod model;
pub mod params;
pub mod text;
pub mod torch;
pub mod video;

pub use adamw::{AdamW, AdamWSettings};
pub use config::{ModelConfig, TextConfig, TextKind, VideoConfig};
pub use model::{declare_params, BatchRef, Model, TextEmbeddings, VideoEmbeddings, DEFAULT_RECOMPUTE_MLP_BLOCKS};
pub use params::{ParamId, Params, ParamsBuilder};
pub use text::TextDropout;
