//! What every training command shares before its loop starts: the data-parallel flags and
//! where a process learns its rank (`--rank`, torchrun's and SLURM's variables), joining the
//! other ranks, and the output directory's guard.

use std::path::Path;

use anyhow::{bail, Context, Result};
use demovlp_train::config::DistSection;
use demovlp_train::dist::{Identity, Launch, LaunchFlags, TcpCollective, Timeouts};
use demovlp_train::trainer::Dist;

/// Data-parallel training (several processes, e.g. one per GPU): flags win over torchrun's
/// RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, which win over SLURM's SLURM_PROCID /
/// SLURM_NTASKS / SLURM_JOB_NODELIST. Without any of them: one process.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DistArgs {
    /// This process's rank in a data-parallel run (default: $RANK, else $SLURM_PROCID).
    #[arg(long, help_heading = "Data-parallel training")]
    rank: Option<usize>,
    /// Processes in the run (default: $WORLD_SIZE, else $SLURM_NTASKS; 1 = a single process).
    #[arg(long, help_heading = "Data-parallel training")]
    world_size: Option<usize>,
    /// Rank 0's host (default: $MASTER_ADDR, else the first host of $SLURM_JOB_NODELIST).
    #[arg(long, help_heading = "Data-parallel training")]
    master_addr: Option<String>,
    /// torchrun's port (default: $MASTER_PORT, else 29500); demovlp's rendezvous uses the port
    /// above it (torchrun's agent owns this one), or $DEMOVLP_RDZV_PORT (0 = rank 0 lets the
    /// OS choose and prints it).
    #[arg(long, help_heading = "Data-parallel training")]
    master_port: Option<u16>,
    /// Seconds a rank waits for another before stopping with an error naming it (overrides
    /// [dist] timeout_s and $DEMOVLP_DIST_TIMEOUT; the rendezvous: $DEMOVLP_RDZV_TIMEOUT).
    #[arg(long, help_heading = "Data-parallel training")]
    dist_timeout: Option<f64>,
    /// Collective engine: `tcp` (std::net, any machine) or `nccl` (NVIDIA GPUs, builds with
    /// `--features cuda`; the gradients still live on the host and are copied to GPU
    /// `LOCAL_RANK % device_count` for each all-reduce).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "nccl"], help_heading = "Data-parallel training")]
    dist_engine: String,
}

/// Never destroy an earlier run (see `demovlp_train::run_dir`); prints the guard's note.
pub(crate) fn guard_output_dir(out: &Path, resume: bool, force: bool, task_outputs: &[&str]) -> Result<()> {
    if let Some(note) = demovlp_train::run_dir::guard_output_dir(out, resume, force, task_outputs)? {
        eprintln!("{note}");
    }
    Ok(())
}

/// Seconds from the environment variable `name`, if set.
fn env_seconds(name: &str) -> Result<Option<f64>> {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Some(s)),
            _ => bail!("{name}={v:?} is not a number of seconds > 0"),
        },
        Err(_) => Ok(None),
    }
}

/// This process's launch (None: a single process) from the flags and the environment.
pub(crate) fn resolve_launch(d: &DistArgs) -> Result<Option<Launch>> {
    let flags = LaunchFlags { rank: d.rank, world_size: d.world_size, master_addr: d.master_addr.clone(), master_port: d.master_port };
    Launch::resolve(&flags, &|k| std::env::var(k).ok()).context("data-parallel launch")
}

/// Joins the other ranks (TCP engine); errors name the rank and the setting to change.
pub(crate) fn join_ranks(
    launch: &Launch,
    d: &DistArgs,
    device: &crate::device::DeviceArgs,
    dist: &DistSection,
    config_text: &str,
    resume: bool,
) -> Result<Dist> {
    let io = match d.dist_timeout {
        Some(s) if s.is_finite() && s > 0.0 => s,
        Some(s) => bail!("--dist-timeout {s}: a number of seconds > 0 is needed"),
        None => env_seconds("DEMOVLP_DIST_TIMEOUT")?.unwrap_or(dist.timeout_s),
    };
    let rdzv = env_seconds("DEMOVLP_RDZV_TIMEOUT")?.unwrap_or(dist.rendezvous_timeout_s);
    let t = Timeouts { io: std::time::Duration::from_secs_f64(io), rendezvous: std::time::Duration::from_secs_f64(rdzv) };
    let me = Identity::new(config_text, resume);
    let prefix = format!("[rank {}] ", launch.rank);
    eprintln!(
        "{prefix}data-parallel: rank {} of {} (local rank {}), rank 0 at {}:{} ({}), config {}, binary {}",
        launch.rank, launch.world, launch.local_rank, launch.master_addr, launch.rdzv_port, d.dist_engine, me.config_hash, me.binary_hash
    );
    let say = |m: &str| eprintln!("{prefix}{m}");
    let coll: Box<dyn demovlp_train::dist::Collective> = match d.dist_engine.as_str() {
        #[cfg(feature = "cuda")]
        "nccl" => {
            // The training backend's GPU, so the gradients are summed where they are.
            let gpu = match device.device {
                crate::device::Device::Cuda(n) => n,
                crate::device::Device::Cpu => crate::device::gpu_of_local_rank(launch.local_rank, demovlp_cuda::device_count),
            };
            Box::new(demovlp_train::nccl::NcclCollective::join(launch, &me, t, gpu, &say)?)
        }
        #[cfg(not(feature = "cuda"))]
        "nccl" => {
            let _ = device;
            bail!("--dist-engine nccl: this demovlp was built without the `cuda` feature (cargo build --release --features cuda)")
        }
        _ => Box::new(TcpCollective::join(launch, &me, t, &say)?),
    };
    Ok(Dist { coll, local_rank: launch.local_rank })
}
