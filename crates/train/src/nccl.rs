//! The NCCL engine of [`Collective`] (feature `cuda`): the collectives of a data-parallel
//! run on NVIDIA GPUs, through cudarc's NCCL bindings. The TCP rendezvous of
//! [`TcpCollective`] comes first (rank, world size, config and binary hashes checked as
//! for the TCP engine); rank 0 then creates the `ncclUniqueId` and broadcasts it over TCP,
//! and every rank joins the NCCL communicator on GPU `local_rank % device_count`. The
//! trainer's buffers live on the host today: an all-reduce copies each chunk to the GPU,
//! reduces it there and copies it back. Byte broadcasts and barriers stay on TCP.
//!
//! **Status: compiled and linted only** (no GPU where it was written); NCCL operations have
//! no timeout of their own (a dead rank makes NCCL hang, unlike the TCP engine).
//!
//! cudarc opens `libnccl.so` (or names with the CUDA major version): the PyPI wheel
//! `nvidia-nccl-cu12` ships only `libnccl.so.2`, so [`nccl_available`] names the file and
//! the symlink to make.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaViewMut};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::dist::{Collective, Identity, Launch, TcpCollective, Timeouts, CHUNK};

/// Err naming the library and how to provide it when libnccl cannot be opened.
pub fn nccl_available() -> Result<()> {
    // SAFETY: only tries to dlopen candidate names.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Ok(());
    }
    bail!(
        "NCCL library not found (libnccl.so): the PyPI wheel nvidia-nccl-cu12 ships only libnccl.so.2, \
         with no unversioned name; make one (`ln -s $SITE/nvidia/nccl/lib/libnccl.so.2 DIR/libnccl.so`) and put DIR \
         on LD_LIBRARY_PATH, or use a CUDA toolkit's NCCL"
    )
}

/// A communicator of one rank (NCCL handles may be used from any thread, one at a time).
struct SendComm(Comm);
// SAFETY: an NCCL communicator is not tied to the thread that made it; the engine is
// `&mut` for every call, so it is never used by two threads at once.
unsafe impl Send for SendComm {}

pub struct NcclCollective {
    tcp: TcpCollective,
    comm: SendComm,
    stream: Arc<CudaStream>,
    dev: CudaSlice<f32>,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("NCCL {what} failed: {e:?}")
}

impl NcclCollective {
    /// Joins the run: TCP rendezvous, then the NCCL communicator on GPU
    /// `local_rank % device_count`.
    pub fn join(launch: &Launch, me: &Identity, t: Timeouts, say: &dyn Fn(&str)) -> Result<NcclCollective> {
        nccl_available()?;
        let mut tcp = TcpCollective::join(launch, me, t, say)?;
        let count = CudaContext::device_count().map_err(|e| anyhow!("cannot count CUDA devices: {e:?}"))? as usize;
        if count == 0 {
            bail!("the NCCL engine needs a CUDA device; this machine has none");
        }
        let ordinal = launch.local_rank % count;
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let stream = ctx.default_stream();
        let mut id_bytes = if launch.rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        tcp.broadcast_bytes(&mut id_bytes).context("sharing the NCCL unique id")?;
        if id_bytes.len() != 128 {
            bail!("NCCL unique id from rank 0 has {} bytes, 128 expected", id_bytes.len());
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), launch.rank, launch.world, Id::uninit(internal))
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        say(&format!("NCCL communicator ready: rank {} of {} on GPU {ordinal}", launch.rank, launch.world));
        let dev = stream.alloc_zeros::<f32>(CHUNK).map_err(|e| anyhow!("allocating the NCCL buffer: {e:?}"))?;
        Ok(NcclCollective { tcp, comm: SendComm(comm), stream, dev })
    }

    /// Each chunk of `buf`: to the GPU, `op` on it there, back to the host.
    fn on_device(&mut self, buf: &mut [f32], op: impl Fn(&Comm, &mut CudaViewMut<'_, f32>) -> Result<()>) -> Result<()> {
        for chunk in buf.chunks_mut(CHUNK) {
            let mut view = self.dev.slice_mut(0..chunk.len());
            self.stream.memcpy_htod(chunk, &mut view).map_err(|e| anyhow!("copy to the GPU: {e:?}"))?;
            op(&self.comm.0, &mut view)?;
            self.stream.memcpy_dtoh(&view, chunk).map_err(|e| anyhow!("copy from the GPU: {e:?}"))?;
            self.stream.synchronize().map_err(|e| anyhow!("CUDA stream: {e:?}"))?;
        }
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world(&self) -> usize {
        self.tcp.world()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.on_device(buf, |c, d| c.all_reduce_in_place(d, &ReduceOp::Sum).map(|_| ()).map_err(|e| nccl_err("ncclAllReduce", e)))
    }

    fn broadcast_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.on_device(buf, |c, d| c.broadcast_in_place(d, 0).map(|_| ()).map_err(|e| nccl_err("ncclBroadcast", e)))
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.tcp.broadcast_bytes(buf)
    }

    fn barrier(&mut self) -> Result<()> {
        self.tcp.barrier()
    }

    fn engine(&self) -> &'static str {
        "nccl"
    }

    fn abort(&mut self, why: &str) {
        self.tcp.abort(why)
    }
}
