//! Transfers that overlap the device's work, in pinned (page-locked) host memory, which the
//! copy engines read and write directly so that a copy is asynchronous for the host:
//!
//! - **Batch uploads** ([`Backend::input_batch`]): the host values are copied into the
//!   pinned memory of the staging buffer they go to, then uploaded on a second stream (the
//!   copy stream) that first waits until the compute stream is done with that buffer — the
//!   batch before the previous one used it, consecutive batches alternating between the two
//!   buffers of a [`StagingPair`] — and the compute stream waits for the upload (an event)
//!   before the batch's kernels. So the upload of batch s + 1 runs while batch s computes.
//! - **Late reads** ([`Backend::read_late`]): a device→host copy into a pinned slot queued
//!   on the compute stream and an event recorded after it; [`LateRead::wait`] waits for that
//!   event only (not for work queued later, e.g. the next training step).
//!
//! Events and pinned memory are created on first use and kept for the process (per staging
//! buffer, by device address; the read slots are reused).

use super::mem::{ck, view, Inner, F};
use super::CudaBackend;
use cudarc::driver::{result as drv, sys};
use demovlp_model::backend::{Backend, LateRead, StagingPair};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// Pinned host memory of `cap` f32 values.
struct Pinned {
    ptr: *mut f32,
    cap: usize,
}

impl Pinned {
    const EMPTY: Pinned = Pinned { ptr: std::ptr::null_mut(), cap: 0 };

    /// At least `n` values (the old ones are not kept). `pending` is an event after the
    /// last copy that used the memory: waited for before the memory is freed.
    fn fit(&mut self, n: usize, pending: sys::CUevent) {
        if n <= self.cap {
            return;
        }
        // SAFETY: `pending` is a live event; the old memory came from `malloc_host` and no
        // copy uses it once the event has completed; the new allocation is `n` f32 values.
        unsafe {
            if !self.ptr.is_null() {
                ck(drv::event::synchronize(pending), "cuEventSynchronize (pinned memory reuse)");
                ck(drv::free_host(self.ptr as *mut c_void), "cuMemFreeHost");
            }
            self.ptr = ck(drv::malloc_host(n * F as usize, 0), "cuMemHostAlloc") as *mut f32;
        }
        self.cap = n;
    }

    /// The first `n` values (`n` ≤ `cap`).
    fn slice_mut(&mut self, n: usize) -> &mut [f32] {
        assert!(n <= self.cap);
        if n == 0 {
            return &mut [];
        }
        // SAFETY: `ptr` holds `cap` ≥ `n` values, owned by this struct.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n) }
    }
}

fn event() -> sys::CUevent {
    ck(drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING), "cuEventCreate")
}

/// One staging buffer's uploads.
struct Upload {
    host: Pinned,
    /// Recorded on the copy stream after the buffer's last upload.
    uploaded: sys::CUevent,
    /// Recorded on the compute stream once the buffer's last batch was queued (at the next
    /// batch's upload into the other buffer of its pair): the buffer may be overwritten after it.
    free: sys::CUevent,
    free_recorded: bool,
}

/// A late read's pinned slot.
struct ReadSlot {
    host: Pinned,
    done: sys::CUevent,
    busy: bool,
}

/// The backend's transfer state (behind a lock in [`Inner`]).
#[derive(Default)]
pub(crate) struct Transfers {
    /// The copy stream (created on the first batch upload; null before).
    copy: Option<sys::CUstream>,
    /// By the staging buffer's device address.
    uploads: HashMap<u64, Upload>,
    reads: Vec<ReadSlot>,
}

impl CudaBackend {
    /// [`Backend::input_batch`]: see the module docs.
    pub(super) fn upload_batch<'a>(&self, host: &'a [f32], pair: &'a mut StagingPair<Self>) -> super::DevView<'a> {
        let inner = &*self.inner;
        inner.bind();
        let (buf, other) = pair.advance();
        let old = buf.ptr;
        self.fit(buf, host.len());
        let mut guard = crate::lock(&inner.transfers);
        let t = &mut *guard;
        let copy =
            *t.copy.get_or_insert_with(|| ck(drv::stream::create(drv::stream::StreamKind::NonBlocking), "cuStreamCreate (copy stream)"));
        if old != buf.ptr {
            // Reallocated: the old address's pinned memory and events go with it.
            if let Some(u) = t.uploads.remove(&old) {
                release(u);
            }
        }
        // The other buffer (the previous batch's, all of whose work is queued by now) is
        // free once the compute stream gets here.
        if other.ptr != 0 {
            let o = t.uploads.entry(other.ptr).or_insert_with(new_upload);
            // SAFETY: live event and stream.
            ck(unsafe { drv::event::record(o.free, inner.stream) }, "cuEventRecord");
            o.free_recorded = true;
        }
        let n = host.len();
        if n > 0 {
            let u = t.uploads.entry(buf.ptr).or_insert_with(new_upload);
            // This buffer is free after its own `free` event (the batch before the previous
            // one); a new allocation (made on the compute stream) after what is queued now.
            if !u.free_recorded || old != buf.ptr {
                // SAFETY: live event and stream.
                ck(unsafe { drv::event::record(u.free, inner.stream) }, "cuEventRecord");
            }
            // SAFETY: live events and streams; the pinned memory is not read by a copy once
            // `uploaded` has completed (waited for before it is written); `buf` holds `n` values.
            unsafe {
                ck(drv::event::synchronize(u.uploaded), "cuEventSynchronize (pinned upload buffer)");
                u.host.fit(n, u.uploaded);
                u.host.slice_mut(n).copy_from_slice(host);
                ck(
                    drv::stream::wait_event(copy, u.free, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT),
                    "cuStreamWaitEvent (copy stream)",
                );
                ck(drv::memcpy_htod_async(buf.ptr, u.host.slice_mut(n), copy), "cuMemcpyHtoDAsync (copy stream)");
                ck(drv::event::record(u.uploaded, copy), "cuEventRecord (copy stream)");
                ck(drv::stream::wait_event(inner.stream, u.uploaded, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT), "cuStreamWaitEvent");
            }
            u.free_recorded = false;
        }
        drop(guard);
        inner.checkpoint(&|| "the batch upload (copy stream)".to_string());
        view(buf.ptr, buf.len)
    }

    /// [`Backend::read_late`]: see the module docs.
    pub(super) fn queue_read(&self, v: super::DevView<'_>) -> LateRead {
        let inner = &self.inner;
        inner.bind();
        let n = v.len;
        let mut t = crate::lock(&inner.transfers);
        let idx = match t.reads.iter().position(|r| !r.busy) {
            Some(i) => i,
            None => {
                t.reads.push(ReadSlot { host: Pinned::EMPTY, done: event(), busy: false });
                t.reads.len() - 1
            }
        };
        let slot = &mut t.reads[idx];
        slot.host.fit(n.max(1), slot.done);
        // SAFETY: `v` holds `n` values; the slot's memory is read on the host only after
        // `done` (recorded behind the copy) has completed; live event and stream.
        unsafe {
            if n > 0 {
                if let Err(e) = drv::memcpy_dtoh_async(slot.host.slice_mut(n), v.ptr, inner.stream) {
                    panic!("CUDA backend: cuMemcpyDtoHAsync (late read) failed: {e:?}");
                }
            }
            ck(drv::event::record(slot.done, inner.stream), "cuEventRecord (late read)");
        }
        slot.busy = true;
        let pending = PendingRead { inner: inner.clone(), idx, host: slot.host.ptr, done: slot.done, n };
        drop(t);
        LateRead::pending(move || pending.wait())
    }
}

fn new_upload() -> Upload {
    Upload { host: Pinned::EMPTY, uploaded: event(), free: event(), free_recorded: false }
}

/// Frees an upload's pinned memory and events once its last upload is done (errors ignored:
/// the context may be gone).
fn release(u: Upload) {
    // SAFETY: live events; the memory came from `malloc_host` and no copy uses it after `uploaded`.
    unsafe {
        let _ = drv::event::synchronize(u.uploaded);
        if !u.host.ptr.is_null() {
            let _ = drv::free_host(u.host.ptr as *mut c_void);
        }
        let _ = drv::event::destroy(u.uploaded);
        let _ = drv::event::destroy(u.free);
    }
}

/// A queued late read: its slot is given back when it is waited for or dropped.
struct PendingRead {
    inner: Arc<Inner>,
    idx: usize,
    host: *mut f32,
    done: sys::CUevent,
    n: usize,
}

// SAFETY: the pointers are the slot's pinned memory and event, owned by the backend's
// transfer state (kept for the process); the slot is not reused while this is alive.
unsafe impl Send for PendingRead {}

impl PendingRead {
    fn wait(self) -> Vec<f32> {
        self.inner.bind();
        // SAFETY: a live event; once it has completed the copy into `host` (n values) is done.
        unsafe {
            if let Err(e) = drv::event::synchronize(self.done) {
                panic!("CUDA backend: waiting for a late read failed: {e:?} (an earlier kernel's error: DEMOVLP_CUDA_SYNC=1 names it)");
            }
            if self.n == 0 {
                return Vec::new();
            }
            std::slice::from_raw_parts(self.host, self.n).to_vec()
        }
    }
}

impl Drop for PendingRead {
    /// Never panics.
    fn drop(&mut self) {
        if let Some(r) = crate::lock(&self.inner.transfers).reads.get_mut(self.idx) {
            r.busy = false;
        }
    }
}
