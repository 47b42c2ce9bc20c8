//! Writing pickles: a [`Value`] tree as a protocol-3 pickle, numpy arrays written the way
//! numpy pickles them.

use anyhow::{bail, Result};

use super::Value;

/// Serialises `v` as a protocol-3 pickle (no memo). [`Value::Array`] and
/// [`Value::ObjectArray`] are written the way numpy pickles arrays, so
/// `numpy.load(..., allow_pickle=True)` and [`crate::numpy::resolve`] read them back.
/// Used to write region-feature `info` dicts (tests, the demo corpus).
pub fn write(v: &Value) -> Result<Vec<u8>> {
    let mut out = vec![0x80, 3];
    write_value(v, &mut out)?;
    out.push(b'.');
    Ok(out)
}

fn global(module: &str, name: &str) -> Value {
    Value::Global { module: module.into(), name: name.into() }
}

/// `numpy.dtype(kind, False, True)` + `__setstate__((3, order, None, None, None, -1, -1, flags))`.
fn numpy_dtype(kind: &str, order: &str, flags: i64) -> Value {
    Value::Build {
        obj: Box::new(Value::Reduce {
            callable: Box::new(global("numpy", "dtype")),
            args: Box::new(Value::Tuple(vec![Value::Str(kind.into()), Value::Bool(false), Value::Bool(true)])),
            items: vec![],
            list_items: vec![],
        }),
        state: Box::new(Value::Tuple(vec![
            Value::Int(3),
            Value::Str(order.into()),
            Value::None,
            Value::None,
            Value::None,
            Value::Int(-1),
            Value::Int(-1),
            Value::Int(flags),
        ])),
    }
}

/// `_reconstruct(ndarray, (0,), b'b')` + `__setstate__((1, shape, dtype, fortran, data))`.
fn numpy_array(shape: &[usize], dtype: Value, fortran: bool, data: Value) -> Value {
    Value::Build {
        obj: Box::new(Value::Reduce {
            callable: Box::new(global("numpy.core.multiarray", "_reconstruct")),
            args: Box::new(Value::Tuple(vec![global("numpy", "ndarray"), Value::Tuple(vec![Value::Int(0)]), Value::Bytes(b"b".to_vec())])),
            items: vec![],
            list_items: vec![],
        }),
        state: Box::new(Value::Tuple(vec![
            Value::Int(1),
            Value::Tuple(shape.iter().map(|&d| Value::Int(d as i64)).collect()),
            dtype,
            Value::Bool(fortran),
            data,
        ])),
    }
}

fn write_value(v: &Value, out: &mut Vec<u8>) -> Result<()> {
    match v {
        Value::None => out.push(b'N'),
        Value::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Value::Int(i) => {
            if let Ok(small) = i32::try_from(*i) {
                out.push(b'J');
                out.extend_from_slice(&small.to_le_bytes());
            } else {
                out.extend_from_slice(&[0x8a, 8]);
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        Value::BigInt(b) => {
            out.push(0x8b);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        Value::Float(f) => {
            out.push(b'G');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => {
            out.push(b'X');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Bytes(b) => {
            out.push(b'B');
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        Value::List(xs) => {
            out.push(b']');
            if !xs.is_empty() {
                out.push(b'(');
                for x in xs {
                    write_value(x, out)?;
                }
                out.push(b'e');
            }
        }
        Value::Tuple(xs) => {
            out.push(b'(');
            for x in xs {
                write_value(x, out)?;
            }
            out.push(b't');
        }
        Value::Dict(kv) => {
            out.push(b'}');
            write_items(kv, out)?;
        }
        Value::Set(_) => bail!("writing sets is not supported"),
        Value::Global { module, name } => {
            out.push(b'c');
            for part in [module, name] {
                if part.contains('\n') {
                    bail!("global name contains a newline");
                }
                out.extend_from_slice(part.as_bytes());
                out.push(b'\n');
            }
        }
        Value::Reduce { callable, args, items, list_items } => {
            write_value(callable, out)?;
            write_value(args, out)?;
            out.push(b'R');
            write_items(items, out)?;
            if !list_items.is_empty() {
                out.push(b'(');
                for x in list_items {
                    write_value(x, out)?;
                }
                out.push(b'e');
            }
        }
        Value::NewObj { cls, args } => {
            write_value(cls, out)?;
            write_value(args, out)?;
            out.push(0x81);
        }
        Value::Build { obj, state } => {
            write_value(obj, out)?;
            write_value(state, out)?;
            out.push(b'b');
        }
        Value::PersistentId(id) => {
            write_value(id, out)?;
            out.push(b'Q');
        }
        Value::Array(a) => {
            if a.dtype == crate::npy::DType::Object {
                bail!("write an object array as Value::ObjectArray");
            }
            let descr = a.dtype.descr();
            let dtype = numpy_dtype(&descr[1..], &descr[..1], 0);
            write_value(&numpy_array(&a.shape, dtype, a.fortran_order, Value::Bytes(a.data.clone())), out)?;
        }
        Value::ObjectArray { shape, items } => {
            // flags 63 = the object dtype's NPY_ITEM_REFCOUNT | ... as numpy writes it
            let dtype = numpy_dtype("O8", "|", 63);
            write_value(&numpy_array(shape, dtype, false, Value::List(items.clone())), out)?;
        }
    }
    Ok(())
}

fn write_items(kv: &[(Value, Value)], out: &mut Vec<u8>) -> Result<()> {
    if !kv.is_empty() {
        out.push(b'(');
        for (k, x) in kv {
            write_value(k, out)?;
            write_value(x, out)?;
        }
        out.push(b'u');
    }
    Ok(())
}
