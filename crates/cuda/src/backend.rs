//! [`CudaBackend`]: the [`Backend`] trait on one NVIDIA GPU.
//!
//! - Buffers: raw device allocations ([`DevBuf`], stream-ordered `cuMemAllocAsync`), grown
//!   on demand and then reused (`fit` keeps the allocation), views are (pointer, length).
//! - GEMMs: cuBLAS (`cublasSgemm` in the fp32 parity mode, math mode `CUBLAS_DEFAULT_MATH`,
//!   i.e. TF32 off; `cublasGemmEx` with bf16 inputs, fp32 accumulation and fp32 outputs in
//!   the bf16 speed mode, the inputs converted per call into a scratch buffer).
//! - Every other kernel: the NVRTC-compiled sources of `kernels/*.cu`, one stream.
//! - On the host, through the seam: token ids and dropout masks (drawn with the given `Rng`,
//!   exactly the CPU's masks, then uploaded), the retrieval losses (the six embedding
//!   tensors are read back, `Cpu::losses` runs, the four gradients go up: a fused GPU loss is
//!   not written yet) and the QA cross-entropy (logits `[B, answers]` read back).
//!
//! Errors of the driver or cuBLAS in a kernel call panic with the call named (the trait's
//! methods return nothing); opening the device ([`CudaBackend::open`]) returns them.
//!
//! **Never run on a GPU yet**: this compiles and lints; its kernels compile with NVRTC for
//! sm_80/sm_90; `backend::check` against `Cpu` is what `scripts/gpu-check.sh` runs first.

use crate::libs::{self, Lib};
use crate::{nvrtc, DeviceInfo, Precision, SOURCES};
use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::{result as drv, sys};
use demovlp_kernels::attention::{AttnShape, KeyPattern};
use demovlp_kernels::Rng;
use demovlp_model::adamw::StepCoeffs;
use demovlp_model::backend::{host, Backend, Cpu, Grads, LossGradBufs, LossViews, TokenDims};
use demovlp_retrieval::{LossConfig, LossOutputs};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex};

const F: u64 = 4; // bytes per f32

/// Grow-only raw device scratch.
#[derive(Default)]
struct Raw {
    ptr: u64,
    bytes: usize,
}

#[derive(Default)]
struct Scratch {
    ids: Raw,
    rows: Raw,
    ds: Raw,
    a16: Raw,
    b16: Raw,
}

struct Inner {
    info: DeviceInfo,
    precision: Precision,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    blas: bsys::cublasHandle_t,
    funcs: HashMap<String, sys::CUfunction>,
    scratch: Mutex<Scratch>,
}

// SAFETY: the context, stream, handle and functions are driver objects usable from any
// thread once the context is made current (every call does `bind` first); the scratch is
// behind a mutex; work is serialised on the one stream.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

fn ck<T, E: fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA backend: {what} failed: {e:?}"))
}

impl Inner {
    fn bind(&self) {
        // SAFETY: a context retained in `open` and never released.
        ck(unsafe { drv::ctx::set_current(self.ctx) }, "cuCtxSetCurrent");
    }

    fn alloc(&self, bytes: usize) -> u64 {
        if bytes == 0 {
            return 0;
        }
        // SAFETY: a stream-ordered allocation on our stream.
        ck(unsafe { drv::malloc_async(self.stream, bytes) }, "cuMemAllocAsync")
    }

    fn free(&self, ptr: u64) {
        if ptr != 0 {
            // SAFETY: `ptr` came from `alloc` on this stream and is not used after.
            ck(unsafe { drv::free_async(ptr, self.stream) }, "cuMemFreeAsync");
        }
    }

    fn grow(&self, r: &mut Raw, bytes: usize) -> u64 {
        if r.bytes < bytes {
            self.free(r.ptr);
            r.ptr = self.alloc(bytes);
            r.bytes = bytes;
        }
        r.ptr
    }

    fn upload<T>(&self, dst: u64, src: &[T]) {
        if !src.is_empty() {
            // SAFETY: `dst` holds at least `src.len()` values (callers fit it first); a copy
            // from pageable memory has read `src` when the call returns.
            ck(unsafe { drv::memcpy_htod_async(dst, src, self.stream) }, "cuMemcpyHtoDAsync");
        }
    }

    fn download<T>(&self, dst: &mut [T], src: u64) {
        if !dst.is_empty() {
            // SAFETY: `src` holds `dst.len()` values; synchronised before `dst` is read.
            unsafe {
                ck(drv::memcpy_dtoh_async(dst, src, self.stream), "cuMemcpyDtoHAsync");
                ck(drv::stream::synchronize(self.stream), "cuStreamSynchronize");
            }
        }
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) {
        if bytes > 0 {
            // SAFETY: both ranges are live device memory of `bytes` bytes.
            ck(unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }, "cuMemcpyDtoDAsync");
        }
    }

    fn zero(&self, ptr: u64, n: usize) {
        if n > 0 {
            // SAFETY: `n` f32 values of live device memory.
            ck(unsafe { drv::memset_d8_async(ptr, 0, n * F as usize, self.stream) }, "cuMemsetD8Async");
        }
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32, args: &mut [*mut c_void]) {
        let f = *self.funcs.get(name).unwrap_or_else(|| panic!("CUDA backend: no kernel {name}"));
        // SAFETY: every argument points at a value of the kernel's parameter type (the
        // wrappers below pass u64 pointers, i64 `long long`, i32 `int`, f32 `float`).
        ck(unsafe { drv::launch_kernel(f, grid, block, shared, self.stream, args) }, name);
    }
}

/// Blocks of 256 threads for `n` elements (grid-stride loops cover the rest).
fn blocks(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1)
}
const T256: (u32, u32, u32) = (256, 1, 1);

/// Launches `$name` with the arguments' values (each must have the kernel parameter's type).
macro_rules! launch {
    ($be:expr, $name:literal, $grid:expr, $block:expr, $shared:expr; $($arg:expr),* $(,)?) => {
        $be.inner.launch($name, $grid, $block, $shared, &mut [$( &mut { $arg } as *mut _ as *mut c_void ),*])
    };
}

/// The CUDA backend: a cheap handle (its context, stream, cuBLAS handle and kernels are shared).
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBackend({} {}, sm_{}{}, {:?})",
            self.inner.info.ordinal, self.inner.info.name, self.inner.info.capability.0, self.inner.info.capability.1, self.inner.precision
        )
    }
}

impl Default for CudaBackend {
    /// GPU 0 in fp32; panics when there is none (use [`CudaBackend::open`] to get an error).
    fn default() -> Self {
        CudaBackend::open(0, Precision::Fp32).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`: the libraries (a message naming any missing one), the driver,
    /// the device, a stream, cuBLAS, and the kernels compiled for its architecture (or taken
    /// from the NVRTC cache).
    pub fn open(ordinal: usize, precision: Precision) -> Result<Self, String> {
        libs::require(&[Lib::Driver, Lib::Nvrtc, Lib::Cublas, Lib::CublasLt])?;
        let info = libs::probe(ordinal)?;
        let (major, minor) = info.capability;
        let arch = format!("sm_{major}{minor}");
        let dev = drv::device::get(ordinal as i32).map_err(|e| format!("{e:?}"))?;
        // SAFETY: driver calls on a valid device; the context stays retained for the process.
        let (ctx, stream) = unsafe {
            let ctx = drv::primary_ctx::retain(dev).map_err(|e| format!("cuDevicePrimaryCtxRetain: {e:?}"))?;
            drv::ctx::set_current(ctx).map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
            let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e:?}"))?;
            // Keep freed memory in the stream-ordered pool (the default threshold 0 hands it
            // back to the OS at every synchronisation): a steady stream of same-shaped
            // batches then allocates nothing new.
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            if sys::cuDeviceGetDefaultMemPool(&mut pool, dev).result().is_ok() {
                let mut keep = u64::MAX;
                let _ = sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut c_void,
                );
            }
            (ctx, stream)
        };
        let mut funcs = HashMap::new();
        for (name, src) in SOURCES {
            let (cubin, _cached) = nvrtc::cubin_cached(name, src, &arch)?;
            // SAFETY: a CUBIN NVRTC produced for this device's architecture; kept alive by the module.
            let module = unsafe { drv::module::load_data(cubin.as_ptr() as *const c_void) }
                .map_err(|e| format!("loading the {name} kernels for {arch}: {e:?}"))?;
            for k in crate::kernel_names(src) {
                // SAFETY: the module is loaded; the name is one of its kernels.
                let f = unsafe { drv::module::get_function(module, CString::new(k).unwrap()) }.map_err(|e| format!("kernel {k}: {e:?}"))?;
                funcs.insert(k.to_string(), f);
            }
        }
        let handle = blas::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?;
        // SAFETY: a live handle and stream.
        unsafe {
            blas::set_stream(handle, stream as bsys::cudaStream_t).map_err(|e| format!("cublasSetStream: {e:?}"))?;
            bsys::cublasSetMathMode(handle, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(|e| format!("cublasSetMathMode: {e:?}"))?;
        }
        let inner = Inner { info, precision, ctx, stream, blas: handle, funcs, scratch: Mutex::default() };
        Ok(CudaBackend { inner: Arc::new(inner) })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    pub fn precision(&self) -> Precision {
        self.inner.precision
    }

    /// Waits for every queued kernel (timings).
    pub fn synchronize(&self) {
        self.inner.bind();
        // SAFETY: our live stream.
        ck(unsafe { drv::stream::synchronize(self.inner.stream) }, "cuStreamSynchronize");
    }

    /// Column-major GEMM `C = op(A)·op(B) + beta·C` (`m × n`, inner `k`), fp32 or bf16 inputs
    /// as the precision says.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let inner = &self.inner;
        let op = |t: bool| if t { bsys::cublasOperation_t::CUBLAS_OP_T } else { bsys::cublasOperation_t::CUBLAS_OP_N };
        let alpha = 1.0f32;
        if k == 0 {
            // C = beta·C: only the zeroing case occurs (beta 0 or 1).
            if beta == 0.0 {
                for col in 0..n {
                    inner.zero(c + (col * ldc) as u64 * F, m);
                }
            }
            return;
        }
        match inner.precision {
            Precision::Fp32 => {
                // SAFETY: the matrices lie in live device memory of the sizes the leading
                // dimensions say (the trait's conventions).
                ck(
                    unsafe {
                        blas::sgemm(
                            inner.blas,
                            op(ta),
                            op(tb),
                            m as i32,
                            n as i32,
                            k as i32,
                            &alpha,
                            a as *const f32,
                            lda as i32,
                            b as *const f32,
                            ldb as i32,
                            &beta,
                            c as *mut f32,
                            ldc as i32,
                        )
                    },
                    "cublasSgemm",
                );
            }
            Precision::Bf16 => {
                // Stored shapes (inner, outer) of op(A) and op(B), packed to bf16.
                let (ai, ao) = if ta { (k, m) } else { (m, k) };
                let (bi, bo) = if tb { (n, k) } else { (k, n) };
                let mut s = inner.scratch.lock().unwrap();
                let a16 = inner.grow(&mut s.a16, ai * ao * 2);
                let b16 = inner.grow(&mut s.b16, bi * bo * 2);
                launch!(self, "to_bf16", blocks(ai * ao), T256, 0; a, lda as i64, a16, ao as i64, ai as i64);
                launch!(self, "to_bf16", blocks(bi * bo), T256, 0; b, ldb as i64, b16, bo as i64, bi as i64);
                // SAFETY: as above, the bf16 copies packed with leading dimensions ai, bi.
                ck(
                    unsafe {
                        blas::gemm_ex(
                            inner.blas,
                            op(ta),
                            op(tb),
                            m as i32,
                            n as i32,
                            k as i32,
                            &alpha as *const f32 as *const c_void,
                            a16 as *const c_void,
                            bsys::cudaDataType::CUDA_R_16BF,
                            ai as i32,
                            b16 as *const c_void,
                            bsys::cudaDataType::CUDA_R_16BF,
                            bi as i32,
                            &beta as *const f32 as *const c_void,
                            c as *mut c_void,
                            bsys::cudaDataType::CUDA_R_32F,
                            ldc as i32,
                            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                        )
                    },
                    "cublasGemmEx (bf16)",
                );
            }
        }
    }

    fn ids(&self, s: &mut Scratch, ids: &[i64]) -> u64 {
        let p = self.inner.grow(&mut s.ids, ids.len() * 8);
        self.inner.upload(p, ids);
        p
    }

    fn rows(&self, s: &mut Scratch, rows: &[i32]) -> u64 {
        let p = self.inner.grow(&mut s.rows, rows.len() * 4);
        self.inner.upload(p, rows);
        p
    }

    fn host_of(&self, v: DevView<'_>) -> Vec<f32> {
        let mut out = vec![0.0f32; v.len];
        self.inner.download(&mut out, v.ptr);
        out
    }

    fn buf_from(&self, host: &[f32]) -> DevBuf {
        let mut b = DevBuf::default();
        self.fit(&mut b, host.len());
        self.inner.upload(b.ptr, host);
        b
    }
}

/// An owned device buffer of f32 (empty by default; allocated by the backend's `fit`).
#[derive(Default)]
pub struct DevBuf {
    ptr: u64,
    len: usize,
    cap: usize,
    be: Option<Arc<Inner>>,
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
    ptr: u64,
    len: usize,
    _p: PhantomData<&'a f32>,
}

/// A mutable view: device pointer and length.
pub struct DevViewMut<'a> {
    ptr: u64,
    len: usize,
    _p: PhantomData<&'a mut f32>,
}

fn view<'a>(ptr: u64, len: usize) -> DevView<'a> {
    DevView { ptr, len, _p: PhantomData }
}
fn view_mut<'a>(ptr: u64, len: usize) -> DevViewMut<'a> {
    DevViewMut { ptr, len, _p: PhantomData }
}
fn at(ptr: u64, elems: usize) -> u64 {
    ptr + elems as u64 * F
}

fn regions_of(s: &AttnShape) -> i32 {
    match s.pattern {
        KeyPattern::Full => 0,
        KeyPattern::Frames { regions } => regions as i32,
    }
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_ptrs(
        &self,
        s: &AttnShape,
        scale: f32,
        [q, k, v]: [u64; 3],
        ld: usize,
        probs: DevView<'_>,
        drop: Option<DevView<'_>>,
        dout: DevView<'_>,
        ld_dout: usize,
        [dq, dk, dv]: [u64; 3],
        ld_d: usize,
    ) {
        self.inner.bind();
        let mut sc = self.inner.scratch.lock().unwrap();
        let ds = self.inner.grow(&mut sc.ds, s.probs_len() * F as usize);
        let grid = (s.seq as u32, s.heads as u32, s.batch as u32);
        let drop = drop.map_or(0, |d| d.ptr);
        launch!(self, "attention_backward_rows_ds", grid, (128, 1, 1), 0;
            s.seq as i32, s.heads as i32, s.head_dim as i32, regions_of(s), scale, k, v, ld as i64, probs.ptr, drop, dout.ptr, ld_dout as i64, ds, dq, ld_d as i64);
        launch!(self, "attention_backward_rows_dkv", grid, (64, 1, 1), 0;
            s.seq as i32, s.heads as i32, s.head_dim as i32, regions_of(s), q, ld as i64, probs.ptr, drop, dout.ptr, ld_dout as i64, ds, dk, dv, ld_d as i64);
    }
}

impl Backend for CudaBackend {
    type Buf = DevBuf;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;

    fn buf_len(b: &DevBuf) -> usize {
        b.len
    }
    fn view_len(v: DevView<'_>) -> usize {
        v.len
    }
    fn view_mut_len(v: &DevViewMut<'_>) -> usize {
        v.len
    }
    fn zeros(&self, n: usize) -> DevBuf {
        let mut b = DevBuf::default();
        self.fit(&mut b, n);
        self.inner.zero(b.ptr, n);
        b
    }
    fn fit(&self, b: &mut DevBuf, n: usize) {
        self.inner.bind();
        if b.be.is_none() {
            b.be = Some(self.inner.clone());
        }
        if n > b.cap {
            // Grow, keeping the values (as `Vec::resize` does), then reuse from here on.
            let ptr = self.inner.alloc(n * F as usize);
            self.inner.dtod(ptr, b.ptr, b.len * F as usize);
            self.inner.free(b.ptr);
            b.ptr = ptr;
            b.cap = n;
        }
        b.len = n;
    }
    fn view(b: &DevBuf) -> DevView<'_> {
        view(b.ptr, b.len)
    }
    fn view_mut(b: &mut DevBuf) -> DevViewMut<'_> {
        view_mut(b.ptr, b.len)
    }
    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a> {
        assert!(r.start <= r.end && r.end <= v.len, "slice {r:?} of {} values", v.len);
        view(at(v.ptr, r.start), r.len())
    }
    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a> {
        assert!(r.start <= r.end && r.end <= v.len, "slice {r:?} of {} values", v.len);
        view_mut(at(v.ptr, r.start), r.len())
    }
    fn reborrow<'b>(v: &'b mut DevViewMut<'_>) -> DevViewMut<'b> {
        view_mut(v.ptr, v.len)
    }
    fn as_view<'b>(v: &'b DevViewMut<'_>) -> DevView<'b> {
        view(v.ptr, v.len)
    }
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, at_: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        assert!(at_ <= v.len);
        (view_mut(v.ptr, at_), view_mut(at(v.ptr, at_), v.len - at_))
    }
    fn fill_zero(&self, v: DevViewMut<'_>) {
        self.inner.bind();
        self.inner.zero(v.ptr, v.len);
    }
    fn copy(&self, src: DevView<'_>, dst: DevViewMut<'_>) {
        assert_eq!(src.len, dst.len, "copy: lengths differ");
        self.inner.bind();
        self.inner.dtod(dst.ptr, src.ptr, src.len * F as usize);
    }
    fn copy_2d(&self, src: DevView<'_>, s0: usize, sld: usize, dst: DevViewMut<'_>, d0: usize, dld: usize, rows: usize, cols: usize) {
        if rows * cols == 0 {
            return;
        }
        assert!(s0 + (rows - 1) * sld + cols <= src.len && d0 + (rows - 1) * dld + cols <= dst.len, "copy_2d out of range");
        self.inner.bind();
        launch!(self, "copy_2d", blocks(rows * cols), T256, 0; at(src.ptr, s0), sld as i64, at(dst.ptr, d0), dld as i64, rows as i64, cols as i64);
    }

    fn input<'a>(&self, host: &'a [f32], staging: &'a mut DevBuf) -> DevView<'a> {
        self.fit(staging, host.len());
        self.inner.upload(staging.ptr, host);
        Self::view(staging)
    }
    fn write_host(&self, b: &mut DevBuf, n: usize, f: impl FnOnce(&mut [f32])) {
        let mut h = vec![0.0f32; n];
        f(&mut h);
        self.fit(b, n);
        self.inner.upload(b.ptr, &h);
    }
    fn modify_host(&self, b: &mut DevBuf, r: Range<usize>, f: impl FnOnce(&mut [f32])) {
        self.inner.bind();
        let v = Self::slice(Self::view(b), r);
        let mut h = self.host_of(v);
        f(&mut h);
        self.inner.upload(v.ptr, &h);
    }
    fn to_host(&self, v: DevView<'_>) -> Vec<f32> {
        self.inner.bind();
        self.host_of(v)
    }
    fn read_host<R>(&self, v: DevView<'_>, f: impl FnOnce(&[f32]) -> R) -> R {
        f(&self.to_host(v))
    }

    fn linear_forward(
        &self,
        x: DevView<'_>,
        ldx: usize,
        w: DevView<'_>,
        b: Option<DevView<'_>>,
        y: DevViewMut<'_>,
        n: usize,
        din: usize,
        dout: usize,
    ) {
        self.inner.bind();
        let beta = match b {
            Some(b) => {
                launch!(self, "set_rows", blocks(n * dout), T256, 0; y.ptr, b.ptr, (n * dout) as i64, dout as i64);
                1.0
            }
            None => 0.0,
        };
        // Row-major y = x·Wᵀ is column-major yᵀ = W(ᵀ of its column-major view)·xᵀ.
        self.gemm(true, false, dout, n, din, w.ptr, din, x.ptr, ldx, beta, y.ptr, dout);
    }
    fn linear_backward(
        &self,
        x: DevView<'_>,
        ldx: usize,
        w: DevView<'_>,
        dy: DevView<'_>,
        n: usize,
        din: usize,
        dout: usize,
        dx: Option<DevViewMut<'_>>,
        dw: DevViewMut<'_>,
        db: Option<DevViewMut<'_>>,
        grads: Grads,
    ) {
        self.inner.bind();
        if let Some(dx) = dx {
            self.gemm(false, false, din, n, dout, w.ptr, din, dy.ptr, dout, 1.0, dx.ptr, din);
        }
        let beta = if grads == Grads::Accumulate { 1.0 } else { 0.0 };
        self.gemm(false, true, din, dout, n, x.ptr, ldx, dy.ptr, dout, beta, dw.ptr, din);
        if let Some(db) = db {
            if grads == Grads::Overwrite {
                self.inner.zero(db.ptr, dout);
            }
            launch!(self, "sum_rows_into", blocks(dout), T256, 0; db.ptr, dy.ptr, dout as i64, n as i64);
        }
    }
    fn linear_backward_input(&self, dy: DevView<'_>, w: DevView<'_>, dx: DevViewMut<'_>, n: usize, din: usize, dout: usize) {
        self.inner.bind();
        self.gemm(false, false, din, n, dout, w.ptr, din, dy.ptr, dout, 0.0, dx.ptr, din);
    }
    fn layernorm_forward(
        &self,
        x: DevView<'_>,
        w: DevView<'_>,
        b: DevView<'_>,
        eps: f32,
        y: DevViewMut<'_>,
        mean: DevViewMut<'_>,
        rstd: DevViewMut<'_>,
        dim: usize,
    ) {
        let rows = x.len / dim;
        if rows == 0 {
            return;
        }
        self.inner.bind();
        launch!(self, "layernorm_forward", (rows as u32, 1, 1), T256, 0; x.ptr, w.ptr, b.ptr, eps, y.ptr, mean.ptr, rstd.ptr, rows as i64, dim as i32);
    }
    fn layernorm_backward(
        &self,
        x: DevView<'_>,
        w: DevView<'_>,
        mean: DevView<'_>,
        rstd: DevView<'_>,
        dy: DevView<'_>,
        dx: DevViewMut<'_>,
        dw: DevViewMut<'_>,
        db: DevViewMut<'_>,
        dim: usize,
    ) {
        let rows = x.len / dim;
        if rows == 0 {
            return;
        }
        self.inner.bind();
        launch!(self, "layernorm_backward_dx", (rows as u32, 1, 1), T256, 0; x.ptr, w.ptr, mean.ptr, rstd.ptr, dy.ptr, dx.ptr, rows as i64, dim as i32);
        launch!(self, "layernorm_backward_dwdb", (dim.div_ceil(128) as u32, 1, 1), (128, 1, 1), 0; x.ptr, mean.ptr, rstd.ptr, dy.ptr, dw.ptr, db.ptr, rows as i64, dim as i32);
    }

    fn gelu_forward(&self, x: DevView<'_>, y: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "gelu_forward", blocks(x.len), T256, 0; x.ptr, y.ptr, x.len as i64);
    }
    fn gelu_forward_with_grad(&self, x: DevView<'_>, y: DevViewMut<'_>, dydx: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "gelu_forward_with_grad", blocks(x.len), T256, 0; x.ptr, y.ptr, dydx.ptr, x.len as i64);
    }
    fn gelu_backward_in_place(&self, x: DevView<'_>, d: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "gelu_backward_in_place", blocks(x.len), T256, 0; x.ptr, d.ptr, x.len as i64);
    }
    fn relu_forward(&self, x: DevView<'_>, y: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "relu_forward", blocks(x.len), T256, 0; x.ptr, y.ptr, x.len as i64);
    }
    fn relu_backward(&self, x: DevView<'_>, dy: DevView<'_>, dx: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "relu_backward", blocks(x.len), T256, 0; x.ptr, dy.ptr, dx.ptr, x.len as i64);
    }
    fn mul_in_place(&self, x: DevViewMut<'_>, m: DevView<'_>) {
        self.inner.bind();
        launch!(self, "mul_in_place", blocks(x.len), T256, 0; x.ptr, m.ptr, x.len as i64);
    }
    fn add_in_place(&self, y: DevViewMut<'_>, x: DevView<'_>) {
        self.inner.bind();
        launch!(self, "add_in_place", blocks(y.len), T256, 0; y.ptr, x.ptr, y.len as i64);
    }
    fn add_to_rows(&self, y: DevViewMut<'_>, x: DevView<'_>) {
        self.inner.bind();
        launch!(self, "add_to_rows", blocks(y.len), T256, 0; y.ptr, x.ptr, y.len as i64, x.len as i64);
    }
    fn sum_rows_into(&self, acc: DevViewMut<'_>, x: DevView<'_>) {
        self.inner.bind();
        let rows = x.len / acc.len.max(1);
        launch!(self, "sum_rows_into", blocks(acc.len), T256, 0; acc.ptr, x.ptr, acc.len as i64, rows as i64);
    }
    fn masked<'a>(&self, x: DevView<'a>, mask: Option<DevView<'a>>, buf: &'a mut DevBuf) -> DevView<'a> {
        match mask {
            None => x,
            Some(m) => {
                self.fit(buf, x.len);
                launch!(self, "mul_into", blocks(x.len), T256, 0; x.ptr, m.ptr, buf.ptr, x.len as i64);
                Self::view(buf)
            }
        }
    }
    fn dropout_mask(&self, rng: &mut Rng, p: f32, b: &mut DevBuf, n: usize) {
        // Drawn on the host from the given generator: the CPU backend's masks, bit for bit.
        self.write_host(b, n, |h| demovlp_kernels::dropout::dropout_mask(rng, p, h));
    }

    fn attention_forward(
        &self,
        s: &AttnShape,
        scale: f32,
        q: DevView<'_>,
        k: DevView<'_>,
        v: DevView<'_>,
        ld: usize,
        mask: DevView<'_>,
        drop: Option<DevView<'_>>,
        probs: DevViewMut<'_>,
        out: DevViewMut<'_>,
    ) {
        self.inner.bind();
        let grid = (s.seq as u32, s.heads as u32, s.batch as u32);
        launch!(self, "attention_forward", grid, (128, 1, 1), (s.seq * 4) as u32;
            s.seq as i32, s.heads as i32, s.head_dim as i32, regions_of(s), scale, q.ptr, k.ptr, v.ptr, ld as i64, mask.ptr, drop.map_or(0, |d| d.ptr), probs.ptr, out.ptr);
    }
    fn attention_backward_rows(
        &self,
        s: &AttnShape,
        scale: f32,
        qkv: DevView<'_>,
        ld: usize,
        probs: DevView<'_>,
        drop: Option<DevView<'_>>,
        dout: DevView<'_>,
        ld_dout: usize,
        dqkv: DevViewMut<'_>,
        ld_dqkv: usize,
    ) {
        let d = s.heads * s.head_dim;
        let src = [qkv.ptr, at(qkv.ptr, d), at(qkv.ptr, 2 * d)];
        let dst = [dqkv.ptr, at(dqkv.ptr, d), at(dqkv.ptr, 2 * d)];
        self.attention_backward_ptrs(s, scale, src, ld, probs, drop, dout, ld_dout, dst, ld_dqkv);
    }
    fn attention_backward_rows_split(
        &self,
        s: &AttnShape,
        scale: f32,
        [q, k, v]: [DevView<'_>; 3],
        ld: usize,
        probs: DevView<'_>,
        drop: Option<DevView<'_>>,
        dout: DevView<'_>,
        ld_dout: usize,
        [dq, dk, dv]: [DevViewMut<'_>; 3],
        ld_d: usize,
    ) {
        self.attention_backward_ptrs(s, scale, [q.ptr, k.ptr, v.ptr], ld, probs, drop, dout, ld_dout, [dq.ptr, dk.ptr, dv.ptr], ld_d);
    }
    fn merge_heads(&self, src: DevView<'_>, dst: DevViewMut<'_>, ld: usize, batch: usize, heads: usize, seq: usize, hd: usize) {
        self.inner.bind();
        launch!(self, "merge_heads", blocks(batch * heads * seq * hd), T256, 0; src.ptr, dst.ptr, ld as i64, batch as i32, heads as i32, seq as i32, hd as i32);
    }

    fn embedding_forward(&self, ids: &[i64], table: DevView<'_>, dim: usize, out: DevViewMut<'_>) {
        let rows = table.len / dim.max(1);
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id as usize >= rows) {
            panic!("embedding: id {bad} outside a table of {rows} rows");
        }
        self.inner.bind();
        let mut s = self.inner.scratch.lock().unwrap();
        let p = self.ids(&mut s, ids);
        launch!(self, "embedding_forward", blocks(ids.len() * dim), T256, 0; p, ids.len() as i64, table.ptr, dim as i64, out.ptr);
    }
    fn embedding_backward(&self, ids: &[i64], dout: DevView<'_>, dim: usize, dtable: DevViewMut<'_>) {
        self.inner.bind();
        let mut s = self.inner.scratch.lock().unwrap();
        let p = self.ids(&mut s, ids);
        launch!(self, "embedding_backward", blocks(dim), T256, 0; p, ids.len() as i64, dout.ptr, dim as i64, dtable.ptr);
    }
    fn embedding_backward_rows(&self, ids: &[i64], skip: usize, rows: &[usize], dout: DevView<'_>, dim: usize, grad_rows: DevViewMut<'_>) {
        self.inner.bind();
        let row_of: Vec<i32> = ids
            .iter()
            .map(|&id| {
                if id as usize == skip {
                    -1
                } else {
                    rows.binary_search(&(id as usize)).expect("every id other than `skip` has a row") as i32
                }
            })
            .collect();
        self.inner.zero(grad_rows.ptr, grad_rows.len);
        let mut s = self.inner.scratch.lock().unwrap();
        let p = self.rows(&mut s, &row_of);
        launch!(self, "embedding_backward_rows", blocks(dim), T256, 0; p, ids.len() as i64, dout.ptr, dim as i64, grad_rows.ptr);
    }
    fn video_tokens_forward(
        &self,
        t: TokenDims,
        cls: DevView<'_>,
        pos0: DevView<'_>,
        temporal: DevView<'_>,
        region_emb: DevView<'_>,
        x: DevViewMut<'_>,
    ) {
        self.inner.bind();
        let n = t.batch * (1 + t.frames * t.regions) * t.dim;
        launch!(self, "video_tokens_forward", blocks(n), T256, 0;
            t.batch as i32, t.frames as i32, t.regions as i32, t.dim as i64, cls.ptr, pos0.ptr, temporal.ptr, region_emb.ptr, x.ptr);
    }
    fn video_tokens_backward(
        &self,
        t: TokenDims,
        dx: DevView<'_>,
        grad: DevViewMut<'_>,
        cls: Range<usize>,
        pos0: Range<usize>,
        temporal: Range<usize>,
        d_region: DevViewMut<'_>,
    ) {
        self.inner.bind();
        assert!(cls.end <= grad.len && pos0.end <= grad.len && temporal.end <= grad.len);
        launch!(self, "video_tokens_backward_params", blocks((1 + t.frames) * t.dim), T256, 0;
            t.batch as i32, t.frames as i32, t.regions as i32, t.dim as i64, dx.ptr, at(grad.ptr, cls.start), at(grad.ptr, pos0.start), at(grad.ptr, temporal.start));
        launch!(self, "video_tokens_backward_regions", blocks(t.batch * t.frames * t.regions * t.dim), T256, 0;
            t.batch as i32, t.frames as i32, t.regions as i32, t.dim as i64, dx.ptr, d_region.ptr);
    }

    fn max_over_positions(&self, x: DevView<'_>, arg: DevViewMut<'_>, out: DevViewMut<'_>, batch: usize, len: usize, dim: usize) {
        self.inner.bind();
        launch!(self, "max_over_positions", blocks(batch * dim), T256, 0; x.ptr, arg.ptr, out.ptr, batch as i32, len as i32, dim as i32);
    }
    fn max_over_positions_backward(&self, dout: DevView<'_>, arg: DevView<'_>, dx: DevViewMut<'_>, batch: usize, len: usize, dim: usize) {
        self.inner.bind();
        self.inner.zero(dx.ptr, dx.len);
        launch!(self, "max_over_positions_backward", blocks(batch * dim), T256, 0; dout.ptr, arg.ptr, dx.ptr, batch as i32, len as i32, dim as i32);
    }
    fn weight_norm(&self, g: DevView<'_>, v: DevView<'_>, w: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "weight_norm", (1, 1, 1), T256, 0; g.ptr, v.ptr, w.ptr, v.len as i64);
    }
    fn weight_norm_backward(&self, g: DevView<'_>, v: DevView<'_>, dw: DevView<'_>, dg: DevViewMut<'_>, dv: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "weight_norm_backward", (1, 1, 1), T256, 0; g.ptr, v.ptr, dw.ptr, dg.ptr, dv.ptr, v.len as i64);
    }
    fn mul_broadcast(&self, x: DevView<'_>, y: DevView<'_>, out: DevViewMut<'_>, batch: usize, n: usize, h: usize) {
        self.inner.bind();
        launch!(self, "mul_broadcast", blocks(batch * n * h), T256, 0; x.ptr, y.ptr, out.ptr, batch as i32, n as i32, h as i32);
    }
    fn mul_broadcast_backward(
        &self,
        x: DevView<'_>,
        y: DevView<'_>,
        dout: DevView<'_>,
        dx: DevViewMut<'_>,
        dy: DevViewMut<'_>,
        batch: usize,
        n: usize,
        h: usize,
    ) {
        self.inner.bind();
        launch!(self, "mul_broadcast_backward", blocks(batch * h), T256, 0; x.ptr, y.ptr, dout.ptr, dx.ptr, dy.ptr, batch as i32, n as i32, h as i32);
    }
    fn softmax_rows(&self, x: DevView<'_>, y: DevViewMut<'_>, n: usize) {
        self.inner.bind();
        let rows = x.len / n.max(1);
        launch!(self, "softmax_rows", blocks(rows), T256, 0; x.ptr, y.ptr, rows as i64, n as i32);
    }
    fn softmax_rows_backward(&self, y: DevView<'_>, dy: DevView<'_>, dx: DevViewMut<'_>, n: usize) {
        self.inner.bind();
        let rows = y.len / n.max(1);
        launch!(self, "softmax_rows_backward", blocks(rows), T256, 0; y.ptr, dy.ptr, dx.ptr, rows as i64, n as i32);
    }
    fn weighted_sum(&self, w: DevView<'_>, o: DevView<'_>, out: DevViewMut<'_>, batch: usize, n: usize, dim: usize) {
        self.inner.bind();
        launch!(self, "weighted_sum", blocks(batch * dim), T256, 0; w.ptr, o.ptr, out.ptr, batch as i32, n as i32, dim as i32);
    }
    fn weighted_sum_backward(
        &self,
        w: DevView<'_>,
        o: DevView<'_>,
        dout: DevView<'_>,
        dw: DevViewMut<'_>,
        d_o: DevViewMut<'_>,
        batch: usize,
        n: usize,
        dim: usize,
    ) {
        self.inner.bind();
        launch!(self, "weighted_sum_backward_w", blocks(batch * n), T256, 0; o.ptr, dout.ptr, dw.ptr, batch as i32, n as i32, dim as i32);
        launch!(self, "weighted_sum_backward_o", blocks(batch * n * dim), T256, 0; w.ptr, dout.ptr, d_o.ptr, batch as i32, n as i32, dim as i32);
    }
    fn cross_entropy(&self, logits: DevView<'_>, labels: &[usize], answers: usize, d: &mut DevBuf) -> f32 {
        // On the host: [B, answers] values, once per step.
        let l = self.to_host(logits);
        let mut dh = vec![0.0f32; labels.len() * answers];
        let loss = host::cross_entropy(&l, labels, answers, &mut dh);
        self.fit(d, dh.len());
        self.inner.upload(d.ptr, &dh);
        loss
    }

    fn losses(&self, cfg: &LossConfig, x: &LossViews<'_, Self>, use_local: bool, grads: bool) -> (LossOutputs, Option<LossGradBufs<Self>>) {
        // On the host through the seam (a fused GPU loss is not written yet): the embeddings
        // go down once, the four gradients come back up.
        let h = |v: DevView<'_>| self.to_host(v);
        let (gt, gv, lt, lv, tm, vm) =
            (h(x.global_text), h(x.global_video), h(x.local_text), h(x.local_video), h(x.text_mask), h(x.video_mask));
        let v = LossViews::<Cpu> {
            dims: x.dims,
            global_text: &gt,
            global_video: &gv,
            local_text: &lt,
            local_video: &lv,
            text_mask: &tm,
            video_mask: &vm,
        };
        let (out, g) = Cpu.losses(cfg, &v, use_local, grads);
        let g = g.map(|g| LossGradBufs {
            global_text: self.buf_from(&g.global_text),
            global_video: self.buf_from(&g.global_video),
            local_text: self.buf_from(&g.local_text),
            local_video: self.buf_from(&g.local_video),
        });
        (out, g)
    }

    fn adamw_update(&self, c: &StepCoeffs, p: DevViewMut<'_>, g: DevView<'_>, m: DevViewMut<'_>, v: DevViewMut<'_>) {
        self.inner.bind();
        launch!(self, "adamw_update", blocks(g.len), T256, 0; p.ptr, g.ptr, m.ptr, v.ptr, g.len as i64, c.step_size, c.decay, c.beta1, c.beta2, c.eps);
    }
    fn adamw_update_table_rows(
        &self,
        c: &StepCoeffs,
        p: DevViewMut<'_>,
        m: DevViewMut<'_>,
        v: DevViewMut<'_>,
        dim: usize,
        ids: &[usize],
        grad_rows: DevView<'_>,
    ) {
        self.inner.bind();
        let rows = p.len / dim;
        let mut row_of = vec![-1i32; rows];
        for (i, &id) in ids.iter().enumerate() {
            row_of[id] = i as i32;
        }
        let mut s = self.inner.scratch.lock().unwrap();
        let rows_p = self.rows(&mut s, &row_of);
        launch!(self, "adamw_update_table_rows", blocks(p.len), T256, 0;
            p.ptr, m.ptr, v.ptr, rows as i64, dim as i64, rows_p, grad_rows.ptr, c.step_size, c.decay, c.beta1, c.beta2, c.eps);
    }
}

#[cfg(test)]
mod tests {
    //! Without a GPU the launches cannot run; this checks every `launch!` against the kernel
    //! it names: same number of arguments, and each argument's type (from its spelling: a
    //! pointer `.ptr`/`at(..)`/a pointer local, `as i64` = `long long`, `as i32` = `int`, the
    //! f32 names) the kernel parameter's.
    use std::collections::HashMap;

    #[derive(Debug, PartialEq, Clone, Copy)]
    enum Ty {
        Ptr,
        I64,
        I32,
        F32,
    }

    fn split_top(s: &str) -> Vec<String> {
        let (mut out, mut depth, mut cur) = (Vec::new(), 0i32, String::new());
        for ch in s.chars() {
            match ch {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                _ => {}
            }
            if ch == ',' && depth == 0 {
                out.push(cur.trim().to_string());
                cur.clear();
            } else {
                cur.push(ch);
            }
        }
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_string());
        }
        out
    }

    fn kernel_params() -> HashMap<String, Vec<Ty>> {
        let mut m = HashMap::new();
        for (_, src) in crate::SOURCES {
            let mut rest = *src;
            while let Some(i) = rest.find("__global__ void ") {
                rest = &rest[i + "__global__ void ".len()..];
                let open = rest.find('(').unwrap();
                let close = rest.find(')').unwrap();
                let name = rest[..open].trim().to_string();
                let tys = rest[open + 1..close]
                    .split(',')
                    .map(|p| {
                        let p = p.trim();
                        if p.contains('*') {
                            Ty::Ptr
                        } else if p.starts_with("long long") {
                            Ty::I64
                        } else if p.starts_with("int ") {
                            Ty::I32
                        } else if p.starts_with("float ") {
                            Ty::F32
                        } else {
                            panic!("{name}: parameter type of {p:?}")
                        }
                    })
                    .collect();
                m.insert(name, tys);
            }
        }
        m
    }

    fn arg_ty(a: &str) -> Option<Ty> {
        let a = a.trim();
        if a.ends_with("as i64") {
            Some(Ty::I64)
        } else if a.ends_with("as i32") || a.starts_with("regions_of(") {
            Some(Ty::I32)
        } else if a.contains(".ptr")
            || a.starts_with("at(")
            || ["a", "b", "a16", "b16", "p", "ds", "drop", "q", "k", "v", "dq", "dk", "dv", "rows_p"].contains(&a)
        {
            Some(Ty::Ptr)
        } else if ["scale", "eps"].contains(&a) || a.starts_with("c.") {
            Some(Ty::F32)
        } else {
            None
        }
    }

    #[test]
    fn every_launch_matches_its_kernel_signature() {
        let params = kernel_params();
        let src = include_str!("backend.rs");
        let body = &src[..src.find("#[cfg(test)]").unwrap()];
        let mut checked = 0;
        let mut rest = body;
        while let Some(i) = rest.find("launch!(self, \"") {
            rest = &rest[i + "launch!(self, \"".len()..];
            let name = &rest[..rest.find('"').unwrap()];
            let semi = rest.find(';').unwrap();
            let end = rest.find(");").unwrap();
            let args = split_top(&rest[semi + 1..end]);
            let want = params.get(name).unwrap_or_else(|| panic!("launch of unknown kernel {name}"));
            assert_eq!(args.len(), want.len(), "{name}: {} arguments, the kernel takes {}: {args:?}", args.len(), want.len());
            for (k, (a, w)) in args.iter().zip(want).enumerate() {
                let got = arg_ty(a).unwrap_or_else(|| panic!("{name}: cannot tell the type of argument {k} `{a}`"));
                assert_eq!(got, *w, "{name}: argument {k} `{a}`");
            }
            checked += 1;
        }
        assert!(checked >= 40, "only {checked} launches found");
        // Every kernel is launched somewhere.
        for k in params.keys() {
            assert!(body.contains(&format!("\"{k}\"")), "kernel {k} is never launched");
        }
    }
}
