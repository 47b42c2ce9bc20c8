//! `demovlp eval-mc`: multiple-choice evaluation of a retrieval model (issue 13 B).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use demovlp_data::batches::InputShape;
use demovlp_train::mc::{evaluate_mc, read_mc, McConfig, McFormat, McOptions};
use serde_json::json;

/// `demovlp eval-mc --help`.
pub const EVAL_MC_HELP: &str = "Multiple-choice evaluation of a retrieval model (SPEC §8): for every question, embed its \
K option texts and its clip, score each option with global + local (region-word) similarity, and count the \
questions whose best-scoring option is the answer. Nothing is trained (the published runs evaluate the model \
fine-tuned for MSR-VTT retrieval).\n\n\
Scores: by default the corrected combination cos(text_k, v) + local(v, text_k); with --reference-eval the \
published one, cos(text_0, v) + local(v, text_k) (its global term is the same for every option). Both \
accuracies are printed; the chosen one is `accuracy` in the last stdout line, one JSON object: \
{\"task\": \"mc\", \"accuracy\", \"accuracy_aligned\", \"accuracy_reference\", \"mode\", \"questions\", \"options\", \"seconds\"}.\n\n\
Question files (--format, else detected: .csv/.tsv = LSMDC-MC, JSONL with clip_name = MSR-VTT-MC):\n\
  msrvtt-mc  msrvtt_mc_test.jsonl: {\"qid\", \"clip_name\", \"answer\": \"0\"..\"4\", \"options\": [5 captions]}\n\
  lsmdc-mc   LSMDC16_multiple_choice_test_randomized.csv: tab-separated, no header, clip name in column 0, \
options in columns 5-9, answer (1-based) in the last column\n\
  jsonl      ours: {\"clip\": \"relative/clip/dir\", \"options\": [\"...\", ...], \"answer\": k (0-based)} per line, \
optional \"qid\"; every question with the same number of options\n\n\
Give either --config (configs/msrvtt_mc.toml, configs/lsmdc_mc.toml: [task] kind = \"mc\", [data] sizes and \
tokenizer, [data.test] questions and features, [loss] lambda) or --questions and --features; flags override \
the config.\n\n\
--predictions writes one JSON object per question: {\"qid\", \"clip\", \"answer\", \"prediction\", \"correct\", \
\"prediction_reference\", \"scores\" (the chosen combination), \"scores_aligned\", \"scores_reference\"}.";

#[derive(clap::Args)]
pub struct EvalMcArgs {
    /// A model directory or a training checkpoint (a retrieval model).
    #[arg(long)]
    pub model: PathBuf,
    /// A multiple-choice config ([task] kind = "mc").
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Question file (overrides the config's data.test.annotations).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Features: a packed store or an .npz tree (overrides data.test.features).
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// msrvtt-mc, lsmdc-mc or jsonl (default: the config's, else detected).
    #[arg(long)]
    pub format: Option<String>,
    /// tokenizer.json, vocab.txt or a directory (default: the config's, else the built-in uncased WordPiece).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Frames per clip (default: the config's, else 8).
    #[arg(long)]
    pub frames: Option<usize>,
    /// Regions per frame (default: the config's, else 30).
    #[arg(long)]
    pub regions: Option<usize>,
    /// Text length (default: the config's, else 100).
    #[arg(long)]
    pub text_len: Option<usize>,
    /// Evaluate only the first N questions.
    #[arg(long)]
    pub max_questions: Option<usize>,
    /// Rank as the published evaluation does (cos(text_0, v) + local(v, text_k)).
    #[arg(long)]
    pub reference_eval: bool,
    /// Write per-question predictions here (JSONL).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Where to compute the embeddings (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// The multiple-choice evaluation of a model on whichever backend holds it.
struct McJob<'a> {
    questions: &'a [demovlp_data::annotations::McSample],
    source: &'a std::sync::Arc<dyn demovlp_data::FeatureSource>,
    tok: &'a demovlp_train::text::Tokenizer,
    opt: &'a McOptions,
    out: &'a mut Option<demovlp_train::mc::McResult>,
}

impl crate::device::OnModel for McJob<'_> {
    fn run<B: demovlp_model::Backend>(self, mut model: demovlp_model::Model<B>, device: &str) -> Result<()> {
        if device != "cpu" {
            eprintln!("embedding on {device}");
        }
        *self.out = Some(evaluate_mc(&mut model, self.questions, self.source, self.tok, self.opt)?);
        Ok(())
    }
}

pub fn eval_mc(a: EvalMcArgs) -> Result<()> {
    crate::device::check_available(&a.device)?;
    let cfg = a.config.as_deref().map(McConfig::parse_file).transpose()?;
    let test = cfg.as_ref().map(|c| &c.data.test);
    let questions_path =
        a.questions.clone().or_else(|| test.map(|t| t.annotations.clone())).context("give --questions or a --config with [data.test]")?;
    let features =
        a.features.clone().or_else(|| test.map(|t| t.features.clone())).context("give --features or a --config with [data.test]")?;
    let format = match a.format.as_deref().or(if a.questions.is_none() { test.map(|t| t.format.as_str()) } else { None }) {
        Some(f) => Some(McFormat::from_name(f)?),
        None => None,
    };
    let data = cfg.as_ref().map(|c| &c.data);
    let shape = InputShape {
        frames: a.frames.or(data.map(|d| d.frames)).unwrap_or(8),
        regions: a.regions.or(data.map(|d| d.regions)).unwrap_or(30),
        text_len: a.text_len.or(data.map(|d| d.text_len)).unwrap_or(100),
    };
    if shape.frames == 0 || shape.regions == 0 || shape.text_len < 2 {
        bail!("--frames and --regions must be > 0, --text-len >= 2");
    }
    let tokenizer = a.tokenizer.clone().or_else(|| data.and_then(|d| d.tokenizer.clone()));
    for (key, p) in [
        ("questions", Some(&questions_path)),
        ("features", Some(&features)),
        ("tokenizer", tokenizer.as_ref()),
        ("--model", Some(&a.model)),
    ] {
        if let Some(p) = p.filter(|p| !p.exists()) {
            bail!("{key}: path does not exist: {}", p.display());
        }
    }
    let mut questions = read_mc(&questions_path, format)?;
    if let Some(n) = a.max_questions.or(test.and_then(|t| t.max_questions)) {
        questions.truncate(n);
    }
    let tok = match &tokenizer {
        Some(p) => demovlp_train::text::load_tokenizer(p)?,
        None => demovlp_train::text::builtin_tokenizer()?,
    };
    let model = demovlp_train::weights::load_model(&a.model)?;
    if shape.frames > model.config.video.max_frames {
        bail!("{} frames, the model has temporal embeddings for {}", shape.frames, model.config.video.max_frames);
    }
    let source = demovlp_train::annotations::open_features(&features)?;
    let loss = cfg.as_ref().map(|c| c.loss.clone()).unwrap_or_default();
    let opt = McOptions { shape, batch_size: data.map(|d| d.batch_size).unwrap_or(64), lambda: loss.lambda, masked_mean: loss.masked_mean };
    let k = questions[0].options.len();
    eprintln!(
        "multiple choice: {} questions x {k} options from {}, {} frames x {} regions",
        questions.len(),
        questions_path.display(),
        shape.frames,
        shape.regions
    );
    let mut result = None;
    crate::device::run_model(&a.device, model, McJob { questions: &questions, source: &source, tok: &tok, opt: &opt, out: &mut result })?;
    let r = result.context("the evaluation ran")?;
    let mode = if a.reference_eval { "reference" } else { "aligned" };
    let (acc, pred, scores) = if a.reference_eval {
        (r.accuracy_reference, &r.scores.pred_reference, &r.scores.reference)
    } else {
        (r.accuracy_aligned, &r.scores.pred_aligned, &r.scores.aligned)
    };
    if let Some(p) = &a.predictions {
        let mut out = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            let row = |s: &[f32]| s[i * k..(i + 1) * k].to_vec();
            let line = json!({
                "qid": q.qid, "clip": q.clip, "answer": q.answer, "prediction": pred[i], "correct": pred[i] == q.answer,
                "prediction_reference": r.scores.pred_reference[i], "scores": row(scores),
                "scores_aligned": row(&r.scores.aligned), "scores_reference": row(&r.scores.reference),
            });
            writeln!(out, "{line}")?;
        }
        demovlp_model::io::atomic_write(p, &out)?;
        eprintln!("wrote {} predictions to {}", questions.len(), p.display());
    }
    println!("{:<28} {:>9}", "multiple choice", "accuracy");
    println!("{:<28} {:>8.2}%", format!("chance (1 of {k})"), 100.0 / k as f64);
    println!("{:<28} {:>8.2}%", "corrected (aligned)", r.accuracy_aligned);
    println!("{:<28} {:>8.2}%", "published (reference)", r.accuracy_reference);
    println!(
        "{}",
        json!({
            "task": "mc", "accuracy": acc, "accuracy_aligned": r.accuracy_aligned, "accuracy_reference": r.accuracy_reference,
            "mode": mode, "questions": questions.len(), "options": k, "seconds": r.seconds,
        })
    );
    Ok(())
}
