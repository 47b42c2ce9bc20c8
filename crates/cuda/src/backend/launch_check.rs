//! Without a GPU the launches cannot run; this checks every `launch!` against the kernel
//! it names: same number of arguments, and each argument's type (from its spelling: a
//! pointer `.ptr`/`at(..)`/a pointer local, `as i64` = `long long`, `as i32` = `int`, the
//! f32 names) the kernel parameter's.
use std::collections::HashMap;

#[derive(Debug, PartialEq, Clone, Copy)]
enum Ty {
    Ptr,
    I64,
    I32,
    F32,
}

fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut depth, mut cur) = (Vec::new(), 0i32, String::new());
    for ch in s.chars() {
        match ch {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
        if ch == ',' && depth == 0 {
            out.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(ch);
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn kernel_params() -> HashMap<String, Vec<Ty>> {
    let mut m = HashMap::new();
    for (_, src) in crate::SOURCES {
        let mut rest = *src;
        while let Some(i) = rest.find("__global__ void ") {
            rest = &rest[i + "__global__ void ".len()..];
            let open = rest.find('(').unwrap();
            let close = rest.find(')').unwrap();
            let name = rest[..open].trim().to_string();
            let tys = rest[open + 1..close]
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    if p.contains('*') {
                        Ty::Ptr
                    } else if p.starts_with("long long") {
                        Ty::I64
                    } else if p.starts_with("int ") {
                        Ty::I32
                    } else if p.starts_with("float ") {
                        Ty::F32
                    } else {
                        panic!("{name}: parameter type of {p:?}")
                    }
                })
                .collect();
            m.insert(name, tys);
        }
    }
    m
}

fn arg_ty(a: &str) -> Option<Ty> {
    let a = a.trim();
    if a.ends_with("as i64") {
        Some(Ty::I64)
    } else if a.ends_with("as i32") || a.starts_with("regions_of(") {
        Some(Ty::I32)
    } else if ["drop_p"].contains(&a) {
        Some(Ty::F32)
    } else if a.contains(".ptr")
        || a.starts_with("at(")
        || a.starts_with("at_f(")
        || a.ends_with("_p")
        || a.starts_with("text.")
        || a.starts_with("video.")
        || [
            "a", "b", "a16", "b16", "p", "ds", "drop", "q", "k", "v", "dq", "dk", "dv", "c", "x", "rb", "gg", "dscr", "gs", "g_t_raw",
            "g_v_raw", "g_t_hat", "g_v_hat", "s_out", "table", "pw", "pb", "partial", "acc", "slot",
        ]
        .contains(&a)
    {
        Some(Ty::Ptr)
    } else if ["scale", "eps", "beta", "lambda", "log_on", "log_off", "temperature", "keep", "drop_p"].contains(&a) || a.starts_with("c.") {
        Some(Ty::F32)
    } else {
        None
    }
}

#[test]
fn every_launch_matches_its_kernel_signature() {
    let params = kernel_params();
    let src = include_str!("../backend.rs");
    let body = format!("{}{}{}", &src[..src.find("#[cfg(test)]").unwrap()], include_str!("setup.rs"), include_str!("losses.rs"));
    let body = body.as_str();
    let mut checked = 0;
    let mut rest = body;
    while let Some(i) = rest.find("launch!(self, \"") {
        rest = &rest[i + "launch!(self, \"".len()..];
        let name = &rest[..rest.find('"').unwrap()];
        let semi = rest.find(';').unwrap();
        let end = rest.find(");").unwrap();
        let args = split_top(&rest[semi + 1..end]);
        let want = params.get(name).unwrap_or_else(|| panic!("launch of unknown kernel {name}"));
        assert_eq!(args.len(), want.len(), "{name}: {} arguments, the kernel takes {}: {args:?}", args.len(), want.len());
        for (k, (a, w)) in args.iter().zip(want).enumerate() {
            let got = arg_ty(a).unwrap_or_else(|| panic!("{name}: cannot tell the type of argument {k} `{a}`"));
            assert_eq!(got, *w, "{name}: argument {k} `{a}`");
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} launches found");
    // Every kernel is launched somewhere.
    for k in params.keys() {
        assert!(body.contains(&format!("\"{k}\"")), "kernel {k} is never launched");
    }
}
