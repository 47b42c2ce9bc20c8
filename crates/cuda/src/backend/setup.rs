//! Opening the device (libraries, context, stream, kernels from NVRTC, cuBLAS), the GEMM
//! in both precisions, and the helpers the kernel methods share.

use super::mem::{ck, Inner, Scratch, F};
use super::{blocks, CudaBackend, DevBuf, DevView, T256};
use crate::libs::{self, Lib};
use crate::{nvrtc, DeviceInfo, Precision, SOURCES};
use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::{result as drv, sys};
use demovlp_kernels::attention::{AttnShape, KeyPattern};
use demovlp_model::backend::Backend;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

impl CudaBackend {
    /// Opens GPU `ordinal`: the driver (a message naming any missing library), the device,
    /// a stream, cuBLAS when its libraries are present (else our tiled fp32 GEMM kernel;
    /// the bf16 mode needs cuBLAS), and the kernels compiled by NVRTC for its architecture
    /// (or from the NVRTC cache, or prebuilt CUBINs: [`nvrtc::cubin_for`]).
    pub fn open(ordinal: usize, precision: Precision) -> Result<Self, String> {
        libs::require(&[Lib::Driver])?;
        let have_blas = Lib::Cublas.present() && Lib::CublasLt.present();
        if !have_blas && precision == Precision::Bf16 {
            libs::require(&[Lib::Cublas, Lib::CublasLt]).map_err(|e| format!("--precision bf16 needs cuBLAS: {e}"))?;
        }
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
        // fp32 is the parity mode: no contraction of a·b + c (closer to the CPU's rounding);
        // the bf16 speed mode lets NVRTC fuse multiply-adds.
        let fmad = precision == Precision::Bf16;
        let mut found = HashMap::new();
        for (name, src) in SOURCES {
            let cubin = nvrtc::cubin_for(name, src, &arch, fmad)?;
            // SAFETY: a CUBIN NVRTC produced for this device's architecture; kept alive by the module.
            let module = unsafe { drv::module::load_data(cubin.as_ptr() as *const c_void) }
                .map_err(|e| format!("loading the {name} kernels for {arch}: {e:?}"))?;
            for k in crate::kernel_names(src) {
                // SAFETY: the module is loaded; the name is one of its kernels.
                let f = unsafe { drv::module::get_function(module, CString::new(k).unwrap()) }.map_err(|e| format!("kernel {k}: {e:?}"))?;
                found.insert(k, f);
            }
        }
        // Resolved once, in the order of crate::KERNELS (launches index it).
        let funcs = crate::KERNELS
            .iter()
            .map(|k| found.get(k).copied().ok_or_else(|| format!("kernel {k} is in no kernel source")))
            .collect::<Result<Vec<_>, _>>()?;
        let blas_handle = if have_blas {
            let handle = blas::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?;
            // SAFETY: a live handle and stream.
            unsafe {
                blas::set_stream(handle, stream as bsys::cudaStream_t).map_err(|e| format!("cublasSetStream: {e:?}"))?;
                bsys::cublasSetMathMode(handle, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                    .result()
                    .map_err(|e| format!("cublasSetMathMode: {e:?}"))?;
            }
            Some(handle)
        } else {
            eprintln!(
                "CUDA backend: libcublas/libcublasLt not found, GEMMs run on our tiled fp32 kernel (slower; {})",
                crate::LIBRARY_HINT
            );
            None
        };
        let table = crate::plan::jump_table();
        // SAFETY: a fresh allocation of the table's size on our stream; the synchronous copy
        // below has read `table` when it returns.
        let jumps = unsafe {
            let p = drv::malloc_async(stream, table.len() * 8).map_err(|e| format!("cuMemAllocAsync (dropout jump table): {e:?}"))?;
            drv::memcpy_htod_async(p, table, stream).map_err(|e| format!("uploading the dropout jump table: {e:?}"))?;
            drv::stream::synchronize(stream).map_err(|e| format!("cuStreamSynchronize: {e:?}"))?;
            p
        };
        // cuBLASLt for the GEMMs unless told otherwise; plain cuBLAS stays the fallback.
        let force_cublas = std::env::var("DEMOVLP_CUDA_GEMM").is_ok_and(|v| v == "cublas");
        let lt = if blas_handle.is_some() && !force_cublas {
            // SAFETY: a stream-ordered allocation on our stream, kept for the process.
            let ws = unsafe { drv::malloc_async(stream, super::lt::WORKSPACE_BYTES) }
                .map_err(|e| format!("cuMemAllocAsync (cuBLASLt workspace): {e:?}"))?;
            match super::lt::Lt::new(ws) {
                Ok(lt) => Some(lt),
                Err(e) => {
                    eprintln!("CUDA backend: {e}: GEMMs run on plain cuBLAS (cublasSgemm / cublasGemmEx)");
                    None
                }
            }
        } else {
            None
        };
        let inner = Inner {
            info,
            precision,
            ctx,
            stream,
            blas: blas_handle,
            lt,
            funcs,
            sync: std::env::var("DEMOVLP_CUDA_SYNC").is_ok_and(|v| v == "1"),
            last: AtomicUsize::new(usize::MAX),
            dead: Mutex::default(),
            w16: Mutex::default(),
            jumps,
            scratch: Mutex::default(),
            losses: Mutex::default(),
            transfers: Mutex::default(),
            // Epilogues may pick other algorithms (another summation order) than the plain
            // GEMM: the fp32 parity mode keeps the unfused kernels unless asked.
            epilogues: AtomicBool::new(precision == Precision::Bf16 && std::env::var("DEMOVLP_CUDA_EPILOGUES").map_or(true, |v| v != "0")),
            epilogue_gemms: AtomicU64::new(0),
        };
        Ok(CudaBackend { inner: Arc::new(inner) })
    }

    /// Fuse linear layers' bias (forward) and bias gradient (backward, when overwritten)
    /// into their GEMMs as cuBLASLt epilogues where it has an algorithm for them (else the
    /// unfused kernels run). Default: on in the bf16 mode (`DEMOVLP_CUDA_EPILOGUES=0` turns
    /// it off), off in fp32. For every clone of this backend.
    pub fn set_epilogues(&self, on: bool) {
        self.inner.epilogues.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether epilogues are used ([`CudaBackend::set_epilogues`]).
    pub fn epilogues(&self) -> bool {
        self.inner.epilogues.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// GEMMs that ran with a cuBLASLt epilogue so far.
    pub fn epilogue_gemms(&self) -> u64 {
        self.inner.epilogue_gemms.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    pub fn precision(&self) -> Precision {
        self.inner.precision
    }

    /// The GEMM library in use: `cublasLt` (plain cuBLAS for shapes it has no algorithm
    /// for), `cublas`, or `tiled` (our kernel, no cuBLAS at all).
    pub fn gemm_library(&self) -> &'static str {
        match (&self.inner.blas, &self.inner.lt) {
            (None, _) => "tiled",
            (Some(_), Some(_)) => "cublasLt",
            (Some(_), None) => "cublas",
        }
    }

    /// Waits for every queued kernel (timings).
    pub fn synchronize(&self) {
        self.inner.bind();
        if let Err(e) = self.inner.sync_stream("the queued work") {
            panic!("CUDA backend: {e}");
        }
    }

    /// `Err` once the device is unusable (a sticky fault: an illegal address, a launch
    /// failure, a trap): waits for the queued work and reports any error it ended with.
    /// Never panics. The selftest asks after every case.
    pub fn fault(&self) -> Result<(), String> {
        self.inner.fault()
    }

    /// Whether `DEMOVLP_CUDA_SYNC=1` is in effect (every launch synchronised and checked).
    pub fn synchronous(&self) -> bool {
        self.inner.sync
    }

    /// Column-major GEMM `C = op(A)·op(B) + beta·C` (`m × n`, inner `k`), fp32 or bf16 inputs
    /// as the precision says.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
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
        self.gemm_in(self.inner.precision, false, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc)
    }

    /// The bf16 copy of the weight `rows` × `cols` (rows `ld` apart) at `a`, packed with
    /// leading dimension `cols`: the cached one when current, else converted now.
    fn weight16(&self, a: u64, ld: usize, rows: usize, cols: usize) -> u64 {
        use crate::weights16::Lookup;
        let inner = &self.inner;
        let mut w = crate::lock(&inner.w16);
        let slot = match w.lookup(a, ld, rows, cols) {
            Lookup::Fresh(slot) => return slot,
            Lookup::Stale(slot, _) => {
                w.mark_fresh(a, ld, rows, cols);
                slot
            }
            Lookup::Missing => {
                let bytes = rows * cols * 2;
                let slot = inner.alloc(bytes);
                w.insert(a, ld, rows, cols, slot, bytes);
                slot
            }
        };
        launch!(self, "to_bf16", blocks(rows * cols), T256, 0; a, ld as i64, slot, rows as i64, cols as i64);
        slot
    }

    /// bf16 weight copies made (first use or after a change) and GEMMs that reused one.
    pub fn bf16_weight_stats(&self) -> (u64, u64) {
        let w = crate::lock(&self.inner.w16);
        (w.conversions, w.hits)
    }

    /// [`Self::gemm`] in the given precision (the losses and evaluation scores run theirs in
    /// fp32 whatever the backend's precision: fp32 statistics in the bf16 mode); `a_weight`:
    /// `A` is a weight, whose bf16 copy is cached (converted once per change of the weight,
    /// not per call: `crate::weights16`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_in(
        &self,
        precision: Precision,
        a_weight: bool,
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
        self.gemm_with(precision, a_weight, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc, None);
    }

    /// [`Self::gemm_in`] with a cuBLASLt epilogue (its vector at the address given): runs
    /// only when cuBLASLt has an algorithm for it, else returns `false` having done nothing
    /// the caller must undo (it then runs the GEMM and the epilogue's kernel unfused).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_epilogue(
        &self,
        precision: Precision,
        a_weight: bool,
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
        epilogue: (super::lt::Epilogue, u64),
    ) -> bool {
        let ok = self.gemm_with(precision, a_weight, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc, Some(epilogue));
        if ok {
            self.inner.epilogue_gemms.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    }

    /// The GEMM, with `epilogue` through cuBLASLt only (`false`: not run, see
    /// [`Self::gemm_epilogue`]); without one it always runs (`true`).
    #[allow(clippy::too_many_arguments)]
    fn gemm_with(
        &self,
        precision: Precision,
        a_weight: bool,
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
        epilogue: Option<(super::lt::Epilogue, u64)>,
    ) -> bool {
        let (epi, bias) = epilogue.unwrap_or_default();
        let key = |bf16: bool, lda: usize, ldb: usize| super::lt::Key {
            bf16,
            ta,
            tb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            accumulate: beta != 0.0,
            align: [0; 3],
            epilogue: epi,
        };
        if epilogue.is_some() {
            // cuBLASLt only, for a problem it was not found wanting for (and a bias vector
            // aligned as its algorithms may assume).
            let usable = m > 0 && n > 0 && k > 0 && super::lt::alignment(bias) >= 16;
            let Some(lt) = self.inner.lt.as_ref().filter(|_| usable && self.inner.blas.is_some()) else { return false };
            let (ai, bi) = (if ta { k } else { m }, if tb { n } else { k });
            let probe = if precision == Precision::Bf16 { key(true, ai, bi) } else { key(false, lda, ldb) };
            if lt.epilogue_unsupported(&probe) {
                return false;
            }
        }
        if m == 0 || n == 0 {
            return true;
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
            return true;
        }
        let Some(handle) = inner.blas else {
            // No cuBLAS: our tiled kernel (fp32 only; `open` refuses bf16 without cuBLAS).
            let grid = (m.div_ceil(16) as u32, n.div_ceil(16) as u32, 1);
            launch!(self, "sgemm_tiled", grid, (16, 16, 1), 0;
                ta as i32, tb as i32, m as i32, n as i32, k as i32, a, lda as i64, b, ldb as i64, beta, c, ldc as i64);
            return true;
        };
        let lt_stream = inner.stream as cudarc::cublaslt::sys::cudaStream_t;
        let _check = GemmCheckpoint { inner, shape: (m, n, k), precision };
        match precision {
            Precision::Fp32 if inner.lt.as_ref().is_some_and(|lt| lt.matmul(key(false, lda, ldb), a, b, beta, c, bias, lt_stream)) => {}
            Precision::Fp32 if epilogue.is_some() => return false,
            Precision::Fp32 => {
                // SAFETY: the matrices lie in live device memory of the sizes the leading
                // dimensions say (the trait's conventions).
                ck(
                    unsafe {
                        blas::sgemm(
                            handle,
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
                let a16 = if a_weight { self.weight16(a, lda, ao, ai) } else { 0 };
                let mut s = crate::lock(&inner.scratch);
                let a16 = if a_weight {
                    a16
                } else {
                    let a16 = inner.grow(&mut s.a16, ai * ao * 2);
                    launch!(self, "to_bf16", blocks(ai * ao), T256, 0; a, lda as i64, a16, ao as i64, ai as i64);
                    a16
                };
                let b16 = inner.grow(&mut s.b16, bi * bo * 2);
                launch!(self, "to_bf16", blocks(bi * bo), T256, 0; b, ldb as i64, b16, bo as i64, bi as i64);
                if inner.lt.as_ref().is_some_and(|lt| lt.matmul(key(true, ai, bi), a16, b16, beta, c, bias, lt_stream)) {
                    return true;
                }
                if epilogue.is_some() {
                    // Not fused after all (an alignment of the bf16 copies no algorithm takes).
                    return false;
                }
                // SAFETY: as above, the bf16 copies packed with leading dimensions ai, bi.
                ck(
                    unsafe {
                        blas::gemm_ex(
                            handle,
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
        true
    }

    /// `acc[c] += Σ_r x[r, c]` over `rows × m`: the two-pass deterministic reduction of
    /// [`crate::geometry`] (many blocks; the same result whatever the scheduling).
    pub(super) fn column_sums(&self, acc: u64, x: u64, rows: usize, m: usize) {
        if rows == 0 || m == 0 {
            return;
        }
        let (chunk, chunks) = crate::geometry::col_chunks(rows);
        let g = crate::geometry::col_partial(rows, m);
        let mut s = crate::lock(&self.inner.scratch);
        let partial = self.inner.grow(&mut s.partial, chunks * m * F as usize);
        launch!(self, "col_sums_partial", g.grid, g.block, 0; x, rows as i64, m as i64, chunk as i64, partial);
        launch!(self, "col_sums_finish", blocks(m), T256, 0; partial, chunks as i64, m as i64, acc);
    }

    pub(super) fn ids(&self, s: &mut Scratch, ids: &[i64]) -> u64 {
        let p = self.inner.grow(&mut s.ids, ids.len() * 8);
        self.inner.upload(p, ids);
        p
    }

    pub(super) fn rows(&self, s: &mut Scratch, rows: &[i32]) -> u64 {
        let p = self.inner.grow(&mut s.rows, rows.len() * 4);
        self.inner.upload(p, rows);
        p
    }

    pub(super) fn host_of(&self, v: DevView<'_>) -> Vec<f32> {
        let mut out = vec![0.0f32; v.len];
        self.inner.download(&mut out, v.ptr);
        out
    }

    pub(super) fn buf_from(&self, host: &[f32]) -> DevBuf {
        let mut b = DevBuf::default();
        self.fit(&mut b, host.len());
        self.inner.upload(b.ptr, host);
        b
    }
}

/// With `DEMOVLP_CUDA_SYNC=1`, synchronises when a GEMM call ends (whichever library ran
/// it) and panics naming the GEMM if it failed.
struct GemmCheckpoint<'a> {
    inner: &'a Inner,
    shape: (usize, usize, usize),
    precision: Precision,
}

impl Drop for GemmCheckpoint<'_> {
    fn drop(&mut self) {
        if self.inner.sync && !std::thread::panicking() {
            let (m, n, k) = self.shape;
            self.inner.checkpoint(&|| format!("GEMM {m} x {n} x {k} ({:?})", self.precision));
        }
    }
}

pub(super) fn regions_of(s: &AttnShape) -> i32 {
    match s.pattern {
        KeyPattern::Full => 0,
        KeyPattern::Frames { regions } => regions as i32,
    }
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_ptrs(
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
        let mut sc = crate::lock(&self.inner.scratch);
        let ds = self.inner.grow(&mut sc.ds, s.probs_len() * F as usize);
        let (g1, g2) = (
            crate::geometry::attention_backward_ds(s.batch, s.heads, s.seq),
            crate::geometry::attention_backward_dkv(s.batch, s.heads, s.seq),
        );
        let drop = drop.map_or(0, |d| d.ptr);
        launch!(self, "attention_backward_rows_ds", g1.grid, g1.block, 0;
            s.seq as i32, s.heads as i32, s.head_dim as i32, regions_of(s), scale, k, v, ld as i64, probs.ptr, drop, dout.ptr, ld_dout as i64, ds, dq, ld_d as i64);
        launch!(self, "attention_backward_rows_dkv", g2.grid, g2.block, 0;
            s.seq as i32, s.heads as i32, s.head_dim as i32, regions_of(s), q, ld as i64, probs.ptr, drop, dout.ptr, ld_dout as i64, ds, dk, dv, ld_d as i64);
    }
}
