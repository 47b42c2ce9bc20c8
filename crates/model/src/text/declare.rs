//! The text tower's parameters: their Hugging Face names per model family, declared in
//! state_dict order.

use crate::config::{TextConfig, TextKind};
use crate::params::ParamsBuilder;

/// Parameter names of one encoder layer, per model family (Hugging Face layouts).
pub(super) struct LayerNames {
    pub(super) q: String,
    pub(super) k: String,
    pub(super) v: String,
    pub(super) o: String,
    pub(super) ln1: String,
    pub(super) ffn1: String,
    pub(super) ffn2: String,
    pub(super) ln2: String,
}

pub(super) fn layer_names(kind: TextKind, i: usize) -> LayerNames {
    match kind {
        TextKind::Distilbert => {
            let p = format!("text_model.transformer.layer.{i}");
            LayerNames {
                q: format!("{p}.attention.q_lin"),
                k: format!("{p}.attention.k_lin"),
                v: format!("{p}.attention.v_lin"),
                o: format!("{p}.attention.out_lin"),
                ln1: format!("{p}.sa_layer_norm"),
                ffn1: format!("{p}.ffn.lin1"),
                ffn2: format!("{p}.ffn.lin2"),
                ln2: format!("{p}.output_layer_norm"),
            }
        }
        TextKind::Bert => {
            let p = format!("text_model.encoder.layer.{i}");
            LayerNames {
                q: format!("{p}.attention.self.query"),
                k: format!("{p}.attention.self.key"),
                v: format!("{p}.attention.self.value"),
                o: format!("{p}.attention.output.dense"),
                ln1: format!("{p}.attention.output.LayerNorm"),
                ffn1: format!("{p}.intermediate.dense"),
                ffn2: format!("{p}.output.dense"),
                ln2: format!("{p}.output.LayerNorm"),
            }
        }
    }
}

/// Declare the text tower's tensors in Hugging Face state_dict order.
pub fn declare(pb: &mut ParamsBuilder, c: &TextConfig) {
    let (d, h) = (c.dim, c.hidden_dim);
    pb.add("text_model.embeddings.word_embeddings.weight", &[c.vocab_size, d]);
    pb.add("text_model.embeddings.position_embeddings.weight", &[c.max_position_embeddings, d]);
    if c.kind == TextKind::Bert {
        pb.add("text_model.embeddings.token_type_embeddings.weight", &[c.type_vocab_size.max(1), d]);
    }
    pb.add("text_model.embeddings.LayerNorm.weight", &[d]);
    pb.add("text_model.embeddings.LayerNorm.bias", &[d]);
    let lin = |pb: &mut ParamsBuilder, name: &str, din: usize, dout: usize| {
        pb.add(format!("{name}.weight"), &[dout, din]);
        pb.add(format!("{name}.bias"), &[dout]);
    };
    let ln = |pb: &mut ParamsBuilder, name: &str| {
        pb.add(format!("{name}.weight"), &[d]);
        pb.add(format!("{name}.bias"), &[d]);
    };
    for i in 0..c.layers {
        let n = layer_names(c.kind, i);
        lin(pb, &n.q, d, d);
        lin(pb, &n.k, d, d);
        lin(pb, &n.v, d, d);
        lin(pb, &n.o, d, d);
        ln(pb, &n.ln1);
        lin(pb, &n.ffn1, d, h);
        lin(pb, &n.ffn2, h, d);
        ln(pb, &n.ln2);
    }
    if c.kind == TextKind::Bert {
        // BertModel's pooler: in checkpoints, unused by retrieval (no gradient).
        pb.add_unused("text_model.pooler.dense.weight", &[d, d]);
        pb.add_unused("text_model.pooler.dense.bias", &[d]);
    }
}
