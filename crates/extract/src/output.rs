//! Writing region features in the published extractor's layout: one `<i>.npz` per frame,
//! compressed as `np.savez_compressed` writes it, arrays `x` [N, C] f32, `bbox` [N, 4] f32,
//! `num_bbox`, `image_h`, `image_w` (int64 scalars) and `info`, a pickled 0-d object array
//! holding `{image_id, image_h, image_w, num_boxes, objects_id, objects_conf, attrs_id,
//! attrs_conf}`.
//!
//! The pickle names `numpy.core.multiarray`, as files from numpy 1.x do: numpy 1.x loads it
//! natively and numpy 2.x through its `numpy.core` compatibility module (numpy 2's own
//! `numpy._core` spelling does not load in numpy < 1.26). Our reader accepts both spellings.
//!
//! A clip is written atomically: its frames go to a hidden temporary folder beside the
//! final one, which is renamed into place when every frame is there, so a clip folder that
//! exists is complete (what resuming relies on).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use demovlp_formats::{npz_bytes_with, NpyArray, Value};

use crate::detector::Regions;

/// The `.npz` bytes of one frame; `image_id` goes into `info`.
pub fn frame_npz(r: &Regions, image_id: &str) -> Result<Vec<u8>> {
    let n = r.len();
    let x = NpyArray::from_f32(&[n, r.dim], &r.x);
    let flat: Vec<f32> = r.bbox.iter().flatten().copied().collect();
    let bbox = NpyArray::from_f32(&[n, 4], &flat);
    let scalar = |v: usize| NpyArray::from_i64(&[], &[v as i64]);
    let (num, h, w) = (scalar(n), scalar(r.image_h), scalar(r.image_w));
    let s = |k: &str| Value::Str(k.into());
    let info = Value::Dict(vec![
        (s("image_id"), Value::Str(image_id.into())),
        (s("image_h"), Value::Int(r.image_h as i64)),
        (s("image_w"), Value::Int(r.image_w as i64)),
        (s("num_boxes"), Value::Int(n as i64)),
        (s("objects_id"), Value::Array(NpyArray::from_i64(&[n], &r.objects_id))),
        (s("objects_conf"), Value::Array(NpyArray::from_f32(&[n], &r.objects_conf))),
        (s("attrs_id"), Value::Array(NpyArray::from_i64(&[n], &r.attrs_id))),
        (s("attrs_conf"), Value::Array(NpyArray::from_f32(&[n], &r.attrs_conf))),
    ]);
    let info = NpyArray::object_scalar(&info)?;
    npz_bytes_with(&[("x", &x), ("bbox", &bbox), ("num_bbox", &num), ("image_h", &h), ("image_w", &w), ("info", &info)], true)
}

/// A clip being written: frames land in a temporary folder until [`ClipWriter::finish`].
pub struct ClipWriter {
    tmp: PathBuf,
    dest: PathBuf,
}

/// The temporary folder of `dest` (hidden, beside it).
fn tmp_dir(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial"))
}

impl ClipWriter {
    /// Starts clip folder `dest` (a leftover temporary folder of an interrupted run is removed).
    pub fn start(dest: &Path) -> Result<ClipWriter> {
        let tmp = tmp_dir(dest);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("{}: cannot remove the leftover of an interrupted run", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(ClipWriter { tmp, dest: dest.to_path_buf() })
    }

    /// The temporary folder (thumbnails are written here too).
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Writes frame `i` as `<i>.npz`.
    pub fn frame(&self, i: usize, r: &Regions, image_id: &str) -> Result<()> {
        let p = self.tmp.join(format!("{i}.npz"));
        std::fs::write(&p, frame_npz(r, image_id)?).with_context(|| format!("{}: cannot write", p.display()))
    }

    /// Renames the folder into place.
    pub fn finish(self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.dest).with_context(|| format!("{}: cannot rename to {}", self.tmp.display(), self.dest.display()))
    }
}
