//! demovlp-retrieval: everything that happens on embeddings once the towers have run.
//!
//! - [`loss`]: the training losses (SPEC §6) with explicit forward and hand-written
//!   backward — the global contrastive loss ([`global`]) and the region-word alignment
//!   loss, fused per (text, video) pair ([`local`]) so no (B, B, words, regions) tensor
//!   is ever allocated.
//! - [`eval`]: evaluation scores global + local (SPEC §8).
//! - [`blocked`]: the local similarity of many pairs at once, blocked, bounded memory —
//!   evaluation's scores and the loss's forward.
//! - [`rows`]: the region-word row kernels both of those use (softmax over contexts, the
//!   focal rule [`rows::focal_keep`], portable and AVX2 paths picked through
//!   `demovlp_kernels::simd`).
//! - [`fastmath`]: the alignment's `exp` (and why it is not the kernels' one), dot, norm.
//! - [`metrics`]: R@K / MedR / MeanR exactly as the published evaluation computes them.
//! - [`reference`](mod@reference): a straightforward unfused implementation of the same computations,
//!   materialising the per-block tensors like the published code. It is the oracle the
//!   fused kernels are tested against and the baseline `demovlp bench eval-sims` times.

pub mod blocked;
pub mod eval;
pub mod fastmath;
pub mod global;
pub mod local;
pub mod loss;
pub mod mc;
pub mod metrics;
pub mod qa_metrics;
pub mod reference;
pub mod rows;

pub use eval::{eval_scores, eval_scores_with, EmbeddingSet, EvalOptions, ScoreMode};
pub use loss::{losses_forward, losses_forward_backward, LossConfig, LossGrads, LossInputs, LossOutputs};
pub use metrics::{retrieval_metrics, retrieval_metrics_f64, DirectionMetrics, RetrievalMetrics};
