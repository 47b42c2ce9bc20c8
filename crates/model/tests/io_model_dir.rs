//! Model directories in and out: importing published weights (recorded batch safetensors
//! and the trainer's .pth), saving/loading our own directories, and Hugging Face
//! DistilBERT directories as the text tower.

use std::path::Path;

use demovlp_model::io::{self, read_safetensors, Tensor};
use demovlp_model::{ModelConfig, TextKind};

use demovlp_testutil::{testdata, tmpdir};

fn assert_params_equal_fixture(model: &demovlp_model::Model, fixture: &Path) {
    let fx = read_safetensors(fixture).unwrap();
    let mut n = 0;
    for (k, t) in &fx.tensors {
        if let Some(name) = k.strip_prefix("param.") {
            let id = model.params.id(name).unwrap_or_else(|| panic!("model lacks {name}"));
            assert_eq!(model.params.get(id), t.as_f32().unwrap(), "{name}");
            n += 1;
        }
    }
    assert_eq!(n, model.params.specs().len(), "model has parameters the fixture lacks");
}

#[test]
fn import_save_load_round_trip() {
    let fx = testdata("model_tiny.safetensors");
    let (model, report) = io::import_weights_report(&fx, Some("param."), 4, 4).unwrap();
    assert_eq!(report.loaded.len(), 76);
    assert!(report.skipped.is_empty() && report.missing.is_empty(), "{report:?}");
    assert_eq!((model.config.text.heads, model.config.video.heads), (4, 4));
    assert_params_equal_fixture(&model, &fx);

    // The trainer's checkpoint gives the same model.
    let pth = io::import_weights(&testdata("model_tiny_checkpoint.pth"), None, 4, 4).unwrap();
    assert_eq!(pth.config, model.config);
    assert_eq!(pth.params.data, model.params.data);

    let dir = tmpdir("rt");
    io::save_model_dir(&model, &dir).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, vec!["config.json", "model.safetensors"], "temporary files left behind?");
    let cfg: ModelConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg, model.config);
    let back = io::load_model_dir(&dir).unwrap();
    assert_eq!(back.config, model.config);
    assert_eq!(back.params.data, model.params.data);
    // Saving over an existing directory replaces it cleanly.
    io::save_model_dir(&back, &dir).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);

    // A directory whose weights lack a tensor is refused, naming it.
    let st = read_safetensors(&dir.join("model.safetensors")).unwrap();
    let kept: Vec<(String, Tensor)> = st.tensors.into_iter().filter(|(k, _)| k != "txt_proj.1.bias").collect();
    io::write_safetensors(&dir.join("model.safetensors"), &kept, &[]).unwrap();
    let e = format!("{:#}", io::load_model_dir(&dir).unwrap_err());
    assert!(e.contains("txt_proj.1.bias"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn import_errors_are_clear() {
    let fx = testdata("model_tiny.safetensors");
    let e = format!("{:#}", io::import_weights(&fx, Some("nope."), 4, 4).unwrap_err());
    assert!(e.contains("nope.") && e.contains("model_tiny.safetensors"), "{e}");
    // Without the prefix nothing has published names.
    assert!(io::import_weights(&fx, None, 4, 4).is_err());
    // Heads cannot be inferred; a count that does not divide the width (64 % 12 != 0) is refused.
    let e = format!("{:#}", io::import_weights(&fx, Some("param."), 12, 4).unwrap_err());
    assert!(e.contains("heads"), "{e}");
}

#[test]
fn hugging_face_distilbert_dir_loads_into_text_tower() {
    // A Hugging Face DistilBertForMaskedLM-style directory made from the recorded text tower.
    let fx = read_safetensors(&testdata("model_tiny.safetensors")).unwrap();
    let mut ts: Vec<(String, Tensor)> = fx
        .tensors
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("param.text_model.").map(|n| (format!("distilbert.{n}"), t.clone())))
        .collect();
    let n_text = ts.len();
    ts.push(("vocab_transform.weight".into(), Tensor::f32(vec![64, 64], vec![0.5; 64 * 64])));
    let dir = tmpdir("hf");
    io::write_safetensors(&dir.join("model.safetensors"), &ts, &[]).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["DistilBertForMaskedLM"],"model_type":"distilbert","activation":"gelu","dim":64,
            "hidden_dim":256,"n_heads":4,"n_layers":2,"max_position_embeddings":64,"vocab_size":1000,
            "sinusoidal_pos_embds":false}"#,
    )
    .unwrap();
    // A small video tower keeps the random init quick; load_model_dir below uses the published one.
    let mut video = ModelConfig::published(2).video;
    (video.dim, video.depth, video.heads, video.mlp_dim) = (32, 1, 2, 64);
    let (model, r) = io::load_hf_text_dir(&dir, video, 16, 0).unwrap();
    assert_eq!(r.loaded.len(), n_text);
    assert_eq!(r.skipped, vec!["vocab_transform.weight"]);
    assert_eq!(model.config.text.kind, TextKind::Distilbert);
    assert_eq!((model.config.text.dim, model.config.text.layers, model.config.text.heads), (64, 2, 4));
    for (k, t) in &fx.tensors {
        if let Some(n) = k.strip_prefix("param.") {
            if n.starts_with("text_model.") {
                assert_eq!(model.params.get(model.params.id(n).unwrap()), t.as_f32().unwrap(), "{n}");
            }
        }
    }
    // The rest got the published random init, not zeros.
    let qkv = model.params.id("object_model.blocks.0.attn.qkv.weight").unwrap();
    assert!(model.params.get(qkv).iter().any(|&x| x != 0.0));
    // load_model_dir recognises the Hugging Face config.
    let m2 = io::load_model_dir(&dir).unwrap();
    assert_eq!(m2.config.text, model.config.text);
    std::fs::remove_dir_all(&dir).ok();
}
