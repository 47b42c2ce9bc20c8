//! The gradient side of a step of several micro-batches, on the model's backend: the
//! groups' gradients summed part by part into accumulators on the device
//! (`Backend::add_in_place`), the step's statistics beside them, the sum over the ranks of
//! a data-parallel run, and the mean written back as the gradient (`Backend::scale`) —
//! the same additions and one product per element, in the same order, as the host loop
//! the CPU ran before, so the CPU's bits do not move. Also the start of a data-parallel
//! run: rank 0's model, optimisers and state sent to the other ranks.
//!
//! The collective engines take host buffers: with more than one rank, the sums travel
//! through host memory in one message per step (the accumulators, then the statistics);
//! on the CPU backend that is one copy of the gradients each way.

use anyhow::{bail, Context, Result};
use demovlp_model::{AdamW, AdamWSettings, Backend, Params};
use serde_json::json;

use crate::checkpoint::TrainerState;
use crate::dist::Collective;
use crate::task::{Losses, Task};

/// What a step's micro-batches add up (summed over the ranks with the gradients).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Parts that had ≥ 2 samples.
    pub parts: f32,
    pub loss: f32,
    pub terms: [f32; 2],
    pub samples: f32,
    pub skipped: f32,
    /// A rank raised its stop flag, and whether by SIGTERM.
    pub stop: f32,
    pub sigterm: f32,
}

const N_STATS: usize = 8;

impl StepStats {
    pub fn add_part(&mut self, l: &Losses, samples: usize) {
        self.parts += 1.0;
        self.loss += l.total;
        self.terms[0] += l.terms[0];
        self.terms[1] += l.terms[1];
        self.samples += samples as f32;
    }

    fn to_array(self) -> [f32; N_STATS] {
        [self.parts, self.loss, self.terms[0], self.terms[1], self.samples, self.skipped, self.stop, self.sigterm]
    }

    fn from_array(a: &[f32]) -> StepStats {
        StepStats { parts: a[0], loss: a[1], terms: [a[2], a[3]], samples: a[4], skipped: a[5], stop: a[6], sigterm: a[7] }
    }
}

/// Per-group gradient accumulators on the backend, kept across steps (allocated once).
pub struct GradSync<B: Backend> {
    acc: Vec<B::Buf>,
    /// The all-reduce message (host), kept across steps.
    msg: Vec<f32>,
}

impl<B: Backend> Default for GradSync<B> {
    fn default() -> Self {
        GradSync { acc: Vec::new(), msg: Vec::new() }
    }
}

impl<B: Backend> GradSync<B> {
    /// Zeroed accumulators shaped as the groups' gradients.
    pub fn begin(&mut self, be: &B, groups: &[&Params<B>]) {
        self.acc.resize_with(groups.len(), B::Buf::default);
        for (a, p) in self.acc.iter_mut().zip(groups) {
            demovlp_model::backend::zeroed(be, a, p.len());
        }
    }

    /// acc += the groups' gradients (one micro-batch's).
    pub fn add(&mut self, be: &B, groups: &[&Params<B>]) {
        for (a, p) in self.acc.iter_mut().zip(groups) {
            be.add_in_place(B::view_mut(a), B::view(&p.grad));
        }
    }

    /// The sums over all ranks (rank order, the engine's), statistics included; without a
    /// process group, `st` as it is.
    pub fn all_reduce(&mut self, be: &B, coll: Option<&mut (dyn Collective + '_)>, st: StepStats) -> Result<StepStats> {
        let Some(c) = coll else { return Ok(st) };
        // On the device when the engine can (NCCL on CUDA buffers): the gradients never
        // leave it; the few statistics go through the engine's host path.
        let mut bufs: Vec<&mut dyn std::any::Any> = self.acc.iter_mut().map(|a| a as &mut dyn std::any::Any).collect();
        if let Some(r) = c.all_reduce_buffers(&mut bufs) {
            r.context("all-reducing the gradients on the device")?;
            let mut stats = st.to_array();
            c.all_reduce_sum(&mut stats).context("all-reducing the step's statistics")?;
            return Ok(StepStats::from_array(&stats));
        }
        drop(bufs);
        self.msg.clear();
        for a in &self.acc {
            be.read_host(B::view(a), |h| self.msg.extend_from_slice(h));
        }
        self.msg.extend_from_slice(&st.to_array());
        c.all_reduce_sum(&mut self.msg)?;
        let mut at = 0;
        for a in &mut self.acc {
            let n = B::buf_len(a);
            let src = &self.msg[at..at + n];
            be.write_host(a, n, |d| d.copy_from_slice(src));
            at += n;
        }
        Ok(StepStats::from_array(&self.msg[at..at + N_STATS]))
    }

    /// Group `g`'s gradient = its sum × `inv` (1 / parts).
    pub fn write_mean(&self, be: &B, g: usize, inv: f32, p: &mut Params<B>) {
        be.scale(B::view(&self.acc[g]), inv, B::view_mut(&mut p.grad));
    }
}

/// An optimiser read from a checkpoint (host buffers) on the backend `be`, checked against
/// the group's size.
pub fn adamw_on<B: Backend>(be: &B, o: &AdamW, n: usize) -> Result<AdamW<B>> {
    if o.m.len() != n || o.v.len() != n {
        bail!("optimiser state has {} values, the group {n} parameters", o.m.len());
    }
    let mut out = AdamW::new_on(be.clone(), 0, o.settings());
    be.write_host(&mut out.m, n, |d| d.copy_from_slice(&o.m));
    be.write_host(&mut out.v, n, |d| d.copy_from_slice(&o.v));
    out.t = o.t;
    Ok(out)
}

/// Rank 0's side of a buffer broadcast (through host memory).
fn send_buf<B: Backend>(be: &B, c: &mut dyn Collective, b: &B::Buf, what: &str) -> Result<()> {
    let mut host = be.to_host(B::view(b));
    c.broadcast_f32(&mut host).with_context(|| format!("sending the starting {what} to the other ranks"))
}

/// The other ranks' side of [`send_buf`]: `b` gets rank 0's `n` values.
fn receive_buf<B: Backend>(be: &B, c: &mut dyn Collective, b: &mut B::Buf, n: usize, what: &str) -> Result<()> {
    let mut host = vec![0.0; n];
    c.broadcast_f32(&mut host).with_context(|| format!("receiving the starting {what} from rank 0"))?;
    be.write_host(b, n, |d| d.copy_from_slice(&host));
    Ok(())
}

/// Rank 0's side of the start of a data-parallel run: model sizes, optimiser settings and
/// trainer state (JSON), then each group's weights and AdamW moments.
pub fn send_start<B: Backend, T: Task<B>>(
    be: &B,
    c: &mut dyn Collective,
    model: &T::Model,
    opt: &[AdamW<B>],
    state: &TrainerState,
) -> Result<()> {
    let (config, extra) = T::describe(model);
    let groups: Vec<serde_json::Value> = opt
        .iter()
        .map(|o| {
            let s = o.settings();
            json!({"adam": [s.lr, s.beta1, s.beta2, s.eps, s.weight_decay], "adam_t": o.t})
        })
        .collect();
    let head = json!({"model_config": config, "model_extra": extra, "state": state, "groups": groups});
    let mut bytes = head.to_string().into_bytes();
    c.broadcast_bytes(&mut bytes).context("sending the starting state to the other ranks")?;
    for ((name, p), o) in T::groups(model).into_iter().zip(opt) {
        for (what, buf) in [("weights", &p.data), ("AdamW m", &o.m), ("AdamW v", &o.v)] {
            send_buf(be, c, buf, &format!("{what} of {name}"))?;
        }
    }
    Ok(())
}

/// The other ranks' side of [`send_start`].
pub fn receive_start<B: Backend, T: Task<B>>(
    be: &B,
    task: &mut T,
    c: &mut dyn Collective,
) -> Result<(T::Model, Vec<AdamW<B>>, TrainerState)> {
    let mut bytes = Vec::new();
    c.broadcast_bytes(&mut bytes).context("receiving the starting state from rank 0")?;
    let head: serde_json::Value = serde_json::from_slice(&bytes).context("rank 0's starting state")?;
    let config = serde_json::from_value(head["model_config"].clone()).context("rank 0's model sizes")?;
    let state: TrainerState = serde_json::from_value(head["state"].clone()).context("rank 0's trainer state")?;
    let mut model = task.build(be, config, &head["model_extra"])?;
    let groups = head["groups"].as_array().context("rank 0's optimiser groups")?;
    let mut opt = Vec::new();
    for (g, (name, p)) in T::groups_mut(&mut model).into_iter().enumerate() {
        let spec = groups.get(g).with_context(|| format!("rank 0 sent no optimiser for group {name}"))?;
        let a: Vec<f32> = serde_json::from_value(spec["adam"].clone()).context("rank 0's AdamW settings")?;
        if a.len() != 5 {
            bail!("rank 0's AdamW settings: 5 values expected, got {}", a.len());
        }
        let n = p.len();
        let s = AdamWSettings { lr: a[0], beta1: a[1], beta2: a[2], eps: a[3], weight_decay: a[4] };
        let mut o = AdamW::new_on(be.clone(), n, s);
        o.t = spec["adam_t"].as_u64().context("rank 0's AdamW step count")?;
        receive_buf(be, c, &mut p.data, n, &format!("weights of {name}"))?;
        receive_buf(be, c, &mut o.m, n, &format!("AdamW m of {name}"))?;
        receive_buf(be, c, &mut o.v, n, &format!("AdamW v of {name}"))?;
        opt.push(o);
    }
    Ok((model, opt, state))
}
