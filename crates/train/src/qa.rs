//! Video QA model directories and weight import (SPEC §8).
//!
//! A **QA model directory** is a retrieval model directory whose `config.json` also holds
//! the head's sizes and whose `model.safetensors` also holds the head's tensors — the
//! published `ObjectQARelation` state_dict in one file:
//! - `config.json`: the [`ModelConfig`] fields plus `"qa_head": {"dim", "hidden", "answers"}`;
//! - `model.safetensors`: `text_model.*`, `object_model.*`, `txt_proj.*` and `head.*` under
//!   the published names (`weight_g` of a weight-normalised layer stored as shape `[1]`);
//! - `answers.json` (optional): the answer vocabulary, a JSON list of strings in label order.
//!
//! A plain retrieval directory is refused by [`load_qa_dir`] with a message that says so,
//! and the retrieval loader refuses a QA directory (its config has an unknown field).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use demovlp_model::io::{
    atomic_write, infer_config, load_all_params, read_safetensors, read_weights, select_prefix, write_safetensors_streamed, LoadReport,
    Tensor,
};
use demovlp_model::qa::{QaHead, QaHeadConfig, QaModel};
use demovlp_model::{declare_params, Backend, Model, ModelConfig};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const ANSWERS_FILE: &str = "answers.json";
/// The key of the head's sizes in `config.json`.
pub const HEAD_KEY: &str = "qa_head";
/// The published prefix of the head's tensors.
pub const HEAD_PREFIX: &str = "head.";

/// Whether `dir/config.json` describes a QA model (has `qa_head`).
pub fn is_qa_dir(dir: &Path) -> bool {
    fs::read_to_string(dir.join(CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get(HEAD_KEY).is_some())
}

/// Write a QA model directory (see the module docs), each file atomically.
pub fn save_qa_dir(model: &QaModel, answers: Option<&[String]>, dir: &Path) -> Result<()> {
    save_qa_dir_on(&demovlp_model::Cpu, model, answers, dir)
}

/// [`save_qa_dir`] of a model on any backend: the weights are read back one tensor at a
/// time (no host copy of the whole model).
pub fn save_qa_dir_on<B: Backend>(be: &B, model: &QaModel<B>, answers: Option<&[String]>, dir: &Path) -> Result<()> {
    ensure!(answers.is_none_or(|a| a.len() == model.head.config.answers), "answer vocabulary size differs from the head's");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cfg = serde_json::to_value(&model.base.config)?;
    cfg.as_object_mut().context("model config is not an object")?.insert(HEAD_KEY.into(), serde_json::to_value(model.head.config)?);
    let groups = [&model.base.params, &model.head.params];
    let mut tensors = Vec::new();
    let mut source = Vec::new();
    for (g, p) in groups.iter().enumerate() {
        for (i, s) in p.specs().iter().enumerate() {
            tensors.push((s.name.clone(), s.shape.clone()));
            source.push((g, i));
        }
    }
    let mut fetch = |i: usize, sink: &mut dyn FnMut(&[f32]) -> Result<()>| -> Result<()> {
        let (g, k) = source[i];
        let p = groups[g];
        be.read_host(B::slice(B::view(&p.data), p.range(demovlp_model::ParamId(k))), |h| sink(h))
    };
    write_safetensors_streamed(&dir.join(WEIGHTS_FILE), &tensors, &[("format".into(), "pt".into())], &mut fetch)?;
    if let Some(a) = answers {
        atomic_write(&dir.join(ANSWERS_FILE), (serde_json::to_string(a)? + "\n").as_bytes())?;
    }
    atomic_write(&dir.join(CONFIG_FILE), (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())
}

/// A loaded QA model directory.
pub struct QaDir {
    pub model: QaModel,
    /// The answer vocabulary when the directory has one.
    pub answers: Option<Vec<String>>,
}

/// Load a QA model directory (every tensor present, no extras).
pub fn load_qa_dir(dir: &Path) -> Result<QaDir> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {} (is {} a model directory?)", cfg_path.display(), dir.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cfg_path.display()))?;
    let Some(head_cfg) = v.as_object_mut().and_then(|o| o.remove(HEAD_KEY)) else {
        bail!(
            "{} is a retrieval model directory, not a QA model: its config.json has no \"{HEAD_KEY}\" (import weights that hold head.* \
             tensors, or fine-tune one for QA)",
            dir.display()
        );
    };
    let head_cfg: QaHeadConfig = serde_json::from_value(head_cfg)
        .with_context(|| format!("{}: \"{HEAD_KEY}\" is not {{dim, hidden, answers}}", cfg_path.display()))?;
    let config: ModelConfig = serde_json::from_value(v).with_context(|| format!("{}: not a demovlp model config", cfg_path.display()))?;
    ensure!(
        head_cfg.dim == config.proj_dim,
        "{}: the head's width {} is not the model's projection width {}",
        cfg_path.display(),
        head_cfg.dim,
        config.proj_dim
    );
    let weights = dir.join(WEIGHTS_FILE);
    let st = read_safetensors(&weights)?;
    let (head_t, base_t): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) =
        st.tensors.into_iter().partition(|(k, _)| k.starts_with(HEAD_PREFIX));
    let what = weights.display().to_string();
    let mut params = declare_params(&config);
    load_all_params(&mut params, &base_t, true, &what)?;
    let head = load_head(head_cfg, &head_t, &what)?;
    let answers = match fs::read_to_string(dir.join(ANSWERS_FILE)) {
        Ok(t) => {
            let a: Vec<String> = serde_json::from_str(&t)
                .with_context(|| format!("{}: expected a JSON list of answers", dir.join(ANSWERS_FILE).display()))?;
            ensure!(a.len() == head_cfg.answers, "{}: {} answers, the head has {}", dir.display(), a.len(), head_cfg.answers);
            Some(a)
        }
        Err(_) => None,
    };
    Ok(QaDir { model: QaModel::new(Model::from_params(config, params), head), answers })
}

/// torch stores a scalar `weight_g` as a 0-d tensor; ours is `[1]`.
fn scalar_as_1(mut t: Tensor) -> Tensor {
    if t.shape.is_empty() {
        t.shape = vec![1];
    }
    t
}

/// The head's sizes from its tensors' shapes (`v_proj` [H, P], `main.3` [answers, 2H]).
pub fn infer_head_config(head: &BTreeMap<String, Tensor>) -> Result<QaHeadConfig> {
    let shape = |n: &str| head.get(n).map(|t| t.shape.clone()).with_context(|| format!("head tensors lack {n}"));
    let v = shape("head.v_att.v_proj.main.0.weight_v")?;
    let c = shape("head.classifier.main.3.weight")?;
    ensure!(v.len() == 2 && c.len() == 2, "head tensors: unexpected shapes {v:?}, {c:?}");
    ensure!(c[1] == 2 * v[0], "head.classifier.main.3.weight is {c:?}, expected [answers, {}]", 2 * v[0]);
    Ok(QaHeadConfig { dim: v[1], hidden: v[0], answers: c[0] })
}

/// A head of `cfg` filled from `t` (every head tensor, no extras; 0-d scalars accepted).
pub fn load_head(cfg: QaHeadConfig, t: &BTreeMap<String, Tensor>, what: &str) -> Result<QaHead> {
    let t: BTreeMap<String, Tensor> = t.iter().map(|(k, v)| (k.clone(), scalar_as_1(v.clone()))).collect();
    let mut head = QaHead::new(cfg);
    let r = load_all_params(&mut head.params, &t, true, what)?;
    ensure!(r.missing.is_empty(), "{what}: head tensors missing: {}", r.missing.join(", "));
    Ok(head)
}

/// Import published-name weights holding `head.*` tensors (a QA trainer `.pth`, or a
/// recording with `key_prefix = "param."`) as a QA model. `Ok(None)` when there are no
/// head tensors (a retrieval model: use the retrieval import).
pub fn import_qa_weights(
    path: &Path,
    key_prefix: Option<&str>,
    text_heads: usize,
    video_heads: usize,
) -> Result<Option<(QaModel, LoadReport)>> {
    let mut t = read_weights(path)?;
    if let Some(p) = key_prefix.filter(|p| !p.is_empty()) {
        t = select_prefix(t, p, path)?;
    }
    if !t.keys().any(|k| k.starts_with(HEAD_PREFIX)) {
        return Ok(None);
    }
    let (head_t, base_t): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) =
        t.into_iter().partition(|(k, _)| k.starts_with(HEAD_PREFIX));
    let what = path.display().to_string();
    let config = infer_config(&base_t, text_heads, video_heads).with_context(|| what.clone())?;
    let mut params = declare_params(&config);
    let mut report = load_all_params(&mut params, &base_t, false, &what)?;
    let hc = infer_head_config(&head_t).with_context(|| what.clone())?;
    ensure!(hc.dim == config.proj_dim, "{what}: the head's input width {} is not the projection width {}", hc.dim, config.proj_dim);
    let head = load_head(hc, &head_t, &what)?;
    report.loaded.extend(head_t.keys().cloned());
    Ok(Some((QaModel::new(Model::from_params(config, params), head), report)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use demovlp_model::{ModelConfig, TextConfig, TextKind, VideoConfig};

    fn tiny() -> QaModel {
        let text = TextConfig {
            kind: TextKind::Distilbert,
            vocab_size: 120,
            dim: 16,
            layers: 1,
            heads: 2,
            hidden_dim: 32,
            max_position_embeddings: 12,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
        };
        let video = VideoConfig {
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_dim: 32,
            max_frames: 2,
            pos_embed_rows: 3,
            feature_dim: 2048,
            box_dim: 6,
            layer_norm_eps: 1e-6,
        };
        let mut base = Model::new(ModelConfig { text, video, proj_dim: 8 });
        base.init_random(1);
        let mut head = QaHead::new(QaHeadConfig { dim: 8, hidden: 6, answers: 5 });
        head.init_random(2);
        QaModel::new(base, head)
    }

    #[test]
    fn qa_dir_round_trips_and_a_retrieval_dir_is_refused() {
        let dir = std::env::temp_dir().join(format!("demovlp-qa-dir-{}", std::process::id()));
        fs::remove_dir_all(&dir).ok();
        let m = tiny();
        let answers: Vec<String> = (0..5).map(|i| format!("a{i}")).collect();
        save_qa_dir(&m, Some(&answers), &dir).unwrap();
        assert!(is_qa_dir(&dir));
        let back = load_qa_dir(&dir).unwrap();
        assert_eq!(back.model.base.params.data, m.base.params.data);
        assert_eq!(back.model.head.params.data, m.head.params.data);
        assert_eq!(back.model.head.config, m.head.config);
        assert_eq!(back.answers.as_deref(), Some(&answers[..]));
        // The retrieval loader refuses it (unknown field), and a retrieval dir is refused here.
        assert!(demovlp_model::io::load_model_dir(&dir).is_err());
        let rdir = dir.join("retrieval");
        demovlp_model::io::save_model_dir(&m.base, &rdir).unwrap();
        assert!(!is_qa_dir(&rdir));
        let e = load_qa_dir(&rdir).err().unwrap().to_string();
        assert!(e.contains("retrieval model directory, not a QA model"), "{e}");
        fs::remove_dir_all(&dir).ok();
    }
}

/// Helpers the crate's tests share.
#[cfg(test)]
pub(crate) mod tests_support {
    use demovlp_model::{Model, ModelConfig, TextConfig, TextKind, VideoConfig};

    pub fn tiny_retrieval_model(vocab: usize, frames: usize) -> Model {
        let text = TextConfig {
            kind: TextKind::Distilbert,
            vocab_size: vocab,
            dim: 16,
            layers: 1,
            heads: 2,
            hidden_dim: 32,
            max_position_embeddings: 24,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
        };
        let video = VideoConfig {
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_dim: 32,
            max_frames: frames,
            pos_embed_rows: 1 + frames,
            feature_dim: 2048,
            box_dim: 6,
            layer_norm_eps: 1e-6,
        };
        Model::new(ModelConfig { text, video, proj_dim: 8 })
    }
}
