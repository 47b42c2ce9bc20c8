//! The backend's device state (context, stream, cuBLAS handle, kernels, scratch) and its
//! buffers and views: raw stream-ordered allocations, (pointer, length) views.

use crate::{DeviceInfo, Precision};
use cudarc::cublas::sys as bsys;
use cudarc::driver::{result as drv, sys};
use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub(super) const F: u64 = 4; // bytes per f32

/// Grow-only raw device scratch.
#[derive(Default)]
pub(super) struct Raw {
    pub(super) ptr: u64,
    pub(super) bytes: usize,
}

#[derive(Default)]
pub(super) struct Scratch {
    pub(super) ids: Raw,
    pub(super) rows: Raw,
    pub(super) ds: Raw,
    /// The column reductions' per-chunk partial sums (two sets: LayerNorm's dw and db).
    pub(super) partial: Raw,
    pub(super) partial2: Raw,
    pub(super) a16: Raw,
    pub(super) b16: Raw,
}

pub(super) struct Inner {
    pub(super) info: DeviceInfo,
    pub(super) precision: Precision,
    pub(super) ctx: sys::CUcontext,
    pub(super) stream: sys::CUstream,
    /// `None` when libcublas is not available (our tiled GEMM kernel runs instead).
    pub(super) blas: Option<bsys::cublasHandle_t>,
    /// cuBLASLt (the GEMMs' first choice) when its library is present.
    pub(super) lt: Option<super::lt::Lt>,
    /// The kernels, indexed as [`crate::KERNELS`] (resolved once, in `open`).
    pub(super) funcs: Vec<sys::CUfunction>,
    /// `DEMOVLP_CUDA_SYNC=1`: synchronise after every launch and GEMM, so an error names
    /// the kernel that caused it (slow; for diagnosis).
    pub(super) sync: bool,
    /// The last kernel queued (index into [`crate::KERNELS`]; `usize::MAX`: none yet): named
    /// by errors that surface later, asynchronously.
    pub(super) last: AtomicUsize,
    /// The sticky fault that made the context unusable, once seen.
    pub(super) dead: Mutex<Option<String>>,
    /// bf16 copies of weights (the bf16 mode's GEMM inputs), reused until their memory changes.
    pub(super) w16: Mutex<crate::weights16::Bf16Weights>,
    /// The dropout kernel's jump matrices (`crate::plan::jump_table`, 512 KiB), uploaded once.
    pub(super) jumps: u64,
    pub(super) scratch: Mutex<Scratch>,
    /// The losses' and evaluation scores' scratch (its own lock: they call `gemm`, which
    /// takes `scratch`'s).
    pub(super) losses: Mutex<super::losses::LossScratch>,
    /// Batch uploads on the copy stream and late reads (pinned memory, events).
    pub(super) transfers: Mutex<super::transfer::Transfers>,
    /// Linear layers' bias and bias gradient fused into their GEMMs as cuBLASLt epilogues
    /// (on by default in the bf16 mode, off in the fp32 parity mode; see `CudaBackend::set_epilogues`).
    pub(super) epilogues: AtomicBool,
    /// GEMMs run with an epilogue so far.
    pub(super) epilogue_gemms: AtomicU64,
}

// SAFETY: the context, stream, handle and functions are driver objects usable from any
// thread once the context is made current (every call does `bind` first); the scratch is
// behind a mutex; work is serialised on the one stream.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

pub(super) fn ck<T, E: fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA backend: {what} failed: {e:?}"))
}

impl Inner {
    /// Makes the context current on this thread when it is not already (in the steady state
    /// one `cuCtxSetCurrent` per thread; asking which context is current reads the driver's
    /// thread-local state, and stays right when other code, e.g. NCCL's, binds another).
    pub(super) fn bind(&self) {
        let mut cur: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: an out-parameter; the context was retained in `open` and never released.
        unsafe {
            if sys::cuCtxGetCurrent(&mut cur) != sys::CUresult::CUDA_SUCCESS || cur != self.ctx {
                ck(drv::ctx::set_current(self.ctx), "cuCtxSetCurrent");
            }
        }
    }

    /// `elems` f32 values at `ptr` may be written: their cached bf16 copies are stale.
    pub(super) fn invalidate16(&self, ptr: u64, elems: usize) {
        if self.precision == Precision::Bf16 && ptr != 0 {
            let mut w = crate::lock(&self.w16);
            if !w.is_empty() {
                w.invalidate(ptr, ptr + elems as u64 * F);
            }
        }
    }

    /// `elems` f32 values at `ptr` are freed: their cached bf16 copies go (never panics).
    pub(super) fn forget16(&self, ptr: u64, elems: usize) {
        if self.precision == Precision::Bf16 && ptr != 0 {
            let freed = crate::lock(&self.w16).remove(ptr, ptr + elems as u64 * F);
            for (slot, _) in freed {
                // SAFETY: a bf16 copy allocated on this stream, no longer referenced.
                let _ = unsafe { drv::free_async(slot, self.stream) };
            }
        }
    }

    /// The name of the last kernel queued (for errors that surface later).
    pub(super) fn last_kernel(&self) -> &'static str {
        crate::KERNELS.get(self.last.load(Ordering::Relaxed)).copied().unwrap_or("none")
    }

    /// What an asynchronous error may be blamed on.
    fn async_hint(&self) -> String {
        if self.sync {
            String::new()
        } else {
            format!(
                " (kernels run asynchronously: this may be an earlier kernel's error; the last one queued was {}; \
                 DEMOVLP_CUDA_SYNC=1 names the failing kernel)",
                self.last_kernel()
            )
        }
    }

    /// Waits for the stream; `Err` names the error and the likely kernel.
    pub(super) fn sync_stream(&self, after: &str) -> Result<(), String> {
        // SAFETY: our live stream.
        unsafe { drv::stream::synchronize(self.stream) }
            .map_err(|e| format!("cuStreamSynchronize after {after}: {e:?}{}", self.async_hint()))
    }

    /// With `DEMOVLP_CUDA_SYNC=1`: waits for `what` (a kernel or a GEMM) and panics naming it
    /// if it failed.
    pub(super) fn checkpoint(&self, what: &dyn Fn() -> String) {
        if self.sync {
            // SAFETY: our live stream.
            if let Err(e) = unsafe { drv::stream::synchronize(self.stream) } {
                panic!("CUDA backend: {} failed: {e:?}", what());
            }
        }
    }

    /// `Err` once the context is unusable: a sticky fault seen before, or an error the
    /// stream reports now (an asynchronous kernel error: illegal address, launch failure,
    /// trap, ...). Never panics.
    pub(super) fn fault(&self) -> Result<(), String> {
        if let Some(why) = crate::lock(&self.dead).clone() {
            return Err(why);
        }
        // SAFETY: a retained context; failures are reported, not unwrapped.
        if let Err(e) = unsafe { drv::ctx::set_current(self.ctx) } {
            return Err(format!("cuCtxSetCurrent: {e:?}"));
        }
        match self.sync_stream("the last call") {
            Ok(()) => Ok(()),
            Err(why) => {
                // An error the stream reports asynchronously is sticky in practice: the
                // context has to be recreated (by a new process).
                *crate::lock(&self.dead) = Some(why.clone());
                Err(why)
            }
        }
    }

    pub(super) fn alloc(&self, bytes: usize) -> u64 {
        if bytes == 0 {
            return 0;
        }
        // SAFETY: a stream-ordered allocation on our stream.
        ck(unsafe { drv::malloc_async(self.stream, bytes) }, "cuMemAllocAsync")
    }

    pub(super) fn free(&self, ptr: u64) {
        if ptr != 0 {
            // SAFETY: `ptr` came from `alloc` on this stream and is not used after.
            ck(unsafe { drv::free_async(ptr, self.stream) }, "cuMemFreeAsync");
        }
    }

    pub(super) fn grow(&self, r: &mut Raw, bytes: usize) -> u64 {
        if r.bytes < bytes {
            self.free(r.ptr);
            r.ptr = self.alloc(bytes);
            r.bytes = bytes;
        }
        r.ptr
    }

    pub(super) fn upload<T>(&self, dst: u64, src: &[T]) {
        if !src.is_empty() {
            // SAFETY: `dst` holds at least `src.len()` values (callers fit it first); a copy
            // from pageable memory has read `src` when the call returns.
            ck(unsafe { drv::memcpy_htod_async(dst, src, self.stream) }, "cuMemcpyHtoDAsync");
        }
    }

    pub(super) fn download<T>(&self, dst: &mut [T], src: u64) {
        if !dst.is_empty() {
            // SAFETY: `src` holds `dst.len()` values; synchronised before `dst` is read.
            unsafe {
                if let Err(e) = drv::memcpy_dtoh_async(dst, src, self.stream) {
                    panic!("CUDA backend: cuMemcpyDtoHAsync failed: {e:?}{}", self.async_hint());
                }
            }
            if let Err(e) = self.sync_stream("a read-back") {
                panic!("CUDA backend: {e}");
            }
        }
    }

    pub(super) fn dtod(&self, dst: u64, src: u64, bytes: usize) {
        if bytes > 0 {
            // SAFETY: both ranges are live device memory of `bytes` bytes.
            ck(unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }, "cuMemcpyDtoDAsync");
        }
    }

    pub(super) fn zero(&self, ptr: u64, n: usize) {
        if n > 0 {
            // SAFETY: `n` f32 values of live device memory.
            ck(unsafe { drv::memset_d8_async(ptr, 0, n * F as usize, self.stream) }, "cuMemsetD8Async");
        }
    }

    /// Launches kernel `k` (index into [`crate::KERNELS`]); a launch error names the kernel
    /// and its geometry.
    pub(super) fn launch(&self, k: usize, grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32, args: &mut [*mut c_void]) {
        let f = self.funcs[k];
        self.last.store(k, Ordering::Relaxed);
        let name = crate::KERNELS[k];
        // SAFETY: every argument points at a value of the kernel's parameter type (the
        // wrappers below pass u64 pointers, i64 `long long`, i32 `int`, f32 `float`).
        if let Err(e) = unsafe { drv::launch_kernel(f, grid, block, shared, self.stream, args) } {
            panic!("CUDA backend: launching {name} (grid {grid:?}, block {block:?}, {shared} B dynamic shared memory) failed: {e:?}");
        }
        self.checkpoint(&|| format!("kernel {name} (grid {grid:?}, block {block:?}, {shared} B dynamic shared memory)"));
    }
}

/// An owned device buffer of f32 (empty by default; allocated by the backend's `fit`).
#[derive(Default)]
pub struct DevBuf {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) cap: usize,
    pub(super) be: Option<Arc<Inner>>,
}

impl DevBuf {
    /// Its device address, its length (f32 values), and the stream and context of the
    /// backend that owns it (`None` while it holds nothing): what a library that works on
    /// the backend's own stream needs (NCCL's all-reduce of gradients).
    pub fn raw_parts(&self) -> Option<(u64, usize, sys::CUstream, sys::CUcontext)> {
        self.be.as_ref().map(|be| (self.ptr, self.len, be.stream, be.ctx))
    }
}

impl fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevBuf({} f32 at {:#x})", self.len, self.ptr)
    }
}

impl Clone for DevBuf {
    /// A deep copy on the device.
    fn clone(&self) -> Self {
        match &self.be {
            None => DevBuf::default(),
            Some(be) => {
                be.bind();
                let ptr = be.alloc(self.len * F as usize);
                be.dtod(ptr, self.ptr, self.len * F as usize);
                DevBuf { ptr, len: self.len, cap: self.len, be: Some(be.clone()) }
            }
        }
    }
}

impl Drop for DevBuf {
    /// Never panics (a panic here, while unwinding from a device error, would abort the
    /// process before anything is reported): after a fault the memory is left to the
    /// context's teardown.
    fn drop(&mut self) {
        let Some(be) = &self.be else { return };
        if self.ptr == 0 || crate::lock(&be.dead).is_some() {
            return;
        }
        // SAFETY: `ptr` came from `alloc` on this stream and is not used after; errors are
        // ignored (a failing free means the context is gone).
        unsafe {
            if drv::ctx::set_current(be.ctx).is_ok() {
                be.forget16(self.ptr, self.cap);
                let _ = drv::free_async(self.ptr, be.stream);
            }
        }
    }
}

/// A shared view: device pointer and length.
#[derive(Clone, Copy)]
pub struct DevView<'a> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    _p: PhantomData<&'a f32>,
}

/// A mutable view: device pointer and length (and the backend of its buffer, told when the
/// view is dropped: what was written through it may have been a weight with a bf16 copy).
pub struct DevViewMut<'a> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) be: Option<&'a Inner>,
    _p: PhantomData<&'a mut f32>,
}

impl Drop for DevViewMut<'_> {
    /// Never panics.
    fn drop(&mut self) {
        if let Some(be) = self.be {
            be.invalidate16(self.ptr, self.len);
        }
    }
}

pub(super) fn view<'a>(ptr: u64, len: usize) -> DevView<'a> {
    DevView { ptr, len, _p: PhantomData }
}
pub(super) fn view_mut(ptr: u64, len: usize, be: Option<&Inner>) -> DevViewMut<'_> {
    DevViewMut { ptr, len, be, _p: PhantomData }
}
pub(super) fn at(ptr: u64, elems: usize) -> u64 {
    ptr + elems as u64 * F
}
