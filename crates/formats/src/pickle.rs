//! A small pickle interpreter (protocols 0–5, the opcodes numpy and `torch.save` emit).
//!
//! It executes nothing: globals, `REDUCE`, `BUILD` and `NEWOBJ` are kept symbolically in
//! a [`Value`] tree, and persistent ids (`BINPERSID`, how torch refers to tensor storages)
//! are kept as [`Value::PersistentId`] or handed to a callback. Consumers decide what a
//! global means (see [`crate::numpy`] for numpy arrays; the model crate interprets
//! `torch._utils._rebuild_tensor_v2`). Unknown opcodes are refused with the opcode and
//! its byte offset.
//!
//! Writing (protocol 3, numpy arrays as numpy pickles them) is in `pickle/write.rs`; this
//! file stays at ~600 lines because the reader is one opcode `match` over one machine state,
//! which reads best whole.
//!
//! Mutation is modelled faithfully: objects live in an arena while parsing, so a dict
//! memoised before its `SETITEMS` (as pickle always does) is seen complete when fetched
//! again from the memo.

use anyhow::{bail, Context, Result};

mod write;

pub use write::write;

/// A pickled value. `Dict` keeps insertion order. A torch state dict arrives as
/// `Reduce { callable: Global(collections.OrderedDict), items, .. }` (its entries set by
/// `SETITEMS` after the call); [`Value::as_dict`] and [`Value::get`] see through that.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64: little-endian two's-complement bytes (LONG1/LONG4).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    /// `bytes` (and protocol-0/2 `str` of Python 2, which numpy used for array data).
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    /// `module.name`, unresolved.
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`, unevaluated. `items`/`list_items` collect `SETITEM(S)` /
    /// `APPEND(S)` applied to the result (e.g. an `OrderedDict()` being filled).
    Reduce {
        callable: Box<Value>,
        args: Box<Value>,
        items: Vec<(Value, Value)>,
        list_items: Vec<Value>,
    },
    /// `cls.__new__(cls, *args)` (NEWOBJ / NEWOBJ_EX; kwargs dropped into `args` as a trailing dict).
    NewObj {
        cls: Box<Value>,
        args: Box<Value>,
    },
    /// `obj.__setstate__(state)` (or `obj.__dict__.update(state)`).
    Build {
        obj: Box<Value>,
        state: Box<Value>,
    },
    /// A persistent id, kept when no callback replaced it.
    PersistentId(Box<Value>),
    /// Produced only by [`crate::numpy::resolve`]: a numeric numpy array.
    Array(crate::npy::NpyArray),
    /// Produced only by [`crate::numpy::resolve`]: a numpy object array (C order).
    ObjectArray {
        shape: Vec<usize>,
        items: Vec<Value>,
    },
}

impl Value {
    /// The string, if this is a `Str` (or latin-1 `Bytes`, as Python 2 pickles store text).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
    /// The integer (bools count as 0/1, as in Python).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// The number as f64 (ints converted).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    /// Elements of a tuple or list.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
    /// Items of a dict, or of an `OrderedDict()` reduce filled by `SETITEMS`.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            Value::Reduce { callable, items, .. }
                if callable.global_name().is_some_and(|(m, n)| m == "collections" && n == "OrderedDict") =>
            {
                Some(items)
            }
            // torch's state dicts carry `_metadata`: OrderedDict() + SETITEMS, then BUILD.
            Value::Build { obj, .. } if matches!(**obj, Value::Reduce { .. }) => obj.as_dict(),
            _ => None,
        }
    }
    /// Looks up a string key in a dict (see [`as_dict`](Self::as_dict)).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }
    /// `(module, name)` of a `Global`.
    pub fn global_name(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }
    /// A short description for error messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Dict(_) => "dict".into(),
            Value::Set(_) => "set".into(),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Reduce { callable, .. } => format!("call of {}", callable.kind()),
            Value::NewObj { cls, .. } => format!("new object of {}", cls.kind()),
            Value::Build { obj, .. } => format!("built {}", obj.kind()),
            Value::PersistentId(_) => "persistent id".into(),
            Value::Array(_) => "numpy array".into(),
            Value::ObjectArray { .. } => "numpy object array".into(),
        }
    }
}

/// Arena node while parsing: containers refer to other nodes by index so that
/// in-place mutation (SETITEMS, APPEND, BUILD) is visible through every memo reference.
#[derive(Clone)]
enum Node {
    Leaf(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Set(Vec<usize>),
    Reduce { callable: usize, args: usize, items: Vec<(usize, usize)>, list_items: Vec<usize> },
    NewObj { cls: usize, args: usize },
    Build { obj: usize, state: usize },
}

enum Slot {
    Mark,
    Obj(usize),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Node>,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u64, usize>,
}

/// Parses a pickle; persistent ids are kept as [`Value::PersistentId`].
pub fn parse_plain(bytes: &[u8]) -> Result<Value> {
    parse(bytes, &mut |v| Ok(Value::PersistentId(Box::new(v))))
}

/// Parses a pickle, replacing each persistent id by `persistent_load(id)`.
/// Errors name the opcode and byte offset where parsing failed.
pub fn parse(bytes: &[u8], persistent_load: &mut dyn FnMut(Value) -> Result<Value>) -> Result<Value> {
    Ok(parse_prefix(bytes, persistent_load)?.0)
}

/// Parses the pickle at the start of `bytes` (several pickles written back to back, as the
/// legacy `torch.save` format does) and returns it with the number of bytes it took,
/// STOP included.
pub fn parse_prefix(bytes: &[u8], persistent_load: &mut dyn FnMut(Value) -> Result<Value>) -> Result<(Value, usize)> {
    let mut m = Machine { data: bytes, pos: 0, arena: Vec::new(), stack: Vec::new(), memo: Default::default() };
    let root = m.run(persistent_load)?;
    Ok((m.materialise(root, 0)?, m.pos))
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .with_context(|| format!("pickle truncated: need {n} bytes at offset {}, have {}", self.pos, self.data.len() - self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').context("pickle truncated: unterminated text line")?;
        let s = std::str::from_utf8(&rest[..n]).context("non-UTF-8 text line")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn push_node(&mut self, n: Node) {
        self.arena.push(n);
        self.stack.push(Slot::Obj(self.arena.len() - 1));
    }
    fn push(&mut self, v: Value) {
        self.push_node(Node::Leaf(v));
    }
    fn pop(&mut self) -> Result<usize> {
        match self.stack.pop() {
            Some(Slot::Obj(i)) => Ok(i),
            Some(Slot::Mark) => bail!("unexpected MARK on the stack"),
            None => bail!("stack underflow"),
        }
    }
    fn top(&self) -> Result<usize> {
        match self.stack.last() {
            Some(Slot::Obj(i)) => Ok(*i),
            _ => bail!("stack empty or MARK at top"),
        }
    }
    /// Pops everything above the topmost MARK (and the MARK).
    fn pop_mark(&mut self) -> Result<Vec<usize>> {
        let mark = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)).context("no MARK on the stack")?;
        let items = self.stack.drain(mark + 1..).map(|s| match s {
            Slot::Obj(i) => i,
            Slot::Mark => unreachable!(),
        });
        let items: Vec<usize> = items.collect();
        self.stack.pop();
        Ok(items)
    }
    fn string_of(&self, i: usize) -> Result<String> {
        match &self.arena[i] {
            Node::Leaf(Value::Str(s)) => Ok(s.clone()),
            _ => bail!("STACK_GLOBAL expects strings"),
        }
    }
    fn set_items(&mut self, target: usize, kv: Vec<usize>) -> Result<()> {
        if !kv.len().is_multiple_of(2) {
            bail!("SETITEMS with an odd number of stack items");
        }
        let pairs = kv.chunks(2).map(|c| (c[0], c[1]));
        match &mut self.arena[target] {
            Node::Dict(d) => d.extend(pairs),
            Node::Reduce { items, .. } => items.extend(pairs),
            _ => bail!("SETITEM(S) on something that is not a dict"),
        }
        Ok(())
    }
    fn append(&mut self, target: usize, vals: Vec<usize>) -> Result<()> {
        match &mut self.arena[target] {
            Node::List(l) => l.extend(vals),
            Node::Set(s) => s.extend(vals),
            Node::Reduce { list_items, .. } => list_items.extend(vals),
            _ => bail!("APPEND(S)/ADDITEMS on something that is not a list"),
        }
        Ok(())
    }

    fn run(&mut self, persistent_load: &mut dyn FnMut(Value) -> Result<Value>) -> Result<usize> {
        loop {
            let at = self.pos;
            let op = self.u8().context("pickle ended without STOP")?;
            self.step(op, persistent_load).with_context(|| format!("pickle opcode 0x{op:02x} ({:?}) at byte offset {at}", op as char))?;
            if op == b'.' {
                return self.pop().context("STOP with an empty stack");
            }
        }
    }

    fn step(&mut self, op: u8, persistent_load: &mut dyn FnMut(Value) -> Result<Value>) -> Result<()> {
        match op {
            0x80 => {
                let p = self.u8()?; // PROTO
                if p > 5 {
                    bail!("pickle protocol {p} is newer than 5");
                }
            }
            0x95 => {
                self.u64()?; // FRAME: only a length hint
            }
            b'.' => {} // STOP, handled by run()
            b'(' => self.stack.push(Slot::Mark),
            b'0' => {
                // POP: discard top item, or a MARK
                if self.stack.pop().is_none() {
                    bail!("stack underflow");
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let t = self.top()?;
                self.stack.push(Slot::Obj(t));
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = self.u32()? as i32;
                self.push(Value::Int(v as i64))
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64))
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v as i64))
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                let b = self.take(n)?.to_vec();
                self.push(long_from_le(b));
            }
            b'I' => {
                // protocol 0 INT; "01"/"00" are True/False
                let s = self.line()?.trim();
                let v = match s {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    _ => Value::Int(s.parse().with_context(|| format!("bad INT {s:?}"))?),
                };
                self.push(v)
            }
            b'L' => {
                let s = self.line()?.trim().trim_end_matches('L');
                self.push(Value::Int(s.parse().with_context(|| format!("bad LONG {s:?} (too large?)"))?))
            }
            b'F' => {
                let s = self.line()?.trim();
                self.push(Value::Float(s.parse().with_context(|| format!("bad FLOAT {s:?}"))?))
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                self.push(Value::Float(v))
            }
            0x8c | b'X' | 0x8d => {
                let n = match op {
                    0x8c => self.u8()? as usize,
                    b'X' => self.u32()? as usize,
                    _ => self.u64()? as usize,
                };
                let s = std::str::from_utf8(self.take(n)?).context("string is not UTF-8")?;
                self.push(Value::Str(s.to_string()))
            }
            b'C' | b'B' | 0x8e | 0x96 | b'U' | b'T' => {
                // bytes / bytearray / Python 2 str (raw bytes, e.g. numpy array data)
                let n = match op {
                    b'C' | b'U' => self.u8()? as usize,
                    b'B' | b'T' => self.u32()? as usize,
                    _ => self.u64()? as usize,
                };
                let b = self.take(n)?.to_vec();
                self.push(Value::Bytes(b))
            }
            b'V' => {
                // protocol 0 UNICODE with raw-unicode-escape; plain ASCII is enough for us
                let s = self.line()?.to_string();
                if s.contains('\\') {
                    bail!("escaped protocol-0 UNICODE strings are not supported");
                }
                self.push(Value::Str(s))
            }
            b'}' => self.push_node(Node::Dict(Vec::new())),
            b']' => self.push_node(Node::List(Vec::new())),
            b')' => self.push_node(Node::Tuple(Vec::new())),
            0x8f => self.push_node(Node::Set(Vec::new())),
            b'd' => {
                let kv = self.pop_mark()?;
                self.push_node(Node::Dict(Vec::new()));
                let t = self.top()?;
                self.set_items(t, kv)?;
            }
            b'l' => {
                let v = self.pop_mark()?;
                self.push_node(Node::List(v))
            }
            b't' => {
                let v = self.pop_mark()?;
                self.push_node(Node::Tuple(v))
            }
            0x91 => {
                let v = self.pop_mark()?;
                self.push_node(Node::Set(v))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.pop()?);
                }
                v.reverse();
                self.push_node(Node::Tuple(v))
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.top()?;
                self.set_items(d, vec![k, v])?;
            }
            b'u' => {
                let kv = self.pop_mark()?;
                let d = self.top()?;
                self.set_items(d, kv)?;
            }
            b'a' => {
                let v = self.pop()?;
                let l = self.top()?;
                self.append(l, vec![v])?;
            }
            b'e' | 0x90 => {
                let v = self.pop_mark()?;
                let l = self.top()?;
                self.append(l, v)?;
            }
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                self.push(Value::Global { module, name })
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (module, name) = (self.string_of(module)?, self.string_of(name)?);
                self.push(Value::Global { module, name })
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.push_node(Node::Reduce { callable, args, items: Vec::new(), list_items: Vec::new() })
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                self.push_node(Node::NewObj { cls, args })
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let merged = self.arena.len();
                self.arena.push(Node::Tuple(vec![args, kwargs]));
                self.push_node(Node::NewObj { cls, args: merged })
            }
            b'b' => {
                // BUILD mutates the object in place: move the old node aside and make
                // this slot the built object, so memo references see the result.
                let state = self.pop()?;
                let obj = self.top()?;
                let moved = self.arena.len();
                let old = std::mem::replace(&mut self.arena[obj], Node::Build { obj: moved, state });
                self.arena.push(old);
                if let Node::Build { obj: o, .. } = &mut self.arena[obj] {
                    *o = moved;
                }
            }
            b'q' | b'r' => {
                let k = if op == b'q' { self.u8()? as u64 } else { self.u32()? as u64 };
                let t = self.top()?;
                self.memo.insert(k, t);
            }
            0x94 => {
                let k = self.memo.len() as u64;
                let t = self.top()?;
                self.memo.insert(k, t);
            }
            b'p' => {
                let k: u64 = self.line()?.trim().parse().context("bad PUT index")?;
                let t = self.top()?;
                self.memo.insert(k, t);
            }
            b'h' | b'j' | b'g' => {
                let k = match op {
                    b'h' => self.u8()? as u64,
                    b'j' => self.u32()? as u64,
                    _ => self.line()?.trim().parse().context("bad GET index")?,
                };
                let t = *self.memo.get(&k).with_context(|| format!("memo key {k} not defined"))?;
                self.stack.push(Slot::Obj(t));
            }
            b'Q' | b'P' => {
                let id = if op == b'Q' {
                    let i = self.pop()?;
                    self.materialise(i, 0)?
                } else {
                    Value::Str(self.line()?.to_string())
                };
                let v = persistent_load(id)?;
                self.push(v);
            }
            0x97 | 0x98 => bail!("out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are not supported"),
            _ => bail!("unknown or unsupported pickle opcode"),
        }
        Ok(())
    }

    /// Converts an arena node into an owned [`Value`] tree (shared nodes are copied).
    fn materialise(&self, i: usize, depth: usize) -> Result<Value> {
        if depth > 10_000 {
            bail!("pickle nests deeper than 10000 levels (recursive structure?)");
        }
        let m = |j: usize| self.materialise(j, depth + 1);
        let ms = |v: &[usize]| v.iter().map(|&j| m(j)).collect::<Result<Vec<_>>>();
        Ok(match &self.arena[i] {
            Node::Leaf(v) => v.clone(),
            Node::List(v) => Value::List(ms(v)?),
            Node::Tuple(v) => Value::Tuple(ms(v)?),
            Node::Set(v) => Value::Set(ms(v)?),
            Node::Dict(d) => Value::Dict(d.iter().map(|&(k, v)| Ok((m(k)?, m(v)?))).collect::<Result<_>>()?),
            Node::Reduce { callable, args, items, list_items } => Value::Reduce {
                callable: Box::new(m(*callable)?),
                args: Box::new(m(*args)?),
                items: items.iter().map(|&(k, v)| Ok((m(k)?, m(v)?))).collect::<Result<_>>()?,
                list_items: ms(list_items)?,
            },
            Node::NewObj { cls, args } => Value::NewObj { cls: Box::new(m(*cls)?), args: Box::new(m(*args)?) },
            Node::Build { obj, state } => Value::Build { obj: Box::new(m(*obj)?), state: Box::new(m(*state)?) },
        })
    }
}

/// LONG1/LONG4 payload: little-endian two's complement, possibly empty (= 0).
fn long_from_le(b: Vec<u8>) -> Value {
    if b.len() <= 8 {
        let neg = b.last().is_some_and(|&x| x & 0x80 != 0);
        let mut buf = if neg { [0xFFu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(&b);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memoised_dict_sees_later_setitems() {
        // {}; BINPUT 0; MARK 'a' 1 SETITEMS; POP; BINGET 0; STOP  (protocol 2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01u0h\x00.";
        let v = parse_plain(p).unwrap();
        assert_eq!(v, Value::Dict(vec![(Value::Str("a".into()), Value::Int(1))]));
    }

    #[test]
    fn ints_floats_tuples_and_persistent_ids() {
        // (LONG1 -2, BINFLOAT 1.5, BININT -1) as a tuple; then a BINPERSID of 'k'
        let mut p = b"\x80\x02(\x8a\x01\xfeG\x3f\xf8\x00\x00\x00\x00\x00\x00J\xff\xff\xff\xff".to_vec();
        p.extend_from_slice(b"\x8c\x01kQt.");
        let v = parse_plain(&p).unwrap();
        assert_eq!(
            v,
            Value::Tuple(vec![Value::Int(-2), Value::Float(1.5), Value::Int(-1), Value::PersistentId(Box::new(Value::Str("k".into())))])
        );
        let v = parse(&p, &mut |id| Ok(Value::Str(format!("loaded {}", id.as_str().unwrap())))).unwrap();
        assert_eq!(v.as_seq().unwrap()[3], Value::Str("loaded k".into()));
    }

    #[test]
    fn ordered_dict_with_metadata_reads_as_dict() {
        // pickle.dumps(OrderedDict(w=1) with ._metadata = {}, protocol=2), as torch state dicts are
        let p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02K\x01s}q\x03X\t\x00\x00\x00_metadataq\x04}q\x05sb.";
        let v = parse_plain(p).unwrap();
        assert!(matches!(v, Value::Build { .. }));
        assert_eq!(v.get("w"), Some(&Value::Int(1)));
        assert_eq!(v.as_dict().unwrap().len(), 1);
    }

    #[test]
    fn unknown_opcode_named_with_offset() {
        let err = format!("{:#}", parse_plain(b"\x80\x02K\x01\xff.").unwrap_err());
        assert!(err.contains("0xff") && err.contains("offset 4"), "{err}");
        let err = format!("{:#}", parse_plain(b"\x80\x02K").unwrap_err());
        assert!(err.contains("truncated"), "{err}");
    }
}
