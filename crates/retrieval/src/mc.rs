//! Multiple-choice scoring (SPEC §8; MSR-VTT-MC, LSMDC-MC): each question has one clip
//! and K option texts; every option is scored against the clip with global + local
//! similarity and the highest wins.
//!
//! Two combinations:
//! - **aligned** (the default, correct): score_k = cos(text_k, v) + S_loc(v, text_k);
//! - **reference** (the published evaluation, `--reference-eval`): the published code copies
//!   the clip K times and ranks row 0 of (global [K texts × K copies] + local [K copies ×
//!   K texts]), i.e. score_k = cos(text_0, v) + S_loc(v, text_k). Its global term is the
//!   same for every option, so only the local term decides.
//!
//! The published code computes a K × K block per question; the off-diagonal global terms
//! it never reads are not computed here (one cosine per option and one local score per
//! option: K pairs, not K²).

use rayon::prelude::*;

use crate::eval::{local_scores, EmbeddingSet};
use crate::global::cosine_matrix;

/// Scores and predictions of every question, both combinations.
#[derive(Clone, Debug, PartialEq)]
pub struct McScores {
    pub questions: usize,
    pub options: usize,
    /// `[Q, K]` cos(text_0, v) + S_loc(v, text_k).
    pub reference: Vec<f32>,
    /// `[Q, K]` cos(text_k, v) + S_loc(v, text_k).
    pub aligned: Vec<f32>,
    /// `[Q]` argmax of each row (the first of equal maxima, as `torch.argmax`).
    pub pred_reference: Vec<usize>,
    pub pred_aligned: Vec<usize>,
}

/// Index of the largest value; the first one among equals. NaN never wins (callers reject
/// non-finite scores before this).
pub fn argmax_first(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Scores `texts` (Q·K options, question-major: options of question q at q·K..q·K+K) against
/// `videos` (Q clips, one per question) with the region-word softmax temperature `lambda`
/// (published: 20) and the published position means (`masked_mean = false`) or the masked
/// variant. Questions run in parallel.
pub fn mc_scores(texts: &EmbeddingSet, videos: &EmbeddingSet, options: usize, lambda: f32, masked_mean: bool) -> McScores {
    let q = videos.count;
    assert!(options >= 1, "multiple choice needs at least one option");
    assert_eq!(texts.count, q * options, "{} option texts for {q} questions × {options} options", texts.count);
    assert_eq!(texts.dim, videos.dim, "texts have width {}, videos {}", texts.dim, videos.dim);
    let (d, wl, nl) = (texts.dim, texts.len, videos.len);
    let per_question: Vec<(Vec<f32>, Vec<f32>)> = (0..q)
        .into_par_iter()
        .map(|qi| {
            let t = EmbeddingSet {
                count: options,
                len: wl,
                dim: d,
                global: &texts.global[qi * options * d..(qi + 1) * options * d],
                local: &texts.local[qi * options * wl * d..(qi + 1) * options * wl * d],
                mask_additive: &texts.mask_additive[qi * options * wl..(qi + 1) * options * wl],
            };
            let v = EmbeddingSet {
                count: 1,
                len: nl,
                dim: d,
                global: &videos.global[qi * d..(qi + 1) * d],
                local: &videos.local[qi * nl * d..(qi + 1) * nl * d],
                mask_additive: &videos.mask_additive[qi * nl..(qi + 1) * nl],
            };
            let g = cosine_matrix(t.global, options, v.global, 1, d); // [K, 1]
            let s_loc = local_scores(&t, &v, lambda, masked_mean, &|_, _| {}); // [1, K]
            let reference = s_loc.iter().map(|&s| g[0] + s).collect();
            let aligned = s_loc.iter().zip(&g).map(|(&s, &gk)| gk + s).collect();
            (reference, aligned)
        })
        .collect();
    let mut out = McScores {
        questions: q,
        options,
        reference: Vec::with_capacity(q * options),
        aligned: Vec::with_capacity(q * options),
        pred_reference: Vec::with_capacity(q),
        pred_aligned: Vec::with_capacity(q),
    };
    for (r, a) in per_question {
        out.pred_reference.push(argmax_first(&r));
        out.pred_aligned.push(argmax_first(&a));
        out.reference.extend(r);
        out.aligned.extend(a);
    }
    out
}

/// Share of questions (percent) whose prediction is the answer.
pub fn accuracy_percent(pred: &[usize], answers: &[usize]) -> f64 {
    assert_eq!(pred.len(), answers.len(), "{} predictions for {} answers", pred.len(), answers.len());
    if pred.is_empty() {
        return 0.0;
    }
    100.0 * pred.iter().zip(answers).filter(|(p, a)| p == a).count() as f64 / pred.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax_first(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax_first(&[5.0]), 0);
        assert_eq!(argmax_first(&[-1.0, -1.0]), 0);
    }

    #[test]
    fn accuracy_counts_matches() {
        assert_eq!(accuracy_percent(&[0, 1, 2, 3], &[0, 1, 0, 0]), 50.0);
        assert_eq!(accuracy_percent(&[], &[]), 0.0);
    }
}
