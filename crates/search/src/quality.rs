//! How often search finds what exhaustive scoring finds: for each query, exhaustive = every
//! clip of the index scored with global + region-word (as `eval` scores, here through the
//! same re-rank code with N = all clips); agreement@1 = the same top clip, recall@k = the
//! share of the exhaustive top-k that search returned.

use std::time::Instant;

use serde::Serialize;

use crate::search::{Engine, Hit, TextQuery};

/// Agreement of one search setting with exhaustive scoring over a set of queries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Agreement {
    pub queries: usize,
    pub k: usize,
    pub agreement_at_1: f64,
    /// Mean over queries of |search top-k ∩ exhaustive top-k| / |exhaustive top-k|.
    pub recall_at_k: f64,
    /// Latency of the search (the query embedding excluded), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Accumulates per-query comparisons.
#[derive(Default)]
pub struct Tally {
    same_top: usize,
    recall_sum: f64,
    n: usize,
    ms: Vec<f64>,
}

impl Tally {
    /// Adds one query: what search returned and the exhaustive top-k.
    pub fn add(&mut self, got: &[Hit], exhaustive: &[Hit], ms: f64) {
        self.n += 1;
        self.ms.push(ms);
        if let (Some(a), Some(b)) = (got.first(), exhaustive.first()) {
            self.same_top += usize::from(a.clip == b.clip);
        }
        if !exhaustive.is_empty() {
            let found = exhaustive.iter().filter(|e| got.iter().any(|g| g.clip == e.clip)).count();
            self.recall_sum += found as f64 / exhaustive.len() as f64;
        } else {
            self.recall_sum += 1.0;
        }
    }

    pub fn finish(&self, k: usize) -> Agreement {
        let n = self.n.max(1) as f64;
        let mut ms = self.ms.clone();
        ms.sort_by(f64::total_cmp);
        Agreement {
            queries: self.n,
            k,
            agreement_at_1: self.same_top as f64 / n,
            recall_at_k: self.recall_sum / n,
            p50_ms: crate::bench::quantile(&ms, 0.5),
            p99_ms: crate::bench::quantile(&ms, 0.99),
        }
    }
}

/// Exhaustive top-k of an embedded query.
pub fn exhaustive(e: &Engine, q: &TextQuery, k: usize) -> Vec<Hit> {
    e.search_embedded(q, k, e.index.len())
}

/// Search at `rerank` against exhaustive scoring, over embedded queries.
pub fn agreement(e: &Engine, queries: &[TextQuery], k: usize, rerank: usize) -> Agreement {
    let mut t = Tally::default();
    for q in queries {
        let ex = exhaustive(e, q, k);
        let t0 = Instant::now();
        let got = e.search_embedded(q, k, rerank);
        t.add(&got, &ex, t0.elapsed().as_secs_f64() * 1e3);
    }
    t.finish(k)
}
