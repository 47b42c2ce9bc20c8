//! Where a run's weights come from. The formats and the copying rules live in the model
//! crate (`demovlp_model::io`: model directories, weights files, Hugging Face text towers,
//! timm ViT blocks, [`demovlp_model::io::copy_init_weights`]); this module adds the one
//! format that belongs to training, our checkpoints ([`crate::checkpoint`]), and the
//! config's `[model]` choices.

use std::path::Path;

use anyhow::{bail, Context, Result};
use demovlp_model::io::TemporalFix;
use demovlp_model::{io, Model, ModelConfig, Params};

use crate::checkpoint;
use crate::config::TrainConfig;

/// Copy weights from a model directory, a weights file or one of our training checkpoints
/// into `params`, by published name (see [`io::copy_init_weights`] for the rules).
pub fn load_init(params: &mut Params, path: &Path) -> Result<usize> {
    load_init_with(params, path, TemporalFix::default())
}

/// [`load_init`] with the way `temporal_embed` grows when the source has fewer frames.
pub fn load_init_with(params: &mut Params, path: &Path, fix: TemporalFix) -> Result<usize> {
    let tensors =
        if !path.is_dir() && checkpoint::is_checkpoint(path) { checkpoint::load(path)?.params } else { io::read_init_weights(path)? };
    io::copy_init_weights_with(params, &tensors, path, fix)
}

/// `model` able to take clips of `frames` frames: as it is when its temporal embedding has
/// the rows, else a copy whose `temporal_embed` is inflated by `fix` (what the published
/// loader does for a model pre-trained on fewer frames).
pub fn fit_to_frames(model: Model, frames: usize, fix: TemporalFix, origin: &Path) -> Result<Model> {
    if frames <= model.config.video.max_frames {
        return Ok(model);
    }
    let mut mc = model.config.clone();
    mc.video.max_frames = frames;
    mc.video.pos_embed_rows = mc.video.pos_embed_rows.max(1 + frames);
    let tensors: io::NamedWeights = model
        .params
        .specs()
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone(), model.params.data[s.offset..s.offset + s.len].to_vec()))
        .collect();
    let mut wider = Model::new(mc);
    io::copy_init_weights_with(&mut wider.params, &tensors, origin, fix)?;
    Ok(wider)
}

/// A model to evaluate: a model directory (ours or Hugging Face text-only) or one of our
/// training checkpoints. Published `.pth` files go through `demovlp import` first (heads
/// cannot be inferred from shapes).
pub fn load_model(path: &Path) -> Result<Model> {
    if path.is_dir() {
        return io::load_model_dir(path);
    }
    if checkpoint::is_checkpoint(path) {
        let ck = checkpoint::load(path)?;
        io::check_model_config(&ck.model_config, "").with_context(|| format!("{}: model config", path.display()))?;
        let mut model = Model::new(ck.model_config.clone());
        ck.fill_params(&mut model.params)?;
        return Ok(model);
    }
    bail!(
        "{}: neither a model directory nor a demovlp training checkpoint (import published weights with `demovlp import`)",
        path.display()
    )
}

/// Build a fresh model for the config (random init, then `text_init`, `video_init` and
/// `init` / the `--init` override, in that order).
pub fn build_model(cfg: &TrainConfig, init: Option<&Path>) -> Result<Model> {
    let mc: ModelConfig = cfg.model_config()?;
    let mut model = Model::new(mc);
    model.init_random(cfg.seed);
    if let Some(dir) = &cfg.model.text_init {
        io::init_text_from_hf(&mut model, dir, cfg.seed).with_context(|| format!("model.text_init {}", dir.display()))?;
    }
    if let Some(p) = &cfg.model.video_init {
        io::init_video_from_vit(&mut model, p).with_context(|| format!("model.video_init {}", p.display()))?;
    }
    if let Some(p) = init.or(cfg.model.init.as_deref()) {
        load_init_with(&mut model.params, p, cfg.model.load_temporal_fix).with_context(|| format!("initialising from {}", p.display()))?;
    }
    Ok(model)
}
