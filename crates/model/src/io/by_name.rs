//! Filling a [`Params`] by tensor name: the non-strict and strict loads with their
//! [`LoadReport`], parameters and gradients as borrowed tensors, and reading a weights file
//! (torch `.pth` or safetensors) by content.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::safetensors::{read_safetensors, Tensor, TensorData, TensorRef};
use crate::params::Params;

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

/// Read weights from a `.pth` (torch zip) or `.safetensors` file, by content.
pub fn read_weights(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut head = [0u8; 2];
    {
        use std::io::Read;
        let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        f.read_exact(&mut head).with_context(|| format!("{}: file too short", path.display()))?;
    }
    if &head == b"PK" {
        Ok(super::torch::read_torch_state_dict(path)?.tensors)
    } else if head[0] == 0x80 && (2..=5).contains(&head[1]) {
        // A pickle stream (PROTO opcode) at the start: torch.save's legacy non-zip format.
        bail!(
            "{}: a legacy (non-zip) torch.save file (it starts with a pickle stream, not a zip archive); \
             demovlp reads the zip format that torch.save writes since PyTorch 1.6: re-save it with \
             `torch.save(torch.load(path), new_path)` (without _use_new_zipfile_serialization=False)",
            path.display()
        )
    } else {
        Ok(read_safetensors(path)
            .with_context(|| format!("{}: neither a torch.save zip (.pth) nor a safetensors file", path.display()))?
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

pub(super) fn list_some(names: &[String]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamsBuilder;

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
