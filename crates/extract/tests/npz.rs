//! The `.npz` files `extract` writes, against the reference extractor's own files
//! (`testdata/extract/npz/<i>.npz`, written by numpy 2: `numpy._core` in the pickle) and,
//! where python3 with numpy is installed, loaded by numpy itself.

use demovlp_extract::output::frame_npz;
use demovlp_extract::{load_weights, Detector, DetectorConfig, Frame};
use demovlp_formats::{DType, Npz, Value};
use demovlp_model::Cpu;
use demovlp_testutil::{testdata, tmpdir, Fixture};

fn regions_of_fixture_frames() -> Vec<demovlp_extract::Regions> {
    let f = Fixture::load("extract/extract_tiny.safetensors");
    let w = load_weights(&testdata("extract/bua_tiny_legacy.pth")).unwrap();
    let det = Detector::new(Cpu, &w, DetectorConfig::default());
    (0..3)
        .map(|i| {
            let k = format!("frame{i}.image_bgr");
            let shape = &f.u8s[&k].0;
            det.detect(&Frame { h: shape[0], w: shape[1], bgr: f.u8(&k).to_vec() })
        })
        .collect()
}

fn info_summary(v: &Value) -> Vec<(String, String)> {
    v.as_dict()
        .unwrap()
        .iter()
        .map(|(k, x)| {
            let kind = match x {
                Value::Array(a) => format!("{:?}{:?}", a.dtype, a.shape),
                other => other.kind(),
            };
            (k.as_str().unwrap().to_string(), kind)
        })
        .collect()
}

#[test]
fn layout_matches_the_reference_files() {
    for (i, r) in regions_of_fixture_frames().iter().enumerate() {
        let ours = Npz::from_bytes(frame_npz(r, &i.to_string()).unwrap(), "ours").unwrap();
        let theirs = Npz::open(&testdata(&format!("extract/npz/{i}.npz"))).unwrap();
        assert_eq!(ours.names(), theirs.names(), "frame {i}: members");
        for name in ["x", "bbox", "num_bbox", "image_h", "image_w"] {
            let (a, b) = (ours.array(name).unwrap(), theirs.array(name).unwrap());
            assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "frame {i}: {name}");
            if a.dtype == DType::I64 {
                assert_eq!(a.data, b.data, "frame {i}: {name}");
            } else {
                let (x, y) = (a.to_f32().unwrap(), b.to_f32().unwrap());
                let scale = y.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let tol = if name == "bbox" { 2e-3 } else { 1e-5 * scale };
                assert!(x.iter().zip(&y).all(|(p, q)| (p - q).abs() <= tol), "frame {i}: {name}");
            }
        }
        let (a, b) = (ours.object("info").unwrap(), theirs.object("info").unwrap());
        assert_eq!(info_summary(&a), info_summary(&b), "frame {i}: info keys, order and types");
        for key in ["image_id", "image_h", "image_w", "num_boxes", "objects_id", "attrs_id"] {
            assert_eq!(a.get(key), b.get(key), "frame {i}: info[{key}]");
        }
        // Ours names numpy.core (loads in numpy 1.x and 2.x); theirs numpy._core.
        let raw = |n: &Npz| n.array("info").unwrap().data;
        let contains = |h: &[u8], s: &[u8]| h.windows(s.len()).any(|w| w == s);
        assert!(contains(&raw(&ours), b"numpy.core.multiarray") && !contains(&raw(&ours), b"numpy._core"));
        assert!(contains(&raw(&theirs), b"numpy._core.multiarray"));
    }
}

#[test]
fn numpy_loads_our_files() {
    let has_numpy = std::process::Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
    if !has_numpy {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but python3 with numpy is not installed");
        }
        eprintln!("SKIPPED numpy_loads_our_files: python3 with numpy is not installed (.ci/run installs it)");
        return;
    }
    let dir = tmpdir("extract-npz-numpy");
    let regions = regions_of_fixture_frames();
    for (i, r) in regions.iter().enumerate() {
        std::fs::write(dir.join(format!("{i}.npz")), frame_npz(r, &i.to_string()).unwrap()).unwrap();
    }
    let script = r#"
import json, sys, warnings, zipfile, numpy as np
warnings.simplefilter("error")
out = []
for i in range(3):
    p = f"{sys.argv[1]}/{i}.npz"
    assert all(m.compress_type == zipfile.ZIP_DEFLATED for m in zipfile.ZipFile(p).infolist())
    d = np.load(p, allow_pickle=True)
    info = d["info"].item()
    out.append({"files": d.files, "x": [list(d["x"].shape), str(d["x"].dtype)], "num_bbox": int(d["num_bbox"]),
                "num_bbox_dtype": str(d["num_bbox"].dtype), "image_h": int(d["image_h"]), "image_w": int(d["image_w"]),
                "info_keys": list(info), "objects_id": info["objects_id"].tolist(), "ids_dtype": str(info["objects_id"].dtype),
                "conf": info["objects_conf"].tolist(), "conf_dtype": str(info["objects_conf"].dtype), "image_id": info["image_id"]})
print(json.dumps(out))
"#;
    let o = std::process::Command::new("python3").arg("-c").arg(script).arg(&dir).output().unwrap();
    assert!(o.status.success(), "numpy could not load our files: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (i, r) in regions.iter().enumerate() {
        let f = &v[i];
        assert_eq!(f["files"], serde_json::json!(["x", "bbox", "num_bbox", "image_h", "image_w", "info"]));
        assert_eq!(f["x"], serde_json::json!([[r.len(), r.dim], "float32"]));
        assert_eq!(f["num_bbox"], r.len());
        assert_eq!(f["num_bbox_dtype"], "int64");
        assert_eq!((f["image_h"].as_u64().unwrap() as usize, f["image_w"].as_u64().unwrap() as usize), (r.image_h, r.image_w));
        assert_eq!(
            f["info_keys"],
            serde_json::json!(["image_id", "image_h", "image_w", "num_boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf"])
        );
        assert_eq!(f["objects_id"], serde_json::json!(r.objects_id));
        assert_eq!((f["ids_dtype"].as_str(), f["conf_dtype"].as_str()), (Some("int64"), Some("float32")));
        let conf: Vec<f32> = f["conf"].as_array().unwrap().iter().map(|c| c.as_f64().unwrap() as f32).collect();
        assert_eq!(conf, r.objects_conf);
        assert_eq!(f["image_id"], i.to_string());
    }
}
