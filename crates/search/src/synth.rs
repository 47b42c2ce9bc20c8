//! A synthetic index for `demovlp bench search` and the recall tests: a real index
//! directory (the layout of [`crate::store`], opened by [`Index::open`](crate::store::Index)),
//! filled with generated embeddings instead of a model's.
//!
//! **Global embeddings** (distinct for every clip): unit vectors with planted neighbours.
//! Clip `i` belongs to group `i mod G` (G = ⌈clips / 5⌉, so 5 clips per group, spread over
//! the clip numbers) and group `g` to topic `g mod T` (T = ⌈clips / 200⌉, 200 clips per
//! topic); its vector is `0.7·topic + 0.5·group + 0.5·noise`, normalised, each part an
//! independent random direction. Cosine ≈ 0.74 within a group, ≈ 0.49 within a topic, ≈ 0
//! otherwise, so a query's exact top 10 is its group's 5 clips plus the 5 closest of its
//! topic's 195 others, told apart only by the noise — ANN recall has to earn it. A query is
//! a new member of a random group (fresh noise).
//!
//! **Local embeddings** keep the shapes the index stores — `[F·R, P]` per clip in fp16, the
//! region mask (10 to R real regions per frame), boxes, frame numbers — but their values are
//! the same for clip `i` and clip `i mod S` (S = the segment size): every segment after the
//! first hard-links the first one's `local.f16`, `mask.u8`, `boxes.f32` and `frames.i32`, so
//! one million clips need one segment's worth of local data on disk (≈ 125 MB at 8 × 30 × 256)
//! instead of 125 GB. The re-rank reads them through the same memory maps as any index; what
//! this does not measure is a cold page cache (a real index that large lives on disk).

use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use demovlp_kernels::Rng;
use rayon::prelude::*;

use crate::search::TextQuery;
use crate::store::{normalize_rows, write_segment, Manifest, SegmentData, Settings, FORMAT, VERSION};

pub const GROUP: usize = 5;
pub const TOPIC: usize = 200;
const W_TOPIC: f32 = 0.7;
const W_GROUP: f32 = 0.5;
const W_NOISE: f32 = 0.5;

#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub clips: usize,
    pub dim: usize,
    pub frames: usize,
    pub regions: usize,
    /// The text length L the index answers queries with (query locals are `[L−1, P]`).
    pub text_len: usize,
    /// Real tokens of a query (after [CLS], [SEP] included); the rest of L−1 is padding.
    pub query_tokens: usize,
    pub segment_clips: usize,
    pub seed: u64,
}

impl SynthSpec {
    pub fn groups(&self) -> usize {
        self.clips.div_ceil(GROUP).max(1)
    }
    pub fn topics(&self) -> usize {
        self.clips.div_ceil(TOPIC).max(1)
    }
    pub fn group_of(&self, clip: usize) -> usize {
        clip % self.groups()
    }
    /// The clips of group `g` (its planted neighbours).
    pub fn members(&self, g: usize) -> Vec<usize> {
        (g..self.clips).step_by(self.groups()).collect()
    }
    pub fn clip_id(i: usize) -> String {
        format!("synth/{i:07}")
    }
}

fn mix(seed: u64, kind: u64, id: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ kind.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ id.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// Adds `w ×` a random direction (entries N(0, 1/dim)) to `out`.
fn add_direction(out: &mut [f32], seed: u64, kind: u64, id: u64, w: f32) {
    let mut r = Rng::new(mix(seed, kind, id));
    let s = w / (out.len() as f32).sqrt();
    out.iter_mut().for_each(|x| *x += s * r.normal());
}

/// The (normalised) global vector of a member of group `g` with noise stream `noise`.
fn member_vector(spec: &SynthSpec, g: usize, noise: (u64, u64), out: &mut [f32]) {
    out.fill(0.0);
    add_direction(out, spec.seed, 1, (g % spec.topics()) as u64, W_TOPIC);
    add_direction(out, spec.seed, 2, g as u64, W_GROUP);
    add_direction(out, spec.seed, noise.0, noise.1, W_NOISE);
    normalize_rows(out, spec.dim);
}

/// `[n, P]` normalised global vectors of clips `first..first + n`.
pub fn global_rows(spec: &SynthSpec, first: usize, n: usize) -> Vec<f32> {
    let p = spec.dim;
    let mut v = vec![0f32; n * p];
    v.par_chunks_mut(p).enumerate().for_each(|(k, row)| {
        let i = first + k;
        member_vector(spec, spec.group_of(i), (3, i as u64), row);
    });
    v
}

/// Query `j`: a new member of a random group (returned), with random local token
/// embeddings `[L−1, P]` of which the first `query_tokens` are real.
pub fn query(spec: &SynthSpec, j: usize) -> (TextQuery, usize) {
    let p = spec.dim;
    let mut r = Rng::new(mix(spec.seed, 4, j as u64));
    let g = r.below(spec.groups());
    let mut unit = vec![0f32; p];
    member_vector(spec, g, (5, j as u64), &mut unit);
    // The raw text embedding is not unit length; search normalises it.
    let global: Vec<f32> = unit.iter().map(|x| 3.0 * x).collect();
    let lt = spec.text_len.saturating_sub(1).max(1);
    let local: Vec<f32> = (0..lt * p).map(|_| r.normal()).collect();
    let real = spec.query_tokens.clamp(1, lt);
    let mask_additive = (0..lt).map(|t| if t < real { 0.0 } else { demovlp_model::mask::PAD_SCORE }).collect();
    let q = TextQuery { text: format!("synthetic query {j}"), ids: vec![], global, global_unit: unit, local, mask_additive };
    (q, g)
}

/// The settings a synthetic index records (`model` names no loadable model).
pub fn settings(spec: &SynthSpec) -> Settings {
    Settings {
        model: "synthetic (demovlp bench search)".into(),
        tokenizer: crate::text::BUILTIN.into(),
        text_len: spec.text_len,
        frames: spec.frames,
        regions: spec.regions,
        proj_dim: spec.dim,
        lambda: 20.0,
        masked_mean: false,
        local_dtype: "f16".into(),
        loss_from: Some("synthetic".into()),
        use_local: true,
        shape_from: Some("synthetic".into()),
        model_fingerprint: None,
        annotations: vec![],
    }
}

/// The first segment's local part: random region embeddings, 10..=R real regions per frame,
/// random boxes, frames 0..F.
fn template(spec: &SynthSpec, n: usize) -> SegmentData {
    let (f, r, p) = (spec.frames, spec.regions, spec.dim);
    let nl = f * r;
    let mut d = SegmentData { clips: (0..n).map(SynthSpec::clip_id).collect(), global: global_rows(spec, 0, n), ..Default::default() };
    d.local = vec![0f32; n * nl * p];
    d.local.par_chunks_mut(nl * p).enumerate().for_each(|(i, c)| {
        let mut g = Rng::new(mix(spec.seed, 6, i as u64));
        c.iter_mut().for_each(|x| *x = g.normal());
    });
    let mut g = Rng::new(mix(spec.seed, 7, 0));
    for _ in 0..n {
        for _ in 0..f {
            let real = (10 + g.below(r.saturating_sub(10) + 1)).min(r);
            for k in 0..r {
                d.mask.push(u8::from(k < real));
                let (x, y) = (g.uniform() * 0.8, g.uniform() * 0.8);
                d.boxes.extend([x, y, x + 0.05 + g.uniform() * 0.15, y + 0.05 + g.uniform() * 0.15]);
            }
        }
        d.frames.extend(0..f as i32);
    }
    d
}

fn segment_name(i: usize) -> String {
    format!("seg-{i:05}")
}

/// The first `bytes` bytes of `from`, written to `to`.
fn copy_prefix(from: &Path, to: &Path, bytes: u64) -> Result<()> {
    let mut buf = Vec::with_capacity(bytes as usize);
    fs::File::open(from).with_context(|| format!("opening {}", from.display()))?.take(bytes).read_to_end(&mut buf)?;
    if buf.len() as u64 != bytes {
        bail!("{}: shorter than {bytes} bytes", from.display());
    }
    fs::write(to, buf).with_context(|| format!("writing {}", to.display()))
}

/// Writes the synthetic index into the empty (or absent) directory `dir`; returns its bytes
/// on disk (hard links counted once).
pub fn write_index(dir: &Path, spec: &SynthSpec) -> Result<u64> {
    if spec.clips == 0 || spec.dim == 0 || spec.frames == 0 || spec.regions == 0 || spec.segment_clips == 0 {
        bail!("synthetic index: clips, dim, frames, regions and segment size must be positive ({spec:?})");
    }
    if Manifest::path(dir).exists() {
        bail!("{}: already an index; the synthetic index needs a new directory", dir.display());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let st = settings(spec);
    let s = spec.segment_clips.min(spec.clips);
    let t = template(spec, s);
    let (mut bytes, err) = write_segment(dir, &segment_name(0), &st, &t)?;
    drop(t);
    let first = dir.join(segment_name(0));
    let local = if st.fp16() { "local.f16" } else { "local.f32" };
    let shared = [local, "mask.u8", "boxes.f32", "frames.i32"];
    let per_clip = [(st.locals() * st.proj_dim * 2) as u64, st.locals() as u64, (st.locals() * 16) as u64, (st.frames * 4) as u64];
    let mut segments = vec![segment_name(0)];
    let mut start = s;
    while start < spec.clips {
        let n = s.min(spec.clips - start);
        let name = segment_name(segments.len());
        let tmp = dir.join(format!("{name}.tmp"));
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let ids: Vec<String> = (start..start + n).map(SynthSpec::clip_id).collect();
        let clips_json = serde_json::to_vec(&ids)?;
        let global: Vec<u8> = global_rows(spec, start, n).iter().flat_map(|x| x.to_le_bytes()).collect();
        bytes += (clips_json.len() + global.len()) as u64;
        fs::write(tmp.join("clips.json"), clips_json)?;
        fs::write(tmp.join("global.f32"), global)?;
        for (f, per) in shared.iter().zip(per_clip) {
            if n == s {
                fs::hard_link(first.join(f), tmp.join(f))
                    .with_context(|| format!("linking {} to {}", first.join(f).display(), tmp.display()))?;
            } else {
                copy_prefix(&first.join(f), &tmp.join(f), per * n as u64)?;
                bytes += per * n as u64;
            }
        }
        fs::rename(&tmp, dir.join(&name)).with_context(|| format!("renaming {}", tmp.display()))?;
        segments.push(name);
        start += n;
    }
    let m = Manifest { format: FORMAT.into(), version: VERSION, settings: st, segments, clips: spec.clips, fp16_max_rel_err: err };
    m.write(dir)?;
    Ok(bytes)
}
