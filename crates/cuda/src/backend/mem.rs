//! The backend's device state (context, stream, cuBLAS handle, kernels, scratch) and its
//! buffers and views: raw stream-ordered allocations, (pointer, length) views.

use crate::{DeviceInfo, Precision};
use cudarc::cublas::sys as bsys;
use cudarc::driver::{result as drv, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
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
    pub(super) funcs: HashMap<String, sys::CUfunction>,
    /// The dropout kernel's jump matrices (`crate::plan::jump_table`, 512 KiB), uploaded once.
    pub(super) jumps: u64,
    pub(super) scratch: Mutex<Scratch>,
    /// The losses' and evaluation scores' scratch (its own lock: they call `gemm`, which
    /// takes `scratch`'s).
    pub(super) losses: Mutex<super::losses::LossScratch>,
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
    pub(super) fn bind(&self) {
        // SAFETY: a context retained in `open` and never released.
        ck(unsafe { drv::ctx::set_current(self.ctx) }, "cuCtxSetCurrent");
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
                ck(drv::memcpy_dtoh_async(dst, src, self.stream), "cuMemcpyDtoHAsync");
                ck(drv::stream::synchronize(self.stream), "cuStreamSynchronize");
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

    pub(super) fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32, args: &mut [*mut c_void]) {
        let f = *self.funcs.get(name).unwrap_or_else(|| panic!("CUDA backend: no kernel {name}"));
        // SAFETY: every argument points at a value of the kernel's parameter type (the
        // wrappers below pass u64 pointers, i64 `long long`, i32 `int`, f32 `float`).
        ck(unsafe { drv::launch_kernel(f, grid, block, shared, self.stream, args) }, name);
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
    fn drop(&mut self) {
        if let Some(be) = &self.be {
            be.bind();
            be.free(self.ptr);
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

/// A mutable view: device pointer and length.
pub struct DevViewMut<'a> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    _p: PhantomData<&'a mut f32>,
}

pub(super) fn view<'a>(ptr: u64, len: usize) -> DevView<'a> {
    DevView { ptr, len, _p: PhantomData }
}
pub(super) fn view_mut<'a>(ptr: u64, len: usize) -> DevViewMut<'a> {
    DevViewMut { ptr, len, _p: PhantomData }
}
pub(super) fn at(ptr: u64, elems: usize) -> u64 {
    ptr + elems as u64 * F
}
