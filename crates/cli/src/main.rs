//! `demovlp`: video-language pre-training and retrieval on region features.
//!
//! Each group of subcommands lives in its own module; this file only wires them up.

mod bench;
mod bench_pytorch;
mod data_cmds;
mod device;
mod dist_cmds;
mod extract_cmd;
mod hugepages;
mod launch;
mod mc_cmds;
mod measure;
mod model_args;
mod model_cmds;
mod pipe;
mod qa_cmds;
mod retrieval_cmds;
mod search_cmds;
mod selftest;
mod serve_cmd;
mod task_cmds;
mod train_cmds;
mod usage;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "demovlp",
    version,
    about = "DemoVLP: video-language pre-training and retrieval on object-detector region features",
    long_about = "DemoVLP learns text<->video retrieval from region features (Faster R-CNN boxes of a few \
sparsely sampled frames) instead of raw pixels. Start with `demovlp demo`, which needs no downloads."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the built-in demo: synthetic corpus, pre-train, fine-tune, evaluate (no downloads).
    Demo(train_cmds::DemoArgs),
    /// Pre-train from a TOML config.
    Pretrain(train_cmds::PretrainArgs),
    /// Fine-tune a checkpoint from a TOML config.
    Finetune(train_cmds::FinetuneArgs),
    /// Fine-tune a video QA model from a QA config ([task] kind = "qa").
    #[command(long_about = qa_cmds::finetune_qa_help())]
    FinetuneQa(qa_cmds::FinetuneQaArgs),
    /// Evaluate a video QA model: accuracy overall and per answer type, answers outside the vocabulary.
    #[command(long_about = qa_cmds::eval_qa_help())]
    EvalQa(qa_cmds::EvalQaArgs),
    /// Evaluate text<->video retrieval of a model on a test set.
    Eval(train_cmds::EvalArgs),
    /// Write the evaluation-path model input of one clip directory.
    Regions(data_cmds::RegionsArgs),
    /// Tokenize lines of stdin into padded WordPiece ids (one JSON object per line).
    Tokenize(data_cmds::TokenizeArgs),
    /// Region features from videos or images (bottom-up-attention detector; needs ffmpeg).
    #[command(long_about = extract_cmd::EXTRACT_HELP)]
    Extract(extract_cmd::ExtractArgs),
    /// Pack a tree of per-frame .npz files into a memory-mapped feature store.
    Pack(data_cmds::PackArgs),
    /// Import weights (.pth from the published trainer, or safetensors) into a model directory.
    Import(model_args::ImportArgs),
    /// Run one recorded batch through a model and write its outputs (and gradients).
    Replay(model_args::ReplayArgs),
    /// Retrieval metrics of a text x video similarity matrix.
    Metrics(retrieval_cmds::MetricsArgs),
    /// Multiple-choice evaluation of a model (MSR-VTT-MC, LSMDC-MC, own JSONL): accuracy and predictions.
    #[command(long_about = mc_cmds::EVAL_MC_HELP)]
    EvalMc(mc_cmds::EvalMcArgs),
    /// Multiple-choice scores and accuracy from option and clip embeddings.
    #[command(long_about = task_cmds::MC_SCORES_HELP)]
    McScores(task_cmds::McScoresArgs),
    /// Video QA accuracy (overall and per answer type) of a JSONL predictions file.
    #[command(long_about = task_cmds::QA_METRICS_HELP)]
    QaMetrics(task_cmds::QaMetricsArgs),
    /// Embed a collection of clips into a search index (resumable, appendable, --shard i/n).
    Index(search_cmds::IndexArgs),
    /// Combine indexes built with the same settings (e.g. shards) into a new one.
    IndexMerge(search_cmds::IndexMergeArgs),
    /// Search an index with a text: global candidates, then global + region-word re-rank.
    Search(search_cmds::SearchArgs),
    /// Which regions each word of a text attends to in one clip (JSON and SVG).
    Explain(search_cmds::ExplainArgs),
    /// Check every file of an index against the checksum recorded when it was written.
    Verify(search_cmds::VerifyArgs),
    /// Serve an index over HTTP: JSON search / explain / health API and a small web page.
    #[command(long_about = serve_cmd::SERVE_HELP)]
    Serve(serve_cmd::ServeArgs),
    /// Benchmarks (medians of several runs, with peak memory).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Every backend kernel and the whole model against the CPU, one JSON line per check
    /// (`scripts/gpu-check.sh` runs it with `--device cuda`).
    #[command(hide = true)]
    Selftest(selftest::SelftestArgs),
}

#[global_allocator]
static ALLOC: hugepages::HugePageAlloc = hugepages::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    pipe::install();
    hugepages::init();
    let cli = Cli::from_arg_matches(&usage::with_full_usage(Cli::command()).get_matches()).unwrap_or_else(|e| e.exit());
    pipe::finish(match cli.command {
        Command::Demo(a) => train_cmds::demo(a),
        Command::Pretrain(a) => train_cmds::pretrain(a),
        Command::Finetune(a) => train_cmds::finetune(a),
        Command::FinetuneQa(a) => qa_cmds::finetune_qa(a),
        Command::EvalQa(a) => qa_cmds::eval_qa(a),
        Command::Eval(a) => device::check_available(&a.device).and_then(|()| train_cmds::eval(a)),
        Command::Regions(a) => data_cmds::regions(a),
        Command::Tokenize(a) => data_cmds::tokenize(a),
        Command::Extract(a) => extract_cmd::extract(a),
        Command::Pack(a) => data_cmds::pack(a),
        Command::Import(a) => model_cmds::import(a),
        Command::Replay(a) => model_cmds::replay(a),
        Command::Metrics(a) => retrieval_cmds::metrics(a),
        Command::EvalMc(a) => mc_cmds::eval_mc(a),
        Command::McScores(a) => task_cmds::mc_scores_cmd(a),
        Command::QaMetrics(a) => task_cmds::qa_metrics_cmd(a),
        Command::Index(a) => search_cmds::index(a),
        Command::IndexMerge(a) => search_cmds::index_merge(a),
        Command::Search(a) => search_cmds::search(a),
        Command::Explain(a) => search_cmds::explain(a),
        Command::Verify(a) => search_cmds::verify(a),
        Command::Serve(a) => serve_cmd::serve(a),
        Command::Bench(c) => bench::run(c),
        Command::Selftest(a) => selftest::selftest(a),
    })
}
