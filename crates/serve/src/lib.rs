//! demovlp-serve: `demovlp serve` — an HTTP server (axum + tokio) over a search index.
//!
//! Routes (`GET`, and `POST /api/search`; every error the server returns is JSON
//! `{"error": "..."}` with a 4xx/5xx status — a route's, and a request head's refused before
//! any route runs ([`conn`]: URI too long, headers too large, malformed, too slow)):
//!
//! - `/api/search?q=TEXT[&k=10][&rerank=N]` → `{"query", "results": [{"clip", "score", "global", "local"}]}`,
//!   exactly what `demovlp search --json` prints; `POST /api/search` with the JSON body
//!   `{"q", "k"?, "rerank"?}` answers the same (the web page uses it);
//! - `/api/explain?clip=ID&q=TEXT[&format=json|svg]` → the explanation (`demovlp explain --json`)
//!   or its SVG; `/api/explain.svg?clip=ID&q=TEXT` → the SVG;
//! - `/api/health` → status, clips, model, uptime, workers, queue, request counts;
//! - `POST /api/clips` with `{"clips": [ID, ...]}` → each clip's caption and thumbnail URL, and
//!   `/api/thumbnail?clip=ID` → its first frame's picture (with `--images`);
//! - `/` → a small web page compiled into the binary (no external assets).
//!
//! The compute runs on a pool of worker threads ([`pool`]) behind a bounded queue (full →
//! 503 with `Retry-After`), with a per-request time limit (→ 504).

mod clips;
pub mod conn;
pub mod error;
pub mod pool;
pub mod query;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use demovlp_search::search::{Engine, FirstStage, DEFAULT_EXACT_THRESHOLD, MAX_QUERY_BYTES};
use serde::Serialize;

pub use error::ApiError;
use error::{json_response, panic_message};
use pool::{Hook, Output, Pool, SharedModel, Task};
pub use pool::{OnBackend, Placement, QueryModel};
use query::Params;

/// The web page: HTML, CSS and JavaScript in one file, compiled in.
pub const PAGE: &str = include_str!("page.html");

/// The page's Content-Security-Policy: nothing but this server (and inline code) is allowed.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const SVG_CSP: &str = "default-src 'none'; img-src data:; style-src 'unsafe-inline'";

#[derive(Clone)]
pub struct ServeOptions {
    pub index: PathBuf,
    /// The model (default: the one the index was built with).
    pub model: Option<PathBuf>,
    pub addr: SocketAddr,
    pub workers: usize,
    /// Requests that may wait for a worker; more are refused with 503.
    pub queue: usize,
    /// Per-request time limit, queueing included (→ 504).
    pub timeout: Duration,
    pub max_query_bytes: usize,
    pub default_k: usize,
    pub max_k: usize,
    /// Candidates re-ranked when the request does not say (`rerank=`), and the most allowed.
    pub rerank: usize,
    pub max_rerank: usize,
    /// Take `rerank` from the index's size instead ([`demovlp_search::search::default_rerank`]).
    pub rerank_auto: bool,
    pub exact_threshold: usize,
    /// Frame pictures for the SVG explanations (as `demovlp explain --images`).
    pub images: Option<PathBuf>,
    /// Where the text tower and the re-rank run (`None`: the CPU).
    pub device: Option<Arc<dyn Placement>>,
    /// The annotation file (or MSR-VTT metadata directory) to take the clips' captions from
    /// (default: the ones the index was built from).
    pub annotations: Option<PathBuf>,
    /// Limits on a request's head (target, header fields, arrival time), checked before
    /// hyper parses it.
    pub head_limits: conn::HeadLimits,
    /// Called by a worker with the query before computing (tests: slow work, panics).
    #[doc(hidden)]
    pub hook: Option<Hook>,
}

impl ServeOptions {
    pub fn new(index: PathBuf) -> ServeOptions {
        ServeOptions {
            index,
            model: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: default_workers(),
            queue: 64,
            timeout: Duration::from_secs(10),
            max_query_bytes: 1024,
            default_k: 10,
            max_k: 100,
            rerank: 100,
            max_rerank: 1000,
            rerank_auto: false,
            exact_threshold: DEFAULT_EXACT_THRESHOLD,
            images: None,
            device: None,
            annotations: None,
            head_limits: conn::HeadLimits::default(),
            hook: None,
        }
    }

    /// Where the text tower and the re-rank run, in words.
    pub fn device_name(&self) -> String {
        self.device.as_ref().map_or_else(|| "cpu".to_string(), |d| d.name())
    }

    fn check(&self) -> Result<()> {
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if self.max_query_bytes == 0 || self.max_query_bytes > MAX_QUERY_BYTES {
            bail!("--max-query-bytes must be from 1 to {MAX_QUERY_BYTES} (got {})", self.max_query_bytes);
        }
        if self.max_k == 0 || !(1..=self.max_k).contains(&self.default_k) {
            bail!("-k / --max-k: need 1 <= k <= max-k (got k {} and max-k {})", self.default_k, self.max_k);
        }
        if self.rerank > self.max_rerank {
            bail!("--rerank {} is above --max-rerank {}", self.rerank, self.max_rerank);
        }
        if self.timeout.is_zero() {
            bail!("--timeout-ms must be above 0");
        }
        Ok(())
    }
}

/// The default worker count: the cores, at most 4 (they share one copy of the model).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4)
}

#[derive(Default)]
struct Counts {
    total: AtomicU64,
    s2xx: AtomicU64,
    s4xx: AtomicU64,
    s5xx: AtomicU64,
    s503: AtomicU64,
    s504: AtomicU64,
}

struct App {
    engine: Arc<Engine>,
    pool: Pool,
    opts: ServeOptions,
    model_path: String,
    started: Instant,
    counts: Counts,
    captions: demovlp_search::captions::Captions,
}

/// What the server prints once it listens (one JSON line, `listening` first).
#[derive(Debug, Clone, Serialize)]
pub struct Listening {
    /// `IP:PORT` actually bound (the free port when asked for `:0`).
    pub listening: String,
    pub url: String,
    pub clips: usize,
    pub model: String,
    /// Where the text tower and the re-rank run (`cpu`, or the GPU's name).
    pub device: String,
    pub index: String,
    pub workers: usize,
    pub queue: usize,
}

/// What the server prints when it stops (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What stopped it (`SIGTERM`, `SIGINT`, `shutdown` for a programmatic stop).
    pub shutdown: String,
    pub requests: u64,
    #[serde(rename = "2xx")]
    pub s2xx: u64,
    #[serde(rename = "4xx")]
    pub s4xx: u64,
    #[serde(rename = "5xx")]
    pub s5xx: u64,
    /// 503 answers because the queue was full, 504 answers because of the time limit.
    pub busy_503: u64,
    pub timeout_504: u64,
    pub computed: u64,
    /// Dropped unstarted: their time ran out (or the client left) while they waited.
    pub expired: u64,
    pub panics: u64,
    pub uptime_s: f64,
}

impl App {
    fn summary(&self, why: &str) -> Summary {
        let c = &self.counts;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Summary {
            shutdown: why.into(),
            requests: l(&c.total),
            s2xx: l(&c.s2xx),
            s4xx: l(&c.s4xx),
            s5xx: l(&c.s5xx),
            busy_503: l(&c.s503),
            timeout_504: l(&c.s504),
            computed: l(&self.pool.stats.computed),
            expired: l(&self.pool.stats.expired),
            panics: l(&self.pool.stats.panics),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Counts one answered request and writes its access log line.
    fn record(&self, method: &str, path: &str, s: u16, t: Instant) {
        let c = &self.counts;
        c.total.fetch_add(1, Ordering::SeqCst);
        match s {
            200..=299 => c.s2xx.fetch_add(1, Ordering::SeqCst),
            400..=499 => c.s4xx.fetch_add(1, Ordering::SeqCst),
            _ => c.s5xx.fetch_add(1, Ordering::SeqCst),
        };
        if s == 503 {
            c.s503.fetch_add(1, Ordering::SeqCst);
        } else if s == 504 {
            c.s504.fetch_add(1, Ordering::SeqCst);
        }
        let path: String = path.chars().take(200).collect();
        eprintln!("{method} {path} {s} {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }

    /// The query text: present, not blank, not above the byte limit.
    fn query_text(&self, p: &Params) -> Result<String, ApiError> {
        let Some(q) = p.get("q") else { return Err(ApiError::bad_request("missing parameter q (the query text)")) };
        if q.trim().is_empty() {
            return Err(ApiError::bad_request("empty query (parameter q)"));
        }
        if q.len() > self.opts.max_query_bytes {
            return Err(ApiError::new(
                StatusCode::URI_TOO_LONG,
                format!("query is {} bytes, the limit is {} (--max-query-bytes)", q.len(), self.opts.max_query_bytes),
            ));
        }
        Ok(q.to_string())
    }

    /// Runs a task on the pool within the request's time limit.
    async fn compute(&self, task: Task) -> Result<Output, ApiError> {
        let deadline = Instant::now() + self.opts.timeout;
        let timed_out =
            || ApiError::new(StatusCode::GATEWAY_TIMEOUT, format!("no answer within {} ms (--timeout-ms)", self.opts.timeout.as_millis()));
        let rx = self.pool.submit(task, deadline)?;
        match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), rx).await {
            Ok(Ok(r)) => r,
            // The worker dropped the job unstarted: its time had run out (a race with the timer),
            // or the workers are stopping.
            Ok(Err(_)) if Instant::now() >= deadline => Err(timed_out()),
            Ok(Err(_)) => Err(ApiError::busy("the worker stopped before answering (shutting down?)")),
            Err(_) => Err(timed_out()),
        }
    }
}

type Shared = State<Arc<App>>;

async fn search(State(app): Shared, uri: Uri) -> Result<Response, ApiError> {
    let p = Params::parse(uri.query(), &["q", "k", "rerank"])?;
    let q = app.query_text(&p)?;
    let k = p.number("k", app.opts.default_k, 1, app.opts.max_k)?;
    let rerank = p.number("rerank", app.opts.rerank, 0, app.opts.max_rerank)?;
    match app.compute(Task::Search { q, k, rerank }).await? {
        Output::Search(r) => Ok(json_response(StatusCode::OK, &r)),
        _ => Err(ApiError::internal("unexpected answer from the worker")),
    }
}

/// Largest `POST /api/search` body accepted (bytes); larger ones get a 413 JSON answer.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// `POST /api/search`'s body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    q: String,
    k: Option<usize>,
    rerank: Option<usize>,
}

/// Reads a `POST` body of at most [`MAX_BODY_BYTES`] as JSON (`Content-Type: application/json`);
/// `route` and `shape` name the route and the body it takes in the errors.
async fn read_json_body<T: serde::de::DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    route: &str,
    shape: &str,
) -> Result<T, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("POST {route} takes a JSON body (Content-Type: application/json), got {:?}", ct),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {MAX_BODY_BYTES} bytes")))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e} (expected {shape})")))
}

/// `POST /api/search` with `{"q": TEXT, "k"?: N, "rerank"?: N}` (`Content-Type: application/json`):
/// the same answer as the `GET` form, for queries too long for a URL.
async fn search_post(State(app): Shared, headers: axum::http::HeaderMap, body: axum::body::Body) -> Result<Response, ApiError> {
    let b: SearchBody =
        read_json_body(&headers, body, "/api/search", "{\"q\": TEXT, \"k\": N, \"rerank\": N}, k and rerank optional").await?;
    if b.q.trim().is_empty() {
        return Err(ApiError::bad_request("empty query (q)"));
    }
    if b.q.len() > app.opts.max_query_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("query is {} bytes, the limit is {} (--max-query-bytes)", b.q.len(), app.opts.max_query_bytes),
        ));
    }
    let k = b.k.unwrap_or(app.opts.default_k);
    if !(1..=app.opts.max_k).contains(&k) {
        return Err(ApiError::bad_request(format!("k {k}: expected 1 to {}", app.opts.max_k)));
    }
    let rerank = b.rerank.unwrap_or(app.opts.rerank);
    if rerank > app.opts.max_rerank {
        return Err(ApiError::bad_request(format!("rerank {rerank}: expected 0 to {}", app.opts.max_rerank)));
    }
    match app.compute(Task::Search { q: b.q, k, rerank }).await? {
        Output::Search(r) => Ok(json_response(StatusCode::OK, &r)),
        _ => Err(ApiError::internal("unexpected answer from the worker")),
    }
}

async fn explain_with(app: &App, uri: &Uri, svg_route: bool) -> Result<Response, ApiError> {
    let allowed: &[&str] = if svg_route { &["clip", "q"] } else { &["clip", "q", "format"] };
    let p = Params::parse(uri.query(), allowed)?;
    let svg = match p.get("format") {
        None | Some("json") => svg_route,
        Some("svg") => true,
        Some(f) => return Err(ApiError::bad_request(format!("format {f:?}: expected json or svg"))),
    };
    let clip = match p.get("clip") {
        None => return Err(ApiError::bad_request("missing parameter clip (a clip id from the search results)")),
        Some("") => return Err(ApiError::bad_request("empty parameter clip")),
        Some(c) => c.to_string(),
    };
    let q = app.query_text(&p)?;
    if !app.engine.index.by_id.contains_key(&clip) {
        return Err(ApiError::not_found(format!("unknown clip {clip:?} (not in the index)")));
    }
    match app.compute(Task::Explain { clip, q, svg }).await? {
        Output::Explanation(e) => Ok(json_response(StatusCode::OK, &*e)),
        Output::Svg(s) => {
            let mut r = (StatusCode::OK, s).into_response();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
            h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(SVG_CSP));
            h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
            Ok(r)
        }
        Output::Search(_) => Err(ApiError::internal("unexpected answer from the worker")),
    }
}

async fn explain(State(app): Shared, uri: Uri) -> Result<Response, ApiError> {
    explain_with(&app, &uri, false).await
}

async fn explain_svg(State(app): Shared, uri: Uri) -> Result<Response, ApiError> {
    explain_with(&app, &uri, true).await
}

async fn health(State(app): Shared, uri: Uri) -> Result<Response, ApiError> {
    Params::parse(uri.query(), &[])?;
    let st = app.engine.index.settings();
    let ps = &app.pool.stats;
    let c = &app.counts;
    let body = serde_json::json!({
        "status": "ok",
        "clips": app.engine.index.len(),
        "model": app.model_path,
        "device": app.opts.device_name(),
        "index": app.opts.index.display().to_string(),
        "uptime_s": app.started.elapsed().as_secs_f64(),
        "frames": st.frames,
        "regions": st.regions,
        "text_len": st.text_len,
        "ann": app.engine.ann.is_some(),
        "captions": app.captions.by_clip.len(),
        "captions_from": app.captions.from,
        "thumbnails": app.opts.images.is_some(),
        "workers": app.pool.threads,
        "queue": {"capacity": app.pool.capacity, "waiting": ps.waiting.load(Ordering::SeqCst), "running": ps.running.load(Ordering::SeqCst)},
        "limits": {"max_k": app.opts.max_k, "default_k": app.opts.default_k, "rerank": app.opts.rerank,
                   "max_rerank": app.opts.max_rerank, "max_query_bytes": app.opts.max_query_bytes,
                   "timeout_ms": app.opts.timeout.as_millis() as u64},
        "requests": {"total": c.total.load(Ordering::SeqCst), "2xx": c.s2xx.load(Ordering::SeqCst),
                     "4xx": c.s4xx.load(Ordering::SeqCst), "5xx": c.s5xx.load(Ordering::SeqCst),
                     "busy_503": c.s503.load(Ordering::SeqCst), "timeout_504": c.s504.load(Ordering::SeqCst),
                     "computed": ps.computed.load(Ordering::SeqCst), "expired": ps.expired.load(Ordering::SeqCst),
                     "panics": ps.panics.load(Ordering::SeqCst)},
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// The page reads its own `?q=` (a shareable search) in the browser, so any parameters are fine.
async fn page() -> Response {
    let mut r = (StatusCode::OK, PAGE).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

const ROUTES: &str = "GET /, GET|POST /api/search, GET /api/explain, /api/explain.svg, /api/health, POST /api/clips, GET /api/thumbnail";

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {method} {} (routes: {ROUTES})", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allow = match uri.path() {
        "/api/search" => "GET, HEAD, POST",
        "/api/clips" => "POST",
        _ => "GET, HEAD",
    };
    let mut r = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed on {} (only {allow})", uri.path()))
        .into_response();
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Access log (stderr: method, path, status, milliseconds) and the request counts.
async fn access_log(State(app): Shared, req: Request, next: Next) -> Response {
    let t = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let r = next.run(req).await;
    app.record(method.as_str(), &path, r.status().as_u16(), t);
    r
}

fn caught_panic(p: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal(format!("internal error: {}", panic_message(&*p))).into_response()
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/search", get(search).post(search_post))
        .route("/api/explain", get(explain))
        .route("/api/explain.svg", get(explain_svg))
        .route("/api/health", get(health))
        .route("/api/clips", axum::routing::post(clips::clips))
        .route("/api/thumbnail", get(clips::thumbnail))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(caught_panic))
        .layer(axum::middleware::from_fn_with_state(app.clone(), access_log))
        .with_state(app)
}

/// A loaded index and model with a bound socket, not yet answering.
pub struct Server {
    app: Arc<App>,
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl Server {
    /// Opens the index and the model (checked with one query), starts the workers and binds
    /// the address (`:0` picks a free port).
    pub fn bind(opts: ServeOptions) -> Result<Server> {
        opts.check()?;
        let mut engine = Engine::open_for(&opts.index, FirstStage::Regions, opts.exact_threshold)
            .with_context(|| format!("opening the index {}", opts.index.display()))?;
        let mut opts = opts;
        if opts.rerank_auto {
            opts.rerank = demovlp_search::search::default_rerank(engine.index.len()).min(opts.max_rerank);
        }
        let cpu_model = engine.load_model_from(opts.model.as_deref())?;
        let mut model: Box<dyn QueryModel> = match &opts.device {
            Some(d) => {
                d.score_on(&mut engine);
                d.place(cpu_model)?
            }
            None => Box::new(cpu_model),
        };
        let model_path = opts.model.as_ref().map_or_else(|| engine.index.settings().model.clone(), |p| p.display().to_string());
        model.embed(&engine, "warm up").with_context(|| {
            format!("the model {model_path} does not fit the index {} (built with {})", opts.index.display(), engine.index.settings().model)
        })?;
        if let Some(d) = &opts.images {
            if !d.is_dir() {
                bail!("--images {}: not a directory", d.display());
            }
        }
        let listener = std::net::TcpListener::bind(opts.addr).with_context(|| format!("binding {}", opts.addr))?;
        listener.set_nonblocking(true).context("setting the socket non-blocking")?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            eprintln!(
                "warning: listening on {addr}, which is not a loopback address: anyone who can reach this machine can query the index \
(there is no authentication); use --addr 127.0.0.1:PORT to keep it local"
            );
        }
        let engine = Arc::new(engine);
        let shared = SharedModel::new(model, opts.model.clone(), opts.device.clone());
        let pool = Pool::start(engine.clone(), shared, opts.workers, opts.queue, opts.images.clone(), opts.hook.clone())
            .context("starting the worker threads")?;
        let captions = clips::load_captions(&engine, opts.annotations.as_deref())?;
        let app = Arc::new(App { engine, pool, opts, model_path, started: Instant::now(), counts: Counts::default(), captions });
        Ok(Server { app, listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The line printed once the server listens: `{"listening": "127.0.0.1:PORT", ...}`.
    pub fn listening(&self) -> Listening {
        let a = &self.app;
        Listening {
            listening: self.addr.to_string(),
            url: format!("http://{}/", self.addr),
            clips: a.engine.index.len(),
            model: a.model_path.clone(),
            device: a.opts.device_name(),
            index: a.opts.index.display().to_string(),
            workers: a.pool.threads,
            queue: a.pool.capacity,
        }
    }

    /// Answers until `stop` resolves (with the reason), then finishes the requests in
    /// flight, stops the workers and returns the counts. Call inside a tokio runtime.
    pub async fn run<F>(self, stop: F) -> Result<Summary>
    where
        F: std::future::Future<Output = String> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::from_std(self.listener).context("registering the socket")?;
        let app = self.app.clone();
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let record: conn::Record = {
            let app = app.clone();
            Arc::new(move |method: &str, path: &str, status: u16, t: Instant| app.record(method, path, status, t))
        };
        let lim = app.opts.head_limits;
        let mut serving = tokio::spawn(conn::serve(listener, router(app.clone()), lim, go_rx, record));
        let why = tokio::select! {
            r = &mut serving => {
                // It stopped by itself: an accept loop error.
                r.context("the server task")?;
                "the server stopped".to_string()
            }
            why = stop => {
                eprintln!("{why}: finishing the requests in flight, then stopping");
                let _ = go_tx.send(true);
                // Requests end within their time limit; a connection that stays open without a
                // request in it (a stuck client) does not hold the shutdown up for longer.
                let grace = app.opts.timeout + Duration::from_secs(5);
                match tokio::time::timeout(grace, &mut serving).await {
                    Ok(r) => r.context("the server task")?,
                    Err(_) => {
                        eprintln!("warning: connections still open {} s after {why}; closing them", grace.as_secs());
                        serving.abort();
                    }
                }
                why
            }
        };
        let app2 = app.clone();
        tokio::task::spawn_blocking(move || app2.pool.close()).await.context("stopping the workers")?;
        Ok(app.summary(&why))
    }
}

/// Resolves on SIGINT or SIGTERM with the signal's name.
///
/// The handlers are installed when this is called, not when the future is first polled: a
/// caller that announces itself (the listening line) after calling it cannot lose a signal sent
/// in between to the default action (which would kill the process without a summary).
/// Call it from inside the runtime (`rt.block_on` or `rt.enter()`).
pub fn shutdown_signal() -> impl std::future::Future<Output = String> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let installed = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        async move {
            match installed {
                (Ok(mut term), Ok(mut int)) => tokio::select! {
                    _ = term.recv() => "SIGTERM".to_string(),
                    _ = int.recv() => "SIGINT".to_string(),
                },
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                    "SIGINT".to_string()
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async move {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT".to_string()
        }
    }
}

/// The async runtime the server runs on (the compute has its own threads).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve-io")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `demovlp serve`: binds, prints the listening line on stdout, answers until SIGINT or
/// SIGTERM, prints the summary line.
pub fn serve_until_signal(opts: ServeOptions) -> Result<Summary> {
    let rt = runtime()?;
    let server = rt.block_on(async { Server::bind(opts) })?;
    // Handlers first, then the line that tells a client (or a test) it may send signals.
    let stop = {
        let _in_runtime = rt.enter();
        shutdown_signal()
    };
    println!("{}", serde_json::to_string(&server.listening())?);
    let summary = rt.block_on(server.run(stop))?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(summary)
}

/// A server running on its own thread (tests, embedding): stop it with [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    pub listening: Listening,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<Summary>>>,
}

impl Running {
    /// Graceful stop: waits for the requests in flight and the workers.
    pub fn stop(mut self) -> Result<Summary> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(p)) => bail!("the server thread panicked: {}", panic_message(&*p)),
            None => bail!("already stopped"),
        }
    }
}

/// Binds and serves on a background thread.
pub fn spawn(opts: ServeOptions) -> Result<Running> {
    let rt = runtime()?;
    let server = rt.block_on(async { Server::bind(opts) })?;
    let (addr, listening) = (server.local_addr(), server.listening());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("serve".into()).spawn(move || {
        rt.block_on(server.run(async move {
            let _ = rx.await;
            "shutdown".to_string()
        }))
    })?;
    Ok(Running { addr, listening, stop: Some(tx), thread: Some(thread) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal that arrives after `shutdown_signal()` returned but before its future is first
    /// polled is caught, not left to the default action (which ends the process: the serve CLI
    /// printed its listening line in that window and a quick SIGINT killed it without a summary).
    #[cfg(unix)]
    #[test]
    fn a_signal_between_install_and_first_poll_is_caught() {
        let rt = runtime().unwrap();
        let stop = {
            let _in_runtime = rt.enter();
            shutdown_signal()
        };
        // Nothing has polled `stop` yet.
        assert_eq!(unsafe { libc::raise(libc::SIGINT) }, 0);
        let why = rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), stop).await });
        assert_eq!(why.expect("the signal was not delivered to the handler"), "SIGINT");
    }

    /// A panic in a handler (outside the workers' catch_unwind) is a 500 JSON answer, and the
    /// server keeps answering.
    #[test]
    fn a_panicking_handler_is_a_500_json_and_the_server_lives_on() {
        async fn boom() -> &'static str {
            panic!("handler exploded")
        }
        let app = Router::new()
            .route("/boom", get(boom))
            .route("/ok", get(|| async { "fine" }))
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(caught_panic));
        let rt = runtime().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        rt.spawn(async move { axum::serve(listener, app).await });
        let r = demovlp_testutil::http::get(&addr, "/boom");
        assert_eq!((r.status, r.header("content-type")), (500, Some("application/json")));
        assert_eq!(r.json()["error"], "internal error: handler exploded");
        assert_eq!(demovlp_testutil::http::get(&addr, "/ok").text(), "fine");
    }
}
