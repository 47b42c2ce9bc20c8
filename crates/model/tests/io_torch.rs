//! The published trainer's checkpoint (`torch.save` zip, `module.`-prefixed state dict, a
//! pickled config object of a class that only exists in the published code) must yield
//! exactly the weights recorded as `param.*` in model_tiny.safetensors.

use demovlp_model::io::read_safetensors;
use demovlp_model::torch::read_torch_state_dict;

use demovlp_testutil::testdata;

#[test]
fn published_checkpoint_state_dict_equals_recorded_params() {
    let sd = read_torch_state_dict(&testdata("model_tiny_checkpoint.pth")).unwrap();
    let fx = read_safetensors(&testdata("model_tiny.safetensors")).unwrap();
    assert_eq!(sd.source_key, "state_dict");
    let want: Vec<&str> = fx.tensors.keys().filter_map(|k| k.strip_prefix("param.")).collect();
    let got: Vec<&str> = sd.tensors.keys().map(String::as_str).collect();
    assert_eq!(got, want, "tensor names differ");
    for (name, t) in &sd.tensors {
        let r = &fx.tensors[&format!("param.{name}")];
        assert_eq!(t.shape, r.shape, "{name}: shape");
        assert_eq!(t.as_f32().unwrap(), r.as_f32().unwrap(), "{name}: values");
    }
}

#[test]
fn sizes_inferred_from_checkpoint_shapes() {
    use demovlp_model::{io::infer_config, TextKind};
    for (fixture, heads) in [("model_tiny.safetensors", (4, 4)), ("model_tiny_1frame.safetensors", (3, 2))] {
        let fx = read_safetensors(&testdata(fixture)).unwrap();
        let meta: serde_json::Value = serde_json::from_str(&fx.metadata["config"]).unwrap();
        let u = |k: &str| meta[k].as_u64().unwrap() as usize;
        let params = fx.tensors.iter().filter_map(|(k, v)| k.strip_prefix("param.").map(|k| (k.to_string(), v.clone()))).collect();
        let c = infer_config(&params, heads.0, heads.1).unwrap();
        assert_eq!(c.text.kind, TextKind::Distilbert);
        assert_eq!(
            (c.text.dim, c.text.layers, c.text.heads, c.text.vocab_size, c.text.max_position_embeddings),
            (u("tdim"), u("tlayers"), u("theads"), u("vocab"), u("maxpos")),
            "{fixture}"
        );
        assert_eq!(
            (c.video.dim, c.video.depth, c.video.heads, c.video.max_frames),
            (u("dim"), u("depth"), u("heads"), u("F")),
            "{fixture}"
        );
        assert_eq!((c.text.hidden_dim, c.video.mlp_dim, c.video.feature_dim, c.video.box_dim), (4 * u("tdim"), 4 * u("dim"), 2048, 6));
        assert_eq!(c.proj_dim, u("out"));
        // Heads must divide the width.
        assert!(infer_config(&params, 5, heads.1).is_err());
    }
}
