//! `demovlp serve`: the HTTP server and web page over a search index (crate demovlp-serve).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use demovlp_search::search::DEFAULT_EXACT_THRESHOLD;
use demovlp_serve::ServeOptions;

pub const SERVE_HELP: &str = "Serve an index over HTTP, with a small web page.

Routes (GET, and POST for /api/search; every error the server returns is JSON {\"error\": \"...\"}):
  /                                    the web page: search box, ranked results, click one for its explanation
  /api/search?q=TEXT[&k=10][&rerank=N] {\"query\", \"results\": [...]}, as `demovlp search --json` prints
  POST /api/search {\"q\", \"k\"?, \"rerank\"?} the same, for long queries (Content-Type: application/json)
  /api/explain?clip=ID&q=TEXT          the explanation as JSON (as `demovlp explain --json`); &format=svg for the picture
  /api/explain.svg?clip=ID&q=TEXT      the explanation picture (SVG)
  /api/health                          status, clips, model, uptime, workers, queue, request counts
  POST /api/clips {\"clips\": [ID, ...]}   each clip's caption (from the index's annotation files, or
                                       --annotations) and thumbnail URL (with --images)
  /api/thumbnail?clip=ID               the clip's first sampled frame picture under --images

Errors: missing or empty q / clip, an unknown or repeated parameter, bad percent-encoding or text that is
not UTF-8, k or rerank out of range -> 400; q longer than --max-query-bytes -> 414; unknown clip or path
-> 404; another method than GET (POST on /api/search) -> 405; a POST body that is not JSON -> 415, bad
JSON -> 400, over 16 KiB (or q over --max-query-bytes) -> 413; queue full -> 503 with Retry-After; no answer within --timeout-ms
-> 504; an internal failure -> 500 (the server keeps running). Checked before any route runs: a request
target over 16 KiB -> 414, a request head over 32 KiB or with more than 64 header fields -> 431, a
malformed request line or header -> 400, a head not complete within 10 s -> 408. One request per
connection (Connection: close).

The text tower and the re-rank run on --workers threads sharing one copy of the model (the short query
embedding runs under a lock, candidates and re-rank in parallel); --queue requests may wait for one, more
are refused at once.

Binds 127.0.0.1 (loopback) by default; another address prints a warning (there is no authentication).
With --addr 127.0.0.1:0 a free port is picked. Once listening, one JSON line goes to stdout:
{\"listening\": \"127.0.0.1:PORT\", \"url\", \"clips\", \"model\", \"index\", \"workers\", \"queue\"}. An access log line per
request goes to stderr (method, path, status, milliseconds). SIGINT or SIGTERM: the requests in flight
are finished, then one JSON summary line (shutdown, requests, 2xx, 4xx, 5xx, busy_503, timeout_504,
computed, expired, panics, uptime_s) is printed and the exit status is 0.";

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The index directory (`demovlp index`).
    index: PathBuf,
    /// The model for query texts (default: the one the index was built with; its width must match).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address and port to listen on (port 0: a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Compute threads (text tower + re-rank), sharing one copy of the model [default: cores, at most 4].
    #[arg(long)]
    workers: Option<usize>,
    /// Requests that may wait for a worker; beyond that 503 + Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Per-request time limit in milliseconds, waiting included (then 504).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Longest query text accepted, in bytes after percent-decoding (then 414; at most 4096).
    #[arg(long, default_value_t = 1024)]
    max_query_bytes: usize,
    /// Results per query when the request gives no k.
    #[arg(short = 'k', long, default_value_t = 10)]
    k: usize,
    /// Largest k a request may ask for.
    #[arg(long, default_value_t = 100)]
    max_k: usize,
    /// Candidates re-ranked by global + region-word score when the request gives no rerank (0: global
    /// only). Default: as `search`, 100 or 1% of the index's clips when that is more, at most 1000.
    #[arg(long)]
    rerank: Option<usize>,
    /// Largest rerank a request may ask for.
    #[arg(long, default_value_t = 1000)]
    max_rerank: usize,
    /// Scan exactly below this many clips, else use the ANN graph.
    #[arg(long, default_value_t = DEFAULT_EXACT_THRESHOLD)]
    exact_threshold: usize,
    /// Folder of frame images to draw the explanations on: <dir>/<clip>/<frame>.jpg|png (or <dir>/<frame>.jpg|png).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Where each query's text tower and the re-rank scores run (the first stage and the
    /// index stay in host memory).
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Annotation file (or MSR-VTT metadata directory) whose first caption per clip the page shows
    /// [default: the annotation files the index was built from, as recorded in its index.json].
    #[arg(long)]
    annotations: Option<PathBuf>,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let mut o = ServeOptions::new(a.index);
    o.model = a.model;
    o.addr = a.addr;
    o.workers = a.workers.unwrap_or_else(demovlp_serve::default_workers);
    o.queue = a.queue;
    o.timeout = Duration::from_millis(a.timeout_ms);
    o.max_query_bytes = a.max_query_bytes;
    (o.default_k, o.max_k, o.rerank, o.max_rerank) = (a.k, a.max_k, a.rerank.unwrap_or(100), a.max_rerank);
    o.rerank_auto = a.rerank.is_none();
    o.exact_threshold = a.exact_threshold;
    o.images = a.images;
    o.device = crate::device::placement(&a.device)?;
    o.annotations = a.annotations;
    demovlp_serve::serve_until_signal(o)?;
    Ok(())
}
