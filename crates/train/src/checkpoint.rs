//! Training checkpoints: one safetensors file holding everything a run needs to continue
//! exactly where it stopped, for every task: the weights of each parameter group
//! (`param.<published name>`; names are unique across groups), each group's AdamW moments
//! (`optim.<group>.m`, `optim.<group>.v`, flat, in the group's parameter layout), and in
//! the metadata the task, the groups' optimiser settings and step counts, the trainer state
//! (RNG, epoch / batch / step counters, best monitored value), the model's sizes and the
//! run's config. A checkpoint names no device: it is written tensor by tensor from
//! whichever backend holds the model (one tensor in host memory at a time) and loads onto
//! any.
//!
//! Writes go to a temporary sibling and are renamed into place (atomic on POSIX), so a crash
//! mid-save leaves the previous checkpoint intact; readers only ever open the final names,
//! never a leftover temporary. The content checksum covers every tensor.
//!
//! The first layout (`demovlp-train-checkpoint-v1`: one group, `optim.m` / `optim.v`)
//! still loads, as the group `model`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use demovlp_model::io::{read_safetensors, write_safetensors_streamed};
use demovlp_model::{AdamW, Backend, ModelConfig, Params};
use serde::{Deserialize, Serialize};

pub const LATEST: &str = "checkpoint_latest.safetensors";
pub const BEST: &str = "checkpoint_best.safetensors";
const META_KEY: &str = "demovlp_train_state";
const FORMAT_V1: &str = "demovlp-train-checkpoint-v1";
const FORMAT: &str = "demovlp-train-checkpoint-v2";
/// The one group of a v1 checkpoint (a retrieval model's parameters).
pub const V1_GROUP: &str = "model";

/// Where a run is: enough to regenerate the data order and continue bit for bit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Epoch in progress (1-based).
    pub epoch: usize,
    /// Next batch of that epoch.
    pub batch_in_epoch: usize,
    /// Optimiser steps taken so far.
    pub step: u64,
    /// Seed of the epoch in progress (its sample order, frame and caption draws).
    pub epoch_seed: u64,
    /// The run's generator, after drawing `epoch_seed`.
    pub rng: [u64; 4],
    /// The model's text-dropout generator.
    pub dropout_rng: [u64; 4],
    pub samples_seen: u64,
    /// Best monitored value so far and the epoch that reached it.
    pub best: Option<f64>,
    pub best_epoch: Option<usize>,
    pub epochs_since_best: usize,
    /// Training finished (all epochs, max_steps, or early stopping).
    pub finished: bool,
    /// Micro-batches per optimiser step of the run that wrote it (world size ×
    /// `accumulate_steps`): what `batch_in_epoch` counts in. 1 in checkpoints of earlier runs.
    #[serde(default = "one")]
    pub parts_per_step: usize,
    /// Sum of the training losses of the epoch's steps so far, and their number (so that an
    /// epoch resumed in its middle reports the same mean loss as an uninterrupted one).
    #[serde(default)]
    pub epoch_loss_sum: f64,
    #[serde(default)]
    pub epoch_steps: usize,
}

fn one() -> usize {
    1
}

/// One parameter group's optimiser settings and step count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct GroupMeta {
    name: String,
    adam_t: u64,
    adam_lr: f32,
    adam_betas: [f32; 2],
    adam_eps: f32,
    adam_weight_decay: f32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    /// `retrieval`, `qa` (absent in v1: retrieval).
    #[serde(default)]
    task: Option<String>,
    state: TrainerState,
    model_config: ModelConfig,
    /// What else the task's model needs to be rebuilt (the QA head's sizes).
    #[serde(default)]
    model_extra: serde_json::Value,
    /// The run's TOML config, verbatim.
    config: String,
    #[serde(default)]
    groups: Vec<GroupMeta>,
    // v1: the one optimiser's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adam_t: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adam_lr: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adam_betas: Option<[f32; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adam_eps: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adam_weight_decay: Option<f32>,
}

/// A parameter group as saved: its name, its parameters and its optimiser.
pub struct GroupRef<'a, B: Backend> {
    pub name: &'static str,
    pub params: &'a Params<B>,
    pub opt: &'a AdamW<B>,
}

/// What a checkpoint says about the model and the run, besides the tensors.
pub struct CheckpointInfo<'a> {
    /// `retrieval` or `qa`.
    pub task: &'a str,
    pub model_config: &'a ModelConfig,
    pub model_extra: serde_json::Value,
    pub state: &'a TrainerState,
    pub config: &'a str,
}

/// A checkpoint read back from disk.
pub struct Checkpoint {
    pub path: PathBuf,
    pub task: String,
    pub state: TrainerState,
    pub model_config: ModelConfig,
    pub model_extra: serde_json::Value,
    pub config: String,
    /// Parameters by published name, in file order.
    pub params: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Each group's optimiser (host buffers), in the saved group order.
    pub optimizers: Vec<(String, AdamW)>,
}

/// Writes a checkpoint of `groups` (on the backend `be`), one tensor at a time.
pub fn save_groups<B: Backend>(path: &Path, be: &B, info: &CheckpointInfo<'_>, groups: &[GroupRef<'_, B>]) -> Result<()> {
    // (tensor name, shape, group, what: None = parameter i of the group's specs, Some(0|1) = m|v)
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    let mut source: Vec<(usize, Option<usize>, usize)> = Vec::new();
    for (g, gr) in groups.iter().enumerate() {
        let n = gr.params.len();
        if B::buf_len(&gr.opt.m) != n || B::buf_len(&gr.opt.v) != n {
            bail!("group {}: optimiser state has {} values for {n} parameters", gr.name, B::buf_len(&gr.opt.m));
        }
        for (i, s) in gr.params.specs().iter().enumerate() {
            tensors.push((format!("param.{}", s.name), s.shape.clone()));
            source.push((g, None, i));
        }
        for (k, what) in ["m", "v"].iter().enumerate() {
            tensors.push((format!("optim.{}.{what}", gr.name), vec![n]));
            source.push((g, Some(k), 0));
        }
    }
    let meta = Meta {
        format: FORMAT.into(),
        task: Some(info.task.to_string()),
        state: info.state.clone(),
        model_config: info.model_config.clone(),
        model_extra: info.model_extra.clone(),
        config: info.config.into(),
        groups: groups
            .iter()
            .map(|g| GroupMeta {
                name: g.name.into(),
                adam_t: g.opt.t,
                adam_lr: g.opt.lr,
                adam_betas: [g.opt.beta1, g.opt.beta2],
                adam_eps: g.opt.eps,
                adam_weight_decay: g.opt.weight_decay,
            })
            .collect(),
        adam_t: None,
        adam_lr: None,
        adam_betas: None,
        adam_eps: None,
        adam_weight_decay: None,
    };
    let meta = serde_json::to_string(&meta)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut fetch = |i: usize, sink: &mut dyn FnMut(&[f32]) -> Result<()>| -> Result<()> {
        let (g, what, p) = source[i];
        let gr = &groups[g];
        let view = match what {
            None => B::slice(B::view(&gr.params.data), gr.params.range(demovlp_model::ParamId(p))),
            Some(0) => B::view(&gr.opt.m),
            Some(_) => B::view(&gr.opt.v),
        };
        be.read_host(view, |h| sink(h))
    };
    write_safetensors_streamed(path, &tensors, &[(META_KEY.to_string(), meta)], &mut fetch)
        .with_context(|| format!("saving checkpoint {}", path.display()))
}

/// A retrieval model's checkpoint (one group, `model`), on the CPU.
pub fn save(path: &Path, model_config: &ModelConfig, params: &Params, opt: &AdamW, state: &TrainerState, config: &str) -> Result<()> {
    let info = CheckpointInfo { task: "retrieval", model_config, model_extra: serde_json::Value::Null, state, config };
    save_groups(path, &demovlp_model::Cpu, &info, &[GroupRef { name: V1_GROUP, params, opt }])
}

/// Remove the temporary files (`.<name>.<pid>.tmp`, see `demovlp_model::io::atomic_write_with`)
/// that a run killed mid-save left in `dir`, when the process that wrote them is gone.
/// Returns the removed paths.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.').and_then(|r| r.strip_suffix(".tmp")) else { continue };
        let Some((_, pid)) = rest.rsplit_once('.') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let p = e.path();
        std::fs::remove_file(&p).with_context(|| format!("removing stale temporary {}", p.display()))?;
        removed.push(p);
    }
    removed.sort();
    Ok(removed)
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // Signal 0 checks existence; EPERM means it exists but belongs to someone else.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Is this file one of our training checkpoints (cheap check of the metadata)?
pub fn is_checkpoint(path: &Path) -> bool {
    read_header_meta(path).map(|m| m.contains_key(META_KEY)).unwrap_or(false)
}

/// The training run's TOML config saved in a checkpoint, read from the header only (the
/// weights are not read).
pub fn read_config_text(path: &Path) -> Result<String> {
    let m = read_header_meta(path).with_context(|| format!("reading the header of {}", path.display()))?;
    let meta =
        m.get(META_KEY).with_context(|| format!("{}: not a demovlp training checkpoint (no {META_KEY} metadata)", path.display()))?;
    let meta: Meta = serde_json::from_str(meta).with_context(|| format!("{}: bad checkpoint metadata", path.display()))?;
    Ok(meta.config)
}

fn read_header_meta(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        bail!("not a safetensors file");
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)?;
    let v: serde_json::Value = serde_json::from_slice(&h)?;
    Ok(v.get("__metadata__").and_then(|m| serde_json::from_value(m.clone()).ok()).unwrap_or_default())
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let mut file = read_safetensors(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let meta = file
        .metadata
        .get(META_KEY)
        .with_context(|| format!("{}: not a demovlp training checkpoint (no {META_KEY} metadata)", path.display()))?;
    let meta: Meta = serde_json::from_str(meta).with_context(|| format!("{}: bad checkpoint metadata", path.display()))?;
    let groups = match meta.format.as_str() {
        FORMAT => meta.groups.clone(),
        FORMAT_V1 => {
            let missing = || format!("{}: v1 checkpoint metadata lacks the optimiser settings", path.display());
            vec![GroupMeta {
                name: V1_GROUP.into(),
                adam_t: meta.adam_t.with_context(missing)?,
                adam_lr: meta.adam_lr.with_context(missing)?,
                adam_betas: meta.adam_betas.with_context(missing)?,
                adam_eps: meta.adam_eps.with_context(missing)?,
                adam_weight_decay: meta.adam_weight_decay.with_context(missing)?,
            }]
        }
        f => bail!("{}: checkpoint format {f:?}, this build reads {FORMAT:?} and {FORMAT_V1:?}", path.display()),
    };
    if groups.is_empty() {
        bail!("{}: the checkpoint lists no parameter group", path.display());
    }
    let mut optimizers = Vec::new();
    for g in &groups {
        let mut opt = AdamW::new(0, g.adam_lr, g.adam_betas[0], g.adam_betas[1], g.adam_eps, g.adam_weight_decay);
        let (km, kv) = if meta.format == FORMAT_V1 {
            ("optim.m".to_string(), "optim.v".to_string())
        } else {
            (format!("optim.{}.m", g.name), format!("optim.{}.v", g.name))
        };
        opt.m = file.f32(&km).with_context(|| format!("{}: optimiser state of group {}", path.display(), g.name))?;
        opt.v = file.f32(&kv).with_context(|| format!("{}: optimiser state of group {}", path.display(), g.name))?;
        opt.t = g.adam_t;
        optimizers.push((g.name.clone(), opt));
    }
    let mut params = Vec::new();
    for (name, t) in std::mem::take(&mut file.tensors) {
        if let Some(n) = name.strip_prefix("param.") {
            let v = t.to_f32().with_context(|| format!("{}: tensor {name} is not f32", path.display()))?;
            params.push((n.to_string(), t.shape.clone(), v));
        }
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        task: meta.task.unwrap_or_else(|| "retrieval".into()),
        state: meta.state,
        model_config: meta.model_config,
        model_extra: meta.model_extra,
        config: meta.config,
        params,
        optimizers,
    })
}

impl Checkpoint {
    /// The first group's optimiser (the only one of a retrieval checkpoint).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizers[0].1
    }

    /// The optimiser of group `name`.
    pub fn group_optimizer(&self, name: &str) -> Result<&AdamW> {
        self.optimizers.iter().find(|(n, _)| n == name).map(|(_, o)| o).with_context(|| {
            let have: Vec<&str> = self.optimizers.iter().map(|(n, _)| n.as_str()).collect();
            format!("{}: no parameter group {name:?} (it has {})", self.path.display(), have.join(", "))
        })
    }

    /// Copy the weights into `params` (same model config): every parameter must be present
    /// with its shape, and nothing else may be in the file.
    pub fn fill_params(&self, params: &mut Params) -> Result<()> {
        let used = self.fill_group(&demovlp_model::Cpu, params)?;
        if used != self.params.len() {
            let extra = self.params.iter().find(|(n, _, _)| params.id(n).is_none()).map(|(n, _, _)| n.as_str()).unwrap_or("?");
            bail!("{}: parameter {extra} is not in the model", self.path.display());
        }
        Ok(())
    }

    /// Copy the group's weights from the file into `params` on the backend `be` (written
    /// tensor by tensor): every parameter of the group must be present with its shape.
    /// Returns how many of the file's parameters it used.
    pub fn fill_group<B: Backend>(&self, be: &B, params: &mut Params<B>) -> Result<usize> {
        let mut seen = vec![false; params.specs().len()];
        let mut used = 0;
        for (name, shape, v) in &self.params {
            let Some(id) = params.id(name) else { continue };
            if &params.spec(id).shape != shape {
                bail!("{}: parameter {name} has shape {shape:?}, the model wants {:?}", self.path.display(), params.spec(id).shape);
            }
            let r = params.range(id);
            be.modify_host(&mut params.data, r, |d| d.copy_from_slice(v));
            seen[id.0] = true;
            used += 1;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!("{}: parameter {} missing", self.path.display(), params.specs()[i].name);
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use demovlp_model::ParamsBuilder;

    fn tiny() -> (Params, AdamW) {
        let mut b = ParamsBuilder::new();
        b.add("a.weight", &[2, 3]);
        b.add_unused("a.norm3.weight", &[2]);
        let mut p = b.build();
        p.data.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32 * 0.5 - 1.0);
        let mut opt = AdamW::new(p.len(), 1e-3, 0.9, 0.999, 1e-6, 0.0);
        opt.m.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        opt.v[3] = 7.0;
        opt.t = 5;
        (p, opt)
    }

    fn state() -> TrainerState {
        TrainerState {
            epoch: 2,
            batch_in_epoch: 3,
            step: 11,
            epoch_seed: 99,
            rng: [1, 2, 3, u64::MAX],
            dropout_rng: [5, 6, 7, 8],
            samples_seen: 44,
            best: Some(12.5),
            best_epoch: Some(1),
            epochs_since_best: 0,
            finished: false,
            parts_per_step: 1,
            epoch_loss_sum: 1.5,
            epoch_steps: 3,
        }
    }

    fn model_config() -> ModelConfig {
        ModelConfig::published(1)
    }

    #[test]
    fn round_trip_is_exact() {
        let dir = std::env::temp_dir().join(format!("demovlp-ckpt-{}", std::process::id()));
        let (p, opt) = tiny();
        let path = dir.join(LATEST);
        save(&path, &model_config(), &p, &opt, &state(), "name = \"x\"").unwrap();
        assert!(is_checkpoint(&path));
        let c = load(&path).unwrap();
        assert_eq!(c.state, state());
        assert_eq!(c.config, "name = \"x\"");
        assert_eq!(c.model_config, model_config());
        let mut q = tiny().0;
        q.data.iter_mut().for_each(|x| *x = 0.0);
        c.fill_params(&mut q).unwrap();
        assert_eq!(q.data, p.data);
        assert_eq!((&c.optimizer().m, &c.optimizer().v, c.optimizer().t), (&opt.m, &opt.v, opt.t));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn leftover_temp_file_is_never_read() {
        let dir = std::env::temp_dir().join(format!("demovlp-ckpt-tmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (p, opt) = tiny();
        let path = dir.join(LATEST);
        save(&path, &model_config(), &p, &opt, &state(), "").unwrap();
        // A crash mid-save leaves a partial temporary next to the good checkpoint.
        let good = std::fs::read(&path).unwrap();
        std::fs::write(dir.join(format!(".{LATEST}.12345.tmp")), &good[..good.len() / 2]).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.state, state());
        // Saving again replaces the file in one step, leaving no temporary of ours behind.
        let mut s2 = state();
        s2.step = 12;
        save(&path, &model_config(), &p, &opt, &s2, "").unwrap();
        assert_eq!(load(&path).unwrap().state.step, 12);
        let ours = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(&std::process::id().to_string()))
            .count();
        assert_eq!(ours, 0);
        // A flipped bit in the weights or moments is an error naming the file.
        let mut flipped = good.clone();
        let at = flipped.len() - 5;
        flipped[at] ^= 0x10;
        std::fs::write(&path, &flipped).unwrap();
        let e = format!("{:#}", load(&path).err().expect("flipped bit must fail"));
        assert!(e.contains(LATEST) && e.contains("checksum mismatch"), "{e}");
        // A truncated final file is an error naming it, not a silent restart.
        std::fs::write(&path, &good[..good.len() - 9]).unwrap();
        let e = format!("{:#}", load(&path).err().expect("truncated checkpoint must fail"));
        assert!(e.contains(LATEST), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn stale_temporaries_of_dead_runs_are_removed_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("demovlp-ckpt-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A pid that cannot be alive (above the kernel's pid_max limit of 2^22).
        let dead = dir.join(format!(".{LATEST}.{}.tmp", (1u32 << 22) + 17));
        let ours = dir.join(format!(".{LATEST}.{}.tmp", std::process::id()));
        let live = dir.join(format!(".{BEST}.1.tmp")); // init is always alive
        let other = dir.join("notes.tmp");
        for p in [&dead, &ours, &live, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        assert_eq!(remove_stale_temporaries(&dir).unwrap(), vec![dead.clone()]);
        assert!(!dead.exists() && ours.exists() && live.exists() && other.exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn shape_mismatch_and_missing_params_are_errors() {
        let dir = std::env::temp_dir().join(format!("demovlp-ckpt-shape-{}", std::process::id()));
        let (p, opt) = tiny();
        let path = dir.join(BEST);
        save(&path, &model_config(), &p, &opt, &state(), "").unwrap();
        let c = load(&path).unwrap();
        let mut b = ParamsBuilder::new();
        b.add("a.weight", &[3, 2]);
        b.add_unused("a.norm3.weight", &[2]);
        assert!(format!("{:#}", c.fill_params(&mut b.build()).unwrap_err()).contains("a.weight"));
        let mut b = ParamsBuilder::new();
        b.add("a.weight", &[2, 3]);
        b.add_unused("a.norm3.weight", &[2]);
        b.add("b.bias", &[1]);
        assert!(format!("{:#}", c.fill_params(&mut b.build()).unwrap_err()).contains("b.bias"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
