//! Helpers shared by every crate's tests (a dev-dependency only): where the fixtures are,
//! a reader for the recorded safetensors batches, the comparisons the fixtures README
//! prescribes, and scratch directories that do not collide between test processes.

pub mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// The workspace's `testdata/` folder (ground truth recorded from the published code).
pub fn testdata_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// A file or folder inside `testdata/`.
pub fn testdata(name: &str) -> PathBuf {
    testdata_dir().join(name)
}

/// A fresh, empty scratch directory for one test (`tag` keeps tests of one process apart,
/// the process id keeps concurrent test binaries apart).
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("demovlp-test-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    d
}

/// Every tensor of a recorded safetensors file, f32 and i64 apart, with the `config`
/// metadata parsed when there is one.
pub struct Fixture {
    pub name: String,
    pub f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub i64s: HashMap<String, (Vec<usize>, Vec<i64>)>,
    pub u8s: HashMap<String, (Vec<usize>, Vec<u8>)>,
    pub config: serde_json::Value,
    /// Every metadata entry, unparsed.
    pub metadata: HashMap<String, String>,
}

impl Fixture {
    /// Loads `testdata/<name>`; panics with the path on any problem (tests only).
    pub fn load(name: &str) -> Fixture {
        Fixture::load_path(&testdata(name))
    }

    pub fn load_path(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let config = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .map(|c| serde_json::from_str(c).unwrap_or_else(|e| panic!("{}: config metadata: {e}", path.display())))
            .unwrap_or(serde_json::Value::Null);
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let metadata = header.metadata().clone().unwrap_or_default();
        let (mut f32s, mut i64s, mut u8s) = (HashMap::new(), HashMap::new(), HashMap::new());
        for (k, v) in st.tensors() {
            let d = v.data();
            match v.dtype() {
                Dtype::F32 => {
                    f32s.insert(k, (v.shape().to_vec(), d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()));
                }
                Dtype::I64 => {
                    i64s.insert(k, (v.shape().to_vec(), d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()));
                }
                Dtype::U8 => {
                    u8s.insert(k, (v.shape().to_vec(), d.to_vec()));
                }
                t => panic!("{}: unexpected dtype {t:?} for {k}", path.display()),
            }
        }
        Fixture { name: path.file_name().unwrap_or_default().to_string_lossy().into_owned(), f32s, i64s, u8s, config, metadata }
    }

    /// An f32 tensor's values; panics naming the tensor when it is absent.
    pub fn f(&self, k: &str) -> &[f32] {
        &self.f32s.get(k).unwrap_or_else(|| panic!("{}: no f32 tensor {k}", self.name)).1
    }

    pub fn i(&self, k: &str) -> &[i64] {
        &self.i64s.get(k).unwrap_or_else(|| panic!("{}: no i64 tensor {k}", self.name)).1
    }

    pub fn u8(&self, k: &str) -> &[u8] {
        &self.u8s.get(k).unwrap_or_else(|| panic!("{}: no u8 tensor {k}", self.name)).1
    }

    /// A metadata entry parsed as JSON; panics naming it when absent or malformed.
    pub fn meta_json(&self, key: &str) -> serde_json::Value {
        let s = self.metadata.get(key).unwrap_or_else(|| panic!("{}: no metadata {key:?}", self.name));
        serde_json::from_str(s).unwrap_or_else(|e| panic!("{}: metadata {key:?}: {e}", self.name))
    }

    pub fn shape(&self, k: &str) -> &[usize] {
        match self.f32s.get(k) {
            Some(t) => &t.0,
            None => &self.i64s.get(k).unwrap_or_else(|| panic!("{}: no tensor {k}", self.name)).0,
        }
    }

    /// Names of the f32 tensors that start with `prefix`, sorted.
    pub fn names(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self.f32s.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        v.sort();
        v
    }

    /// How many of `<prefix>0<suffix>`, `<prefix>1<suffix>`, … exist (layer counts).
    pub fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..).take_while(|i| self.f32s.contains_key(&format!("{prefix}{i}{suffix}"))).count()
    }
}

/// Largest |x| of a slice (0 for an empty one).
pub fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()))
}

/// max |got − want| / max(max |want|, `floor`): the fixtures' "relative to the tensor's
/// largest magnitude" comparison. `floor` keeps a tensor whose true value is (near) zero
/// from turning round-off into a large relative error (see [`grad_floor`]).
pub fn rel_err_floor(got: &[f32], want: &[f32], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "length {} vs {}", got.len(), want.len());
    let scale = max_abs(want).max(floor).max(1e-30);
    got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max) / scale
}

/// max |got − want| / max |want|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    rel_err_floor(got, want, 0.0)
}

/// The well-posed gradient scale of the fixtures README: 1e-3 × the largest recorded
/// gradient of any parameter. An attention key bias's true gradient is exactly zero (softmax
/// ignores a per-query constant), so its recorded value is round-off noise; compared
/// against max(its own max, this floor) it is checked to the precision the others are.
pub fn grad_floor(fx: &Fixture) -> f64 {
    1e-3 * fx.names("grad.").iter().map(|k| max_abs(fx.f(k))).fold(0.0, f64::max)
}

/// Collects named comparisons, reports every measured error on stderr and fails once with
/// all the mismatches (not just the first).
#[derive(Default)]
pub struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    pub fn check(&mut self, what: &str, err: f64, tol: f64) {
        self.lines.push(format!("{what} {err:.1e}"));
        if err.is_nan() || err > tol {
            self.failures.push(format!("{what}: error {err:.3e} > {tol:.1e}"));
        }
    }

    pub fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    /// Prints the measured errors and panics with every failure.
    pub fn finish(self, title: &str) {
        eprintln!("{title}: {}", self.lines.join(", "));
        assert!(self.failures.is_empty(), "{title}: {} mismatches:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

/// The CPU kernels' instruction-set path on this machine (`avx512`, `avx2` or `portable`):
/// the GEMMs and reductions of each path round differently, so bit-exact pins of training
/// results are recorded per path.
pub fn cpu_kernel_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    "portable"
}

/// Asserts that `hash` (a `params_hash` of a training result) is the value pinned for the
/// test `name` on this machine's kernel path (`pins`: `(path, hash)` pairs recorded before a
/// refactoring, which must keep every CPU bit). On a path without a recorded pin there is
/// nothing to compare with: the hash is printed (to record it) and the test goes on.
pub fn assert_pinned(name: &str, hash: &str, pins: &[(&str, &str)]) {
    let path = cpu_kernel_path();
    match pins.iter().find(|(p, _)| *p == path) {
        Some((_, want)) => assert_eq!(hash, *want, "{name}: the final parameters' hash on the {path} kernels moved from its pin"),
        None => eprintln!("PIN {name} {path} {hash} (no pin recorded for the {path} kernels)"),
    }
}

/// Decompresses the gzip file `src` (a compressed fixture in `testdata/`) into `dst`.
pub fn gunzip(src: &Path, dst: &Path) {
    use std::io::Read;
    let gz = std::fs::read(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut bytes).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    std::fs::write(dst, bytes).unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
}

/// Decodes standard base64 (padding and whitespace ignored), e.g. a `data:` URI's payload.
pub fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for ch in clean.chunks(4) {
        let n = ch.iter().enumerate().fold(0u32, |a, (i, &c)| a | (val(c) as u32) << (18 - 6 * i));
        for k in 0..ch.len() - 1 {
            out.push((n >> (16 - 8 * k)) as u8);
        }
    }
    out
}
