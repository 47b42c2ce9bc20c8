//! Decoding with the `ffmpeg` program (a run-time need of `extract` only; Debian's `ffmpeg`
//! package provides `ffmpeg` and `ffprobe`).
//!
//! A video is read in two passes. `ffprobe -count_frames` decodes the first video stream
//! and counts its frames (container frame counts can be wrong); the uniform sample is then
//! the middle frame of each of `k` equal segments, as the published loaders choose them
//! ([`demovlp_data::regions::segment_bounds`]). A second pass decodes again and keeps just
//! those frames (the `select` filter on the decoded frame number), written to a pipe as
//! binary PPM: each frame carries its own size, so rotated videos (ffmpeg applies the
//! rotation) and mid-stream size changes need no guessing. PPM is RGB; the channels are
//! swapped to the BGR the detector expects. Still images go through the same path.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use demovlp_data::regions::segment_bounds;

use crate::image::Frame;

/// Whether `ffmpeg` and `ffprobe` can be run; the error says how to install them.
pub fn check_ffmpeg() -> Result<()> {
    for prog in ["ffmpeg", "ffprobe"] {
        let ok = Command::new(prog).arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        match ok {
            Ok(s) if s.success() => {}
            _ => bail!(
                "the `{prog}` program is not available: `demovlp extract` decodes videos and images with ffmpeg \
                 (Debian/Ubuntu: `apt-get install ffmpeg`; macOS: `brew install ffmpeg`)"
            ),
        }
    }
    Ok(())
}

/// The last meaningful line of a tool's stderr (for error messages).
fn last_line(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim().to_string()
}

/// Number of decodable frames of the first video stream.
pub fn count_frames(path: &Path) -> Result<usize> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{}: cannot run ffprobe", path.display()))?;
    if !out.status.success() {
        bail!("{}: ffprobe cannot read it: {}", path.display(), last_line(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    match first.map(|l| l.trim_end_matches(',').parse::<usize>()) {
        Some(Ok(n)) if n > 0 => Ok(n),
        Some(Ok(_)) => bail!("{}: no decodable video frames", path.display()),
        _ => bail!(
            "{}: no video stream ({})",
            path.display(),
            if first.is_none() { last_line(&out.stderr) } else { text.trim().to_string() }
        ),
    }
}

/// The sampled frame indices: the middle of each of `k` segments (fewer when the video
/// has fewer frames).
pub fn sample_indices(frames: usize, k: usize) -> Vec<usize> {
    segment_bounds(frames, k).windows(2).map(|w| (w[0] + w[1] - 1) / 2).collect()
}

/// Reads one binary PPM (P6, maxval 255) from `r`; None at a clean end of stream.
fn read_ppm(r: &mut impl BufRead) -> Result<Option<Frame>> {
    let mut fields: Vec<usize> = Vec::new();
    let mut magic = [0u8; 2];
    match r.read(&mut magic[..1])? {
        0 => return Ok(None),
        _ => r.read_exact(&mut magic[1..])?,
    }
    if &magic != b"P6" {
        bail!("decoder output is not a PPM frame");
    }
    let mut tok = Vec::new();
    while fields.len() < 3 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        match b[0] {
            b'#' => {
                let mut skip = Vec::new();
                r.read_until(b'\n', &mut skip)?;
            }
            c if c.is_ascii_whitespace() => {
                if !tok.is_empty() {
                    fields.push(std::str::from_utf8(&tok)?.parse()?);
                    tok.clear();
                }
            }
            c => tok.push(c),
        }
    }
    // The single whitespace after maxval was consumed by the loop.
    let (w, h, maxval) = (fields[0], fields[1], fields[2]);
    if maxval != 255 || w == 0 || h == 0 {
        bail!("unsupported PPM frame {w}x{h} maxval {maxval}");
    }
    let mut rgb = vec![0u8; w * h * 3];
    r.read_exact(&mut rgb)?;
    for px in rgb.chunks_exact_mut(3) {
        px.swap(0, 2);
    }
    Ok(Some(Frame { h, w, bgr: rgb }))
}

/// Decodes frames `indices` (ascending decoded-frame numbers) of `path`; `None` decodes
/// the first frame of a still image. Errors name the file.
pub fn decode(path: &Path, indices: Option<&[usize]>) -> Result<Vec<Frame>> {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-v", "error", "-nostdin", "-i"]).arg(path).args(["-map", "0:v:0"]);
    let want = match indices {
        Some(ix) => {
            let expr: Vec<String> = ix.iter().map(|i| format!("eq(n\\,{i})")).collect();
            cmd.args(["-vf", &format!("select='{}'", expr.join("+")), "-fps_mode", "passthrough"]);
            ix.len()
        }
        None => {
            cmd.args(["-frames:v", "1"]);
            1
        }
    };
    cmd.args(["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "pipe:1"]);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{}: cannot run ffmpeg", path.display()))?;
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut e = Vec::new();
        stderr.read_to_end(&mut e).ok();
        e
    });
    let mut out = BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());
    let mut frames = Vec::with_capacity(want);
    let read = (|| -> Result<()> {
        while let Some(f) = read_ppm(&mut out)? {
            frames.push(f);
            if frames.len() > want {
                bail!("ffmpeg returned more frames than asked for");
            }
        }
        Ok(())
    })();
    drop(out);
    let status = child.wait().with_context(|| format!("{}: ffmpeg did not finish", path.display()))?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        bail!("{}: ffmpeg cannot decode it: {}", path.display(), last_line(&err));
    }
    read.with_context(|| format!("{}: reading ffmpeg's output", path.display()))?;
    if frames.len() != want {
        bail!("{}: decoded {} of the {want} sampled frames (the stream ends early or is damaged)", path.display(), frames.len());
    }
    Ok(frames)
}

/// The uniform sample of `k` frames of a video.
pub fn sample_video(path: &Path, k: usize) -> Result<(usize, Vec<Frame>)> {
    let n = count_frames(path)?;
    let ix = sample_indices(n, k);
    Ok((n, decode(path, Some(&ix))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_middles() {
        assert_eq!(sample_indices(80, 8), vec![4, 14, 24, 34, 44, 54, 64, 74]);
        assert_eq!(sample_indices(3, 8), vec![0, 1, 2]);
        assert_eq!(sample_indices(10, 4), vec![0, 3, 5, 8]);
    }

    #[test]
    fn ppm_frames_are_read_as_bgr() {
        let mut bytes = b"P6\n# c\n2 1\n255\n".to_vec();
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        bytes.extend_from_slice(b"P6 1 1 255 ");
        bytes.extend_from_slice(&[7, 8, 9]);
        let mut r = std::io::Cursor::new(bytes);
        let a = read_ppm(&mut r).unwrap().unwrap();
        assert_eq!((a.h, a.w, a.bgr.clone()), (1, 2, vec![3, 2, 1, 6, 5, 4]));
        let b = read_ppm(&mut r).unwrap().unwrap();
        assert_eq!(b.bgr, vec![9, 8, 7]);
        assert!(read_ppm(&mut r).unwrap().is_none());
    }
}
