//! AdamW exactly as the published trainer runs it (Hugging Face `transformers.AdamW`):
//! bias correction folded into the step size, ε added to √v outside the correction,
//! and decoupled weight decay applied to the already-updated parameter:
//!
//! ```text
//! m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//! p ← p − lr·√(1−β2^t)/(1−β1^t) · m/(√v + ε)
//! p ← p − lr·wd·p
//! ```
//!
//! Tensors whose spec says `receives_grad == false` (unused checkpoint tensors) are left
//! untouched, their moments stay zero. One fused pass over the flat buffers, parallel
//! over fixed-size chunks.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::backend::{Backend, Cpu};
use crate::io::{self, Tensor, TensorData};
use crate::params::Params;

#[cfg(test)]
const CHUNK: usize = 1 << 15;

/// The optimiser: settings, step count, and both moments as buffers of the backend `B`.
#[derive(Clone, Debug)]
pub struct AdamW<B: Backend = Cpu> {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// First moment, same layout as `Params::data`.
    pub m: B::Buf,
    /// Second moment, same layout as `Params::data`.
    pub v: B::Buf,
    /// Steps taken so far (the next step uses t + 1).
    pub t: u64,
    backend: B,
}

/// Hyper-parameters of one optimiser, as given on the command line
/// (`lr,beta1,beta2,eps,weight_decay`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWSettings {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamWSettings {
    /// The published configs: β = (0.9, 0.999), ε = 1e-6, weight decay 0.
    pub fn published(lr: f32) -> Self {
        AdamWSettings { lr, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.0 }
    }

    /// Parse `lr,beta1,beta2,eps,weight_decay`.
    pub fn parse(s: &str) -> Result<Self> {
        let v: Vec<f32> = s
            .split(',')
            .map(|x| x.trim().parse::<f32>().with_context(|| format!("AdamW settings {s:?}: {x:?} is not a number")))
            .collect::<Result<_>>()?;
        if v.len() != 5 {
            bail!("AdamW settings {s:?}: expected 5 comma-separated numbers lr,beta1,beta2,eps,weight_decay, got {}", v.len());
        }
        Ok(AdamWSettings { lr: v[0], beta1: v[1], beta2: v[2], eps: v[3], weight_decay: v[4] })
    }
}

/// The per-step constants of an AdamW step (bias corrections folded into `step_size`).
/// Per element, in this order and in f32 (a backend's update kernel must do the same):
///
/// ```text
/// m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·(g·g)
/// p ← p − step_size·(m / (√v + ε));  p ← p − decay·p
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoeffs {
    pub step_size: f32,
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl StepCoeffs {
    /// The update of one run of elements on the host (the CPU backend's kernel).
    pub fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        apply_run(self, p, g, m, v);
    }
}

demovlp_kernels::multiversion! {
    fn apply_run(c: &StepCoeffs, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2, eps, step_size, decay) = (c.beta1, c.beta2, c.eps, c.step_size, c.decay);
        let (one_b1, one_b2) = (1.0 - b1, 1.0 - b2);
        let n = g.len();
        let (p, m, v) = (&mut p[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i];
            let mi = b1 * m[i] + one_b1 * gi;
            let vi = b2 * v[i] + one_b2 * (gi * gi);
            m[i] = mi;
            v[i] = vi;
            let mut pi = p[i] - step_size * (mi / (vi.sqrt() + eps));
            pi -= decay * pi;
            p[i] = pi;
        }
    }
}

/// Sorted, merged element ranges `[start, end)` of the tensors AdamW updates (those that
/// receive gradients).
pub fn updated_ranges<B: Backend>(params: &Params<B>) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for s in params.specs().iter().filter(|s| s.receives_grad && s.len > 0) {
        match ranges.last_mut() {
            Some(last) if last.1 == s.offset => last.1 = s.offset + s.len,
            _ => ranges.push((s.offset, s.offset + s.len)),
        }
    }
    ranges.sort_unstable();
    ranges
}

/// One AdamW step applied window by window during the backward pass: a block's gradients
/// are written to `scratch` (the size of one block, reused), then [`FusedStep::block`]
/// updates that block at once. The model never holds a whole-model gradient for the blocks,
/// which is most of it. Same arithmetic per element as [`AdamW::step`].
pub struct FusedStep<'a, B: Backend = Cpu> {
    pub opt: &'a mut AdamW<B>,
    pub coeffs: StepCoeffs,
    pub ranges: &'a [(usize, usize)],
    scratch: &'a mut B::Buf,
}

impl<'a, B: Backend> FusedStep<'a, B> {
    /// Begins step t + 1 of `opt`; `ranges` from [`updated_ranges`].
    pub fn begin(opt: &'a mut AdamW<B>, ranges: &'a [(usize, usize)], scratch: &'a mut B::Buf) -> Self {
        let coeffs = opt.begin_step();
        FusedStep { opt, coeffs, ranges, scratch }
    }

    /// Runs `backward(block parameters, block gradients)` for the block whose tensors are
    /// elements `window` of the model, then updates that block at once. The gradient
    /// buffer is scratch holding the previous block's values, not zeros: `backward` must
    /// overwrite every gradient the optimiser reads ([`crate::layers::Grads::Overwrite`];
    /// each block weight is used once per step). Not zeroing saves a pass over the block's
    /// 28 MB, and the weight-gradient GEMMs then never read their output.
    pub fn block(&mut self, data: &mut B::Buf, window: Range<usize>, backward: impl FnOnce(B::View<'_>, B::ViewMut<'_>)) {
        let len = window.len();
        let be = self.opt.backend.clone();
        if B::buf_len(self.scratch) < len {
            be.fit(self.scratch, len);
        }
        backward(B::slice(B::view(data), window.clone()), B::slice_mut(B::view_mut(self.scratch), 0..len));
        let c = self.coeffs;
        let grad = B::slice(B::view(self.scratch), 0..len);
        self.opt.update_window(&c, self.ranges, B::slice_mut(B::view_mut(data), window.clone()), grad, window.start);
    }
}

impl AdamW<Cpu> {
    pub fn new(n_params: usize, lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        AdamW::new_on(Cpu, n_params, AdamWSettings { lr, beta1, beta2, eps, weight_decay })
    }

    pub fn with_settings(n_params: usize, s: AdamWSettings) -> Self {
        Self::new(n_params, s.lr, s.beta1, s.beta2, s.eps, s.weight_decay)
    }
}

impl<B: Backend> AdamW<B> {
    /// An optimiser whose moments (zero) live on `backend`.
    pub fn new_on(backend: B, n_params: usize, s: AdamWSettings) -> Self {
        let (m, v) = (backend.zeros(n_params), backend.zeros(n_params));
        AdamW { lr: s.lr, beta1: s.beta1, beta2: s.beta2, eps: s.eps, weight_decay: s.weight_decay, m, v, t: 0, backend }
    }

    pub fn settings(&self) -> AdamWSettings {
        AdamWSettings { lr: self.lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
    }

    /// Values of each moment (the model's parameter count).
    pub fn len(&self) -> usize {
        B::buf_len(&self.m)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One optimiser step from `params.grad`. Gradients are read, not cleared.
    pub fn step(&mut self, params: &mut Params<B>) {
        assert_eq!(self.len(), params.len(), "AdamW state has {} values, model has {}", self.len(), params.len());
        let c = self.begin_step();
        let ranges = updated_ranges(params);
        self.update_window(&c, &ranges, B::view_mut(&mut params.data), B::view(&params.grad), 0);
    }

    /// Starts step t + 1: the coefficients every [`AdamW::update_window`] of this step uses.
    /// (A step may be applied window by window, e.g. fused into the backward pass.)
    pub fn begin_step(&mut self) -> StepCoeffs {
        self.t += 1;
        // The reference computes the step size in Python floats (f64), then scales f32 tensors.
        let t = self.t as i32;
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t);
        StepCoeffs {
            step_size: (self.lr as f64 * bc2.sqrt() / bc1) as f32,
            decay: (self.lr as f64 * self.weight_decay as f64) as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
        }
    }

    /// Updates the parameters `data` = elements `[base, base + data.len())` of the model from
    /// their gradients `grad` (same window), touching only elements inside `ranges` (from
    /// [`updated_ranges`]). Each element sees the same arithmetic however the step is cut.
    pub fn update_window(&mut self, c: &StepCoeffs, ranges: &[(usize, usize)], mut data: B::ViewMut<'_>, grad: B::View<'_>, base: usize) {
        let len = B::view_mut_len(&data);
        assert_eq!(len, B::view_len(grad), "AdamW window: parameters and gradients differ in length");
        let end = base + len;
        assert!(end <= self.len(), "AdamW window ends at {end}, state has {} values", self.len());
        let first = ranges.partition_point(|r| r.1 <= base);
        for &(r0, r1) in &ranges[first..] {
            if r0 >= end {
                break;
            }
            let (a, b) = (r0.max(base), r1.min(end));
            let (p, g) = (B::slice_mut(B::reborrow(&mut data), a - base..b - base), B::slice(grad, a - base..b - base));
            let (m, v) = (B::slice_mut(B::view_mut(&mut self.m), a..b), B::slice_mut(B::view_mut(&mut self.v), a..b));
            self.backend.adamw_update(c, p, g, m, v);
        }
    }

    /// Updates a `[rows, dim]` table lying at elements `table` of the model (`data` is that
    /// slice of the parameters) whose gradient is zero except on rows `ids` (increasing),
    /// given as `grad_rows` `[ids.len(), dim]`: the same arithmetic per element as
    /// [`AdamW::update_window`] over the dense gradient (zero rows still decay m, v and
    /// the weights). Every element of the table must be updated (inside `ranges`).
    pub fn update_table_rows(
        &mut self,
        c: &StepCoeffs,
        table: Range<usize>,
        data: B::ViewMut<'_>,
        dim: usize,
        ids: &[usize],
        grad_rows: B::View<'_>,
    ) {
        let len = B::view_mut_len(&data);
        assert_eq!(len, table.len(), "AdamW table: {len} parameters for a window of {}", table.len());
        assert!(dim > 0 && table.len().is_multiple_of(dim), "AdamW table: {} values are not rows of {dim}", table.len());
        assert_eq!(B::view_len(grad_rows), ids.len() * dim, "AdamW table: gradient rows");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]) && ids.last().is_none_or(|&i| i < table.len() / dim),
            "AdamW table: row ids must increase and lie in the table"
        );
        let (m, v) = (B::slice_mut(B::view_mut(&mut self.m), table.clone()), B::slice_mut(B::view_mut(&mut self.v), table));
        self.backend.adamw_update_table_rows(c, data, m, v, dim, ids, grad_rows);
    }
}

impl AdamW<Cpu> {
    /// Write the optimiser state (moments as tensors, settings and step in the metadata).
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = serde_json::json!({
            "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
            "weight_decay": self.weight_decay, "t": self.t,
        });
        let n = self.m.len();
        let tensors = vec![
            ("m".to_string(), Tensor { shape: vec![n], data: TensorData::F32(self.m.clone()) }),
            ("v".to_string(), Tensor { shape: vec![n], data: TensorData::F32(self.v.clone()) }),
        ];
        io::write_safetensors(path, &tensors, &[("adamw".to_string(), meta.to_string())])
    }

    /// Read a state written by [`AdamW::save`]; `n_params` must match the model.
    pub fn load(path: &Path, n_params: usize) -> Result<Self> {
        let st = io::read_safetensors(path)?;
        let meta = st.metadata.get("adamw").with_context(|| format!("{}: no `adamw` metadata: not an optimiser state", path.display()))?;
        let meta: serde_json::Value = serde_json::from_str(meta).with_context(|| format!("{}: bad `adamw` metadata", path.display()))?;
        let f = |k: &str| -> Result<f32> {
            meta[k].as_f64().map(|x| x as f32).with_context(|| format!("{}: `adamw` metadata lacks {k}", path.display()))
        };
        let mut opt = AdamW::new(0, f("lr")?, f("beta1")?, f("beta2")?, f("eps")?, f("weight_decay")?);
        opt.t = meta["t"].as_u64().with_context(|| format!("{}: `adamw` metadata lacks t", path.display()))?;
        for (name, dst) in [("m", &mut opt.m), ("v", &mut opt.v)] {
            let t = st.tensors.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
            let data = t.to_f32().with_context(|| format!("{}: tensor {name}", path.display()))?;
            if data.len() != n_params {
                bail!("{}: optimiser state has {} values, model has {n_params}", path.display(), data.len());
            }
            *dst = data;
        }
        Ok(opt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamsBuilder;

    /// Straight per-element transcription of the update in f64, for comparison.
    fn reference(p: f64, g: f64, m: &mut f64, v: &mut f64, t: i32, s: AdamWSettings) -> f64 {
        let (b1, b2) = (s.beta1 as f64, s.beta2 as f64);
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let step = s.lr as f64 * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
        let p = p - step * *m / (v.sqrt() + s.eps as f64);
        p - s.lr as f64 * s.weight_decay as f64 * p
    }

    #[test]
    fn matches_scalar_reference_over_steps_and_skips_unused() {
        // Chunk-crossing sizes so the range/chunk intersection logic is exercised.
        let mut b = ParamsBuilder::new();
        let a = b.add("a", &[CHUNK + 17]);
        let u = b.add_unused("u", &[CHUNK - 5]);
        let c = b.add("c", &[2 * CHUNK + 3]);
        let mut p = b.build();
        let mut rng = demovlp_kernels::rng::Rng::new(3);
        for x in p.data.iter_mut() {
            *x = rng.normal();
        }
        let s = AdamWSettings { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-6, weight_decay: 0.1 };
        let mut opt = AdamW::with_settings(p.len(), s);
        let start = p.data.clone();
        let mut refp: Vec<f64> = start.iter().map(|&x| x as f64).collect();
        let mut refm = vec![0.0f64; p.len()];
        let mut refv = vec![0.0f64; p.len()];
        let mask = p.update_mask();
        for t in 1..=3 {
            for g in p.grad.iter_mut() {
                *g = rng.normal();
            }
            for i in 0..p.len() {
                if mask[i] {
                    refp[i] = reference(refp[i], p.grad[i] as f64, &mut refm[i], &mut refv[i], t, s);
                }
            }
            opt.step(&mut p);
        }
        assert_eq!(opt.t, 3);
        assert_eq!(p.get(u), &start[p.spec(u).offset..p.spec(u).offset + p.spec(u).len]);
        assert!(opt.m[p.spec(u).offset..p.spec(u).offset + p.spec(u).len].iter().all(|&x| x == 0.0));
        for id in [a, c] {
            let sp = p.spec(id).clone();
            for i in sp.offset..sp.offset + sp.len {
                assert!((p.data[i] as f64 - refp[i]).abs() < 1e-5, "{} [{}]: {} vs {}", sp.name, i - sp.offset, p.data[i], refp[i]);
                assert!(p.data[i] != start[i]);
            }
        }
    }

    /// The update loop is multiversioned (`demovlp_kernels::multiversion!`): every
    /// instruction-set level must give the same bits.
    #[test]
    fn update_is_identical_at_every_simd_level() {
        use demovlp_kernels::simd::{self, Level};
        let n = 10_007;
        let mut rng = demovlp_kernels::Rng::new(5);
        let p0: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let g: Vec<f32> = (0..n).map(|_| rng.normal() * 1e-3).collect();
        let run = || {
            let mut opt = AdamW::new(n, 1e-3, 0.9, 0.999, 1e-8, 0.01);
            let mut p = p0.clone();
            for _ in 0..3 {
                let c = opt.begin_step();
                opt.update_window(&c, &[(0, n)], &mut p, &g, 0);
            }
            (p, opt.m, opt.v)
        };
        let detected = simd::level();
        simd::set_level(Level::Baseline);
        let base = run();
        simd::set_level(detected);
        let wide = run();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&base.0), bits(&wide.0), "parameters differ");
        assert_eq!(bits(&base.1), bits(&wide.1), "m differs");
        assert_eq!(bits(&base.2), bits(&wide.2), "v differs");
    }

    #[test]
    fn state_round_trips() {
        let mut b = ParamsBuilder::new();
        b.add("w", &[10]);
        let mut p = b.build();
        p.grad.iter_mut().enumerate().for_each(|(i, g)| *g = i as f32 - 4.5);
        let mut opt = AdamW::new(10, 1e-3, 0.9, 0.999, 1e-6, 0.01);
        opt.step(&mut p);
        let dir = std::env::temp_dir().join(format!("demovlp-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("opt.safetensors");
        opt.save(&f).unwrap();
        let back = AdamW::load(&f, 10).unwrap();
        assert_eq!((back.t, back.m.clone(), back.v.clone()), (1, opt.m.clone(), opt.v.clone()));
        assert_eq!(back.settings(), opt.settings());
        assert!(AdamW::load(&f, 11).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn parses_settings() {
        let s = AdamWSettings::parse("0.001, 0.9,0.999,1e-6,0.01").unwrap();
        assert_eq!(s, AdamWSettings { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01 });
        assert!(AdamWSettings::parse("0.001,0.9").is_err());
        assert!(AdamWSettings::parse("a,b,c,d,e").is_err());
    }
}
