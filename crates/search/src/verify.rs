//! `demovlp verify <index>`: every file of every segment against the checksum recorded when
//! it was written (`sums.json`), the non-finite values in the embeddings and boxes, and the
//! region codes (`codes.json`'s checksums). Opening an index checks only the small files
//! ([`crate::store::CHECKED_AT_OPEN`]); the local embeddings and boxes — most of an index's
//! bytes — are checked here, memory-mapped, one file at a time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use half::f16;
use serde::Serialize;

use crate::store::{fingerprint, Manifest, SUMS};

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub index: String,
    pub segments: usize,
    pub clips: usize,
    pub files_checked: usize,
    pub bytes_checked: u64,
    /// One line per problem, each naming its file.
    pub problems: Vec<String>,
    pub seconds: f64,
}

fn map(path: &Path) -> Result<Option<memmap2::Mmap>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if f.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: index files are written once (via a rename) and never modified in place.
    Ok(Some(unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?))
}

/// Non-finite values among `bytes` read as f32 (`f16 == false`) or f16.
fn non_finite(bytes: &[u8], f16: bool) -> usize {
    if f16 {
        bytes.chunks_exact(2).filter(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()).count()
    } else {
        bytes.chunks_exact(4).filter(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()).count()
    }
}

/// Checks every file of the index at `dir`; problems are listed, not errors (an unreadable
/// `index.json` is an error).
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let t = Instant::now();
    let m = Manifest::read(dir)?;
    let st = &m.settings;
    let local = if st.fp16() { "local.f16" } else { "local.f32" };
    let mut r = VerifyReport { index: dir.display().to_string(), segments: m.segments.len(), clips: m.clips, ..Default::default() };
    for seg in &m.segments {
        let d = dir.join(seg);
        let sp = d.join(SUMS);
        let sums: BTreeMap<String, String> = match std::fs::read(&sp) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    r.problems.push(format!("{}: not readable JSON ({e})", sp.display()));
                    continue;
                }
            },
            Err(_) => {
                r.problems.push(format!("{}: missing (a segment written before checksums; its files cannot be checked)", sp.display()));
                BTreeMap::new()
            }
        };
        for f in ["clips.json", "global.f32", local, "mask.u8", "boxes.f32", "frames.i32"] {
            let p = d.join(f);
            let bytes = match map(&p) {
                Ok(b) => b,
                Err(e) => {
                    r.problems.push(format!("{}: {e:#}", p.display()));
                    continue;
                }
            };
            let b: &[u8] = bytes.as_deref().unwrap_or(&[]);
            r.files_checked += 1;
            r.bytes_checked += b.len() as u64;
            match sums.get(f) {
                Some(want) => {
                    let got = fingerprint(b);
                    if &got != want {
                        r.problems.push(format!(
                            "{}: checksum {got} differs from the one recorded when it was written ({want}): the file is damaged",
                            p.display()
                        ));
                    }
                }
                None if !sums.is_empty() => r.problems.push(format!("{}: no checksum recorded in {SUMS}", p.display())),
                None => {}
            }
            let bad = match f {
                "global.f32" | "boxes.f32" | "local.f32" => non_finite(b, false),
                "local.f16" => non_finite(b, true),
                _ => 0,
            };
            if bad > 0 {
                r.problems.push(format!("{}: {bad} non-finite values (clips holding them are never ranked)", p.display()));
            }
        }
    }
    verify_codes(dir, &m, &mut r);
    r.seconds = t.elapsed().as_secs_f64();
    Ok(r)
}

/// The region codes, when the index has them: the codebook and each segment's code file.
fn verify_codes(dir: &Path, m: &Manifest, r: &mut VerifyReport) {
    let jp = dir.join("codes.json");
    let Ok(text) = std::fs::read_to_string(&jp) else { return };
    let meta: crate::codes::CodesMeta = match serde_json::from_str(&text) {
        Ok(x) => x,
        Err(e) => {
            r.problems.push(format!("{}: not readable ({e}); `search` rebuilds the codes", jp.display()));
            return;
        }
    };
    let mut files = vec![("codebook.f32".to_string(), dir.join("codebook.f32"))];
    files.extend(
        meta.segments.iter().filter(|s| m.segments.contains(s)).map(|s| (format!("{s}.u16"), dir.join("codes").join(format!("{s}.u16")))),
    );
    for (key, p) in files {
        let Some(want) = meta.sums.get(&key) else { continue };
        match map(&p) {
            Ok(b) => {
                let b: &[u8] = b.as_deref().unwrap_or(&[]);
                r.files_checked += 1;
                r.bytes_checked += b.len() as u64;
                let got = fingerprint(b);
                if &got != want {
                    r.problems.push(format!(
                        "{}: checksum {got} differs from the recorded one ({want}): damaged (a derived file: `search` recomputes it)",
                        p.display()
                    ));
                }
            }
            Err(e) => r.problems.push(format!("{}: {e:#}", p.display())),
        }
    }
}
