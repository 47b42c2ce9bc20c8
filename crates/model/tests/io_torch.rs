//! The published trainer's checkpoint (`torch.save` zip, `module.`-prefixed state dict, a
//! pickled config object of a class that only exists in the published code) must yield
//! exactly the weights recorded as `param.*` in model_tiny.safetensors.

use std::path::PathBuf;

use demovlp_model::io::read_safetensors;
use demovlp_model::torch::read_torch_state_dict;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(name)
}

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
