//! A small index for the server tests (also included by the CLI's serve test): a synthetic
//! test split written as a real `.npz` tree, a small randomly initialised model saved as a
//! model directory, and `build_index` over them — the same path `demovlp index` takes.

#![allow(dead_code)]

use std::path::PathBuf;

use demovlp_search::build::{build_index, ClipList, IndexOptions};
use demovlp_train::demo::DemoSizes;
use demovlp_train::synthetic::{CorpusConfig, SyntheticCorpus};

pub struct World {
    pub root: PathBuf,
    pub index: PathBuf,
    pub model: PathBuf,
    /// (clip id, its first caption), in annotation order.
    pub captions: Vec<(String, String)>,
}

pub const CLIPS: usize = 40;

pub fn build_world(tag: &str) -> World {
    let root = demovlp_testutil::tmpdir(tag);
    let mut c = CorpusConfig::new(5);
    (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test) = (0, 0, 0, 0, CLIPS);
    (c.frames, c.max_regions) = (3, 8);
    SyntheticCorpus::new(c).write(&root.join("corpus"), &|_, _| {}).unwrap();
    let mut mc = DemoSizes::quick(1).model;
    (mc.text.dim, mc.text.hidden_dim, mc.video.dim, mc.video.mlp_dim, mc.proj_dim) = (32, 64, 32, 64, 32);
    let mut model = demovlp_model::Model::new(mc);
    model.init_random(3);
    let model_dir = root.join("model");
    demovlp_model::io::save_model_dir(&model, &model_dir).unwrap();
    let ann = root.join("corpus/annotations/synth_msrvtt_test.jsonl");
    let index = root.join("index");
    let clips = ClipList::Annotations { path: ann.clone(), layout: None };
    let mut o = IndexOptions::new(model_dir.clone(), root.join("corpus/features"), clips, index.clone());
    (o.frames, o.regions, o.text_len, o.progress, o.segment_clips, o.batch_size) = (Some(2), Some(6), Some(24), false, 16, 16);
    let s = build_index(&o).unwrap();
    assert_eq!((s.total_clips, s.skipped.len()), (CLIPS, 0), "{s:?}");
    let captions = std::fs::read_to_string(&ann)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["clip"].as_str().unwrap().to_string(), v["captions"][0].as_str().unwrap().to_string())
        })
        .collect();
    World { root, index, model: model_dir, captions }
}
