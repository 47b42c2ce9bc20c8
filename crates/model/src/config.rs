//! Model configuration: the sizes of both towers and the projection.
//! Published model: DistilBERT-base text tower, ViT-B-sized video tower, projection 256.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextKind {
    /// Hugging Face DistilBertModel (the published text tower).
    Distilbert,
    /// Hugging Face BertModel (token types, its own parameter names).
    Bert,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub kind: TextKind,
    pub vocab_size: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub hidden_dim: usize,
    pub max_position_embeddings: usize,
    /// BERT only (token_type_embeddings rows); 0 for DistilBERT.
    #[serde(default)]
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoConfig {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    /// Rows of `temporal_embed`: the most frames a clip may have.
    pub max_frames: usize,
    /// Rows of `custom_pos_embed` (only row 0, the CLS position, is used).
    pub pos_embed_rows: usize,
    pub feature_dim: usize,
    pub box_dim: usize,
    pub layer_norm_eps: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub text: TextConfig,
    pub video: VideoConfig,
    /// Width of the shared embedding space (P).
    pub proj_dim: usize,
}

impl ModelConfig {
    /// The published size: DistilBERT-base-uncased, 12-layer ViT-B video tower, P = 256.
    pub fn published(max_frames: usize) -> Self {
        ModelConfig {
            text: TextConfig {
                kind: TextKind::Distilbert,
                vocab_size: 30522,
                dim: 768,
                layers: 6,
                heads: 12,
                hidden_dim: 3072,
                max_position_embeddings: 512,
                type_vocab_size: 0,
                layer_norm_eps: 1e-12,
            },
            video: VideoConfig {
                dim: 768,
                depth: 12,
                heads: 12,
                mlp_dim: 3072,
                max_frames,
                pos_embed_rows: 1 + max_frames,
                feature_dim: 2048,
                box_dim: 6,
                layer_norm_eps: 1e-6,
            },
            proj_dim: 256,
        }
    }
}
