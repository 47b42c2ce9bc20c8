//! demovlp-model (being built; see README for the crate tour).
