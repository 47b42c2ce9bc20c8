//! demovlp-train (being built; see README for the crate tour).
