//! `demovlp bench allreduce`: what the TCP collective costs per optimiser step.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use demovlp_model::ModelConfig;
use demovlp_train::dist::{Collective, Identity, Launch, TcpCollective, Timeouts};

#[derive(clap::Args)]
pub struct BenchAllreduceArgs {
    /// Ranks (threads of this process, each with its own TCP connection over 127.0.0.1).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Values per all-reduce: `published` (the published model's parameter count: one
    /// step's gradient) or a number.
    #[arg(long, default_value = "published")]
    pub values: String,
    /// Timed all-reduces (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// `tcp` or `nccl` (built with `--features cuda`; every rank-thread on GPU
    /// `rank % device_count`, so one GPU needs NCCL_MULTI_RANK_GPU_ENABLE=1 for 2 ranks).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "nccl"])]
    pub engine: String,
    /// Print only one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn bench_allreduce(a: BenchAllreduceArgs) -> Result<()> {
    ensure!(a.world >= 2 && a.runs >= 1, "need --world ≥ 2 and --runs ≥ 1");
    #[cfg(not(feature = "cuda"))]
    ensure!(a.engine == "tcp", "--engine nccl: this demovlp was built without the `cuda` feature (cargo build --release --features cuda)");
    let n = match a.values.as_str() {
        "published" => demovlp_model::declare_params(&ModelConfig::published(8)).len(),
        v => v.parse::<usize>().with_context(|| format!("--values {v:?}: `published` or a number"))?,
    };
    ensure!(n >= 1, "--values must be ≥ 1");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let t = Timeouts { io: Duration::from_secs(120), rendezvous: Duration::from_secs(30) };
    let me = Identity { config_hash: "bench".into(), binary_hash: "bench".into(), resume: false };
    eprintln!(
        "bench allreduce: {} ranks (threads), {} engine (rendezvous over 127.0.0.1), {n} f32 values ({:.0} MiB) per all-reduce, {} timed runs",
        a.world,
        a.engine,
        n as f64 * 4.0 / (1 << 20) as f64,
        a.runs
    );
    let runs = a.runs;
    let engine = a.engine.clone();
    let handles: Vec<_> = (0..a.world)
        .map(|rank| {
            let (me, world, engine) = (me.clone(), a.world, engine.clone());
            std::thread::spawn(move || -> Result<(Vec<f64>, f32)> {
                let l = Launch { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), rdzv_port: port, sources: vec![] };
                let mut c: Box<dyn Collective> = match engine.as_str() {
                    #[cfg(feature = "cuda")]
                    "nccl" => {
                        let gpu = crate::device::gpu_of_local_rank(rank, demovlp_cuda::device_count);
                        Box::new(demovlp_train::nccl::NcclCollective::join(&l, &me, t, gpu, &|_| {})?)
                    }
                    _ => Box::new(TcpCollective::join(&l, &me, t, &|_| {})?),
                };
                let mut buf = vec![rank as f32 + 1.0; n];
                let mut times = Vec::with_capacity(runs);
                for i in 0..=runs {
                    buf.fill(rank as f32 + 1.0);
                    c.barrier()?;
                    let t0 = Instant::now();
                    c.all_reduce_sum(&mut buf)?;
                    if i > 0 {
                        times.push(t0.elapsed().as_secs_f64());
                    }
                }
                Ok((times, buf[n - 1]))
            })
        })
        .collect();
    let mut rank0 = None;
    for (rank, h) in handles.into_iter().enumerate() {
        let (times, last) = h.join().map_err(|_| anyhow::anyhow!("rank {rank} panicked"))??;
        let want = (1..=a.world).sum::<usize>() as f32;
        ensure!(last == want, "rank {rank}: all-reduce gave {last}, {want} expected");
        if rank == 0 {
            rank0 = Some(times);
        }
    }
    let (median, min, max) = crate::measure::median_min_max(rank0.expect("rank 0 ran"));
    let gbs = n as f64 * 4.0 / median / 1e9;
    if !a.json {
        println!(
            "allreduce: {} ranks, {n} values: median {:.1} ms (min {:.1}, max {:.1}) per all-reduce, {gbs:.2} GB/s of gradient",
            a.world,
            median * 1e3,
            min * 1e3,
            max * 1e3
        );
    }
    println!(
        "{}",
        serde_json::json!({"bench": "allreduce", "engine": a.engine, "world": a.world, "values": n, "runs": a.runs,
            "median_ms": median * 1e3, "min_ms": min * 1e3, "max_ms": max * 1e3, "gradient_gb_per_s": gbs})
    );
    Ok(())
}
