//! Video QA commands: `import` and `replay` of QA models (weights with `head.*` tensors
//! become a QA model directory, `demovlp_train::qa`; `replay` runs the published
//! `ObjectQARelation` on a recorded batch with `in.labels`), `finetune-qa` (the shared
//! training loop, on any device, data-parallel) and `eval-qa`.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use demovlp_model::backend::Backend;
use demovlp_model::io::{self, TensorRef};
use demovlp_model::qa::QaModel;
use demovlp_train::qa::{import_qa_weights, load_qa_dir, save_qa_dir};
use demovlp_train::qa_task::{run_qa_on, QaData, QaRunReport, BEST_DIR};
use demovlp_train::qa_train::QaConfig;
use demovlp_train::trainer::{Dist, RunOptions};
use serde_json::json;

use crate::model_args::{batch_from, ImportArgs, ReplayArgs};

/// `import` of weights holding `head.*` tensors. `Ok(false)`: none, not a QA model.
pub fn import_qa(a: &ImportArgs) -> Result<bool> {
    let Some((model, report)) =
        import_qa_weights(&a.input, a.key_prefix.as_deref(), a.text_heads.unwrap_or(12), a.video_heads.unwrap_or(12))?
    else {
        return Ok(false);
    };
    save_qa_dir(&model, None, &a.out)?;
    let (c, h) = (&model.base.config, &model.head.config);
    eprintln!(
        "imported {} as a QA model: {:?} text tower {}x{} ({} heads), video tower {}x{} ({} heads, {} frames), P = {}, \
         head hidden {} with {} answers; {}",
        a.input.display(),
        c.text.kind,
        c.text.layers,
        c.text.dim,
        c.text.heads,
        c.video.depth,
        c.video.dim,
        c.video.heads,
        c.video.max_frames,
        c.proj_dim,
        h.hidden,
        h.answers,
        report.summary()
    );
    if !report.skipped.is_empty() {
        eprintln!("skipped (no place in the model): {}", report.skipped.join(", "));
    }
    if !report.missing.is_empty() {
        eprintln!("absent from the input, left zero (unused by the model): {}", report.missing.join(", "));
    }
    println!("{}", a.out.display());
    Ok(true)
}

/// `replay` on a QA model directory: `out.text_tokens`, `out.video_tokens`, `out.question`,
/// `out.attention`, `out.logits`, `out.loss`, and with `--grads` `grad.<name>` of every
/// parameter (towers and head) that receives one.
pub fn replay_qa(a: ReplayArgs) -> Result<()> {
    ensure!(a.adamw.is_none(), "--adamw is not offered for QA models (replay a retrieval model directory for the AdamW step)");
    ensure!(!a.masked_mean && !a.global_only, "--masked-mean / --global-only are retrieval-loss options; a QA model has none");
    let m = load_qa_dir(&a.model)?.model;
    let st = io::read_safetensors(&a.batch)?;
    let x = batch_from(&st, &a.batch)?;
    let labels_t =
        st.get("in.labels").with_context(|| format!("{}: a QA replay needs in.labels [B] (answer indices)", a.batch.display()))?;
    ensure!(labels_t.shape == [x.b], "{}: in.labels has shape {:?}, expected [{}]", a.batch.display(), labels_t.shape, x.b);
    let na = m.head.config.answers;
    let labels: Vec<usize> =
        labels_t
            .to_i64()?
            .into_iter()
            .map(|v| {
                if v >= 0 && (v as usize) < na {
                    Ok(v as usize)
                } else {
                    bail!("{}: label {v} outside the {na} answers", a.batch.display())
                }
            })
            .collect::<Result<_>>()?;
    x.check_fits(&m.base.config, &a.batch)?;
    crate::device::check_available(&a.device)?;
    let device = a.device.clone();
    crate::device::run_qa_model(&device, m, ReplayQa { a, x, labels })
}

struct ReplayQa {
    a: ReplayArgs,
    x: crate::model_args::RecordedBatch,
    labels: Vec<usize>,
}

impl crate::device::OnQaModel for ReplayQa {
    fn run<B: Backend>(self, m: QaModel<B>, device: &str) -> Result<()> {
        replay_qa_on(self, m, device)
    }
}

fn replay_qa_on<B: Backend>(r: ReplayQa, mut m: QaModel<B>, device: &str) -> Result<()> {
    let ReplayQa { a, x, labels } = r;
    let na = m.head.config.answers;
    let batch = x.batch_ref();
    let be = m.base.backend().clone();
    let (text, video) = m.base.forward_tokens(&batch, false);
    let (text, video) = (be.to_host(text), be.to_host(video));
    let o = m.forward_backward(&batch, &labels);
    let (b, p, l, n) = (x.b, m.head.config.dim, x.l, x.f * x.r);
    let loss = [o.loss];
    let question = be.to_host(B::view(&m.head.acts.question));
    let attention = be.to_host(B::view(&m.head.acts.attention));
    let mut out: Vec<(String, Vec<usize>, TensorRef)> = vec![
        ("out.text_tokens".into(), vec![b, l, p], TensorRef::F32(&text)),
        ("out.video_tokens".into(), vec![b, 1 + n, p], TensorRef::F32(&video)),
        ("out.question".into(), vec![b, p], TensorRef::F32(&question)),
        ("out.attention".into(), vec![b, n], TensorRef::F32(&attention)),
        ("out.logits".into(), vec![b, na], TensorRef::F32(&o.logits)),
        ("out.loss".into(), vec![1], TensorRef::F32(&loss)),
    ];
    // The gradients brought to the host once (a copy of both parameter sets).
    let host = |params: &demovlp_model::Params<B>| params.to_backend(&be, &demovlp_model::Cpu);
    let grads = a.grads.then(|| (host(&m.base.params), host(&m.head.params)));
    if let Some((base, head)) = &grads {
        out.extend(io::grads_as_tensors(base, "grad."));
        out.extend(io::grads_as_tensors(head, "grad."));
    }
    io::write_safetensors_refs(&a.out, &out, &[])?;
    eprintln!(
        "replayed {} on a QA model on {device} (B={b}, F={}, R={}, L={l}, {na} answers): loss {:.6}; wrote {} tensors to {}",
        a.batch.display(),
        x.f,
        x.r,
        o.loss,
        out.len(),
        a.out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// finetune-qa / eval-qa

const QA_CONFIG_HELP: &str = "A QA config is TOML with [task] kind = \"qa\" (configs/msrvtt_qa.toml, msvd_qa.toml, \
tgif_qa-frame.toml): [model] init (a retrieval checkpoint or model directory: the head starts from scratch; or a QA \
model directory) and hidden; [data] tokenizer (absent: the built-in uncased WordPiece), text_len, frames, regions, \
batch_size, answers (the answer vocabulary: {answer: label} JSON, a JSON list, or one answer per line); [data.train], \
[data.val], [data.test] with name, format (msrvtt-qa, msvd-qa (+ mapping = msvd_youtube_mapping.txt), tgif-frameqa, \
or jsonl: our own {\"clip\", \"question\", \"answer\", \"answer_type\"?} per line), annotations, features; [optim] as \
for retrieval (published: lr 2e-4, first_epoch_lr 1e-4, milestones [2, 4, 8]); [train] epochs, log_every, \
attention_dropout, text_dropout, eval_batch_size, checkpoint_every (also write the latest checkpoint every N steps; 0 = at epoch ends only), max_steps (stop after N steps in all, resumable), accumulate_steps (micro-batches per optimiser step, gradients averaged), early_stopping_patience (epochs without a better validation accuracy); [dist] timeout_s, rendezvous_timeout_s (data-parallel runs).";

/// `--help` of the command.
pub fn finetune_qa_help() -> String {
    format!(
        "Fine-tunes a video QA model (SPEC §8: the retrieval towers + the BUTD head, \
cross-entropy over the answer vocabulary) in the same training loop as retrieval: on --device cpu or cuda, with \
gradient accumulation ([train] accumulate_steps) and data-parallel ranks (torchrun's or SLURM's variables, or --rank / \
--world-size), bit-exact resume. Training questions whose answer is outside the vocabulary are skipped and counted. The \
best epoch is chosen on validation accuracy and written to <output_dir>/best (a QA model directory, what eval-qa \
reads); <output_dir>/checkpoint_latest.safetensors holds the latest epoch end (or the step of an interruption, \
max_steps or checkpoint_every) with both optimisers' state, from which --resume continues bit-exactly, mid-epoch \
included (a run directory of an earlier release, with last/, is converted); SIGINT/SIGTERM write it at the current \
step and exit 130/143; <output_dir>/log.jsonl has one line per logged step (with its learning rate) and per epoch, \
drawn into loss.svg and accuracy.svg (validation accuracy per answer type). At the end the best model is evaluated \
on [data.test]. The last stdout line is JSON: {{\"task\": \"qa\", \"steps\", \"best_epoch\", \"best\", \
\"params_hash\", \"skipped_out_of_vocabulary\", \"accuracy\", \"out_of_vocabulary\", \"metrics\"}}.\n\n{QA_CONFIG_HELP}"
    )
}

#[derive(clap::Args)]
pub struct FinetuneQaArgs {
    /// The QA config.
    #[arg(long)]
    pub config: PathBuf,
    /// Initial model (overrides [model] init): a retrieval checkpoint / model directory, or a QA model directory.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the run in output_dir from its latest checkpoint (mid-epoch included).
    #[arg(long)]
    pub resume: bool,
    /// Start over in an output_dir that already holds a run: its checkpoints, best/, log and
    /// plots are deleted first.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Override output_dir.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    #[command(flatten)]
    pub dist: crate::launch::DistArgs,
}

/// A QA run on the chosen backend.
struct QaJob<'a> {
    cfg: &'a QaConfig,
    data: &'a QaData,
    opts: &'a RunOptions,
    dist: Option<Dist>,
}

impl crate::device::OnBackend for QaJob<'_> {
    type Out = QaRunReport;
    fn run<B: Backend>(self, be: &B, device: &str) -> Result<QaRunReport> {
        if device != "cpu" {
            eprintln!("{}: training on {device}", self.cfg.name);
        }
        run_qa_on(be, self.cfg, self.data, self.opts, self.dist)
    }
}

pub fn finetune_qa(a: FinetuneQaArgs) -> Result<()> {
    crate::device::check_available(&a.device)?;
    let mut cfg = QaConfig::parse_file(&a.config)?;
    if let Some(o) = a.output_dir {
        cfg.output_dir = o;
    }
    let launch = crate::launch::resolve_launch(&a.dist)?;
    let rank = launch.as_ref().map_or(0, |l| l.rank);
    // Before the data are read: a run directory that cannot be used fails at once (the
    // loop checks again; an earlier release's last/ folder is converted there).
    if rank == 0 && !(a.resume && demovlp_train::qa_task::legacy_last_dir(&cfg.output_dir).is_some()) {
        crate::launch::guard_output_dir(&cfg.output_dir, a.resume, a.force, &[BEST_DIR, "accuracy.svg"])?;
    }
    let data = QaData::open(&cfg)?;
    // The stop flag first: a SIGTERM during the rendezvous already counts.
    let stop = demovlp_train::trainer::install_ctrlc();
    let config_text = demovlp_train::qa_task::loop_settings(&cfg)?.config_text;
    let dist = match &launch {
        Some(l) => Some(crate::launch::join_ranks(l, &a.dist, &a.device, &cfg.dist, &config_text, a.resume)?),
        None => None,
    };
    let opts = RunOptions { resume: a.resume, init: a.init, force: false, quiet: false, stop: Some(stop) };
    let r = crate::device::with_backend(&a.device, QaJob { cfg: &cfg, data: &data, opts: &opts, dist })?;
    let res = &r.result;
    let mut line = json!({
        "task": "qa", "name": cfg.name, "output_dir": res.output_dir.display().to_string(), "steps": res.steps,
        "epochs_done": res.epochs_done, "interrupted": res.interrupted, "finished": res.finished,
        "best_epoch": res.best_epoch, "monitor": res.monitor, "best": res.best,
        "skipped_out_of_vocabulary": r.skipped_out_of_vocabulary, "latest": res.latest.display().to_string(),
        "seconds": res.seconds, "params_hash": res.params_hash,
    });
    if let Some(l) = &launch {
        line["rank"] = l.rank.into();
        line["world_size"] = l.world.into();
    }
    if !res.finished {
        let why = if res.interrupted { "interrupted" } else { "stopped at [train] max_steps" };
        eprintln!("{why} at step {}; continue with the same command plus --resume ({})", res.steps, res.latest.display());
        println!("{line}");
        if res.interrupted {
            // SIGINT 130, SIGTERM 143, as retrieval training.
            std::process::exit(demovlp_train::trainer::stop_exit_code());
        }
        return Ok(());
    }
    if let Some(t) = &r.test {
        print_qa_table(t);
        line["accuracy"] = t.accuracy.into();
        line["out_of_vocabulary"] = t.out_of_vocabulary.into();
        line["metrics"] = t.metrics.clone();
    }
    println!("{line}");
    Ok(())
}

fn print_qa_table(e: &demovlp_train::qa_train::QaEval) {
    let m = &e.metrics;
    println!("{:<12} {:>9} {:>10}", "answer type", "accuracy", "questions");
    println!("{:<12} {:>8.2}% {:>10}", "overall", e.accuracy, m["questions"]);
    for t in demovlp_retrieval::qa_metrics::ANSWER_TYPES {
        let n = m["ratios"][format!("{t}_ratio")][1].as_u64().unwrap_or(0);
        if n > 0 {
            println!("{:<12} {:>8.2}% {:>10}", t, 100.0 * m[format!("{t}_acc")].as_f64().unwrap_or(0.0), n);
        }
    }
    println!("answers outside the vocabulary: {:.2}% (accuracy ceiling {:.2}%)", e.out_of_vocabulary, 100.0 - e.out_of_vocabulary);
}

/// `--help` of the command.
pub fn eval_qa_help() -> String {
    format!(
        "Evaluates a QA model directory on the test set of a QA config ([data.test], else \
[data.val]): accuracy overall and per answer type as the published evaluate_qa computes it (a prediction is right when \
its answer string equals the ground truth), and the share of questions whose answer is outside the vocabulary (never \
right: the accuracy ceiling). The last stdout line is JSON: {{\"task\": \"qa\", \"accuracy\", \"out_of_vocabulary\", \
\"metrics\", \"questions\"}}. --predictions writes {{\"question\", \"clip\", \"answer\", \"answer_type\", \"prediction\", \
\"correct\"}} per question (JSONL).\n\n{QA_CONFIG_HELP}"
    )
}

#[derive(clap::Args)]
pub struct EvalQaArgs {
    /// A QA model directory (from finetune-qa, or `demovlp import` of weights with head.* tensors).
    #[arg(long)]
    pub model: PathBuf,
    /// The QA config naming the test set, vocabulary, tokenizer and input sizes.
    #[arg(long)]
    pub config: PathBuf,
    /// Write per-question predictions here (JSONL).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// `eval-qa`'s evaluation on whichever backend holds the model.
struct EvalQaJob<'a> {
    set: &'a demovlp_train::qa_train::QaSet,
    vocab: &'a demovlp_train::qa_train::Vocabulary,
    tok: &'a demovlp_train::text::Tokenizer,
    cfg: &'a QaConfig,
    out: &'a mut Option<demovlp_train::qa_train::QaEval>,
}

impl crate::device::OnQaModel for EvalQaJob<'_> {
    fn run<B: Backend>(self, mut model: QaModel<B>, device: &str) -> Result<()> {
        if device != "cpu" {
            eprintln!("evaluating on {device}");
        }
        let e = demovlp_train::qa_train::evaluate_qa(
            &mut model,
            self.set,
            self.vocab,
            self.tok,
            self.cfg.shape(),
            self.cfg.train.eval_batch_size,
        )?;
        *self.out = Some(e);
        Ok(())
    }
}

pub fn eval_qa(a: EvalQaArgs) -> Result<()> {
    use demovlp_train::qa_train::{read_qa_dataset, QaSet, Vocabulary};
    crate::device::check_available(&a.device)?;
    let cfg = QaConfig::parse_file(&a.config)?;
    let ds = cfg
        .data
        .test
        .as_ref()
        .or(cfg.data.val.as_ref())
        .with_context(|| format!("{}: no [data.test] or [data.val]", a.config.display()))?;
    let vocab = Vocabulary::read(&cfg.data.answers)?;
    let dir = load_qa_dir(&a.model)?;
    if let Some(ans) = &dir.answers {
        ensure!(ans == &vocab.label2ans, "{}: the model's answers.json differs from {}", a.model.display(), cfg.data.answers.display());
    }
    let model = dir.model;
    let tok = match &cfg.data.tokenizer {
        Some(p) => demovlp_train::text::load_tokenizer(p)?,
        None => demovlp_train::text::builtin_tokenizer()?,
    };
    let source = demovlp_train::annotations::open_features(&ds.features)?;
    let set = QaSet::new(&ds.name, read_qa_dataset(ds, &vocab, &cfg.data.answers)?, source);
    eprintln!("evaluating {} on {}: {} questions", a.model.display(), ds.name, set.questions.len());
    let mut result = None;
    crate::device::run_qa_model(&a.device, model, EvalQaJob { set: &set, vocab: &vocab, tok: &tok, cfg: &cfg, out: &mut result })?;
    let e = result.context("the evaluation ran")?;
    if let Some(p) = &a.predictions {
        let mut out = String::new();
        for (q, r) in set.questions.iter().zip(&e.records) {
            out += &format!(
                "{}\n",
                json!({"question": q.question, "clip": q.clip, "answer": q.answer, "answer_type": q.answer_type,
                       "prediction": r.prediction, "correct": r.prediction == r.answer})
            );
        }
        io::atomic_write(p, out.as_bytes())?;
    }
    print_qa_table(&e);
    println!(
        "{}",
        json!({"task": "qa", "accuracy": e.accuracy, "out_of_vocabulary": e.out_of_vocabulary, "metrics": e.metrics,
               "questions": set.questions.len(), "seconds": e.seconds})
    );
    Ok(())
}
