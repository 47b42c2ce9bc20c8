//! Shared test helpers.
#![allow(dead_code)]

use demovlp_data::regions::{select_clip, FeatureSource, FrameChoice, TOKEN_DIM};
use safetensors::SafeTensors;

pub use demovlp_testutil::testdata_dir as testdata;
#[allow(unused_imports)] // not every test binary that includes this module needs it
pub use demovlp_testutil::tmpdir;

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
        let want_frames: Vec<usize> = case["frame_indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(got.frame_indices, want_frames, "{name}: frames");
        let src_rows = i64s(&st, &format!("{name}.source_region"));
        let got_rows: Vec<i64> = got.source_rows.iter().map(|&v| v as i64).collect();
        assert_eq!(got_rows, src_rows, "{name}: source rows");
        assert_eq!(got.mask, f32s(&st, &format!("{name}.mask")), "{name}: mask");
        let counts: Vec<f32> = got.mask.chunks(r).map(|m| m.iter().sum()).collect();
        let want_counts: Vec<f32> = case["region_counts"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
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

use demovlp_data::regions::FrameFile;
use demovlp_kernels::rng::Rng;

/// Writes a synthetic clip `<root>/<clip>/<i>.npz` with `frames` frames of `regions`
/// regions each (random features, boxes inside a 640x480 image, distinct confidences).
pub fn write_clip(root: &std::path::Path, clip: &str, frames: usize, regions: usize, seed: u64) {
    let dir = root.join(clip);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(seed);
    for f in 0..frames {
        let n = regions;
        let x: Vec<f32> = (0..n * 2048).map(|_| rng.normal()).collect();
        let mut bbox = Vec::new();
        for _ in 0..n {
            let (x1, y1) = (rng.uniform() * 500.0, rng.uniform() * 400.0);
            bbox.extend_from_slice(&[x1, y1, x1 + 1.0 + rng.uniform() * 139.0, y1 + 1.0 + rng.uniform() * 79.0]);
        }
        let conf: Vec<f32> = (0..n).map(|i| 0.1 + 0.8 * ((i * 7919 + f * 31) % 997) as f32 / 997.0 + 1e-5 * i as f32).collect();
        let ff = FrameFile { x, bbox, conf, image_w: 640.0, image_h: 480.0, n };
        let ids: Vec<i64> = (0..n as i64).collect();
        // Odd seeds write deflated members (as the extractor does), even seeds stored ones.
        ff.write_with(&dir.join(format!("{f}.npz")), &format!("{clip}_{f}"), &ids, seed % 2 == 1).unwrap();
    }
}
