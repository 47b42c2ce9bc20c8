//! Global candidates: an exact scan (the oracle, and what small indexes use) and the
//! graph index for large ones.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::store::Index;

#[derive(PartialEq)]
struct Cand(f32, usize);
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    /// Reversed, so a `BinaryHeap` keeps the worst on top; ties: the larger index is worse.
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0).then_with(|| self.1.cmp(&o.1))
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums so the loop vectorises.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Top `k` of `rows` `[n, dim]` by dot product with `q`: (row, score), best first, ties by
/// row; rows whose score is not finite are left out.
pub fn top_k_rows(rows: &[f32], dim: usize, first: usize, q: &[f32], k: usize) -> Vec<(usize, f32)> {
    const CHUNK: usize = 8192;
    let n = rows.len() / dim.max(1);
    let parts: Vec<Vec<(usize, f32)>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut heap = BinaryHeap::with_capacity(k + 1);
            for i in c * CHUNK..((c + 1) * CHUNK).min(n) {
                let s = dot(q, &rows[i * dim..(i + 1) * dim]);
                if !s.is_finite() {
                    continue;
                }
                if heap.len() < k {
                    heap.push(Cand(s, first + i));
                } else if let Some(w) = heap.peek() {
                    if Cand(s, first + i) < *w {
                        heap.pop();
                        heap.push(Cand(s, first + i));
                    }
                }
            }
            heap.into_iter().map(|c| (c.1, c.0)).collect()
        })
        .collect();
    merge_top(parts.into_iter().flatten().collect(), k)
}

fn merge_top(mut all: Vec<(usize, f32)>, k: usize) -> Vec<(usize, f32)> {
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// Exact global top `k` over the whole index (q normalised; rows are stored normalised).
pub fn exact_top_k(index: &Index, q: &[f32], k: usize) -> Vec<(usize, f32)> {
    let dim = index.settings().proj_dim;
    let all = index.global_blocks().into_iter().flat_map(|(first, rows)| top_k_rows(rows, dim, first, q, k)).collect();
    merge_top(all, k)
}

/// How the graph stores its copy of the vectors (the distances it walks the graph with).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 4 bytes per value (the graph's distances are exact).
    #[default]
    F32,
    /// 2 bytes per value.
    F16,
    /// 1 byte per value (cosine only; the vectors are unit length).
    I8,
}

impl Quantization {
    pub fn from_name(s: &str) -> anyhow::Result<Quantization> {
        match s {
            "f32" => Ok(Quantization::F32),
            "f16" => Ok(Quantization::F16),
            "i8" => Ok(Quantization::I8),
            _ => anyhow::bail!("quantization {s:?}: expected f32, f16 or i8"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Quantization::F32 => "f32",
            Quantization::F16 => "f16",
            Quantization::I8 => "i8",
        }
    }
    fn scalar(self) -> usearch::ScalarKind {
        match self {
            Quantization::F32 => usearch::ScalarKind::F32,
            Quantization::F16 => usearch::ScalarKind::F16,
            Quantization::I8 => usearch::ScalarKind::I8,
        }
    }
}

/// Graph parameters (HNSW, `usearch`): `connectivity` = M (edges per node), `expansion_add`
/// = ef_construction, `expansion_search` = ef_search (candidates kept while searching;
/// a query asking for more results than this searches with as many as it asks for).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AnnParams {
    pub connectivity: usize,
    pub expansion_add: usize,
    pub expansion_search: usize,
    /// Graphs saved before this field existed stored f32.
    #[serde(default)]
    pub quantization: Quantization,
}

impl Default for AnnParams {
    /// What `index` builds, chosen with `demovlp bench search` at 1M clips (BENCHMARKS.md):
    /// ef_construction 64 left recall@10 at 0.95 even with ef_search 256; 128 gives 1.000 at
    /// ef_search 192–1024 (0.990 at 128) for ~1 ms a query; f16 vectors make the graph 0.56×
    /// and its build 0.64× of f32's at 100k, at the same recall (0.9985 vs 0.9995).
    fn default() -> Self {
        AnnParams { connectivity: 16, expansion_add: 128, expansion_search: 256, quantization: Quantization::F16 }
    }
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct AnnMeta {
    clips: usize,
    segments: Vec<String>,
    params: AnnParams,
}

/// An HNSW graph over the normalised global embeddings (inner product), keys = clip numbers.
pub struct Ann {
    inner: usearch::Index,
    pub params: AnnParams,
}

fn options(dim: usize, p: &AnnParams) -> usearch::IndexOptions {
    usearch::IndexOptions {
        dimensions: dim,
        metric: if p.quantization == Quantization::I8 { usearch::MetricKind::Cos } else { usearch::MetricKind::IP },
        quantization: p.quantization.scalar(),
        connectivity: p.connectivity,
        expansion_add: p.expansion_add,
        expansion_search: p.expansion_search,
        multi: false,
    }
}

impl Ann {
    /// Builds the graph from `[n, dim]` rows (parallel inserts).
    pub fn build_rows(rows: &[f32], dim: usize, p: AnnParams) -> anyhow::Result<Ann> {
        let inner = usearch::Index::new(&options(dim, &p)).map_err(|e| anyhow::anyhow!("usearch: {e}"))?;
        let n = rows.len() / dim;
        inner.reserve_capacity_and_threads(n, rayon::current_num_threads()).map_err(|e| anyhow::anyhow!("usearch reserve: {e}"))?;
        (0..n)
            .into_par_iter()
            .try_for_each(|i| inner.add(i as u64, &rows[i * dim..(i + 1) * dim]).map_err(|e| anyhow::anyhow!("usearch add: {e}")))?;
        Ok(Ann { inner, params: p })
    }

    /// Builds the graph over every clip of the index.
    pub fn build(index: &Index, p: AnnParams) -> anyhow::Result<Ann> {
        let dim = index.settings().proj_dim;
        let inner = usearch::Index::new(&options(dim, &p)).map_err(|e| anyhow::anyhow!("usearch: {e}"))?;
        inner
            .reserve_capacity_and_threads(index.len(), rayon::current_num_threads())
            .map_err(|e| anyhow::anyhow!("usearch reserve: {e}"))?;
        for (first, rows) in index.global_blocks() {
            let n = rows.len() / dim;
            (0..n).into_par_iter().try_for_each(|i| {
                inner.add((first + i) as u64, &rows[i * dim..(i + 1) * dim]).map_err(|e| anyhow::anyhow!("usearch add: {e}"))
            })?;
        }
        Ok(Ann { inner, params: p })
    }

    fn paths(index: &Index) -> (std::path::PathBuf, std::path::PathBuf) {
        (index.dir.join("ann.usearch"), index.dir.join("ann.json"))
    }

    /// Saves the graph next to the index (`ann.usearch`, `ann.json`), atomically.
    pub fn save(&self, index: &Index) -> anyhow::Result<()> {
        let (g, m) = Self::paths(index);
        let tmp = index.dir.join("ann.usearch.tmp");
        self.inner.save(tmp.to_str().unwrap()).map_err(|e| anyhow::anyhow!("saving {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &g)?;
        let meta = AnnMeta { clips: index.len(), segments: index.manifest.segments.clone(), params: self.params };
        crate::store::write_atomic(&m, serde_json::to_string(&meta)?.as_bytes())
    }

    /// The saved graph when it covers exactly this index's segments (memory-mapped), else
    /// a new one with the default parameters (saved when the directory is writable).
    pub fn load_or_build(index: &Index) -> anyhow::Result<Ann> {
        Self::load_or_build_with(index, AnnParams::default())
    }

    /// The saved graph when it covers exactly this index's segments (whatever parameters it
    /// was built with), else a new one built with `p` and saved.
    pub fn load_or_build_with(index: &Index, p: AnnParams) -> anyhow::Result<Ann> {
        let (g, m) = Self::paths(index);
        if let Ok(text) = std::fs::read_to_string(&m) {
            if let Ok(meta) = serde_json::from_str::<AnnMeta>(&text) {
                if meta.clips == index.len() && meta.segments == index.manifest.segments && g.is_file() {
                    let inner = usearch::Index::new(&options(index.settings().proj_dim, &meta.params))
                        .map_err(|e| anyhow::anyhow!("usearch: {e}"))?;
                    inner.view(g.to_str().unwrap()).map_err(|e| anyhow::anyhow!("mapping {}: {e}", g.display()))?;
                    inner.change_expansion_search(meta.params.expansion_search);
                    return Ok(Ann { inner, params: meta.params });
                }
            }
        }
        eprintln!("building the ANN graph over {} clips ...", index.len());
        let a = Self::build(index, p)?;
        if let Err(e) = a.save(index) {
            eprintln!("note: could not save the ANN graph ({e:#}); it is rebuilt on every start");
        }
        Ok(a)
    }

    /// Approximate top `n`: (clip number, inner product), best first.
    pub fn search_rows(&self, q: &[f32], n: usize) -> Vec<(usize, f32)> {
        match self.inner.search(q, n) {
            Ok(m) => m.keys.iter().zip(&m.distances).map(|(&k, &d)| (k as usize, 1.0 - d)).collect(),
            Err(_) => vec![],
        }
    }

    /// Changes ef_search of this (loaded or built) graph; the saved file is unchanged.
    pub fn set_expansion_search(&mut self, ef: usize) {
        self.inner.change_expansion_search(ef);
        self.params.expansion_search = ef;
    }

    pub fn search(&self, _index: &Index, q: &[f32], n: usize) -> Vec<(usize, f32)> {
        self.search_rows(q, n)
    }

    pub fn len(&self) -> usize {
        self.inner.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
