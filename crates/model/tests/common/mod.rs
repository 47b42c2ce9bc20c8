//! Shared by the model crate's fixture tests: the model of a recorded batch.
#![allow(dead_code)]

use demovlp_model::{BatchRef, Model, ModelConfig, TextConfig, TextKind, VideoConfig};
use demovlp_testutil::Fixture;

/// Sizes from the tensor shapes; head counts from the recorded config.
pub fn model_config(fx: &Fixture) -> ModelConfig {
    let word = fx.shape("param.text_model.embeddings.word_embeddings.weight");
    let heads = |k: &str| fx.config[k].as_u64().unwrap() as usize;
    ModelConfig {
        text: TextConfig {
            kind: TextKind::Distilbert,
            vocab_size: word[0],
            dim: word[1],
            layers: fx.count("param.text_model.transformer.layer.", ".attention.q_lin.weight"),
            heads: heads("theads"),
            hidden_dim: fx.shape("param.text_model.transformer.layer.0.ffn.lin1.weight")[0],
            max_position_embeddings: fx.shape("param.text_model.embeddings.position_embeddings.weight")[0],
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
        },
        video: VideoConfig {
            dim: fx.shape("param.object_model.cls_token")[2],
            depth: fx.count("param.object_model.blocks.", ".attn.qkv.weight"),
            heads: heads("heads"),
            mlp_dim: fx.shape("param.object_model.blocks.0.mlp.fc1.weight")[0],
            max_frames: fx.shape("param.object_model.temporal_embed")[1],
            pos_embed_rows: fx.shape("param.object_model.custom_pos_embed")[1],
            feature_dim: fx.shape("param.object_model.object_embedding.weight")[1],
            box_dim: fx.shape("param.object_model.pos_embedding.weight")[1],
            layer_norm_eps: 1e-6,
        },
        proj_dim: fx.shape("param.txt_proj.1.weight")[0],
    }
}

/// The model with the recorded weights (every declared parameter must be recorded, and
/// nothing else).
pub fn model(fx: &Fixture) -> Model {
    let mut m = Model::new(model_config(fx));
    let declared: Vec<String> = m.params.specs().iter().map(|s| s.name.clone()).collect();
    for name in &declared {
        let id = m.params.id(name).unwrap();
        assert_eq!(fx.shape(&format!("param.{name}")), &m.params.spec(id).shape[..], "{name}: shape");
        m.params.get_mut(id).copy_from_slice(fx.f(&format!("param.{name}")));
    }
    let extra: Vec<String> = fx.names("param.").into_iter().filter(|k| !k.starts_with("param.head.")).collect();
    assert_eq!(extra.len(), declared.len(), "fixture has parameters the model does not declare");
    m
}

pub fn batch(fx: &Fixture) -> BatchRef<'_> {
    let s = fx.shape("in.object");
    BatchRef {
        batch: s[0],
        frames: s[1],
        regions: s[2],
        text_len: fx.shape("in.input_ids")[1],
        object: fx.f("in.object"),
        object_mask: fx.f("in.object_mask"),
        input_ids: fx.i("in.input_ids"),
        attention_mask: fx.i("in.attention_mask"),
    }
}
