//! Multiple-choice evaluation of a model (SPEC §8: MSR-VTT-MC, LSMDC-MC, and our own JSONL).
//!
//! Per question the K option texts are embedded and the clip once (its features copied K
//! times in the published code, which changes nothing), then scored with
//! [`demovlp_retrieval::mc::mc_scores`]: the corrected combination cos(text_k, v) +
//! local(v, text_k) by default, the published cos(text_0, v) + local(v, text_k) with
//! `reference`. Accuracy = share of questions whose argmax (first of equal maxima) is the
//! answer.
//!
//! Question files:
//! - MSR-VTT-MC: `msrvtt_mc_test.jsonl`, `{qid, clip_name, answer ("0".."4"), options[5]}`;
//! - LSMDC-MC: `LSMDC16_multiple_choice_test_randomized.csv`, tab-separated, no header, the
//!   clip name in column 0, the options in columns 5–9 and the answer (1-based) in the last
//!   column; the clip's feature path as the LSMDC retrieval loader builds it;
//! - own JSONL: one `{"clip": "relative/clip/dir", "options": ["...", ...], "answer": k}` per
//!   line (`answer` 0-based, a number or a numeric string; optional `"qid"`, default the
//!   line number). Every question must have the same number of options.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use demovlp_data::annotations::{lsmdc_clip_path, read_msrvtt_mc, read_tsv, McSample};
use demovlp_data::batches::{assemble_videos, InputShape};
use demovlp_data::FeatureSource;
use demovlp_model::Model;
use demovlp_retrieval::mc::{accuracy_percent, mc_scores, McScores};
use demovlp_retrieval::EmbeddingSet;

use crate::text::Tokenizer;

/// Layout of a multiple-choice question file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum McFormat {
    MsrvttMc,
    LsmdcMc,
    Jsonl,
}

impl McFormat {
    pub fn from_name(name: &str) -> Result<McFormat> {
        Ok(match name {
            "msrvtt-mc" | "msrvtt_mc" => McFormat::MsrvttMc,
            "lsmdc-mc" | "lsmdc_mc" => McFormat::LsmdcMc,
            "jsonl" => McFormat::Jsonl,
            _ => bail!("unknown multiple-choice format {name:?} (msrvtt-mc, lsmdc-mc, jsonl)"),
        })
    }

    /// `.csv`/`.tsv` → LSMDC-MC; JSONL whose first object has `clip_name` → MSR-VTT-MC, else ours.
    pub fn detect(path: &Path) -> Result<McFormat> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "csv" || ext == "tsv" {
            return Ok(McFormat::LsmdcMc);
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let first = text.lines().find(|l| !l.trim().is_empty()).with_context(|| format!("{}: empty", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(first)
            .with_context(|| format!("{}: neither JSONL nor .csv (pass --format lsmdc-mc for a tab-separated file)", path.display()))?;
        Ok(if v.get("clip_name").is_some() { McFormat::MsrvttMc } else { McFormat::Jsonl })
    }
}

/// Read questions in `format` (detected when `None`).
pub fn read_mc(path: &Path, format: Option<McFormat>) -> Result<Vec<McSample>> {
    let format = match format {
        Some(f) => f,
        None => McFormat::detect(path)?,
    };
    let qs = match format {
        McFormat::MsrvttMc => read_msrvtt_mc(path)?,
        McFormat::LsmdcMc => read_lsmdc_mc(path)?,
        McFormat::Jsonl => read_jsonl_mc(path)?,
    };
    ensure!(!qs.is_empty(), "{}: no questions", path.display());
    let k = qs[0].options.len();
    if let Some(q) = qs.iter().find(|q| q.options.len() != k) {
        bail!(
            "{}: question {} has {} options, the first has {k} (every question needs the same number)",
            path.display(),
            q.qid,
            q.options.len()
        );
    }
    Ok(qs)
}

/// LSMDC-MC: tab-separated, options in columns 5–9, answer = last column − 1.
pub fn read_lsmdc_mc(path: &Path) -> Result<Vec<McSample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    read_tsv(&text)
        .with_context(|| path.display().to_string())?
        .into_iter()
        .map(|r| {
            let f = &r.fields;
            ensure!(
                f.len() >= 11,
                "{}:{}: {} columns, LSMDC-MC rows have 11 (clip, 4 times, 5 options, answer)",
                path.display(),
                r.line,
                f.len()
            );
            let last = f[f.len() - 1].trim();
            let answer: usize = last
                .parse()
                .ok()
                .filter(|&a| (1..=5).contains(&a))
                .with_context(|| format!("{}:{}: answer {last:?} is not 1..5", path.display(), r.line))?;
            let clip = f[0].trim();
            ensure!(!clip.is_empty(), "{}:{}: empty clip name", path.display(), r.line);
            Ok(McSample { qid: format!("{}", r.line), clip: lsmdc_clip_path(clip), options: f[5..10].to_vec(), answer: answer - 1 })
        })
        .collect()
}

/// Our JSONL: `{"clip", "options", "answer", "qid"?}` per line.
pub fn read_jsonl_mc(path: &Path) -> Result<Vec<McSample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(l).with_context(|| format!("{}: not JSON", at()))?;
        let clip = v.get("clip").and_then(|c| c.as_str()).with_context(|| format!("{}: missing string \"clip\"", at()))?;
        let options: Vec<String> = v
            .get("options")
            .and_then(|o| o.as_array())
            .and_then(|o| o.iter().map(|s| s.as_str().map(str::to_string)).collect())
            .with_context(|| format!("{}: missing string list \"options\"", at()))?;
        let answer = match v.get("answer") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|a| a as usize),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .with_context(|| format!("{}: \"answer\" must be an option index", at()))?;
        ensure!(options.len() >= 2, "{}: needs at least 2 options", at());
        ensure!(answer < options.len(), "{}: answer {answer} out of {} options", at(), options.len());
        let qid = match v.get("qid") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(x) => x.to_string(),
            None => format!("{}", i + 1),
        };
        out.push(McSample { qid, clip: clip.to_string(), options, answer });
    }
    Ok(out)
}

/// A multiple-choice evaluation config (`configs/msrvtt_mc.toml`, `configs/lsmdc_mc.toml`):
/// the published runs evaluate a retrieval model with `epochs: 0`, so there is nothing to
/// train — only the test set, the input sizes and the scoring.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McConfig {
    pub name: String,
    pub task: McTask,
    pub data: McData,
    #[serde(default)]
    pub loss: McLoss,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McTask {
    /// Must be `"mc"`.
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McData {
    /// `tokenizer.json`, `vocab.txt` or a directory; absent = the built-in uncased WordPiece.
    pub tokenizer: Option<std::path::PathBuf>,
    #[serde(default = "default_text_len")]
    pub text_len: usize,
    #[serde(default = "default_frames")]
    pub frames: usize,
    #[serde(default = "default_regions")]
    pub regions: usize,
    /// Texts / clips per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    pub test: McDataset,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McDataset {
    pub name: String,
    /// `msrvtt-mc`, `lsmdc-mc` or `jsonl`.
    pub format: String,
    pub annotations: std::path::PathBuf,
    /// A packed store or an `.npz` tree.
    pub features: std::path::PathBuf,
    pub max_questions: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McLoss {
    #[serde(default = "default_lambda")]
    pub lambda: f32,
    #[serde(default)]
    pub masked_mean: bool,
}

impl Default for McLoss {
    fn default() -> Self {
        McLoss { lambda: 20.0, masked_mean: false }
    }
}

fn default_text_len() -> usize {
    100
}
fn default_frames() -> usize {
    8
}
fn default_regions() -> usize {
    30
}
fn default_batch() -> usize {
    64
}
fn default_lambda() -> f32 {
    20.0
}

impl McConfig {
    pub fn parse_str(text: &str) -> Result<McConfig> {
        let c: McConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(c.task.kind == "mc", "task.kind: {:?}, a multiple-choice config needs \"mc\"", c.task.kind);
        McFormat::from_name(&c.data.test.format).context("data.test.format")?;
        let d = &c.data;
        ensure!(
            d.frames > 0 && d.regions > 0 && d.batch_size > 0 && d.text_len >= 2,
            "data: frames, regions, batch_size > 0, text_len >= 2"
        );
        Ok(c)
    }

    pub fn parse_file(path: &Path) -> Result<McConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse_str(&text).with_context(|| format!("config {}", path.display()))
    }
}

#[derive(Clone, Copy, Debug)]
pub struct McOptions {
    pub shape: InputShape,
    pub batch_size: usize,
    pub lambda: f32,
    pub masked_mean: bool,
}

pub struct McResult {
    pub scores: McScores,
    pub answers: Vec<usize>,
    /// Percent, the corrected (aligned) and the published (reference) combination.
    pub accuracy_aligned: f64,
    pub accuracy_reference: f64,
    pub seconds: f64,
}

/// Embed every option and clip and score the questions.
pub fn evaluate_mc<B: demovlp_model::Backend>(
    model: &mut Model<B>,
    questions: &[McSample],
    source: &Arc<dyn FeatureSource>,
    tok: &Tokenizer,
    opt: &McOptions,
) -> Result<McResult> {
    let t0 = Instant::now();
    ensure!(!questions.is_empty(), "no questions");
    let k = questions[0].options.len();
    ensure!(questions.iter().all(|q| q.options.len() == k), "every question needs the same number of options");
    let (l, p) = (opt.shape.text_len, model.config.proj_dim);
    let n_loc = opt.shape.frames * opt.shape.regions;
    let bs = opt.batch_size.max(1);
    let clips: Vec<String> = questions.iter().map(|q| q.clip.clone()).collect();
    let (mut vg, mut vl, mut vm) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in clips.chunks(bs) {
        let b = assemble_videos("multiple choice", source.as_ref(), chunk, opt.shape)?;
        let e = model.embed_video_inference(&b.object, &b.object_mask, b.batch, b.frames, b.regions);
        vg.extend_from_slice(&e.global);
        vl.extend_from_slice(&e.local);
        vm.extend_from_slice(&e.mask_additive);
    }
    let texts: Vec<&str> = questions.iter().flat_map(|q| q.options.iter().map(String::as_str)).collect();
    let (mut tg, mut tl, mut tm) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in texts.chunks(bs) {
        let (mut ids, mut am) = (Vec::with_capacity(chunk.len() * l), Vec::with_capacity(chunk.len() * l));
        for t in chunk {
            let (i, m) = tok.encode(t, l)?;
            ids.extend(i);
            am.extend(m);
        }
        let e = model.embed_text(&ids, &am, chunk.len(), l);
        tg.extend_from_slice(&e.global);
        tl.extend_from_slice(&e.local);
        tm.extend_from_slice(&e.mask_additive);
    }
    let q = questions.len();
    let ts = EmbeddingSet { count: q * k, len: l - 1, dim: p, global: &tg, local: &tl, mask_additive: &tm };
    let vs = EmbeddingSet { count: q, len: n_loc, dim: p, global: &vg, local: &vl, mask_additive: &vm };
    let scores = mc_scores(&ts, &vs, k, opt.lambda, opt.masked_mean);
    ensure!(scores.aligned.iter().chain(&scores.reference).all(|s| s.is_finite()), "non-finite multiple-choice scores");
    let answers: Vec<usize> = questions.iter().map(|q| q.answer).collect();
    Ok(McResult {
        accuracy_aligned: accuracy_percent(&scores.pred_aligned, &answers),
        accuracy_reference: accuracy_percent(&scores.pred_reference, &answers),
        scores,
        answers,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("demovlp-mc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn shipped_mc_configs_parse() {
        for (name, format) in [("msrvtt_mc", "msrvtt-mc"), ("lsmdc_mc", "lsmdc-mc")] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../configs/{name}.toml"));
            let c = McConfig::parse_file(&p).unwrap();
            assert_eq!((c.name.as_str(), c.data.test.format.as_str()), (name, format));
            assert_eq!((c.data.frames, c.data.text_len, c.loss.lambda), (8, 100, 20.0));
        }
        let bad =
            "name = \"x\"\n[task]\nkind = \"qa\"\n[data.test]\nname = \"t\"\nformat = \"jsonl\"\nannotations = \"a\"\nfeatures = \"f\"\n";
        assert!(McConfig::parse_str(bad).unwrap_err().to_string().contains("task.kind"));
        assert!(McConfig::parse_str(&bad.replace("qa", "mc").replace("jsonl", "youtube")).is_err());
        assert!(McConfig::parse_str(&bad.replace("qa", "mc").replace("[data.test]", "[data]\nfrmaes = 3\n[data.test]")).is_err());
        McConfig::parse_str(&bad.replace("qa", "mc")).unwrap();
    }

    #[test]
    fn lsmdc_mc_rows_options_5_to_9_answer_last_minus_one() {
        let row = |clip: &str, ans: &str| {
            format!("{clip}\t00.00.01.000\t00.00.02.000\t00.00.01.000\t00.00.02.000\tone\ttwo\t\"three, quoted\"\tfour\tfive\t{ans}\n")
        };
        let text = row("1012_Unbreakable_00.05.16.065-00.05.21.941", "3") + &row("3001_21_JUMP_STREET_00.00.24.567-00.00.27.232", "1");
        let p = write("lsmdc.csv", &text);
        let qs = read_mc(&p, None).unwrap();
        assert_eq!(qs.len(), 2, "the first line is a question, not a header");
        assert_eq!(qs[0].options, ["one", "two", "three, quoted", "four", "five"]);
        assert_eq!((qs[0].answer, qs[1].answer), (2, 0));
        assert_eq!(qs[0].clip, "1012_Unbreakable/1012_Unbreakable_00.05.16.065-00.05.21.941");
        assert_eq!(qs[1].clip, "3001_21_JUMP_STREET/3001_21_JUMP_STREET_00.00.24.567-00.00.27.232");
        let bad = write("bad.csv", &row("1012_Unbreakable_00.05.16.065-00.05.21.941", "6"));
        assert!(read_lsmdc_mc(&bad).unwrap_err().to_string().contains("not 1..5"));
        let short = write("short.csv", "a\tb\tc\n");
        assert!(read_lsmdc_mc(&short).is_err());
    }

    #[test]
    fn own_jsonl_and_msrvtt_mc_are_told_apart() {
        let p = write("own.jsonl", "{\"clip\": \"a/b\", \"options\": [\"x\", \"y\", \"z\"], \"answer\": 2}\n\n{\"clip\": \"c\", \"options\": [\"u\", \"v\", \"w\"], \"answer\": \"0\", \"qid\": \"q7\"}\n");
        assert_eq!(McFormat::detect(&p).unwrap(), McFormat::Jsonl);
        let qs = read_mc(&p, None).unwrap();
        assert_eq!(qs[0], McSample { qid: "1".into(), clip: "a/b".into(), options: vec!["x".into(), "y".into(), "z".into()], answer: 2 });
        assert_eq!((qs[1].qid.as_str(), qs[1].answer), ("q7", 0));
        let out_of_range = write("oor.jsonl", "{\"clip\": \"a\", \"options\": [\"x\", \"y\"], \"answer\": 2}\n");
        assert!(read_mc(&out_of_range, None).is_err());
        let ragged = write("ragged.jsonl", "{\"clip\": \"a\", \"options\": [\"x\", \"y\"], \"answer\": 0}\n{\"clip\": \"a\", \"options\": [\"x\", \"y\", \"z\"], \"answer\": 0}\n");
        assert!(read_mc(&ragged, None).unwrap_err().to_string().contains("same number"));
        let msr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/annotations/msrvtt_mc_test.jsonl");
        assert_eq!(McFormat::detect(&msr).unwrap(), McFormat::MsrvttMc);
        let qs = read_mc(&msr, None).unwrap();
        assert_eq!(qs.len(), 2990);
        assert!(qs.iter().all(|q| q.options.len() == 5));
    }

    fn tiny_model() -> Model {
        let mut m = crate::qa::tests_support::tiny_retrieval_model(30522, 4);
        m.init_random(3);
        m
    }

    /// The scores are the retrieval evaluation's for each question's K options (embedded on
    /// their own, question by question, here; in batches of 5 across questions there) against
    /// its clip, and
    /// moving the right option moves its score and the prediction with it.
    #[test]
    fn scores_are_the_retrieval_scores_and_follow_the_options() {
        use crate::synthetic::{CorpusConfig, Split, SyntheticCorpus};
        use demovlp_retrieval::{eval_scores, ScoreMode};
        let mut c = CorpusConfig::new(4);
        (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test) = (1, 1, 1, 1, 12);
        let corpus = SyntheticCorpus::new(c);
        let samples = corpus.samples(Split::Test);
        let source: Arc<dyn FeatureSource> = Arc::new(corpus);
        let k = 4;
        let questions: Vec<McSample> = (0..samples.len())
            .map(|i| McSample {
                qid: i.to_string(),
                clip: samples[i].clip.clone(),
                options: (0..k).map(|j| samples[(i + j * 5) % samples.len()].captions[0].clone()).collect(),
                answer: 0,
            })
            .collect();
        let tok = crate::text::builtin_tokenizer().unwrap();
        let opt = McOptions { shape: InputShape { frames: 2, regions: 5, text_len: 16 }, batch_size: 5, lambda: 20.0, masked_mean: false };
        let mut model = tiny_model();
        let r = evaluate_mc(&mut model, &questions, &source, &tok, &opt).unwrap();
        assert_eq!((r.scores.questions, r.scores.options), (questions.len(), k));

        for (qi, q) in questions.iter().enumerate() {
            let (mut ids, mut am) = (Vec::new(), Vec::new());
            for t in &q.options {
                let (i, m) = tok.encode(t, 16).unwrap();
                ids.extend(i);
                am.extend(m);
            }
            let te = model.embed_text(&ids, &am, k, 16);
            let vb = assemble_videos("t", source.as_ref(), std::slice::from_ref(&q.clip), opt.shape).unwrap();
            let ve = model.embed_video_inference(&vb.object, &vb.object_mask, 1, 2, 5);
            let ts = EmbeddingSet { count: k, len: 15, dim: 8, global: &te.global, local: &te.local, mask_additive: &te.mask_additive };
            let vs = EmbeddingSet { count: 1, len: 10, dim: 8, global: &ve.global, local: &ve.local, mask_additive: &ve.mask_additive };
            let want = eval_scores(&ts, &vs, 20.0, ScoreMode::Aligned, true, &|_, _| {});
            for j in 0..k {
                let got = r.scores.aligned[qi * k + j];
                assert!((got - want[j]).abs() < 1e-5, "question {qi} option {j}: {got} vs {}", want[j]);
            }
        }

        // Rotate every question's options by one: the right option is now at 1.
        let rotated: Vec<McSample> = questions
            .iter()
            .map(|q| {
                let mut o = q.options.clone();
                o.rotate_right(1);
                McSample { options: o, answer: 1, ..q.clone() }
            })
            .collect();
        let r2 = evaluate_mc(&mut model, &rotated, &source, &tok, &opt).unwrap();
        for qi in 0..questions.len() {
            for j in 0..k {
                let (a, b) = (r.scores.aligned[qi * k + j], r2.scores.aligned[qi * k + (j + 1) % k]);
                assert!((a - b).abs() < 1e-5, "question {qi}: option {j} scored {a}, after the rotation {b}");
            }
            assert_eq!((r.scores.pred_aligned[qi] + 1) % k, r2.scores.pred_aligned[qi]);
        }
        assert_eq!(r.accuracy_aligned, r2.accuracy_aligned);
        let hits = r.scores.pred_aligned.iter().filter(|&&p| p == 0).count();
        assert_eq!(r.accuracy_aligned, 100.0 * hits as f64 / questions.len() as f64);
    }
}
