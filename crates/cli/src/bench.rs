//! `demovlp bench ...`: each benchmark lives with its subject's commands.

use clap::Subcommand;

use crate::measure::median_min_max;
use crate::{data_cmds, model_cmds, retrieval_cmds, search_cmds};

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
    /// GFLOP/s of the GEMM backends on the training step's matrix shapes: ours
    /// (AVX-512 12×32 kernel) against matrixmultiply, measured in the same run.
    Gemm(BenchGemmArgs),
    /// Search latency and recall on a synthetic index: HNSW build time, global top-k p50/p99
    /// and recall@k against the exact scan (timed side by side), re-rank of 100 candidates.
    Search(search_cmds::BenchSearchArgs),
    /// Milliseconds per gradient all-reduce of the TCP collective (data-parallel training)
    /// over 127.0.0.1, at the published model's size by default.
    Allreduce(crate::dist_cmds::BenchAllreduceArgs),
    /// Seconds per frame of region-feature extraction at the published model's sizes and
    /// default settings (seeded random weights), and peak memory.
    Extract(crate::extract_cmd::BenchExtractArgs),
}

#[derive(clap::Args)]
pub struct BenchGemmArgs {
    /// Timed repetitions per shape and backend (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Tokens in the batch (rows of the activations): published step 8 × (1 + 8·30).
    #[arg(long, default_value_t = 1928)]
    pub tokens: usize,
    /// Our kernel to measure: `auto` (AVX-512 where the CPU has it, else AVX2) or `avx2`
    /// (the AVX2 6×16 kernel that CPUs without AVX-512 run, measurable on any AVX2 CPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "avx2"])]
    pub kernel: String,
    /// Print only one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: BenchCommand) -> anyhow::Result<()> {
    match c {
        BenchCommand::Data(a) => data_cmds::bench_data(a),
        BenchCommand::TrainStep(a) => model_cmds::bench_train_step(a),
        BenchCommand::EvalSims(a) => retrieval_cmds::bench_eval_sims(a),
        BenchCommand::Embed(a) => model_cmds::bench_embed(a),
        BenchCommand::Gemm(a) => bench_gemm(a),
        BenchCommand::Search(a) => search_cmds::bench_search(a),
        BenchCommand::Allreduce(a) => crate::dist_cmds::bench_allreduce(a),
        BenchCommand::Extract(a) => crate::extract_cmd::bench_extract(a),
    }
}

/// The video tower's linear layers at width 768 / MLP 3072: forward, input-gradient and
/// weight-gradient products, with the transposes the model uses.
fn bench_gemm(a: BenchGemmArgs) -> anyhow::Result<()> {
    use demovlp_kernels::gemm::{self, Backend, Trans};
    anyhow::ensure!(a.runs >= 1 && a.tokens >= 1, "need --runs ≥ 1 and --tokens ≥ 1");
    let (t, d, h) = (a.tokens, 768, 3072);
    // (name, op(A) trans, op(B) trans, m, n, k)
    let shapes = [
        ("qkv forward", Trans::No, Trans::Yes, t, 3 * d, d),
        ("fc1 forward", Trans::No, Trans::Yes, t, h, d),
        ("fc2 forward", Trans::No, Trans::Yes, t, d, h),
        ("fc2 d(input)", Trans::No, Trans::No, t, h, d),
        ("fc2 d(weight)", Trans::Yes, Trans::No, d, h, t),
        ("fc1 d(weight)", Trans::Yes, Trans::No, h, d, t),
    ];
    let ours_backend = if a.kernel == "avx2" { Backend::Avx2 } else { Backend::Auto };
    gemm::set_backend(ours_backend);
    let ours_name = gemm::backend_name();
    let mut rng = demovlp_kernels::Rng::new(7);
    let threads = rayon::current_num_threads();
    eprintln!("bench gemm: {threads} threads, {} timed runs per shape and backend", a.runs);
    let mut rows = Vec::new();
    let (mut total_ours, mut total_base) = (0.0, 0.0);
    for (name, ta, tb, m, n, k) in shapes {
        let av: Vec<f32> = (0..m * k).map(|_| rng.normal() * 0.1).collect();
        let bv: Vec<f32> = (0..k * n).map(|_| rng.normal() * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let lda = if ta == Trans::No { k } else { m };
        let ldb = if tb == Trans::No { n } else { k };
        // The two backends alternate run by run, so a noisy neighbour hits both alike.
        let (mut t_base, mut t_ours) = (Vec::with_capacity(a.runs), Vec::with_capacity(a.runs));
        for i in 0..=a.runs {
            for (backend, ts) in [(Backend::MatrixMultiply, &mut t_base), (ours_backend, &mut t_ours)] {
                gemm::set_backend(backend);
                let t0 = std::time::Instant::now();
                gemm::sgemm(ta, tb, m, n, k, 1.0, &av, lda, &bv, ldb, 0.0, &mut c, n);
                if i > 0 {
                    ts.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        let (base, min_base, _) = median_min_max(t_base);
        let (ours, min_ours, _) = median_min_max(t_ours);
        let gflop = 2.0 * (m * n * k) as f64 * 1e-9;
        total_ours += ours;
        total_base += base;
        eprintln!(
            "  {name:14} {m:5}x{n:5}x{k:5}: {} {:6.1} GFLOP/s (best {:6.1}), matrixmultiply {:6.1} (best {:6.1}), time ratio {:.3}",
            ours_name,
            gflop / ours,
            gflop / min_ours,
            gflop / base,
            gflop / min_base,
            ours / base
        );
        rows.push(serde_json::json!({"shape": name, "m": m, "n": n, "k": k, "median_s": ours, "baseline_median_s": base, "gflops": gflop / ours, "baseline_gflops": gflop / base}));
    }
    let ratio = total_ours / total_base;
    if !a.json {
        println!("gemm: {ours_name} {total_ours:.3} s vs matrixmultiply {total_base:.3} s over the six shapes (time ratio {ratio:.3})");
    }
    println!(
        "{}",
        serde_json::json!({"bench": "gemm", "backend": ours_name, "threads": threads, "runs": a.runs, "median_s": total_ours, "baseline_median_s": total_base, "time_ratio": ratio, "shapes": rows})
    );
    Ok(())
}
