//! The packed feature store: per-frame `.npz` files turned into a few large shards that
//! are memory-mapped at training time (`demovlp pack`).
//!
//! Layout of a store directory:
//! - `shard-NNNNN.bin`: frame records back to back, each 64-byte aligned. A record holds
//!   the frame's regions already in selection order (confidence descending, at most
//!   `max_regions`): features `[n, 2048]` (f32 or f16), box features `[n, 6]` f32, and the
//!   source row of each region `[n]` u32.
//! - `frames.bin`: 16 bytes per frame: shard u32, n u32, byte offset u64 (little endian).
//! - `clips.tsv`: `clip id<TAB>first frame<TAB>frame count` per clip.
//! - `manifest.json`: written last (temp file + rename); a store without it is an
//!   interrupted pack and refuses to open. It records the input fingerprint, so
//!   re-running on the same input finds the store up to date and does nothing.
//!
//! Selection from the store is the same as from the `.npz` files (the rows are stored
//! sorted, the box features precomputed in f32), so both sources give identical
//! output in f32 mode; f16 mode rounds the 2048-d features only (error measured in tests).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::regions::{fill_frame, FeatureSource, NpzTree, SortedFrame, BOX_DIM, FEAT_DIM};

const FORMAT: &str = "demovlp-packed-v1";
const ALIGN: u64 = 64;
/// Shards are closed once they pass this size.
const SHARD_BYTES: u64 = 1 << 30;

/// Storage precision of the 2048-d features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    F16,
}

impl StoreDtype {
    fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::F16 => 2,
        }
    }
}

/// Options of a pack run.
#[derive(Clone, Debug)]
pub struct PackConfig {
    pub dtype: StoreDtype,
    /// Regions kept per frame (the most confident ones); selection may ask for at most this many.
    pub max_regions: usize,
    /// Worker threads reading `.npz` files (0 = all cores).
    pub threads: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Clip boxes that reach outside the image to it instead of skipping the clip.
    pub clip_boxes: bool,
}

impl Default for PackConfig {
    fn default() -> Self {
        PackConfig { dtype: StoreDtype::F32, max_regions: 100, threads: 0, progress: true, clip_boxes: false }
    }
}

/// What a pack run did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PackSummary {
    pub clips: usize,
    pub frames: usize,
    pub regions: usize,
    /// Bytes of shard data.
    pub bytes: u64,
    /// `(clip, reason)` for every clip left out.
    pub skipped: Vec<(String, String)>,
    /// True when the store was already up to date and nothing was written.
    #[serde(skip)]
    pub up_to_date: bool,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    dtype: StoreDtype,
    max_regions: usize,
    feat_dim: usize,
    shards: Vec<String>,
    fingerprint: String,
    summary: PackSummary,
    /// Content checksum per file (shards, frames.bin, clips.tsv); absent in stores packed
    /// before checksums existed, which then load unverified.
    #[serde(default)]
    checksums: BTreeMap<String, String>,
}

/// A 64-bit checksum of `bytes`: every step is a bijection of the running state for a
/// fixed input word, so a change confined to one 8-byte word (a flipped bit) always shows.
fn checksum(bytes: &[u8]) -> String {
    fn mix(h: u64, w: u64) -> u64 {
        (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
    }
    let mut h = mix(0x7061_636b_6564_7631, bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = mix(h, u64::from_le_bytes(w.try_into().unwrap()));
    }
    for &b in words.remainder() {
        h = mix(h, b as u64);
    }
    format!("v1:{h:016x}")
}

/// [`checksum`] of a file, memory-mapped.
fn file_checksum(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // Safety: read-only map of a file this process just wrote and no longer writes.
    let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
    Ok(checksum(&map))
}

/// One frame ready to write.
struct PackedFrame {
    n: usize,
    feat: Vec<u8>,
    boxes: Vec<u8>,
    rows: Vec<u8>,
}

fn pack_frame(src: &NpzTree, clip: &str, frame: usize, cfg: &PackConfig) -> Result<PackedFrame> {
    let f = src.read_frame(clip, frame)?;
    let order = f.sorted_rows();
    let keep = &order[..order.len().min(cfg.max_regions)];
    let mut feat = Vec::with_capacity(keep.len() * FEAT_DIM * cfg.dtype.size());
    for &r in keep {
        let row = &f.x[r as usize * FEAT_DIM..(r as usize + 1) * FEAT_DIM];
        match cfg.dtype {
            StoreDtype::F32 => row.iter().for_each(|v| feat.extend_from_slice(&v.to_le_bytes())),
            StoreDtype::F16 => {
                for v in row {
                    let h = half::f16::from_f32(*v);
                    if !h.is_finite() {
                        bail!("{}: feature value {v} does not fit in fp16 (use f32 storage)", src.frame_path(clip, frame).display());
                    }
                    feat.extend_from_slice(&h.to_le_bytes());
                }
            }
        }
    }
    let boxes = f.sorted_boxes(keep).iter().flat_map(|v| v.to_le_bytes()).collect();
    let rows = keep.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(PackedFrame { n: keep.len(), feat, boxes, rows })
}

fn pack_clip(src: &NpzTree, clip: &str, cfg: &PackConfig) -> Result<Vec<PackedFrame>> {
    if clip.contains('\t') || clip.contains('\n') {
        bail!("clip id {clip:?} contains a tab or newline");
    }
    let v = src.frame_count(clip)?;
    (0..v).map(|f| pack_frame(src, clip, f, cfg)).collect()
}

/// Hash of everything the store's content depends on: options, clip ids, and each
/// clip directory's frame files (name, size, mtime).
fn fingerprint(root: &Path, clips: &[String], cfg: &PackConfig) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (FORMAT, cfg.dtype.size(), cfg.max_regions, root.to_string_lossy().as_ref()).hash(&mut h);
    if cfg.clip_boxes {
        "clip_boxes".hash(&mut h); // only when on: stores packed before the option stay up to date
    }
    for c in clips {
        c.hash(&mut h);
        let dir = root.join(c);
        let mut entries: Vec<(String, u64, u128)> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let m = e.metadata().ok()?;
                        let t = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
                        Some((e.file_name().to_string_lossy().into_owned(), m.len(), t))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if entries.is_empty() {
            if let Ok(m) = std::fs::metadata(root.join(format!("{c}.npz"))) {
                entries.push((String::new(), m.len(), 0));
            }
        }
        entries.sort();
        entries.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// Packs the clips `clips` of the `.npz` tree at `root` into the store at `out`.
/// Bad clips are skipped and listed in the summary with their reason.
pub fn pack(root: &Path, clips: &[String], out: &Path, cfg: &PackConfig) -> Result<PackSummary> {
    if cfg.max_regions == 0 {
        bail!("max_regions must be at least 1");
    }
    // Deduplicate, keeping first occurrence (several captions may name one clip).
    let mut seen = std::collections::HashSet::new();
    let clips: Vec<String> = clips.iter().filter(|c| seen.insert(c.as_str())).cloned().collect();
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create store directory", out.display()))?;
    let fp = fingerprint(root, &clips, cfg);
    let manifest_path = out.join("manifest.json");
    if let Ok(text) = std::fs::read_to_string(&manifest_path) {
        if let Ok(m) = serde_json::from_str::<Manifest>(&text) {
            if m.fingerprint == fp && m.shards.iter().all(|s| out.join(s).is_file()) {
                return Ok(PackSummary { up_to_date: true, ..m.summary });
            }
        }
    }
    // From here until the new manifest lands the store is incomplete.
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).with_context(|| format!("{}: cannot remove old manifest", manifest_path.display()))?;
    }
    for e in std::fs::read_dir(out)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("shard-") && name.ends_with(".bin") {
            std::fs::remove_file(out.join(&name))?;
        }
    }

    let src = NpzTree::new(root).with_clip_boxes(cfg.clip_boxes);
    let threads = if cfg.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { cfg.threads };
    let bar = if cfg.progress { indicatif::ProgressBar::new(clips.len() as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("packing {bar:40} {pos}/{len} clips [{elapsed_precise} < {eta_precise}] {msg}").unwrap(),
    );

    let mut summary = PackSummary::default();
    let mut shards: Vec<String> = Vec::new();
    let mut shard: Option<(std::io::BufWriter<std::fs::File>, u64)> = None;
    let mut frames_index = Vec::new();
    let mut clips_index = String::new();
    // Read chunks of clips in parallel, write them in order (deterministic output).
    let chunk = threads * 8;
    // Without a terminal the bar draws nothing: a plain progress line every few seconds instead.
    let plain = cfg.progress && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let interval = crate::plain_progress_interval();
    let (t0, mut last_line) = (std::time::Instant::now(), std::time::Instant::now());
    let mut done = 0usize;
    for group in clips.chunks(chunk) {
        if plain && last_line.elapsed().as_secs_f64() >= interval {
            eprintln!("packing: {done}/{} clips, {} skipped, {:.0}s", clips.len(), summary.skipped.len(), t0.elapsed().as_secs_f64());
            last_line = std::time::Instant::now();
        }
        done += group.len();
        let results: Vec<Result<Vec<PackedFrame>>> = std::thread::scope(|s| {
            let per = group.len().div_ceil(threads);
            let handles: Vec<_> = group
                .chunks(per.max(1))
                .map(|part| {
                    let src = &src;
                    s.spawn(move || part.iter().map(|c| pack_clip(src, c, cfg)).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("pack worker panicked")).collect()
        });
        for (clip, res) in group.iter().zip(results) {
            bar.inc(1);
            let frames = match res {
                Ok(f) => f,
                Err(e) => {
                    summary.skipped.push((clip.clone(), format!("{e:#}")));
                    bar.set_message(format!("{} skipped", summary.skipped.len()));
                    continue;
                }
            };
            let first = frames_index.len() / 16;
            for f in &frames {
                if shard.as_ref().is_none_or(|(_, len)| *len >= SHARD_BYTES) {
                    if let Some((mut w, _)) = shard.take() {
                        w.flush().with_context(|| format!("cannot write {}", out.join(shards.last().unwrap()).display()))?;
                    }
                    let name = format!("shard-{:05}.bin", shards.len());
                    let file =
                        std::fs::File::create(out.join(&name)).with_context(|| format!("{}: cannot create", out.join(&name).display()))?;
                    shards.push(name);
                    shard = Some((std::io::BufWriter::with_capacity(1 << 20, file), 0));
                }
                let (w, len) = shard.as_mut().context("no open shard")?;
                let offset = *len;
                let written = (f.feat.len() + f.boxes.len() + f.rows.len()) as u64;
                let pad = (ALIGN - written % ALIGN) % ALIGN;
                let shard_path = || out.join(shards.last().map(String::as_str).unwrap_or_default()).display().to_string();
                (|| -> std::io::Result<()> {
                    w.write_all(&f.feat)?;
                    w.write_all(&f.boxes)?;
                    w.write_all(&f.rows)?;
                    w.write_all(&vec![0u8; pad as usize])
                })()
                .with_context(|| format!("cannot write {}", shard_path()))?;
                *len += written + pad;
                summary.bytes += written + pad;
                frames_index.extend_from_slice(&(shards.len() as u32 - 1).to_le_bytes());
                frames_index.extend_from_slice(&(f.n as u32).to_le_bytes());
                frames_index.extend_from_slice(&offset.to_le_bytes());
                summary.regions += f.n;
            }
            summary.frames += frames.len();
            summary.clips += 1;
            clips_index.push_str(&format!("{clip}\t{first}\t{}\n", frames.len()));
        }
    }
    if let Some((mut w, _)) = shard.take() {
        let last = out.join(shards.last().context("no shard written")?);
        w.flush().and_then(|_| w.get_ref().sync_all()).with_context(|| format!("cannot write {}", last.display()))?;
    }
    bar.finish_and_clear();
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes).with_context(|| format!("cannot write {}", out.join(name).display()))
    };
    write("frames.bin", &frames_index)?;
    write("clips.tsv", clips_index.as_bytes())?;
    let mut checksums = BTreeMap::new();
    checksums.insert("frames.bin".to_string(), checksum(&frames_index));
    checksums.insert("clips.tsv".to_string(), checksum(clips_index.as_bytes()));
    for name in &shards {
        checksums.insert(name.clone(), file_checksum(&out.join(name))?);
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        dtype: cfg.dtype,
        max_regions: cfg.max_regions,
        feat_dim: FEAT_DIM,
        shards,
        fingerprint: fp,
        summary: summary.clone(),
        checksums,
    };
    let tmp = out.join("manifest.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&manifest)?).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &manifest_path).with_context(|| format!("cannot rename {} to {}", tmp.display(), manifest_path.display()))?;
    Ok(summary)
}

/// A packed store opened for reading: shards memory-mapped, index in memory.
pub struct PackedStore {
    pub dir: PathBuf,
    pub dtype: StoreDtype,
    pub max_regions: usize,
    shards: Vec<memmap2::Mmap>,
    /// Expected checksum per shard (None: an older store), checked once, on first use.
    shard_sums: Vec<(PathBuf, Option<String>, std::sync::OnceLock<bool>)>,
    /// (shard, n, offset) per frame
    frames: Vec<(u32, u32, u64)>,
    clips: HashMap<String, (usize, usize)>,
    /// Clip ids in pack order.
    pub clip_ids: Vec<String>,
    pub summary: PackSummary,
}

impl PackedStore {
    /// Opens a store; refuses an incomplete one (no manifest: an interrupted pack).
    pub fn open(dir: &Path) -> Result<PackedStore> {
        let mpath = dir.join("manifest.json");
        if !mpath.is_file() {
            bail!("{}: not a complete packed store (no manifest.json; an interrupted pack? run `demovlp pack` again)", dir.display());
        }
        let m: Manifest =
            serde_json::from_str(&std::fs::read_to_string(&mpath)?).with_context(|| format!("{}: bad manifest", mpath.display()))?;
        if m.format != FORMAT || m.feat_dim != FEAT_DIM {
            bail!("{}: unsupported store format {:?} (feature width {})", mpath.display(), m.format, m.feat_dim);
        }
        let shards = m
            .shards
            .iter()
            .map(|s| {
                let p = dir.join(s);
                let f = std::fs::File::open(&p).with_context(|| format!("{}: missing shard", p.display()))?;
                // Safety: shards are written once and never modified while a store is open.
                unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("{}: cannot memory-map", p.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let fb = std::fs::read(dir.join("frames.bin")).with_context(|| format!("{}: missing frames.bin", dir.display()))?;
        let verify = |name: &str, bytes: &[u8]| -> Result<()> {
            match m.checksums.get(name) {
                Some(want) if *want != checksum(bytes) => bail!(
                    "{}: checksum mismatch: the file changed after `demovlp pack` wrote it (a flipped bit, a partial copy); re-run pack",
                    dir.join(name).display()
                ),
                _ => Ok(()),
            }
        };
        verify("frames.bin", &fb)?;
        if fb.len() % 16 != 0 {
            bail!("{}: frames.bin is truncated", dir.display());
        }
        let rec = m.dtype.size() * FEAT_DIM + 4 * BOX_DIM + 4;
        let frames: Vec<(u32, u32, u64)> = fb
            .chunks_exact(16)
            .map(|c| {
                (
                    u32::from_le_bytes(c[0..4].try_into().unwrap()),
                    u32::from_le_bytes(c[4..8].try_into().unwrap()),
                    u64::from_le_bytes(c[8..16].try_into().unwrap()),
                )
            })
            .collect();
        for (i, &(s, n, off)) in frames.iter().enumerate() {
            let ok = shards.get(s as usize).is_some_and(|m| off + (n as u64) * rec as u64 <= m.len() as u64) && n > 0;
            if !ok {
                bail!("{}: frame record {i} points outside its shard (corrupt store)", dir.display());
            }
        }
        let text = std::fs::read_to_string(dir.join("clips.tsv")).with_context(|| format!("{}: missing clips.tsv", dir.display()))?;
        verify("clips.tsv", text.as_bytes())?;
        let mut clips = HashMap::new();
        let mut clip_ids = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let mut it = line.split('\t');
            let parsed = (|| Some((it.next()?.to_string(), it.next()?.parse::<usize>().ok()?, it.next()?.parse::<usize>().ok()?)))();
            let (id, first, count) = parsed.with_context(|| format!("{}/clips.tsv:{}: malformed", dir.display(), i + 1))?;
            if first + count > frames.len() || count == 0 {
                bail!("{}/clips.tsv:{}: frame range out of bounds", dir.display(), i + 1);
            }
            clip_ids.push(id.clone());
            clips.insert(id, (first, count));
        }
        let shard_sums = m.shards.iter().map(|s| (dir.join(s), m.checksums.get(s).cloned(), std::sync::OnceLock::new())).collect();
        Ok(PackedStore {
            dir: dir.to_path_buf(),
            dtype: m.dtype,
            max_regions: m.max_regions,
            shards,
            shard_sums,
            frames,
            clips,
            clip_ids,
            summary: m.summary,
        })
    }

    /// Shard `s` checked against its checksum (hashed once, the first time it is read).
    fn check_shard(&self, s: usize) -> Result<()> {
        let (path, want, ok) = &self.shard_sums[s];
        let Some(want) = want else { return Ok(()) };
        if !*ok.get_or_init(|| checksum(&self.shards[s]) == *want) {
            bail!(
                "{}: checksum mismatch: the shard changed after `demovlp pack` wrote it (a flipped bit, a partial copy); re-run pack",
                path.display()
            );
        }
        Ok(())
    }

    fn clip(&self, clip: &str) -> Result<(usize, usize)> {
        self.clips.get(clip).copied().with_context(|| format!("{}: clip {clip:?} is not in the packed store", self.dir.display()))
    }
}

impl FeatureSource for PackedStore {
    fn describe(&self) -> String {
        format!("packed store {}", self.dir.display())
    }

    fn frame_count(&self, clip: &str) -> Result<usize> {
        Ok(self.clip(clip)?.1)
    }

    fn frame_regions(
        &self,
        clip: &str,
        frame: usize,
        regions: usize,
        object: &mut [f32],
        mask: &mut [f32],
        rows: &mut Vec<usize>,
    ) -> Result<()> {
        let (first, count) = self.clip(clip)?;
        if frame >= count {
            bail!("{}: clip {clip:?} has {count} frames, asked for frame {frame}", self.dir.display());
        }
        let (s, n, off) = self.frames[first + frame];
        self.check_shard(s as usize)?;
        let n = n as usize;
        if regions > self.max_regions && n == self.max_regions {
            bail!("{}: store keeps at most {} regions per frame, asked for {regions}", self.dir.display(), self.max_regions);
        }
        let data = &self.shards[s as usize][off as usize..];
        let es = self.dtype.size();
        let feat_bytes = &data[..n * FEAT_DIM * es];
        let box_bytes = &data[n * FEAT_DIM * es..n * FEAT_DIM * es + n * BOX_DIM * 4];
        let row_bytes = &data[n * FEAT_DIM * es + n * BOX_DIM * 4..n * FEAT_DIM * es + n * BOX_DIM * 4 + n * 4];
        let keep = n.min(regions);
        let boxes: Vec<f32> = box_bytes[..keep * BOX_DIM * 4].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let src_rows: Vec<u32> = row_bytes[..keep * 4].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        let dtype = self.dtype;
        let feat = |i: usize, out: &mut [f32]| {
            let b = &feat_bytes[i * FEAT_DIM * es..(i + 1) * FEAT_DIM * es];
            match dtype {
                StoreDtype::F32 => out.iter_mut().zip(b.chunks_exact(4)).for_each(|(o, c)| *o = f32::from_le_bytes(c.try_into().unwrap())),
                StoreDtype::F16 => {
                    out.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, c)| *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                }
            }
        };
        fill_frame(&SortedFrame { n: keep, feat: &feat, boxes: &boxes, source_rows: &src_rows }, regions, object, mask, rows);
        Ok(())
    }
}

/// Clip ids a pack run can be given: every clip directory directly below `root`
/// that holds a `0.npz` (for packing without an annotation file, e.g. the demo corpus).
pub fn list_clip_dirs(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).with_context(|| format!("{}: cannot list feature root", root.display()))? {
        let e = e?;
        if e.path().join("0.npz").is_file() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}
