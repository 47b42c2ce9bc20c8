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
            Some((m, "_frombuffer")) if m == "numpy.core.numeric" || m == "numpy._core.numeric" => frombuffer(args)?,
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

/// Protocol 5: `numpy.core.numeric._frombuffer(buffer, dtype, shape, order)`.
fn frombuffer(args: &Value) -> Result<Value> {
    let a = args.as_seq().context("_frombuffer args")?;
    if a.len() != 4 {
        bail!("_frombuffer with {} args, expected 4", a.len());
    }
    let Value::Bytes(data) = &a[0] else { bail!("_frombuffer buffer is {}", a[0].kind()) };
    let dtype = dtype_of(&a[1])?;
    if dtype == DType::Object {
        bail!("_frombuffer of an object dtype");
    }
    let shape = a[2]
        .as_seq()
        .context("_frombuffer shape is not a tuple")?
        .iter()
        .map(|d| d.as_int().filter(|&d| d >= 0).map(|d| d as usize).context("bad dimension"))
        .collect::<Result<Vec<_>>>()?;
    let fortran_order = a[3].as_str() == Some("F");
    if data.len() != shape.iter().product::<usize>() * dtype.size() {
        bail!("_frombuffer: {} bytes for shape {shape:?} of {}", data.len(), dtype.descr());
    }
    Ok(Value::Array(NpyArray { dtype, shape, fortran_order, data: data.clone() }))
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

    /// `pickle.dumps({'conf': f32[3], 'ids': i64[2,2].T, 'h': np.int64(480), 'w': np.float32(1.5),
    /// 'name': 'x'}, protocol)` from numpy 2.x: protocol 2 (`_codecs.encode` bytes, Fortran order)
    /// and protocol 5 (`_frombuffer` with an in-band bytearray).
    #[test]
    fn real_numpy_pickles_protocol_2_and_5() {
        for hex in [P2, P5] {
            let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let v = resolve(&parse_plain(&bytes).unwrap()).unwrap();
            let Some(Value::Array(conf)) = v.get("conf") else { panic!("conf: {v:?}") };
            assert_eq!(conf.to_f32().unwrap(), vec![0.5, 0.25, 2.0]);
            let Some(Value::Array(ids)) = v.get("ids") else { panic!("ids") };
            assert_eq!(ids.shape, vec![2, 2]);
            assert_eq!(ids.to_i64().unwrap(), vec![1, 3, 2, 4], "transpose read in C order");
            assert_eq!(v.get("h"), Some(&Value::Int(480)));
            assert_eq!(v.get("w"), Some(&Value::Float(1.5)));
            assert_eq!(v.get("name").and_then(Value::as_str), Some("x"));
        }
    }

    const P2: &str = "80027d7100285804000000636f6e667101636e756d70792e5f636f72652e6d756c746961727261790a5f7265636f6e7374727563740a7102636e756d70790a6e6461727261790a71034b00857104635f636f646563730a656e636f64650a7105580100000062710658060000006c6174696e31710786710852710987710a52710b284b014b0385710c636e756d70790a64747970650a710d58020000006634710e898887710f527110284b0358010000003c71114e4e4e4affffffff4affffffff4b0074711262896805580d0000000000003f0000c2803e00000040711368078671145271157471166258030000006964737117680268034b00857118680987711952711a284b014b024b0286711b680d58020000006938711c898887711d52711e284b0368114e4e4e4affffffff4affffffff4b0074711f628868055820000000010000000000000002000000000000000300000000000000040000000000000071206807867121527122747123625801000000687124636e756d70792e5f636f72652e6d756c746961727261790a7363616c61720a7125681e68055809000000c3a0010000000000007126680786712752712886712952712a580100000077712b68256810680558050000000000c3803f712c680786712d52712e86712f52713058040000006e616d6571315801000000787132752e";
    const P5: &str = "80059547010000000000007d94288c04636f6e66948c136e756d70792e5f636f72652e6e756d65726963948c0b5f66726f6d62756666657294939428960c000000000000000000003f0000803e00000040948c056e756d7079948c0564747970659493948c02663494898887945294284b038c013c944e4e4e4affffffff4affffffff4b007494624b0385948c014394749452948c036964739468042896200000000000000001000000000000000200000000000000030000000000000004000000000000009468088c02693894898887945294284b03680c4e4e4e4affffffff4affffffff4b007494624b024b0286948c014694749452948c0168948c166e756d70792e5f636f72652e6d756c74696172726179948c067363616c617294939468164308e00100000000000094869452948c017794681f680b43040000c03f94869452948c046e616d65948c017894752e";

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
