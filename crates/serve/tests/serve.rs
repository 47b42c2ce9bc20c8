//! The server in-process on a loopback port, driven over HTTP: answers equal the library's,
//! every bad request gets its 4xx JSON, a full queue 503, the time limit 504, a panic in the
//! compute 500 — and the server keeps answering; many concurrent clients are all served.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use demovlp_search::search::Engine;
use demovlp_serve::{spawn, Running, ServeOptions};
use demovlp_testutil::http::{encode, get, raw, request};
use support::{build_world, World};

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| build_world("serve-lib"))
}

fn start(f: impl FnOnce(&mut ServeOptions)) -> (Running, String) {
    let mut o = ServeOptions::new(world().index.clone());
    o.addr = "127.0.0.1:0".parse().unwrap();
    o.workers = 2;
    f(&mut o);
    let r = spawn(o).unwrap();
    let addr = r.addr.to_string();
    assert_eq!(r.listening.listening, addr);
    (r, addr)
}

fn search_target(q: &str, extra: &str) -> String {
    format!("/api/search?q={}{extra}", encode(q))
}

#[test]
fn answers_equal_the_library_and_every_bad_request_is_a_json_4xx() {
    let w = world();
    let (server, addr) = start(|_| {});
    let engine = Engine::open(&w.index).unwrap();
    let mut model = engine.load_model().unwrap();
    let mut sent = 0u64;

    let h = get(&addr, "/api/health");
    sent += 1;
    assert_eq!(h.status, 200);
    let hj = h.json();
    assert_eq!((hj["status"].as_str(), hj["clips"].as_u64()), (Some("ok"), Some(support::CLIPS as u64)), "{hj}");
    assert_eq!(hj["model"], w.model.display().to_string());
    assert!(hj["uptime_s"].as_f64().unwrap() >= 0.0);

    for (clip, caption) in w.captions.iter().take(4) {
        for (extra, k, rerank) in [("", 10, 100), ("&k=3", 3, 100), ("&k=5&rerank=0", 5, 0)] {
            let r = get(&addr, &search_target(caption, extra));
            sent += 1;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("content-type"), Some("application/json"));
            // Byte for byte what `demovlp search --json` prints.
            let want = serde_json::to_string(&engine.search(&mut model, caption, k, rerank).unwrap()).unwrap();
            assert_eq!(r.text(), want, "{caption} {extra}");
            assert_eq!(r.json()["results"].as_array().unwrap().len(), k);
        }
        let x = get(&addr, &format!("/api/explain?clip={}&q={}", encode(clip), encode(caption)));
        sent += 1;
        assert_eq!(x.status, 200, "{}", x.text());
        let want = serde_json::to_string(&engine.explain(&mut model, clip, caption).unwrap()).unwrap();
        assert_eq!(x.text(), want);
        for target in [
            format!("/api/explain.svg?clip={}&q={}", encode(clip), encode(caption)),
            format!("/api/explain?clip={}&q={}&format=svg", encode(clip), encode(caption)),
        ] {
            let s = get(&addr, &target);
            sent += 1;
            assert_eq!((s.status, s.header("content-type")), (200, Some("image/svg+xml")), "{target}");
            let e = engine.explain(&mut model, clip, caption).unwrap();
            assert_eq!(s.text(), demovlp_search::explain::svg(&e, None).unwrap());
        }
    }

    let page = get(&addr, "/");
    sent += 1;
    assert_eq!((page.status, page.header("content-type")), (200, Some("text/html; charset=utf-8")));
    let html = page.text();
    assert!(html.contains("<form") && html.contains("/api/search") && html.contains("/api/explain.svg"));
    assert!(!html.contains("http://") && !html.contains("https://"), "the page must not load external assets");
    assert!(page.header("content-security-policy").is_some_and(|c| c.contains("default-src 'none'")));

    let long_q = "a".repeat(1025);
    let huge_q = "b".repeat(60_000);
    let valid_clip = encode(&w.captions[0].0);
    let bad: Vec<(String, u16, &str)> = vec![
        ("/api/search".into(), 400, "missing parameter q"),
        ("/api/search?k=5".into(), 400, "missing parameter q"),
        ("/api/search?q=".into(), 400, "empty query"),
        ("/api/search?q=%20+%20".into(), 400, "empty query"),
        (search_target(&long_q, ""), 414, "1025 bytes, the limit is 1024"),
        (search_target(&huge_q, ""), 414, "the limit is 16384 (send long queries as POST /api/search"),
        (search_target("dog", "&k=0"), 400, "k = 0 is out of range (1 to 100)"),
        (search_target("dog", "&k=101"), 400, "k = 101 is out of range"),
        (search_target("dog", "&k=ten"), 400, "k: expected a whole number"),
        (search_target("dog", "&k=-1"), 400, "k: expected a whole number"),
        (search_target("dog", "&rerank=1001"), 400, "rerank = 1001 is out of range (0 to 1000)"),
        ("/api/search?q=dog%zz".into(), 400, "bad percent-encoding"),
        ("/api/search?q=dog%4".into(), 400, "bad percent-encoding"),
        ("/api/search?q=%FF%FEdog".into(), 400, "not valid UTF-8"),
        ("/api/search?q=dog&q=cat".into(), 400, "given twice"),
        ("/api/search?q=dog&limit=3".into(), 400, "unknown parameter \"limit\""),
        ("/api/explain?q=dog".into(), 400, "missing parameter clip"),
        ("/api/explain?clip=&q=dog".into(), 400, "empty parameter clip"),
        (format!("/api/explain?clip={valid_clip}"), 400, "missing parameter q"),
        ("/api/explain?clip=no%2Fsuch%2Fclip&q=dog".into(), 404, "unknown clip \"no/such/clip\""),
        ("/api/explain.svg?clip=nope&q=dog".into(), 404, "unknown clip"),
        (format!("/api/explain?clip={valid_clip}&q=dog&format=png"), 400, "expected json or svg"),
        (format!("/api/explain.svg?clip={valid_clip}&q=dog&format=svg"), 400, "unknown parameter \"format\""),
        ("/api/health?verbose=1".into(), 400, "unknown parameter"),
        ("/api/nothing".into(), 404, "no route GET /api/nothing"),
        ("/index.html".into(), 404, "no route"),
    ];
    for (target, status, msg) in &bad {
        let r = get(&addr, target);
        sent += 1;
        let shown: String = target.chars().take(80).collect();
        assert_eq!(r.status, *status, "{shown}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"), "{shown}");
        let e = r.json();
        assert!(e["error"].as_str().is_some_and(|s| s.contains(msg)), "{shown}: {e}");
        assert_eq!(e.as_object().unwrap().len(), 1, "only the error: {e}");
    }
    for (method, path, allow) in [
        ("PUT", "/api/search?q=dog", "GET, HEAD, POST"),
        ("DELETE", "/api/search?q=dog", "GET, HEAD, POST"),
        ("POST", "/api/health", "GET, HEAD"),
    ] {
        let r = request(&addr, method, path, Some(("text/plain", b"x"))).unwrap();
        sent += 1;
        assert_eq!((r.status, r.header("allow")), (405, Some(allow)), "{method}");
        let route = path.split('?').next().unwrap();
        assert!(r.json()["error"].as_str().unwrap().contains(&format!("method {method} not allowed on {route}")));
    }
    // POST /api/search with a JSON body: the GET answer, byte for byte; its errors are JSON too.
    let caption = &w.captions[0].1;
    let body = serde_json::json!({"q": caption, "k": 5}).to_string();
    let r = request(&addr, "POST", "/api/search", Some(("application/json", body.as_bytes()))).unwrap();
    sent += 1;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), get(&addr, &search_target(caption, "&k=5")).text());
    sent += 1;
    let big = format!("{{\"q\": \"{}\"}}", "c".repeat(20_000));
    let long = format!("{{\"q\": \"{}\"}}", "d".repeat(1025));
    let post_bad: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("text/plain", b"dog".to_vec(), 415, "takes a JSON body"),
        ("application/json", b"{\"q\": ".to_vec(), 400, "bad JSON body"),
        ("application/json", b"{\"q\": \"dog\", \"limit\": 3}".to_vec(), 400, "unknown field"),
        ("application/json", b"{\"q\": \"dog\", \"k\": 0}".to_vec(), 400, "k 0: expected 1 to 100"),
        ("application/json", b"{\"q\": \"  \"}".to_vec(), 400, "empty query"),
        ("application/json", big.into_bytes(), 413, "request body over 16384 bytes"),
        ("application/json", long.into_bytes(), 413, "query is 1025 bytes, the limit is 1024"),
    ];
    for (ct, b, status, msg) in &post_bad {
        let r = request(&addr, "POST", "/api/search", Some((ct, b))).unwrap();
        sent += 1;
        assert_eq!((r.status, r.header("content-type")), (*status, Some("application/json")), "{msg}: {}", r.text());
        assert!(r.json()["error"].as_str().is_some_and(|s| s.contains(msg)), "{msg}: {}", r.text());
    }
    let four_xx = bad.len() as u64 + 3 + post_bad.len() as u64;
    // Still serving, and the counts add up.
    let h = get(&addr, "/api/health").json();
    sent += 1;
    assert_eq!(h["requests"]["4xx"].as_u64(), Some(four_xx), "{h}");
    let s = server.stop().unwrap();
    assert_eq!((s.requests, s.s4xx, s.s5xx, s.s2xx), (sent, four_xx, 0, sent - four_xx), "{s:?}");
    assert!(s.computed > 0 && s.panics == 0);
}

/// What hyper would answer itself with a bare status and an empty body (a target over its
/// 65 534 bytes, a head over its buffer, a malformed head) gets a JSON answer naming the
/// limit, counted and logged like any other; the server keeps answering.
#[test]
fn a_request_head_refused_before_any_route_runs_gets_a_json_answer_naming_the_limit() {
    let (server, addr) = start(|o| o.head_limits.timeout = Duration::from_millis(300));
    let head = |line: &str, headers: &str| format!("{line}\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").into_bytes();
    let many: String = (0..80).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        // Beyond hyper's own limit (it answered 414 with an empty body).
        (head(&format!("GET /api/search?q={} HTTP/1.1", "a".repeat(70_000)), ""), 414, "URI too long: the request target is"),
        (head(&format!("GET /api/search?q={} HTTP/1.1", "a".repeat(20_000)), ""), 414, "bytes, the limit is 16384"),
        (head("GET /api/health HTTP/1.1", &format!("X-Big: {}\r\n", "b".repeat(40_000))), 431, "over 32768 bytes"),
        (head("GET /api/health HTTP/1.1", &format!("X-Huge: {}\r\n", "b".repeat(500_000))), 431, "over 32768 bytes"),
        (head("GET /api/health HTTP/1.1", &many), 431, "more than 64 header fields"),
        (head("G@T /api/health HTTP/1.1", ""), 400, "malformed request head"),
        (b"GET /api/search?q=caf\xe9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 400, "malformed request"),
        (b"\x16\x03\x01 hello\r\n\r\n".to_vec(), 400, "malformed request head"),
        (head("POST /api/search HTTP/1.1", "Content-Length: 12abc\r\n"), 400, "bad Content-Length"),
        // A head that stops arriving.
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\n".to_vec(), 408, "request head not received within 300 ms"),
        // Past the head: a method no route takes, unknown routes.
        (head("BREW /api/search?q=dog HTTP/1.1", ""), 405, "method BREW not allowed on /api/search"),
        (head("GET /api/search/more HTTP/1.1", ""), 404, "no route GET /api/search/more"),
    ];
    for (req, status, msg) in &cases {
        let r = raw(&addr, req).unwrap_or_else(|e| panic!("{msg}: {e}"));
        assert_eq!((r.status, r.header("content-type")), (*status, Some("application/json")), "{msg}: {}", r.text());
        let e = r.json();
        assert!(e["error"].as_str().is_some_and(|s| s.contains(msg)), "{msg}: {e}");
    }
    // A connection that sends nothing and closes is no request.
    drop(std::net::TcpStream::connect(&addr).unwrap());
    let h = get(&addr, "/api/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.header("connection"), Some("close"), "one request per connection");
    let s = server.stop().unwrap();
    assert_eq!((s.requests, s.s4xx, s.s2xx), (cases.len() as u64 + 1, cases.len() as u64, 1), "{s:?}");
}

/// Polls the health route until `cond` holds on it (at most 20 s).
fn wait_health(addr: &str, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    let t = Instant::now();
    loop {
        let h = get(addr, "/api/health").json();
        if cond(&h) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "waiting for {what}: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn full_queue_503_time_limit_504_panic_500_server_lives_on_and_stops_gracefully() {
    // The hook makes a query "slow N ..." take N ms and "panic please" panic in the worker.
    let hook: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(|q: &str| {
        if let Some(ms) = q.strip_prefix("slow ").and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if q == "panic please" {
            panic!("the test asked for a panic");
        }
    });
    let (server, addr) = start(|o| {
        (o.workers, o.queue, o.timeout) = (1, 1, Duration::from_millis(5000));
        o.hook = Some(hook);
    });
    // A computes, B waits in the queue (capacity 1), C and D are refused at once.
    let a = {
        let addr = addr.clone();
        std::thread::spawn(move || get(&addr, &search_target("slow 2000 a red dog", "")))
    };
    wait_health(&addr, "A running", |h| h["queue"]["running"] == 1);
    let b = {
        let addr = addr.clone();
        std::thread::spawn(move || get(&addr, &search_target("slow 2000 a blue cat", "")))
    };
    wait_health(&addr, "B queued", |h| h["queue"]["waiting"] == 1);
    for _ in 0..2 {
        let t = Instant::now();
        let r = get(&addr, &search_target("a green car", ""));
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.json()["error"].as_str().unwrap().contains("server busy"));
        assert!(t.elapsed() < Duration::from_millis(1500), "refused at once, not after {:?}", t.elapsed());
    }
    let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!((ra.status, rb.status), (200, 200), "{} / {}", ra.text(), rb.text());
    assert_eq!(ra.json()["query"], "slow 2000 a red dog");

    // Longer than the time limit: 504 at the limit, not when the work ends. A request queued
    // behind it whose time runs out while it waits gets 504 too and is dropped unstarted.
    let t = Instant::now();
    let slow = {
        let addr = addr.clone();
        std::thread::spawn(move || get(&addr, &search_target("slow 8000 too slow", "")))
    };
    wait_health(&addr, "the slow job running", |h| h["queue"]["running"] == 1);
    let queued = get(&addr, &search_target("a queued one", ""));
    let r = slow.join().unwrap();
    let took = t.elapsed();
    assert_eq!((r.status, queued.status), (504, 504), "{} / {}", r.text(), queued.text());
    assert!(r.json()["error"].as_str().unwrap().contains("no answer within 5000 ms"));
    assert!(took >= Duration::from_millis(4900) && took < Duration::from_millis(7500), "{took:?}");
    wait_health(&addr, "the slow job finished", |h| h["queue"]["running"] == 0 && h["queue"]["waiting"] == 0);
    assert_eq!(get(&addr, "/api/health").json()["requests"]["expired"], 1);

    // A panic while computing is a 500 JSON; the next request is answered normally.
    let r = get(&addr, &search_target("panic please", ""));
    assert_eq!(r.status, 500);
    assert!(r.json()["error"].as_str().unwrap().contains("the test asked for a panic"), "{}", r.text());
    let r = get(&addr, &search_target("a red dog", "&k=4"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["results"].as_array().unwrap().len(), 4);

    // A graceful stop finishes the request in flight before returning.
    let inflight = {
        let addr = addr.clone();
        std::thread::spawn(move || get(&addr, &search_target("slow 800 in flight at shutdown", "")))
    };
    wait_health(&addr, "the last request running", |h| h["queue"]["running"] == 1);
    let s = server.stop().unwrap();
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["query"], "slow 800 in flight at shutdown");
    assert_eq!((s.busy_503, s.timeout_504, s.panics, s.expired), (2, 2, 1, 1), "{s:?}");
    assert_eq!(s.s5xx, 5, "{s:?}");
    assert!(s.requests > 0 && std::net::TcpStream::connect(&addr).is_err(), "still listening after stop");
}

/// `--device`: a server placed on a device (the simulated one) embeds the queries and
/// re-ranks there, says so in /api/health, and answers with the host server's clips.
#[test]
fn on_a_device_the_server_answers_with_the_hosts_clips() {
    use demovlp_model::backend::sim::SimDevice;
    let w = world();
    let sim = SimDevice::new();
    let (host, host_addr) = start(|_| {});
    let (dev, dev_addr) = start(|o| o.device = Some(Arc::new(demovlp_serve::OnBackend { backend: sim.clone(), name: "sim".into() })));
    assert_eq!(dev.listening.device, "sim");
    assert_eq!(get(&dev_addr, "/api/health").json()["device"], "sim");
    assert_eq!(get(&host_addr, "/api/health").json()["device"], "cpu");
    let before = sim.snapshot().score_runs;
    for (_, q) in w.captions.iter().take(6) {
        let clips = |addr: &str| -> Vec<serde_json::Value> {
            let r = get(addr, &search_target(q, "&k=5&rerank=40"));
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["results"].as_array().unwrap().iter().map(|h| h["clip"].clone()).collect()
        };
        assert_eq!(clips(&host_addr), clips(&dev_addr), "{q}");
    }
    assert_eq!(sim.snapshot().score_runs - before, 6, "one re-rank score run per query, on the device");
    host.stop().unwrap();
    dev.stop().unwrap();
}

#[test]
fn many_concurrent_clients_are_all_answered_with_the_sequential_answers() {
    let w = world();
    let (server, addr) = start(|o| (o.workers, o.queue) = (2, 64));
    let queries: Vec<String> = w.captions.iter().take(8).map(|c| c.1.clone()).collect();
    let want: Vec<serde_json::Value> = queries.iter().map(|q| get(&addr, &search_target(q, "&k=5")).json()).collect();
    let t = Instant::now();
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let (addr, queries) = (addr.clone(), queries.clone());
            std::thread::spawn(move || {
                (0..4)
                    .map(|j| {
                        let n = (i + j) % queries.len();
                        let r = get(&addr, &search_target(&queries[n], "&k=5"));
                        (n, r.status, r.body)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answered = 0;
    for th in threads {
        for (n, status, body) in th.join().unwrap() {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap(), want[n]);
            answered += 1;
        }
    }
    assert_eq!(answered, 96);
    eprintln!("96 concurrent searches in {:.2} s", t.elapsed().as_secs_f64());
    let s = server.stop().unwrap();
    assert_eq!((s.s2xx, s.s5xx, s.busy_503), (96 + 8, 0, 0), "{s:?}");
}

#[test]
fn explanation_pictures_are_drawn_on_the_frame_images_of_images_dir() {
    let w = world();
    let dir = w.root.join("frame-images");
    let (clip, caption) = &w.captions[1];
    let e = Engine::open(&w.index).unwrap();
    let mut model = e.load_model().unwrap();
    let frames = e.explain(&mut model, clip, caption).unwrap().frames;
    std::fs::create_dir_all(dir.join(clip)).unwrap();
    let fake_png = b"\x89PNG\r\n\x1a\n-not-decoded-by-the-server-";
    for f in frames.iter().filter(|f| **f >= 0) {
        std::fs::write(dir.join(clip).join(format!("{f}.png")), fake_png).unwrap();
    }
    let (server, addr) = start(|o| o.images = Some(dir.clone()));
    let r = get(&addr, &format!("/api/explain.svg?clip={}&q={}", encode(clip), encode(caption)));
    assert_eq!(r.status, 200, "{}", r.text());
    let svg = r.text();
    let drawn = frames.iter().filter(|f| **f >= 0).count();
    assert_eq!(svg.matches("<image ").count(), drawn, "one picture per frame panel");
    assert_eq!(svg.matches("href=\"data:image/png;base64,").count(), drawn);
    // Another clip has no pictures there: plain panels.
    let other = &w.captions[0].0;
    let r = get(&addr, &format!("/api/explain.svg?clip={}&q={}", encode(other), encode(caption)));
    assert_eq!((r.status, r.text().matches("<image ").count()), (200, 0));
    server.stop().unwrap();
}

/// `POST /api/clips`: each clip's first caption from the annotation file the index was built
/// from (its absolute path recorded in index.json), a thumbnail URL when `--images` has a
/// picture of it; `/api/thumbnail` serves that picture. `--annotations` overrides the file.
#[test]
fn clips_route_gives_captions_from_the_index_annotations_and_thumbnails_from_images() {
    let w = world();
    let dir = w.root.join("thumb-images");
    let (clip, caption) = &w.captions[3];
    let other = &w.captions[4].0;
    let e = Engine::open(&w.index).unwrap();
    let first = *e.index.frames(e.index.by_id[clip]).iter().find(|f| **f >= 0).unwrap();
    std::fs::create_dir_all(dir.join(clip)).unwrap();
    let picture = b"\x89PNG\r\n\x1a\n-thumbnail-bytes-";
    std::fs::write(dir.join(clip).join(format!("{first}.png")), picture).unwrap();
    let ann = std::path::absolute(w.root.join("corpus/annotations/synth_msrvtt_test.jsonl")).unwrap();
    assert_eq!(e.index.settings().annotations[0].path, ann.display().to_string());

    let (server, addr) = start(|o| o.images = Some(dir.clone()));
    let post =
        |body: serde_json::Value| request(&addr, "POST", "/api/clips", Some(("application/json", body.to_string().as_bytes()))).unwrap();
    let r = post(serde_json::json!({"clips": [clip, other]}));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["captions_from"], serde_json::json!([ann.display().to_string()]));
    assert_eq!(j["clips"][0]["clip"], clip.as_str());
    assert_eq!(j["clips"][0]["caption"], caption.as_str());
    assert_eq!(j["clips"][1]["caption"], w.captions[4].1.as_str());
    let thumb = j["clips"][0]["thumbnail"].as_str().unwrap().to_string();
    assert_eq!(j["clips"][1]["thumbnail"], serde_json::Value::Null, "no picture of the other clip");
    let t = get(&addr, &thumb);
    assert_eq!((t.status, t.header("content-type")), (200, Some("image/png")));
    assert_eq!(t.body, picture);
    let none = get(&addr, &format!("/api/thumbnail?clip={}", encode(other)));
    assert_eq!(none.status, 404);
    assert!(none.json()["error"].as_str().unwrap().contains("no picture of clip"));
    let r = post(serde_json::json!({"clips": ["no-such-clip"]}));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("unknown clip \"no-such-clip\""));
    let r = post(serde_json::json!({"ids": []}));
    assert_eq!(r.status, 400);
    let h = get(&addr, "/api/health").json();
    assert_eq!((h["captions"].as_u64(), h["thumbnails"].as_bool()), (Some(support::CLIPS as u64), Some(true)), "{h}");
    // The explanation's word labels carry a white halo (readable over any picture).
    let svg = get(&addr, &format!("/api/explain.svg?clip={}&q={}", encode(clip), encode(caption))).text();
    let labels: Vec<&str> = svg.lines().filter(|l| l.contains("class=\"label\"")).collect();
    assert!(!labels.is_empty(), "{svg}");
    assert!(labels.iter().all(|l| l.contains("paint-order=\"stroke\"") && l.contains("stroke=\"#ffffff\"")), "{labels:?}");
    server.stop().unwrap();

    // --annotations: another file's captions; without --images no thumbnails.
    let alt = w.root.join("alt-captions.jsonl");
    std::fs::write(&alt, format!("{{\"clip\": \"{clip}\", \"captions\": [\"the other caption\"]}}\n")).unwrap();
    let (server, addr) = start(|o| o.annotations = Some(alt.clone()));
    let r = request(
        &addr,
        "POST",
        "/api/clips",
        Some(("application/json", serde_json::json!({"clips": [clip, other]}).to_string().as_bytes())),
    )
    .unwrap()
    .json();
    assert_eq!(r["clips"][0]["caption"], "the other caption");
    assert_eq!((&r["clips"][1]["caption"], &r["clips"][0]["thumbnail"]), (&serde_json::Value::Null, &serde_json::Value::Null));
    assert_eq!(get(&addr, &format!("/api/thumbnail?clip={}", encode(clip))).status, 404);
    server.stop().unwrap();
    let mut o = ServeOptions::new(w.index.clone());
    (o.addr, o.annotations) = ("127.0.0.1:0".parse().unwrap(), Some(w.root.join("no-such.jsonl")));
    let err = format!("{:#}", spawn(o).err().unwrap());
    assert!(err.contains("--annotations") && err.contains("no-such.jsonl"), "{err}");
}
