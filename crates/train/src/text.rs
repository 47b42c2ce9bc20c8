//! The tokenizer the training code uses, and the built-in uncased WordPiece vocabulary
//! (`bert-base-uncased`, the one DistilBERT-base-uncased uses) embedded in the binary so
//! the demo needs no files.

use std::path::Path;

use anyhow::{Context, Result};

pub use demovlp_data::tokenizer::TextTokenizer as Tokenizer;

/// `testdata/bert-base-uncased/tokenizer.json`, 30522 tokens.
pub const BERT_UNCASED_TOKENIZER_JSON: &[u8] = include_bytes!("../../../testdata/bert-base-uncased/tokenizer.json");

/// The embedded uncased WordPiece tokenizer.
pub fn builtin_tokenizer() -> Result<Tokenizer> {
    // The tokenizer loads from a path; stage the embedded bytes in a private temporary file.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("demovlp-bert-uncased-{}-{n}.json", std::process::id()));
    std::fs::write(&path, BERT_UNCASED_TOKENIZER_JSON).with_context(|| format!("staging the built-in tokenizer at {}", path.display()))?;
    let tok = Tokenizer::from_path(&path);
    std::fs::remove_file(&path).ok();
    tok
}

/// The names of the embedded tokenizer a config may give instead of a path (the demo writes
/// `builtin:bert-base-uncased` into its saved configs).
pub const BUILTIN_NAMES: &[&str] = &["builtin", "builtin:bert-base-uncased"];

/// Does this config path name the embedded tokenizer?
pub fn is_builtin(path: &Path) -> bool {
    path.to_str().is_some_and(|p| BUILTIN_NAMES.contains(&p))
}

/// A tokenizer from a config path (or one of [`BUILTIN_NAMES`]).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if is_builtin(path) {
        return builtin_tokenizer();
    }
    if let Some(name) = path.to_str().and_then(|p| p.strip_prefix("builtin:")) {
        anyhow::bail!("tokenizer {name:?}: no such built-in tokenizer (built in: {})", BUILTIN_NAMES.join(", "));
    }
    Tokenizer::from_path(path).with_context(|| format!("loading tokenizer {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tokenizer_is_the_real_vocabulary() {
        let t = builtin_tokenizer().unwrap();
        assert_eq!(t.vocab_size(), 30522);
        let (ids, mask) = t.encode("A red dog runs to the left", 12).unwrap();
        // [CLS] a red dog runs to the left [SEP] pad pad pad
        assert_eq!(ids, vec![101, 1037, 2417, 3899, 3216, 2000, 1996, 2187, 102, 0, 0, 0]);
        assert_eq!(mask.iter().sum::<i64>(), 9);
        // The names a config may give (the demo saves `builtin:bert-base-uncased`).
        for name in BUILTIN_NAMES {
            assert_eq!(load_tokenizer(Path::new(name)).unwrap().encode("A red dog", 5).unwrap(), t.encode("A red dog", 5).unwrap());
        }
        let e = format!("{:#}", load_tokenizer(Path::new("builtin:gpt2")).err().expect("unknown built-in"));
        assert!(e.contains("gpt2") && e.contains("builtin:bert-base-uncased"), "{e}");
    }
}
