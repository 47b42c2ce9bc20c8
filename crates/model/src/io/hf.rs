//! Hugging Face DistilBERT / BERT directories (`config.json` + `model.safetensors`) as the
//! text tower: their config fields mapped onto [`TextConfig`], their tensor names mapped
//! onto ours (`text_model.` + the HF model's own names, task-head prefixes stripped).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::{TextConfig, TextKind};

/// Is `config.json` in `dir` a Hugging Face transformers config (rather than ours)?
pub fn is_hf_config(config: &Value) -> bool {
    config.get("model_type").is_some() || config.get("architectures").is_some()
}

fn field(cfg: &Value, path: &Path, keys: &[&str]) -> Result<usize> {
    for k in keys {
        if let Some(v) = cfg.get(*k) {
            return v.as_u64().map(|x| x as usize).with_context(|| format!("{}: field {k} is not a non-negative integer", path.display()));
        }
    }
    bail!("{}: missing field {}", path.display(), keys.join(" / "))
}

/// Map a Hugging Face `config.json` (DistilBERT or BERT) onto our text-tower config.
pub fn text_config_from_hf(cfg: &Value, path: &Path) -> Result<TextConfig> {
    let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = cfg.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str).unwrap_or("");
    let kind = if model_type == "distilbert" || arch.starts_with("DistilBert") {
        TextKind::Distilbert
    } else if model_type == "bert" || arch.starts_with("Bert") {
        TextKind::Bert
    } else {
        bail!("{}: model_type {model_type:?} / architecture {arch:?} is neither DistilBERT nor BERT", path.display());
    };
    // Our towers implement GELU (erf) only, as both published encoders use.
    let act_key = if kind == TextKind::Distilbert { "activation" } else { "hidden_act" };
    if let Some(act) = cfg.get(act_key).and_then(Value::as_str) {
        if act != "gelu" {
            bail!("{}: {act_key} = {act:?}; only \"gelu\" (erf) is supported", path.display());
        }
    }
    if let Some(p) = cfg.get("position_embedding_type").and_then(Value::as_str) {
        if p != "absolute" {
            bail!("{}: position_embedding_type = {p:?}; only \"absolute\" is supported", path.display());
        }
    }
    Ok(match kind {
        TextKind::Distilbert => {
            if cfg.get("sinusoidal_pos_embds").and_then(Value::as_bool) == Some(true) {
                bail!("{}: sinusoidal position embeddings are not supported", path.display());
            }
            TextConfig {
                kind,
                vocab_size: field(cfg, path, &["vocab_size"])?,
                dim: field(cfg, path, &["dim", "hidden_size"])?,
                layers: field(cfg, path, &["n_layers", "num_hidden_layers"])?,
                heads: field(cfg, path, &["n_heads", "num_attention_heads"])?,
                hidden_dim: field(cfg, path, &["hidden_dim", "intermediate_size"])?,
                max_position_embeddings: field(cfg, path, &["max_position_embeddings"])?,
                type_vocab_size: 0,
                // DistilBERT hard-codes its LayerNorm eps.
                layer_norm_eps: 1e-12,
            }
        }
        TextKind::Bert => TextConfig {
            kind,
            vocab_size: field(cfg, path, &["vocab_size"])?,
            dim: field(cfg, path, &["hidden_size"])?,
            layers: field(cfg, path, &["num_hidden_layers"])?,
            heads: field(cfg, path, &["num_attention_heads"])?,
            hidden_dim: field(cfg, path, &["intermediate_size"])?,
            max_position_embeddings: field(cfg, path, &["max_position_embeddings"])?,
            type_vocab_size: field(cfg, path, &["type_vocab_size"]).unwrap_or(2),
            layer_norm_eps: cfg.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-12) as f32,
        },
    })
}

/// Map a Hugging Face tensor name onto our parameter name (`text_model.<HF base-model name>`).
/// Task-model prefixes (`distilbert.`, `bert.`) are stripped; old TF-style LayerNorm names
/// (`gamma`/`beta`) are renamed. Names of task heads (`vocab_transform`, `cls.*`, ...) map
/// to names the model does not have and end up skipped.
pub fn hf_to_ours(name: &str) -> String {
    let base = name.strip_prefix("distilbert.").or_else(|| name.strip_prefix("bert.")).unwrap_or(name);
    let base = if let Some(s) = base.strip_suffix(".gamma") {
        format!("{s}.weight")
    } else if let Some(s) = base.strip_suffix(".beta") {
        format!("{s}.bias")
    } else {
        base.to_string()
    };
    format!("text_model.{base}")
}

/// Read and map `dir/config.json` (must be a Hugging Face config).
pub fn read_hf_text_config(dir: &Path) -> Result<TextConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    text_config_from_hf(&cfg, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_bert_and_distilbert_configs() {
        let p = Path::new("config.json");
        let bert: Value = serde_json::from_str(
            r#"{"architectures":["BertModel"],"model_type":"bert","hidden_size":384,"num_hidden_layers":6,
            "num_attention_heads":12,"intermediate_size":1536,"max_position_embeddings":512,"type_vocab_size":2,
            "vocab_size":30522,"layer_norm_eps":1e-12,"hidden_act":"gelu","position_embedding_type":"absolute"}"#,
        )
        .unwrap();
        let t = text_config_from_hf(&bert, p).unwrap();
        assert_eq!((t.kind, t.dim, t.layers, t.heads, t.hidden_dim, t.type_vocab_size), (TextKind::Bert, 384, 6, 12, 1536, 2));
        let db: Value = serde_json::from_str(
            r#"{"model_type":"distilbert","dim":768,"n_layers":6,"n_heads":12,"hidden_dim":3072,
            "max_position_embeddings":512,"vocab_size":30522,"activation":"gelu","sinusoidal_pos_embds":false}"#,
        )
        .unwrap();
        let t = text_config_from_hf(&db, p).unwrap();
        assert_eq!((t.kind, t.dim, t.layers, t.heads, t.hidden_dim, t.type_vocab_size), (TextKind::Distilbert, 768, 6, 12, 3072, 0));
        let relu: Value = serde_json::from_str(r#"{"model_type":"bert","hidden_act":"relu"}"#).unwrap();
        assert!(text_config_from_hf(&relu, p).unwrap_err().to_string().contains("gelu"));
        let gpt: Value = serde_json::from_str(r#"{"model_type":"gpt2"}"#).unwrap();
        assert!(text_config_from_hf(&gpt, p).is_err());
    }

    #[test]
    fn maps_names() {
        assert_eq!(hf_to_ours("distilbert.embeddings.word_embeddings.weight"), "text_model.embeddings.word_embeddings.weight");
        assert_eq!(hf_to_ours("encoder.layer.0.attention.self.query.bias"), "text_model.encoder.layer.0.attention.self.query.bias");
        assert_eq!(hf_to_ours("bert.embeddings.LayerNorm.gamma"), "text_model.embeddings.LayerNorm.weight");
        assert_eq!(hf_to_ours("vocab_transform.weight"), "text_model.vocab_transform.weight");
    }
}
