//! Model sizes that cannot work, refused when a config is read (a training config's
//! `[model.config]`, a model directory's `config.json`, the sizes `import` infers) with the
//! key and the reason, instead of an assertion deep inside a forward pass.

use anyhow::{bail, Result};

use crate::config::{ModelConfig, TextKind};

/// Check every size of `c`; `prefix` is how the caller's file names the config
/// (`model.config` in a training TOML, empty in a `config.json`).
pub fn check_model_config(c: &ModelConfig, prefix: &str) -> Result<()> {
    let key = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    let positive = [
        ("text.vocab_size", c.text.vocab_size),
        ("text.dim", c.text.dim),
        ("text.layers", c.text.layers),
        ("text.heads", c.text.heads),
        ("text.hidden_dim", c.text.hidden_dim),
        ("video.dim", c.video.dim),
        ("video.depth", c.video.depth),
        ("video.heads", c.video.heads),
        ("video.mlp_dim", c.video.mlp_dim),
        ("video.max_frames", c.video.max_frames),
        ("video.pos_embed_rows", c.video.pos_embed_rows),
        ("proj_dim", c.proj_dim),
    ];
    for (k, v) in positive {
        if v == 0 {
            bail!("{}: must be at least 1, got 0", key(k));
        }
    }
    for (tower, dim, heads) in [("text", c.text.dim, c.text.heads), ("video", c.video.dim, c.video.heads)] {
        if !dim.is_multiple_of(heads) {
            bail!(
                "{}: {dim} is not divisible by {tower}.heads = {heads} (each head gets dim / heads channels)",
                key(&format!("{tower}.dim"))
            );
        }
    }
    if c.text.max_position_embeddings < 2 {
        bail!("{}: must be at least 2 ([CLS] and one word), got {}", key("text.max_position_embeddings"), c.text.max_position_embeddings);
    }
    if c.text.kind == TextKind::Bert && c.text.type_vocab_size == 0 {
        bail!("{}: a BERT text tower needs at least 1 token type row, got 0", key("text.type_vocab_size"));
    }
    for (k, eps) in [("text.layer_norm_eps", c.text.layer_norm_eps), ("video.layer_norm_eps", c.video.layer_norm_eps)] {
        if !(eps.is_finite() && eps > 0.0) {
            bail!("{}: must be a positive number, got {eps}", key(k));
        }
    }
    const FEATURES: usize = 2048;
    const BOX: usize = 6;
    if c.video.feature_dim != FEATURES || c.video.box_dim != BOX {
        bail!(
            "{}, {}: the region tokens are {FEATURES} detector features + {BOX} box features, got {} + {}",
            key("video.feature_dim"),
            key("video.box_dim"),
            c.video.feature_dim,
            c.video.box_dim
        );
    }
    Ok(())
}

/// Can a model of sizes `c` take inputs of `frames` frames and `text_len` tokens from a
/// tokenizer of `vocab` tokens? `keys` name the data settings (e.g. `data.frames`,
/// `data.text_len`), `model` names where the model's sizes come from.
pub fn check_inputs_fit(c: &ModelConfig, frames: usize, text_len: usize, vocab: Option<usize>, keys: [&str; 2], model: &str) -> Result<()> {
    if frames > c.video.max_frames {
        bail!(
            "{} = {frames}: more frames than the temporal embedding of {model} has rows (video.max_frames = {})",
            keys[0],
            c.video.max_frames
        );
    }
    if text_len > c.text.max_position_embeddings {
        bail!(
            "{} = {text_len}: longer than the position table of {model} (text.max_position_embeddings = {})",
            keys[1],
            c.text.max_position_embeddings
        );
    }
    if let Some(v) = vocab.filter(|&v| v > c.text.vocab_size) {
        bail!("the tokenizer has {v} tokens, more than the word table of {model} has rows (text.vocab_size = {})", c.text.vocab_size);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_impossible_size_is_named() {
        check_model_config(&ModelConfig::published(8), "model.config").unwrap();
        type Edit = Box<dyn Fn(&mut ModelConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("model.config.text.heads", Box::new(|c| c.text.heads = 0)),
            ("model.config.video.heads", Box::new(|c| c.video.heads = 0)),
            ("model.config.text.dim", Box::new(|c| c.text.heads = 5)),
            ("model.config.video.dim", Box::new(|c| c.video.heads = 7)),
            ("model.config.video.max_frames", Box::new(|c| c.video.max_frames = 0)),
            ("model.config.text.max_position_embeddings", Box::new(|c| c.text.max_position_embeddings = 1)),
            ("model.config.text.type_vocab_size", Box::new(|c| c.text.kind = TextKind::Bert)),
            ("model.config.video.layer_norm_eps", Box::new(|c| c.video.layer_norm_eps = f32::NAN)),
            ("model.config.video.feature_dim", Box::new(|c| c.video.feature_dim = 512)),
            ("model.config.proj_dim", Box::new(|c| c.proj_dim = 0)),
        ];
        for (key, f) in cases {
            let mut c = ModelConfig::published(8);
            f(&mut c);
            let e = check_model_config(&c, "model.config").unwrap_err().to_string();
            assert!(e.starts_with(key), "{key}: {e}");
        }
        let c = ModelConfig::published(4);
        let keys = ["data.frames", "data.text_len"];
        check_inputs_fit(&c, 4, 512, Some(30522), keys, "m").unwrap();
        assert!(check_inputs_fit(&c, 5, 100, None, keys, "m").unwrap_err().to_string().starts_with("data.frames = 5"));
        assert!(check_inputs_fit(&c, 4, 513, None, keys, "m").unwrap_err().to_string().starts_with("data.text_len = 513"));
        assert!(check_inputs_fit(&c, 4, 100, Some(30523), keys, "m").unwrap_err().to_string().contains("text.vocab_size = 30522"));
    }
}
