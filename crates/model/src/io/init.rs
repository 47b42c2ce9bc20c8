//! Initialising a model's parameters from weights on disk: a model directory or a weights
//! file (safetensors or torch `.pth`), copied by published name with the row rule of the
//! positional tables, and a Hugging Face text tower copied into a model of other sizes.
//! (Training checkpoints are a `demovlp-train` format; its `weights` module reads them into
//! the same [`copy_init_weights`].)

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::by_name::read_weights;
use super::model_dir::{load_hf_text_dir, WEIGHTS_FILE};
use super::safetensors::read_safetensors;
use crate::model::Model;
use crate::params::Params;

/// Named f32 tensors: (published name, shape, values).
pub type NamedWeights = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The tensors of a model directory (its `model.safetensors`) or of a weights file.
pub fn read_init_weights(path: &Path) -> Result<NamedWeights> {
    if path.is_dir() {
        let st = read_safetensors(&path.join(WEIGHTS_FILE))?;
        st.tensors.into_iter().map(|(k, t)| Ok((k, t.shape.clone(), t.to_f32()?))).collect()
    } else {
        read_weights(path)?.into_iter().map(|(k, t)| Ok((k, t.shape.clone(), t.to_f32()?))).collect()
    }
}

/// How `temporal_embed` is inflated when a checkpoint has fewer rows (frames) than the
/// model, as the published loader's `load_temporal_fix`: the first rows copied and the rest
/// zero, or the rows interpolated linearly over the frame axis (`F.interpolate(...,
/// mode="bilinear", align_corners=True)`). A checkpoint with more rows is cut to the model's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemporalFix {
    #[default]
    Zeros,
    Bilinear,
}

impl TemporalFix {
    /// `dst` (`rows` × `d`) from `src` (`src_rows` × `d`).
    pub fn inflate(self, src: &[f32], src_rows: usize, dst: &mut [f32], rows: usize, d: usize) {
        if rows <= src_rows || src_rows == 0 {
            let n = rows.min(src_rows) * d;
            dst[..n].copy_from_slice(&src[..n]);
            dst[n..].iter_mut().for_each(|x| *x = 0.0);
            return;
        }
        match self {
            TemporalFix::Zeros => {
                dst[..src.len()].copy_from_slice(src);
                dst[src.len()..].iter_mut().for_each(|x| *x = 0.0);
            }
            TemporalFix::Bilinear => {
                // PyTorch's upsample (align_corners): scale (in-1)/(out-1) in f32, then
                // (1-λ)·a + λ·b between the two nearest source rows.
                let scale = if rows > 1 { (src_rows - 1) as f32 / (rows - 1) as f32 } else { 0.0 };
                for r in 0..rows {
                    let pos = scale * r as f32;
                    let i0 = (pos as usize).min(src_rows - 1);
                    let i1 = (i0 + 1).min(src_rows - 1);
                    let l1 = pos - i0 as f32;
                    let l0 = 1.0 - l1;
                    for k in 0..d {
                        dst[r * d + k] = l0 * src[i0 * d + k] + l1 * src[i1 * d + k];
                    }
                }
            }
        }
    }
}

/// [`copy_init_weights_with`] with the published default, [`TemporalFix::Zeros`].
pub fn copy_init_weights(params: &mut Params, tensors: &[(String, Vec<usize>, Vec<f32>)], origin: &Path) -> Result<usize> {
    copy_init_weights_with(params, tensors, origin, TemporalFix::Zeros)
}

/// Copy `tensors` (read from `origin`, named in messages) into `params`, by published name.
/// Extra tensors are skipped; missing trained tensors are an error. `temporal_embed` may
/// have a different number of rows (pre-training on 1 frame, fine-tuning on 8): it is
/// inflated by `fix` (or cut). `custom_pos_embed` (only its CLS row 0 is used) copies the
/// overlapping rows and repeats the last one. Returns the number of parameters filled.
pub fn copy_init_weights_with(
    params: &mut Params,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    origin: &Path,
    fix: TemporalFix,
) -> Result<usize> {
    let mut seen = vec![false; params.specs().len()];
    for (name, shape, v) in tensors {
        let Some(id) = params.id(name) else { continue };
        let want = params.spec(id).shape.clone();
        let dst = params.get_mut(id);
        if &want == shape {
            dst.copy_from_slice(v);
        } else if name.ends_with("temporal_embed") && want.len() == 3 && shape.len() == 3 && want[2] == shape[2] && shape[0] == want[0] {
            fix.inflate(v, shape[1], dst, want[1], want[2]);
        } else if name.ends_with("custom_pos_embed") && want.len() == 3 && shape.len() == 3 && want[2] == shape[2] && shape[1] > 0 {
            let d = want[2];
            for row in 0..want[1] {
                let src = row.min(shape[1] - 1);
                dst[row * d..(row + 1) * d].copy_from_slice(&v[src * d..(src + 1) * d]);
            }
        } else {
            bail!("{}: tensor {name} has shape {shape:?}, the model wants {want:?}", origin.display());
        }
        seen[id.0] = true;
    }
    let missing: Vec<&str> =
        params.specs().iter().zip(&seen).filter(|(s, &ok)| !ok && s.receives_grad).map(|(s, _)| s.name.as_str()).collect();
    if !missing.is_empty() {
        bail!("{}: {} model tensors missing, e.g. {}", origin.display(), missing.len(), missing[..missing.len().min(3)].join(", "));
    }
    Ok(seen.iter().filter(|&&s| s).count())
}

/// [`copy_init_weights`] from a model directory or weights file.
pub fn load_init(params: &mut Params, path: &Path) -> Result<usize> {
    copy_init_weights(params, &read_init_weights(path)?, path)
}

/// Copy the text tower of a Hugging Face DistilBERT/BERT directory into `model` (whose text
/// config must be the directory's). The rest of `model` is left as it is; `seed` only
/// initialises the throw-away video tower the directory is loaded with.
pub fn init_text_from_hf(model: &mut Model, dir: &Path, seed: u64) -> Result<()> {
    let mc = &model.config;
    let (m, _) = load_hf_text_dir(dir, mc.video.clone(), mc.proj_dim, seed)?;
    if m.config.text != mc.text {
        bail!("{}: text tower config differs from the model's", dir.display());
    }
    for s in m.params.specs().iter().filter(|s| s.name.starts_with("text_model.")) {
        let id = model.params.id(&s.name).context("text tensor")?;
        model.params.get_mut(id).copy_from_slice(&m.params.data[s.offset..s.offset + s.len]);
    }
    Ok(())
}
