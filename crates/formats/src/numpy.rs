//! The numpy layer over [`crate::pickle`]: turns pickled numpy arrays
//! (`numpy.core.multiarray._reconstruct` + `__setstate__`), dtypes and scalars into
//! [`Value::Array`] / [`Value::ObjectArray`] / numbers, and refuses every other
//! global, call or object with an error naming it. This is what reading the `info`
//! field of a region-feature `.npz` needs (SPEC §2), and nothing more.

use anyhow::{bail, Context, Result};

use crate::npy::{DType, NpyArray};
use crate::pickle::Value;

fn is_multiarray(module: &str) -> bool {
    module == "numpy.core.multiarray" || module == "numpy._core.multiarray"
}

/// Resolves numpy values inside a parsed pickle; plain containers are kept.
pub fn resolve(v: &Value) -> Result<Value> {
    resolve_depth(v, 0)
}

fn resolve_depth(v: &Value, depth: usize) -> Result<Value> {
    if depth > 1000 {
        bail!("pickled value nests too deeply");
    }
    let r = |x: &Value| resolve_depth(x, depth + 1);
    Ok(match v {
        Value::None | Value::Bool(_) | Value::Int(_) | Value::BigInt(_) | Value::Float(_) | Value::Str(_) | Value::Bytes(_) => v.clone(),
        Value::Array(_) | Value::ObjectArray { .. } => v.clone(),
        Value::List(xs) => Value::List(xs.iter().map(r).collect::<Result<_>>()?),
        Value::Tuple(xs) => Value::Tuple(xs.iter().map(r).collect::<Result<_>>()?),
        Value::Set(xs) => Value::Set(xs.iter().map(r).collect::<Result<_>>()?),
        Value::Dict(kv) => Value::Dict(kv.iter().map(|(k, x)| Ok((r(k)?, r(x)?))).collect::<Result<_>>()?),
        Value::Build { obj, state } if is_reconstruct(obj) => array_from_state(state, depth)?,
        Value::Reduce { callable, args, .. } => match callable.global_name() {
            Some(("_codecs", "encode")) => latin1_bytes(args)?,
            Some((m, "scalar")) if is_multiarray(m) => scalar(args)?,
            _ => bail!("refusing to interpret pickled {}: only numpy arrays, dtypes, scalars and plain containers are supported", v.kind()),
        },
        _ => bail!("refusing to interpret pickled {}: only numpy arrays, dtypes, scalars and plain containers are supported", v.kind()),
    })
}

/// `_reconstruct(numpy.ndarray, (0,), b'b')`
fn is_reconstruct(obj: &Value) -> bool {
    match obj {
        Value::Reduce { callable, args, .. } => {
            callable.global_name().is_some_and(|(m, n)| is_multiarray(m) && n == "_reconstruct")
                && args.as_seq().and_then(|a| a.first()).and_then(|c| c.global_name()) == Some(("numpy", "ndarray"))
        }
        _ => false,
    }
}

/// ndarray.__setstate__((version, shape, dtype, is_fortran, data)); version-less 4-tuples too.
fn array_from_state(state: &Value, depth: usize) -> Result<Value> {
    let s = state.as_seq().context("ndarray state is not a tuple")?;
    let s = match s.len() {
        5 => &s[1..],
        4 => s,
        n => bail!("ndarray state has {n} fields, expected 4 or 5"),
    };
    let shape = s[0]
        .as_seq()
        .context("ndarray shape is not a tuple")?
        .iter()
        .map(|d| d.as_int().filter(|&d| d >= 0).map(|d| d as usize).context("bad ndarray dimension"))
        .collect::<Result<Vec<_>>>()?;
    let dtype = dtype_of(&s[1])?;
    let fortran_order = matches!(s[2], Value::Bool(true)) || s[2].as_int() == Some(1);
    let numel: usize = shape.iter().product();
    if dtype == DType::Object {
        let items = s[3].as_seq().context("object ndarray data is not a list")?;
        if items.len() != numel {
            bail!("object ndarray has {} items for shape {shape:?}", items.len());
        }
        let items = items.iter().map(|x| resolve_depth(x, depth + 1)).collect::<Result<Vec<_>>>()?;
        // Fortran-ordered object arrays are rare enough to refuse rather than reorder.
        if fortran_order && shape.len() > 1 {
            bail!("Fortran-ordered object arrays are not supported");
        }
        return Ok(Value::ObjectArray { shape, items });
    }
    let data = match resolve_depth(&s[3], depth + 1)? {
        Value::Bytes(b) => b,
        other => bail!("ndarray data is {}, expected bytes", other.kind()),
    };
    if data.len() != numel * dtype.size() {
        bail!("ndarray data is {} bytes, shape {shape:?} of {} needs {}", data.len(), dtype.descr(), numel * dtype.size());
    }
    Ok(Value::Array(NpyArray { dtype, shape, fortran_order, data }))
}

/// `numpy.dtype('f4', False, True)` with `__setstate__((3, '<', ...))`.
fn dtype_of(v: &Value) -> Result<DType> {
    let (call, state) = match v {
        Value::Build { obj, state } => (&**obj, Some(&**state)),
        other => (other, None),
    };
    let Value::Reduce { callable, args, .. } = call else { bail!("expected a numpy dtype, found {}", v.kind()) };
    if callable.global_name() != Some(("numpy", "dtype")) {
        bail!("expected numpy.dtype, found {}", callable.kind());
    }
    let name = args.as_seq().and_then(|a| a.first()).and_then(|n| n.as_str()).context("numpy.dtype without a type string")?;
    let order = state.and_then(|s| s.as_seq()).and_then(|s| s.get(1)).and_then(|o| o.as_str());
    DType::parse(name, order)
}

/// `numpy.core.multiarray.scalar(dtype, bytes)` → Int or Float.
fn scalar(args: &Value) -> Result<Value> {
    let a = args.as_seq().context("numpy scalar args")?;
    if a.len() != 2 {
        bail!("numpy scalar with {} args", a.len());
    }
    let dtype = dtype_of(&a[0])?;
    let data = match resolve(&a[1])? {
        Value::Bytes(b) => b,
        other => bail!("numpy scalar data is {}", other.kind()),
    };
    let arr = NpyArray { dtype, shape: vec![], fortran_order: false, data };
    if arr.data.len() != dtype.size() {
        bail!("numpy scalar has {} bytes for {}", arr.data.len(), dtype.descr());
    }
    Ok(match dtype {
        DType::F16 | DType::F32 | DType::F64 => Value::Float(arr.to_f64()?[0]),
        DType::Bool => Value::Bool(arr.data[0] != 0),
        DType::Object => bail!("object scalar"),
        _ => Value::Int(arr.scalar_i64()?),
    })
}

/// Python 3's protocol-2 spelling of bytes: `_codecs.encode(str, 'latin1')`.
fn latin1_bytes(args: &Value) -> Result<Value> {
    let a = args.as_seq().context("_codecs.encode args")?;
    let s = a.first().and_then(|s| s.as_str()).context("_codecs.encode without a string")?;
    let enc = a.get(1).and_then(|e| e.as_str()).unwrap_or("utf-8");
    if enc != "latin1" && enc != "latin-1" {
        bail!("_codecs.encode with encoding {enc:?} (only latin1 is used by numpy)");
    }
    s.chars()
        .map(|c| u8::try_from(c as u32).map_err(|_| anyhow::anyhow!("non-latin1 character in bytes")))
        .collect::<Result<Vec<u8>>>()
        .map(Value::Bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::{parse_plain, write};

    #[test]
    fn array_round_trip_through_pickle() {
        let a = NpyArray::from_f32(&[2, 2], &[1.0, -2.0, 3.5, 4.0]);
        let dict = Value::Dict(vec![
            (Value::Str("objects_conf".into()), Value::Array(a.clone())),
            (Value::Str("image_w".into()), Value::Int(640)),
        ]);
        let back = resolve(&parse_plain(&write(&dict).unwrap()).unwrap()).unwrap();
        assert_eq!(back, dict);
    }

    #[test]
    fn refuses_unknown_globals() {
        let v = Value::Reduce {
            callable: Box::new(Value::Global { module: "os".into(), name: "system".into() }),
            args: Box::new(Value::Tuple(vec![Value::Str("rm".into())])),
            items: vec![],
            list_items: vec![],
        };
        let err = format!("{:#}", resolve(&Value::List(vec![v])).unwrap_err());
        assert!(err.contains("os.system") && err.contains("refusing"), "{err}");
    }
}
