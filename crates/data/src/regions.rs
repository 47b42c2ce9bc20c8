//! Clip → model input (SPEC §3): frame choice, per-frame region selection (sort by
//! confidence, top-R, edge padding, mask) and the 2054-d region token
//! (2048-d pooled feature + 6-d box feature).
//!
//! Sources of region features implement [`FeatureSource`]: [`NpzTree`] reads the
//! extractor's `<root>/<clip>/<i>.npz` files, [`crate::pack::PackedStore`] the packed shards.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use demovlp_formats::{Npz, Value};
use demovlp_kernels::rng::Rng;

/// Width of a detector region feature.
pub const FEAT_DIM: usize = 2048;
/// Width of the box feature appended to it.
pub const BOX_DIM: usize = 6;
/// Width of one region token.
pub const TOKEN_DIM: usize = FEAT_DIM + BOX_DIM;

/// One frame's regions in selection order (confidence descending), as every source
/// hands them to [`fill_frame`].
pub struct SortedFrame<'a> {
    /// Number of regions stored for the frame (N ≥ 1).
    pub n: usize,
    /// Row `i` = the feature of the i-th most confident region; `feat(i)` gives `[2048]`.
    pub feat: &'a dyn Fn(usize, &mut [f32]),
    /// `[n, 6]` box features, same order.
    pub boxes: &'a [f32],
    /// `[n]` index of each region in the file's `x` array.
    pub source_rows: &'a [u32],
}

/// Writes the first `regions` tokens of a sorted frame into `object` `[R, 2054]` and
/// `mask` `[R]`; when the frame has fewer, the last real row is repeated ("edge" padding)
/// with mask 0. Returns the stored row behind each slot.
pub fn fill_frame(f: &SortedFrame, regions: usize, object: &mut [f32], mask: &mut [f32], rows: &mut Vec<usize>) {
    debug_assert!(f.n >= 1);
    for slot in 0..regions {
        let i = slot.min(f.n - 1);
        let tok = &mut object[slot * TOKEN_DIM..(slot + 1) * TOKEN_DIM];
        (f.feat)(i, &mut tok[..FEAT_DIM]);
        tok[FEAT_DIM..].copy_from_slice(&f.boxes[i * BOX_DIM..(i + 1) * BOX_DIM]);
        mask[slot] = if slot < f.n { 1.0 } else { 0.0 };
        rows.push(f.source_rows[i] as usize);
    }
}

/// Somewhere region features come from: the `.npz` tree or the packed store.
pub trait FeatureSource: Send + Sync {
    /// Where the features live (for messages).
    fn describe(&self) -> String;
    /// Number of stored frames V of `clip` (frames are 0..V).
    fn frame_count(&self, clip: &str) -> Result<usize>;
    /// Fills `object` `[R, 2054]` and `mask` `[R]` for frame `frame` of `clip` with its
    /// top-`regions` regions; appends the stored row behind each slot to `rows`.
    fn frame_regions(
        &self,
        clip: &str,
        frame: usize,
        regions: usize,
        object: &mut [f32],
        mask: &mut [f32],
        rows: &mut Vec<usize>,
    ) -> Result<()>;
}

/// How frames are chosen inside each segment.
pub enum FrameChoice<'a> {
    /// Evaluation: the middle frame floor((b_j + b_{j+1} − 1) / 2).
    Middle,
    /// Training: uniform over the whole segment [b_j, b_{j+1} − 1] (the reference's
    /// [b_j, b_{j+1} − 1) never picks the last frame; see SPEC §3).
    Random(&'a mut Rng),
}

/// A clip turned into model input: `k = min(S, V)` frames.
#[derive(Clone, Debug)]
pub struct ClipInput {
    pub frame_indices: Vec<usize>,
    pub regions: usize,
    /// `[k, R, 2054]`
    pub object: Vec<f32>,
    /// `[k, R]`, 1 = real region, 0 = padding
    pub mask: Vec<f32>,
    /// `[k, R]` row of the frame's `x` behind each slot.
    pub source_rows: Vec<usize>,
}

/// Segment boundaries b_j = floor(j·V/k), computed as the reference's
/// `np.linspace(0, V, k + 1).astype(int)` does (f64 `j * (V / k)`, last = V).
pub fn segment_bounds(frames: usize, segments: usize) -> Vec<usize> {
    let k = segments.min(frames);
    let step = frames as f64 / k as f64;
    let mut b: Vec<usize> = (0..=k).map(|j| (j as f64 * step).floor() as usize).collect();
    b[k] = frames;
    b
}

/// The frame indices to use for a clip of `frames` frames split into `segments` segments.
pub fn choose_frames(frames: usize, segments: usize, choice: &mut FrameChoice) -> Result<Vec<usize>> {
    if frames == 0 || segments == 0 {
        bail!("cannot choose frames: {frames} frames, {segments} segments");
    }
    let b = segment_bounds(frames, segments);
    Ok(b.windows(2)
        .map(|w| match choice {
            FrameChoice::Middle => (w[0] + w[1] - 1) / 2,
            FrameChoice::Random(rng) => w[0] + rng.below(w[1] - w[0]),
        })
        .collect())
}

/// Frame choice + region selection for one clip (SPEC §3).
pub fn select_clip(src: &dyn FeatureSource, clip: &str, segments: usize, regions: usize, mut choice: FrameChoice) -> Result<ClipInput> {
    if regions == 0 {
        bail!("regions per frame must be at least 1");
    }
    let v = src.frame_count(clip)?;
    let frame_indices = choose_frames(v, segments, &mut choice)?;
    let k = frame_indices.len();
    let mut object = vec![0f32; k * regions * TOKEN_DIM];
    let mut mask = vec![0f32; k * regions];
    let mut source_rows = Vec::with_capacity(k * regions);
    for (j, &f) in frame_indices.iter().enumerate() {
        src.frame_regions(
            clip,
            f,
            regions,
            &mut object[j * regions * TOKEN_DIM..(j + 1) * regions * TOKEN_DIM],
            &mut mask[j * regions..(j + 1) * regions],
            &mut source_rows,
        )?;
    }
    Ok(ClipInput { frame_indices, regions, object, mask, source_rows })
}

/// One frame as the extractor stores it: read from `<i>.npz` (validated) or made in memory
/// (the demo's synthetic detector output, test fixtures) and written with [`FrameFile::write`].
#[derive(Clone, Debug, PartialEq)]
pub struct FrameFile {
    /// `[n, 2048]`
    pub x: Vec<f32>,
    /// `[n, 4]` (x1, y1, x2, y2) in pixels
    pub bbox: Vec<f32>,
    /// `[n]` from `info['objects_conf']`
    pub conf: Vec<f32>,
    pub image_w: f32,
    pub image_h: f32,
    pub n: usize,
}

impl FrameFile {
    /// Reads and validates `<i>.npz`: shapes, the info dict, finite values, and that the
    /// metadata agrees with itself (see [`FrameFile::read_checked`]; boxes outside the
    /// image are an error). Every error names the file and the problem.
    pub fn read(path: &Path) -> Result<FrameFile> {
        Self::read_checked(path, false)
    }

    /// [`FrameFile::read`]; with `clip_boxes`, boxes reaching outside the image are clipped
    /// to it instead of refused. Checked: `num_bbox` and `info['num_boxes']` equal the rows
    /// of `x`; the top-level `image_h`/`image_w` equal `info`'s and are positive; no box is
    /// inverted (x2 < x1 or y2 < y1) or outside the image by more than one pixel.
    pub fn read_checked(path: &Path, clip_boxes: bool) -> Result<FrameFile> {
        let npz = Npz::open(path)?;
        let p = path.display();
        let x = npz.array("x")?;
        if x.shape.len() != 2 || x.shape[1] != FEAT_DIM {
            bail!("{p}: feature array 'x' has shape {:?}, expected [N, {FEAT_DIM}] (wrong feature width)", x.shape);
        }
        let n = x.shape[0];
        if n == 0 {
            bail!("{p}: frame has no regions");
        }
        let bbox = npz.array("bbox")?;
        if bbox.shape != [n, 4] {
            bail!("{p}: 'bbox' has shape {:?}, expected [{n}, 4]", bbox.shape);
        }
        let info = npz.object("info")?;
        let conf = match info.get("objects_conf") {
            Some(Value::Array(a)) => a.to_f32().with_context(|| format!("{p}: info['objects_conf']"))?,
            Some(Value::List(l)) => l
                .iter()
                .map(|v| v.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{p}: info['objects_conf'] is not a list of numbers"))?,
            Some(other) => bail!("{p}: info['objects_conf'] is a {}, expected an array", other.kind()),
            None => bail!("{p}: info has no 'objects_conf'"),
        };
        if conf.len() != n {
            bail!("{p}: info['objects_conf'] has {} entries for {n} regions", conf.len());
        }
        let dim = |key: &str| -> Result<f32> {
            let v = info.get(key).and_then(Value::as_f64).with_context(|| format!("{p}: info has no numeric '{key}'"))?;
            if !(v > 0.0 && v.is_finite()) {
                bail!("{p}: info['{key}'] = {v}, expected a positive size");
            }
            Ok(v as f32)
        };
        let (image_w, image_h) = (dim("image_w")?, dim("image_h")?);
        // The top-level copies of the counts and sizes must agree with the rows and `info`.
        let scalar = |key: &str| -> Result<Option<f64>> {
            if !npz.contains(key) {
                return Ok(None);
            }
            let a = npz.array(key)?;
            let v = a.to_f64().with_context(|| format!("{p}: '{key}'"))?;
            if v.len() != 1 {
                bail!("{p}: '{key}' has shape {:?}, expected a single number", a.shape);
            }
            Ok(Some(v[0]))
        };
        if let Some(k) = scalar("num_bbox")? {
            if k != n as f64 {
                bail!("{p}: num_bbox = {k} but 'x' has {n} rows");
            }
        }
        if let Some(k) = info.get("num_boxes").and_then(Value::as_f64) {
            if k != n as f64 {
                bail!("{p}: info['num_boxes'] = {k} but 'x' has {n} rows");
            }
        }
        for (key, want) in [("image_h", image_h), ("image_w", image_w)] {
            if let Some(v) = scalar(key)? {
                if !(v > 0.0 && v.is_finite()) {
                    bail!("{p}: {key} = {v}, expected a positive size");
                }
                if v as f32 != want {
                    bail!("{p}: {key} = {v} but info['{key}'] = {want}");
                }
            }
        }
        let x = x.to_f32()?;
        let mut bbox = bbox.to_f32()?;
        for (name, vals) in [("x", &x), ("bbox", &bbox), ("info['objects_conf']", &conf)] {
            if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                bail!("{p}: '{name}' holds a non-finite value ({}) at flat index {i}", vals[i]);
            }
        }
        const SLACK: f32 = 1.0; // pixels: extractors clip to [0, w - 1] or [0, w]
        for (i, b) in bbox.chunks_exact_mut(4).enumerate() {
            if b[2] < b[0] || b[3] < b[1] {
                bail!("{p}: box {i} = {b:?} is inverted (x2 < x1 or y2 < y1)");
            }
            let outside = b[0] < -SLACK || b[1] < -SLACK || b[2] > image_w + SLACK || b[3] > image_h + SLACK;
            if clip_boxes {
                b[0] = b[0].clamp(0.0, image_w);
                b[2] = b[2].clamp(0.0, image_w);
                b[1] = b[1].clamp(0.0, image_h);
                b[3] = b[3].clamp(0.0, image_h);
            } else if outside {
                bail!(
                    "{p}: box {i} = {b:?} lies outside the {image_w} x {image_h} image (clip boxes to the image with \
                     --clip-boxes / data.clip_boxes = true)"
                );
            }
        }
        Ok(FrameFile { x, bbox, conf, image_w, image_h, n })
    }

    /// Region order used for selection: confidence descending. Ties go to the higher
    /// row first, as the reference's `np.argsort(conf)[::-1]` does with a stable sort.
    pub fn sorted_rows(&self) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..self.n as u32).collect();
        idx.sort_by(|&a, &b| self.conf[b as usize].partial_cmp(&self.conf[a as usize]).unwrap().then(b.cmp(&a)));
        idx
    }

    /// 6-d box feature of row `i`, computed in f32 in the reference's operation order.
    pub fn box_feature(&self, i: usize) -> [f32; 6] {
        let b = &self.bbox[i * 4..i * 4 + 4];
        let (w, h) = (self.image_w, self.image_h);
        let sw = (b[2] - b[0]) / w;
        let sh = (b[3] - b[1]) / h;
        let sx = b[0] / w;
        let sy = b[1] / h;
        [sx, sy, sx + sw, sy + sh, sw, sh]
    }

    /// Features in selection order: `(order, boxes [n,6])`.
    pub fn sorted_boxes(&self, order: &[u32]) -> Vec<f32> {
        order.iter().flat_map(|&i| self.box_feature(i as usize)).collect()
    }

    /// Region selection of an in-memory frame (SPEC §3): sort by confidence, keep the top
    /// `regions`, edge-pad (see [`fill_frame`]). What every source holding whole frames
    /// (the `.npz` tree, the demo's synthetic corpus) does in `frame_regions`.
    pub fn fill_regions(&self, regions: usize, object: &mut [f32], mask: &mut [f32], rows: &mut Vec<usize>) {
        let order = self.sorted_rows();
        // Only the kept rows' boxes are needed.
        let keep = &order[..order.len().min(regions)];
        let boxes = self.sorted_boxes(keep);
        let feat = |i: usize, out: &mut [f32]| {
            let r = keep[i] as usize;
            out.copy_from_slice(&self.x[r * FEAT_DIM..(r + 1) * FEAT_DIM]);
        };
        fill_frame(&SortedFrame { n: keep.len(), feat: &feat, boxes: &boxes, source_rows: keep }, regions, object, mask, rows);
    }
}

/// The extractor's layout: `<root>/<clip>/<i>.npz`, i = 0..V. A clip that is a single
/// file `<root>/<clip>.npz` (CC3M images) counts as a one-frame clip.
pub struct NpzTree {
    pub root: PathBuf,
    /// Clip boxes that reach outside the image to it instead of refusing the frame.
    clip_boxes: bool,
}

impl NpzTree {
    pub fn new(root: impl Into<PathBuf>) -> NpzTree {
        NpzTree { root: root.into(), clip_boxes: false }
    }

    /// The same tree, clipping boxes outside the image to it (see [`FrameFile::read_checked`]).
    pub fn with_clip_boxes(mut self, on: bool) -> NpzTree {
        self.clip_boxes = on;
        self
    }

    /// The file holding frame `frame` of `clip`.
    pub fn frame_path(&self, clip: &str, frame: usize) -> PathBuf {
        let dir = self.root.join(clip);
        if !dir.is_dir() {
            let single = self.root.join(format!("{clip}.npz"));
            if frame == 0 && single.is_file() {
                return single;
            }
        }
        dir.join(format!("{frame}.npz"))
    }

    /// Reads one frame file, validated.
    pub fn read_frame(&self, clip: &str, frame: usize) -> Result<FrameFile> {
        let path = self.frame_path(clip, frame);
        if !path.exists() {
            bail!("{}: frame file missing", path.display());
        }
        FrameFile::read_checked(&path, self.clip_boxes)
    }
}

/// Counts the frames `0.npz, 1.npz, …` in a clip directory, refusing gaps.
pub fn count_frames(dir: &Path) -> Result<usize> {
    if !dir.is_dir() {
        bail!("{}: clip directory missing", dir.display());
    }
    let rd = std::fs::read_dir(dir).with_context(|| format!("{}: clip directory missing or unreadable", dir.display()))?;
    let mut idx = Vec::new();
    for e in rd {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".npz") {
            if let Ok(i) = stem.parse::<usize>() {
                idx.push(i);
            }
        }
    }
    idx.sort_unstable();
    if idx.first() != Some(&0) {
        bail!("{}: missing 0.npz (frame files must be 0.npz, 1.npz, ...)", dir.display());
    }
    if let Some(gap) = idx.iter().enumerate().find(|(k, &i)| *k != i) {
        bail!("{}: frame files are not contiguous: {}.npz missing", dir.display(), gap.0);
    }
    Ok(idx.len())
}

impl FeatureSource for NpzTree {
    fn describe(&self) -> String {
        format!("npz tree {}", self.root.display())
    }

    fn frame_count(&self, clip: &str) -> Result<usize> {
        let dir = self.root.join(clip);
        if !dir.is_dir() && self.root.join(format!("{clip}.npz")).is_file() {
            return Ok(1);
        }
        count_frames(&dir)
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
        self.read_frame(clip, frame)?.fill_regions(regions, object, mask, rows);
        Ok(())
    }
}

impl ClipInput {
    /// Number of frames k.
    pub fn frames(&self) -> usize {
        self.frame_indices.len()
    }

    /// Writes `object` f32 `[k,R,2054]`, `mask` f32 `[k,R]`, `frames` i64 `[k]` as safetensors
    /// (via a temporary file and rename).
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let (k, r) = (self.frames(), self.regions);
        let object: Vec<u8> = self.object.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mask: Vec<u8> = self.mask.iter().flat_map(|v| v.to_le_bytes()).collect();
        let frames: Vec<u8> = self.frame_indices.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect();
        let tensors = vec![
            ("object", TensorView::new(Dtype::F32, vec![k, r, TOKEN_DIM], &object)?),
            ("mask", TensorView::new(Dtype::F32, vec![k, r], &mask)?),
            ("frames", TensorView::new(Dtype::I64, vec![k], &frames)?),
        ];
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::tensor::serialize_to_file(tensors, &None, &tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
        Ok(())
    }
}

impl FrameFile {
    /// Writes the frame in the extractor's layout (SPEC §2): `x`, `bbox`, `num_bbox`,
    /// `image_h`, `image_w` and the pickled `info` dict (`image_id`, sizes, `num_boxes`,
    /// `objects_id`, `objects_conf`). Used by tests and the demo corpus.
    pub fn write(&self, path: &Path, image_id: &str, objects_id: &[i64]) -> Result<()> {
        self.write_with(path, image_id, objects_id, false)
    }

    /// [`FrameFile::write`], members deflated when `compress` (as the extractor's files are).
    pub fn write_with(&self, path: &Path, image_id: &str, objects_id: &[i64], compress: bool) -> Result<()> {
        use demovlp_formats::NpyArray;
        let n = self.n;
        let info = Value::Dict(vec![
            (Value::Str("image_id".into()), Value::Str(image_id.into())),
            (Value::Str("image_h".into()), Value::Int(self.image_h as i64)),
            (Value::Str("image_w".into()), Value::Int(self.image_w as i64)),
            (Value::Str("num_boxes".into()), Value::Int(n as i64)),
            (Value::Str("objects_id".into()), Value::Array(NpyArray::from_i64(&[n], objects_id))),
            (Value::Str("objects_conf".into()), Value::Array(NpyArray::from_f32(&[n], &self.conf))),
        ]);
        let x = NpyArray::from_f32(&[n, self.x.len() / n.max(1)], &self.x);
        let bbox = NpyArray::from_f32(&[n, 4], &self.bbox);
        let num = NpyArray::from_i64(&[], &[n as i64]);
        let h = NpyArray::from_i64(&[], &[self.image_h as i64]);
        let w = NpyArray::from_i64(&[], &[self.image_w as i64]);
        let info = NpyArray::object_scalar(&info)?;
        demovlp_formats::write_npz_with(
            path,
            &[("x", &x), ("bbox", &bbox), ("num_bbox", &num), ("image_h", &h), ("image_w", &w), ("info", &info)],
            compress,
        )
    }
}
