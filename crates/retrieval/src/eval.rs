//! Evaluation scores (SPEC §8): Score[t, v] = G[t, v] + S_loc[v, t], the global cosine
//! matrix ([`crate::global`]) plus the blocked local similarity ([`crate::blocked`]).

use crate::blocked;
use crate::global::cosine_matrix;
use crate::local::Items;

/// Re-exported from [`crate::blocked`].
pub use crate::blocked::local_scores_items;
/// Re-exported from [`crate::rows`], where the switch lives (tests of the portable path use it).
#[doc(hidden)]
pub use crate::rows::force_portable_path;

/// How the local similarity (rows = videos) is combined with the global one (rows = texts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScoreMode {
    /// Score[t, v] = G[t, v] + S_loc[v, t] (the correct combination).
    #[default]
    Aligned,
    /// Score[i, j] = G[i, j] + S_loc[i, j]: the published evaluation, which adds S_loc
    /// untransposed. Only defined for as many texts as videos.
    Reference,
}

/// Embeddings of every test text (len = words) or video (len = regions).
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingSet<'a> {
    pub count: usize,
    /// W or N positions per item.
    pub len: usize,
    pub dim: usize,
    pub global: &'a [f32],        // [count, dim]
    pub local: &'a [f32],         // [count, len, dim]
    pub mask_additive: &'a [f32], // [count, len] 0 real / −100 padding
}

impl EmbeddingSet<'_> {
    fn check(&self, what: &str) {
        let (c, l, d) = (self.count, self.len, self.dim);
        assert_eq!(self.global.len(), c * d, "{what}: global has {} values, expected [{c}, {d}]", self.global.len());
        assert_eq!(self.local.len(), c * l * d, "{what}: local has {} values, expected [{c}, {l}, {d}]", self.local.len());
        assert_eq!(self.mask_additive.len(), c * l, "{what}: mask has {} values, expected [{c}, {l}]", self.mask_additive.len());
    }
}

/// Everything `eval_scores` can be asked for.
#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    pub lambda: f32,
    pub mode: ScoreMode,
    pub use_local: bool,
    /// Means over real positions only (the loss's `masked_mean` variant); false = published.
    pub masked_mean: bool,
}

/// Score matrix [T, V] (rows = texts). `progress(done, total)` is called from the calling
/// thread as blocks of pairs finish. Panics on inconsistent shapes, and in
/// `ScoreMode::Reference` when T ≠ V (the published code cannot combine those either).
pub fn eval_scores(
    texts: &EmbeddingSet,
    videos: &EmbeddingSet,
    lambda: f32,
    mode: ScoreMode,
    use_local: bool,
    progress: &dyn Fn(usize, usize),
) -> Vec<f32> {
    eval_scores_with(texts, videos, &EvalOptions { lambda, mode, use_local, masked_mean: false }, progress)
}

/// [`eval_scores`] with every option.
pub fn eval_scores_with(texts: &EmbeddingSet, videos: &EmbeddingSet, opts: &EvalOptions, progress: &dyn Fn(usize, usize)) -> Vec<f32> {
    texts.check("texts");
    videos.check("videos");
    assert_eq!(texts.dim, videos.dim, "texts have width {}, videos {}", texts.dim, videos.dim);
    let (nt, nv) = (texts.count, videos.count);
    if opts.mode == ScoreMode::Reference {
        assert_eq!(nt, nv, "ScoreMode::Reference adds S_loc [videos, texts] untransposed and needs as many texts ({nt}) as videos ({nv})");
    }
    let mut score = cosine_matrix(texts.global, nt, videos.global, nv, texts.dim);
    if !opts.use_local {
        return score;
    }
    let s_loc = local_scores(texts, videos, opts.lambda, opts.masked_mean, progress);
    for t in 0..nt {
        for v in 0..nv {
            score[t * nv + v] += match opts.mode {
                ScoreMode::Aligned => s_loc[v * nt + t],
                ScoreMode::Reference => s_loc[t * nt + v],
            };
        }
    }
    score
}

/// S_loc [V, T] (rows = videos), SPEC §6 s1[v, t] + s2[t, v].
pub fn local_scores(
    texts: &EmbeddingSet,
    videos: &EmbeddingSet,
    lambda: f32,
    masked_mean: bool,
    progress: &dyn Fn(usize, usize),
) -> Vec<f32> {
    let text = Items::new(texts.local, texts.mask_additive, texts.count, texts.len, texts.dim);
    let video = Items::new(videos.local, videos.mask_additive, videos.count, videos.len, videos.dim);
    blocked::local_scores_items(&text, &video, lambda, masked_mean, progress)
}
