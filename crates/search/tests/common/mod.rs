//! The tests' tiny trained world: the demo pipeline (written to disk) trains a small model,
//! then the test split is indexed.

use std::path::PathBuf;
use std::sync::OnceLock;

use demovlp_data::annotations::{read_annotations, Layout};
use demovlp_search::build::{build_index, ClipList, IndexOptions};
use demovlp_train::demo::{self, DemoOptions, DemoSizes, Stage};

pub struct World {
    pub root: PathBuf,
    pub index: PathBuf,
    pub samples: Vec<demovlp_data::Sample>,
}

pub fn opts(w: &World, out: PathBuf, clips: ClipList) -> IndexOptions {
    let mut o = IndexOptions::new(w.root.join("global_rwa_model"), w.root.join("corpus/features"), clips, out);
    (o.frames, o.regions, o.text_len, o.progress, o.segment_clips, o.batch_size) = (Some(2), Some(6), Some(24), false, 30, 16);
    o
}

pub fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let root = demovlp_testutil::tmpdir("search-world");
        let mut sizes = DemoSizes::quick(1);
        (sizes.corpus.pretrain_videos, sizes.corpus.pretrain_images, sizes.corpus.finetune_train, sizes.corpus.val, sizes.corpus.test) =
            (320, 160, 320, 40, 100);
        (sizes.corpus.frames, sizes.corpus.max_regions) = (3, 8);
        sizes.model.text.dim = 32;
        sizes.model.text.hidden_dim = 64;
        sizes.model.video.dim = 32;
        sizes.model.video.mlp_dim = 64;
        sizes.model.proj_dim = 32;
        sizes.pretrain = Stage { frames: 1, regions: 6, batch: 32, epochs: 8, lr: 2e-3, warmup_steps: 20, samples_per_epoch: None };
        sizes.finetune = Stage { frames: 2, regions: 6, batch: 32, epochs: 5, lr: 1e-3, warmup_steps: 5, samples_per_epoch: None };
        demo::run(&DemoOptions { quiet: true, seed: 1, sizes: Some(sizes), out: Some(root.clone()), ..Default::default() }).unwrap();
        let ann = root.join("corpus/annotations/synth_msrvtt_test.jsonl");
        let samples = read_annotations(&ann, Some(Layout::Jsonl), false).unwrap().samples;
        let w = World { index: root.join("index"), root: root.clone(), samples };
        let s = build_index(&opts(&w, w.index.clone(), ClipList::Annotations { path: ann, layout: None })).unwrap();
        assert_eq!((s.clips, s.total_clips, s.skipped.len()), (100, 100, 0), "{s:?}");
        assert!(s.fp16_max_rel_err > 0.0 && s.fp16_max_rel_err < 1e-3, "fp16 error {}", s.fp16_max_rel_err);
        w
    })
}
