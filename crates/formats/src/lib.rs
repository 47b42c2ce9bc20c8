//! demovlp-formats: the file formats DemoVLP's inputs come in, read without Python.
//!
//! - [`zip`]: zip reader (stored + deflated, zip64, data descriptors; CRC-checked) and a
//!   stored-only writer.
//! - [`npy`] / [`npz`]: numpy arrays and archives (read and write).
//! - [`pickle`]: a pickle interpreter producing a symbolic [`pickle::Value`] tree (torch
//!   checkpoints are interpreted on top of it by the model crate), plus a writer.
//! - [`numpy`]: resolves pickled numpy arrays/dtypes/scalars and refuses everything else.

pub mod npy;
pub mod npz;
pub mod numpy;
pub mod pickle;
pub mod zip;

pub use npy::{DType, NpyArray};
pub use npz::{npz_bytes, npz_bytes_with, write_npz, write_npz_with, Npz};
pub use pickle::Value;
pub use zip::ZipArchive;
