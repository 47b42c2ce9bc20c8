//! The DemoVLP model: a text tower (DistilBERT or BERT), the object-transformer video
//! tower, their projections, explicit forward and backward passes, AdamW, and weights I/O.

pub mod adamw;
pub mod config;
pub mod hf;
pub mod io;
pub mod params;
pub mod torch;

pub use config::{ModelConfig, TextConfig, TextKind, VideoConfig};
pub use params::{ParamId, Params, ParamsBuilder};
pub use adamw::{AdamW, AdamWSettings};
