//! `demovlp index`: embed every clip of a collection and write (or extend) an index.
//!
//! Clips are embedded in segments of `segment_clips`; each segment is written atomically
//! and recorded in `index.json` as soon as it is complete, so a run stopped at any point
//! resumes where it stopped (clips already in the index are never re-embedded), and a
//! later run with more clips only embeds the new ones. `shard = (i, n)` keeps the clips
//! at positions ≡ i (mod n) of the (deduplicated) list, so n jobs can index in parallel
//! into n directories that [`merge`] then combines.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_data::annotations::{read_annotations, read_msrvtt, Layout, MsrvttCut};
use demovlp_data::batches::{assemble_videos, InputShape};
use demovlp_data::regions::{choose_frames, FEAT_DIM};
use demovlp_data::{FeatureSource, FrameChoice};
use demovlp_model::Model;
use rayon::prelude::*;
use serde::Serialize;

use crate::store::{normalize_rows, write_segment, Index, Manifest, SegmentData, Settings, FORMAT, VERSION};

/// Which clips to index.
#[derive(Clone, Debug)]
pub enum ClipList {
    /// An annotation file (layout detected from its name unless given) or an MSR-VTT
    /// metadata directory.
    Annotations { path: PathBuf, layout: Option<String> },
    /// Every clip directory under the feature root (or every clip of a packed store).
    All,
    /// Given explicitly (tests, merges).
    Ids(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct IndexOptions {
    pub model: PathBuf,
    pub features: PathBuf,
    pub clips: ClipList,
    pub out: PathBuf,
    /// None: the existing index's, else 8.
    pub frames: Option<usize>,
    /// None: the existing index's, else 30.
    pub regions: Option<usize>,
    /// None: the existing index's, else `builtin:bert-base-uncased`.
    pub tokenizer: Option<String>,
    /// None: the existing index's, else min(100, the model's text positions).
    pub text_len: Option<usize>,
    /// λ of the region-word alignment; None: the model's saved training config's `[loss]
    /// lambda` (see [`saved_loss`]), else 20.
    pub lambda: Option<f32>,
    /// None: the saved config's `[loss] masked_mean`, else false.
    pub masked_mean: Option<bool>,
    /// Keep the local embeddings in f32 instead of f16.
    pub fp32: bool,
    pub batch_size: usize,
    pub segment_clips: usize,
    pub shard: Option<(usize, usize)>,
    pub progress: bool,
    /// Checked between batches: stop after the current segment.
    pub stop: Option<Arc<AtomicBool>>,
}

impl IndexOptions {
    pub fn new(model: PathBuf, features: PathBuf, clips: ClipList, out: PathBuf) -> Self {
        IndexOptions {
            model,
            features,
            clips,
            out,
            frames: None,
            regions: None,
            tokenizer: None,
            text_len: None,
            lambda: None,
            masked_mean: None,
            fp32: false,
            batch_size: 32,
            segment_clips: 1024,
            shard: None,
            progress: true,
            stop: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexSummary {
    /// Clips embedded by this run.
    pub clips: usize,
    /// Clips in the index afterwards.
    pub total_clips: usize,
    /// Already in the index (not re-embedded).
    pub already_indexed: usize,
    /// Bytes written by this run.
    pub bytes: u64,
    pub seconds: f64,
    /// `(clip, reason)` of every clip that could not be embedded.
    pub skipped: Vec<(String, String)>,
    pub fp16_max_rel_err: f64,
    pub interrupted: bool,
}

/// The training config saved with a model: a training checkpoint's embedded config, or
/// `train_config.toml` / `config.toml` (what `pretrain`/`finetune` write in their output
/// directory) in a model directory. Returns the config and where it came from, or None
/// when the model has none (an imported or converted model directory).
pub fn saved_config(model: &Path) -> Result<Option<(demovlp_train::config::TrainConfig, String)>> {
    let (text, from) = if model.is_dir() {
        match ["train_config.toml", "config.toml"].iter().map(|f| model.join(f)).find(|p| p.is_file()) {
            Some(p) => (std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?, p.display().to_string()),
            None => return Ok(None),
        }
    } else if demovlp_train::checkpoint::is_checkpoint(model) {
        (demovlp_train::checkpoint::read_config_text(model)?, format!("{} (its saved training config)", model.display()))
    } else {
        return Ok(None);
    };
    let cfg = demovlp_train::config::TrainConfig::parse_str(&text).with_context(|| format!("the model's training config {from}"))?;
    Ok(Some((cfg, from)))
}

/// λ and masked-mean of the region-word alignment a model was trained with, from its saved
/// training config ([`saved_config`]): `(lambda, masked_mean, where)`, or None without one.
pub fn saved_loss(model: &Path) -> Result<Option<(f32, bool, String)>> {
    Ok(saved_config(model)?.map(|(c, from)| (c.loss.lambda, c.loss.masked_mean, from)))
}

/// A setting taken from the command line, else the saved training config, else a default;
/// a flag that differs from the saved value warns.
fn pick<T: PartialEq + Copy + std::fmt::Display>(
    flag: Option<T>,
    name: &str,
    saved: Option<(T, &str, &str)>,
    default: T,
    warn: &mut Vec<String>,
) -> T {
    if let (Some(f), Some((s, key, from))) = (flag, saved) {
        if f != s {
            warn.push(format!("--{name} {f} differs from the model's training config ({from}: {key} = {s}); using {f}"));
        }
    }
    flag.or(saved.map(|s| s.0)).unwrap_or(default)
}

/// "command line" when every setting was given, `saved` when none was, else per setting.
fn source_of(given: &[(&str, bool)], saved: &str) -> String {
    if given.iter().all(|g| g.1) {
        "command line".into()
    } else if given.iter().all(|g| !g.1) {
        saved.into()
    } else {
        given.iter().map(|(n, g)| format!("{n}: {}", if *g { "command line" } else { saved })).collect::<Vec<_>>().join("; ")
    }
}

/// Everything the index takes from the model's training: the region-word alignment's λ,
/// masked-mean and whether it was trained at all, and the input shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub lambda: f32,
    pub masked_mean: bool,
    pub use_local: bool,
    pub frames: usize,
    pub regions: usize,
    pub text_len: usize,
    /// Where λ and masked-mean came from.
    pub from: String,
    /// Where frames, regions and text length came from.
    pub shape_from: String,
    pub warnings: Vec<String>,
}

/// The λ / masked-mean to build with: the flag when given (a warning when it differs from
/// the model's saved config), else the saved config's, else the defaults 20 / false.
/// Returns `(lambda, masked_mean, where they came from, warnings)`.
pub fn resolve_loss(model: &Path, lambda: Option<f32>, masked_mean: Option<bool>) -> Result<(f32, bool, String, Vec<String>)> {
    let r = resolve(model, lambda, masked_mean, None, None, None, 64)?;
    Ok((r.lambda, r.masked_mean, r.from, r.warnings))
}

/// Resolves every training-derived setting: flag, else the model's saved training config,
/// else the defaults (λ 20, masked-mean false, region-word term used, 8 frames, 30 regions,
/// text length min(100, `max_text`)). A flag that differs from the saved value warns.
pub fn resolve(
    model: &Path,
    lambda: Option<f32>,
    masked_mean: Option<bool>,
    frames: Option<usize>,
    regions: Option<usize>,
    text_len: Option<usize>,
    max_text: usize,
) -> Result<Resolved> {
    let saved = saved_config(model)?;
    let mut w = vec![];
    let from = saved.as_ref().map(|s| s.1.as_str()).unwrap_or("");
    let c = saved.as_ref().map(|s| &s.0);
    let r = Resolved {
        lambda: pick(lambda, "lambda", c.map(|c| (c.loss.lambda, "[loss] lambda", from)), 20.0, &mut w),
        masked_mean: pick(masked_mean, "masked-mean", c.map(|c| (c.loss.masked_mean, "[loss] masked_mean", from)), false, &mut w),
        use_local: c.is_none_or(|c| c.loss.use_local),
        frames: pick(frames, "frames", c.map(|c| (c.data.frames, "[data] frames", from)), 8, &mut w),
        regions: pick(regions, "regions", c.map(|c| (c.data.regions, "[data] regions", from)), 30, &mut w),
        text_len: pick(text_len, "text-len", c.map(|c| (c.data.text_len, "[data] text_len", from)), 100.min(max_text), &mut w),
        from: String::new(),
        shape_from: String::new(),
        warnings: vec![],
    };
    let saved_from = saved.as_ref().map_or_else(|| "defaults (the model has no saved training config)".to_string(), |s| s.1.clone());
    let loss_from = source_of(&[("λ", lambda.is_some()), ("masked-mean", masked_mean.is_some())], &saved_from);
    let shape_from =
        source_of(&[("frames", frames.is_some()), ("regions", regions.is_some()), ("text-len", text_len.is_some())], &saved_from);
    let from = loss_from;
    Ok(Resolved { from, shape_from, warnings: w, ..r })
}

/// Refuses to mix the embeddings of two models in one index: compares the weights'
/// fingerprints (or, for an index written before they were recorded, the model paths).
pub fn check_same_model(a: &Settings, b: &Settings, dir: &Path) -> Result<()> {
    let same = match (&a.model_fingerprint, &b.model_fingerprint) {
        (Some(x), Some(y)) => x == y,
        _ => {
            let canon = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
            canon(&a.model) == canon(&b.model)
        }
    };
    if !same {
        bail!(
            "{}: built with the model {} (weights {}); this run's model {} (weights {}) is another one — \
             an index holds one model's embeddings: index into a new --out",
            dir.display(),
            a.model,
            a.model_fingerprint.as_deref().unwrap_or("not recorded"),
            b.model,
            b.model_fingerprint.as_deref().unwrap_or("not recorded")
        );
    }
    Ok(())
}

/// Parses `i/n` (0 ≤ i < n).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s.split_once('/').with_context(|| format!("--shard {s:?}: expected i/n, e.g. 0/4"))?;
    let (i, n): (usize, usize) = (a.trim().parse().context("--shard: i")?, b.trim().parse().context("--shard: n")?);
    if n == 0 || i >= n {
        bail!("--shard {s:?}: need 0 ≤ i < n");
    }
    Ok((i, n))
}

/// The clip ids to index, deduplicated, in annotation order.
pub fn list_clips(list: &ClipList, features: &Path) -> Result<Vec<String>> {
    let ids: Vec<String> = match list {
        ClipList::Ids(v) => v.clone(),
        ClipList::All => {
            if features.join("manifest.json").is_file() {
                // A packed store: `clips.tsv` is `clip id<TAB>first frame<TAB>frame count`.
                let t = std::fs::read_to_string(features.join("clips.tsv"))
                    .with_context(|| format!("{}: reading clips.tsv", features.display()))?;
                t.lines().filter(|l| !l.is_empty()).map(|l| l.split('\t').next().unwrap_or("").to_string()).collect()
            } else {
                find_clip_dirs(features)?
            }
        }
        ClipList::Annotations { path, layout } => {
            if path.is_dir() {
                read_msrvtt(path, MsrvttCut::from_name("jsfusion")?, false)?.into_iter().map(|s| s.clip).collect()
            } else {
                let layout = layout.as_deref().map(Layout::from_name).transpose()?;
                let a = read_annotations(path, layout, true)?;
                if !a.skipped.is_empty() {
                    eprintln!("{}: skipped {} bad annotation records, e.g. {}", path.display(), a.skipped.len(), a.skipped[0]);
                }
                a.samples.into_iter().map(|s| s.clip).collect()
            }
        }
    };
    let mut seen = HashSet::new();
    Ok(ids.into_iter().filter(|c| seen.insert(c.clone())).collect())
}

/// Every clip directory (one holding `0.npz`) under `root`, at any depth, as its path
/// relative to `root` with `/` separators (the annotations' clip ids), sorted. Symbolic
/// links to directories are followed to a depth of 16.
pub fn find_clip_dirs(root: &Path) -> Result<Vec<String>> {
    fn walk(dir: &Path, rel: &str, depth: usize, out: &mut Vec<String>) -> Result<()> {
        if depth > 16 {
            return Ok(());
        }
        for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list the directory", dir.display()))? {
            let e = e?;
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let id = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if p.join("0.npz").is_file() {
                out.push(id);
            } else {
                walk(&p, &id, depth + 1, out)?;
            }
        }
        Ok(())
    }
    let mut out = vec![];
    walk(root, "", 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn segment_name(i: usize) -> String {
    format!("seg-{i:05}")
}

/// Removes `*.tmp` leftovers and segment directories `index.json` does not list.
fn clean_strays(dir: &Path, m: &Manifest) -> Result<()> {
    let listed: HashSet<&str> = m.segments.iter().map(String::as_str).collect();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if e.path().is_dir() && name.starts_with("seg-") && !listed.contains(name.as_str()) {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

/// Embeds a batch of loaded clips; returns the segment rows.
pub fn embed_clips<B: demovlp_model::Backend>(
    model: &mut Model<B>,
    source: &dyn FeatureSource,
    clips: &[String],
    shape: InputShape,
    out: &mut SegmentData,
    skipped: &mut Vec<(String, String)>,
) {
    let (f, r, p) = (shape.frames, shape.regions, model.config.proj_dim);
    // One clip at a time through the shared assembler, so one bad clip is skipped, not the batch.
    #[allow(clippy::type_complexity)]
    let loaded: Vec<(String, Result<(demovlp_data::VideoBatch, Vec<i32>)>)> = clips
        .par_iter()
        .map(|c| {
            let res = (|| {
                let b = assemble_videos("index", source, std::slice::from_ref(c), shape)?;
                let v = source.frame_count(c)?;
                let mut fr: Vec<i32> = choose_frames(v, f, &mut FrameChoice::Middle)?.into_iter().map(|x| x as i32).collect();
                fr.resize(f, -1);
                Ok((b, fr))
            })();
            (c.clone(), res)
        })
        .collect();
    let mut object = Vec::new();
    let mut mask = Vec::new();
    let mut ok = Vec::new();
    for (c, res) in loaded {
        match res {
            Ok((b, fr)) => {
                // Box fractions (x1, y1, x2, y2) are the first four box-feature entries of each token.
                for t in b.object.chunks_exact(demovlp_data::TOKEN_DIM) {
                    out.boxes.extend_from_slice(&t[FEAT_DIM..FEAT_DIM + 4]);
                }
                out.frames.extend(fr);
                object.extend(b.object);
                mask.extend(b.object_mask);
                ok.push(c);
            }
            Err(e) => skipped.push((c, format!("{e:#}"))),
        }
    }
    if ok.is_empty() {
        return;
    }
    let e = model.embed_video_inference(&object, &mask, ok.len(), f, r);
    let mut g = e.global;
    normalize_rows(&mut g, p);
    out.global.extend(g);
    out.local.extend(e.local);
    out.mask.extend(e.mask_additive.iter().map(|&m| u8::from(demovlp_retrieval::local::is_real(m))));
    out.clips.extend(ok);
}

/// Builds or extends the index at `opt.out`.
pub fn build_index(opt: &IndexOptions) -> Result<IndexSummary> {
    let source = demovlp_train::annotations::open_features(&opt.features)?;
    build_index_from(opt, source)
}

/// [`build_index`] reading the clips' features from `source` (`opt.features` only names it;
/// `ClipList::All` still lists clips under it).
pub fn build_index_from(opt: &IndexOptions, source: Arc<dyn FeatureSource>) -> Result<IndexSummary> {
    build_index_on(&demovlp_model::Cpu, opt, source)
}

/// [`build_index_from`] with the clips embedded on the backend `be` (the model's weights are
/// copied there once; the index's bytes do not depend on the device beyond float round-off).
pub fn build_index_on<B: demovlp_model::Backend>(be: &B, opt: &IndexOptions, source: Arc<dyn FeatureSource>) -> Result<IndexSummary> {
    let t0 = Instant::now();
    let cpu = demovlp_train::weights::load_model(&opt.model).with_context(|| format!("loading model {}", opt.model.display()))?;
    let fingerprint = crate::store::fingerprint_f32(&cpu.params.data);
    let mut model = cpu.on_backend(be);
    drop(cpu);
    let mut clips = list_clips(&opt.clips, &opt.features)?;
    if let Some((i, n)) = opt.shard {
        clips = clips.into_iter().enumerate().filter(|(k, _)| k % n == i).map(|(_, c)| c).collect();
    }
    std::fs::create_dir_all(&opt.out).with_context(|| format!("creating {}", opt.out.display()))?;
    let max_text = model.config.text.max_position_embeddings;
    let existing = if Manifest::path(&opt.out).is_file() { Some(Manifest::read(&opt.out)?) } else { None };
    let r = resolve(&opt.model, opt.lambda, opt.masked_mean, opt.frames, opt.regions, opt.text_len, max_text)?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let (lambda, masked_mean) = (r.lambda, r.masked_mean);
    let model_abs = std::path::absolute(&opt.model).with_context(|| format!("resolving {}", opt.model.display()))?;
    let settings = Settings {
        model: model_abs.display().to_string(),
        tokenizer: opt
            .tokenizer
            .clone()
            .or(existing.as_ref().map(|m| m.settings.tokenizer.clone()))
            .unwrap_or_else(|| crate::text::BUILTIN.into()),
        text_len: opt.text_len.or(existing.as_ref().map(|m| m.settings.text_len)).unwrap_or(r.text_len),
        frames: opt.frames.or(existing.as_ref().map(|m| m.settings.frames)).unwrap_or(r.frames),
        regions: opt.regions.or(existing.as_ref().map(|m| m.settings.regions)).unwrap_or(r.regions),
        proj_dim: model.config.proj_dim,
        lambda,
        masked_mean,
        local_dtype: if opt.fp32 { "f32" } else { "f16" }.into(),
        loss_from: Some(r.from.clone()),
        use_local: r.use_local,
        shape_from: Some(r.shape_from.clone()),
        model_fingerprint: Some(fingerprint),
        annotations: match &opt.clips {
            ClipList::Annotations { path, layout } => vec![crate::captions::AnnotationSource {
                path: std::path::absolute(path).unwrap_or_else(|_| path.clone()).display().to_string(),
                layout: layout.clone(),
            }],
            _ => vec![],
        },
    };
    if !settings.use_local {
        eprintln!("note: the model was trained without the region-word loss ({}); the index ranks by the global embedding alone", r.from);
    }
    if settings.text_len < 2 || settings.text_len > max_text {
        bail!("--text-len {}: the model has {max_text} text positions (need 2 ≤ L ≤ {max_text})", settings.text_len);
    }
    if settings.frames > model.config.video.max_frames {
        bail!("--frames {}: the model was built for at most {} frames", settings.frames, model.config.video.max_frames);
    }
    crate::text::load_tokenizer(&settings.tokenizer).with_context(|| format!("--tokenizer {}", settings.tokenizer))?;
    let mut manifest = match existing {
        Some(m) => {
            let (a, b) = (&m.settings, &settings);
            check_same_model(a, b, &opt.out)?;
            if (a.tokenizer.as_str(), a.text_len, a.frames, a.regions, a.proj_dim, a.local_dtype.as_str())
                != (b.tokenizer.as_str(), b.text_len, b.frames, b.regions, b.proj_dim, b.local_dtype.as_str())
            {
                bail!("{}: the existing index was built with other settings ({a:?}); this run asks for {b:?}", opt.out.display());
            }
            if (a.lambda, a.masked_mean) != (b.lambda, b.masked_mean) {
                eprintln!(
                    "warning: {} keeps the λ {} / masked-mean {} it was built with (this run would use {} / {}); \
                     search --lambda / --masked-mean override them per query",
                    opt.out.display(),
                    a.lambda,
                    a.masked_mean,
                    b.lambda,
                    b.masked_mean
                );
            }
            clean_strays(&opt.out, &m)?;
            let mut m = m;
            crate::captions::union(&mut m.settings.annotations, &b.annotations);
            m
        }
        None => Manifest {
            format: FORMAT.into(),
            version: VERSION,
            settings: settings.clone(),
            segments: vec![],
            clips: 0,
            fp16_max_rel_err: 0.0,
        },
    };
    let have: HashSet<String> =
        if manifest.segments.is_empty() { HashSet::new() } else { Index::open(&opt.out)?.by_id.into_keys().collect() };
    let before = clips.len();
    clips.retain(|c| !have.contains(c));
    let mut sum = IndexSummary { already_indexed: before - clips.len(), ..Default::default() };
    let shape = InputShape { frames: settings.frames, regions: settings.regions, text_len: settings.text_len };
    let total = clips.len();
    let mut done = 0;
    // On a terminal one line redrawn in place; otherwise (a batch job's log) a plain line
    // every few seconds.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line: Option<Instant> = None;
    for seg_clips in clips.chunks(opt.segment_clips.max(1)) {
        let mut data = SegmentData::default();
        for b in seg_clips.chunks(opt.batch_size.max(1)) {
            embed_clips(&mut model, source.as_ref(), b, shape, &mut data, &mut sum.skipped);
            done += b.len();
            if opt.progress {
                let el = t0.elapsed().as_secs_f64();
                let line =
                    format!("indexing: {done}/{total} clips, {:.1} clips/s, {} skipped", done as f64 / el.max(1e-9), sum.skipped.len());
                if tty {
                    eprint!("\r{line}   ");
                } else if done == total || last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= demovlp_data::plain_progress_interval()) {
                    eprintln!("{line}");
                    last_line = Some(Instant::now());
                }
            }
        }
        if !data.clips.is_empty() {
            let name = (manifest.segments.len()..).map(segment_name).find(|n| !opt.out.join(n).exists()).unwrap();
            let (bytes, err) = write_segment(&opt.out, &name, &settings, &data)?;
            manifest.segments.push(name);
            manifest.clips += data.clips.len();
            manifest.fp16_max_rel_err = manifest.fp16_max_rel_err.max(err);
            manifest.write(&opt.out)?;
            sum.clips += data.clips.len();
            sum.bytes += bytes;
            sum.fp16_max_rel_err = sum.fp16_max_rel_err.max(err);
        }
        if opt.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            sum.interrupted = true;
            break;
        }
    }
    if manifest.segments.is_empty() {
        manifest.write(&opt.out)?;
    }
    if opt.progress && total > 0 && tty {
        eprintln!();
    }
    sum.total_clips = manifest.clips;
    sum.seconds = t0.elapsed().as_secs_f64();
    Ok(sum)
}

/// Builds and saves the ANN graph (`ann.usearch`) when the index at `dir` has at least
/// `threshold` clips and has no current one; returns the seconds it took (None: below the
/// threshold, nothing to do). What `index` and `index-merge` run at the end.
pub fn ensure_ann(dir: &Path, threshold: usize) -> Result<Option<f64>> {
    let idx = Index::open(dir)?;
    if idx.len() < threshold {
        return Ok(None);
    }
    let t = Instant::now();
    crate::ann::Ann::load_or_build(&idx)?;
    Ok(Some(t.elapsed().as_secs_f64()))
}

/// Combines indexes built with the same settings (e.g. the `--shard i/n` parts) into `out`:
/// segments are hard-linked (copied across file systems), clip ids must be disjoint. Then,
/// when the merged index has at least `exact_threshold` clips, its ANN graph is built (as
/// `index` does), so `search` does not build it on every start.
pub fn merge(inputs: &[PathBuf], out: &Path, exact_threshold: usize) -> Result<Manifest> {
    if inputs.is_empty() {
        bail!("merge: no input indexes");
    }
    if Manifest::path(out).exists() {
        bail!("{}: already an index; merge writes a new one", out.display());
    }
    let mut seen = HashSet::new();
    let mut m: Option<Manifest> = None;
    std::fs::create_dir_all(out)?;
    for dir in inputs {
        let idx = Index::open(dir)?;
        let s = &idx.manifest.settings;
        let mm = m.get_or_insert_with(|| Manifest {
            format: FORMAT.into(),
            version: VERSION,
            settings: s.clone(),
            segments: vec![],
            clips: 0,
            fp16_max_rel_err: 0.0,
        });
        let (a, b) = (&mm.settings, s);
        check_same_model(a, b, dir)?;
        if (a.tokenizer.as_str(), a.text_len, a.frames, a.regions, a.proj_dim, a.local_dtype.as_str())
            != (b.tokenizer.as_str(), b.text_len, b.frames, b.regions, b.proj_dim, b.local_dtype.as_str())
            || (a.lambda, a.masked_mean) != (b.lambda, b.masked_mean)
        {
            bail!("{}: built with other settings than {} ({b:?} vs {a:?})", dir.display(), inputs[0].display());
        }
        crate::captions::union(&mut mm.settings.annotations, &b.annotations);
        for c in idx.by_id.keys() {
            if !seen.insert(c.clone()) {
                bail!("merge: clip {c:?} is in more than one input (second: {})", dir.display());
            }
        }
        for seg in &idx.manifest.segments {
            let name = segment_name(mm.segments.len());
            let (src, tmp) = (dir.join(seg), out.join(format!("{name}.tmp")));
            std::fs::create_dir_all(&tmp)?;
            for e in std::fs::read_dir(&src)? {
                let e = e?;
                let to = tmp.join(e.file_name());
                if std::fs::hard_link(e.path(), &to).is_err() {
                    std::fs::copy(e.path(), &to).with_context(|| format!("copying {}", e.path().display()))?;
                }
            }
            std::fs::rename(&tmp, out.join(&name))?;
            mm.segments.push(name);
        }
        mm.clips += idx.len();
        mm.fp16_max_rel_err = mm.fp16_max_rel_err.max(idx.manifest.fp16_max_rel_err);
    }
    let m = m.unwrap();
    m.write(out)?;
    if let Some(s) = ensure_ann(out, exact_threshold)? {
        eprintln!("ANN graph over {} clips ready in {s:.1} s", m.clips);
    }
    Ok(m)
}
