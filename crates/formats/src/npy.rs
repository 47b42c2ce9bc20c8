//! `.npy` arrays: header parsing (dtype, shape, order) and writing (format 1.0).
//!
//! Data stays as raw little-endian bytes in [`NpyArray::data`]; typed copies come from
//! [`NpyArray::to_f32`], [`NpyArray::to_i64`], ... which also turn Fortran order into C order.
//! Object arrays (`|O`) keep the pickled payload as `data`; [`NpyArray::object_value`]
//! interprets it with the numpy-aware pickle layer.

use anyhow::{bail, Context, Result};

use crate::pickle::Value;

/// Element types this crate reads. Big-endian data is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F16,
    F32,
    F64,
    I32,
    I64,
    U8,
    Bool,
    /// Python objects; the payload is a pickle.
    Object,
}

impl DType {
    /// Bytes per element (object arrays: pointer size, as numpy reports).
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::Bool => 1,
            DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 | DType::Object => 8,
        }
    }
    /// The `.npy` descr string, e.g. `<f4`.
    pub fn descr(self) -> &'static str {
        match self {
            DType::F16 => "<f2",
            DType::F32 => "<f4",
            DType::F64 => "<f8",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::U8 => "|u1",
            DType::Bool => "|b1",
            DType::Object => "|O",
        }
    }
    /// Parses a numpy type string: `<f4`, `|u1`, `f8` (with a separate byte order), `O`, `O8`.
    pub fn parse(descr: &str, byteorder: Option<&str>) -> Result<DType> {
        let (order, kind) = match descr.chars().next() {
            Some(c @ ('<' | '>' | '|' | '=')) => (c.to_string(), &descr[1..]),
            _ => (byteorder.unwrap_or("=").to_string(), descr),
        };
        let t = match kind {
            "f2" | "e" => DType::F16,
            "f4" | "f" => DType::F32,
            "f8" | "d" => DType::F64,
            "i4" => DType::I32,
            "i8" => DType::I64,
            "u1" | "B" => DType::U8,
            "b1" | "?" => DType::Bool,
            "O" | "O8" | "O4" => DType::Object,
            _ => bail!("unsupported dtype {descr:?} (supported: f2 f4 f8 i4 i8 u1 b1 O)"),
        };
        if order == ">" && t.size() > 1 && t != DType::Object {
            bail!("big-endian dtype {descr:?} is not supported");
        }
        Ok(t)
    }
}

/// An n-dimensional array as stored: dtype, shape, order and raw little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub fortran_order: bool,
    /// Raw element bytes (for `Object`: the pickled payload that follows the header).
    pub data: Vec<u8>,
}

impl NpyArray {
    /// Number of elements (1 for a 0-d array).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A C-order f32 array.
    pub fn from_f32(shape: &[usize], values: &[f32]) -> NpyArray {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "shape does not match data");
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        NpyArray { dtype: DType::F32, shape: shape.to_vec(), fortran_order: false, data }
    }

    /// A C-order i64 array.
    pub fn from_i64(shape: &[usize], values: &[i64]) -> NpyArray {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "shape does not match data");
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        NpyArray { dtype: DType::I64, shape: shape.to_vec(), fortran_order: false, data }
    }

    /// A 0-d object array holding `value` (as `np.array(obj, dtype=object)`), pickled.
    pub fn object_scalar(value: &Value) -> Result<NpyArray> {
        let arr = Value::ObjectArray { shape: vec![], items: vec![value.clone()] };
        Ok(NpyArray { dtype: DType::Object, shape: vec![], fortran_order: false, data: crate::pickle::write(&arr)? })
    }

    /// Parses a whole `.npy` file.
    pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            bail!("not an .npy array (missing \\x93NUMPY magic)");
        }
        let major = bytes[6];
        let (hlen, hstart) = match major {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => {
                if bytes.len() < 12 {
                    bail!(".npy header truncated");
                }
                (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12)
            }
            v => bail!(".npy format version {v} not supported"),
        };
        let header = bytes.get(hstart..hstart + hlen).context(".npy header truncated")?;
        let header = std::str::from_utf8(header).context(".npy header is not text")?;
        let (descr, fortran_order, shape) = parse_header(header).with_context(|| format!("bad .npy header {header:?}"))?;
        let dtype = DType::parse(&descr, None)?;
        let data = bytes[hstart + hlen..].to_vec();
        let a = NpyArray { dtype, shape, fortran_order, data };
        if dtype != DType::Object && a.data.len() != a.numel() * dtype.size() {
            bail!(
                ".npy data is {} bytes but shape {:?} of {} needs {} (truncated or corrupt)",
                a.data.len(),
                a.shape,
                descr,
                a.numel() * dtype.size()
            );
        }
        Ok(a)
    }

    /// Serialises as a format-1.0 `.npy` file (header padded to a multiple of 64).
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            0 => "()".to_string(),
            1 => format!("({},)", self.shape[0]),
            _ => format!("({})", self.shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let order = if self.fortran_order { "True" } else { "False" };
        let mut h = format!("{{'descr': '{}', 'fortran_order': {order}, 'shape': {shape}, }}", self.dtype.descr());
        let total = 10 + h.len() + 1;
        h.push_str(&" ".repeat((64 - total % 64) % 64));
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Element bytes in C order (copies only when the array is Fortran-ordered).
    fn c_order_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if !self.fortran_order || self.shape.len() < 2 {
            return std::borrow::Cow::Borrowed(&self.data);
        }
        let es = self.dtype.size();
        let n = self.numel();
        let rank = self.shape.len();
        let mut out = vec![0u8; n * es];
        let mut idx = vec![0usize; rank];
        for c in 0..n {
            // Fortran offset: first index varies fastest.
            let mut f = 0;
            for d in (0..rank).rev() {
                f = f * self.shape[d] + idx[d];
            }
            out[c * es..(c + 1) * es].copy_from_slice(&self.data[f * es..(f + 1) * es]);
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// Values as f32 in C order (from f16, f32 or f64; integers are converted too).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.c_order_bytes();
        Ok(match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            _ => self.to_i64()?.into_iter().map(|v| v as f32).collect(),
        })
    }

    /// Values as f64 in C order.
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        if self.dtype == DType::F64 {
            let b = self.c_order_bytes();
            return Ok(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect());
        }
        Ok(self.to_f32()?.into_iter().map(|v| v as f64).collect())
    }

    /// Values as i64 in C order (integer and bool dtypes only).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = self.c_order_bytes();
        Ok(match self.dtype {
            DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            DType::U8 | DType::Bool => b.iter().map(|&v| v as i64).collect(),
            t => bail!("expected an integer array, found dtype {}", t.descr()),
        })
    }

    /// The single value of a 0-d (or one-element) integer array.
    pub fn scalar_i64(&self) -> Result<i64> {
        let v = self.to_i64()?;
        if v.len() != 1 {
            bail!("expected a scalar, found shape {:?}", self.shape);
        }
        Ok(v[0])
    }

    /// For an object array: the unpickled contents, numpy arrays inside resolved
    /// ([`Value::ObjectArray`]); anything but plain containers and numpy values is refused.
    pub fn object_value(&self) -> Result<Value> {
        if self.dtype != DType::Object {
            bail!("expected an object array, found dtype {}", self.dtype.descr());
        }
        let v = crate::pickle::parse_plain(&self.data).context("object array payload")?;
        crate::numpy::resolve(&v).context("object array payload")
    }
}

/// Parses the header dict `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
fn parse_header(h: &str) -> Result<(String, bool, Vec<usize>)> {
    let s = h.trim();
    let s = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')).context("header is not a dict")?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, r) = quoted(rest)?;
        let r = r.trim_start().strip_prefix(':').context("expected ':'")?.trim_start();
        rest = match key.as_str() {
            "descr" => {
                if r.starts_with('[') {
                    bail!("structured dtypes are not supported");
                }
                let (d, r) = quoted(r)?;
                descr = Some(d);
                r
            }
            "fortran_order" => {
                let (b, r) = if let Some(r) = r.strip_prefix("True") {
                    (true, r)
                } else if let Some(r) = r.strip_prefix("False") {
                    (false, r)
                } else {
                    bail!("fortran_order must be True or False");
                };
                fortran = Some(b);
                r
            }
            "shape" => {
                let r = r.strip_prefix('(').context("shape must be a tuple")?;
                let end = r.find(')').context("unterminated shape tuple")?;
                let dims = r[..end]
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| t.trim_end_matches('L').parse::<usize>().with_context(|| format!("bad dimension {t:?}")))
                    .collect::<Result<Vec<_>>>()?;
                shape = Some(dims);
                &r[end + 1..]
            }
            k => bail!("unexpected key {k:?}"),
        };
        rest = rest.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Ok((descr.context("no 'descr'")?, fortran.context("no 'fortran_order'")?, shape.context("no 'shape'")?))
}

/// A single- or double-quoted string at the start of `s`, and what follows it.
fn quoted(s: &str) -> Result<(String, &str)> {
    let q = s.chars().next().filter(|c| *c == '\'' || *c == '"').context("expected a quoted string")?;
    let end = s[1..].find(q).context("unterminated string")?;
    Ok((s[1..1 + end].to_string(), &s[end + 2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fortran_order() {
        let a = NpyArray::from_f32(&[2, 3], &[0., 1., 2., 3., 4., 5.]);
        let b = NpyArray::parse(&a.to_bytes()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_bytes().len() % 64, 24); // header 64 + 24 data bytes

        // The same logical matrix stored column-major.
        let mut f = NpyArray::from_f32(&[2, 3], &[0., 3., 1., 4., 2., 5.]);
        f.fortran_order = true;
        let f = NpyArray::parse(&f.to_bytes()).unwrap();
        assert!(f.fortran_order);
        assert_eq!(f.to_f32().unwrap(), vec![0., 1., 2., 3., 4., 5.]);
        let s = NpyArray::parse(&NpyArray::from_i64(&[], &[7]).to_bytes()).unwrap();
        assert_eq!(s.shape, Vec::<usize>::new());
        assert_eq!(s.scalar_i64().unwrap(), 7);
    }

    #[test]
    fn every_supported_dtype() {
        let mk = |dtype: DType, data: Vec<u8>, n: usize| {
            let a = NpyArray { dtype, shape: vec![n], fortran_order: false, data };
            NpyArray::parse(&a.to_bytes()).unwrap()
        };
        let f2 = [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)].iter().flat_map(|h| h.to_le_bytes()).collect();
        assert_eq!(mk(DType::F16, f2, 2).to_f32().unwrap(), vec![1.5, -2.0]);
        let f8 = [0.1f64, -3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(mk(DType::F64, f8, 2).to_f64().unwrap(), vec![0.1, -3.0]);
        let i4 = [-7i32, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(mk(DType::I32, i4, 2).to_i64().unwrap(), vec![-7, 9]);
        assert_eq!(mk(DType::U8, vec![0, 255], 2).to_i64().unwrap(), vec![0, 255]);
        assert_eq!(mk(DType::Bool, vec![1, 0], 2).to_i64().unwrap(), vec![1, 0]);
        assert!(mk(DType::F32, vec![0; 4], 1).to_i64().is_err(), "floats are not silently cast to ints");
        for d in ["<f4", "<f8", "<i8", "<i4", "|u1", "|b1", "<f2", "|O"] {
            assert_eq!(DType::parse(d, None).unwrap().descr(), d);
        }
        let err = DType::parse("<c8", None).unwrap_err().to_string();
        assert!(err.contains("unsupported dtype"), "{err}");
    }

    #[test]
    fn header_errors_are_clear() {
        let mut bytes = NpyArray::from_f32(&[4], &[1., 2., 3., 4.]).to_bytes();
        bytes.truncate(bytes.len() - 3);
        let err = format!("{:#}", NpyArray::parse(&bytes).unwrap_err());
        assert!(err.contains("truncated"), "{err}");
        let h = "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }\n";
        let mut bad = b"\x93NUMPY\x01\x00".to_vec();
        bad.extend_from_slice(&(h.len() as u16).to_le_bytes());
        bad.extend_from_slice(h.as_bytes());
        bad.extend_from_slice(&[0; 4]);
        let err = format!("{:#}", NpyArray::parse(&bad).unwrap_err());
        assert!(err.contains("big-endian"), "{err}");
        assert_eq!(DType::parse("f2", Some("<")).unwrap(), DType::F16);
    }
}
