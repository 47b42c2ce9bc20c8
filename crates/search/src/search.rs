//! Queries: embed the text, take N candidates, then re-rank those N by the exact evaluation
//! score — global cosine + region-word similarity (SPEC §8, aligned combination) — on the
//! stored (fp16) local embeddings.
//!
//! Candidates come from the first stage ([`FirstStage`]): by default the region cascade
//! ([`crate::cascade`]) — every clip by a coarse region-code score, then the best of those
//! by the evaluation's own formula on the regions' centroids; or the coarse score alone (the
//! first stage of the previous release, kept for comparison); or, as before that, the global
//! embedding alone (exact scan below a size threshold, the graph index above it). With N ≥ the clips in the index every clip is
//! re-ranked (exhaustive scoring, as `eval` scores). Scores that are not finite are never
//! ranked.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use demovlp_data::TextTokenizer;
use demovlp_model::backend::Backend;
use demovlp_model::Model;
use demovlp_retrieval::EmbeddingSet;
use serde::Serialize;

use crate::ann::{exact_top_k, Ann};
use crate::cascade;
use crate::codes::Codes;
use crate::store::Index;

/// Where the candidates the re-rank scores come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstStage {
    /// The region cascade: every clip by the coarse region-code score, the best
    /// [`Engine::coarse_depth`] of them by the exact formula on their centroids.
    Regions,
    /// Every clip by global cosine + the coarse region-code score alone (the region first
    /// stage of the previous release).
    Codes,
    /// The global embedding alone (exact scan, or the HNSW graph above the exact threshold).
    Global,
}

impl FirstStage {
    pub fn from_name(s: &str) -> Result<FirstStage> {
        match s {
            "regions" => Ok(FirstStage::Regions),
            "codes" => Ok(FirstStage::Codes),
            "global" => Ok(FirstStage::Global),
            _ => bail!("first stage {s:?}: expected regions, codes or global"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FirstStage::Regions => "regions",
            FirstStage::Codes => "codes",
            FirstStage::Global => "global",
        }
    }
}

/// Below this many clips the global candidates come from an exact scan.
pub const DEFAULT_EXACT_THRESHOLD: usize = 50_000;
/// The default re-rank depth for an index of `clips`: 100 + 1 per 10 000 clips, at most 300
/// (200 at 1M). With the region cascade the exact re-rank only orders what the centroid step
/// already ranked (measured, BENCHMARKS.md: at 100 000 clips a depth of 100 gives agreement@1
/// 1.000 and recall@10 0.993 against exhaustive scoring).
pub fn default_rerank(clips: usize) -> usize {
    (100 + clips / 10_000).min(300)
}

/// The default [`Engine::coarse_depth`] for an index of `clips`: 1 % of the clips, at least
/// 1000, at most 20 000 (measured in BENCHMARKS.md: at 1M clips the coarse score holds the
/// exhaustive top 10 within its best 10 000 for all of the bench's 20 queries; a depth of
/// 5 000 left 0.855 of them).
pub fn default_coarse_depth(clips: usize) -> usize {
    (clips / 100).clamp(1000, 20_000)
}

/// Positions of the `n` largest of `s` (finite ones only), best first, ties by position:
/// a linear-time selection (the heap of [`crate::ann::top_k_rows`] costs O(len · log n) and
/// sorts every survivor when `n` is thousands).
pub fn top_n(s: &[f32], n: usize) -> Vec<u32> {
    use rayon::prelude::*;
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let best = |mut v: Vec<(f32, u32)>| {
        if v.len() > n && n > 0 {
            v.select_nth_unstable_by(n - 1, better);
        }
        v.truncate(n);
        v
    };
    // The finite scores that `keep` accepts, with their positions, one share a thread (each
    // share cut to its best n when `cut`).
    let share = s.len().div_ceil(rayon::current_num_threads().max(1)).max(1);
    let gather = |keep: &(dyn Fn(f32) -> bool + Sync), cut: bool| -> Vec<(f32, u32)> {
        let parts: Vec<Vec<(f32, u32)>> = s
            .par_chunks(share)
            .enumerate()
            .map(|(c, xs)| {
                let v =
                    xs.iter().enumerate().filter(|(_, &x)| x.is_finite() && keep(x)).map(|(i, &x)| (x, (c * share + i) as u32)).collect();
                if cut {
                    best(v)
                } else {
                    v
                }
            })
            .collect();
        parts.concat()
    };
    // Large inputs: a threshold from a sample (every 16th score) keeps ~2n candidates; when at
    // least n pass it, the best n are among them. Else each share's best n, then the best n of
    // those.
    let mut cand = None;
    if n > 0 && s.len() > 64 * n {
        let mut sample: Vec<f32> = s.iter().step_by(16).copied().filter(|x| x.is_finite()).collect();
        let at = 2 * n / 16 + 8;
        if sample.len() > at {
            sample.select_nth_unstable_by(at, |a, b| b.total_cmp(a));
            let thr = sample[at];
            cand = Some(gather(&|x| x >= thr, false)).filter(|c| c.len() >= n);
        }
    }
    let mut v = best(cand.unwrap_or_else(|| gather(&|_| true, true)));
    v.sort_unstable_by(better);
    v.into_iter().map(|(_, i)| i).collect()
}

/// Clips scored exactly at a time by the re-rank.
pub const RERANK_BLOCK: usize = 4096;
/// Longest query text accepted (bytes).
pub const MAX_QUERY_BYTES: usize = 4096;

/// One query text, embedded.
#[derive(Clone, Debug)]
pub struct TextQuery {
    pub text: String,
    pub ids: Vec<i64>,
    /// `[P]` raw global embedding.
    pub global: Vec<f32>,
    /// `[P]` L2-normalised.
    pub global_unit: Vec<f32>,
    /// `[L−1, P]`, `[L−1]` additive.
    pub local: Vec<f32>,
    pub mask_additive: Vec<f32>,
}

impl TextQuery {
    /// The query as a one-text [`EmbeddingSet`] (what the evaluation's scorers take).
    pub fn as_set(&self) -> EmbeddingSet<'_> {
        let dim = self.global.len();
        EmbeddingSet {
            count: 1,
            len: self.mask_additive.len(),
            dim,
            global: &self.global,
            local: &self.local,
            mask_additive: &self.mask_additive,
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Hit {
    pub clip: String,
    /// Ranking score: global + local when re-ranked, else global.
    pub score: f32,
    pub global: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<f32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    pub query: String,
    pub results: Vec<Hit>,
}

/// Everything a query needs besides a model: the index, the tokenizer, the ANN graph.
pub struct Engine {
    pub index: Index,
    pub tokenizer: TextTokenizer,
    pub vocab: Vec<String>,
    pub ann: Option<Ann>,
    pub exact_threshold: usize,
    pub first_stage: FirstStage,
    /// The region codes ([`FirstStage::Regions`]); loaded by [`Engine::prepare`].
    pub codes: Option<Codes>,
    /// Clips the cascade's coarse step passes to its centroid step (`None`:
    /// [`default_coarse_depth`]; at least the re-rank depth).
    pub coarse_depth: Option<usize>,
    /// Where the re-rank scores are computed when not on the host ([`Engine::score_on`]).
    device: Option<DeviceScorer>,
}

/// Re-rank scores on a device: [`Backend::eval_scores`] of one query against a block of
/// clips, and the device's name.
#[derive(Clone)]
pub struct DeviceScorer {
    pub name: String,
    #[allow(clippy::type_complexity)]
    scores: Arc<dyn Fn(&EmbeddingSet, &EmbeddingSet, &demovlp_retrieval::EvalOptions) -> Result<Vec<f32>, String> + Send + Sync>,
}

impl Engine {
    /// Opens an index and its tokenizer; builds no graph (see [`Engine::open_with_ann`]).
    pub fn open(dir: &Path) -> Result<Engine> {
        let index = Index::open(dir)?;
        let spec = index.settings().tokenizer.clone();
        let tokenizer = crate::text::load_tokenizer(&spec).with_context(|| format!("the index's tokenizer {spec}"))?;
        let vocab = crate::text::vocab_table(&spec)?;
        Ok(Engine {
            index,
            tokenizer,
            vocab,
            ann: None,
            exact_threshold: DEFAULT_EXACT_THRESHOLD,
            first_stage: FirstStage::Regions,
            codes: None,
            coarse_depth: None,
            device: None,
        })
    }

    /// [`Engine::open`] plus what `stage` needs: the region codes (loaded from the index when
    /// current, else built and saved), or the ANN graph when the index is above the exact
    /// threshold (likewise).
    pub fn open_for(dir: &Path, stage: FirstStage, threshold: usize) -> Result<Engine> {
        let mut e = Self::open(dir)?;
        e.exact_threshold = threshold;
        e.first_stage = stage;
        e.prepare()?;
        Ok(e)
    }

    /// [`Engine::open_for`] with the global first stage (the two-stage search of old).
    pub fn open_with_ann(dir: &Path, threshold: usize) -> Result<Engine> {
        Self::open_for(dir, FirstStage::Global, threshold)
    }

    /// Loads (or builds and saves) what the current first stage needs.
    pub fn prepare(&mut self) -> Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        let stage = if self.index.settings().use_local { self.first_stage } else { FirstStage::Global };
        match stage {
            FirstStage::Regions | FirstStage::Codes if self.codes.is_none() => {
                self.codes = Some(Codes::build_or_update(&self.index, None, true)?)
            }
            FirstStage::Global if self.ann.is_none() && self.index.len() >= self.exact_threshold => {
                self.ann = Some(Ann::load_or_build(&self.index)?)
            }
            _ => {}
        }
        Ok(())
    }

    /// Scores with this λ / masked-mean instead of the index's (which `index` took from the
    /// model's saved training config); returns a warning for each one that differs.
    pub fn override_loss(&mut self, lambda: Option<f32>, masked_mean: Option<bool>) -> Vec<String> {
        let st = &mut self.index.manifest.settings;
        let from = st.loss_from.clone().unwrap_or_else(|| "its build".into());
        let mut warn = vec![];
        if let Some(l) = lambda {
            if l != st.lambda {
                warn.push(format!("--lambda {l}: the index was built with λ {} (from {from}); scoring with {l}", st.lambda));
            }
            st.lambda = l;
        }
        if let Some(m) = masked_mean {
            if m != st.masked_mean {
                warn.push(format!(
                    "--masked-mean {m}: the index was built with masked-mean {} (from {from}); scoring with {m}",
                    st.masked_mean
                ));
            }
            st.masked_mean = m;
        }
        warn
    }

    /// The model the index was built with (as recorded in `index.json`).
    pub fn load_model(&self) -> Result<Model> {
        self.load_model_from(None)
    }

    /// The model at `path` (`--model`), else the one recorded in the index. Resolves a
    /// relative recorded path against the index directory when it is not found as given
    /// (indexes written before paths were stored absolute).
    pub fn load_model_from(&self, path: Option<&Path>) -> Result<Model> {
        let (p, what) = match path {
            Some(p) => (p.to_path_buf(), "--model"),
            None => {
                let rec = Path::new(&self.index.settings().model);
                let p = if rec.exists() || rec.is_absolute() { rec.to_path_buf() } else { self.index.dir.join(rec) };
                (p, "the index's model")
            }
        };
        let m = demovlp_train::weights::load_model(&p)
            .with_context(|| format!("loading {what} {} (give the model with --model when it has moved)", p.display()))?;
        let st = self.index.settings();
        if m.config.proj_dim != st.proj_dim {
            bail!("{what} {} does not fit the index: it has width {}, the index {}", p.display(), m.config.proj_dim, st.proj_dim);
        }
        if let Some(want) = &st.model_fingerprint {
            let got = crate::store::fingerprint_f32(&m.params.data);
            if &got != want {
                bail!(
                    "{what} {} (weights {got}) is not the model the index was built with ({}, weights {want}): \
                     its query embeddings would not match the stored clip embeddings",
                    p.display(),
                    st.model
                );
            }
        }
        Ok(m)
    }

    pub fn check_query(text: &str) -> Result<()> {
        if text.trim().is_empty() {
            bail!("empty query");
        }
        if text.len() > MAX_QUERY_BYTES {
            bail!("query is {} bytes, the limit is {MAX_QUERY_BYTES}", text.len());
        }
        Ok(())
    }

    pub fn embed_query<B: Backend>(&self, model: &mut Model<B>, text: &str) -> Result<TextQuery> {
        Self::check_query(text)?;
        let st = self.index.settings();
        let l = st.text_len;
        let (ids, am) = self.tokenizer.encode(text, l)?;
        let e = model.embed_text(&ids, &am, 1, l);
        if e.global.len() != st.proj_dim {
            bail!("model has width {}, the index {}", e.global.len(), st.proj_dim);
        }
        let mut unit = e.global.clone();
        crate::store::normalize_rows(&mut unit, st.proj_dim);
        Ok(TextQuery { text: text.into(), ids, global: e.global, global_unit: unit, local: e.local, mask_additive: e.mask_additive })
    }

    /// The `n` clips the re-rank scores: every clip when n ≥ the index, else the first stage's best.
    pub fn first_stage_ids(&self, q: &TextQuery, n: usize) -> Vec<usize> {
        let len = self.index.len();
        if n >= len {
            return (0..len).collect();
        }
        match (&self.first_stage, &self.codes) {
            (FirstStage::Regions, Some(codes)) => {
                let qt = self.query_tables(codes, q);
                let depth = self.coarse_depth.unwrap_or_else(|| default_coarse_depth(len)).max(n);
                let pool: Vec<usize> = if depth >= len {
                    (0..len).collect()
                } else {
                    // In index order: the centroid step then reads the clips' rows front to back.
                    let mut pool = top_n(&cascade::coarse_scores(codes, &qt), depth);
                    pool.sort_unstable();
                    pool.into_iter().map(|i| i as usize).collect()
                };
                let s = cascade::centroid_scores(codes, &self.index, &qt, &q.global_unit, &pool);
                top_n(&s, n).into_iter().map(|i| pool[i as usize]).collect()
            }
            (FirstStage::Codes, Some(codes)) => {
                let qt = self.query_tables(codes, q);
                let mut s = cascade::coarse_scores(codes, &qt);
                let p = self.index.settings().proj_dim;
                for (first, rows) in self.index.global_blocks() {
                    for (i, r) in rows.chunks_exact(p).enumerate() {
                        s[first + i] += crate::ann::dot(&q.global_unit, r);
                    }
                }
                top_n(&s, n).into_iter().map(|i| i as usize).collect()
            }
            _ => self.candidates(&q.global_unit, n).into_iter().map(|x| x.0).collect(),
        }
    }

    /// The query's tables over the codebook, with the index's λ and mean.
    pub fn query_tables(&self, codes: &Codes, q: &TextQuery) -> cascade::QueryTables {
        let st = self.index.settings();
        cascade::QueryTables::new(codes, &q.local, &q.mask_additive, st.lambda, st.masked_mean)
    }

    /// Global candidates: exact below the threshold (or without a graph), else the graph.
    pub fn candidates(&self, q: &[f32], n: usize) -> Vec<(usize, f32)> {
        match &self.ann {
            Some(a) if self.index.len() >= self.exact_threshold => a.search(&self.index, q, n),
            _ => exact_top_k(&self.index, q, n),
        }
    }

    /// Computes the re-rank scores of [`Engine::try_search_embedded`] on `be` (a GPU: the
    /// clips' embeddings go up block by block, the scores come back); the first stage stays on
    /// the host. On a device the local term is reported as the total minus the host's global
    /// cosine (it may differ from the host's in the last bit).
    pub fn score_on<B: Backend>(&mut self, be: B, name: &str) {
        let scores =
            Arc::new(move |t: &EmbeddingSet, v: &EmbeddingSet, o: &demovlp_retrieval::EvalOptions| be.eval_scores(t, v, o, &|_, _| {}));
        self.device = Some(DeviceScorer { name: name.to_string(), scores });
    }

    /// The device re-rank scores are computed on ([`Engine::score_on`]); `None`: the host.
    pub fn device(&self) -> Option<&str> {
        self.device.as_ref().map(|d| d.name.as_str())
    }

    /// Exact global + local scores of `clips` for the query (the evaluation's score), on the
    /// host, in blocks of [`RERANK_BLOCK`] clips (memory stays bounded when every clip is
    /// scored).
    pub fn rerank_scores(&self, q: &TextQuery, clips: &[usize]) -> Vec<(f32, f32)> {
        self.rerank_scores_on(q, clips, None).unwrap_or_default()
    }

    /// [`Engine::rerank_scores`] on `device` (`None`: the host, which cannot fail).
    fn rerank_scores_on(&self, q: &TextQuery, clips: &[usize], device: Option<&DeviceScorer>) -> Result<Vec<(f32, f32)>> {
        let mut out = Vec::with_capacity(clips.len());
        for c in clips.chunks(RERANK_BLOCK) {
            out.extend(self.rerank_block(q, c, device)?);
        }
        Ok(out)
    }

    fn rerank_block(&self, q: &TextQuery, clips: &[usize], device: Option<&DeviceScorer>) -> Result<Vec<(f32, f32)>> {
        let st = self.index.settings();
        let (p, nl) = (st.proj_dim, st.locals());
        let n = clips.len();
        let mut vg = Vec::with_capacity(n * p);
        let mut vm = Vec::with_capacity(n * nl);
        for &c in clips {
            vg.extend_from_slice(self.index.global(c));
            self.index.mask_additive_into(c, &mut vm);
        }
        // The local embeddings (fp16 → f32, the bulk of the bytes), clip by clip in parallel.
        let mut vl = vec![0f32; n * nl * p];
        {
            use rayon::prelude::*;
            vl.par_chunks_mut((nl * p).max(1)).zip(clips).for_each(|(out, &c)| self.index.local_to(c, out));
        }
        let texts = q.as_set();
        let videos = EmbeddingSet { count: n, len: nl, dim: p, global: &vg, local: &vl, mask_additive: &vm };
        let g = demovlp_retrieval::global::cosine_matrix(&q.global, 1, &vg, n, p);
        if let Some(d) = device {
            let opts = demovlp_retrieval::EvalOptions {
                lambda: st.lambda,
                mode: demovlp_retrieval::ScoreMode::Aligned,
                use_local: true,
                masked_mean: st.masked_mean,
            };
            let total = (d.scores)(&texts, &videos, &opts).map_err(|e| anyhow::anyhow!("re-rank scores on {}: {e}", d.name))?;
            if total.len() != n {
                bail!("re-rank scores on {}: {} scores for {n} clips", d.name, total.len());
            }
            return Ok(g.into_iter().zip(total).map(|(g, t)| (g, t - g)).collect());
        }
        let s = demovlp_retrieval::eval::local_scores(&texts, &videos, st.lambda, st.masked_mean, &|_, _| {});
        Ok(g.into_iter().zip(s).collect())
    }

    /// Top `k` for an embedded query; `rerank` = N candidates re-ranked (0: global only).
    /// An index of a model trained without the region-word loss ranks by the global term
    /// alone whatever `rerank` says.
    /// Scores on the host whatever [`Engine::score_on`] chose (the exhaustive reference).
    pub fn search_embedded(&self, q: &TextQuery, k: usize, rerank: usize) -> Vec<Hit> {
        self.search_with(q, k, rerank, None).unwrap_or_default()
    }

    /// [`Engine::search_embedded`] with the re-rank scores on the engine's device, if it has
    /// one (`Err`: the device failed).
    pub fn try_search_embedded(&self, q: &TextQuery, k: usize, rerank: usize) -> Result<Vec<Hit>> {
        self.search_with(q, k, rerank, self.device.as_ref())
    }

    fn search_with(&self, q: &TextQuery, k: usize, rerank: usize, device: Option<&DeviceScorer>) -> Result<Vec<Hit>> {
        if self.index.is_empty() || k == 0 {
            return Ok(vec![]);
        }
        let rerank = if self.index.settings().use_local { rerank } else { 0 };
        if rerank == 0 {
            let c = self.candidates(&q.global_unit, k);
            let ids: Vec<usize> = c.iter().map(|x| x.0).collect();
            let g =
                demovlp_retrieval::global::cosine_matrix(&q.global, 1, &self.global_rows(&ids), ids.len(), self.index.settings().proj_dim);
            let mut hits: Vec<Hit> = ids
                .iter()
                .zip(g)
                .filter(|(_, g)| g.is_finite())
                .map(|(&i, g)| Hit { clip: self.index.clip_id(i).into(), score: g, global: g, local: None })
                .collect();
            sort_hits(&mut hits);
            return Ok(hits);
        }
        let ids = self.first_stage_ids(q, rerank.max(k));
        let s = self.rerank_scores_on(q, &ids, device)?;
        let mut hits: Vec<Hit> = ids
            .iter()
            .zip(s)
            .filter(|(_, (g, l))| (g + l).is_finite())
            .map(|(&i, (g, l))| Hit { clip: self.index.clip_id(i).into(), score: g + l, global: g, local: Some(l) })
            .collect();
        sort_hits(&mut hits);
        hits.truncate(k);
        Ok(hits)
    }

    fn global_rows(&self, ids: &[usize]) -> Vec<f32> {
        ids.iter().flat_map(|&i| self.index.global(i).iter().copied()).collect()
    }

    pub fn search<B: Backend>(&self, model: &mut Model<B>, text: &str, k: usize, rerank: usize) -> Result<SearchResult> {
        let q = self.embed_query(model, text)?;
        Ok(SearchResult { query: text.into(), results: self.try_search_embedded(&q, k, rerank)? })
    }
}

/// Best first; ties by clip id (so results are deterministic).
pub fn sort_hits(h: &mut [Hit]) {
    h.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.clip.cmp(&b.clip)));
}

/// A human-readable table of results.
pub fn table(r: &SearchResult) -> String {
    let mut s = format!("query: {}\n{:>4}  {:>8}  {:>8}  {:>8}  clip\n", r.query, "rank", "score", "global", "local");
    for (i, h) in r.results.iter().enumerate() {
        let l = h.local.map(|l| format!("{l:8.4}")).unwrap_or_else(|| format!("{:>8}", "-"));
        s += &format!("{:>4}  {:8.4}  {:8.4}  {l}  {}\n", i + 1, h.score, h.global, h.clip);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::top_n;

    /// Positions of the n largest finite scores, best first, ties by position: a full sort.
    fn reference(s: &[f32], n: usize) -> Vec<u32> {
        let mut v: Vec<(f32, u32)> = s.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, &x)| (x, i as u32)).collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().take(n).map(|(_, i)| i).collect()
    }

    #[test]
    fn top_n_is_a_full_sort_on_both_paths() {
        let mut rng = demovlp_kernels::rng::Rng::new(7);
        for len in [0usize, 1, 5, 100, 5_000, 200_000] {
            // Coarse values (many ties), some non-finite.
            let s: Vec<f32> = (0..len)
                .map(|i| match i % 97 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    _ => (rng.below(1000) as f32) / 7.0,
                })
                .collect();
            for n in [0usize, 1, 10, 1000, 3000] {
                assert_eq!(top_n(&s, n), reference(&s, n), "len {len}, n {n}");
            }
        }
        // All equal: the threshold path keeps every tie and the lowest positions win.
        let flat = vec![1.0f32; 100_000];
        assert_eq!(top_n(&flat, 10), (0..10).collect::<Vec<u32>>());
    }
}
