//! Model sizes from tensor shapes (published names); head counts cannot be seen in weights
//! and are given.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use super::safetensors::Tensor;
use crate::config::{ModelConfig, TextConfig, TextKind, VideoConfig};

fn shape_of<'a>(t: &'a BTreeMap<String, Tensor>, name: &str) -> Result<&'a [usize]> {
    t.get(name).map(|x| x.shape.as_slice()).with_context(|| format!("weights lack {name}: cannot infer the model size"))
}

fn dim_of(t: &BTreeMap<String, Tensor>, name: &str, axis: usize, rank: usize) -> Result<usize> {
    let s = shape_of(t, name)?;
    if s.len() != rank {
        bail!("{name} has shape {s:?}, expected rank {rank}");
    }
    Ok(s[axis])
}

/// How many numbered children `prefix<i>.` exist (0, 1, ... without gaps).
fn count_layers(t: &BTreeMap<String, Tensor>, prefix: &str) -> usize {
    let mut n = 0;
    while t.keys().any(|k| k.starts_with(&format!("{prefix}{n}."))) {
        n += 1;
    }
    n
}

fn check_heads(what: &str, dim: usize, heads: usize) -> Result<()> {
    if heads == 0 || !dim.is_multiple_of(heads) {
        bail!("{what}: width {dim} is not divisible by {heads} heads");
    }
    Ok(())
}

/// Infer the full model configuration from published-name tensors (`text_model.*`,
/// `object_model.*`, `txt_proj.1.*`). Head counts cannot be seen in weights: given.
pub fn infer_config(t: &BTreeMap<String, Tensor>, text_heads: usize, video_heads: usize) -> Result<ModelConfig> {
    let text = infer_text_config(t, text_heads)?;
    let v = "object_model.";
    let dim = *shape_of(t, &format!("{v}cls_token"))?.last().unwrap_or(&0);
    let depth = count_layers(t, &format!("{v}blocks."));
    if depth == 0 {
        bail!("weights have no object_model.blocks.0.*: not a DemoVLP checkpoint (wrong --key-prefix?)");
    }
    check_heads("video tower", dim, video_heads)?;
    let video = VideoConfig {
        dim,
        depth,
        heads: video_heads,
        mlp_dim: dim_of(t, &format!("{v}blocks.0.mlp.fc1.weight"), 0, 2)?,
        max_frames: dim_of(t, &format!("{v}temporal_embed"), 1, 3)?,
        pos_embed_rows: dim_of(t, &format!("{v}custom_pos_embed"), 1, 3)?,
        feature_dim: dim_of(t, &format!("{v}object_embedding.weight"), 1, 2)?,
        box_dim: dim_of(t, &format!("{v}pos_embedding.weight"), 1, 2)?,
        layer_norm_eps: 1e-6,
    };
    let proj_dim = dim_of(t, "txt_proj.1.weight", 0, 2)?;
    Ok(ModelConfig { text, video, proj_dim })
}

/// The text tower's configuration from `text_model.*` shapes (DistilBERT or BERT names).
pub fn infer_text_config(t: &BTreeMap<String, Tensor>, heads: usize) -> Result<TextConfig> {
    let p = "text_model.";
    let word = format!("{p}embeddings.word_embeddings.weight");
    let vocab_size = dim_of(t, &word, 0, 2)?;
    let dim = dim_of(t, &word, 1, 2)?;
    let max_position_embeddings = dim_of(t, &format!("{p}embeddings.position_embeddings.weight"), 0, 2)?;
    check_heads("text tower", dim, heads)?;
    let distil = count_layers(t, &format!("{p}transformer.layer."));
    let bert = count_layers(t, &format!("{p}encoder.layer."));
    Ok(if distil > 0 {
        TextConfig {
            kind: TextKind::Distilbert,
            vocab_size,
            dim,
            layers: distil,
            heads,
            hidden_dim: dim_of(t, &format!("{p}transformer.layer.0.ffn.lin1.weight"), 0, 2)?,
            max_position_embeddings,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
        }
    } else if bert > 0 {
        TextConfig {
            kind: TextKind::Bert,
            vocab_size,
            dim,
            layers: bert,
            heads,
            hidden_dim: dim_of(t, &format!("{p}encoder.layer.0.intermediate.dense.weight"), 0, 2)?,
            max_position_embeddings,
            type_vocab_size: dim_of(t, &format!("{p}embeddings.token_type_embeddings.weight"), 0, 2)?,
            layer_norm_eps: 1e-12,
        }
    } else {
        bail!("weights have neither text_model.transformer.layer.0.* (DistilBERT) nor text_model.encoder.layer.0.* (BERT)");
    })
}
