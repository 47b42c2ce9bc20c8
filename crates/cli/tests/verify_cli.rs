//! `demovlp verify <index>`: exit 0 and a JSON line on a sound index; a flipped byte in a
//! file that opening does not check (the local embeddings) is reported naming the file, exit 1.

#[path = "../../serve/tests/support/mod.rs"]
mod support;

use std::process::Command;

use serde_json::Value;

fn verify(index: &std::path::Path) -> (Option<i32>, Value, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_demovlp")).arg("verify").arg(index).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().last().unwrap_or_else(|| panic!("no JSON line: {}", String::from_utf8_lossy(&o.stderr)));
    (o.status.code(), serde_json::from_str(line).unwrap(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn verify_passes_a_sound_index_and_names_a_damaged_file() {
    let w = support::build_world("verify-cli");
    let (code, j, err) = verify(&w.index);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(j["problems"], serde_json::json!([]), "{j}");
    assert_eq!(j["clips"].as_u64(), Some(support::CLIPS as u64));
    assert!(j["files_checked"].as_u64().unwrap() >= 6 * j["segments"].as_u64().unwrap(), "{j}");
    let seg = j["segments"].as_u64().unwrap();
    assert!(seg >= 1);
    let p = w.index.join("seg-00000/local.f16");
    let mut b = std::fs::read(&p).unwrap();
    b[64] ^= 0x01;
    std::fs::write(&p, &b).unwrap();
    let (code, j, err) = verify(&w.index);
    assert_eq!(code, Some(1), "{err}");
    let problems = j["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{j}");
    assert!(problems[0].as_str().unwrap().contains(&p.display().to_string()), "{j}");
    assert!(err.contains("local.f16") && err.contains("damaged"), "{err}");
}
