//! Tokenizer loading (`builtin:bert-base-uncased` or a path) and the id → word-piece table
//! that explanations label words with.

use std::path::Path;

use anyhow::{Context, Result};
use demovlp_data::TextTokenizer;

pub const BUILTIN: &str = "builtin:bert-base-uncased";

pub fn load_tokenizer(spec: &str) -> Result<TextTokenizer> {
    if spec == BUILTIN {
        demovlp_train::text::builtin_tokenizer()
    } else {
        demovlp_train::text::load_tokenizer(Path::new(spec))
    }
}

/// id → token string of the tokenizer named by `spec`.
pub fn vocab_table(spec: &str) -> Result<Vec<String>> {
    let (bytes, json) = if spec == BUILTIN {
        (demovlp_train::text::BERT_UNCASED_TOKENIZER_JSON.to_vec(), true)
    } else {
        let p = Path::new(spec);
        let f = if p.is_dir() {
            if p.join("tokenizer.json").is_file() {
                p.join("tokenizer.json")
            } else {
                p.join("vocab.txt")
            }
        } else {
            p.to_path_buf()
        };
        let json = f.extension().is_some_and(|e| e == "json");
        (std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?, json)
    };
    if json {
        let v: serde_json::Value = serde_json::from_slice(&bytes).context("parsing tokenizer.json")?;
        let vocab = v["model"]["vocab"].as_object().context("tokenizer.json: no model.vocab")?;
        let mut table = vec![String::new(); vocab.len()];
        for (tok, id) in vocab {
            if let Some(i) = id.as_u64() {
                if (i as usize) >= table.len() {
                    table.resize(i as usize + 1, String::new());
                }
                table[i as usize] = tok.clone();
            }
        }
        Ok(table)
    } else {
        Ok(String::from_utf8_lossy(&bytes).lines().map(|l| l.trim_end().to_string()).collect())
    }
}
