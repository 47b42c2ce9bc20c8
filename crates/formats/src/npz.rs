//! `.npz` archives: a zip of `<name>.npy` members (stored or deflated).

use std::path::Path;

use anyhow::{Context, Result};

use crate::npy::NpyArray;
use crate::pickle::Value;
use crate::zip::ZipArchive;

/// A read `.npz` archive. Arrays are parsed on demand by name (without `.npy`).
pub struct Npz {
    zip: ZipArchive,
}

impl Npz {
    /// Reads the file fully into memory (region-feature files are small).
    pub fn open(path: &Path) -> Result<Npz> {
        Ok(Npz { zip: ZipArchive::open_read(path)? })
    }

    /// Parses an archive held in memory; `label` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<Npz> {
        Ok(Npz { zip: ZipArchive::from_bytes(bytes, label)? })
    }

    /// Where this archive came from (for error messages).
    pub fn label(&self) -> &str {
        &self.zip.label
    }

    /// Array names, in archive order.
    pub fn names(&self) -> Vec<String> {
        self.zip.entries().iter().map(|e| e.name.trim_end_matches(".npy").to_string()).collect()
    }

    /// Whether array `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.zip.entry(&format!("{name}.npy")).is_some()
    }

    /// Array `name`; errors name the file and the array.
    pub fn array(&self, name: &str) -> Result<NpyArray> {
        let entry = format!("{name}.npy");
        if self.zip.entry(&entry).is_none() {
            anyhow::bail!("{}: no array {name:?} (has: {})", self.zip.label, self.names().join(", "));
        }
        let bytes = self.zip.read(&entry)?;
        NpyArray::parse(&bytes).with_context(|| format!("{}: array {name:?}", self.zip.label))
    }

    /// The item of a 0-d object array (e.g. the `info` dict), numpy values resolved.
    pub fn object(&self, name: &str) -> Result<Value> {
        let a = self.array(name)?;
        let ctx = || format!("{}: array {name:?}", self.zip.label);
        match a.object_value().with_context(ctx)? {
            Value::ObjectArray { items, .. } if items.len() == 1 => Ok(items.into_iter().next().unwrap()),
            Value::ObjectArray { shape, .. } => anyhow::bail!("{}: expected a 0-d object array, found shape {shape:?}", ctx()),
            other => Ok(other),
        }
    }
}

/// The bytes of a stored (uncompressed) `.npz`, as `np.savez` writes it.
pub fn npz_bytes(arrays: &[(&str, &NpyArray)]) -> Result<Vec<u8>> {
    npz_bytes_with(arrays, false)
}

/// The bytes of an `.npz`, members deflated when `compress` (as `np.savez_compressed`).
pub fn npz_bytes_with(arrays: &[(&str, &NpyArray)], compress: bool) -> Result<Vec<u8>> {
    let members: Vec<(String, Vec<u8>)> = arrays.iter().map(|(n, a)| (format!("{n}.npy"), a.to_bytes())).collect();
    let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let mut out = Vec::new();
    crate::zip::write_zip(&mut out, &refs, compress)?;
    Ok(out)
}

/// Writes a stored `.npz` to `path` (via a temporary file and rename, so readers never
/// see a half-written archive).
pub fn write_npz(path: &Path, arrays: &[(&str, &NpyArray)]) -> Result<()> {
    write_npz_with(path, arrays, false)
}

/// [`write_npz`] with members deflated when `compress`.
pub fn write_npz_with(path: &Path, arrays: &[(&str, &NpyArray)], compress: bool) -> Result<()> {
    let bytes = npz_bytes_with(arrays, compress)?;
    let tmp = path.with_extension("npz.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
