//! The batch pipeline: determinism, epoch shuffling, interleaving, padding; every batch a
//! pure function of (seed, epoch, index); the video-only assembler; bad inputs (issue item 8).

mod common;

use std::sync::Arc;

use common::{testdata, tmpdir, write_clip};
use demovlp_data::batches::{assemble, assemble_videos, epoch_seed, Dataset, Draw, InputShape, Loader, LoaderConfig};
use demovlp_data::pack::{pack, PackConfig, PackedStore};
use demovlp_data::regions::{select_clip, FeatureSource, FrameChoice, FrameFile, NpzTree, TOKEN_DIM};
use demovlp_data::{Sample, TextTokenizer};

fn tokenizer() -> Arc<TextTokenizer> {
    Arc::new(TextTokenizer::from_path(&testdata().join("bert-base-uncased/vocab.txt")).unwrap())
}

fn samples(ids: &[usize]) -> Arc<Vec<Sample>> {
    Arc::new(
        ids.iter()
            .map(|i| Sample { clip: format!("c{i}"), captions: vec![format!("clip number {i}"), format!("another caption {i}")] })
            .collect(),
    )
}

fn cfg(threads: usize, train: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size: 3,
        shape: InputShape { frames: 4, regions: 8, text_len: 16 },
        train,
        seed: 11,
        samples_per_epoch: None,
        threads,
        prefetch: 3,
        skip_bad: false,
    }
}

#[test]
fn deterministic_interleaved_shuffled_and_padded() {
    let root = tmpdir("loader_tree");
    for i in 0..12 {
        write_clip(&root, &format!("c{i}"), 1 + i % 5, 3 + 3 * i, 100 + i as u64);
    }
    let npz: Arc<dyn FeatureSource> = Arc::new(NpzTree::new(&root));
    let store_dir = root.join("store");
    let ids: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
    pack(&root, &ids, &store_dir, &PackConfig { progress: false, threads: 1, ..Default::default() }).unwrap();
    let packed: Arc<dyn FeatureSource> = Arc::new(PackedStore::open(&store_dir).unwrap());
    let datasets = vec![
        Dataset { name: "a".into(), samples: samples(&[0, 1, 2, 3, 4, 5, 6]), source: npz.clone() },
        Dataset { name: "b".into(), samples: samples(&[7, 8, 9, 10, 11]), source: packed.clone() },
    ];
    let run = |threads, epoch, train| -> Vec<_> {
        let l = Loader::new(datasets.clone(), tokenizer(), cfg(threads, train)).unwrap();
        l.epoch(epoch).map(|b| b.unwrap()).collect()
    };
    let e0 = run(1, 1, true);
    // 7 samples -> 3 + 3 (+ 1 dropped: a batch needs negatives), 5 -> 3 + 2; interleaved a, b, a, b.
    assert_eq!(e0.iter().map(|b| b.dataset).collect::<Vec<_>>(), vec![0, 1, 0, 1]);
    assert_eq!(e0.iter().map(|b| b.batch).collect::<Vec<_>>(), vec![3, 3, 3, 2]);
    assert!(e0.iter().all(|b| b.object.len() == b.batch * 4 * 8 * TOKEN_DIM && b.input_ids.len() == b.batch * 16));
    // Same seed + epoch -> identical batches whatever the thread count.
    for (a, b) in e0.iter().zip(run(3, 1, true)) {
        assert_eq!((&a.clips, &a.captions, &a.input_ids, &a.object_mask), (&b.clips, &b.captions, &b.input_ids, &b.object_mask));
        assert!(a.object == b.object);
    }
    // Another epoch reshuffles.
    let e1 = run(2, 2, true);
    let order = |e: &[demovlp_data::Batch]| e.iter().flat_map(|b| b.clips.clone()).collect::<Vec<_>>();
    assert_ne!(order(&e0), order(&e1));
    let all: std::collections::HashSet<String> = order(&e0).into_iter().collect();
    assert_eq!(all.len(), 11, "no sample twice within an epoch");

    // Evaluation mode: file order, middle frames, first caption, every sample, and each
    // clip exactly as select_clip gives it, padded with masked zero frames.
    let ev = run(2, 1, false);
    assert_eq!(order(&ev), vec!["c0", "c1", "c2", "c7", "c8", "c9", "c3", "c4", "c5", "c10", "c11", "c6"]);
    for b in &ev {
        for (j, clip) in b.clips.iter().enumerate() {
            assert_eq!(b.captions[j], format!("clip number {}", &clip[1..]));
            let src: &dyn FeatureSource = if b.dataset == 0 { npz.as_ref() } else { packed.as_ref() };
            let c = select_clip(src, clip, 4, 8, FrameChoice::Middle).unwrap();
            let per = 4 * 8 * TOKEN_DIM;
            let got = &b.object[j * per..(j + 1) * per];
            assert!(got[..c.object.len()] == c.object[..]);
            assert!(got[c.object.len()..].iter().all(|&v| v == 0.0));
            let m = &b.object_mask[j * 32..(j + 1) * 32];
            assert_eq!(&m[..c.mask.len()], &c.mask[..]);
            assert!(m[c.mask.len()..].iter().all(|&v| v == 0.0));
        }
    }
    // Training frame draws reach the last frame of a segment (c4 has 5 frames, S = 4:
    // segments [0],[1],[2],[3,4]; two samples: a training batch needs at least 2).
    let mut last_seen = false;
    for epoch in 1..=30 {
        let l = Loader::new(vec![Dataset { name: "a".into(), samples: samples(&[4, 4]), source: npz.clone() }], tokenizer(), cfg(1, true))
            .unwrap();
        let b = l.epoch(epoch).next().unwrap().unwrap();
        let c = select_clip(npz.as_ref(), "c4", 4, 8, FrameChoice::Middle).unwrap(); // frames 0,1,2,3
        let last = &b.object[3 * 8 * TOKEN_DIM..4 * 8 * TOKEN_DIM];
        if last != &c.object[3 * 8 * TOKEN_DIM..] {
            last_seen = true;
        }
    }
    assert!(last_seen, "frame 4 never drawn");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Each kind of bad input: an error naming the file and problem, or a counted skip.
#[test]
fn bad_inputs_are_named_or_counted() {
    let root = tmpdir("loader_bad");
    write_clip(&root, "good", 2, 5, 1);
    // missing 0.npz
    write_clip(&root, "no_zero", 2, 5, 2);
    std::fs::remove_file(root.join("no_zero/0.npz")).unwrap();
    // truncated zip
    write_clip(&root, "truncated", 1, 5, 3);
    let p = root.join("truncated/0.npz");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    // corrupt zip (a flipped data byte: the CRC catches it)
    write_clip(&root, "corrupt", 1, 5, 4);
    let p = root.join("corrupt/0.npz");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[200] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    // wrong feature width, NaN, inf
    let mk = |name: &str, width: usize, poison: Option<(usize, f32)>, poison_box: bool| {
        std::fs::create_dir_all(root.join(name)).unwrap();
        let n = 4;
        let mut x = vec![0.5f32; n * width];
        let mut bbox = [1.0, 2.0, 30.0, 40.0].repeat(n);
        if let Some((i, v)) = poison {
            if poison_box {
                bbox[i] = v
            } else {
                x[i] = v
            }
        }
        let f = FrameFile { x, bbox, conf: vec![0.9, 0.8, 0.7, 0.6], image_w: 100.0, image_h: 100.0, n };
        f.write(&root.join(name).join("0.npz"), name, &[1, 2, 3, 4]).unwrap();
    };
    mk("narrow", 1024, None, false);
    mk("nan", 2048, Some((77, f32::NAN)), false);
    mk("inf", 2048, Some((2, f32::INFINITY)), true);

    let tree = NpzTree::new(&root);
    let expect = [
        ("missing_dir", "missing_dir", "clip directory missing"),
        ("no_zero", "no_zero", "missing 0.npz"),
        ("truncated", "truncated/0.npz", "end-of-central-directory"),
        ("corrupt", "corrupt/0.npz", "CRC"),
        ("narrow", "narrow/0.npz", "wrong feature width"),
        ("nan", "nan/0.npz", "non-finite"),
        ("inf", "inf/0.npz", "'bbox' holds a non-finite value (inf)"),
    ];
    for (clip, file, problem) in expect {
        let err = format!("{:#}", select_clip(&tree, clip, 4, 8, FrameChoice::Middle).unwrap_err());
        assert!(err.contains(file) && err.contains(problem), "{clip}: {err}");
    }
    assert!(select_clip(&tree, "good", 4, 8, FrameChoice::Middle).is_ok());

    // Through the loader: without skipping, the first bad sample stops it with its name.
    let all: Vec<Sample> = ["good", "missing_dir", "no_zero", "truncated", "corrupt", "narrow", "nan", "inf"]
        .iter()
        .map(|c| Sample { clip: c.to_string(), captions: vec![format!("{c} video")] })
        .collect();
    let mut bad_caption = all.clone();
    bad_caption[0].captions = vec!["  ".into()];
    let ds = |s: Vec<Sample>| vec![Dataset { name: "bad".into(), samples: Arc::new(s), source: Arc::new(NpzTree::new(&root)) }];
    let mut c = LoaderConfig {
        batch_size: 8,
        shape: InputShape { frames: 2, regions: 4, text_len: 8 },
        train: false,
        seed: 0,
        samples_per_epoch: None,
        threads: 2,
        prefetch: 2,
        skip_bad: false,
    };
    let l = Loader::new(ds(all.clone()), tokenizer(), c.clone()).unwrap();
    let err = format!("{:#}", l.epoch(1).next().unwrap().unwrap_err());
    assert!(err.contains("missing_dir") && err.contains("clip directory missing"), "{err}");
    // With skipping: only the good clip comes out; the seven bad ones are counted with reasons.
    c.skip_bad = true;
    let l = Loader::new(ds(all), tokenizer(), c.clone()).unwrap();
    let batches: Vec<_> = l.epoch(1).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].clips, vec!["good"]);
    let skipped = l.skipped();
    assert_eq!(skipped.len(), 7);
    assert_eq!(batches[0].skipped, skipped, "the batch lists what the loader counts");
    assert!(skipped.iter().any(|s| s.clip == "nan" && s.reason.contains("non-finite")));
    let l = Loader::new(ds(bad_caption), tokenizer(), c).unwrap();
    let _ = l.epoch(1).count();
    assert!(l.skipped().iter().any(|s| s.clip == "good" && s.reason.contains("empty caption")));
    std::fs::remove_dir_all(&root).unwrap();
}

/// Every batch is a pure function of (seed, epoch, batch index): built alone, from the
/// epoch's iterator, or from an iterator started part-way (a resumed run), with any thread
/// count, it is the same batch; and the video-only assembler evaluation uses gives exactly
/// the video tensors of the full batch path.
#[test]
fn batches_are_pure_functions_of_seed_epoch_and_index() {
    let root = tmpdir("loader_pure");
    for i in 0..9 {
        write_clip(&root, &format!("c{i}"), 1 + i % 4, 2 + 3 * i, 300 + i as u64);
    }
    let npz: Arc<dyn FeatureSource> = Arc::new(NpzTree::new(&root));
    let datasets = vec![
        Dataset { name: "a".into(), samples: samples(&[0, 1, 2, 3, 4]), source: npz.clone() },
        Dataset { name: "b".into(), samples: samples(&[5, 6, 7, 8]), source: npz.clone() },
    ];
    let same = |a: &demovlp_data::Batch, b: &demovlp_data::Batch| {
        (&a.clips, &a.captions, &a.sample_ids, &a.input_ids, &a.attention_mask, &a.object_mask, a.dataset, a.index)
            == (&b.clips, &b.captions, &b.sample_ids, &b.input_ids, &b.attention_mask, &b.object_mask, b.dataset, b.index)
            && a.object == b.object
    };
    for epoch in [1, 2, 5] {
        let l = Loader::new(datasets.clone(), tokenizer(), cfg(2, true)).unwrap();
        let all: Vec<_> = l.epoch(epoch).map(|b| b.unwrap()).collect();
        assert_eq!(all.len(), l.batches_per_epoch());
        for (i, b) in all.iter().enumerate() {
            assert_eq!(b.index, i);
            let fresh = Loader::new(datasets.clone(), tokenizer(), cfg(1, true)).unwrap();
            assert!(same(b, &fresh.batch(epoch, i).unwrap()), "epoch {epoch} batch {i} built alone");
            let resumed: Vec<_> = fresh.epoch_from(epoch_seed(11, epoch), i).map(|b| b.unwrap()).collect();
            assert!(same(b, &resumed[0]), "epoch {epoch} batch {i} after resuming there");
            assert_eq!(resumed.len(), all.len() - i);
        }
    }

    // Evaluation's videos: the video-only assembler against the full batch path.
    let shape = InputShape { frames: 3, regions: 5, text_len: 16 };
    let ds = &datasets[0];
    let idx: Vec<usize> = (0..ds.samples.len()).collect();
    let full = assemble(ds, &idx, shape, &tokenizer(), Draw::Eval, false).unwrap();
    let clips: Vec<String> = ds.samples.iter().map(|s| s.clip.clone()).collect();
    let videos = assemble_videos(&ds.name, ds.source.as_ref(), &clips, shape).unwrap();
    assert_eq!((videos.batch, videos.frames, videos.regions, &videos.clips), (full.batch, full.frames, full.regions, &full.clips));
    assert!(videos.object == full.object && videos.object_mask == full.object_mask);
    let err = format!("{:#}", assemble_videos("a", npz.as_ref(), &["c0".into(), "nope".into()], shape).unwrap_err());
    assert!(err.contains("nope") && err.contains("clip directory missing"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
