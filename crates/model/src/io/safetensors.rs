//! safetensors files: read any float dtype as f32 and integers as i64; write atomically
//! (a temporary sibling renamed into place). Also the in-memory [`Tensor`] every weights
//! reader of this module hands out.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};

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

/// The metadata key of the content checksum every file we write carries (verified on read).
pub const CHECKSUM_KEY: &str = "demovlp_checksum";

/// A 64-bit checksum of tensors (name, shape, raw bytes), taken in name order. Every step
/// is a bijection of the running state for a fixed input word, so a change confined to
/// one word (a flipped bit) always changes the result.
fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a [usize], Cow<'a, [u8]>)>) -> String {
    let mut all: Vec<_> = tensors.collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Checksum::new();
    for (name, shape, data) in all {
        h.tensor(name, shape, &data);
    }
    h.finish()
}

/// The running state of [`checksum`], fed tensor by tensor in name order.
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0x6465_6d6f_766c_7031)
    }
    fn mix(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.mix(b.len() as u64);
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().unwrap()));
        }
        for &x in words.remainder() {
            self.mix(x as u64);
        }
    }
    fn tensor(&mut self, name: &str, shape: &[usize], data: &[u8]) {
        self.bytes(name.as_bytes());
        for &d in shape {
            self.mix(d as u64);
        }
        self.bytes(data);
    }
    fn finish(&self) -> String {
        format!("v1:{:016x}", self.0)
    }
}

/// Where [`write_safetensors_streamed`] gets a tensor's values: `fetch(i, sink)` hands the
/// values of tensor `i` of the list to `sink` (e.g. read back from a device one tensor at a
/// time), and may be called twice per tensor (checksum, then write).
pub type TensorSource<'a> = dyn FnMut(usize, &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> + 'a;

/// [`write_safetensors_refs`] for f32 tensors that are not in host memory as a whole: each
/// is fetched on its own when needed, so writing never holds more than one tensor's bytes.
/// Same bytes, checksum and atomicity as [`write_safetensors_refs`].
pub fn write_safetensors_streamed(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    metadata: &[(String, String)],
    fetch: &mut TensorSource<'_>,
) -> Result<()> {
    use std::io::Write;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].0.cmp(&tensors[b].0));
    if let Some(w) = order.windows(2).find(|w| tensors[w[0]].0 == tensors[w[1]].0) {
        bail!("{}: tensor {} given twice", path.display(), tensors[w[0]].0);
    }
    let mut sum = Checksum::new();
    for &i in &order {
        let (name, shape) = &tensors[i];
        let n: usize = shape.iter().product();
        fetch(i, &mut |v: &[f32]| {
            if v.len() != n {
                bail!("{}: tensor {name} has shape {shape:?} but {} values", path.display(), v.len());
            }
            sum.tensor(name, shape, &as_le_bytes(v, f32::to_le_bytes));
            Ok(())
        })?;
    }
    let mut meta: BTreeMap<String, String> = metadata.iter().cloned().collect();
    meta.insert(CHECKSUM_KEY.into(), sum.finish());
    let mut header = BTreeMap::<String, serde_json::Value>::new();
    header.insert("__metadata__".into(), serde_json::to_value(&meta)?);
    let mut offset = 0usize;
    for &i in &order {
        let (name, shape) = &tensors[i];
        let len = shape.iter().product::<usize>() * 4;
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    atomic_write_with(path, |tmp| {
        let mut f = std::io::BufWriter::new(fs::File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        for &i in &order {
            fetch(i, &mut |v: &[f32]| Ok(f.write_all(&as_le_bytes(v, f32::to_le_bytes))?))?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}

/// Read every tensor of a safetensors file (floats → f32, integers → i64). A file that
/// carries our content checksum is verified: a changed bit is an error naming the file.
pub fn read_safetensors(path: &Path) -> Result<SafetensorsFile> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping of a file we do not modify while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&map).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let st = SafeTensors::deserialize(&map).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut metadata = meta.metadata().clone().unwrap_or_default();
    if let Some(want) = metadata.remove(CHECKSUM_KEY) {
        let views = st.tensors();
        let got = checksum(views.iter().map(|(n, v)| (n.as_str(), v.shape(), Cow::Borrowed(v.data()))));
        if got != want {
            bail!(
                "{}: checksum mismatch (stored {want}, contents give {got}): the file changed after it was written \
                 (a flipped bit, a partial copy); it cannot be trusted",
                path.display()
            );
        }
    }
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = decode_tensor(view.dtype(), view.shape(), view.data()).with_context(|| format!("{}: tensor {name}", path.display()))?;
        tensors.insert(name, t);
    }
    Ok(SafetensorsFile { tensors, metadata })
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

impl<'a> WriteView<'a> {
    /// The file bytes, borrowed from the values on little-endian hosts.
    fn data_owned(&self) -> Cow<'a, [u8]> {
        match self.data {
            TensorRef::F32(v) => as_le_bytes(v, f32::to_le_bytes),
            TensorRef::I64(v) => as_le_bytes(v, i64::to_le_bytes),
        }
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
    let sum = checksum(tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), WriteView { shape: s, data: *d }.data_owned())));
    let mut meta: BTreeMap<String, String> = metadata.iter().cloned().collect();
    meta.insert(CHECKSUM_KEY.into(), sum);
    atomic_write_with(path, |tmp| serialize_sorted(tmp, tensors, &meta).with_context(|| format!("cannot write {}", tmp.display())))
        .with_context(|| format!("writing {}", path.display()))
}

/// The safetensors layout, written so that the same tensors and metadata always give the
/// same bytes (the `safetensors` crate's writer takes the metadata as a `HashMap`, whose
/// order changes from process to process): the header's keys sorted, tensors stored in
/// name order, the header padded with spaces to a multiple of 8 bytes as the format asks.
fn serialize_sorted(path: &Path, tensors: &[(String, Vec<usize>, TensorRef)], meta: &BTreeMap<String, String>) -> Result<()> {
    use std::io::Write;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].0.cmp(&tensors[b].0));
    if let Some(w) = order.windows(2).find(|w| tensors[w[0]].0 == tensors[w[1]].0) {
        bail!("tensor {} given twice", tensors[w[0]].0);
    }
    let mut header = BTreeMap::<String, serde_json::Value>::new();
    header.insert("__metadata__".into(), serde_json::to_value(meta)?);
    let mut offset = 0usize;
    for &i in &order {
        let (name, shape, data) = &tensors[i];
        let view = WriteView { shape, data: *data };
        let len = view.data_len();
        let dtype = match data {
            TensorRef::F32(_) => "F32",
            TensorRef::I64(_) => "I64",
        };
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    f.write_all(&(head.len() as u64).to_le_bytes())?;
    f.write_all(&head)?;
    for &i in &order {
        let (_, shape, data) = &tensors[i];
        f.write_all(&WriteView { shape, data: *data }.data_owned())?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("demovlp-io-{tag}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes_and_read_back() {
        let d = tmpdir("deterministic");
        let tensors = vec![
            ("z.weight".to_string(), Tensor { shape: vec![2, 3], data: TensorData::F32(vec![1.0, -2.0, 3.5, 0.0, 5.0, 6.0]) }),
            ("a.ids".to_string(), Tensor { shape: vec![3], data: TensorData::I64(vec![7, -1, 1 << 40]) }),
            ("m.bias".to_string(), Tensor { shape: vec![1], data: TensorData::F32(vec![0.25]) }),
        ];
        let meta: Vec<(String, String)> = (0..12).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        // Metadata given in two orders: a HashMap-ordered writer would differ between these.
        let mut reversed = meta.clone();
        reversed.reverse();
        write_safetensors(&d.join("a.safetensors"), &tensors, &meta).unwrap();
        write_safetensors(&d.join("b.safetensors"), &tensors, &reversed).unwrap();
        let (a, b) = (fs::read(d.join("a.safetensors")).unwrap(), fs::read(d.join("b.safetensors")).unwrap());
        assert!(a == b, "same content, different bytes");
        let header_len = u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0, "header padded to 8 bytes");
        let st = read_safetensors(&d.join("a.safetensors")).unwrap();
        assert_eq!(st.tensors.len(), 3);
        assert_eq!(st.tensors["z.weight"].shape, vec![2, 3]);
        assert_eq!(st.tensors["z.weight"].to_f32().unwrap(), vec![1.0, -2.0, 3.5, 0.0, 5.0, 6.0]);
        assert!(matches!(&st.tensors["a.ids"].data, TensorData::I64(v) if v == &vec![7, -1, 1 << 40]));
        assert_eq!(st.metadata["key7"], "value 7");
        // The safetensors crate itself reads it (what other tools use).
        let sf = SafeTensors::deserialize(&a).unwrap();
        assert_eq!(sf.tensor("m.bias").unwrap().data(), 0.25f32.to_le_bytes());
        assert!(write_safetensors(&d.join("c.safetensors"), &[tensors[0].clone(), tensors[0].clone()], &[]).is_err(), "duplicate name");
        fs::remove_dir_all(&d).ok();
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
    fn a_flipped_bit_is_a_named_error() {
        let d = tmpdir("flip");
        let f = d.join("w.safetensors");
        let ts = vec![("a".to_string(), Tensor::f32(vec![3], vec![1.0, 2.0, 3.0])), ("b".to_string(), Tensor::i64(vec![2], vec![7, 8]))];
        write_safetensors(&f, &ts, &[]).unwrap();
        let good = fs::read(&f).unwrap();
        // The checksum is ours, not the caller's metadata.
        assert!(read_safetensors(&f).unwrap().metadata.is_empty());
        for byte in [good.len() - 1, good.len() - 20] {
            for bit in [0, 7] {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                fs::write(&f, &bad).unwrap();
                let e = format!("{:#}", read_safetensors(&f).unwrap_err());
                assert!(e.contains("checksum mismatch") && e.contains("w.safetensors"), "{e}");
            }
        }
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
}
