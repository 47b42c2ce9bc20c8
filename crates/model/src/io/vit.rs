//! timm ViT weights as the video tower's transformer blocks (the published recipe starts
//! them from `jx_vit_base_p16_224`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::by_name::{load_params, read_weights, LoadReport};
use super::safetensors::Tensor;
use crate::model::Model;
use crate::params::Params;

/// Map a timm ViT tensor name onto the video tower: `blocks.i.*` → `object_model.blocks.i.*`
/// (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2); everything else (patch
/// embedding, pos_embed, cls_token, final norm, head) has no place: None.
pub fn timm_vit_to_ours(name: &str) -> Option<String> {
    let rest = name.strip_prefix("blocks.")?;
    let (idx, _) = rest.split_once('.')?;
    idx.parse::<usize>().ok()?;
    Some(format!("object_model.{name}"))
}

/// Initialise the video tower's transformer blocks from timm ViT weights (as the published
/// recipe does with `jx_vit_base_p16_224`), non-strictly: tensors without a place (other
/// names, blocks beyond the tower's depth) are skipped; shape mismatches are errors.
pub fn load_vit_blocks(params: &mut Params, vit: &BTreeMap<String, Tensor>) -> Result<LoadReport> {
    let mut r = load_params(params, vit.iter().map(|(k, v)| (k.as_str(), v)), timm_vit_to_ours)?;
    r.missing.retain(|n| n.starts_with("object_model.blocks."));
    if r.loaded.is_empty() {
        bail!("no `blocks.<i>.*` tensor of the ViT weights fits the video tower ({} tensors skipped)", r.skipped.len());
    }
    Ok(r)
}

/// Initialise `model`'s video-tower blocks from a timm ViT checkpoint (`.pth` or safetensors).
pub fn init_video_from_vit(model: &mut Model, path: &Path) -> Result<LoadReport> {
    let t = read_weights(path)?;
    load_vit_blocks(&mut model.params, &t).with_context(|| path.display().to_string())
}
