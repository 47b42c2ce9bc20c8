//! The region codes the first stage runs on: a codebook of region embeddings and every
//! clip's regions as centroid codes (the centroid interaction of ColBERT v2 / PLAID, applied
//! to regions). What a query does with them: [`crate::cascade`].
//!
//! Built once per index ([`ensure_codes`], run by `index` and `index-merge`):
//! spherical k-means over a sample of the normalised real region embeddings gives `C`
//! unit centroids; every region slot of every clip (padding included: the region→word
//! direction averages over every slot) is stored as the number of its nearest centroid
//! (`u16`).
//!
//! Files, next to the index's segments (a derived cache, like the ANN graph):
//!
//! ```text
//! <index>/codes.json          { centroids, dim, trained_on, segments coded, seconds }
//! <index>/codebook.f32        [C, P] unit centroids
//! <index>/codes/<segment>.u16 [n, F·R] the code of every region slot
//! ```
//!
//! Appending: segments added later are coded with the existing codebook (the codebook is
//! retrained when the index has grown more than [`RETRAIN_GROWTH`]× since it was trained).
//! Merging: the merged index gets a codebook trained over all of it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_kernels::gemm::{sgemm, Trans};
use demovlp_kernels::rng::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::store::{fingerprint, write_atomic, Index};

/// Largest codebook (codes are `u16`; more centroids cost training and query time).
pub const MAX_CENTROIDS: usize = 4096;
/// Region embeddings the k-means trains on at most.
pub const MAX_TRAIN: usize = 131_072;
/// k-means iterations.
pub const ITERS: usize = 12;
/// The codebook is retrained (and every segment re-coded) once the index holds this many
/// times the clips it was trained on.
pub const RETRAIN_GROWTH: usize = 4;

/// Centroids for `regions` real region embeddings: a power of two near 4·√regions, 64..4096.
pub fn default_centroids(regions: usize) -> usize {
    let t = (4.0 * (regions.max(1) as f64).sqrt()) as usize;
    t.next_power_of_two().clamp(64, MAX_CENTROIDS)
}

/// `[C, dim]` unit centroids.
#[derive(Clone, Debug)]
pub struct Codebook {
    pub centroids: usize,
    pub dim: usize,
    pub rows: Vec<f32>,
}

/// x / (‖x‖ + 1e-8) of each row, as the region-word alignment normalises.
pub fn hat_rows(v: &mut [f32], dim: usize) {
    for row in v.chunks_exact_mut(dim.max(1)) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt() + demovlp_retrieval::local::NORM_EPS;
        row.iter_mut().for_each(|x| *x /= n);
    }
}

/// Index of the largest of each row of `[rows, cols]` (first on ties).
fn argmax_rows(s: &[f32], cols: usize) -> Vec<u16> {
    s.chunks_exact(cols)
        .map(|r| {
            let mut b = 0;
            for (j, &x) in r.iter().enumerate() {
                if x > r[b] {
                    b = j;
                }
            }
            b as u16
        })
        .collect()
}

impl Codebook {
    /// Spherical k-means over unit rows `x` `[n, dim]`: `c` centroids (at most n), seeded
    /// with distinct random rows, [`ITERS`] iterations; an emptied centroid is re-seeded
    /// with the row its centroid fits worst.
    pub fn train(x: &[f32], dim: usize, c: usize, seed: u64) -> Codebook {
        let n = x.len() / dim;
        let c = c.min(n).clamp(1, MAX_CENTROIDS);
        let mut rng = Rng::new(seed);
        let mut pick: Vec<usize> = (0..n).collect();
        for i in 0..c {
            let j = i + rng.below(n - i);
            pick.swap(i, j);
        }
        let mut cb =
            Codebook { centroids: c, dim, rows: pick[..c].iter().flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied()).collect() };
        for _ in 0..ITERS {
            let (codes, best) = cb.assign_scored(x);
            let mut sum = vec![0f32; c * dim];
            let mut count = vec![0usize; c];
            for (i, &k) in codes.iter().enumerate() {
                count[k as usize] += 1;
                for (s, v) in sum[k as usize * dim..(k as usize + 1) * dim].iter_mut().zip(&x[i * dim..(i + 1) * dim]) {
                    *s += v;
                }
            }
            // Rows ordered worst fit first, for re-seeding empty centroids.
            let mut worst: Vec<usize> = (0..n).collect();
            worst.sort_by(|&a, &b| best[a].total_cmp(&best[b]).then(a.cmp(&b)));
            let mut next = worst.into_iter();
            for k in 0..c {
                if count[k] == 0 {
                    if let Some(i) = next.next() {
                        sum[k * dim..(k + 1) * dim].copy_from_slice(&x[i * dim..(i + 1) * dim]);
                    }
                }
            }
            hat_rows(&mut sum, dim);
            cb.rows = sum;
        }
        cb
    }

    /// Nearest centroid (largest inner product) of each unit row, and that inner product.
    pub fn assign_scored(&self, x: &[f32]) -> (Vec<u16>, Vec<f32>) {
        const BLOCK: usize = 2048;
        let (dim, c) = (self.dim, self.centroids);
        let parts: Vec<(Vec<u16>, Vec<f32>)> = x
            .par_chunks(BLOCK * dim)
            .map(|blk| {
                let m = blk.len() / dim;
                let mut s = vec![0f32; m * c];
                sgemm(Trans::No, Trans::Yes, m, c, dim, 1.0, blk, dim, &self.rows, dim, 0.0, &mut s, c);
                let codes = argmax_rows(&s, c);
                let best = codes.iter().enumerate().map(|(i, &k)| s[i * c + k as usize]).collect();
                (codes, best)
            })
            .collect();
        let mut codes = Vec::with_capacity(x.len() / dim.max(1));
        let mut best = Vec::with_capacity(codes.capacity());
        for (a, b) in parts {
            codes.extend(a);
            best.extend(b);
        }
        (codes, best)
    }

    pub fn assign(&self, x: &[f32]) -> Vec<u16> {
        self.assign_scored(x).0
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CodesMeta {
    pub centroids: usize,
    pub dim: usize,
    /// Clips in the index when the codebook was trained.
    pub trained_on: usize,
    /// Region embeddings the k-means saw.
    pub train_regions: usize,
    /// Segments with a code file, in index order.
    pub segments: Vec<String>,
    /// Checksums ([`crate::store::fingerprint`]) of `codebook.f32` and of each `<segment>.u16`
    /// (absent in codes written before they were recorded).
    #[serde(default)]
    pub sums: std::collections::BTreeMap<String, String>,
}

/// The codebook and the codes of every clip of an index, in clip order.
pub struct Codes {
    pub meta: CodesMeta,
    pub codebook: Codebook,
    /// `[clips, F·R]`.
    pub codes: Vec<u16>,
    pub locals: usize,
    /// `[clips, F·R]` each clip's real slots' codes first (the rest unspecified), and
    /// `[clips]` how many real slots it has: what the coarse scan reads.
    pub real_first: Vec<u16>,
    pub real: Vec<u16>,
    /// Whether this load trained a codebook or coded a segment.
    pub updated: bool,
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("codes.json"), dir.join("codebook.f32"), dir.join("codes"))
}

/// Whether `bytes` (the file `path`) match the checksum recorded for `key` (true when none
/// was recorded); a mismatch is reported, and the file recomputed by the caller.
fn sum_ok(meta: &CodesMeta, key: &str, bytes: &[u8], path: &Path) -> bool {
    match meta.sums.get(key) {
        Some(want) if *want != fingerprint(bytes) => {
            eprintln!("warning: {}: checksum differs from the recorded one (damaged); recomputing it", path.display());
            false
        }
        _ => true,
    }
}

fn f32s_le(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn u16s_le(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Unit region embeddings of clips `clips` (slots with mask 1 only), `[m, P]`.
fn real_regions(index: &Index, clips: &[usize]) -> Vec<f32> {
    let st = index.settings();
    let (p, nl) = (st.proj_dim, st.locals());
    let per: Vec<Vec<f32>> = clips
        .par_iter()
        .map(|&c| {
            let mut all = vec![0f32; nl * p];
            index.local_to(c, &mut all);
            let m = index.mask(c);
            let mut out: Vec<f32> = all.chunks_exact(p).zip(m).filter(|(_, &m)| m != 0).flat_map(|(r, _)| r.iter().copied()).collect();
            hat_rows(&mut out, p);
            out
        })
        .collect();
    per.concat()
}

/// Every slot (real or padding) of clips `first..first + n`, unit rows, `[n·F·R, P]`.
fn all_slots(index: &Index, first: usize, n: usize) -> Vec<f32> {
    let st = index.settings();
    let w = st.locals() * st.proj_dim;
    let mut v = vec![0f32; n * w];
    v.par_chunks_mut(w.max(1)).enumerate().for_each(|(i, out)| index.local_to(first + i, out));
    hat_rows(&mut v, st.proj_dim);
    v
}

/// Trains a codebook over (a sample of) the index's real regions.
pub fn train_codebook(index: &Index, centroids: Option<usize>) -> (Codebook, usize) {
    let st = index.settings();
    let n = index.len();
    // An even spread of clips, enough for MAX_TRAIN regions at the index's fill.
    let per_clip = st.locals().max(1);
    let want_clips = (MAX_TRAIN / per_clip).max(1) * 2;
    let step = n.div_ceil(want_clips.max(1)).max(1);
    let clips: Vec<usize> = (0..n).step_by(step).collect();
    let mut x = real_regions(index, &clips);
    let m = x.len() / st.proj_dim.max(1);
    if m > MAX_TRAIN {
        x.truncate(MAX_TRAIN * st.proj_dim);
    }
    let m = m.min(MAX_TRAIN);
    let total_real_estimate = m * step;
    let c = centroids.unwrap_or_else(|| default_centroids(total_real_estimate));
    (Codebook::train(&x, st.proj_dim, c, 0x5eed_c0de), m)
}

/// What [`ensure_codes`] did.
#[derive(Clone, Debug, Serialize)]
pub struct CodesReport {
    /// Seconds spent training and coding (0 when everything was current).
    pub seconds: f64,
    pub centroids: usize,
    /// Codebook + codes.
    pub bytes: u64,
}

/// Makes the codes current: trains a codebook when there is none (or the index outgrew it,
/// or `centroids` asks for another size), codes every segment without a code file, saves.
pub fn ensure_codes(dir: &Path, centroids: Option<usize>) -> Result<CodesReport> {
    let index = Index::open(dir)?;
    if index.is_empty() {
        return Ok(CodesReport { seconds: 0.0, centroids: 0, bytes: 0 });
    }
    let t = Instant::now();
    let c = Codes::build_or_update(&index, centroids, true)?;
    let seconds = if c.updated { t.elapsed().as_secs_f64() } else { 0.0 };
    Ok(CodesReport { seconds, centroids: c.meta.centroids, bytes: c.bytes() })
}

impl Codes {
    /// Loads the saved codes when they cover this index's segments, codes the segments they
    /// do not cover, retrains when needed; `save` writes what changed.
    pub fn build_or_update(index: &Index, centroids: Option<usize>, save: bool) -> Result<Codes> {
        let st = index.settings();
        let (p, nl) = (st.proj_dim, st.locals());
        let (jp, cbp, cdir) = paths(&index.dir);
        let saved: Option<CodesMeta> = std::fs::read_to_string(&jp).ok().and_then(|t| serde_json::from_str(&t).ok());
        let usable = saved.filter(|m| {
            m.dim == p
                && centroids.is_none_or(|c| c == m.centroids)
                && index.len() < m.trained_on.max(1) * RETRAIN_GROWTH
                && m.segments.iter().all(|s| index.manifest.segments.contains(s))
        });
        let (codebook, mut meta, fresh) = match usable.and_then(|m| {
            let b = std::fs::read(&cbp).ok()?;
            if !sum_ok(&m, "codebook.f32", &b, &cbp) {
                return None;
            }
            (b.len() == m.centroids * p * 4).then(|| (Codebook { centroids: m.centroids, dim: p, rows: f32s_le(&b) }, m))
        }) {
            Some((cb, m)) => (cb, m, false),
            None => {
                if index.is_empty() {
                    bail!("{}: no clips to train a region codebook on", index.dir.display());
                }
                let (cb, m) = train_codebook(index, centroids);
                let meta = CodesMeta {
                    centroids: cb.centroids,
                    dim: p,
                    trained_on: index.len(),
                    train_regions: m,
                    segments: vec![],
                    sums: Default::default(),
                };
                (cb, meta, true)
            }
        };
        let have: HashSet<&String> = meta.segments.iter().collect();
        let mut codes = Vec::with_capacity(index.len() * nl);
        let mut new_files = vec![];
        let mut first = 0;
        for seg in &index.segments {
            let n = seg.clips.len();
            let file = cdir.join(format!("{}.u16", seg.name));
            let key = format!("{}.u16", seg.name);
            let loaded = if have.contains(&seg.name) {
                std::fs::read(&file)
                    .ok()
                    .filter(|b| b.len() == n * nl * 2 && sum_ok(&meta, &key, b, &file))
                    .map(|b| u16s_le(&b))
                    // A code beyond the codebook (a damaged file without a checksum) is recomputed.
                    .filter(|c| c.iter().all(|&x| (x as usize) < codebook.centroids))
            } else {
                None
            };
            let c = match loaded {
                Some(c) => c,
                None => {
                    let c = codebook.assign(&all_slots(index, first, n));
                    new_files.push((file, key, c.clone()));
                    c
                }
            };
            codes.extend(c);
            first += n;
        }
        meta.segments = index.manifest.segments.clone();
        let encoded: Vec<(PathBuf, String, Vec<u8>)> =
            new_files.into_iter().map(|(f, k, c)| (f, k, c.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
        let book: Vec<u8> = if fresh { codebook.rows.iter().flat_map(|x| x.to_le_bytes()).collect() } else { vec![] };
        if fresh {
            meta.sums.clear();
            meta.sums.insert("codebook.f32".into(), fingerprint(&book));
        }
        meta.sums.retain(|k, _| k == "codebook.f32" || meta.segments.iter().any(|s| format!("{s}.u16") == *k));
        for (_, k, b) in &encoded {
            meta.sums.insert(k.clone(), fingerprint(b));
        }
        let updated = fresh || !encoded.is_empty();
        if save && updated {
            let r = (|| -> Result<()> {
                std::fs::create_dir_all(&cdir).with_context(|| format!("creating {}", cdir.display()))?;
                if fresh {
                    // Old code files belong to the old codebook.
                    for e in std::fs::read_dir(&cdir)? {
                        std::fs::remove_file(e?.path()).ok();
                    }
                    write_atomic(&cbp, &book)?;
                }
                for (f, _, b) in &encoded {
                    write_atomic(f, b)?;
                }
                write_atomic(&jp, serde_json::to_string(&meta)?.as_bytes())
            })();
            if let Err(e) = r {
                eprintln!("note: could not save the region codes ({e:#}); they are rebuilt on every start");
            }
        }
        let (real_first, real) = real_first(index, &codes, nl);
        Ok(Codes { meta, codebook, codes, locals: nl, real_first, real, updated })
    }

    /// Bytes of the codebook and the codes (on disk and in memory alike).
    pub fn bytes(&self) -> u64 {
        (self.codebook.rows.len() * 4 + self.codes.len() * 2) as u64
    }
}

/// Each clip's real slots' codes moved to the front, and their count.
fn real_first(index: &Index, codes: &[u16], nl: usize) -> (Vec<u16>, Vec<u16>) {
    let n = codes.len() / nl.max(1);
    let mut out = vec![0u16; codes.len()];
    let mut real = vec![0u16; n];
    out.par_chunks_mut(nl.max(1)).zip(real.par_iter_mut()).enumerate().for_each(|(i, (o, r))| {
        let mut k = 0;
        for (&c, &m) in codes[i * nl..(i + 1) * nl].iter().zip(index.mask(i)) {
            if m != 0 {
                o[k] = c;
                k += 1;
            }
        }
        *r = k as u16;
    });
    (out, real)
}
