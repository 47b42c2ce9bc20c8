//! Region selection against the reference loader's output (testdata/region_selection.safetensors).

use std::path::PathBuf;

use demovlp_data::regions::{choose_frames, select_clip, FeatureSource, FrameChoice, NpzTree, TOKEN_DIM};
use demovlp_kernels::rng::Rng;
use safetensors::SafeTensors;

pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Checks every case of the fixture against `src`; `tol` bounds feature differences
/// (0 for the exact .npz path, fp16 rounding for a half-precision store).
pub fn check_all_cases(src: &dyn FeatureSource, feat_tol: f32) {
    let bytes = std::fs::read(testdata().join("region_selection.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    let cases: serde_json::Value = serde_json::from_str(&meta["cases"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let r = 30;
    let mut checked_objects = 0;
    for case in cases.as_array().unwrap() {
        let clip = case["video"].as_str().unwrap();
        let segments = case["segments"].as_u64().unwrap() as usize;
        let name = case["tensor"].as_str().unwrap();
        let got = select_clip(src, clip, segments, r, FrameChoice::Middle).unwrap();
        let want_frames: Vec<usize> =
            case["frame_indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(got.frame_indices, want_frames, "{name}: frames");
        let src_rows = i64s(&st, &format!("{name}.source_region"));
        let got_rows: Vec<i64> = got.source_rows.iter().map(|&v| v as i64).collect();
        assert_eq!(got_rows, src_rows, "{name}: source rows");
        assert_eq!(got.mask, f32s(&st, &format!("{name}.mask")), "{name}: mask");
        let counts: Vec<f32> = got.mask.chunks(r).map(|m| m.iter().sum()).collect();
        let want_counts: Vec<f32> =
            case["region_counts"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(counts, want_counts, "{name}: region counts");
        let spatial = f32s(&st, &format!("{name}.spatial"));
        for (slot, want) in spatial.chunks(6).enumerate() {
            let tok = &got.object[slot * TOKEN_DIM..(slot + 1) * TOKEN_DIM];
            for (a, b) in tok[2048..].iter().zip(want) {
                assert!((a - b).abs() <= 1e-6, "{name}: slot {slot} box {a} vs {b}");
            }
        }
        if st.tensor(&format!("{name}.object")).is_ok() {
            let want = f32s(&st, &format!("{name}.object"));
            assert_eq!(want.len(), got.object.len());
            let max = want.iter().zip(&got.object).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max <= feat_tol.max(1e-6), "{name}: object max diff {max}");
            checked_objects += 1;
        }
    }
    assert_eq!(checked_objects, 2);
}

#[test]
fn npz_tree_reproduces_reference_selection() {
    check_all_cases(&NpzTree::new(testdata().join("region_features")), 0.0);
}

#[test]
fn frame_choice_rules() {
    let mut mid = FrameChoice::Middle;
    assert_eq!(choose_frames(8, 4, &mut mid).unwrap(), vec![0, 2, 4, 6]);
    assert_eq!(choose_frames(8, 1, &mut mid).unwrap(), vec![3]);
    assert_eq!(choose_frames(3, 8, &mut mid).unwrap(), vec![0, 1, 2]);
    assert_eq!(choose_frames(10, 3, &mut mid).unwrap(), vec![1, 4, 7]);
    // Training: uniform within the whole segment, including its last frame, one-frame
    // segments included; deterministic per seed.
    let mut rng = Rng::new(7);
    let mut seen = vec![[0usize; 3]; 3];
    for _ in 0..3000 {
        let f = choose_frames(9, 3, &mut FrameChoice::Random(&mut rng)).unwrap();
        for (j, &x) in f.iter().enumerate() {
            assert!(x >= 3 * j && x < 3 * j + 3);
            seen[j][x - 3 * j] += 1;
        }
    }
    for s in &seen {
        for &c in s {
            assert!(c > 850 && c < 1150, "not uniform: {seen:?}");
        }
    }
    let one = choose_frames(4, 4, &mut FrameChoice::Random(&mut Rng::new(1))).unwrap();
    assert_eq!(one, vec![0, 1, 2, 3]);
    let a = choose_frames(40, 8, &mut FrameChoice::Random(&mut Rng::new(5))).unwrap();
    let b = choose_frames(40, 8, &mut FrameChoice::Random(&mut Rng::new(5))).unwrap();
    assert_eq!(a, b);
}
