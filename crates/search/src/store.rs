//! The index directory.
//!
//! ```text
//! <index>/index.json          settings the index was built with + the list of segments
//! <index>/seg-00000/clips.json  clip ids, as in the annotations
//!                   global.f32  [n, P] L2-normalised global embeddings (little-endian)
//!                   local.f16   [n, F·R, P] local region embeddings (or local.f32)
//!                   mask.u8     [n, F·R] 1 = real region, 0 = padding
//!                   boxes.f32   [n, F·R, 4] (x1, y1, x2, y2) as fractions of the image
//!                   frames.i32  [n, F] the frame index behind each slot (−1: padding)
//! ```
//!
//! Segments are written to `<name>.tmp` and renamed, then `index.json` is replaced
//! atomically, so an interrupted run leaves a valid index (plus at most a stray segment,
//! removed on the next run). Loading memory-maps every file.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::f16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "demovlp-search-index";
/// Each segment's checksums: `{file name: fingerprint}` of every file it holds.
pub const SUMS: &str = "sums.json";
/// Checked when a segment is opened: everything ranking reads from a segment except the
/// bulky local embeddings and boxes (non-finite values there only make a score non-finite,
/// and such scores are never ranked).
pub const CHECKED_AT_OPEN: [&str; 4] = ["clips.json", "global.f32", "mask.u8", "frames.i32"];
pub const VERSION: u32 = 1;

/// What an index was built with; every segment shares it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    /// The model directory or checkpoint (as given).
    pub model: String,
    /// The tokenizer path or `builtin:bert-base-uncased`.
    pub tokenizer: String,
    pub text_len: usize,
    pub frames: usize,
    pub regions: usize,
    pub proj_dim: usize,
    /// λ of the region-word alignment (the training config's `[loss] lambda`).
    pub lambda: f32,
    pub masked_mean: bool,
    /// `f16` or `f32`.
    pub local_dtype: String,
    /// Where `lambda` and `masked_mean` came from (the model's saved training config, the
    /// command line, or the defaults); absent in indexes written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_from: Option<String>,
    /// Whether the model was trained with the region-word loss; without it the index ranks
    /// by the global term alone. Absent in older indexes (then: true).
    #[serde(default = "yes")]
    pub use_local: bool,
    /// Where frames, regions and text length came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape_from: Option<String>,
    /// [`fingerprint`] of the model's weights: appending with another model is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
    /// The annotation files the clips were listed from (absolute paths): the captions shown
    /// by `serve`. Empty when the clips came from `--all` or a list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub annotations: Vec<crate::captions::AnnotationSource>,
}

fn yes() -> bool {
    true
}

/// A 64-bit FNV-1a hash over 8-byte little-endian words (and the tail bytes), as 16 hex
/// digits: the weights' fingerprint and the segment files' checksums (integrity, not security).
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in tail {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// [`fingerprint`] of f32 values (their little-endian bytes).
pub fn fingerprint_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    fingerprint(&bytes)
}

impl Settings {
    pub fn locals(&self) -> usize {
        self.frames * self.regions
    }
    pub fn fp16(&self) -> bool {
        self.local_dtype == "f16"
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub settings: Settings,
    pub segments: Vec<String>,
    /// Total clips over all segments.
    pub clips: usize,
    /// Largest relative error of the fp16 local embeddings, max |x − fp16(x)| / max |x| per clip.
    #[serde(default)]
    pub fp16_max_rel_err: f64,
}

impl Manifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("index.json")
    }
    pub fn read(dir: &Path) -> Result<Manifest> {
        let p = Self::path(dir);
        let text = fs::read_to_string(&p).with_context(|| format!("{}: not an index (no readable index.json)", dir.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        if m.format != FORMAT || m.version != VERSION {
            bail!("{}: format {:?} version {}, expected {FORMAT:?} version {VERSION}", p.display(), m.format, m.version);
        }
        Ok(m)
    }
    /// Replaces `index.json` atomically (temporary file + rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&Self::path(dir), (serde_json::to_string_pretty(self)? + "\n").as_bytes())
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Embeddings of a batch of clips, in memory (what [`write_segment`] writes).
#[derive(Clone, Debug, Default)]
pub struct SegmentData {
    pub clips: Vec<String>,
    pub global: Vec<f32>,
    pub local: Vec<f32>,
    pub mask: Vec<u8>,
    pub boxes: Vec<f32>,
    pub frames: Vec<i32>,
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// L2-normalises each row of `[n, dim]` in place (clamped like the evaluation's cosine).
pub fn normalize_rows(v: &mut [f32], dim: usize) {
    for row in v.chunks_exact_mut(dim) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
        row.iter_mut().for_each(|x| *x /= n);
    }
}

/// Writes a segment directory `dir/name` via `name.tmp`; returns (bytes written, fp16 max relative error).
pub fn write_segment(dir: &Path, name: &str, s: &Settings, d: &SegmentData) -> Result<(u64, f64)> {
    let n = d.clips.len();
    let (p, nl) = (s.proj_dim, s.locals());
    assert_eq!(d.global.len(), n * p);
    assert_eq!(d.local.len(), n * nl * p);
    assert_eq!(d.mask.len(), n * nl);
    assert_eq!(d.boxes.len(), n * nl * 4);
    assert_eq!(d.frames.len(), n * s.frames);
    let tmp = dir.join(format!("{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut err = 0f64;
    let local_bytes: Vec<u8> = if s.fp16() {
        for c in d.local.chunks(nl * p.max(1)) {
            let mx = c.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
            if mx > 0.0 {
                let e = c.iter().map(|&x| (x - f16::from_f32(x).to_f32()).abs()).fold(0f32, f32::max) as f64;
                err = err.max(e / mx);
            }
        }
        d.local.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
    } else {
        le_bytes_f32(&d.local)
    };
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("clips.json", serde_json::to_vec(&d.clips)?),
        ("global.f32", le_bytes_f32(&d.global)),
        (if s.fp16() { "local.f16" } else { "local.f32" }, local_bytes),
        ("mask.u8", d.mask.clone()),
        ("boxes.f32", le_bytes_f32(&d.boxes)),
        ("frames.i32", d.frames.iter().flat_map(|x| x.to_le_bytes()).collect()),
    ];
    let mut bytes = 0;
    let mut sums = std::collections::BTreeMap::new();
    for (f, b) in &files {
        fs::write(tmp.join(f), b).with_context(|| format!("writing {}", tmp.join(f).display()))?;
        bytes += b.len() as u64;
        sums.insert(f.to_string(), fingerprint(b));
    }
    fs::write(tmp.join(SUMS), serde_json::to_vec_pretty(&sums)?).with_context(|| format!("writing {}", tmp.join(SUMS).display()))?;
    let out = dir.join(name);
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    fs::rename(&tmp, &out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok((bytes, err))
}

/// A memory-mapped file (empty files are allowed).
struct Map(Option<Mmap>);

impl Map {
    fn open(path: &Path, want: usize) -> Result<Map> {
        let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata()?.len() as usize;
        if len != want {
            bail!("{}: {len} bytes, expected {want}", path.display());
        }
        if len == 0 {
            return Ok(Map(None));
        }
        // SAFETY: index files are written once (via a rename) and never modified in place.
        Ok(Map(Some(unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?)))
    }
    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
    fn f32s(&self) -> &[f32] {
        cast(self.bytes())
    }
}

fn cast<T>(b: &[u8]) -> &[T] {
    let sz = std::mem::size_of::<T>();
    if b.is_empty() {
        return &[];
    }
    assert_eq!(b.as_ptr() as usize % std::mem::align_of::<T>(), 0, "unaligned mapping");
    const { assert!(cfg!(target_endian = "little"), "index files are little-endian") };
    // SAFETY: aligned (checked), length in whole elements, plain-old-data element types.
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / sz) }
}

pub struct Segment {
    pub name: String,
    pub clips: Vec<String>,
    global: Map,
    local: Map,
    mask: Map,
    boxes: Map,
    frames: Map,
}

impl Segment {
    fn open(dir: &Path, name: &str, s: &Settings) -> Result<Segment> {
        let d = dir.join(name);
        let cp = d.join("clips.json");
        let clip_bytes = fs::read(&cp).with_context(|| format!("reading {}", cp.display()))?;
        let clips: Vec<String> = serde_json::from_slice(&clip_bytes).with_context(|| format!("parsing {}", cp.display()))?;
        let (n, p, nl) = (clips.len(), s.proj_dim, s.locals());
        let lw = if s.fp16() { 2 } else { 4 };
        let seg = Segment {
            name: name.into(),
            global: Map::open(&d.join("global.f32"), n * p * 4)?,
            local: Map::open(&d.join(if s.fp16() { "local.f16" } else { "local.f32" }), n * nl * p * lw)?,
            mask: Map::open(&d.join("mask.u8"), n * nl)?,
            boxes: Map::open(&d.join("boxes.f32"), n * nl * 16)?,
            frames: Map::open(&d.join("frames.i32"), n * s.frames * 4)?,
            clips,
        };
        seg.check_sums(&d, &clip_bytes)?;
        Ok(seg)
    }

    /// Compares the files of [`CHECKED_AT_OPEN`] with the segment's `sums.json` (segments
    /// written before checksums were recorded have none and are not checked).
    fn check_sums(&self, d: &Path, clip_bytes: &[u8]) -> Result<()> {
        let sp = d.join(SUMS);
        let Ok(text) = fs::read(&sp) else { return Ok(()) };
        let sums: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", sp.display()))?;
        for f in CHECKED_AT_OPEN {
            let bytes = match f {
                "clips.json" => clip_bytes,
                "global.f32" => self.global.bytes(),
                "mask.u8" => self.mask.bytes(),
                _ => self.frames.bytes(),
            };
            let want = sums.get(f).with_context(|| format!("{}: no checksum for {f}", sp.display()))?;
            let got = fingerprint(bytes);
            if &got != want {
                bail!(
                    "{}: checksum {got} differs from the one recorded when it was written ({want}): the file is damaged; \
                     rebuild this segment (remove the index and run `demovlp index` again)",
                    d.join(f).display()
                );
            }
        }
        Ok(())
    }
}

/// An opened index: every segment mapped, clips numbered in segment order.
pub struct Index {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub segments: Vec<Segment>,
    /// (segment, row) of each clip number.
    pub loc: Vec<(u32, u32)>,
    pub by_id: std::collections::HashMap<String, usize>,
}

impl Index {
    pub fn open(dir: &Path) -> Result<Index> {
        let manifest = Manifest::read(dir)?;
        let mut segments = Vec::new();
        let mut loc = Vec::new();
        let mut by_id = std::collections::HashMap::new();
        for (si, name) in manifest.segments.iter().enumerate() {
            let seg = Segment::open(dir, name, &manifest.settings)?;
            for (r, c) in seg.clips.iter().enumerate() {
                if by_id.insert(c.clone(), loc.len()).is_some() {
                    bail!("{}: clip {c:?} appears twice", dir.display());
                }
                loc.push((si as u32, r as u32));
            }
            segments.push(seg);
        }
        Ok(Index { dir: dir.into(), manifest, segments, loc, by_id })
    }

    pub fn settings(&self) -> &Settings {
        &self.manifest.settings
    }
    pub fn len(&self) -> usize {
        self.loc.len()
    }
    pub fn is_empty(&self) -> bool {
        self.loc.is_empty()
    }
    pub fn clip_id(&self, i: usize) -> &str {
        let (s, r) = self.loc[i];
        &self.segments[s as usize].clips[r as usize]
    }
    fn seg(&self, i: usize) -> (&Segment, usize) {
        let (s, r) = self.loc[i];
        (&self.segments[s as usize], r as usize)
    }
    /// `[P]` normalised global embedding of clip i.
    pub fn global(&self, i: usize) -> &[f32] {
        let p = self.settings().proj_dim;
        let (s, r) = self.seg(i);
        &s.global.f32s()[r * p..(r + 1) * p]
    }
    /// Segment-wise contiguous global matrices (for exact scans): (first clip, `[n, P]`).
    pub fn global_blocks(&self) -> Vec<(usize, &[f32])> {
        let mut first = 0;
        self.segments
            .iter()
            .map(|s| {
                let b = (first, s.global.f32s());
                first += s.clips.len();
                b
            })
            .collect()
    }
    /// Appends clip i's local embeddings `[F·R, P]` as f32 to `out`.
    pub fn local_into(&self, i: usize, out: &mut Vec<f32>) {
        let w = self.settings().locals() * self.settings().proj_dim;
        let n = out.len();
        out.resize(n + w, 0.0);
        self.local_to(i, &mut out[n..]);
    }
    /// Writes clip i's local embeddings `[F·R, P]` as f32 into `out` (exactly F·R·P long).
    pub fn local_to(&self, i: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let st = self.settings();
        let w = st.locals() * st.proj_dim;
        let (s, r) = self.seg(i);
        if st.fp16() {
            let h: &[f16] = cast(s.local.bytes());
            // The slice conversion uses the CPU's F16C / AVX-512 conversions where present.
            h[r * w..(r + 1) * w].convert_to_f32_slice(out);
        } else {
            out.copy_from_slice(&s.local.f32s()[r * w..(r + 1) * w]);
        }
    }
    /// `[F·R]` 1 = real region.
    pub fn mask(&self, i: usize) -> &[u8] {
        let nl = self.settings().locals();
        let (s, r) = self.seg(i);
        &s.mask.bytes()[r * nl..(r + 1) * nl]
    }
    /// Appends the additive mask (0 real / −100 padding) the model produced.
    pub fn mask_additive_into(&self, i: usize, out: &mut Vec<f32>) {
        out.extend(self.mask(i).iter().map(|&m| if m != 0 { 0.0 } else { -100.0 }));
    }
    /// `[F·R, 4]` boxes as fractions of the image.
    pub fn boxes(&self, i: usize) -> &[f32] {
        let nl = self.settings().locals();
        let (s, r) = self.seg(i);
        &s.boxes.f32s()[r * nl * 4..(r + 1) * nl * 4]
    }
    /// `[F]` frame index behind each frame slot (−1 = padding).
    pub fn frames(&self, i: usize) -> &[i32] {
        let f = self.settings().frames;
        let (s, r) = self.seg(i);
        &cast::<i32>(s.frames.bytes())[r * f..(r + 1) * f]
    }
}
