//! Annotation readers: one per published dataset layout (SPEC §4), plus a simple JSONL
//! format for a user's own clips.
//!
//! Every reader returns [`Sample`]s: a clip id (the path of its feature directory below
//! the feature root) and its caption candidates. Training picks one candidate at random,
//! evaluation the first (see [`Sample::captions`]).
//!
//! User format (`.jsonl`, one object per line; blank lines ignored):
//! ```text
//! {"clip": "cooking/0001", "captions": ["a man slices a potato", "someone cooks"]}
//! ```
//!
//! Header-less TSV files are read in full: the reference's CSV reader treated the first
//! line as a header and silently dropped it (SPEC §4 quirk); we keep it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// One annotated clip.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Clip id = feature directory relative to the feature root.
    pub clip: String,
    /// Caption candidates: training draws one at random, evaluation uses the first.
    pub captions: Vec<String>,
}

/// Annotation layouts with captions (retrieval / pre-training).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `caption<TAB>page_dir/videoid`, CSV quoting.
    WebVid,
    /// `caption<TAB><n>_<id>`, CSV quoting.
    Cc3m,
    /// `paragraph<TAB>video file name`; clip = the name without its extension.
    DiDeMo,
    /// `captions joined by ", "<TAB>clip id`; caption = the text before the first comma.
    Msvd,
    /// LSMDC16 `.csv` (tab-separated): clip name first, sentence last.
    Lsmdc,
    /// The user format above.
    Jsonl,
}

impl Layout {
    /// Names accepted on the command line and in configs.
    pub const NAMES: &'static str = "webvid, cc3m, didemo, msvd, lsmdc, jsonl";

    pub fn from_name(name: &str) -> Result<Layout> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "webvid" => Layout::WebVid,
            "cc3m" | "conceptualcaptions" => Layout::Cc3m,
            "didemo" => Layout::DiDeMo,
            "msvd" => Layout::Msvd,
            "lsmdc" => Layout::Lsmdc,
            "jsonl" | "user" => Layout::Jsonl,
            other => bail!("unknown annotation layout {other:?} (known: {})", Self::NAMES),
        })
    }

    /// Guesses the layout from a published file name; errors when it cannot tell.
    pub fn detect(path: &Path) -> Result<Layout> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        Ok(if name.ends_with(".jsonl") {
            Layout::Jsonl
        } else if name.starts_with("webvid") {
            Layout::WebVid
        } else if name.starts_with("cc3m") {
            Layout::Cc3m
        } else if name.starts_with("didemo") {
            Layout::DiDeMo
        } else if name.starts_with("msvd") && name.ends_with(".tsv") {
            Layout::Msvd
        } else if name.starts_with("lsmdc") {
            Layout::Lsmdc
        } else {
            bail!("{}: unknown annotation layout (cannot tell from the file name; name one of: {})", path.display(), Self::NAMES)
        })
    }
}

/// Samples read, plus what was skipped (only when skipping was asked for).
#[derive(Debug, Default)]
pub struct Annotations {
    pub samples: Vec<Sample>,
    /// `"<file>:<line>: <problem>"` for each skipped record.
    pub skipped: Vec<String>,
}

/// Reads a caption annotation file. `layout = None` detects it from the file name.
/// With `skip_bad`, bad records (empty caption, wrong column count) are skipped and
/// listed; otherwise the first one is an error naming the file, line and problem.
pub fn read_annotations(path: &Path, layout: Option<Layout>, skip_bad: bool) -> Result<Annotations> {
    let layout = match layout {
        Some(l) => l,
        None => Layout::detect(path)?,
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read annotation file", path.display()))?;
    let mut out = Annotations::default();
    let mut bad = |line: usize, problem: String| -> Result<()> {
        let msg = format!("{}:{line}: {problem}", path.display());
        if skip_bad {
            out.skipped.push(msg);
            Ok(())
        } else {
            bail!(msg)
        }
    };
    let mut samples = Vec::new();
    if layout == Layout::Jsonl {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_user_line(line) {
                Ok(s) => samples.push(s),
                Err(e) => bad(i + 1, format!("{e:#}"))?,
            }
        }
    } else {
        for rec in read_tsv(&text).with_context(|| format!("{}: malformed TSV", path.display()))? {
            let f = &rec.fields;
            let ncols_ok = match layout {
                Layout::Lsmdc => f.len() >= 2,
                _ => f.len() == 2,
            };
            if !ncols_ok {
                bad(
                    rec.line,
                    format!(
                        "expected {} tab-separated columns, found {} (unknown annotation layout?)",
                        if layout == Layout::Lsmdc { "at least 2" } else { "2" },
                        f.len()
                    ),
                )?;
                continue;
            }
            let (clip, caption) = match layout {
                Layout::WebVid | Layout::Cc3m => (f[1].clone(), f[0].clone()),
                Layout::DiDeMo => (f[1].split('.').next().unwrap_or("").to_string(), f[0].clone()),
                Layout::Msvd => (f[1].clone(), f[0].split(',').next().unwrap_or("").to_string()),
                Layout::Lsmdc => (lsmdc_clip_path(&f[0]), f[f.len() - 1].clone()),
                Layout::Jsonl => unreachable!(),
            };
            if clip.trim().is_empty() {
                bad(rec.line, "empty clip id".into())?;
                continue;
            }
            if caption.trim().is_empty() {
                bad(rec.line, format!("empty caption for clip {clip:?}"))?;
                continue;
            }
            samples.push(Sample { clip, captions: vec![caption] });
        }
    }
    if samples.is_empty() && out.skipped.is_empty() {
        bail!("{}: no samples", path.display());
    }
    out.samples = samples;
    Ok(out)
}

fn parse_user_line(line: &str) -> Result<Sample> {
    let v: serde_json::Value = serde_json::from_str(line).context("not a JSON object")?;
    let clip = v.get("clip").and_then(|c| c.as_str()).context("missing string field \"clip\"")?;
    let caps = v.get("captions").and_then(|c| c.as_array()).context("missing array field \"captions\"")?;
    let captions =
        caps.iter().map(|c| c.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().context("\"captions\" must hold strings")?;
    if clip.trim().is_empty() {
        bail!("empty clip id");
    }
    if captions.is_empty() || captions.iter().any(|c| c.trim().is_empty()) {
        bail!("empty caption for clip {clip:?}");
    }
    Ok(Sample { clip: clip.to_string(), captions })
}

/// LSMDC feature path of a clip name, as the published loader builds it:
/// `1001_Movie_00.00.01.000-00.00.02.000` → `1001_Movie/1001_Movie_00.00.01.000-00.00.02.000`.
pub fn lsmdc_clip_path(name: &str) -> String {
    let stem = name.split('.').next().unwrap_or(name);
    let last = stem.rsplit('_').next().unwrap_or(stem);
    let movie = stem.replace(&format!("_{last}"), "/");
    format!("{movie}{name}")
}

/// One TSV record and the line it starts on (1-based).
pub struct Record {
    pub line: usize,
    pub fields: Vec<String>,
}

/// Tab-separated values with CSV quoting (a field starting with `"` runs to the next
/// unpaired `"`, `""` is a literal quote, newlines inside are kept), as pandas and
/// Python's csv module read them. Blank lines are skipped.
pub fn read_tsv(text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start_line = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut at_field_start = true;
        while let Some(c) = chars.next() {
            match c {
                '"' if at_field_start => {
                    at_field_start = false;
                    loop {
                        match chars.next() {
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some(ch) => {
                                if ch == '\n' {
                                    line += 1;
                                }
                                field.push(ch);
                            }
                            None => bail!("line {start_line}: unterminated quoted field"),
                        }
                    }
                }
                '\t' => {
                    fields.push(std::mem::take(&mut field));
                    at_field_start = true;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    break;
                }
                c => {
                    at_field_start = false;
                    field.push(c);
                }
            }
        }
        fields.push(field);
        if fields.len() == 1 && fields[0].is_empty() {
            continue; // blank line
        }
        out.push(Record { line: start_line, fields });
    }
    Ok(out)
}

/// MSR-VTT train/test cuts (the published `cut` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrvttCut {
    /// 1k-A: train_list_jsfusion / val_list_jsfusion, fixed test caption per video.
    JsFusion,
    Miech,
    FullVal,
    FullTest,
}

impl MsrvttCut {
    pub fn from_name(name: &str) -> Result<MsrvttCut> {
        Ok(match name {
            "jsfusion" => MsrvttCut::JsFusion,
            "miech" => MsrvttCut::Miech,
            "full-val" => MsrvttCut::FullVal,
            "full-test" => MsrvttCut::FullTest,
            other => bail!("unknown MSR-VTT cut {other:?} (known: jsfusion, miech, full-val, full-test)"),
        })
    }
    fn lists(self) -> (&'static str, &'static str) {
        match self {
            MsrvttCut::JsFusion => ("train_list_jsfusion.txt", "val_list_jsfusion.txt"),
            MsrvttCut::Miech => ("train_list_miech.txt", "test_list_miech.txt"),
            MsrvttCut::FullVal => ("train_list_full.txt", "val_list_full.txt"),
            MsrvttCut::FullTest => ("train_list_full.txt", "test_list_full.txt"),
        }
    }
}

/// MSR-VTT from its metadata directory: `annotation/MSR_VTT.json` (`annotations`:
/// `{image_id, caption}`) and `high-quality/structured-symlinks/<split lists>`.
/// One sample per video, videos in sorted id order (as the reference's groupby),
/// captions in file order. For the jsfusion test split each video gets the caption at
/// the index stored in `jsfusion_val_caption_idx.pkl` (a pickled dict video → index).
pub fn read_msrvtt(meta_dir: &Path, cut: MsrvttCut, train: bool) -> Result<Vec<Sample>> {
    let json_path = meta_dir.join("annotation").join("MSR_VTT.json");
    let text = std::fs::read_to_string(&json_path).with_context(|| format!("{}: cannot read", json_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", json_path.display()))?;
    let anns = v
        .get("annotations")
        .and_then(|a| a.as_array())
        .with_context(|| format!("{}: no \"annotations\" list (unknown annotation layout)", json_path.display()))?;
    let split_dir = meta_dir.join("high-quality").join("structured-symlinks");
    let (train_list, test_list) = cut.lists();
    let list_path = split_dir.join(if train { train_list } else { test_list });
    let list = std::fs::read_to_string(&list_path).with_context(|| format!("{}: cannot read split list", list_path.display()))?;
    let wanted: std::collections::HashSet<&str> = list.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut by_video: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (i, a) in anns.iter().enumerate() {
        let id = a
            .get("image_id")
            .and_then(|x| x.as_str())
            .with_context(|| format!("{}: annotation {i} has no \"image_id\"", json_path.display()))?;
        let cap = a
            .get("caption")
            .and_then(|x| x.as_str())
            .with_context(|| format!("{}: annotation {i} has no \"caption\"", json_path.display()))?;
        if wanted.contains(id) {
            if cap.trim().is_empty() {
                bail!("{}: annotation {i}: empty caption for {id}", json_path.display());
            }
            by_video.entry(id.to_string()).or_default().push(cap.to_string());
        }
    }
    let fixed = if cut == MsrvttCut::JsFusion && !train {
        Some(read_caption_index(&split_dir.join("jsfusion_val_caption_idx.pkl"))?)
    } else {
        None
    };
    let mut out = Vec::with_capacity(by_video.len());
    for (clip, caps) in by_video {
        let captions = match &fixed {
            Some(idx) => {
                let i = *idx.get(&clip).with_context(|| format!("jsfusion caption index has no entry for {clip}"))?;
                vec![caps.get(i).with_context(|| format!("{clip}: caption index {i} out of {} captions", caps.len()))?.clone()]
            }
            None => caps,
        };
        out.push(Sample { clip, captions });
    }
    if out.is_empty() {
        bail!("{}: no annotated videos from {}", json_path.display(), list_path.display());
    }
    Ok(out)
}

/// `jsfusion_val_caption_idx.pkl`: a pickled dict video id → caption index.
fn read_caption_index(path: &Path) -> Result<HashMap<String, usize>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v = demovlp_formats::pickle::parse_plain(&bytes).with_context(|| format!("{}: bad pickle", path.display()))?;
    let v = demovlp_formats::numpy::resolve(&v).with_context(|| format!("{}", path.display()))?;
    let d = v.as_dict().with_context(|| format!("{}: expected a dict video -> index, found {}", path.display(), v.kind()))?;
    d.iter()
        .map(|(k, i)| {
            let k = k.as_str().context("non-string video id")?;
            let i = i.as_int().filter(|&i| i >= 0).context("non-integer caption index")?;
            Ok((k.to_string(), i as usize))
        })
        .collect::<Result<_>>()
        .with_context(|| format!("{}", path.display()))
}

/// A multiple-choice question (MSR-VTT-MC, `msrvtt_mc_test.jsonl`).
#[derive(Clone, Debug, PartialEq)]
pub struct McSample {
    pub qid: String,
    pub clip: String,
    pub options: Vec<String>,
    /// Index of the right option.
    pub answer: usize,
}

/// A video question (MSRVTT-QA, MSVD-QA, TGIF-FrameQA).
#[derive(Clone, Debug, PartialEq)]
pub struct QaSample {
    pub clip: String,
    pub question: String,
    pub answer: String,
    /// MSRVTT-QA/TGIF: the file's `answer_type`; MSVD-QA: the question's first word.
    pub answer_type: String,
    /// Index in the answer vocabulary, `None` when the answer is outside it.
    pub label: Option<usize>,
}

fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Ok((i + 1, serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?)))
        .collect()
}

fn str_field(v: &serde_json::Value, key: &str, path: &Path, line: usize) -> Result<String> {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        _ => bail!("{}:{line}: missing field {key:?} (unknown annotation layout?)", path.display()),
    }
}

/// MSR-VTT multiple choice: `{qid, clip_name, answer ("0".."4"), options[5]}` per line.
pub fn read_msrvtt_mc(path: &Path) -> Result<Vec<McSample>> {
    read_jsonl(path)?
        .into_iter()
        .map(|(line, v)| {
            let options: Vec<String> = v
                .get("options")
                .and_then(|o| o.as_array())
                .and_then(|o| o.iter().map(|s| s.as_str().map(str::to_string)).collect())
                .with_context(|| format!("{}:{line}: missing string list \"options\"", path.display()))?;
            let answer: usize = str_field(&v, "answer", path, line)?
                .parse()
                .with_context(|| format!("{}:{line}: answer is not an index", path.display()))?;
            if answer >= options.len() {
                bail!("{}:{line}: answer {answer} out of {} options", path.display(), options.len());
            }
            Ok(McSample { qid: str_field(&v, "qid", path, line)?, clip: str_field(&v, "clip_name", path, line)?, options, answer })
        })
        .collect()
}

/// An answer vocabulary `{answer: label}` (`*_ans2label.json`).
pub fn read_ans2label(path: &Path) -> Result<HashMap<String, usize>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: HashMap<String, usize> =
        serde_json::from_str(&text).with_context(|| format!("{}: expected {{answer: label}}", path.display()))?;
    Ok(v)
}

/// MSRVTT-QA (`{answer, question, video_id, answer_type}`) or TGIF-FrameQA
/// (`{gif_name, question, answer, answer_type}`) lines.
pub fn read_jsonl_qa(path: &Path, ans2label: &HashMap<String, usize>) -> Result<Vec<QaSample>> {
    read_jsonl(path)?
        .into_iter()
        .map(|(line, v)| {
            let clip =
                if v.get("gif_name").is_some() { str_field(&v, "gif_name", path, line)? } else { str_field(&v, "video_id", path, line)? };
            let answer = str_field(&v, "answer", path, line)?;
            Ok(QaSample {
                clip,
                question: str_field(&v, "question", path, line)?,
                label: ans2label.get(&answer).copied(),
                answer,
                answer_type: str_field(&v, "answer_type", path, line)?,
            })
        })
        .collect()
}

/// MSVD-QA: `msvd_*_qa_encode.json` (a JSON list of `{answer, id, question, video_id (int)}`),
/// the answer set (`msvd_answer_set.txt`, label = line index) and the
/// YouTube mapping (`<clip id> vid<N>` per line) that turns video ids into clip ids.
pub fn read_msvd_qa(qa_path: &Path, answer_set: &Path, mapping: &Path) -> Result<Vec<QaSample>> {
    let answers = std::fs::read_to_string(answer_set).with_context(|| format!("{}: cannot read", answer_set.display()))?;
    let ans2label: HashMap<String, usize> = answers.lines().enumerate().map(|(i, a)| (a.trim().to_string(), i)).collect();
    let map_text = std::fs::read_to_string(mapping).with_context(|| format!("{}: cannot read", mapping.display()))?;
    let mut vid2clip = HashMap::new();
    for (i, l) in map_text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut it = l.split_whitespace();
        let (clip, vid) = (it.next(), it.next());
        let n: u64 = vid
            .and_then(|v| v.strip_prefix("vid"))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{}:{}: expected '<clip> vid<N>'", mapping.display(), i + 1))?;
        vid2clip.insert(n, clip.unwrap().to_string());
    }
    let text = std::fs::read_to_string(qa_path).with_context(|| format!("{}: cannot read", qa_path.display()))?;
    let items: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list", qa_path.display()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let vid = v
                .get("video_id")
                .and_then(|x| x.as_u64())
                .with_context(|| format!("{}: item {i}: no integer video_id", qa_path.display()))?;
            let clip =
                vid2clip.get(&vid).with_context(|| format!("{}: item {i}: video {vid} not in {}", qa_path.display(), mapping.display()))?;
            let question = str_field(v, "question", qa_path, i)?;
            let answer = str_field(v, "answer", qa_path, i)?;
            Ok(QaSample {
                clip: clip.clone(),
                answer_type: question.split(' ').next().unwrap_or("").to_string(),
                label: ans2label.get(&answer).copied(),
                question,
                answer,
            })
        })
        .collect()
}
