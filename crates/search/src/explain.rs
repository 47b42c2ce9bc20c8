//! Explanations: for one clip and one text, the region-word alignment of the pair — per
//! word the regions it attends to (the focal-kept, renormalised word→region weights of
//! SPEC §6) and per region the word it attends to most (region→word) — and an SVG of it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use demovlp_model::Model;
use demovlp_retrieval::local::{is_real, LEAKY_SLOPE, NORM_EPS};
use serde::Serialize;

use crate::search::{Engine, TextQuery};

#[derive(Clone, Debug, Serialize)]
pub struct RegionWeight {
    /// The frame index of the clip (the `<i>.npz` number).
    pub frame: i32,
    /// Panel (sampled frame slot) and region slot within it.
    pub panel: usize,
    pub region: usize,
    /// (x1, y1, x2, y2) as fractions of the image size.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub weight: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct WordRegions {
    pub word: String,
    /// Position among the text's tokens after [CLS].
    pub position: usize,
    /// Regions with a non-zero attention weight, heaviest first (weights sum to 1).
    pub regions: Vec<RegionWeight>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RegionWord {
    pub frame: i32,
    pub panel: usize,
    pub region: usize,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// The word this region attends to most (region→word).
    pub word: String,
    pub word_weight: f32,
    /// The largest word→region weight any word gives this region.
    pub alignment: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub clip: String,
    pub query: String,
    pub score: f32,
    pub global: f32,
    pub local: f32,
    /// word→region and region→word similarities (local = s1 + s2).
    pub s1: f32,
    pub s2: f32,
    pub frames: Vec<i32>,
    pub regions_per_frame: usize,
    pub words: Vec<WordRegions>,
    pub regions: Vec<RegionWord>,
}

/// One attend direction (queries × contexts), as `demovlp_retrieval::local` computes it:
/// returns the kept, renormalised weights `[lq, lc]` and the direction's similarity.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    d: &[f32],
    lq: usize,
    lc: usize,
    q_raw: &[f32],
    mq: &[f32],
    mc: &[f32],
    c_hat: &[f32],
    dim: usize,
    lambda: f32,
    masked_mean: bool,
) -> (Vec<f32>, f32) {
    let leaky: Vec<f32> = d.iter().map(|&v| if v > 0.0 { v } else { LEAKY_SLOPE * v }).collect();
    let mut colnorm = vec![0f32; lc];
    for l in 0..lq {
        for s in 0..lc {
            colnorm[s] += leaky[l * lc + s] * leaky[l * lc + s];
        }
    }
    colnorm.iter_mut().for_each(|n| *n = n.sqrt() + NORM_EPS);
    let mut r = vec![0f32; lq * lc];
    let (mut sum, mut n_real) = (0f32, 0usize);
    for l in 0..lq {
        let z: Vec<f32> = (0..lc).map(|s| ((leaky[l * lc + s] / colnorm[s] + mq[l]) + mc[s]) * lambda).collect();
        let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f32> = z.iter().map(|&v| (v - mx).exp()).collect();
        let tot: f32 = e.iter().sum();
        let p: Vec<f32> = e.iter().map(|v| v / tot).collect();
        let total: f32 = p.iter().sum();
        let row = &mut r[l * lc..(l + 1) * lc];
        let mut kept = 0f32;
        for s in 0..lc {
            if demovlp_retrieval::rows::focal_keep(p[s], lc as f32, total) {
                row[s] = p[s];
                kept += p[s];
            }
        }
        if kept > 0.0 {
            row.iter_mut().for_each(|w| *w /= kept);
        }
        let mut wc = vec![0f32; dim];
        for s in 0..lc {
            if row[s] != 0.0 {
                for k in 0..dim {
                    wc[k] += row[s] * c_hat[s * dim + k];
                }
            }
        }
        let q = &q_raw[l * dim..(l + 1) * dim];
        let u: f32 = q.iter().zip(&wc).map(|(a, b)| a * b).sum();
        let (qn, wn) = (norm(q), norm(&wc));
        let c = u / (qn * wn).max(NORM_EPS);
        if !masked_mean || is_real(mq[l]) {
            sum += c;
            n_real += 1;
        }
    }
    let sim = if masked_mean {
        if n_real == 0 {
            0.0
        } else {
            sum / n_real as f32
        }
    } else {
        sum / lq as f32
    };
    (r, sim)
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn hat(raw: &[f32], dim: usize) -> Vec<f32> {
    let mut h = raw.to_vec();
    for row in h.chunks_exact_mut(dim) {
        let n = norm(row) + NORM_EPS;
        row.iter_mut().for_each(|x| *x /= n);
    }
    h
}

impl Engine {
    pub fn explain(&self, model: &mut Model, clip: &str, text: &str) -> Result<Explanation> {
        let q = self.embed_query(model, text)?;
        self.explain_embedded(&q, clip)
    }

    pub fn explain_embedded(&self, q: &TextQuery, clip: &str) -> Result<Explanation> {
        let Some(&ci) = self.index.by_id.get(clip) else { bail!("unknown clip {clip:?}") };
        let st = self.index.settings();
        let (p, n, w) = (st.proj_dim, st.locals(), q.mask_additive.len());
        let mut vl = Vec::with_capacity(n * p);
        self.index.local_into(ci, &mut vl);
        let mut vm = Vec::with_capacity(n);
        self.index.mask_additive_into(ci, &mut vm);
        let (th, vh) = (hat(&q.local, p), hat(&vl, p));
        let mut m = vec![0f32; w * n];
        for i in 0..w {
            for j in 0..n {
                m[i * n + j] = crate::ann::dot(&th[i * p..(i + 1) * p], &vh[j * p..(j + 1) * p]);
            }
        }
        let mut mt = vec![0f32; n * w];
        for i in 0..w {
            for j in 0..n {
                mt[j * w + i] = m[i * n + j];
            }
        }
        let (r1, s1) = attend(&m, w, n, &q.local, &q.mask_additive, &vm, &vh, p, st.lambda, st.masked_mean);
        let (r2, s2) = attend(&mt, n, w, &vl, &vm, &q.mask_additive, &th, p, st.lambda, st.masked_mean);
        let (g, l) = self.rerank_scores(q, &[ci])[0];
        let frames = self.index.frames(ci).to_vec();
        let boxes = self.index.boxes(ci);
        let mask = self.index.mask(ci);
        let word = |pos: usize| -> String {
            let id = q.ids.get(pos + 1).copied().unwrap_or(0) as usize;
            self.vocab.get(id).cloned().unwrap_or_else(|| format!("[{id}]"))
        };
        let rr = st.regions;
        let bx = |j: usize| [boxes[j * 4], boxes[j * 4 + 1], boxes[j * 4 + 2], boxes[j * 4 + 3]];
        let real_word = |i: usize| is_real(q.mask_additive[i]) && !matches!(word(i).as_str(), "[SEP]" | "[CLS]" | "[PAD]");
        let mut words = Vec::new();
        for i in (0..w).filter(|&i| real_word(i)) {
            let mut regs: Vec<RegionWeight> = (0..n)
                .filter(|&j| r1[i * n + j] > 0.0 && mask[j] != 0)
                .map(|j| RegionWeight { frame: frames[j / rr], panel: j / rr, region: j % rr, bbox: bx(j), weight: r1[i * n + j] })
                .collect();
            regs.sort_by(|a, b| b.weight.total_cmp(&a.weight));
            words.push(WordRegions { word: word(i), position: i, regions: regs });
        }
        let mut regions = Vec::new();
        for j in (0..n).filter(|&j| mask[j] != 0) {
            let best = (0..w).filter(|&i| real_word(i)).max_by(|&a, &b| r2[j * w + a].total_cmp(&r2[j * w + b]));
            let Some(bi) = best else { continue };
            let alignment = (0..w).filter(|&i| real_word(i)).map(|i| r1[i * n + j]).fold(0f32, f32::max);
            regions.push(RegionWord {
                frame: frames[j / rr],
                panel: j / rr,
                region: j % rr,
                bbox: bx(j),
                word: word(bi),
                word_weight: r2[j * w + bi],
                alignment,
            });
        }
        Ok(Explanation {
            clip: clip.into(),
            query: q.text.clone(),
            score: g + l,
            global: g,
            local: l,
            s1,
            s2,
            frames,
            regions_per_frame: rr,
            words,
            regions,
        })
    }
}

const PALETTE: [&str; 10] = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990", "#800000"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            s.push(if k <= c.len() { T[(n >> (18 - 6 * k) & 63) as usize] as char } else { '=' });
        }
    }
    s
}

/// A frame picture's file under `dir`: `<dir>/<clip>/<frame>.{jpg,jpeg,png}` or
/// `<dir>/<frame>.{...}`, with its MIME type.
pub fn frame_file(dir: &Path, clip: &str, frame: i32) -> Option<(std::path::PathBuf, &'static str)> {
    for base in [dir.join(clip), dir.to_path_buf()] {
        for (ext, mime) in [("jpg", "image/jpeg"), ("jpeg", "image/jpeg"), ("png", "image/png")] {
            let p = base.join(format!("{frame}.{ext}"));
            if p.is_file() {
                return Some((p, mime));
            }
        }
    }
    None
}

/// [`frame_file`] as a `data:` URI.
fn frame_image(dir: &Path, clip: &str, frame: i32) -> Option<String> {
    let (p, mime) = frame_file(dir, clip, frame)?;
    let b = std::fs::read(p).ok()?;
    Some(format!("data:{mime};base64,{}", base64(&b)))
}

/// Text drawn over a picture: a white halo under the letters keeps them readable on any
/// background.
const HALO: &str = r##"stroke="#ffffff" stroke-width="3" stroke-linejoin="round" paint-order="stroke""##;

/// The explanation as an SVG: one panel per sampled frame, every real region's box drawn
/// and labelled by its best word (colour per word), line width by its alignment weight.
pub fn svg(e: &Explanation, images: Option<&Path>) -> Result<String> {
    let (pw, ph, gap, top) = (320.0f32, 240.0f32, 12.0f32, 48.0f32);
    let panels: Vec<(usize, i32)> = e.frames.iter().copied().enumerate().filter(|(_, f)| *f >= 0).collect();
    let width = gap + panels.len().max(1) as f32 * (pw + gap);
    let height = top + ph + gap + 40.0;
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    )?;
    writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##)?;
    writeln!(s, r##"<text x="{gap}" y="20" font-size="15" fill="#222">{}  —  clip {}</text>"##, esc(&e.query), esc(&e.clip))?;
    writeln!(
        s,
        r##"<text x="{gap}" y="38" font-size="12" fill="#555">score {:.4} = global {:.4} + local {:.4} (word→region {:.4}, region→word {:.4})</text>"##,
        e.score, e.global, e.local, e.s1, e.s2
    )?;
    let colour: std::collections::HashMap<&str, &str> =
        e.words.iter().enumerate().map(|(i, w)| (w.word.as_str(), PALETTE[i % PALETTE.len()])).collect();
    for (k, &(panel, frame)) in panels.iter().enumerate() {
        let x0 = gap + k as f32 * (pw + gap);
        writeln!(s, r#"<g class="panel" data-frame="{frame}">"#)?;
        match images.and_then(|d| frame_image(d, &e.clip, frame)) {
            Some(href) => {
                writeln!(s, r#"<image x="{x0}" y="{top}" width="{pw}" height="{ph}" preserveAspectRatio="none" href="{href}"/>"#)?
            }
            None => writeln!(s, r##"<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="#f0f0f0" stroke="#999"/>"##)?,
        }
        writeln!(s, r##"<text x="{x0}" y="{}" font-size="11" fill="#333">frame {frame}</text>"##, top + ph + 14.0)?;
        let mut regs: Vec<&RegionWord> = e.regions.iter().filter(|r| r.panel == panel).collect();
        regs.sort_by(|a, b| a.alignment.total_cmp(&b.alignment));
        for r in regs {
            let [x1, y1, x2, y2] = r.bbox.map(|v| v.clamp(0.0, 1.0));
            let (bx, by, bw, bh) = (x0 + x1 * pw, top + y1 * ph, (x2 - x1) * pw, (y2 - y1) * ph);
            let c = colour.get(r.word.as_str()).copied().unwrap_or("#888");
            let sw = 0.5 + 6.0 * r.alignment;
            let op = 0.35 + 0.65 * r.alignment.min(1.0);
            writeln!(
                s,
                r#"<rect class="region" x="{bx:.1}" y="{by:.1}" width="{bw:.1}" height="{bh:.1}" fill="none" stroke="{c}" stroke-width="{sw:.2}" stroke-opacity="{op:.2}"><title>{} ({:.3})</title></rect>"#,
                esc(&r.word),
                r.alignment
            )?;
            if r.alignment > 0.0 {
                writeln!(
                    s,
                    r#"<text class="label" x="{:.1}" y="{:.1}" font-size="12" font-weight="600" fill="{c}" {HALO}>{}</text>"#,
                    bx + 3.0,
                    by + 13.0,
                    esc(&r.word)
                )?;
            }
        }
        writeln!(s, "</g>")?;
    }
    let mut x = gap;
    for w in &e.words {
        let c = colour.get(w.word.as_str()).copied().unwrap_or("#888");
        writeln!(
            s,
            r#"<text class="legend" x="{x:.1}" y="{:.1}" font-size="13" font-weight="600" fill="{c}">{}</text>"#,
            height - 10.0,
            esc(&w.word)
        )?;
        x += 9.5 * w.word.chars().count() as f32 + 12.0;
    }
    writeln!(s, "</svg>")?;
    Ok(s)
}

/// Writes the SVG (with frame images from `images` when given).
pub fn write_svg(e: &Explanation, images: Option<&Path>, out: &Path) -> Result<()> {
    std::fs::write(out, svg(e, images)?).with_context(|| format!("writing {}", out.display()))
}
