//! `demovlp bench ...`: each benchmark lives with its subject's commands.

use clap::Subcommand;

use crate::{data_cmds, model_cmds, retrieval_cmds};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Clips/s for load + region selection: .npz files vs the packed store.
    Data(data_cmds::BenchDataArgs),
    /// Seconds per training step (forward, backward, AdamW) and peak memory.
    TrainStep(model_cmds::BenchTrainStepArgs),
    /// Seconds for the evaluation similarity matrix (global + local) and peak memory.
    EvalSims(retrieval_cmds::BenchEvalSimsArgs),
    /// Inference throughput: texts/s and clips/s.
    Embed(model_cmds::BenchEmbedArgs),
}

pub fn run(c: BenchCommand) -> anyhow::Result<()> {
    match c {
        BenchCommand::Data(a) => data_cmds::bench_data(a),
        BenchCommand::TrainStep(a) => model_cmds::bench_train_step(a),
        BenchCommand::EvalSims(a) => retrieval_cmds::bench_eval_sims(a),
        BenchCommand::Embed(a) => model_cmds::bench_embed(a),
    }
}
