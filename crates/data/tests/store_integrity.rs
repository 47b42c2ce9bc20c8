//! A packed store carries a checksum of every file; a flipped bit is a named error when the
//! store is opened (index files) or first read (shards), never a silent load.

use demovlp_data::pack::{pack, PackConfig};
use demovlp_data::regions::FrameFile;
use demovlp_data::{FeatureSource, PackedStore};
use demovlp_testutil::tmpdir;

fn flip(path: &std::path::Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x04;
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_flipped_bit_in_a_shard_or_index_is_named() {
    let dir = tmpdir("store-integrity");
    let root = dir.join("features");
    for clip in ["a", "b"] {
        std::fs::create_dir_all(root.join(clip)).unwrap();
        let n = 4;
        let f = FrameFile {
            x: (0..n * 2048).map(|i| (i % 13) as f32 * 0.05).collect(),
            bbox: [0.0, 0.0, 10.0, 10.0].repeat(n),
            conf: vec![0.9, 0.8, 0.7, 0.6],
            image_w: 50.0,
            image_h: 40.0,
            n,
        };
        f.write(&root.join(clip).join("0.npz"), clip, &[1, 2, 3, 4]).unwrap();
    }
    let store = dir.join("store");
    let cfg = PackConfig { progress: false, threads: 1, ..Default::default() };
    pack(&root, &["a".into(), "b".into()], &store, &cfg).unwrap();
    let read = |s: &PackedStore| {
        let (mut o, mut m, mut r) = (vec![0.0; 4 * 2054], vec![0.0; 4], Vec::new());
        s.frame_regions("b", 0, 4, &mut o, &mut m, &mut r).map(|_| o)
    };
    let good = read(&PackedStore::open(&store).unwrap()).unwrap();

    let shard = store.join("shard-00000.bin");
    let len = std::fs::metadata(&shard).unwrap().len() as usize;
    flip(&shard, len / 3);
    let s = PackedStore::open(&store).unwrap();
    let e = format!("{:#}", read(&s).unwrap_err());
    assert!(e.contains("shard-00000.bin") && e.contains("checksum mismatch"), "{e}");
    flip(&shard, len / 3);
    assert_eq!(read(&PackedStore::open(&store).unwrap()).unwrap(), good);

    for index in ["frames.bin", "clips.tsv"] {
        flip(&store.join(index), 1);
        let e = format!("{:#}", PackedStore::open(&store).err().expect("corrupt index accepted"));
        assert!(e.contains(index) && (e.contains("checksum mismatch") || e.contains("malformed") || e.contains("corrupt")), "{e}");
        flip(&store.join(index), 1);
    }
    PackedStore::open(&store).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
