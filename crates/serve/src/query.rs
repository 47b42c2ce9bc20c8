//! A strict query-string parser: `application/x-www-form-urlencoded` as browsers send it
//! (`+` is a space, `%XX` a byte), but a malformed escape, a value that is not UTF-8 after
//! decoding, an unknown or a repeated parameter is refused with a message naming it —
//! where `serde_urlencoded` would silently keep `%zz` or replace bad bytes with U+FFFD.

use crate::error::ApiError;

/// The decoded parameters of one request, in order.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes one key or value; `what` names it in errors.
pub fn decode(s: &str, what: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let pair = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex));
                let (Some(h), Some(l)) = pair else {
                    let bad: String = s[i..].chars().take(3).collect();
                    return Err(ApiError::bad_request(format!("{what}: bad percent-encoding {bad:?} (expected % and two hex digits)")));
                };
                out.push(h << 4 | l);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request(format!("{what}: not valid UTF-8 after percent-decoding")))
}

impl Params {
    /// Parses `raw` (the part of the URI after `?`), accepting only the names in `allowed`.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for piece in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            let key = decode(k, "parameter name")?;
            if !allowed.contains(&key.as_str()) {
                let list = if allowed.is_empty() { "no parameters".to_string() } else { allowed.join(", ") };
                return Err(ApiError::bad_request(format!("unknown parameter {key:?} (this route takes {list})")));
            }
            if out.iter().any(|(k, _)| *k == key) {
                return Err(ApiError::bad_request(format!("parameter {key:?} given twice")));
            }
            let value = decode(v, &format!("parameter {key}"))?;
            out.push((key, value));
        }
        Ok(Params(out))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A whole number in `lo..=hi`, `default` when absent.
    pub fn number(&self, key: &str, default: usize, lo: usize, hi: usize) -> Result<usize, ApiError> {
        let Some(v) = self.get(key) else { return Ok(default) };
        match v.trim().parse::<usize>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(n),
            Ok(n) => Err(ApiError::bad_request(format!("{key} = {n} is out of range ({lo} to {hi})"))),
            Err(_) => Err(ApiError::bad_request(format!("{key}: expected a whole number from {lo} to {hi}, got {v:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_a_browser_and_refuses_what_is_malformed() {
        let p = Params::parse(Some("q=a+red%20dog%C3%A9&k=5"), &["q", "k"]).unwrap();
        assert_eq!(p.get("q"), Some("a red dogé"));
        assert_eq!(p.number("k", 10, 1, 100).unwrap(), 5);
        assert_eq!(p.number("rerank", 7, 0, 100).unwrap(), 7);
        let msg = |r: Result<Params, ApiError>| r.unwrap_err().message;
        assert!(msg(Params::parse(Some("q=%zz"), &["q"])).contains("bad percent-encoding"));
        assert!(msg(Params::parse(Some("q=ab%4"), &["q"])).contains("bad percent-encoding"));
        assert!(msg(Params::parse(Some("q=%FF%FE"), &["q"])).contains("not valid UTF-8"));
        assert!(msg(Params::parse(Some("q=a&x=1"), &["q"])).contains("unknown parameter \"x\""));
        assert!(msg(Params::parse(Some("q=a&q=b"), &["q"])).contains("given twice"));
        let p = Params::parse(Some("k=0&rerank=abc"), &["k", "rerank"]).unwrap();
        assert!(p.number("k", 10, 1, 100).unwrap_err().message.contains("out of range"));
        assert!(p.number("rerank", 10, 0, 100).unwrap_err().message.contains("whole number"));
        assert_eq!(Params::parse(None, &["q"]).unwrap().get("q"), None);
        assert_eq!(Params::parse(Some("q"), &["q"]).unwrap().get("q"), Some(""));
    }
}
