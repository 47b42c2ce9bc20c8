//! Model directories: ours (`model.safetensors` with the published state_dict names +
//! `config.json` = [`ModelConfig`]) and Hugging Face DistilBERT/BERT ones (text tower), and
//! importing published-name weights whose sizes are inferred from their shapes.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::by_name::params_as_tensors;
use super::by_name::{list_some, load_all_params, load_params, read_weights, select_prefix, LoadReport};
use super::hf;
use super::infer::infer_config;
use super::safetensors::{atomic_write, read_safetensors, write_safetensors_refs};
use crate::config::{ModelConfig, VideoConfig};
use crate::model::{declare_params, Model};
use crate::params::Params;

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";

/// Write `dir/model.safetensors` (published names) and `dir/config.json`, each atomically.
pub fn save_params_dir(config: &ModelConfig, params: &Params, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(config)?;
    write_safetensors_refs(&dir.join(WEIGHTS_FILE), &params_as_tensors(params), &[("format".into(), "pt".into())])?;
    atomic_write(&dir.join(CONFIG_FILE), (json + "\n").as_bytes())
}

pub fn save_model_dir(model: &Model, dir: &Path) -> Result<()> {
    save_params_dir(&model.config, &model.params, dir)
}

/// Load a model directory: ours (`config.json` = [`ModelConfig`], every tensor present, no
/// extras) or a Hugging Face DistilBERT/BERT directory (text tower only; see
/// [`load_hf_text_dir`], with the published video tower for 8 frames and P = 256).
pub fn load_model_dir(dir: &Path) -> Result<Model> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {} (is {} a model directory?)", cfg_path.display(), dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cfg_path.display()))?;
    if hf::is_hf_config(&v) {
        let published = ModelConfig::published(8);
        return Ok(load_hf_text_dir(dir, published.video, published.proj_dim, 0)?.0);
    }
    let config: ModelConfig = serde_json::from_value(v).with_context(|| format!("{}: not a demovlp model config", cfg_path.display()))?;
    super::check::check_model_config(&config, "").with_context(|| format!("{}", cfg_path.display()))?;
    let weights = dir.join(WEIGHTS_FILE);
    let st = read_safetensors(&weights)?;
    let mut params = declare_params(&config);
    load_all_params(&mut params, &st.tensors, true, &weights.display().to_string())?;
    Ok(Model::from_params(config, params))
}

/// A Hugging Face DistilBERT/BERT directory (`config.json` + `model.safetensors`, or a
/// torch-zip `pytorch_model.bin`) as the text tower of a new model whose video tower and
/// projection get the published random init (`seed`). Task heads (MLM, pooler of
/// DistilBERT classifiers, ...) are skipped and reported.
pub fn load_hf_text_dir(dir: &Path, video: VideoConfig, proj_dim: usize, seed: u64) -> Result<(Model, LoadReport)> {
    let text = hf::read_hf_text_config(dir)?;
    let weights = [WEIGHTS_FILE, "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .with_context(|| format!("{}: neither {WEIGHTS_FILE} nor pytorch_model.bin", dir.display()))?;
    let t = read_weights(&weights)?;
    let mut model = Model::new(ModelConfig { text, video, proj_dim });
    model.init_random(seed);
    let mut r = load_params(&mut model.params, t.iter().map(|(k, v)| (k.as_str(), v)), |n| Some(hf::hf_to_ours(n)))
        .with_context(|| weights.display().to_string())?;
    r.missing.retain(|n| n.starts_with("text_model."));
    let needed: Vec<String> = r.missing.iter().filter(|n| !n.starts_with("text_model.pooler.")).cloned().collect();
    if !needed.is_empty() {
        bail!("{}: {} text-tower tensors missing: {}", weights.display(), needed.len(), list_some(&needed));
    }
    Ok((model, r))
}

/// Import weights with published names (a trainer `.pth`, or safetensors such as a recorded
/// batch with `key_prefix = "param."`): sizes inferred from shapes, heads given.
pub fn import_weights(path: &Path, key_prefix: Option<&str>, text_heads: usize, video_heads: usize) -> Result<Model> {
    Ok(import_weights_report(path, key_prefix, text_heads, video_heads)?.0)
}

/// [`import_weights`] that also says what was loaded and skipped.
pub fn import_weights_report(path: &Path, key_prefix: Option<&str>, text_heads: usize, video_heads: usize) -> Result<(Model, LoadReport)> {
    let mut t = read_weights(path)?;
    if let Some(p) = key_prefix.filter(|p| !p.is_empty()) {
        t = select_prefix(t, p, path)?;
    }
    let config = infer_config(&t, text_heads, video_heads).with_context(|| path.display().to_string())?;
    let mut params = declare_params(&config);
    let r = load_all_params(&mut params, &t, false, &path.display().to_string())?;
    Ok((Model::from_params(config, params), r))
}
