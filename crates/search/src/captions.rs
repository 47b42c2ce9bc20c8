//! Clip captions for display: read from the annotation files an index's clips were listed
//! from (recorded in `index.json` as `settings.annotations`), first caption per clip.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use demovlp_data::annotations::{read_annotations, read_msrvtt, Layout, MsrvttCut};
use serde::{Deserialize, Serialize};

/// An annotation file (or MSR-VTT metadata directory) and its layout when it was given.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AnnotationSource {
    /// Absolute path.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
}

/// Each clip's first caption, and where they came from.
#[derive(Clone, Debug, Default)]
pub struct Captions {
    pub by_clip: HashMap<String, String>,
    /// The files read (absolute paths).
    pub from: Vec<String>,
    /// Files that could not be read, with the reason (their clips have no caption).
    pub problems: Vec<String>,
}

fn read_one(src: &AnnotationSource) -> Result<Vec<(String, String)>> {
    let path = Path::new(&src.path);
    let samples = if path.is_dir() {
        read_msrvtt(path, MsrvttCut::from_name("jsfusion")?, false)?
    } else {
        let layout = src.layout.as_deref().map(Layout::from_name).transpose()?;
        read_annotations(path, layout, true)?.samples
    };
    Ok(samples.into_iter().filter_map(|s| s.captions.into_iter().next().map(|c| (s.clip, c))).collect())
}

/// Reads every source; a clip listed twice keeps its first caption. A source that cannot be
/// read is listed in `problems`, not an error (captions are for display only).
pub fn load(sources: &[AnnotationSource]) -> Captions {
    let mut c = Captions::default();
    for s in sources {
        match read_one(s) {
            Ok(pairs) => {
                for (clip, caption) in pairs {
                    c.by_clip.entry(clip).or_insert(caption);
                }
                c.from.push(s.path.clone());
            }
            Err(e) => c.problems.push(format!("{}: {e:#}", s.path)),
        }
    }
    c
}

/// Adds the sources of `more` that `into` lacks (appending, merging).
pub fn union(into: &mut Vec<AnnotationSource>, more: &[AnnotationSource]) {
    for s in more {
        if !into.contains(s) {
            into.push(s.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_caption_per_clip_first_file_wins_unreadable_files_are_listed() {
        let dir = std::env::temp_dir().join(format!("demovlp-captions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.jsonl");
        let b = dir.join("b.jsonl");
        std::fs::write(&a, "{\"clip\": \"v1\", \"captions\": [\"a red dog\", \"a dog\"]}\n{\"clip\": \"v2\", \"captions\": [\"a cat\"]}\n")
            .unwrap();
        std::fs::write(&b, "{\"clip\": \"v2\", \"captions\": [\"another cat\"]}\n{\"clip\": \"v3\", \"captions\": [\"a car\"]}\n").unwrap();
        let src = |p: &Path| AnnotationSource { path: p.display().to_string(), layout: None };
        let missing = dir.join("missing.jsonl");
        let c = load(&[src(&a), src(&b), src(&missing)]);
        assert_eq!(c.by_clip["v1"], "a red dog");
        assert_eq!(c.by_clip["v2"], "a cat");
        assert_eq!(c.by_clip["v3"], "a car");
        assert_eq!(c.from, vec![a.display().to_string(), b.display().to_string()]);
        assert_eq!(c.problems.len(), 1);
        assert!(c.problems[0].contains("missing.jsonl"), "{:?}", c.problems);
        let mut v = vec![src(&a)];
        union(&mut v, &[src(&b), src(&a)]);
        assert_eq!(v, vec![src(&a), src(&b)]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
