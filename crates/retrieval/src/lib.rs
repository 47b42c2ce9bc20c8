//! demovlp-retrieval (being built; see README for the crate tour).
