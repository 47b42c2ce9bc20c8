//! Training checkpoints: one safetensors file holding everything a run needs to continue
//! exactly where it stopped: the weights (`param.<published name>`), the AdamW moments
//! (`optim.m`, `optim.v`, flat, same layout as the parameter buffer), and in the metadata the
//! optimiser step count, the RNG state, epoch / batch / step counters, the best monitored
//! value so far and the run's config.
//!
//! Writes go to a temporary sibling and are renamed into place (atomic on POSIX), so a crash
//! mid-save leaves the previous checkpoint intact; readers only ever open the final names,
//! never a leftover temporary.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use demovlp_model::io::{read_safetensors, write_safetensors_refs, TensorRef};
use demovlp_model::{AdamW, ModelConfig, Params};
use serde::{Deserialize, Serialize};

pub const LATEST: &str = "checkpoint_latest.safetensors";
pub const BEST: &str = "checkpoint_best.safetensors";
const META_KEY: &str = "demovlp_train_state";
const FORMAT: &str = "demovlp-train-checkpoint-v1";

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
}

fn one() -> usize {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    state: TrainerState,
    model_config: ModelConfig,
    /// The run's TOML config, verbatim.
    config: String,
    adam_t: u64,
    adam_lr: f32,
    adam_betas: [f32; 2],
    adam_eps: f32,
    adam_weight_decay: f32,
}

/// A checkpoint read back from disk.
pub struct Checkpoint {
    pub path: PathBuf,
    pub state: TrainerState,
    pub model_config: ModelConfig,
    pub config: String,
    /// Parameters by published name, in file order.
    pub params: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub optimizer: AdamW,
}

pub fn save(path: &Path, model_config: &ModelConfig, params: &Params, opt: &AdamW, state: &TrainerState, config: &str) -> Result<()> {
    if opt.m.len() != params.len() || opt.v.len() != params.len() {
        bail!("optimiser state has {} values for {} parameters", opt.m.len(), params.len());
    }
    let mut tensors: Vec<(String, Vec<usize>, TensorRef)> = params
        .specs()
        .iter()
        .map(|s| (format!("param.{}", s.name), s.shape.clone(), TensorRef::F32(&params.data[s.offset..s.offset + s.len])))
        .collect();
    tensors.push(("optim.m".into(), vec![opt.m.len()], TensorRef::F32(&opt.m)));
    tensors.push(("optim.v".into(), vec![opt.v.len()], TensorRef::F32(&opt.v)));
    let meta = Meta {
        format: FORMAT.into(),
        state: state.clone(),
        model_config: model_config.clone(),
        config: config.into(),
        adam_t: opt.t,
        adam_lr: opt.lr,
        adam_betas: [opt.beta1, opt.beta2],
        adam_eps: opt.eps,
        adam_weight_decay: opt.weight_decay,
    };
    let meta = serde_json::to_string(&meta)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_safetensors_refs(path, &tensors, &[(META_KEY.to_string(), meta)]).with_context(|| format!("saving checkpoint {}", path.display()))
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
    let file = read_safetensors(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let meta = file
        .metadata
        .get(META_KEY)
        .with_context(|| format!("{}: not a demovlp training checkpoint (no {META_KEY} metadata)", path.display()))?;
    let meta: Meta = serde_json::from_str(meta).with_context(|| format!("{}: bad checkpoint metadata", path.display()))?;
    if meta.format != FORMAT {
        bail!("{}: checkpoint format {:?}, this build reads {FORMAT:?}", path.display(), meta.format);
    }
    let mut params = Vec::new();
    for (name, t) in &file.tensors {
        if let Some(n) = name.strip_prefix("param.") {
            let v = t.as_f32().with_context(|| format!("{}: tensor {name} is not f32", path.display()))?;
            params.push((n.to_string(), t.shape.clone(), v.to_vec()));
        }
    }
    let mut opt = AdamW::new(0, meta.adam_lr, meta.adam_betas[0], meta.adam_betas[1], meta.adam_eps, meta.adam_weight_decay);
    opt.m = file.f32("optim.m").with_context(|| format!("{}: optimiser state", path.display()))?;
    opt.v = file.f32("optim.v").with_context(|| format!("{}: optimiser state", path.display()))?;
    opt.t = meta.adam_t;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        state: meta.state,
        model_config: meta.model_config,
        config: meta.config,
        params,
        optimizer: opt,
    })
}

impl Checkpoint {
    /// Copy the weights into `params` (same model config): every parameter must be present
    /// with its shape, and nothing else may be in the file.
    pub fn fill_params(&self, params: &mut Params) -> Result<()> {
        let mut seen = vec![false; params.specs().len()];
        for (name, shape, v) in &self.params {
            let id = params.id(name).with_context(|| format!("{}: parameter {name} is not in the model", self.path.display()))?;
            if &params.spec(id).shape != shape {
                bail!("{}: parameter {name} has shape {shape:?}, the model wants {:?}", self.path.display(), params.spec(id).shape);
            }
            params.get_mut(id).copy_from_slice(v);
            seen[id.0] = true;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!("{}: parameter {} missing", self.path.display(), params.specs()[i].name);
        }
        Ok(())
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
        assert_eq!((c.optimizer.m, c.optimizer.v, c.optimizer.t), (opt.m, opt.v, opt.t));
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
