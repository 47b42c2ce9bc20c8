//! A frame file whose metadata disagrees with itself is an error naming the file (or, with
//! skipping on, a counted skip in `pack`); clipping boxes to the image is an explicit option.

use std::path::Path;

use demovlp_data::pack::{pack, PackConfig};
use demovlp_data::regions::FrameFile;
use demovlp_data::NpzTree;
use demovlp_formats::{NpyArray, Npz};
use demovlp_testutil::{testdata, tmpdir};

fn frame() -> FrameFile {
    let n = 3;
    FrameFile {
        x: (0..n * 2048).map(|i| (i % 7) as f32 * 0.1).collect(),
        bbox: vec![0.0, 0.0, 10.0, 20.0, 5.0, 5.0, 99.5, 60.0, 30.0, 10.0, 40.0, 79.0],
        conf: vec![0.9, 0.5, 0.7],
        image_w: 100.0,
        image_h: 80.0,
        n,
    }
}

/// Rewrite `path` with member `name` replaced by `value` (None: left out).
fn replace(path: &Path, name: &str, value: Option<NpyArray>) {
    let npz = Npz::open(path).unwrap();
    let mut members: Vec<(String, NpyArray)> = Vec::new();
    for m in ["x", "bbox", "num_bbox", "image_h", "image_w"] {
        if m == name {
            if let Some(v) = &value {
                members.push((m.into(), v.clone()));
            }
        } else if npz.contains(m) {
            members.push((m.into(), npz.array(m).unwrap()));
        }
    }
    members.push(("info".into(), NpyArray::object_scalar(&npz.object("info").unwrap()).unwrap()));
    let refs: Vec<(&str, &NpyArray)> = members.iter().map(|(n, a)| (n.as_str(), a)).collect();
    demovlp_formats::write_npz(path, &refs).unwrap();
}

#[test]
fn inconsistent_counts_sizes_and_boxes_are_named_errors() {
    let dir = tmpdir("frame-meta");
    let path = dir.join("0.npz");
    let write = |f: &FrameFile| f.write(&path, "img", &[1, 2, 3]).unwrap();
    write(&frame());
    assert_eq!(FrameFile::read(&path).unwrap(), frame());
    // A file without the top-level copies still reads (info is authoritative).
    replace(&path, "num_bbox", None);
    replace(&path, "image_h", None);
    FrameFile::read(&path).unwrap();

    let err = |f: &Path| format!("{:#}", FrameFile::read(f).unwrap_err());
    for (member, value, want) in [
        ("num_bbox", NpyArray::from_i64(&[], &[4]), "num_bbox = 4 but 'x' has 3 rows"),
        ("image_h", NpyArray::from_i64(&[], &[81]), "image_h = 81 but info['image_h'] = 80"),
        ("image_w", NpyArray::from_i64(&[], &[0]), "image_w = 0, expected a positive size"),
    ] {
        write(&frame());
        replace(&path, member, Some(value));
        let e = err(&path);
        assert!(e.contains(want) && e.contains("0.npz"), "{member}: {e}");
    }

    // An inverted box is always an error.
    let mut inv = frame();
    inv.bbox[4..8].copy_from_slice(&[50.0, 5.0, 40.0, 60.0]);
    write(&inv);
    assert!(err(&path).contains("box 1") && err(&path).contains("inverted"), "{}", err(&path));
    assert!(FrameFile::read_checked(&path, true).is_err());
    // Outside the image by more than a pixel: an error, or clipped when asked.
    let mut out = frame();
    out.bbox[4..8].copy_from_slice(&[-3.0, 5.0, 104.0, 60.0]);
    write(&out);
    let e = err(&path);
    assert!(e.contains("box 1") && e.contains("outside the 100 x 80 image") && e.contains("--clip-boxes"), "{e}");
    let clipped = FrameFile::read_checked(&path, true).unwrap();
    assert_eq!(&clipped.bbox[4..8], &[0.0, 5.0, 100.0, 60.0]);
    // Within the one-pixel slack (extractors clip to w - 1 or w): accepted as it is.
    let mut edge = frame();
    edge.bbox[4..8].copy_from_slice(&[-0.5, 0.0, 100.8, 80.0]);
    write(&edge);
    assert_eq!(FrameFile::read(&path).unwrap().bbox, edge.bbox);

    // In pack: a counted skip by default, packed with clip_boxes.
    let root = dir.join("features");
    std::fs::create_dir_all(root.join("c")).unwrap();
    out.write(&root.join("c").join("0.npz"), "img", &[1, 2, 3]).unwrap();
    let cfg = PackConfig { progress: false, threads: 1, ..Default::default() };
    let s = pack(&root, &["c".into()], &dir.join("store"), &cfg).unwrap();
    assert_eq!((s.clips, s.skipped.len()), (0, 1));
    assert!(s.skipped[0].1.contains("outside"), "{:?}", s.skipped);
    let s = pack(&root, &["c".into()], &dir.join("store2"), &PackConfig { clip_boxes: true, ..cfg }).unwrap();
    assert_eq!((s.clips, s.skipped.len()), (1, 0));
    // The tree reader takes the option too.
    assert!(NpzTree::new(&root).read_frame("c", 0).is_err());
    assert_eq!(&NpzTree::new(&root).with_clip_boxes(true).read_frame("c", 0).unwrap().bbox[4..8], &[0.0, 5.0, 100.0, 60.0]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_real_fixture_frames_pass_every_check() {
    let root = testdata("region_features");
    for clip in ["video7020", "video9771"] {
        let n = demovlp_data::regions::count_frames(&root.join(clip)).unwrap();
        for f in 0..n {
            NpzTree::new(&root).read_frame(clip, f).unwrap();
        }
    }
}
