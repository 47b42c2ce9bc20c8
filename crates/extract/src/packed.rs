//! Extraction straight into a packed feature store (`extract --packed`): the store
//! `demovlp pack` makes of the `.npz` tree, byte for byte (shards, `frames.bin`,
//! `clips.tsv`; the manifest differs only in its input fingerprint).
//!
//! The frames are staged as the usual `.npz` tree in `<out>/.extract-npz/` (so an
//! interrupted run resumes clip by clip, as without `--packed`), packed with
//! [`demovlp_data::pack::pack`] in clip-name order (the order of `pack --all`) once every
//! clip is there, and the staging tree is then removed. Thumbnails move to
//! `<out>/<clip>/<i>.jpg`, where `explain --images <out>` finds them. A complete store is
//! final: a rerun with the same sources does nothing; sources that are not in it are an
//! error (a store cannot be extended in place).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use demovlp_data::pack::{pack, PackConfig, PackSummary, PackedStore, StoreDtype};
use demovlp_model::Backend;

use crate::detector::Detector;
use crate::run::{extract, list_jobs, ExtractOptions, Source, Summary};

/// The staging folder of the `.npz` tree inside a store being extracted.
pub fn staging_dir(out: &Path) -> PathBuf {
    out.join(".extract-npz")
}

/// Extracts every clip of `src` into the packed store at `out`, at most `max_regions`
/// regions per frame (the detector's `max_boxes` keeps every region).
pub fn extract_packed<B: Backend>(
    det: &Detector<B>,
    src: &Source,
    out: &Path,
    opt: &ExtractOptions,
    max_regions: usize,
) -> Result<(Summary, PackSummary)> {
    let staging = staging_dir(out);
    if out.join("manifest.json").is_file() && !staging.exists() {
        return complete_store(src, out);
    }
    let mut sum = extract(det, src, &staging, opt)?;
    let mut clips: Vec<String> = list_jobs(src)?.into_iter().map(|j| j.clip).filter(|c| staging.join(c).is_dir()).collect();
    clips.sort();
    if clips.is_empty() {
        bail!("{}: no clip could be decoded, no store written", out.display());
    }
    let cfg = PackConfig { dtype: StoreDtype::F32, max_regions, threads: 0, progress: opt.progress, clip_boxes: false };
    let t0 = std::time::Instant::now();
    let p = pack(&staging, &clips, out, &cfg)?;
    if let Some((clip, why)) = p.skipped.first() {
        bail!(
            "packing {} clips: {} left out, e.g. {clip}: {why} (the .npz files stay in {})",
            clips.len(),
            p.skipped.len(),
            staging.display()
        );
    }
    if opt.thumbnails {
        for c in &clips {
            move_thumbnails(&staging.join(c), &out.join(c))?;
        }
    }
    std::fs::remove_dir_all(&staging).with_context(|| format!("{}: cannot remove the staging folder", staging.display()))?;
    sum.seconds += t0.elapsed().as_secs_f64();
    Ok((sum, p))
}

/// A rerun on a finished store: nothing to do when it holds every clip of `src`.
fn complete_store(src: &Source, out: &Path) -> Result<(Summary, PackSummary)> {
    let store = PackedStore::open(out)?;
    let have: std::collections::HashSet<&str> = store.clip_ids.iter().map(String::as_str).collect();
    let jobs = list_jobs(src)?;
    let missing: Vec<&str> = jobs.iter().map(|j| j.clip.as_str()).filter(|c| !have.contains(c)).collect();
    if let Some(first) = missing.first() {
        bail!(
            "{}: a complete packed store without {} of the {} clips (e.g. {first:?}; undecodable files skipped before count \
             too): a store cannot be extended in place; extract into another --out, or write the .npz tree (without --packed) \
             and pack it",
            out.display(),
            missing.len(),
            jobs.len()
        );
    }
    let sum = Summary { clips: jobs.len(), skipped_existing: jobs.len(), ..Default::default() };
    Ok((sum, store.summary.clone()))
}

/// Moves the `<i>.jpg` files of a staged clip folder into `dest`.
fn move_thumbnails(from: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("{}: cannot create", dest.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot list", from.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "jpg") {
            let to = dest.join(p.file_name().unwrap_or_default());
            std::fs::rename(&p, &to).with_context(|| format!("{}: cannot move to {}", p.display(), to.display()))?;
        }
    }
    Ok(())
}
