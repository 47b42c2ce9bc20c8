//! demovlp-formats (being built; see README for the crate tour).
