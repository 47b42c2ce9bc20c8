//! The readers against the real fixture files (npz from the extractor, a torch 2.x .pth).

use demovlp_formats::{numpy, pickle, DType, Npz, Value, ZipArchive};

use demovlp_testutil::testdata_dir as testdata;

#[test]
fn reads_extractor_npz_including_pickled_info() {
    let npz = Npz::open(&testdata().join("region_features/video9771/0.npz")).unwrap();
    let x = npz.array("x").unwrap();
    assert_eq!((x.dtype, x.shape.clone()), (DType::F32, vec![44, 2048]));
    let bbox = npz.array("bbox").unwrap();
    assert_eq!(bbox.shape, vec![44, 4]);
    assert_eq!(npz.array("num_bbox").unwrap().scalar_i64().unwrap(), 44);
    assert_eq!(npz.array("image_h").unwrap().scalar_i64().unwrap(), 636);
    assert_eq!(npz.array("image_w").unwrap().scalar_i64().unwrap(), 1212);
    let info = npz.object("info").unwrap();
    assert_eq!(info.get("image_id").and_then(Value::as_str), Some("video9771_0"));
    assert_eq!(info.get("image_w").and_then(Value::as_int), Some(1212));
    assert_eq!(info.get("num_boxes").and_then(Value::as_int), Some(44));
    let Some(Value::Array(conf)) = info.get("objects_conf") else { panic!("objects_conf not an array") };
    assert_eq!((conf.dtype, conf.shape.clone()), (DType::F32, vec![44]));
    let conf = conf.to_f32().unwrap();
    assert!(conf.iter().all(|c| (0.0..=1.0).contains(c)));
    let Some(Value::Array(ids)) = info.get("objects_id") else { panic!("objects_id not an array") };
    assert_eq!(ids.to_i64().unwrap()[..3], [1183, 1588, 288]);
    // Numbers seen with Python: x[0, :3], bbox[0].
    let xv = x.to_f32().unwrap();
    assert!(xv.iter().all(|v| v.is_finite()));
    let bv = bbox.to_f32().unwrap();
    assert!(bv[2] > bv[0] && bv[3] > bv[1], "x2 > x1, y2 > y1");
}

#[test]
fn reads_torch_zip_checkpoint_and_its_pickle() {
    let path = testdata().join("model_tiny_checkpoint.pth");
    let zip = ZipArchive::open(&path).unwrap();
    let names: Vec<&str> = zip.entries().iter().map(|e| e.name.as_str()).collect();
    assert!(names.contains(&"model_tiny_checkpoint/data.pkl"));
    assert!(names.contains(&"model_tiny_checkpoint/byteorder"));
    assert_eq!(&*zip.read("model_tiny_checkpoint/byteorder").unwrap(), b"little");
    assert_eq!(zip.entries().len(), 82);
    // Every entry's CRC checks out.
    for e in zip.entries() {
        zip.read_entry(e).unwrap();
    }
    let storage0 = zip.read("model_tiny_checkpoint/data/0").unwrap();
    assert_eq!(storage0.len(), 256000); // 1000 x 64 f32 word embeddings
    let pkl = zip.read("model_tiny_checkpoint/data.pkl").unwrap();
    let v = pickle::parse_plain(&pkl).unwrap();
    assert_eq!(v.get("arch").and_then(Value::as_str), Some("ObjectRelation"));
    assert_eq!(v.get("epoch").and_then(Value::as_int), Some(3));
    assert_eq!(v.get("monitor_best").and_then(Value::as_f64), Some(0.25));
    // The unknown config class is kept symbolically, not executed or refused.
    let cfg = v.get("config").unwrap();
    assert!(matches!(cfg, Value::Build { .. }), "{}", cfg.kind());
    let sd = v.get("state_dict").unwrap().as_dict().unwrap();
    let (k, t) = &sd[0];
    assert_eq!(k.as_str(), Some("module.text_model.embeddings.word_embeddings.weight"));
    let Value::Reduce { callable, args, .. } = t else { panic!("tensor is {}", t.kind()) };
    assert_eq!(callable.global_name(), Some(("torch._utils", "_rebuild_tensor_v2")));
    let args = args.as_seq().unwrap();
    let Value::PersistentId(pid) = &args[0] else { panic!("storage is {}", args[0].kind()) };
    let pid = pid.as_seq().unwrap();
    assert_eq!(pid[0].as_str(), Some("storage"));
    assert_eq!(pid[1].global_name(), Some(("torch", "FloatStorage")));
    assert_eq!(pid[2].as_str(), Some("0"));
    assert_eq!(pid[4].as_int(), Some(64000));
    assert_eq!(args[2], Value::Tuple(vec![Value::Int(1000), Value::Int(64)]));
    // The numpy layer must refuse torch objects rather than guess.
    assert!(numpy::resolve(t).is_err());
}
