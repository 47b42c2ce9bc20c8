//! Uncased WordPiece tokenisation (SPEC §4): lower-casing, accent stripping, CJK
//! splitting, `[CLS] … [SEP]`, truncated and padded to a fixed length (pad id 0,
//! attention mask 1 for real tokens).
//!
//! Built on the `tokenizers` crate from a `tokenizer.json`, a BERT `vocab.txt` (the
//! uncased BERT pipeline is assembled here), or a directory holding either.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::Tokenizer;

/// Default text length of the published model.
pub const DEFAULT_MAX_LEN: usize = 100;

/// A WordPiece tokenizer producing fixed-length `(input_ids, attention_mask)`.
pub struct TextTokenizer {
    inner: Tokenizer,
    cls: i64,
    sep: i64,
    pad: i64,
    /// Where it was loaded from.
    pub source: PathBuf,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, `vocab.txt`, or a directory containing either
    /// (`tokenizer.json` preferred).
    pub fn from_path(p: &Path) -> Result<Self> {
        let file = if p.is_dir() {
            let json = p.join("tokenizer.json");
            let vocab = p.join("vocab.txt");
            if json.is_file() {
                json
            } else if vocab.is_file() {
                vocab
            } else {
                bail!("{}: directory has neither tokenizer.json nor vocab.txt", p.display());
            }
        } else if p.is_file() {
            p.to_path_buf()
        } else {
            bail!("{}: tokenizer file or directory not found", p.display());
        };
        let mut inner = if file.extension().is_some_and(|e| e == "json") {
            Tokenizer::from_file(&file).map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", file.display()))?
        } else {
            Self::bert_uncased(&file)?
        };
        // Truncation and padding are done in `encode` so the length is per call.
        inner.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
        inner.with_padding(None);
        let id = |t: &str| -> Result<i64> {
            inner.token_to_id(t).map(|i| i as i64).with_context(|| format!("{}: vocabulary has no {t} token", file.display()))
        };
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        Ok(TextTokenizer { inner, cls, sep, pad, source: file })
    }

    /// The uncased BERT pipeline over a `vocab.txt`.
    fn bert_uncased(vocab: &Path) -> Result<Tokenizer> {
        let wp = WordPiece::from_file(&vocab.to_string_lossy())
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| anyhow::anyhow!("{}: cannot read WordPiece vocabulary: {e}", vocab.display()))?;
        let mut t = Tokenizer::new(wp);
        // clean_text, handle_chinese_chars, strip_accents (None = follow lowercase), lowercase
        t.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
        t.with_pre_tokenizer(Some(BertPreTokenizer));
        Ok(t)
    }

    /// Vocabulary size (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `[CLS] tokens [SEP]`, truncated to `max_len` (keeping the first `max_len − 2`
    /// word pieces) and padded with id 0 / mask 0 to exactly `max_len`.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<(Vec<i64>, Vec<i64>)> {
        if max_len < 2 {
            bail!("max_len must be at least 2 (room for [CLS] and [SEP]), got {max_len}");
        }
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        let pieces = enc.get_ids();
        let keep = pieces.len().min(max_len - 2);
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.cls);
        ids.extend(pieces[..keep].iter().map(|&i| i as i64));
        ids.push(self.sep);
        let mut mask = vec![1i64; ids.len()];
        ids.resize(max_len, self.pad);
        mask.resize(max_len, 0);
        Ok((ids, mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use demovlp_testutil::testdata_dir as testdata;

    fn check_fixture(tok: &TextTokenizer) {
        let cases: serde_json::Value =
            serde_json::from_slice(&std::fs::read(testdata().join("tokenizer_bert_uncased_max100.json")).unwrap()).unwrap();
        let cases = cases.as_array().unwrap();
        assert!(cases.len() > 200);
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want_ids: Vec<i64> = c["input_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let want_mask: Vec<i64> = c["attention_mask"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let (ids, mask) = tok.encode(text, 100).unwrap();
            assert_eq!(ids, want_ids, "{} on {text:?}", tok.source.display());
            assert_eq!(mask, want_mask, "{text:?}");
        }
    }

    #[test]
    fn reproduces_fixture_from_vocab_txt_json_and_dir() {
        let dir = testdata().join("bert-base-uncased");
        check_fixture(&TextTokenizer::from_path(&dir.join("vocab.txt")).unwrap());
        check_fixture(&TextTokenizer::from_path(&dir.join("tokenizer.json")).unwrap());
        let t = TextTokenizer::from_path(&dir).unwrap();
        assert_eq!(t.vocab_size(), 30522);
        let (ids, mask) = t.encode("a dog", 5).unwrap();
        assert_eq!((ids, mask), (vec![101, 1037, 3899, 102, 0], vec![1, 1, 1, 1, 0]));
        let (ids, _) = t.encode("a dog runs fast", 4).unwrap();
        assert_eq!(ids, vec![101, 1037, 3899, 102]);
        assert!(t.encode("x", 1).is_err());
        assert!(TextTokenizer::from_path(&testdata().join("nope")).is_err());
    }
}
