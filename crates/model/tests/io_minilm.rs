//! A real pretrained Hugging Face BertModel (all-MiniLM-L6-v2) loaded from its directory
//! must reproduce the `last_hidden_state` that transformers computed for nine captions.
//!
//! The model directory comes from `scripts/fetch-test-models.sh` (→ `testmodels/minilm`)
//! or env `DEMOVLP_MINILM_DIR`. Without it the test fails under CI (env `CI` set) and
//! otherwise prints a notice and passes vacuously.

use std::path::PathBuf;

use demovlp_model::io::{self, read_safetensors};
use demovlp_model::{ModelConfig, TextKind};

fn minilm_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("DEMOVLP_MINILM_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testmodels/minilm"),
    };
    if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    let msg = format!("MiniLM model directory not found at {} (run scripts/fetch-test-models.sh or set DEMOVLP_MINILM_DIR)", dir.display());
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED: {msg}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    None
}

#[test]
fn minilm_last_hidden_state_matches_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let fx = read_safetensors(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/minilm_l6_last_hidden_state.safetensors"))
        .unwrap();
    let ids = fx.get("in.input_ids").unwrap();
    let (b, l) = (ids.shape[0], ids.shape[1]);
    let input_ids = fx.i64("in.input_ids").unwrap();
    let attention_mask = fx.i64("in.attention_mask").unwrap();
    let want = fx.f32("out.last_hidden_state").unwrap();

    // Only the text tower matters here: keep the (randomly initialised) video tower small.
    let mut video = ModelConfig::published(1).video;
    (video.dim, video.depth, video.heads, video.mlp_dim) = (32, 1, 2, 64);
    let (mut model, report) = io::load_hf_text_dir(&dir, video, 16, 0).unwrap();
    let t = model.config.text.clone();
    assert_eq!((t.kind, t.dim, t.layers, t.heads, t.hidden_dim, t.type_vocab_size), (TextKind::Bert, 384, 6, 12, 1536, 2));
    // Everything but the position_ids buffer lands in the model (pooler included).
    assert_eq!(report.skipped, vec!["embeddings.position_ids"], "{report:?}");
    assert!(report.missing.is_empty(), "{report:?}");

    let got = model.text_hidden_states(&input_ids, &attention_mask, b, l);
    assert_eq!(got.len(), want.len());
    let d = t.dim;
    let mut worst = (0.0f32, 0usize);
    for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
        let err = (x - y).abs() / (1.0 + y.abs());
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    let i = worst.1;
    eprintln!(
        "MiniLM: worst relative error {:.3e} at text {}, token {}, unit {} (got {}, want {})",
        worst.0,
        i / (l * d),
        i / d % l,
        i % d,
        got[i],
        want[i]
    );
    assert!(
        worst.0 < 1e-4,
        "MiniLM last_hidden_state differs: {:.3e} at text {}, token {}, unit {}",
        worst.0,
        i / (l * d),
        i / d % l,
        i % d
    );
}
