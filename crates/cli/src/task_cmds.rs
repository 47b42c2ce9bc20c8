//! Downstream tasks on precomputed outputs: `demovlp mc-scores` (multiple-choice scoring of
//! embeddings) and `demovlp qa-metrics` (video QA accuracy of a predictions file).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use demovlp_model::io::{self, TensorRef};
use demovlp_retrieval::mc::{accuracy_percent, mc_scores};
use demovlp_retrieval::qa_metrics::{qa_metrics, QaRecord, ANSWER_TYPES};
use demovlp_retrieval::EmbeddingSet;
use serde_json::json;

// ---------------------------------------------------------------------------------------
// mc-scores

/// `--help` of the subcommand (clap takes a variant's doc comment over a struct's `long_about`,
/// so `main.rs` attaches this to the variant).
pub const MC_SCORES_HELP: &str = "Scores multiple-choice questions from their embeddings, in both combinations, and \
reports both accuracies.\n\n\
Input (safetensors, the layout of the `mc_small` fixture): in.global_text [Q,K,P], in.local_text [Q,K,W,P], \
in.attention_mask [Q,K,W+1] (int64, 1 real / 0 padding; position 0 is the CLS token), in.global_video [Q,P], \
in.local_video [Q,N,P], in.video_mask_additive [Q,N] (0 real / -100 padding), and optionally in.answers [Q] (int64).\n\n\
Output: out.scores_reference and out.scores_aligned [Q,K] (f32), out.pred_reference and out.pred_aligned [Q] \
(int64). `aligned` = cos(text_k, v) + local(v, text_k), the correct combination; `reference` = cos(text_0, v) + \
local(v, text_k), what the published evaluation ranks (its global term is the same for every option). \
The last stdout line is JSON: {\"accuracy_reference\", \"accuracy_aligned\" (percent; null without in.answers), \"questions\"}.";

#[derive(clap::Args)]
pub struct McScoresArgs {
    /// safetensors file with the in.* tensors described above.
    #[arg(long)]
    pub embeddings: PathBuf,
    /// Where to write the scores and predictions (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Region-word softmax temperature λ (published: 20).
    #[arg(long, default_value_t = 20.0)]
    pub lambda: f32,
    /// Average the region-word similarities over real positions only (a measured variant;
    /// the published means include padded positions).
    #[arg(long)]
    pub masked_mean: bool,
}

pub fn mc_scores_cmd(a: McScoresArgs) -> Result<()> {
    let path = &a.embeddings;
    let st = io::read_safetensors(path)?;
    let shape = |name: &str| -> Result<Vec<usize>> {
        Ok(st.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?.shape.clone())
    };
    let lt = shape("in.local_text")?;
    ensure!(lt.len() == 4, "{}: in.local_text has shape {lt:?}, expected [Q, K, W, P]", path.display());
    let (q, k, w, p) = (lt[0], lt[1], lt[2], lt[3]);
    ensure!(k >= 1 && p >= 1, "{}: in.local_text has shape {lt:?}: no options or zero width", path.display());
    let lv = shape("in.local_video")?;
    ensure!(lv.len() == 3 && lv[0] == q && lv[2] == p, "{}: in.local_video has shape {lv:?}, expected [{q}, N, {p}]", path.display());
    let n = lv[1];
    for (name, want) in [
        ("in.global_text", vec![q, k, p]),
        ("in.attention_mask", vec![q, k, w + 1]),
        ("in.global_video", vec![q, p]),
        ("in.video_mask_additive", vec![q, n]),
    ] {
        let got = shape(name)?;
        ensure!(got == want, "{}: {name} has shape {got:?}, expected {want:?}", path.display());
    }
    let f32s = |name: &str| st.f32(name).with_context(|| format!("{}: {name}", path.display()));
    let (global_text, local_text, global_video, local_video, video_mask) = (
        f32s("in.global_text")?,
        f32s("in.local_text")?,
        f32s("in.global_video")?,
        f32s("in.local_video")?,
        f32s("in.video_mask_additive")?,
    );
    for (name, v) in [
        ("in.global_text", &global_text),
        ("in.local_text", &local_text),
        ("in.global_video", &global_video),
        ("in.local_video", &local_video),
        ("in.video_mask_additive", &video_mask),
    ] {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{}: {name} has a non-finite value at flat index {i} ({})", path.display(), v[i]);
        }
    }
    let attention_mask = st.i64("in.attention_mask").with_context(|| format!("{}: in.attention_mask", path.display()))?;
    if let Some(i) = attention_mask.iter().position(|&m| m != 0 && m != 1) {
        bail!("{}: in.attention_mask must hold 0/1, found {} at flat index {i}", path.display(), attention_mask[i]);
    }
    let text_mask: Vec<f32> = attention_mask.chunks(w + 1).flat_map(|r| r[1..].iter().map(|&m| (m as f32 - 1.0) * 100.0)).collect();
    let answers: Option<Vec<usize>> = match st.tensors.get("in.answers") {
        None => None,
        Some(t) => {
            ensure!(t.shape == [q], "{}: in.answers has shape {:?}, expected [{q}]", path.display(), t.shape);
            let v = st.i64("in.answers").with_context(|| format!("{}: in.answers", path.display()))?;
            if let Some(i) = v.iter().position(|&x| x < 0 || x as usize >= k) {
                bail!("{}: in.answers[{i}] = {} is not an option index (0..{k})", path.display(), v[i]);
            }
            Some(v.iter().map(|&x| x as usize).collect())
        }
    };

    let texts = EmbeddingSet { count: q * k, len: w, dim: p, global: &global_text, local: &local_text, mask_additive: &text_mask };
    let videos = EmbeddingSet { count: q, len: n, dim: p, global: &global_video, local: &local_video, mask_additive: &video_mask };
    let s = mc_scores(&texts, &videos, k, a.lambda, a.masked_mean);
    let to_i64 = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    let (pr, pa) = (to_i64(&s.pred_reference), to_i64(&s.pred_aligned));
    let out = vec![
        ("out.scores_reference".to_string(), vec![q, k], TensorRef::F32(&s.reference)),
        ("out.scores_aligned".to_string(), vec![q, k], TensorRef::F32(&s.aligned)),
        ("out.pred_reference".to_string(), vec![q], TensorRef::I64(&pr)),
        ("out.pred_aligned".to_string(), vec![q], TensorRef::I64(&pa)),
    ];
    io::write_safetensors_refs(&a.out, &out, &[])?;
    let acc = |pred: &[usize]| answers.as_ref().map(|ans| (accuracy_percent(pred, ans) * 100.0).round() / 100.0);
    let (acc_ref, acc_al) = (acc(&s.pred_reference), acc(&s.pred_aligned));
    eprintln!(
        "{q} questions × {k} options: accuracy {} (aligned), {} (reference, published scoring); wrote {}",
        acc_al.map_or("n/a (no in.answers)".into(), |x| format!("{x:.2} %")),
        acc_ref.map_or("n/a".into(), |x| format!("{x:.2} %")),
        a.out.display()
    );
    println!("{}", json!({"accuracy_reference": acc_ref, "accuracy_aligned": acc_al, "questions": q}));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// qa-metrics

/// `--help` of the subcommand (clap takes a variant's doc comment over a struct's `long_about`,
/// so `main.rs` attaches this to the variant).
pub const QA_METRICS_HELP: &str = "Video QA accuracy of a predictions file, as the published evaluate_qa computes it: a \
prediction is right when its answer string equals the ground truth's; accuracy overall and per answer type \
(what, who, how, where, when, object, number, color, location; 0 for a type without questions), as fractions.\n\n\
Input: JSONL, one object per line: {\"question_id\": ..., \"prediction\": \"<answer>\", \"answer\": \"<ground \
truth>\", \"answer_type\": \"<type>\"} (answer_type optional: questions without one count overall only). \
Prints one JSON line: {\"overall_acc\", \"<type>_acc\"..., \"ratios\": {\"<type>_ratio\": [share, count]}, \"questions\"}.";

#[derive(clap::Args)]
pub struct QaMetricsArgs {
    /// JSONL predictions file (see above); `-` reads standard input.
    #[arg(long)]
    pub predictions: PathBuf,
}

pub fn qa_metrics_cmd(a: QaMetricsArgs) -> Result<()> {
    let name = a.predictions.display().to_string();
    let reader: Box<dyn BufRead> = if a.predictions.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(&a.predictions).with_context(|| format!("{name}: cannot open"))?))
    };
    let mut records = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{name}: line {}: cannot read", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("{name}: line {}: not JSON", i + 1))?;
        let text = |key: &str| -> Result<String> {
            match &v[key] {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Null => bail!("{name}: line {}: no \"{key}\"", i + 1),
                other => bail!("{name}: line {}: \"{key}\" must be a string, found {other}", i + 1),
            }
        };
        let question_id = match &v["question_id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Null => bail!("{name}: line {}: no \"question_id\"", i + 1),
            other => bail!("{name}: line {}: \"question_id\" must be a string or a number, found {other}", i + 1),
        };
        if !seen.insert(question_id.clone()) {
            bail!("{name}: line {}: question_id {question_id} appears twice", i + 1);
        }
        let answer_type = match &v["answer_type"] {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => bail!("{name}: line {}: \"answer_type\" must be a string, found {other}", i + 1),
        };
        records.push(QaRecord { question_id, prediction: text("prediction")?, answer: text("answer")?, answer_type });
    }
    if records.is_empty() {
        bail!("{name}: no predictions");
    }
    let other: std::collections::BTreeSet<&str> =
        records.iter().filter_map(|r| r.answer_type.as_deref()).filter(|t| !ANSWER_TYPES.contains(t)).collect();
    if !other.is_empty() {
        eprintln!("note: answer types outside the published nine, reported by name: {}", other.into_iter().collect::<Vec<_>>().join(", "));
    }
    let untyped = records.iter().filter(|r| r.answer_type.is_none()).count();
    if untyped > 0 {
        eprintln!("note: {untyped} of {} questions have no answer_type (counted overall only)", records.len());
    }
    let m = qa_metrics(&records);
    eprintln!("{} questions: overall accuracy {:.2} %", records.len(), 100.0 * m["overall_acc"].as_f64().unwrap_or(0.0));
    println!("{m}");
    Ok(())
}
