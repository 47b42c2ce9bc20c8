//! `torch.save` checkpoints read without Python, in both formats:
//!
//! - **zip** (torch ≥ 1.6): the archive's `<name>/data.pkl` is interpreted symbolically
//!   (crates/formats); a storage is a persistent id `('storage', torch.FloatStorage, key,
//!   location, numel)` naming the entry `<name>/data/<key>`.
//! - **legacy** (before 1.6): five things back to back: three small pickles (magic number,
//!   protocol version 1001, system info), the object pickle whose persistent ids are
//!   `('storage', type, key, location, numel, view_metadata)`, a pickled list of storage
//!   keys, then for each key in that order its element count (i64, little-endian) and its
//!   raw little-endian data.
//!
//! Tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls.
//! Everything else in the pickle (epoch, optimizer state, the trainer's own pickled config
//! class) is left alone.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use demovlp_formats::pickle::{self, Value};
use demovlp_formats::ZipArchive;
use safetensors::tensor::Dtype;

use super::safetensors::{decode_tensor, Tensor};

/// Tensors of a checkpoint's state dict, `module.` (data-parallel wrapper) stripped.
#[derive(Debug, Default)]
pub struct TorchStateDict {
    pub tensors: BTreeMap<String, Tensor>,
    /// Entries of the state dict that are not tensors (kept out, named here).
    pub non_tensors: Vec<String>,
    /// Which top-level key held the state dict (`state_dict`, `model`, or `` for a bare dict).
    pub source_key: String,
}

fn storage_dtype(name: &str) -> Result<(Dtype, usize)> {
    Ok(match name {
        "FloatStorage" => (Dtype::F32, 4),
        "HalfStorage" => (Dtype::F16, 2),
        "BFloat16Storage" => (Dtype::BF16, 2),
        "DoubleStorage" => (Dtype::F64, 8),
        "LongStorage" => (Dtype::I64, 8),
        "IntStorage" => (Dtype::I32, 4),
        "ShortStorage" => (Dtype::I16, 2),
        "CharStorage" => (Dtype::I8, 1),
        "ByteStorage" => (Dtype::U8, 1),
        "BoolStorage" => (Dtype::BOOL, 1),
        other => bail!("unsupported tensor storage type torch.{other}"),
    })
}

fn ints(v: &Value, what: &str) -> Result<Vec<usize>> {
    v.as_seq()
        .with_context(|| format!("{what}: expected a tuple, found {}", v.kind()))?
        .iter()
        .map(|x| x.as_int().filter(|&i| i >= 0).map(|i| i as usize).with_context(|| format!("{what}: expected non-negative integers")))
        .collect()
}

/// Where a checkpoint's storages live.
enum Storages<'a> {
    /// Entries `<prefix>data/<key>` of the zip archive.
    Zip { zip: &'a ZipArchive, prefix: String },
    /// The legacy format's data section, cut into one byte range per key.
    Legacy(BTreeMap<String, &'a [u8]>),
}

/// Reads a checkpoint's tensors from its storages.
struct Reader<'a> {
    storages: Storages<'a>,
}

impl Reader<'_> {
    fn storage(&self, key: &str) -> Result<(String, Cow<'_, [u8]>)> {
        match &self.storages {
            Storages::Zip { zip, prefix } => {
                let entry = format!("{prefix}data/{key}");
                let bytes = zip.read(&entry)?;
                Ok((entry, bytes))
            }
            Storages::Legacy(map) => {
                let bytes = map.get(key).with_context(|| format!("storage {key:?} is not in the file's data section"))?;
                Ok((format!("storage {key:?}"), Cow::Borrowed(*bytes)))
            }
        }
    }

    /// Decode one `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)` call.
    fn tensor(&self, args: &[Value]) -> Result<Tensor> {
        if args.len() < 4 {
            bail!("_rebuild_tensor_v2 with {} arguments (expected at least 4)", args.len());
        }
        let Value::PersistentId(pid) = &args[0] else { bail!("tensor storage is a {}, not a persistent id", args[0].kind()) };
        let pid = pid.as_seq().context("storage persistent id is not a tuple")?;
        if pid.len() < 5 || pid[0].as_str() != Some("storage") {
            bail!("unexpected storage persistent id {pid:?}");
        }
        let (module, ty) = pid[1].global_name().context("storage type is not a global")?;
        if module != "torch" {
            bail!("unsupported storage type {module}.{ty}");
        }
        let (dtype, esize) = storage_dtype(ty)?;
        let key = pid[2].as_str().context("storage key is not a string")?;
        let offset = args[1].as_int().filter(|&o| o >= 0).context("storage offset is not a non-negative integer")? as usize;
        let size = ints(&args[2], "tensor size")?;
        let stride = ints(&args[3], "tensor stride")?;
        if size.len() != stride.len() {
            bail!("tensor size {size:?} and stride {stride:?} differ in rank");
        }
        // Row-major contiguity (dims of extent 1 may carry any stride).
        let mut expect = 1usize;
        for d in (0..size.len()).rev() {
            if size[d] != 1 && stride[d] != expect {
                bail!("tensor of size {size:?} has strides {stride:?}: not contiguous (save it with .contiguous() first)");
            }
            expect *= size[d];
        }
        let numel: usize = size.iter().product();
        if let Some(view) = pid.get(5).filter(|v| !matches!(v, Value::None)) {
            bail!("storage {key:?} is a view of another storage ({view:?}): not supported");
        }
        let (entry, bytes) = self.storage(key)?;
        let (start, end) = (offset * esize, (offset + numel) * esize);
        if end > bytes.len() {
            bail!("storage {entry} holds {} bytes; tensor needs bytes {start}..{end}", bytes.len());
        }
        decode_tensor(dtype, &size, &bytes[start..end])
    }

    /// A tensor value (`_rebuild_tensor_v2`, possibly wrapped by `_rebuild_parameter`), or None.
    fn value_tensor(&self, v: &Value) -> Result<Option<Tensor>> {
        let Value::Reduce { callable, args, .. } = v else { return Ok(None) };
        let args = args.as_seq().unwrap_or(&[]);
        match callable.global_name() {
            Some(("torch._utils", "_rebuild_tensor_v2")) | Some(("torch._utils", "_rebuild_tensor")) => self.tensor(args).map(Some),
            Some(("torch._utils", "_rebuild_parameter")) | Some(("torch._utils", "_rebuild_parameter_with_state")) => match args.first() {
                Some(inner) => self.value_tensor(inner),
                None => bail!("_rebuild_parameter without arguments"),
            },
            _ => Ok(None),
        }
    }
}

/// A dict's items, looking through `BUILD` (an `OrderedDict` with `_metadata` attached).
fn dict_items(v: &Value) -> Option<&[(Value, Value)]> {
    match v {
        Value::Build { obj, .. } => dict_items(obj),
        _ => v.as_dict(),
    }
}

/// The magic number that opens a legacy `torch.save` file (its first pickle).
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

/// Read the state dict of a `torch.save` checkpoint (zip or legacy format): the
/// `state_dict` (or `model`) entry of the top-level dict, or the top-level dict itself
/// when it maps names to tensors.
pub fn read_torch_state_dict(path: &Path) -> Result<TorchStateDict> {
    let mut head = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let n = f.read(&mut head).with_context(|| format!("{}: cannot read", path.display()))?;
        if n < 2 {
            bail!("{}: {n} bytes: not a torch.save checkpoint", path.display());
        }
    }
    if head[0] == 0x80 {
        return read_legacy(path);
    }
    if &head != b"PK\x03\x04" {
        bail!("{}: neither a zip nor a legacy torch.save file (starts with {head:02x?})", path.display());
    }
    read_zip(path)
}

/// The legacy (pre-1.6) format; see the module docs.
fn read_legacy(path: &Path) -> Result<TorchStateDict> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let ctx = |what: &str| format!("{}: legacy torch.save file: {what}", path.display());
    let mut pos = 0usize;
    let next = |pos: &mut usize, what: &str| -> Result<Value> {
        let (v, n) = pickle::parse_prefix(&bytes[*pos..], &mut |id| Ok(Value::PersistentId(Box::new(id)))).with_context(|| ctx(what))?;
        *pos += n;
        Ok(v)
    };
    let magic = next(&mut pos, "magic number")?;
    let magic_ok = match &magic {
        Value::BigInt(b) if b.len() <= 16 => {
            let mut le = [0u8; 16];
            le[..b.len()].copy_from_slice(b);
            u128::from_le_bytes(le) == LEGACY_MAGIC
        }
        _ => false,
    };
    if !magic_ok {
        bail!("{}: starts with a pickle but not with torch's magic number: not a torch.save checkpoint", path.display());
    }
    let version = next(&mut pos, "protocol version")?;
    if version.as_int() != Some(1001) {
        bail!("{}: legacy torch.save protocol version {version:?} (expected 1001)", path.display());
    }
    let sys = next(&mut pos, "system info")?;
    if sys.get("little_endian").is_some_and(|v| matches!(v, Value::Bool(false))) {
        bail!("{}: saved on a big-endian machine: not supported", path.display());
    }
    let root = next(&mut pos, "object pickle")?;
    let keys = next(&mut pos, "storage keys")?;
    let keys = keys.as_seq().with_context(|| ctx("storage keys are not a list"))?;
    // Element sizes come from the storage types named in the object pickle.
    let mut esize: BTreeMap<String, usize> = BTreeMap::new();
    collect_storage_types(&root, &mut esize)?;
    let mut map = BTreeMap::new();
    for k in keys {
        let key = k.as_str().with_context(|| ctx("a storage key is not a string"))?.to_string();
        let size = *esize.get(&key).with_context(|| ctx(&format!("storage {key:?} is listed but no tensor uses it")))?;
        let head = bytes.get(pos..pos + 8).with_context(|| ctx(&format!("truncated before storage {key:?}")))?;
        let numel = i64::from_le_bytes(head.try_into().unwrap());
        let len = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(size))
            .with_context(|| ctx(&format!("storage {key:?} has {numel} elements")))?;
        pos += 8;
        let data = bytes.get(pos..pos + len).with_context(|| {
            ctx(&format!("storage {key:?} needs {len} bytes at offset {pos}, the file has {}", bytes.len().saturating_sub(pos)))
        })?;
        pos += len;
        map.insert(key, data);
    }
    let reader = Reader { storages: Storages::Legacy(map) };
    state_dict_of(path, &root, &reader)
}

/// Storage key → element size, for every storage persistent id inside `v`.
fn collect_storage_types(v: &Value, out: &mut BTreeMap<String, usize>) -> Result<()> {
    match v {
        Value::PersistentId(pid) => {
            if let Some(p) = pid.as_seq() {
                if p.len() >= 3 && p[0].as_str() == Some("storage") {
                    if let (Some((_, ty)), Some(key)) = (p[1].global_name(), p[2].as_str()) {
                        out.insert(key.to_string(), storage_dtype(ty)?.1);
                    }
                }
            }
        }
        Value::List(xs) | Value::Tuple(xs) | Value::Set(xs) => xs.iter().try_for_each(|x| collect_storage_types(x, out))?,
        Value::Dict(kv) => kv.iter().try_for_each(|(a, b)| collect_storage_types(a, out).and_then(|()| collect_storage_types(b, out)))?,
        Value::Reduce { callable, args, items, list_items } => {
            collect_storage_types(callable, out)?;
            collect_storage_types(args, out)?;
            items.iter().try_for_each(|(a, b)| collect_storage_types(a, out).and_then(|()| collect_storage_types(b, out)))?;
            list_items.iter().try_for_each(|x| collect_storage_types(x, out))?;
        }
        Value::NewObj { cls, args } => {
            collect_storage_types(cls, out)?;
            collect_storage_types(args, out)?;
        }
        Value::Build { obj, state } => {
            collect_storage_types(obj, out)?;
            collect_storage_types(state, out)?;
        }
        _ => {}
    }
    Ok(())
}

/// The zip format; see the module docs.
fn read_zip(path: &Path) -> Result<TorchStateDict> {
    let zip = ZipArchive::open(path)?;
    let pkl = zip
        .entries()
        .iter()
        .find(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"))
        .with_context(|| format!("{}: no data.pkl entry: not a torch.save zip checkpoint", path.display()))?;
    let prefix = pkl.name.strip_suffix("data.pkl").unwrap().to_string();
    if let Ok(order) = zip.read(&format!("{prefix}byteorder")) {
        if order.as_ref() != b"little" {
            bail!("{}: byte order {:?} is not supported", path.display(), String::from_utf8_lossy(&order));
        }
    }
    let bytes = zip.read(&pkl.name.clone())?;
    let root = pickle::parse_plain(&bytes).with_context(|| format!("{}: cannot parse {}", path.display(), pkl.name))?;
    let reader = Reader { storages: Storages::Zip { zip: &zip, prefix } };
    state_dict_of(path, &root, &reader)
}

/// The state dict inside a checkpoint's object pickle, tensors decoded.
fn state_dict_of(path: &Path, root: &Value, reader: &Reader) -> Result<TorchStateDict> {
    let top = dict_items(root).with_context(|| format!("{}: top-level object is a {}, not a dict", path.display(), root.kind()))?;
    let (source_key, sd) = ["state_dict", "model", "module"]
        .iter()
        .find_map(|k| top.iter().find(|(key, _)| key.as_str() == Some(k)).and_then(|(_, v)| dict_items(v).map(|d| (k.to_string(), d))))
        .unwrap_or((String::new(), top));

    let mut out = TorchStateDict { source_key, ..Default::default() };
    for (k, v) in sd {
        let Some(name) = k.as_str() else { continue };
        let name = name.strip_prefix("module.").unwrap_or(name).to_string();
        match reader.value_tensor(v).with_context(|| format!("{}: tensor {name}", path.display()))? {
            Some(t) => {
                out.tensors.insert(name, t);
            }
            None => out.non_tensors.push(name),
        }
    }
    if out.tensors.is_empty() {
        bail!(
            "{}: no tensors found in the checkpoint's {}",
            path.display(),
            if out.source_key.is_empty() { "top-level dict".to_string() } else { format!("`{}` entry", out.source_key) }
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(m: &str, n: &str) -> Value {
        Value::Global { module: m.into(), name: n.into() }
    }

    /// A tensor pickled the way torch does it.
    fn rebuild(key: &str, storage: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Value {
        let pid = Value::Tuple(vec![
            Value::Str("storage".into()),
            g("torch", storage),
            Value::Str(key.into()),
            Value::Str("cpu".into()),
            Value::Int(numel),
        ]);
        let tup = |xs: &[i64]| Value::Tuple(xs.iter().map(|&x| Value::Int(x)).collect());
        Value::Reduce {
            callable: Box::new(g("torch._utils", "_rebuild_tensor_v2")),
            args: Box::new(Value::Tuple(vec![
                Value::PersistentId(Box::new(pid)),
                Value::Int(offset),
                tup(size),
                tup(stride),
                Value::Bool(false),
                Value::Reduce {
                    callable: Box::new(g("collections", "OrderedDict")),
                    args: Box::new(Value::Tuple(vec![])),
                    items: vec![],
                    list_items: vec![],
                },
            ])),
            items: vec![],
            list_items: vec![],
        }
    }

    fn write_pth(path: &Path, sd: Vec<(Value, Value)>, storages: &[(&str, Vec<u8>)]) {
        let root = Value::Dict(vec![
            (Value::Str("epoch".into()), Value::Int(1)),
            (
                Value::Str("config".into()),
                Value::Build {
                    obj: Box::new(Value::NewObj {
                        cls: Box::new(g("parse_config_dist_multi", "ConfigParser")),
                        args: Box::new(Value::Tuple(vec![])),
                    }),
                    state: Box::new(Value::Dict(vec![(Value::Str("x".into()), Value::Int(3))])),
                },
            ),
            (Value::Str("state_dict".into()), Value::Dict(sd)),
        ]);
        let pkl = pickle::write(&root).unwrap();
        let mut entries: Vec<(String, Vec<u8>)> = vec![("ck/data.pkl".into(), pkl), ("ck/byteorder".into(), b"little".to_vec())];
        for (k, b) in storages {
            entries.push((format!("ck/data/{k}"), b.clone()));
        }
        let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let mut f = std::fs::File::create(path).unwrap();
        demovlp_formats::zip::write_stored(&mut f, &refs).unwrap();
    }

    #[test]
    fn offsets_dtypes_and_non_contiguous() {
        let dir = std::env::temp_dir().join(format!("demovlp-torch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f32s: Vec<u8> = (0..10).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let halfs: Vec<u8> = [0.5f32, -2.0].iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let bf: Vec<u8> = [3.0f32].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let longs: Vec<u8> = [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = dir.join("ok.pth");
        write_pth(
            &p,
            vec![
                // A view into a shared storage at offset 4: values 4..10 as [2,3].
                (Value::Str("module.a".into()), rebuild("0", "FloatStorage", 10, 4, &[2, 3], &[3, 1])),
                (Value::Str("module.b".into()), rebuild("1", "HalfStorage", 2, 0, &[2], &[1])),
                (Value::Str("c".into()), rebuild("2", "BFloat16Storage", 1, 0, &[1, 1], &[7, 7])),
                (Value::Str("ids".into()), rebuild("3", "LongStorage", 2, 0, &[2], &[1])),
                (Value::Str("note".into()), Value::Str("hi".into())),
            ],
            &[("0", f32s.clone()), ("1", halfs), ("2", bf), ("3", longs)],
        );
        let sd = read_torch_state_dict(&p).unwrap();
        assert_eq!(sd.source_key, "state_dict");
        assert_eq!(sd.tensors["a"], Tensor::f32(vec![2, 3], vec![4., 5., 6., 7., 8., 9.]));
        assert_eq!(sd.tensors["b"], Tensor::f32(vec![2], vec![0.5, -2.0]));
        assert_eq!(sd.tensors["c"], Tensor::f32(vec![1, 1], vec![3.0]));
        assert_eq!(sd.tensors["ids"], Tensor::i64(vec![2], vec![7, -1]));
        assert_eq!(sd.non_tensors, vec!["note"]);

        // A transposed view must be refused with a clear message, not silently misread.
        let q = dir.join("t.pth");
        write_pth(&q, vec![(Value::Str("w".into()), rebuild("0", "FloatStorage", 10, 0, &[2, 3], &[1, 2]))], &[("0", f32s.clone())]);
        let e = format!("{:#}", read_torch_state_dict(&q).unwrap_err());
        assert!(e.contains("not contiguous") && e.contains("tensor w"), "{e}");
        // A view past the storage end too.
        let r = dir.join("r.pth");
        write_pth(&r, vec![(Value::Str("w".into()), rebuild("0", "FloatStorage", 10, 8, &[3], &[1]))], &[("0", f32s)]);
        assert!(format!("{:#}", read_torch_state_dict(&r).unwrap_err()).contains("holds 40 bytes"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
