//! Datasets named in a run config → samples and a feature source, via the data crate's
//! readers (one per published annotation layout) and its two feature sources.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use demovlp_data::annotations::{read_annotations, read_msrvtt, Layout, MsrvttCut};
use demovlp_data::pack::PackedStore;
use demovlp_data::{FeatureSource, NpzTree};

use crate::config::DatasetConfig;
use demovlp_data::Sample;

/// Samples of a dataset. MSR-VTT reads its metadata directory (`annotations` = the folder
/// holding `annotation/MSR_VTT.json` and the split lists) with `cut` (default jsfusion),
/// the training or the test list depending on `train`.
pub fn read_dataset(ds: &DatasetConfig, train: bool, skip_bad: bool) -> Result<(Vec<Sample>, Vec<String>)> {
    let (mut samples, skipped) = if ds.format == "msrvtt" {
        let cut = MsrvttCut::from_name(ds.cut.as_deref().unwrap_or("jsfusion"))?;
        (read_msrvtt(&ds.annotations, cut, train)?, Vec::new())
    } else {
        let a = read_annotations(&ds.annotations, Some(Layout::from_name(&ds.format)?), skip_bad)?;
        (a.samples, a.skipped)
    };
    if let Some(n) = ds.max_samples {
        samples.truncate(n);
    }
    if samples.is_empty() {
        anyhow::bail!("{} ({}): no samples", ds.name, ds.annotations.display());
    }
    Ok((samples, skipped))
}

/// A packed store (a directory with `manifest.json`) or an `.npz` tree.
pub fn open_features(path: &Path) -> Result<Arc<dyn FeatureSource>> {
    open_features_with(path, false)
}

/// [`open_features`]; `clip_boxes` clips `.npz` boxes outside the image to it (a packed
/// store was clipped, or not, when it was packed).
pub fn open_features_with(path: &Path, clip_boxes: bool) -> Result<Arc<dyn FeatureSource>> {
    if path.join("manifest.json").is_file() {
        Ok(Arc::new(PackedStore::open(path).with_context(|| format!("opening packed store {}", path.display()))?))
    } else if path.is_dir() && (path.join("manifest.json.tmp").exists() || path.join("shard-00000.bin").exists()) {
        anyhow::bail!(
            "{}: incomplete store: re-run pack (shards but no manifest.json: the `demovlp pack` that wrote it was interrupted)",
            path.display()
        )
    } else if path.is_dir() {
        Ok(Arc::new(NpzTree::new(path).with_clip_boxes(clip_boxes)))
    } else {
        anyhow::bail!("{}: neither a packed store nor a directory of clip features", path.display())
    }
}
