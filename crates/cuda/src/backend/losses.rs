//! The retrieval losses (forward, and backward onto the four embeddings) and the evaluation
//! scores on the device: the kernels of `kernels/losses.cu` and fp32 GEMMs (whatever the
//! backend's precision: fp32 statistics in the bf16 mode).
//!
//! Nothing of size (B, B, words, regions) is allocated: the word × region cosine blocks are
//! made by one GEMM per chunk of videos (at most [`crate::plan::M_BUDGET`] values), and the pair kernels
//! keep one pair's working set per block in a scratch bounded by their grid
//! ([`crate::plan::pair_grid`] blocks × [`crate::plan::rwa_scratch_len`] values). Host↔device traffic per loss call:
//! one read-back of the two loss scalars and the two `[B, B]` similarity matrices that
//! [`LossOutputs`] carries (none for [`Backend::losses_late`]: the scalars are copied into
//! the caller's device buffer); the gradients stay on the device.

use super::mem::{Raw, F};
use super::{blocks, CudaBackend, T256};
use crate::plan::{align_logs, pair_grid, rwa_scratch_len, videos_per_chunk};
use crate::Precision;
use demovlp_model::backend::{Backend, LossGradBufs, LossViews};
use demovlp_retrieval::{EmbeddingSet, EvalOptions, LossConfig, LossOutputs, ScoreMode};
use std::ffi::c_void;

/// Grow-only device scratch of the losses (steady state: no allocation but the four
/// gradient buffers [`Backend::losses`] returns).
#[derive(Default)]
pub(crate) struct LossScratch {
    th: Raw,
    tn: Raw,
    traw: Raw,
    vh: Raw,
    vn: Raw,
    vraw: Raw,
    gg: Raw,
    gth: Raw,
    gvh: Raw,
    dscratch: Raw,
    lt_hat: Raw,
    lt_norm: Raw,
    lt_raw: Raw,
    lv_hat: Raw,
    lv_norm: Raw,
    lv_raw: Raw,
    m: Raw,
    pairs: Raw,
    gs: Raw,
    g_t_hat: Raw,
    g_v_hat: Raw,
    /// [2 + 2·B·B]: the two losses, G [B, B], S_loc [B, B]: one read-back.
    readback: Raw,
}

/// One side of the alignment on the device: raw local rows, their normalised copies, norms
/// and additive mask.
#[derive(Clone, Copy)]
struct Side {
    raw: u64,
    hat: u64,
    norm: u64,
    mask: u64,
    count: usize,
    len: usize,
}

/// What a pass over the pairs computes.
enum PairPass {
    /// S_loc [V, T] into `s_out`.
    Forward { s_out: u64 },
    /// The gradients of Σ gs[v, t]·S_loc[v, t].
    Backward { gs: u64, g_t_raw: u64, g_v_raw: u64, g_t_hat: u64, g_v_hat: u64 },
}

fn at_f(ptr: u64, elems: usize) -> u64 {
    ptr + elems as u64 * F
}

impl CudaBackend {
    fn raw(&self, r: &mut Raw, floats: usize) -> u64 {
        self.inner.grow(r, floats.max(1) * F as usize)
    }

    /// Normalises `rows` rows of `dim` (`clamp`: the global loss's max(‖x‖, ε), else the
    /// alignment's ‖x‖ + ε) into `hat`, `norm`, `raw`.
    #[allow(clippy::too_many_arguments)]
    fn l2_rows(&self, x: u64, rows: usize, dim: usize, clamp: bool, hat_p: u64, norm_p: u64, raw_p: u64) {
        if rows == 0 {
            return;
        }
        launch!(self, "l2_rows", blocks(rows * 32), T256, 0; x, rows as i64, dim as i32, clamp as i32, hat_p, norm_p, raw_p);
    }

    #[allow(clippy::too_many_arguments)]
    fn l2_rows_backward(&self, g_p: u64, hat_p: u64, x: u64, norm_p: u64, raw_p: u64, rows: usize, dim: usize, clamp: bool, gx_p: u64) {
        if rows == 0 {
            return;
        }
        launch!(self, "l2_rows_backward", blocks(rows * 32), T256, 0; g_p, hat_p, x, norm_p, raw_p, rows as i64, dim as i32, clamp as i32, gx_p);
    }

    /// Row-major `C [m, n] = A [m, k] · B [n, k]ᵀ` in fp32 (rows `lda`, `ldb`, `ldc` apart).
    #[allow(clippy::too_many_arguments)]
    fn gemm_abt(&self, m: usize, n: usize, k: usize, a: u64, lda: usize, b: u64, ldb: usize, c: u64, ldc: usize) {
        self.gemm_in(Precision::Fp32, false, true, false, n, m, k, b, ldb, a, lda, 0.0, c, ldc);
    }

    /// Every (text, video) pair of `text` × `video` through a pair kernel, in chunks of
    /// videos whose cosine blocks come from one GEMM.
    #[allow(clippy::too_many_arguments)]
    fn pairs_pass(
        &self,
        ls: &mut LossScratch,
        text: Side,
        video: Side,
        dim: usize,
        lambda: f32,
        masked_mean: bool,
        pass: &PairPass,
        progress: &dyn Fn(usize, usize),
    ) {
        let (nt, nv, w, n) = (text.count, video.count, text.len, video.len);
        if nt == 0 || nv == 0 {
            return;
        }
        let nvc = videos_per_chunk(nt, w, n, nv);
        let m_p = self.raw(&mut ls.m, nt * w * nvc * n);
        let grid = pair_grid(nt * nvc, self.inner.info.multiprocessors);
        let per_block = rwa_scratch_len(w, n, dim);
        let scratch_p = self.raw(&mut ls.pairs, grid * per_block);
        progress(0, nt * nv);
        for v0 in (0..nv).step_by(nvc) {
            let nvc = nvc.min(nv - v0);
            let ldm = nvc * n;
            // M [nt·w, nvc·n] = T̂ · V̂[v0 .. v0 + nvc]ᵀ
            self.gemm_abt(nt * w, nvc * n, dim, text.hat, dim, at_f(video.hat, v0 * n * dim), dim, m_p, ldm);
            let grid_x = (pair_grid(nt * nvc, self.inner.info.multiprocessors) as u32, 1, 1);
            match *pass {
                PairPass::Forward { s_out } => {
                    launch!(self, "rwa_pair_forward", grid_x, T256, 0;
                        nt as i32, nvc as i32, v0 as i32, w as i32, n as i32, dim as i32, lambda, masked_mean as i32, m_p, ldm as i64,
                        text.raw, text.hat, text.norm, text.mask, video.raw, video.hat, video.norm, video.mask,
                        scratch_p, per_block as i64, s_out);
                }
                PairPass::Backward { gs, g_t_raw, g_v_raw, g_t_hat, g_v_hat } => {
                    launch!(self, "rwa_pair_backward", grid_x, T256, 0;
                        nt as i32, nvc as i32, v0 as i32, w as i32, n as i32, dim as i32, lambda, masked_mean as i32, m_p, ldm as i64,
                        text.raw, text.hat, text.norm, text.mask, video.raw, video.hat, video.norm, video.mask,
                        scratch_p, per_block as i64, gs, g_t_raw, g_v_raw, g_t_hat, g_v_hat);
                }
            }
            progress((v0 + nvc) * nt, nt * nv);
        }
    }

    /// The alignment's sides: normalised copies and norms of both local embeddings.
    #[allow(clippy::too_many_arguments)]
    fn local_sides(
        &self,
        ls: &mut LossScratch,
        lt: u64,
        tm: u64,
        nt: usize,
        w: usize,
        lv: u64,
        vm: u64,
        nv: usize,
        n: usize,
        dim: usize,
    ) -> (Side, Side) {
        let (th, tn, tr) = (self.raw(&mut ls.lt_hat, nt * w * dim), self.raw(&mut ls.lt_norm, nt * w), self.raw(&mut ls.lt_raw, nt * w));
        let (vh, vn, vr) = (self.raw(&mut ls.lv_hat, nv * n * dim), self.raw(&mut ls.lv_norm, nv * n), self.raw(&mut ls.lv_raw, nv * n));
        self.l2_rows(lt, nt * w, dim, false, th, tn, tr);
        self.l2_rows(lv, nv * n, dim, false, vh, vn, vr);
        (Side { raw: lt, hat: th, norm: tn, mask: tm, count: nt, len: w }, Side { raw: lv, hat: vh, norm: vn, mask: vm, count: nv, len: n })
    }

    /// [`Backend::losses`] on the device; with `late`, [`Backend::losses_late`]: the two
    /// scalars are copied into `late` on the device and nothing is read back (the returned
    /// outputs are empty).
    pub(super) fn losses_on_device(
        &self,
        cfg: &LossConfig,
        x: &LossViews<'_, Self>,
        use_local: bool,
        grads: bool,
        late: Option<&mut super::DevBuf>,
    ) -> (LossOutputs, Option<LossGradBufs<Self>>) {
        let d = x.dims;
        let (b, w, n, p) = (d.batch, d.words, d.regions, d.dim);
        let want = [
            ("global_text", x.global_text.len, b * p),
            ("global_video", x.global_video.len, b * p),
            ("local_text", x.local_text.len, b * w * p),
            ("local_video", x.local_video.len, b * n * p),
            ("text_mask", x.text_mask.len, b * w),
            ("video_mask", x.video_mask.len, b * n),
        ];
        for (name, got, want) in want {
            assert_eq!(got, want, "CUDA losses: {name} has {got} values, expected {want} (B={b}, W={w}, N={n}, P={p})");
        }
        assert!(b > 0, "CUDA losses: empty batch");
        self.inner.bind();
        let mut guard = crate::lock(&self.inner.losses);
        let ls = &mut *guard;
        let bb = b * b;
        let rb = self.raw(&mut ls.readback, 2 + 2 * bb);
        let (g_p, s_p) = (at_f(rb, 2), at_f(rb, 2 + bb));
        self.inner.zero(rb, 2 + 2 * bb);

        // Global contrastive loss.
        let (th, tn, tr) = (self.raw(&mut ls.th, b * p), self.raw(&mut ls.tn, b), self.raw(&mut ls.traw, b));
        let (vh, vn, vr) = (self.raw(&mut ls.vh, b * p), self.raw(&mut ls.vn, b), self.raw(&mut ls.vraw, b));
        self.l2_rows(x.global_text.ptr, b, p, true, th, tn, tr);
        self.l2_rows(x.global_video.ptr, b, p, true, vh, vn, vr);
        self.gemm_abt(b, b, p, th, p, vh, p, g_p, b);
        let gg = self.raw(&mut ls.gg, bb);
        let dscr = self.inner.grow(&mut ls.dscratch, 4 * b * 8);
        let temperature = cfg.temperature;
        launch!(self, "global_loss_ce", (1, 1, 1), T256, 0; g_p, b as i32, temperature, grads as i32, dscr, gg, rb);
        let mut out_grads: Option<LossGradBufs<Self>> = None;
        if grads {
            let (gt, gv) = (self.zeros(b * p), self.zeros(b * p));
            let (gth, gvh) = (self.raw(&mut ls.gth, b * p), self.raw(&mut ls.gvh, b * p));
            // dT̂ = dG·V̂, dV̂ = dGᵀ·T̂ (row-major).
            self.gemm_in(Precision::Fp32, false, false, false, p, b, b, vh, p, gg, b, 0.0, gth, p);
            self.gemm_in(Precision::Fp32, false, false, true, p, b, b, th, p, gg, b, 0.0, gvh, p);
            self.l2_rows_backward(gth, th, x.global_text.ptr, tn, tr, b, p, true, gt.ptr);
            self.l2_rows_backward(gvh, vh, x.global_video.ptr, vn, vr, b, p, true, gv.ptr);
            out_grads = Some(LossGradBufs {
                global_text: gt,
                global_video: gv,
                local_text: self.zeros(b * w * p),
                local_video: self.zeros(b * n * p),
            });
        }

        // Region-word alignment.
        if use_local {
            let (text, video) = self.local_sides(ls, x.local_text.ptr, x.text_mask.ptr, b, w, x.local_video.ptr, x.video_mask.ptr, b, n, p);
            self.pairs_pass(ls, text, video, p, cfg.lambda, cfg.masked_mean, &PairPass::Forward { s_out: s_p }, &|_, _| {});
            let gs = self.raw(&mut ls.gs, bb);
            let (log_on, log_off) = align_logs();
            let lambda = cfg.lambda;
            launch!(self, "align_loss", (1, 1, 1), T256, 0; s_p, b as i32, lambda, log_on, log_off, grads as i32, gs, at_f(rb, 1));
            if let Some(g) = out_grads.as_mut() {
                let (gth, gvh) = (self.raw(&mut ls.g_t_hat, b * w * p), self.raw(&mut ls.g_v_hat, b * n * p));
                self.inner.zero(gth, b * w * p);
                self.inner.zero(gvh, b * n * p);
                let pass = PairPass::Backward { gs, g_t_raw: g.local_text.ptr, g_v_raw: g.local_video.ptr, g_t_hat: gth, g_v_hat: gvh };
                self.pairs_pass(ls, text, video, p, cfg.lambda, cfg.masked_mean, &pass, &|_, _| {});
                self.l2_rows_backward(gth, text.hat, text.raw, text.norm, text.norm, b * w, p, false, g.local_text.ptr);
                self.l2_rows_backward(gvh, video.hat, video.raw, video.norm, video.norm, b * n, p, false, g.local_video.ptr);
            }
        }

        if let Some(scalars) = late {
            drop(guard);
            self.fit(scalars, 2);
            self.inner.dtod(scalars.ptr, rb, 2 * F as usize);
            return (LossOutputs::default(), out_grads);
        }
        // One read-back: the losses and both similarity matrices.
        let mut host = vec![0f32; 2 + 2 * bb];
        self.inner.download(&mut host, rb);
        let (loss_global, loss_local) = (host[0], if use_local { host[1] } else { 0.0 });
        let out = LossOutputs {
            loss_total: loss_global + loss_local,
            loss_global,
            loss_local,
            global_sim_text_video: host[2..2 + bb].to_vec(),
            local_sim_video_text: if use_local { host[2 + bb..].to_vec() } else { Vec::new() },
        };
        (out, out_grads)
    }

    /// Evaluation scores `[T, V]` (rows = texts) on the GPU: the global cosine matrix plus
    /// the local similarity (aligned or the published untransposed sum), the semantics of
    /// `demovlp_retrieval::eval_scores_with`. `progress(done, total)` after each chunk of
    /// videos (each waits for its pairs). `Err` on inconsistent shapes.
    pub fn eval_scores(
        &self,
        texts: &EmbeddingSet,
        videos: &EmbeddingSet,
        opts: &EvalOptions,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<f32>, String> {
        for (what, s) in [("texts", texts), ("videos", videos)] {
            let (c, l, d) = (s.count, s.len, s.dim);
            if s.global.len() != c * d || s.local.len() != c * l * d || s.mask_additive.len() != c * l {
                return Err(format!(
                    "{what}: {} global, {} local, {} mask values do not fit [{c}, {d}], [{c}, {l}, {d}], [{c}, {l}]",
                    s.global.len(),
                    s.local.len(),
                    s.mask_additive.len()
                ));
            }
        }
        if texts.dim != videos.dim {
            return Err(format!("texts have width {}, videos {}", texts.dim, videos.dim));
        }
        let (nt, nv, p) = (texts.count, videos.count, texts.dim);
        if opts.mode == ScoreMode::Reference && opts.use_local && nt != nv {
            return Err(format!("the reference score combination needs as many texts ({nt}) as videos ({nv})"));
        }
        if nt == 0 || nv == 0 {
            return Ok(Vec::new());
        }
        self.inner.bind();
        let up = |h: &[f32]| self.buf_from(h);
        let (tg, vg) = (up(texts.global), up(videos.global));
        let (th, tn, tr) = (self.zeros(nt * p), self.zeros(nt), self.zeros(nt));
        let (vh, vn, vr) = (self.zeros(nv * p), self.zeros(nv), self.zeros(nv));
        self.l2_rows(tg.ptr, nt, p, true, th.ptr, tn.ptr, tr.ptr);
        self.l2_rows(vg.ptr, nv, p, true, vh.ptr, vn.ptr, vr.ptr);
        let score = self.zeros(nt * nv);
        self.gemm_abt(nt, nv, p, th.ptr, p, vh.ptr, p, score.ptr, nv);
        if opts.use_local {
            let (tl, tm) = (up(texts.local), up(texts.mask_additive));
            let (vl, vm) = (up(videos.local), up(videos.mask_additive));
            let s_loc = self.zeros(nv * nt);
            let mut guard = crate::lock(&self.inner.losses);
            let ls = &mut *guard;
            let (text, video) = self.local_sides(ls, tl.ptr, tm.ptr, nt, texts.len, vl.ptr, vm.ptr, nv, videos.len, p);
            let report = |done: usize, total: usize| {
                self.synchronize();
                progress(done, total);
            };
            self.pairs_pass(ls, text, video, p, opts.lambda, opts.masked_mean, &PairPass::Forward { s_out: s_loc.ptr }, &report);
            let reference = opts.mode == ScoreMode::Reference;
            launch!(self, "add_local_scores", blocks(nt * nv), T256, 0; score.ptr, s_loc.ptr, nt as i32, nv as i32, reference as i32);
        }
        Ok(self.to_host(Self::view(&score)))
    }
}
