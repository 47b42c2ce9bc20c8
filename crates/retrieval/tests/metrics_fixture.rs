//! Every case of testdata/retrieval_metrics.json (published metric code's output).

mod common;
use common::testdata;
use demovlp_retrieval::{retrieval_metrics, retrieval_metrics_f64, DirectionMetrics};
use serde_json::Value;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn check(name: &str, dir: &str, got: &DirectionMetrics, want: &Value) {
    let fields = [
        ("R1", got.r1),
        ("R5", got.r5),
        ("R10", got.r10),
        ("R50", got.r50),
        ("MedR", got.medr),
        ("MeanR", got.meanr),
        ("geometric_mean_R1-R5-R10", got.geometric_mean_r1_r5_r10),
    ];
    for (key, v) in fields {
        let w = want[key].as_f64().unwrap_or_else(|| panic!("{name}: {dir}.{key} missing"));
        assert!(close(v, w), "{name}: {dir}.{key} = {v}, published {w}");
    }
    // to_json uses the published key names.
    let j = got.to_json();
    for key in want.as_object().unwrap().keys() {
        assert!(j.get(key).is_some(), "to_json lacks {key}");
    }
}

#[test]
fn every_published_case() {
    let path = testdata("retrieval_metrics.json");
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(cases.len(), 8);
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let rows: Vec<Vec<f64>> = c["sims_text_by_video"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
            .collect();
        let (texts, videos) = (rows.len(), rows[0].len());
        let flat: Vec<f64> = rows.concat();
        // query_mask is [videos, k]; caption-major per video = row-major flattening.
        let mask: Option<Vec<bool>> = c["query_mask"]
            .as_array()
            .map(|m| m.iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() != 0.0)).collect());
        let m = retrieval_metrics_f64(&flat, texts, videos, mask.as_deref());
        check(name, "t2v", &m.t2v, &c["t2v"]);
        check(name, "v2t", &m.v2t, &c["v2t"]);
        // The f32 entry point agrees here (no near-ties below f32 resolution).
        let f: Vec<f32> = flat.iter().map(|&x| x as f32).collect();
        assert_eq!(retrieval_metrics(&f, texts, videos, mask.as_deref()), m, "{name}: f32 path differs");
    }
}

#[test]
fn hand_computed_ties() {
    // 2 videos, 2 captions each; caption-major rows.
    let sims = [
        1.0, 0.0, // v0 c0: rank 0
        0.5, 0.5, // v0 c1: tie → optimistic rank 0
        0.2, 0.2, // v1 c0: tie → 0
        0.9, 0.1, // v1 c1: rank 1
    ];
    let m = retrieval_metrics(&sims, 4, 2, None);
    assert_eq!(m.t2v.r1, 75.0);
    assert_eq!(m.t2v.meanr, 1.25);
    // v2t column 1 = [0.0, 0.5, 0.2, 0.1]: captions 2 (0.2, rank 1) and 3 (0.1, rank 2) → 1.
    // column 0 = [1.0, 0.5, 0.2, 0.9]: captions 0 (rank 0) → 0.
    assert_eq!(m.v2t.r1, 50.0);
    assert_eq!(m.v2t.medr, 1.5);
    // Masking caption 0 of video 0: video 0's best is now caption 1 (0.5 → rank 1 of 3).
    let mask = [false, true, true, true];
    let m = retrieval_metrics(&sims, 4, 2, Some(&mask));
    assert_eq!(m.t2v.r1, 100.0 * 2.0 / 3.0);
    assert_eq!(m.v2t.meanr, 2.0);
}
