//! `demovlp serve`, the binary: started on `--addr 127.0.0.1:0` over an index built in the
//! test, driven over HTTP. Its answers are byte-equal to `demovlp search --json` /
//! `explain --json`; bad requests get 4xx JSON; concurrent clients are served; SIGTERM and
//! SIGINT stop it with exit 0 and a summary line. The web page is driven in a real headless
//! Chromium through chromedriver's WebDriver API (skipped with a notice when Chromium is not
//! installed — except under CI, where that is a failure).

#[path = "../../serve/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use demovlp_testutil::http::{encode, get, json as wd};
use serde_json::{json, Value};
use support::{build_world, World};

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| build_world("serve-cli"))
}

fn demovlp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_demovlp"))
}

/// A running `demovlp serve`: its address, and its stderr collected by a thread (the access
/// log must be drained or the server would block on a full pipe).
struct Served {
    child: Child,
    addr: String,
    listening: Value,
    stdout: BufReader<std::process::ChildStdout>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
}

fn serve(args: &[&str]) -> Served {
    let mut child = demovlp()
        .arg("serve")
        .arg(&world().index)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let (sink, mut pipe) = (stderr.clone(), child.stderr.take().unwrap());
    let stderr_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let listening: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("first stdout line is not the listening JSON ({e}): {line:?}; stderr: {}", stderr.lock().unwrap())
    });
    let addr = listening["listening"].as_str().unwrap().to_string();
    Served { child, addr, listening, stdout, stderr, stderr_thread: Some(stderr_thread) }
}

impl Served {
    /// Sends `sig`, waits for the exit; returns (exit code, the summary line, stderr).
    fn stop(mut self, sig: i32) -> (Option<i32>, Value, String) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "the server did not stop within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        if let Some(t) = self.stderr_thread.take() {
            t.join().unwrap();
        }
        let stderr = self.stderr.lock().unwrap().clone();
        let summary = serde_json::from_str(rest.trim_end().lines().last().unwrap_or("")).unwrap_or(Value::Null);
        (status.code(), summary, stderr)
    }
}

/// A test that fails half-way must not leave a server behind.
impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// chromedriver (and the browser under it) goes when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn search_json(args: &[&str]) -> String {
    let o = demovlp().arg("search").arg(&world().index).args(args).arg("--json").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim_end().to_string()
}

#[test]
fn serve_answers_as_search_json_refuses_bad_requests_and_stops_cleanly_on_sigterm() {
    let w = world();
    let s = serve(&["--addr", "127.0.0.1:0", "--workers", "2"]);
    assert!(s.addr.starts_with("127.0.0.1:") && !s.addr.ends_with(":0"), "{}", s.listening);
    assert_eq!(s.listening["clips"], support::CLIPS);
    assert_eq!(s.listening["model"], w.model.display().to_string());
    let addr = s.addr.clone();
    let mut sent = 0u64;
    for (clip, caption) in w.captions.iter().take(3) {
        for (flags, query) in [(vec![], String::new()), (vec!["-k", "3", "--rerank", "0"], "&k=3&rerank=0".to_string())] {
            let r = get(&addr, &format!("/api/search?q={}{query}", encode(caption)));
            sent += 1;
            assert_eq!(r.status, 200, "{}", r.text());
            let mut args = vec![caption.as_str()];
            args.extend(flags);
            assert_eq!(r.text(), search_json(&args), "{caption} {query}");
        }
        let x = get(&addr, &format!("/api/explain?clip={}&q={}", encode(clip), encode(caption)));
        sent += 1;
        let o = demovlp().arg("explain").arg(&w.index).args(["--clip", clip, caption, "--json"]).output().unwrap();
        assert!(o.status.success());
        assert_eq!(x.text(), String::from_utf8(o.stdout).unwrap().trim_end());
    }
    let bad = [
        ("/api/search?q=", 400, "empty query"),
        ("/api/search?k=3", 400, "missing parameter q"),
        ("/api/search?q=dog&k=1000", 400, "out of range"),
        ("/api/search?q=%C3%28", 400, "not valid UTF-8"),
        ("/api/search?q=%G1", 400, "bad percent-encoding"),
        ("/api/explain?clip=nope&q=dog", 404, "unknown clip"),
        ("/favicon.ico", 404, "no route"),
    ];
    for (target, status, msg) in bad {
        let r = get(&addr, target);
        sent += 1;
        assert_eq!(r.status, status, "{target}: {}", r.text());
        assert!(r.json()["error"].as_str().unwrap().contains(msg), "{target}: {}", r.text());
    }
    // Too long for --max-query-bytes (the route's 414), and beyond hyper's own URI limit
    // (refused before any route runs): both JSON naming the limit.
    for (n, msg) in [(2000, "the limit is 1024 (--max-query-bytes)"), (70_000, "the limit is 16384")] {
        let r = get(&addr, &format!("/api/search?q={}", "x".repeat(n)));
        sent += 1;
        assert_eq!((r.status, r.header("content-type")), (414, Some("application/json")), "{}", r.text());
        assert!(r.json()["error"].as_str().unwrap().contains(msg), "{}", r.text());
    }
    // Concurrent clients.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (addr, q) = (addr.clone(), w.captions[i % 5].1.clone());
            std::thread::spawn(move || (0..3).map(|_| get(&addr, &format!("/api/search?q={}&k=5", encode(&q))).status).collect::<Vec<_>>())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), vec![200; 3]);
        sent += 3;
    }
    let (code, summary, stderr) = s.stop(libc::SIGTERM);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(summary["shutdown"], "SIGTERM", "{summary}");
    assert_eq!(summary["requests"].as_u64(), Some(sent), "{summary}");
    assert_eq!(summary["4xx"].as_u64(), Some(bad.len() as u64 + 2), "{summary}");
    assert_eq!(summary["5xx"].as_u64(), Some(0), "{summary}");
    // The access log: method, path, status, milliseconds.
    assert!(stderr.lines().any(|l| l.starts_with("GET /api/search 200 ") && l.ends_with(" ms")), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("GET /api/explain 404 ")), "{stderr}");
}

#[test]
fn serve_warns_off_loopback_stops_on_sigint_and_refuses_bad_settings() {
    let s = serve(&["--addr", "0.0.0.0:0", "--workers", "1"]);
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    assert_eq!(get(&format!("127.0.0.1:{port}"), "/api/health").status, 200);
    let (code, summary, stderr) = s.stop(libc::SIGINT);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!((summary["shutdown"].as_str(), summary["requests"].as_u64()), (Some("SIGINT"), Some(1)), "{summary}");
    assert!(stderr.contains("warning: listening on 0.0.0.0:") && stderr.contains("not a loopback address"), "{stderr}");

    // --model: the index's own model named explicitly serves; one of another width is refused.
    let w = world();
    let s = serve(&["--addr", "127.0.0.1:0", "--model", w.model.to_str().unwrap(), "--workers", "1"]);
    assert_eq!(get(&s.addr, "/api/search?q=a%20dog").status, 200);
    assert_eq!(s.stop(libc::SIGTERM).0, Some(0));
    let narrow = w.root.join("model-p16");
    if !narrow.exists() {
        let mut mc = demovlp_train::demo::DemoSizes::quick(1).model;
        (mc.text.dim, mc.text.hidden_dim, mc.video.dim, mc.video.mlp_dim, mc.proj_dim) = (32, 64, 32, 64, 16);
        let mut m = demovlp_model::Model::new(mc);
        m.init_random(1);
        demovlp_model::io::save_model_dir(&m, &narrow).unwrap();
    }
    let narrow = narrow.display().to_string();

    let index = w.index.display().to_string();
    for (args, msg) in [
        (vec!["serve", &index, "--addr", "127.0.0.1:0", "--model", &narrow], "does not fit the index"),
        (vec!["serve", "/no/such/index", "--addr", "127.0.0.1:0"], "/no/such/index"),
        (vec!["serve", &index, "--addr", "127.0.0.1:0", "--max-query-bytes", "0"], "--max-query-bytes"),
        (vec!["serve", &index, "--addr", "127.0.0.1:0", "--workers", "0"], "--workers"),
        (vec!["serve", &index, "--addr", "127.0.0.1:0", "-k", "200"], "max-k"),
        (vec!["serve", &index, "--addr", "127.0.0.1:0", "--images", "/no/such/dir"], "--images /no/such/dir"),
    ] {
        let o = demovlp().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    let help = demovlp().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in ["/api/search?q=TEXT", "/api/explain.svg", "--max-query-bytes", "--timeout-ms", "Retry-After", "SIGTERM"] {
        assert!(help.contains(needle), "serve --help lacks {needle}");
    }
}

// ---------------------------------------------------------------- the web page in Chromium

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    names.iter().flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n))).find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Driver {
    addr: String,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Driver {
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let target = format!("/session/{}{path}", self.session);
        let r = if method == "GET" {
            demovlp_testutil::http::request(&self.addr, "GET", &target, None).unwrap_or_else(|e| panic!("GET {target}: {e}"))
        } else {
            wd(&self.addr, method, &target, &body)
        };
        let v = r.json();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }
    fn find_all(&self, css: &str) -> Vec<String> {
        let v = self.call("POST", "/elements", json!({"using": "css selector", "value": css}));
        v.as_array().unwrap().iter().map(|e| e[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: {v}")).to_string()).collect()
    }
    fn find(&self, css: &str) -> String {
        self.find_all(css).into_iter().next().unwrap_or_else(|| panic!("no element {css}"))
    }
    fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", json!({"script": js, "args": []}))
    }
    fn wait(&self, what: &str, js: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.script(js);
            if !v.is_null() && v != json!(false) {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A small RGB PNG, a gradient tinted by `tint`.
fn write_png(path: &Path, w: u32, h: u32, tint: u8) {
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut e = png::Encoder::new(f, w, h);
    e.set_color(png::ColorType::Rgb);
    e.set_depth(png::BitDepth::Eight);
    let data: Vec<u8> = (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 8) as u8, (y * 10) as u8, tint.wrapping_mul(16)])).collect();
    e.write_header().unwrap().write_image_data(&data).unwrap();
}

/// Colours in a PNG (decoded), and its size.
fn png_colours(bytes: &[u8]) -> (u32, u32, usize) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let mut seen = std::collections::HashSet::new();
    for p in buf[..info.buffer_size()].chunks(px) {
        seen.insert(p.to_vec());
    }
    (info.width, info.height, seen.len())
}

#[test]
fn web_page_in_headless_chromium_search_click_explain_screenshot() {
    let chromium = find_program("CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
    let driver = find_program("CHROMEDRIVER", &["chromedriver"]);
    let (Some(chromium), Some(driver_bin)) = (chromium, driver) else {
        let why = "chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)";
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but {why}");
        }
        eprintln!("SKIPPED web_page_in_headless_chromium: {why}");
        return;
    };
    let w = world();
    let dir = demovlp_testutil::tmpdir("serve-browser");
    // Frame pictures for every clip (`<dir>/<frame>.png` serves any clip): the thumbnails.
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in 0..16 {
        write_png(&images.join(format!("{f}.png")), 32, 24, f as u8);
    }
    let s = serve(&["--addr", "127.0.0.1:0", "--workers", "2", "--images", images.to_str().unwrap()]);
    let port = free_port();
    let cd = KillOnDrop(
        Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", driver_bin.display())),
    );
    let daddr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    while !demovlp_testutil::http::request(&daddr, "GET", "/status", None).is_ok_and(|r| r.json()["value"]["ready"] == true) {
        assert!(t.elapsed() < Duration::from_secs(20), "chromedriver did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let profile = dir.join("chromium-profile");
    let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": chromium.display().to_string(),
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]
    }}}});
    let r = wd(&daddr, "POST", "/session", &caps);
    let v = r.json();
    assert_eq!(r.status, 200, "new session: {v}");
    let d = Driver { addr: daddr.clone(), session: v["value"]["sessionId"].as_str().unwrap().to_string() };

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| browse(&d, &s.addr, w, &dir)));
    wd(&daddr, "DELETE", &format!("/session/{}", d.session), &json!({}));
    drop(cd);
    let (code, summary, stderr) = s.stop(libc::SIGTERM);
    if let Err(p) = result {
        eprintln!("server stderr:\n{stderr}");
        std::panic::resume_unwind(p);
    }
    std::fs::remove_dir_all(&profile).ok();
    assert_eq!(code, Some(0));
    assert_eq!(summary["5xx"], 0, "{summary}");
    // The page, its health call, the search, the picture and the explanation.
    for l in [
        "GET / 200",
        "GET /api/health 200",
        "POST /api/search 200",
        "POST /api/clips 200",
        "GET /api/thumbnail 200",
        "GET /api/explain.svg 200",
        "GET /api/explain 200",
    ] {
        assert!(stderr.contains(l), "no '{l}' in the access log:\n{stderr}");
    }
}

fn browse(d: &Driver, addr: &str, w: &World, dir: &Path) {
    d.call("POST", "/url", json!({"url": format!("http://{addr}/")}));
    assert_eq!(d.call("GET", "/title", json!(null)), "demovlp search");
    d.wait("the health line", "return document.querySelector('#meta').textContent.includes('40 clips')");
    let (clip, caption) = &w.captions[2];
    let q = d.find("#q");
    d.call("POST", &format!("/element/{q}/value"), json!({"text": caption}));
    let go = d.find("#go");
    d.call("POST", &format!("/element/{go}/click"), json!({}));
    d.wait("10 results", "return document.querySelectorAll('li.result').length === 10");
    // The page shows what the API answers, in order, with the scores.
    let api = get(addr, &format!("/api/search?q={}&k=10", encode(caption))).json();
    let shown =
        d.script("return [...document.querySelectorAll('li.result')].map(li => [li.dataset.clip, li.querySelector('.score').textContent])");
    for (i, (row, hit)) in shown.as_array().unwrap().iter().zip(api["results"].as_array().unwrap()).enumerate() {
        assert_eq!(row[0], hit["clip"], "rank {}", i + 1);
        assert_eq!(row[1].as_str().unwrap(), format!("{:.4}", hit["score"].as_f64().unwrap()), "rank {}", i + 1);
    }
    assert!(d.script("return location.search").as_str().unwrap().starts_with("?q="));
    // Each result shows its clip's caption (the annotations the index was built from, named
    // above the list) over its id, and a thumbnail (the frame pictures of --images).
    let capsrc = d.wait("the caption source", "const t = document.querySelector('#capsrc').textContent; return t || false");
    assert!(capsrc.as_str().unwrap().contains("Captions from the annotations synth_msrvtt_test.jsonl"), "{capsrc}");
    let rows = d.wait(
        "captions and thumbnails",
        "const rows = [...document.querySelectorAll('li.result')].map(li => { const i = li.querySelector('img.thumb');          return [li.dataset.clip, li.querySelector('.caption').textContent, li.querySelector('.clip').textContent,          i ? (i.complete ? i.naturalWidth : -1) : 0]; });          return rows.every(r => r[1] !== '…' && r[3] > 0) ? rows : false",
    );
    let by_clip: std::collections::HashMap<&str, &str> = w.captions.iter().map(|(c, t)| (c.as_str(), t.as_str())).collect();
    for r in rows.as_array().unwrap() {
        let c = r[0].as_str().unwrap();
        assert_eq!(r[1].as_str().unwrap(), by_clip[c], "caption of {c}");
        assert_eq!((r[2].as_str().unwrap(), r[3].as_u64()), (c, Some(32)), "id and thumbnail of {c}");
    }
    // Click the result for the caption's own clip when it is listed, else the first.
    let items = d.find_all("li.result");
    let pick = shown.as_array().unwrap().iter().position(|r| r[0] == clip.as_str()).unwrap_or(0);
    d.call("POST", &format!("/element/{}/click", items[pick]), json!({}));
    let size = d.wait(
        "the explanation picture",
        "const i = document.querySelector('#why'); return i && i.complete && i.naturalWidth > 0 && \
         document.querySelectorAll('table.words tr').length > 1 ? [i.naturalWidth, i.naturalHeight] : false",
    );
    assert!(size[0].as_u64().unwrap() > 300 && size[1].as_u64().unwrap() > 200, "picture size {size}");
    let active = d.script("return document.querySelector('li.result.active').dataset.clip");
    assert_eq!(active, shown[pick][0]);
    let heading =
        d.script("return [document.querySelector('#explain h3').textContent, document.querySelector('#explain .clipid').textContent]");
    let picked = shown[pick][0].as_str().unwrap();
    assert_eq!(heading, json!([by_clip[picked], picked]), "the explanation is headed by the caption, then the id");
    let sub = d.script("return document.querySelector('#explain .sub').textContent");
    assert!(sub.as_str().unwrap().starts_with("score "), "{sub}");
    assert!(d.find_all(".error").is_empty(), "the page shows an error");

    // A server-side refusal is shown on the page, not swallowed.
    d.call("POST", &format!("/element/{q}/clear"), json!({}));
    d.call("POST", &format!("/element/{q}/value"), json!({"text": "x".repeat(1100)}));
    d.call("POST", &format!("/element/{go}/click"), json!({}));
    let err = d.wait("the error box", "const e = document.querySelector('#results .error'); return e ? e.textContent : false");
    assert!(err.as_str().unwrap().contains("the limit is 1024"), "{err}");
    // ... and the old results and their explanation are gone.
    let left = d.script(
        "return [document.querySelectorAll('li.result').length, !!document.querySelector('#why'),          document.querySelectorAll('table.words').length, document.querySelector('#explain').textContent]",
    );
    assert_eq!(left, json!([0, false, 0, "No explanation: the search failed."]), "{left}");
    // Back to the results and the explanation for the screenshot.
    d.call("POST", "/refresh", json!({}));
    d.wait("the search from ?q=", "return document.querySelectorAll('li.result').length === 10");
    let items = d.find_all("li.result");
    d.call("POST", &format!("/element/{}/click", items[pick]), json!({}));
    d.wait("the picture again", "const i = document.querySelector('#why'); return i && i.complete && i.naturalWidth > 0 && document.querySelectorAll('table.words tr').length > 1");

    let png = demovlp_testutil::b64decode(d.call("GET", "/screenshot", json!(null)).as_str().unwrap());
    let path = dir.join("serve-page.png");
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot: {}", path.display());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let view = d.script("return [Math.round(window.innerWidth * devicePixelRatio), Math.round(window.innerHeight * devicePixelRatio)]");
    let (pw, ph, colours) = png_colours(&png);
    assert_eq!((pw as u64, ph as u64), (view[0].as_u64().unwrap(), view[1].as_u64().unwrap()), "screenshot size vs viewport");
    assert!(pw >= 1000 && ph >= 600, "{pw}x{ph}");
    assert!(colours > 50, "the screenshot has only {colours} colours (blank page?)");
}
