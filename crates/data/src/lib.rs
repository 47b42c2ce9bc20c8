//! demovlp-data (being built; see README for the crate tour).
