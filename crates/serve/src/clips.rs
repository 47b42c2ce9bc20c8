//! What the page shows for a clip besides its score: its caption (from the annotation files
//! the index was built from, or `--annotations`) and a thumbnail (its first sampled frame's
//! picture under `--images`).
//!
//! - `POST /api/clips` with `{"clips": [ID, ...]}` → `{"captions_from": [FILE, ...],
//!   "clips": [{"clip", "caption": TEXT | null, "thumbnail": URL | null}, ...]}`;
//! - `GET /api/thumbnail?clip=ID` → the picture (`image/jpeg` or `image/png`).

use std::path::Path;

use anyhow::Result;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use demovlp_search::captions::{self, AnnotationSource, Captions};
use demovlp_search::search::Engine;

use crate::error::{json_response, ApiError};
use crate::query::Params;
use crate::{read_json_body, Shared};

/// Most clips one `POST /api/clips` may ask about.
pub const MAX_CLIPS: usize = 200;

/// The captions for the index: from `annotations` when given (an error when it cannot be
/// read), else from the files recorded in the index (a warning for each unreadable one).
pub fn load_captions(engine: &Engine, annotations: Option<&Path>) -> Result<Captions> {
    if let Some(p) = annotations {
        let c = captions::load(&[AnnotationSource { path: std::path::absolute(p)?.display().to_string(), layout: None }]);
        if let Some(problem) = c.problems.first() {
            anyhow::bail!("--annotations {problem}");
        }
        return Ok(c);
    }
    let c = captions::load(&engine.index.settings().annotations);
    for p in &c.problems {
        eprintln!("warning: no captions from {p}");
    }
    Ok(c)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClipsBody {
    clips: Vec<String>,
}

fn thumbnail_url(clip: &str) -> String {
    let mut s = String::from("/api/thumbnail?clip=");
    for b in clip.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// The first sampled frame's picture of clip `i`, when `--images` holds one.
fn first_picture(app: &crate::App, i: usize) -> Option<(std::path::PathBuf, &'static str)> {
    let dir = app.opts.images.as_deref()?;
    let clip = app.engine.index.clip_id(i);
    app.engine.index.frames(i).iter().filter(|f| **f >= 0).find_map(|&f| demovlp_search::explain::frame_file(dir, clip, f))
}

pub async fn clips(State(app): Shared, headers: axum::http::HeaderMap, body: axum::body::Body) -> Result<Response, ApiError> {
    let b: ClipsBody = read_json_body(&headers, body, "/api/clips", "{\"clips\": [CLIP ID, ...]}").await?;
    if b.clips.len() > MAX_CLIPS {
        return Err(ApiError::bad_request(format!("{} clips asked for, at most {MAX_CLIPS}", b.clips.len())));
    }
    let mut out = Vec::with_capacity(b.clips.len());
    for clip in &b.clips {
        let Some(&i) = app.engine.index.by_id.get(clip) else {
            return Err(ApiError::not_found(format!("unknown clip {clip:?} (not in the index)")));
        };
        out.push(serde_json::json!({
            "clip": clip,
            "caption": app.captions.by_clip.get(clip),
            "thumbnail": first_picture(&app, i).map(|_| thumbnail_url(clip)),
        }));
    }
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "captions_from": app.captions.from, "clips": out })))
}

pub async fn thumbnail(State(app): Shared, uri: Uri) -> Result<Response, ApiError> {
    let p = Params::parse(uri.query(), &["clip"])?;
    let clip = p.get("clip").ok_or_else(|| ApiError::bad_request("missing parameter clip"))?.to_string();
    let Some(&i) = app.engine.index.by_id.get(&clip) else {
        return Err(ApiError::not_found(format!("unknown clip {clip:?} (not in the index)")));
    };
    if app.opts.images.is_none() {
        return Err(ApiError::not_found("no thumbnails: the server was started without --images"));
    }
    let Some((path, mime)) = first_picture(&app, i) else {
        return Err(ApiError::not_found(format!("no picture of clip {clip:?} under --images")));
    };
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display())))
        .await
        .map_err(|e| ApiError::internal(format!("reading the picture: {e}")))?
        .map_err(|e| ApiError::internal(format!("reading the picture {e}")))?;
    let mut r = (StatusCode::OK, bytes).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    Ok(r)
}
