//! Weights in and out, one file per format:
//!
//! - [`safetensors`]: safetensors files (any float dtype read as f32, integers as i64;
//!   atomic writes) and the in-memory [`Tensor`];
//! - [`torch`]: `torch.save` checkpoints, zip and legacy formats (the published trainer's and detector's `.pth`), without Python;
//! - [`by_name`]: filling a [`crate::Params`] by tensor name, reading a weights file by content;
//! - [`model_dir`]: our model directories, Hugging Face text-tower directories, importing
//!   published-name weights;
//! - [`hf`]: the Hugging Face config and tensor-name mapping;
//! - [`vit`]: timm ViT weights as the video tower's blocks;
//! - [`infer`]: model sizes from tensor shapes;
//! - [`check`]: model sizes that cannot work, refused with the key;
//! - [`init`]: initialising a model's parameters from weights on disk.
//!
//! Everything is re-exported here, so `demovlp_model::io::read_safetensors` and the like
//! name the same items as before the split.

pub mod by_name;
pub mod check;
pub mod hf;
pub mod infer;
pub mod init;
pub mod model_dir;
pub mod safetensors;
pub mod torch;
pub mod vit;

pub use by_name::{grads_as_tensors, load_all_params, load_params, params_as_tensors, read_weights, select_prefix, LoadReport};
pub use check::{check_inputs_fit, check_model_config};
pub use infer::{infer_config, infer_text_config};
pub use init::{copy_init_weights, copy_init_weights_with, init_text_from_hf, load_init, read_init_weights, NamedWeights, TemporalFix};
pub use model_dir::{
    import_weights, import_weights_report, load_hf_text_dir, load_model_dir, save_model_dir, save_params_dir, CONFIG_FILE, WEIGHTS_FILE,
};
pub use safetensors::{
    atomic_write, atomic_write_with, decode_tensor, read_safetensors, write_safetensors, write_safetensors_refs,
    write_safetensors_streamed, SafetensorsFile, Tensor, TensorData, TensorRef, TensorSource,
};
pub use vit::{init_video_from_vit, load_vit_blocks, timm_vit_to_ours};
