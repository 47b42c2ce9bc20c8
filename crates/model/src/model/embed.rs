//! Evaluation embeddings: the towers' projected tokens split into global and local parts
//! with their masks, brought to the host.

use super::{Model, TextEmbeddings, VideoEmbeddings};
use crate::backend::Backend;
use crate::mask::{additive_mask, PAD_SCORE};
use crate::text::{TextInput, TextShape};
use crate::video::{VideoInput, VideoShape};

impl<B: Backend> Model<B> {
    /// Text embeddings for evaluation.
    pub fn embed_text(&mut self, input_ids: &[i64], attention_mask: &[i64], b: usize, l: usize) -> TextEmbeddings {
        assert!(l >= 2, "text length must be at least 2 (CLS + words)");
        self.forward_text(input_ids, attention_mask, b, l, false);
        let p = self.config.proj_dim;
        let mut e = TextEmbeddings {
            global: Vec::with_capacity(b * p),
            local: Vec::with_capacity(b * (l - 1) * p),
            mask_additive: Vec::with_capacity(b * (l - 1)),
        };
        self.backend.read_host(B::view(&self.arena.text_out), |t| {
            for bi in 0..b {
                e.global.extend_from_slice(&t[bi * l * p..bi * l * p + p]);
                e.local.extend_from_slice(&t[bi * l * p + p..(bi + 1) * l * p]);
            }
        });
        for bi in 0..b {
            e.mask_additive.extend(attention_mask[bi * l + 1..(bi + 1) * l].iter().map(|&m| additive_mask(m as f32, PAD_SCORE)));
        }
        e
    }

    /// Video embeddings for evaluation.
    pub fn embed_video(&mut self, object: &[f32], object_mask: &[f32], b: usize, f: usize, r: usize) -> VideoEmbeddings {
        self.forward_video(object, object_mask, b, f, r);
        self.video_embeddings(b, f, r)
    }

    /// [`Model::embed_video`] for pure inference (evaluation, `bench embed`): the same values,
    /// but the tower keeps one block's activations at a time instead of all of them (at
    /// 32 clips × 241 tokens, ~1.4 GB less); no backward pass may follow it.
    pub fn embed_video_inference(&mut self, object: &[f32], object_mask: &[f32], b: usize, f: usize, r: usize) -> VideoEmbeddings {
        let be = &self.backend;
        let object = be.input_batch(object, &mut self.staging.object);
        let input = VideoInput { object, mask: object_mask, shape: VideoShape { batch: b, frames: f, regions: r } };
        self.video.forward_inference(be, B::view(&self.params.data), &mut self.arena.video, input);
        self.video_embeddings(b, f, r)
    }

    fn video_embeddings(&self, b: usize, f: usize, r: usize) -> VideoEmbeddings {
        let (p, nr) = (self.config.proj_dim, f * r);
        let a = &self.arena.video;
        let mut e = VideoEmbeddings {
            global: Vec::with_capacity(b * p),
            local: Vec::with_capacity(b * nr * p),
            mask_additive: Vec::with_capacity(b * nr),
        };
        self.backend.read_host(B::view(&a.out), |out| {
            for bi in 0..b {
                let v = &out[bi * (1 + nr) * p..(bi + 1) * (1 + nr) * p];
                e.global.extend_from_slice(&v[..p]);
                e.local.extend_from_slice(&v[p..]);
            }
        });
        self.backend.read_host(B::view(&a.mask_add), |mask_add| {
            for bi in 0..b {
                e.mask_additive.extend_from_slice(&mask_add[bi * (1 + nr) + 1..(bi + 1) * (1 + nr)]);
            }
        });
        e
    }

    /// The text tower's `last_hidden_state` `[B, L, D]` (before ReLU and projection).
    pub fn text_hidden_states(&mut self, input_ids: &[i64], attention_mask: &[i64], b: usize, l: usize) -> Vec<f32> {
        let input = TextInput { ids: input_ids, mask: attention_mask, shape: TextShape { batch: b, len: l } };
        self.text.forward(&self.backend, B::view(&self.params.data), &mut self.arena.text, input, None, false);
        self.backend.to_host(self.arena.text.last_hidden())
    }
}
