//! The NCCL engine of [`Collective`] (feature `cuda`): the collectives of a data-parallel
//! run on NVIDIA GPUs. The TCP rendezvous of [`TcpCollective`] comes first (rank, world
//! size, config and binary hashes checked as for the TCP engine); rank 0 then creates the
//! `ncclUniqueId` and sends it over TCP, and every rank joins the NCCL communicator on the
//! GPU its training backend uses.
//!
//! - **Gradients on the device.** [`Collective::all_reduce_buffers`] takes the training
//!   backend's own buffers (`demovlp_cuda::DevBuf`) and sums them in place with
//!   `ncclAllReduce`, grouped, on the backend's own stream: no host copy, queued behind the
//!   backward pass that wrote them.
//! - **Host values** (the step's statistics, the starting weights' broadcast) go through a
//!   staging buffer on the GPU; byte broadcasts and barriers stay on TCP.
//! - **A timeout.** NCCL has none of its own (a dead rank makes the others spin forever).
//!   Every wait polls the stream up to the run's I/O timeout; past it the communicator is
//!   aborted and a TCP barrier (with the TCP engine's timeouts) names the rank that is gone,
//!   or says that every rank is alive and NCCL itself hung.
//!
//! cudarc opens `libnccl.so` (or names with the CUDA major version): the PyPI wheel
//! `nvidia-nccl-cu12` ships only `libnccl.so.2`, so [`nccl_available`] names the file and
//! the symlink to make.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys as dsys;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};

use crate::dist::{Collective, Identity, Launch, TcpCollective, Timeouts, CHUNK};

/// Err naming the library and how to provide it when libnccl cannot be opened.
pub fn nccl_available() -> Result<()> {
    // SAFETY: only tries to dlopen candidate names.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    bail!(
        "NCCL library not found (libnccl.so): the PyPI wheel nvidia-nccl-cu12 ships only libnccl.so.2, \
         with no unversioned name; make one (`ln -s $SITE/nvidia/nccl/lib/libnccl.so.2 DIR/libnccl.so`) and put DIR \
         on LD_LIBRARY_PATH, or use a CUDA toolkit's NCCL"
    )
}

/// A communicator handle (NCCL handles may be used from any thread, one at a time).
struct RawComm(sys::ncclComm_t);
// SAFETY: an NCCL communicator is not tied to the thread that made it; the engine is
// `&mut` for every call, so it is never used by two threads at once.
unsafe impl Send for RawComm {}

pub struct NcclCollective {
    tcp: TcpCollective,
    comm: RawComm,
    /// The staging stream and buffer of host values.
    stream: Arc<CudaStream>,
    dev: CudaSlice<f32>,
    ordinal: usize,
    timeout: Duration,
    /// Set once the communicator was aborted: nothing more may use it.
    aborted: bool,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("NCCL {what} failed: {e:?}")
}

impl NcclCollective {
    /// Joins the run: TCP rendezvous, then the NCCL communicator on GPU `ordinal` (the
    /// training backend's when it is on a GPU, else the local rank's).
    pub fn join(launch: &Launch, me: &Identity, t: Timeouts, ordinal: usize, say: &dyn Fn(&str)) -> Result<NcclCollective> {
        nccl_available()?;
        let mut tcp = TcpCollective::join(launch, me, t, say)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let stream = ctx.new_stream().map_err(|e| anyhow!("CUDA stream on device {ordinal}: {e:?}"))?;
        let mut id_bytes = if launch.rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        tcp.broadcast_bytes(&mut id_bytes).context("sharing the NCCL unique id")?;
        if id_bytes.len() != 128 {
            bail!("NCCL unique id from rank 0 has {} bytes, 128 expected", id_bytes.len());
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is written by NCCL; the id is the one rank 0 created; the device's
        // context is current on this thread (CudaContext::new binds it).
        unsafe { nccl::comm_init_rank(&mut comm, launch.world as i32, id, launch.rank as i32) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        say(&format!("NCCL communicator ready: rank {} of {} on GPU {ordinal}", launch.rank, launch.world));
        let dev = stream.alloc_zeros::<f32>(CHUNK).map_err(|e| anyhow!("allocating the NCCL staging buffer: {e:?}"))?;
        Ok(NcclCollective { tcp, comm: RawComm(comm), stream, dev, ordinal, timeout: t.io, aborted: false })
    }

    fn usable(&self) -> Result<()> {
        if self.aborted {
            bail!("the NCCL communicator was aborted after an earlier timeout");
        }
        Ok(())
    }

    /// Waits for `stream`'s queued work (the collective just enqueued) up to the timeout;
    /// past it: aborts the communicator and names the missing rank (TCP barrier) if it can.
    fn wait(&mut self, stream: dsys::CUstream, what: &str) -> Result<()> {
        let t0 = Instant::now();
        let mut nap = Duration::from_micros(20);
        loop {
            // SAFETY: a live stream of this process's context.
            let r = unsafe { dsys::cuStreamQuery(stream) };
            match r {
                dsys::CUresult::CUDA_SUCCESS => return Ok(()),
                dsys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => bail!("CUDA stream while waiting for NCCL {what}: {e:?}"),
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; NCCL writes the status.
            unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_err) };
            if async_err != sys::ncclResult_t::ncclSuccess && async_err != sys::ncclResult_t::ncclInProgress {
                self.abort_comm();
                bail!("NCCL {what} failed on GPU {}: {async_err:?}", self.ordinal);
            }
            if t0.elapsed() > self.timeout {
                self.abort_comm();
                let who = match self.tcp.barrier() {
                    Err(e) => format!("{e:#}"),
                    Ok(()) => "every rank answered over TCP: NCCL itself hung (NCCL_DEBUG=INFO tells more)".into(),
                };
                bail!(
                    "NCCL {what} did not finish within {:.0} s (--dist-timeout) on GPU {}: {who}",
                    self.timeout.as_secs_f64(),
                    self.ordinal
                );
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }

    fn abort_comm(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: a live communicator, not used after this.
            let _ = unsafe { nccl::comm_abort(self.comm.0) };
        }
    }

    /// Each chunk of `buf`: to the GPU, `op` on its device pointer there, back to the host.
    fn staged(
        &mut self,
        buf: &mut [f32],
        what: &str,
        op: impl Fn(sys::ncclComm_t, *mut c_void, usize, sys::cudaStream_t) -> Result<()>,
    ) -> Result<()> {
        self.usable()?;
        for chunk in buf.chunks_mut(CHUNK) {
            let n = chunk.len();
            let stream = self.stream.clone();
            let mut view = self.dev.slice_mut(0..n);
            stream.memcpy_htod(chunk, &mut view).map_err(|e| anyhow!("copy to the GPU: {e:?}"))?;
            {
                let (ptr, _record) = view.device_ptr_mut(&stream);
                op(self.comm.0, ptr as *mut c_void, n, stream.cu_stream() as sys::cudaStream_t)?;
            }
            self.wait(stream.cu_stream(), what)?;
            let view = self.dev.slice(0..n);
            stream.memcpy_dtoh(&view, chunk).map_err(|e| anyhow!("copy from the GPU: {e:?}"))?;
            stream.synchronize().map_err(|e| anyhow!("CUDA stream: {e:?}"))?;
        }
        Ok(())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: a live communicator, not used after this.
            let _ = unsafe { nccl::comm_destroy(self.comm.0) };
        }
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
        self.staged(buf, "all-reduce", |comm, p, n, s| {
            // SAFETY: `p` holds `n` f32 on the communicator's device; in place.
            unsafe { nccl::all_reduce(p, p, n, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, comm, s) }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclAllReduce", e))
        })
    }

    fn broadcast_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.staged(buf, "broadcast", |comm, p, n, s| {
            // SAFETY: as above; rank 0's values replace the others'.
            unsafe { nccl::broadcast(p, p, n, sys::ncclDataType_t::ncclFloat32, 0, comm, s) }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclBroadcast", e))
        })
    }

    fn all_reduce_buffers(&mut self, bufs: &mut [&mut dyn std::any::Any]) -> Option<Result<()>> {
        let mut parts = Vec::with_capacity(bufs.len());
        for b in bufs.iter_mut() {
            let d = b.downcast_mut::<demovlp_cuda::DevBuf>()?;
            if let Some(p) = d.raw_parts() {
                parts.push(p);
            }
        }
        Some(self.reduce_device(&parts))
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
        self.abort_comm();
        self.tcp.abort(why)
    }
}

impl NcclCollective {
    /// One grouped in-place all-reduce of the backend's buffers on the backend's stream.
    fn reduce_device(&mut self, parts: &[(u64, usize, dsys::CUstream, dsys::CUcontext)]) -> Result<()> {
        self.usable()?;
        let Some(&(_, _, stream, ctx)) = parts.first() else { return Ok(()) };
        if parts.iter().any(|p| p.2 != stream) {
            bail!("the gradient buffers live on different streams");
        }
        // SAFETY: the backend's context (the device's primary context, the one the
        // communicator was made on when the ordinals agree).
        unsafe { dsys::cuCtxSetCurrent(ctx) }.result().map_err(|e| anyhow!("cuCtxSetCurrent: {e:?}"))?;
        nccl::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let mut queued = Ok(());
        for &(ptr, len, _, _) in parts {
            // SAFETY: `ptr` holds `len` f32 on the backend's device, written by work queued on
            // `stream` before this call; in place, ordered after it on the same stream.
            let r = unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    len,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.0,
                    stream as sys::cudaStream_t,
                )
            };
            if let Err(e) = r {
                queued = Err(nccl_err("ncclAllReduce", e));
                break;
            }
        }
        let ended = nccl::group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
        queued?;
        ended?;
        self.wait(stream, "all-reduce of the gradients")
    }
}
