//! Weights in and out: safetensors files (read any float dtype as f32, integers as i64;
//! write atomically), filling a [`Params`] by name, and our own model directories
//! (`model.safetensors` with the published state_dict names + `config.json`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::config::{ModelConfig, TextConfig, TextKind, VideoConfig};
use crate::hf;
use crate::model::{declare_params, Model};
use crate::params::Params;

// ---------------------------------------------------------------------------------------
// Tensors

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A named tensor's shape and values, as read from or written to a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data: TensorData::F32(data) }
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data: TensorData::I64(data) }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I64(_) => None,
        }
    }

    /// Values as f32 (integers converted).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        })
    }

    /// Values as i64; float tensors must hold whole numbers.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        match &self.data {
            TensorData::I64(v) => Ok(v.clone()),
            TensorData::F32(v) => {
                v.iter().map(|&x| if x.fract() == 0.0 { Ok(x as i64) } else { bail!("value {x} is not an integer") }).collect()
            }
        }
    }

    pub fn view(&self) -> TensorRef<'_> {
        match &self.data {
            TensorData::F32(v) => TensorRef::F32(v),
            TensorData::I64(v) => TensorRef::I64(v),
        }
    }
}

/// Borrowed tensor values for writing without copies.
#[derive(Clone, Copy, Debug)]
pub enum TensorRef<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// Everything in one safetensors file.
#[derive(Clone, Debug, Default)]
pub struct SafetensorsFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).with_context(|| format!("no tensor named {name:?}"))
    }

    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        self.get(name)?.to_f32().with_context(|| format!("tensor {name:?}"))
    }

    pub fn i64(&self, name: &str) -> Result<Vec<i64>> {
        self.get(name)?.to_i64().with_context(|| format!("tensor {name:?}"))
    }
}

/// Decode raw little-endian tensor bytes of any float or integer dtype.
pub fn decode_tensor(dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
    fn le<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap())).collect()
    }
    let shape = shape.to_vec();
    let t = match dtype {
        Dtype::F32 => Tensor::f32(shape, le(bytes, f32::from_le_bytes)),
        Dtype::F16 => Tensor::f32(shape, le(bytes, |b| half::f16::from_le_bytes(b).to_f32())),
        Dtype::BF16 => Tensor::f32(shape, le(bytes, |b| half::bf16::from_le_bytes(b).to_f32())),
        Dtype::F64 => Tensor::f32(shape, le(bytes, |b| f64::from_le_bytes(b) as f32)),
        Dtype::I64 => Tensor::i64(shape, le(bytes, i64::from_le_bytes)),
        Dtype::I32 => Tensor::i64(shape, le(bytes, |b| i32::from_le_bytes(b) as i64)),
        Dtype::I16 => Tensor::i64(shape, le(bytes, |b| i16::from_le_bytes(b) as i64)),
        Dtype::I8 => Tensor::i64(shape, bytes.iter().map(|&b| b as i8 as i64).collect()),
        Dtype::U8 | Dtype::BOOL => Tensor::i64(shape, bytes.iter().map(|&b| b as i64).collect()),
        other => bail!("unsupported dtype {other:?}"),
    };
    Ok(t)
}

/// Read every tensor of a safetensors file (floats → f32, integers → i64).
pub fn read_safetensors(path: &Path) -> Result<SafetensorsFile> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping of a file we do not modify while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&map).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let st = SafeTensors::deserialize(&map).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = decode_tensor(view.dtype(), view.shape(), view.data()).with_context(|| format!("{}: tensor {name}", path.display()))?;
        tensors.insert(name, t);
    }
    Ok(SafetensorsFile { tensors, metadata: meta.metadata().clone().unwrap_or_default() })
}

struct WriteView<'a> {
    shape: &'a [usize],
    data: TensorRef<'a>,
}

fn as_le_bytes<T: Copy, const N: usize>(xs: &[T], f: impl Fn(T) -> [u8; N]) -> Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        let _ = f;
        // SAFETY: plain-old-data numbers; on little-endian hosts the in-memory bytes are the file bytes.
        Cow::Borrowed(unsafe { std::slice::from_raw_parts(xs.as_ptr() as *const u8, std::mem::size_of_val(xs)) })
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(xs.iter().flat_map(|&x| f(x)).collect())
    }
}

impl View for WriteView<'_> {
    fn dtype(&self) -> Dtype {
        match self.data {
            TensorRef::F32(_) => Dtype::F32,
            TensorRef::I64(_) => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.data {
            TensorRef::F32(v) => as_le_bytes(v, f32::to_le_bytes),
            TensorRef::I64(v) => as_le_bytes(v, i64::to_le_bytes),
        }
    }
    fn data_len(&self) -> usize {
        match self.data {
            TensorRef::F32(v) => v.len() * 4,
            TensorRef::I64(v) => v.len() * 8,
        }
    }
}

/// Write tensors to `path` atomically (a temporary file in the same directory, then rename),
/// so a crash never leaves a half-written file under the final name.
pub fn write_safetensors_refs(path: &Path, tensors: &[(String, Vec<usize>, TensorRef)], metadata: &[(String, String)]) -> Result<()> {
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        let len = match data {
            TensorRef::F32(v) => v.len(),
            TensorRef::I64(v) => v.len(),
        };
        if n != len {
            bail!("{}: tensor {name} has shape {shape:?} but {len} values", path.display());
        }
    }
    let views = tensors.iter().map(|(n, s, d)| (n.as_str(), WriteView { shape: s, data: *d }));
    let meta = if metadata.is_empty() { None } else { Some(metadata.iter().cloned().collect::<HashMap<_, _>>()) };
    atomic_write_with(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, &meta, tmp).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// [`write_safetensors_refs`] for owned tensors.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<()> {
    let refs: Vec<_> = tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.view())).collect();
    write_safetensors_refs(path, &refs, metadata)
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Run `write` on a temporary sibling of `path`, then rename it into place.
pub fn atomic_write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let res =
        write(&tmp).and_then(|_| fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display())));
    if res.is_err() {
        fs::remove_file(&tmp).ok();
    }
    res
}

pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |tmp| fs::write(tmp, bytes).with_context(|| format!("cannot write {}", tmp.display())))
}

// ---------------------------------------------------------------------------------------
// Parameters by name

/// What a non-strict load did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Tensors copied into the model.
    pub loaded: Vec<String>,
    /// Tensors in the source that the model has no place for (source names).
    pub skipped: Vec<String>,
    /// Model tensors the source did not provide (left as they were).
    pub missing: Vec<String>,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        format!("{} loaded, {} skipped, {} missing", self.loaded.len(), self.skipped.len(), self.missing.len())
    }
}

/// Copy tensors into `params` by name. `rename` maps a source name to a model name (None =
/// no place in the model: skipped). A shape mismatch on a mapped name is always an error;
/// shapes may differ only by leading 1s (e.g. `[1,1,D]` vs `[D]`) — never reshaped otherwise.
pub fn load_params<'a>(
    params: &mut Params,
    source: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut seen = vec![false; params.specs().len()];
    for (src_name, t) in source {
        let Some(name) = rename(src_name) else {
            report.skipped.push(src_name.to_string());
            continue;
        };
        let Some(id) = params.id(&name) else {
            report.skipped.push(src_name.to_string());
            continue;
        };
        let spec = params.spec(id);
        if squeeze(&spec.shape) != squeeze(&t.shape) {
            bail!("tensor {src_name}: shape {:?} does not fit model parameter {name} of shape {:?}", t.shape, spec.shape);
        }
        let TensorData::F32(v) = &t.data else { bail!("tensor {src_name}: integer tensor for float parameter {name}") };
        if seen[id.0] {
            bail!("parameter {name} given twice (from {src_name})");
        }
        seen[id.0] = true;
        params.get_mut(id).copy_from_slice(v);
        report.loaded.push(name);
    }
    report.missing = params.specs().iter().zip(&seen).filter(|(_, &s)| !s).map(|(s, _)| s.name.clone()).collect();
    Ok(report)
}

fn squeeze(shape: &[usize]) -> &[usize] {
    let lead = shape.iter().take_while(|&&d| d == 1).count();
    &shape[lead.min(shape.len().saturating_sub(1))..]
}

/// Every parameter as a borrowed tensor under its (published) name.
pub fn params_as_tensors(params: &Params) -> Vec<(String, Vec<usize>, TensorRef<'_>)> {
    params.specs().iter().map(|s| (s.name.clone(), s.shape.clone(), TensorRef::F32(&params.data[s.offset..s.offset + s.len]))).collect()
}

/// Every gradient (of tensors that receive one) as a borrowed tensor, names prefixed.
pub fn grads_as_tensors<'a>(params: &'a Params, prefix: &str) -> Vec<(String, Vec<usize>, TensorRef<'a>)> {
    params
        .specs()
        .iter()
        .filter(|s| s.receives_grad)
        .map(|s| (format!("{prefix}{}", s.name), s.shape.clone(), TensorRef::F32(&params.grad[s.offset..s.offset + s.len])))
        .collect()
}

/// Map a timm ViT tensor name onto the video tower: `blocks.i.*` → `object_model.blocks.i.*`
/// (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2); everything else (patch
/// embedding, pos_embed, cls_token, final norm, head) has no place: None.
pub fn timm_vit_to_ours(name: &str) -> Option<String> {
    let rest = name.strip_prefix("blocks.")?;
    let (idx, _) = rest.split_once('.')?;
    idx.parse::<usize>().ok()?;
    Some(format!("object_model.{name}"))
}

/// Initialise the video tower's transformer blocks from timm ViT weights (as the published
/// recipe does with `jx_vit_base_p16_224`), non-strictly: tensors without a place (other
/// names, blocks beyond the tower's depth) are skipped; shape mismatches are errors.
pub fn load_vit_blocks(params: &mut Params, vit: &BTreeMap<String, Tensor>) -> Result<LoadReport> {
    let mut r = load_params(params, vit.iter().map(|(k, v)| (k.as_str(), v)), timm_vit_to_ours)?;
    r.missing.retain(|n| n.starts_with("object_model.blocks."));
    if r.loaded.is_empty() {
        bail!("no `blocks.<i>.*` tensor of the ViT weights fits the video tower ({} tensors skipped)", r.skipped.len());
    }
    Ok(r)
}

/// Read weights from a `.pth` (torch zip) or `.safetensors` file, by content.
pub fn read_weights(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut head = [0u8; 2];
    {
        use std::io::Read;
        let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        f.read_exact(&mut head).with_context(|| format!("{}: file too short", path.display()))?;
    }
    if &head == b"PK" {
        Ok(crate::torch::read_torch_state_dict(path)?.tensors)
    } else {
        Ok(read_safetensors(path)?
            .tensors
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("module.").map(String::from).unwrap_or(k), v))
            .collect())
    }
}

/// Keep only names starting with `prefix`, with it removed (e.g. `param.` of a recorded batch).
pub fn select_prefix(t: BTreeMap<String, Tensor>, prefix: &str, path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let out: BTreeMap<_, _> = t.into_iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v))).collect();
    if out.is_empty() {
        bail!("{}: no tensor name starts with {prefix:?}", path.display());
    }
    Ok(out)
}

fn list_some(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s += &format!(", ... ({} in all)", names.len());
    }
    s
}

/// Fill every parameter from `t` (names already ours). Missing parameters are an error;
/// extra tensors are an error when `strict`, else reported as skipped.
pub fn load_all_params(params: &mut Params, t: &BTreeMap<String, Tensor>, strict: bool, what: &str) -> Result<LoadReport> {
    let r = load_params(params, t.iter().map(|(k, v)| (k.as_str(), v)), |n| Some(n.to_string())).with_context(|| what.to_string())?;
    // Unused tensors (video norm3/norm, BERT pooler) may be absent: they never affect outputs.
    let needed: Vec<String> = r.missing.iter().filter(|n| params.id(n).is_some_and(|id| params.spec(id).receives_grad)).cloned().collect();
    if !needed.is_empty() {
        bail!("{what}: {} model tensors missing: {}", needed.len(), list_some(&needed));
    }
    if strict && !r.skipped.is_empty() {
        bail!("{what}: {} tensors the model does not have: {}", r.skipped.len(), list_some(&r.skipped));
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Model directories

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";

/// Write `dir/model.safetensors` (published names) and `dir/config.json`, each atomically.
pub fn save_params_dir(config: &ModelConfig, params: &Params, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(config)?;
    write_safetensors_refs(&dir.join(WEIGHTS_FILE), &params_as_tensors(params), &[("format".into(), "pt".into())])?;
    atomic_write(&dir.join(CONFIG_FILE), (json + "\n").as_bytes())
}

pub fn save_model_dir(model: &Model, dir: &Path) -> Result<()> {
    save_params_dir(&model.config, &model.params, dir)
}

/// Load a model directory: ours (`config.json` = [`ModelConfig`], every tensor present, no
/// extras) or a Hugging Face DistilBERT/BERT directory (text tower only; see
/// [`load_hf_text_dir`], with the published video tower for 8 frames and P = 256).
pub fn load_model_dir(dir: &Path) -> Result<Model> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {} (is {} a model directory?)", cfg_path.display(), dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", cfg_path.display()))?;
    if hf::is_hf_config(&v) {
        let published = ModelConfig::published(8);
        return Ok(load_hf_text_dir(dir, published.video, published.proj_dim, 0)?.0);
    }
    let config: ModelConfig = serde_json::from_value(v).with_context(|| format!("{}: not a demovlp model config", cfg_path.display()))?;
    let weights = dir.join(WEIGHTS_FILE);
    let st = read_safetensors(&weights)?;
    let mut params = declare_params(&config);
    load_all_params(&mut params, &st.tensors, true, &weights.display().to_string())?;
    Ok(Model::from_params(config, params))
}

/// A Hugging Face DistilBERT/BERT directory (`config.json` + `model.safetensors`, or a
/// torch-zip `pytorch_model.bin`) as the text tower of a new model whose video tower and
/// projection get the published random init (`seed`). Task heads (MLM, pooler of
/// DistilBERT classifiers, ...) are skipped and reported.
pub fn load_hf_text_dir(dir: &Path, video: VideoConfig, proj_dim: usize, seed: u64) -> Result<(Model, LoadReport)> {
    let text = hf::read_hf_text_config(dir)?;
    let weights = [WEIGHTS_FILE, "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .with_context(|| format!("{}: neither {WEIGHTS_FILE} nor pytorch_model.bin", dir.display()))?;
    let t = read_weights(&weights)?;
    let mut model = Model::new(ModelConfig { text, video, proj_dim });
    model.init_random(seed);
    let mut r = load_params(&mut model.params, t.iter().map(|(k, v)| (k.as_str(), v)), |n| Some(hf::hf_to_ours(n)))
        .with_context(|| weights.display().to_string())?;
    r.missing.retain(|n| n.starts_with("text_model."));
    let needed: Vec<String> = r.missing.iter().filter(|n| !n.starts_with("text_model.pooler.")).cloned().collect();
    if !needed.is_empty() {
        bail!("{}: {} text-tower tensors missing: {}", weights.display(), needed.len(), list_some(&needed));
    }
    Ok((model, r))
}

/// Import weights with published names (a trainer `.pth`, or safetensors such as a recorded
/// batch with `key_prefix = "param."`): sizes inferred from shapes, heads given.
pub fn import_weights(path: &Path, key_prefix: Option<&str>, text_heads: usize, video_heads: usize) -> Result<Model> {
    Ok(import_weights_report(path, key_prefix, text_heads, video_heads)?.0)
}

/// [`import_weights`] that also says what was loaded and skipped.
pub fn import_weights_report(path: &Path, key_prefix: Option<&str>, text_heads: usize, video_heads: usize) -> Result<(Model, LoadReport)> {
    let mut t = read_weights(path)?;
    if let Some(p) = key_prefix.filter(|p| !p.is_empty()) {
        t = select_prefix(t, p, path)?;
    }
    let config = infer_config(&t, text_heads, video_heads).with_context(|| path.display().to_string())?;
    let mut params = declare_params(&config);
    let r = load_all_params(&mut params, &t, false, &path.display().to_string())?;
    Ok((Model::from_params(config, params), r))
}

/// Initialise `model`'s video-tower blocks from a timm ViT checkpoint (`.pth` or safetensors).
pub fn init_video_from_vit(model: &mut Model, path: &Path) -> Result<LoadReport> {
    let t = read_weights(path)?;
    load_vit_blocks(&mut model.params, &t).with_context(|| path.display().to_string())
}

// ---------------------------------------------------------------------------------------
// Sizes from shapes

fn shape_of<'a>(t: &'a BTreeMap<String, Tensor>, name: &str) -> Result<&'a [usize]> {
    t.get(name).map(|x| x.shape.as_slice()).with_context(|| format!("weights lack {name}: cannot infer the model size"))
}

fn dim_of(t: &BTreeMap<String, Tensor>, name: &str, axis: usize, rank: usize) -> Result<usize> {
    let s = shape_of(t, name)?;
    if s.len() != rank {
        bail!("{name} has shape {s:?}, expected rank {rank}");
    }
    Ok(s[axis])
}

/// How many numbered children `prefix<i>.` exist (0, 1, ... without gaps).
fn count_layers(t: &BTreeMap<String, Tensor>, prefix: &str) -> usize {
    let mut n = 0;
    while t.keys().any(|k| k.starts_with(&format!("{prefix}{n}."))) {
        n += 1;
    }
    n
}

fn check_heads(what: &str, dim: usize, heads: usize) -> Result<()> {
    if heads == 0 || !dim.is_multiple_of(heads) {
        bail!("{what}: width {dim} is not divisible by {heads} heads");
    }
    Ok(())
}

/// Infer the full model configuration from published-name tensors (`text_model.*`,
/// `object_model.*`, `txt_proj.1.*`). Head counts cannot be seen in weights: given.
pub fn infer_config(t: &BTreeMap<String, Tensor>, text_heads: usize, video_heads: usize) -> Result<ModelConfig> {
    let text = infer_text_config(t, text_heads)?;
    let v = "object_model.";
    let dim = *shape_of(t, &format!("{v}cls_token"))?.last().unwrap_or(&0);
    let depth = count_layers(t, &format!("{v}blocks."));
    if depth == 0 {
        bail!("weights have no object_model.blocks.0.*: not a DemoVLP checkpoint (wrong --key-prefix?)");
    }
    check_heads("video tower", dim, video_heads)?;
    let video = VideoConfig {
        dim,
        depth,
        heads: video_heads,
        mlp_dim: dim_of(t, &format!("{v}blocks.0.mlp.fc1.weight"), 0, 2)?,
        max_frames: dim_of(t, &format!("{v}temporal_embed"), 1, 3)?,
        pos_embed_rows: dim_of(t, &format!("{v}custom_pos_embed"), 1, 3)?,
        feature_dim: dim_of(t, &format!("{v}object_embedding.weight"), 1, 2)?,
        box_dim: dim_of(t, &format!("{v}pos_embedding.weight"), 1, 2)?,
        layer_norm_eps: 1e-6,
    };
    let proj_dim = dim_of(t, "txt_proj.1.weight", 0, 2)?;
    Ok(ModelConfig { text, video, proj_dim })
}

/// The text tower's configuration from `text_model.*` shapes (DistilBERT or BERT names).
pub fn infer_text_config(t: &BTreeMap<String, Tensor>, heads: usize) -> Result<TextConfig> {
    let p = "text_model.";
    let word = format!("{p}embeddings.word_embeddings.weight");
    let vocab_size = dim_of(t, &word, 0, 2)?;
    let dim = dim_of(t, &word, 1, 2)?;
    let max_position_embeddings = dim_of(t, &format!("{p}embeddings.position_embeddings.weight"), 0, 2)?;
    check_heads("text tower", dim, heads)?;
    let distil = count_layers(t, &format!("{p}transformer.layer."));
    let bert = count_layers(t, &format!("{p}encoder.layer."));
    Ok(if distil > 0 {
        TextConfig {
            kind: TextKind::Distilbert,
            vocab_size,
            dim,
            layers: distil,
            heads,
            hidden_dim: dim_of(t, &format!("{p}transformer.layer.0.ffn.lin1.weight"), 0, 2)?,
            max_position_embeddings,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
        }
    } else if bert > 0 {
        TextConfig {
            kind: TextKind::Bert,
            vocab_size,
            dim,
            layers: bert,
            heads,
            hidden_dim: dim_of(t, &format!("{p}encoder.layer.0.intermediate.dense.weight"), 0, 2)?,
            max_position_embeddings,
            type_vocab_size: dim_of(t, &format!("{p}embeddings.token_type_embeddings.weight"), 0, 2)?,
            layer_norm_eps: 1e-12,
        }
    } else {
        bail!("weights have neither text_model.transformer.layer.0.* (DistilBERT) nor text_model.encoder.layer.0.* (BERT)");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamsBuilder;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("demovlp-io-{tag}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn safetensors_round_trip_with_metadata() {
        let d = tmpdir("rt");
        let f = d.join("x.safetensors");
        let ts = vec![
            ("a".to_string(), Tensor::f32(vec![2, 2], vec![1.0, -2.5, 3.25, 1e-7])),
            ("b".to_string(), Tensor::i64(vec![3], vec![101, 0, -7])),
        ];
        write_safetensors(&f, &ts, &[("k".into(), "v".into())]).unwrap();
        let back = read_safetensors(&f).unwrap();
        assert_eq!(back.tensors.len(), 2);
        assert_eq!(back.tensors["a"], ts[0].1);
        assert_eq!(back.tensors["b"], ts[1].1);
        assert_eq!(back.metadata.get("k").map(String::as_str), Some("v"));
        // No temporary left behind.
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn half_precision_inputs_become_f32() {
        let vals = [1.5f32, -0.125, 65504.0];
        let f16: Vec<u8> = vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let bf16: Vec<u8> = vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        assert_eq!(decode_tensor(Dtype::F16, &[3], &f16).unwrap().as_f32().unwrap(), &vals);
        let b = decode_tensor(Dtype::BF16, &[3], &bf16).unwrap();
        assert_eq!(&b.as_f32().unwrap()[..2], &vals[..2]);
        assert_eq!(b.as_f32().unwrap()[2], half::bf16::from_f32(65504.0).to_f32());
    }

    #[test]
    fn load_params_reports_and_rejects_bad_shapes() {
        let mut b = ParamsBuilder::new();
        b.add("x.cls", &[1, 1, 2]);
        b.add("x.w", &[2, 2]);
        let mut p = b.build();
        let cls = Tensor::f32(vec![2], vec![5.0, 6.0]);
        let extra = Tensor::f32(vec![1], vec![0.0]);
        let r = load_params(&mut p, [("module.x.cls", &cls), ("module.head", &extra)], |n| n.strip_prefix("module.").map(String::from))
            .unwrap();
        assert_eq!(r.loaded, vec!["x.cls"]);
        assert_eq!(r.skipped, vec!["module.head"]);
        assert_eq!(r.missing, vec!["x.w"]);
        assert_eq!(&p.data[..2], &[5.0, 6.0]);
        let bad = Tensor::f32(vec![4], vec![0.0; 4]);
        let e = load_params(&mut p, [("x.w", &bad)], |n| Some(n.to_string())).unwrap_err();
        assert!(e.to_string().contains("shape"), "{e}");
    }
}
