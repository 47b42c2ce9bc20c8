//! The packed store: same selection as the .npz files, fp16 error, idempotent re-run,
//! interrupted packs refused, skipped clips reported.

mod common;

use common::{check_all_cases, testdata};
use demovlp_data::pack::{pack, PackConfig, PackedStore, StoreDtype};
use demovlp_data::regions::{select_clip, FrameChoice, NpzTree, FEAT_DIM, TOKEN_DIM};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("demovlp_pack_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn clips() -> Vec<String> {
    vec!["video7020".into(), "video9771".into(), "video_missing".into(), "video7020".into()]
}

#[test]
fn f32_store_matches_npz_exactly_and_reruns_are_idempotent() {
    let root = testdata().join("region_features");
    let out = tmp("f32");
    let cfg = PackConfig { progress: false, threads: 2, ..Default::default() };
    let s = pack(&root, &clips(), &out, &cfg).unwrap();
    assert_eq!((s.clips, s.frames), (2, 12));
    assert_eq!(s.regions, 37 + 45 + 12 + 31 + 30 + 40 + 10 + 33 + 44 + 29 + 35 + 18);
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.skipped[0].0, "video_missing");
    assert!(s.skipped[0].1.contains("video_missing") && s.skipped[0].1.contains("missing"), "{:?}", s.skipped);
    assert!(!s.up_to_date);

    let store = PackedStore::open(&out).unwrap();
    check_all_cases(&store, 0.0);
    assert_eq!(store.clip_ids, vec!["video7020", "video9771"]);

    let shard = std::fs::read(out.join("shard-00000.bin")).unwrap();
    assert_eq!(shard.len() as u64, s.bytes);
    let again = pack(&root, &clips(), &out, &cfg).unwrap();
    assert!(again.up_to_date);
    assert_eq!((again.clips, again.frames, again.regions, again.bytes), (s.clips, s.frames, s.regions, s.bytes));
    assert_eq!(std::fs::read(out.join("shard-00000.bin")).unwrap(), shard);

    // An interrupted pack (no manifest) never reads as complete.
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let err = format!("{:#}", PackedStore::open(&out).err().unwrap());
    assert!(err.contains("interrupted"), "{err}");
    // ... and a re-run repairs it, byte for byte.
    let repaired = pack(&root, &clips(), &out, &cfg).unwrap();
    assert!(!repaired.up_to_date);
    assert_eq!(std::fs::read(out.join("shard-00000.bin")).unwrap(), shard);
    let store = PackedStore::open(&out).unwrap();
    let err = format!("{:#}", select_clip(&store, "video_missing", 4, 30, FrameChoice::Middle).unwrap_err());
    assert!(err.contains("not in the packed store"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn f16_store_error_is_bounded() {
    let root = testdata().join("region_features");
    let out = tmp("f16");
    let cfg = PackConfig { dtype: StoreDtype::F16, progress: false, threads: 1, ..Default::default() };
    let s = pack(&root, &clips(), &out, &cfg).unwrap();
    let s32 = (s.regions * (FEAT_DIM * 4 + 28)) as f64;
    assert!((s.bytes as f64) < 0.55 * s32, "fp16 halves the features: {} vs {}", s.bytes, s32);
    let store = PackedStore::open(&out).unwrap();
    let npz = NpzTree::new(&root);
    let (mut max_abs, mut max_rel, mut sum_sq_err, mut sum_sq) = (0f32, 0f32, 0f64, 0f64);
    for clip in ["video7020", "video9771"] {
        let a = select_clip(&npz, clip, 8, 30, FrameChoice::Middle).unwrap();
        let b = select_clip(&store, clip, 8, 30, FrameChoice::Middle).unwrap();
        assert_eq!(a.mask, b.mask);
        assert_eq!(a.source_rows, b.source_rows);
        for (ta, tb) in a.object.chunks(TOKEN_DIM).zip(b.object.chunks(TOKEN_DIM)) {
            assert_eq!(ta[FEAT_DIM..], tb[FEAT_DIM..], "box features stay f32");
            for (x, y) in ta[..FEAT_DIM].iter().zip(&tb[..FEAT_DIM]) {
                let e = (x - y).abs();
                // fp16: 11-bit significand, so relative error ≤ 2^-11 in the normal range
                assert!(e <= x.abs() * 4.9e-4 + 6e-8, "{x} stored as {y}");
                max_abs = max_abs.max(e);
                if x.abs() > 1e-3 {
                    max_rel = max_rel.max(e / x.abs());
                }
                sum_sq_err += (e as f64).powi(2);
                sum_sq += (*x as f64).powi(2);
            }
        }
    }
    let rel_rms = (sum_sq_err / sum_sq).sqrt();
    eprintln!("fp16 store: max abs error {max_abs:.3e}, max rel error {max_rel:.3e}, relative RMS error {rel_rms:.3e}");
    assert!(max_abs > 0.0, "fp16 must actually round something");
    assert!(rel_rms < 3e-4);
    check_all_cases(&store, max_abs);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn store_refuses_more_regions_than_it_kept() {
    let root = testdata().join("region_features");
    let out = tmp("max10");
    let cfg = PackConfig { max_regions: 10, progress: false, threads: 1, ..Default::default() };
    let s = pack(&root, &["video9771".to_string()], &out, &cfg).unwrap();
    assert_eq!(s.regions, 40);
    let store = PackedStore::open(&out).unwrap();
    let npz = NpzTree::new(&root);
    let a = select_clip(&store, "video9771", 4, 10, FrameChoice::Middle).unwrap();
    let b = select_clip(&npz, "video9771", 4, 10, FrameChoice::Middle).unwrap();
    assert!(a.object == b.object && a.mask == b.mask);
    let err = format!("{:#}", select_clip(&store, "video9771", 4, 30, FrameChoice::Middle).unwrap_err());
    assert!(err.contains("at most 10 regions"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}
