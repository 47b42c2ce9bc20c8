//! The extraction driver: a folder of videos (recursively), a list file of videos, or a
//! folder of still images → `<out>/<clip>/<i>.npz`, clip = the path relative to the folder
//! without its extension.
//!
//! Frames stream through: a decoder thread runs ffmpeg ahead (at most two clips of
//! decoded frames wait), the detector takes the other cores. Each clip is written
//! atomically ([`crate::output::ClipWriter`]), so a rerun skips the clips already there.
//! A file ffmpeg cannot decode is an error naming it, or with `skip_bad` a counted skip.
//! Progress goes to stderr: one line per clip with frames/s and the ETA (rewritten in place
//! on a terminal).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use demovlp_model::Backend;

use crate::detector::Detector;
use crate::image::Frame;
use crate::output::ClipWriter;
use crate::video;

/// File extensions taken as videos.
pub const VIDEO_EXTS: &[&str] = &["mp4", "webm", "avi", "mkv", "gif", "mov", "m4v", "mpg", "mpeg", "flv", "wmv", "ogv", "3gp", "ts"];
/// File extensions taken as still images.
pub const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "bmp", "webp"];

/// What to read.
#[derive(Clone, Debug)]
pub enum Source {
    /// A folder of videos (recursively), or a text file listing video paths (one per line,
    /// relative to the list's folder or absolute).
    Videos(PathBuf),
    /// A folder of still images (recursively): one frame each.
    Images(PathBuf),
}

/// How to extract.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Frames sampled per video (segment middles).
    pub frames: usize,
    /// Count undecodable files and go on, instead of stopping at the first.
    pub skip_bad: bool,
    /// Keep each sampled frame as `<i>.jpg` (at most 320 pixels wide) beside its `.npz`.
    pub thumbnails: bool,
    /// Print progress lines to stderr.
    pub progress: bool,
}

/// One clip to extract.
#[derive(Clone, Debug)]
pub struct Job {
    pub clip: String,
    pub path: PathBuf,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub clips: usize,
    pub extracted: usize,
    pub skipped_existing: usize,
    pub skipped_bad: usize,
    pub frames: usize,
    pub regions: usize,
    pub seconds: f64,
    /// (file, error) of each skipped file.
    pub bad: Vec<(String, String)>,
}

impl Summary {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "clips": self.clips,
            "extracted": self.extracted,
            "skipped_existing": self.skipped_existing,
            "skipped_bad": self.skipped_bad,
            "frames": self.frames,
            "regions": self.regions,
            "seconds": self.seconds,
            "frames_per_s": if self.seconds > 0.0 { self.frames as f64 / self.seconds } else { 0.0 },
            "bad": self.bad.iter().map(|(f, e)| serde_json::json!({"file": f, "error": e})).collect::<Vec<_>>(),
        })
    }
}

fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if p.is_dir() {
            walk(&p, exts, out)?;
        } else if p.extension().is_some_and(|x| exts.contains(&x.to_string_lossy().to_ascii_lowercase().as_str())) {
            out.push(p);
        }
    }
    Ok(())
}

/// `rel` without its extension, `/`-separated.
fn clip_name(rel: &Path) -> String {
    rel.with_extension("").components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

/// The clips of a source, in a stable order. Two files that would make the same clip
/// (`a.mp4` and `a.webm`) are an error.
pub fn list_jobs(src: &Source) -> Result<Vec<Job>> {
    let (root, exts) = match src {
        Source::Videos(p) | Source::Images(p) if !p.exists() => bail!("{}: no such file or folder", p.display()),
        Source::Videos(p) if p.is_file() => {
            let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read the list", p.display()))?;
            let base = p.parent().unwrap_or(Path::new("."));
            let mut jobs = Vec::new();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let rel = Path::new(line);
                let path = if rel.is_absolute() { rel.to_path_buf() } else { base.join(rel) };
                let name = if rel.is_absolute() { rel.file_name().map(PathBuf::from).unwrap_or_default() } else { rel.to_path_buf() };
                jobs.push(Job { clip: clip_name(&name), path });
            }
            return check_unique(jobs);
        }
        Source::Videos(p) => (p, VIDEO_EXTS),
        Source::Images(p) => (p, IMAGE_EXTS),
    };
    let mut files = Vec::new();
    walk(root, exts, &mut files)?;
    let jobs = files.into_iter().map(|f| Job { clip: clip_name(f.strip_prefix(root).unwrap_or(&f)), path: f }).collect();
    check_unique(jobs)
}

fn check_unique(jobs: Vec<Job>) -> Result<Vec<Job>> {
    let mut seen = std::collections::HashMap::new();
    for j in &jobs {
        if let Some(prev) = seen.insert(j.clip.clone(), j.path.clone()) {
            bail!("{} and {} would both be clip {:?}: rename one", prev.display(), j.path.display(), j.clip);
        }
    }
    Ok(jobs)
}

/// Writes `frame` as a JPEG at most 320 pixels wide.
fn write_thumbnail(frame: &Frame, path: &Path) -> Result<()> {
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", &format!("{}x{}", frame.w, frame.h), "-i", "pipe:0"])
        .args(["-vf", "scale='min(320,iw)':-2", "-frames:v", "1", "-q:v", "4"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run ffmpeg for a thumbnail")?;
    child.stdin.take().unwrap().write_all(&frame.bgr).context("writing a thumbnail frame to ffmpeg")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{}: ffmpeg cannot write the thumbnail: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Extracts every clip of `src` not yet in `out`.
pub fn extract<B: Backend>(det: &Detector<B>, src: &Source, out: &Path, opt: &ExtractOptions) -> Result<Summary> {
    video::check_ffmpeg()?;
    let images = matches!(src, Source::Images(_));
    let all = list_jobs(src)?;
    if all.is_empty() {
        let what = if images { format!("images ({})", IMAGE_EXTS.join(", ")) } else { format!("videos ({})", VIDEO_EXTS.join(", ")) };
        let dir = match src {
            Source::Videos(p) | Source::Images(p) => p,
        };
        bail!("{}: no {what} found", dir.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut sum = Summary { clips: all.len(), ..Default::default() };
    let todo: Vec<Job> = all.into_iter().filter(|j| !out.join(&j.clip).is_dir()).collect();
    sum.skipped_existing = sum.clips - todo.len();
    let per_clip = if images { 1 } else { opt.frames };
    let total_frames = todo.len() * per_clip;
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let frames = opt.frames;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Job, Result<Vec<Frame>>)>(2);
    let jobs = todo.clone();
    let decoder = std::thread::spawn(move || {
        for j in jobs {
            let r = if images { video::decode(&j.path, None) } else { video::sample_video(&j.path, frames).map(|(_, f)| f) };
            if tx.send((j, r)).is_err() {
                break;
            }
        }
    });
    let mut done_frames = 0usize;
    let result = (|| -> Result<()> {
        for (n, (job, decoded)) in rx.iter().enumerate() {
            let frames = match decoded {
                Ok(f) => f,
                Err(e) if opt.skip_bad => {
                    sum.skipped_bad += 1;
                    sum.bad.push((job.path.display().to_string(), format!("{e:#}")));
                    if opt.progress {
                        eprintln!("extract: skipped {}: {e:#}", job.path.display());
                    }
                    continue;
                }
                Err(e) => return Err(e.context("stopping (pass --skip-bad to count such files and go on)")),
            };
            let dest = out.join(&job.clip);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
            }
            let w = ClipWriter::start(&dest)?;
            for (i, f) in frames.iter().enumerate() {
                let r = det.detect(f);
                sum.regions += r.len();
                w.frame(i, &r, &i.to_string())?;
                if opt.thumbnails {
                    write_thumbnail(f, &w.dir().join(format!("{i}.jpg")))?;
                }
                done_frames += 1;
            }
            w.finish()?;
            sum.extracted += 1;
            sum.frames += frames.len();
            if opt.progress {
                let el = start.elapsed().as_secs_f64();
                let rate = done_frames as f64 / el.max(1e-9);
                let left = total_frames.saturating_sub(done_frames + (sum.skipped_bad * per_clip));
                let eta = if rate > 0.0 { left as f64 / rate } else { 0.0 };
                let line = format!(
                    "extract: {}/{} clips, {done_frames} frames, {rate:.2} frames/s, elapsed {}, ETA {}",
                    n + 1,
                    todo.len(),
                    fmt_secs(el),
                    fmt_secs(eta)
                );
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
        }
        Ok(())
    })();
    drop(rx);
    decoder.join().ok();
    if opt.progress && tty && done_frames > 0 {
        eprintln!();
    }
    result?;
    sum.seconds = start.elapsed().as_secs_f64();
    Ok(sum)
}
