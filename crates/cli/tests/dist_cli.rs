//! Issue 16, end to end against the built binary: data-parallel training over 127.0.0.1 (real
//! processes, ports chosen by the OS) computes what one process accumulating the same parts
//! computes, faults (a killed rank, mismatched configs, a rank that never starts) end every
//! rank within the timeout naming the rank, and SIGTERM on one rank gives one resumable
//! checkpoint from rank 0 whose resumed run equals an uninterrupted one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use demovlp_testutil::{assert_pinned, tmpdir};
use demovlp_train::checkpoint::LATEST;

mod common;
use common::{config, final_state, State};

/// Final parameters' hashes pinned before the training loops became one: every
/// refactoring keeps these bits.
const PIN_TWO_RANKS: &[(&str, &str)] = &[("avx512", "40c857df9f11ca97")];
const PIN_THREE_RANKS: &[(&str, &str)] = &[("avx512", "a0756a6dcd7e09e2")];
const PIN_SIGTERM_RANKS: &[(&str, &str)] = &[("avx512", "ba5e259b978a5b91")];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Parameters, moments, step count and trainer state equal bit for bit.
fn assert_same_bits(a: &State, b: &State, what: &str) {
    assert_eq!(a.0.len(), b.0.len());
    for ((na, sa, va), (nb, sb, vb)) in a.0.iter().zip(&b.0) {
        assert_eq!((na, sa), (nb, sb));
        assert!(bits(va) == bits(vb), "{what}: parameter {na} differs");
    }
    assert!(bits(&a.1) == bits(&b.1) && bits(&a.2) == bits(&b.2), "{what}: AdamW moments differ");
    assert_eq!((a.3, &a.4), (b.3, &b.4), "{what}: optimiser step or trainer state differs");
}

/// One single-process run; its JSON summary line.
fn single(cfg: &Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_demovlp")).args(["pretrain", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
}

/// A running rank: the process and its stderr as it comes.
struct Rank {
    child: Child,
    stderr: Arc<Mutex<String>>,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
}

impl Rank {
    fn spawn(args: &[&str], env: &[(&str, String)]) -> Rank {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_demovlp"));
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).env("DEMOVLP_PROGRESS_SECS", "0");
        for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST"] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let (stderr, stdout) = (Arc::new(Mutex::new(String::new())), Arc::new(Mutex::new(String::new())));
        let (tx, lines) = channel();
        let (e, err) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                err.lock().unwrap().push_str(&(l.clone() + "\n"));
                tx.send(l).ok();
            }
        });
        let (o, out) = (child.stdout.take().unwrap(), stdout.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(o).lines().map_while(Result::ok) {
                out.lock().unwrap().push_str(&(l + "\n"));
            }
        });
        Rank { child, stderr, lines, stdout }
    }

    /// The port rank 0 reports when asked to let the OS choose (DEMOVLP_RDZV_PORT=0).
    fn port(&self) -> u16 {
        let t0 = Instant::now();
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(60)).expect("rank 0 reported no port");
            if let Some(rest) = l.split("listening on port ").nth(1) {
                return rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
            }
            assert!(t0.elapsed() < Duration::from_secs(60));
        }
    }

    /// Waits for the exit; (status code, stderr, last stdout line as JSON if any).
    fn wait(mut self) -> (Option<i32>, String, Option<serde_json::Value>) {
        let st = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let err = self.stderr.lock().unwrap().clone();
        let out = self.stdout.lock().unwrap().clone();
        (st.code(), err, out.lines().last().and_then(|l| serde_json::from_str(l).ok()))
    }
}

fn rank_env(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("DEMOVLP_RDZV_PORT", port.to_string()),
    ]
}

/// `world` ranks of `args` (the same for every rank unless `per_rank` gives rank r's),
/// rank 0 first with an OS-chosen port. `extra`: more environment for every rank.
fn spawn_world(world: usize, per_rank: &dyn Fn(usize) -> Vec<String>, extra: &[(&str, String)]) -> Vec<Rank> {
    let env = |r: usize, port: u16| {
        let mut e = rank_env(r, world, port);
        e.extend(extra.iter().cloned());
        e
    };
    let a0 = per_rank(0);
    let r0 = Rank::spawn(&a0.iter().map(String::as_str).collect::<Vec<_>>(), &env(0, 0));
    let port = r0.port();
    let mut ranks = vec![r0];
    for r in 1..world {
        let a = per_rank(r);
        ranks.push(Rank::spawn(&a.iter().map(String::as_str).collect::<Vec<_>>(), &env(r, port)));
    }
    ranks
}

fn args(cfg: &Path) -> Vec<String> {
    vec!["pretrain".into(), "--config".into(), cfg.display().to_string()]
}

#[test]
fn two_ranks_equal_one_process_accumulating_two_parts_bit_for_bit() {
    let dir = tmpdir("dist-two");
    // 3 epochs of 3 steps (global batch 8 = 2 × 4: 16 clips → 2 steps, 8 images → 1),
    // validation after each; text dropout on (0.1, the default).
    let one = dir.join("one");
    let want = single(&config(&dir.join("a"), &one, 3, "accumulate_steps = 2"));
    assert_eq!(want["steps"].as_u64(), Some(9), "{want}");

    // The command-line contract: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the
    // rendezvous is on MASTER_PORT + 1 (a port the OS reported free).
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let two = dir.join("two");
    let cfg = config(&dir.join("b"), &two, 3, "");
    let ranks: Vec<Rank> = (0..2)
        .map(|r| {
            let env = vec![
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", (free - 1).to_string()),
                ("DEMOVLP_DIST_VERIFY", "1".to_string()),
            ];
            Rank::spawn(&["finetune", "--config", cfg.to_str().unwrap(), "--device", "cpu"], &env)
        })
        .collect();
    let outs: Vec<_> = ranks.into_iter().map(Rank::wait).collect();
    for (r, (code, err, _)) in outs.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}: {err}");
        // Every rank prints its progress prefixed with its rank.
        assert!(err.contains(&format!("[rank {r}] tiny: step 9/9")), "rank {r}: {err}");
    }
    let (j0, j1) = (outs[0].2.as_ref().unwrap(), outs[1].2.as_ref().unwrap());
    assert_eq!((j0["rank"].as_u64(), j1["rank"].as_u64(), j0["world_size"].as_u64()), (Some(0), Some(1), Some(2)));
    // The same parameters on both ranks (and DEMOVLP_DIST_VERIFY compared them after every step)…
    assert_eq!(j0["params_hash"], j1["params_hash"]);
    // …and the same bits as the single process accumulating both parts.
    assert_eq!(j0["params_hash"], want["params_hash"]);
    assert_pinned("dist/two_ranks", want["params_hash"].as_str().unwrap(), PIN_TWO_RANKS);
    assert_eq!(j0["best"], want["best"]);
    assert_same_bits(&final_state(&two), &final_state(&one), "2 ranks vs accumulate_steps = 2");
    // Only rank 0 wrote the run directory: one log, whose step lines match the single run's losses.
    let log = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("log.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "step")
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(log(&two), log(&one));
    assert!(two.join("summary.txt").is_file() && two.join("loss.svg").is_file());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn three_ranks_equal_the_single_process_accumulation() {
    let dir = tmpdir("dist-three");
    // N = 1 per rank: rank 0 adds the ranks' gradients in rank order, which is the order
    // the single process adds its parts in, so even three ranks agree bit for bit.
    let one = dir.join("one");
    let want = single(&config(&dir.join("a"), &one, 2, "accumulate_steps = 3"));
    assert_pinned("dist/three_ranks", want["params_hash"].as_str().unwrap(), PIN_THREE_RANKS);
    let three = dir.join("three");
    let cfg = config(&dir.join("b"), &three, 2, "");
    let outs: Vec<_> = spawn_world(3, &|_| args(&cfg), &[]).into_iter().map(Rank::wait).collect();
    for (r, (code, err, _)) in outs.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}: {err}");
    }
    let hashes: Vec<_> = outs.iter().map(|o| o.2.as_ref().unwrap()["params_hash"].clone()).collect();
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    assert_same_bits(&final_state(&three), &final_state(&one), "3 ranks vs accumulate_steps = 3");

    // Two parts per rank: each rank sums its own parts first, then rank 0 sums the ranks,
    // another association than one process's — equal within float round-off. The global
    // batch of 16 leaves the 8 images a short step (parts 2 and 3 empty, not counted).
    let four = dir.join("four");
    single(&config(&dir.join("c"), &four, 2, "accumulate_steps = 4"));
    let two_by_two = dir.join("2x2");
    let cfg = config(&dir.join("d"), &two_by_two, 2, "accumulate_steps = 2");
    let outs: Vec<_> = spawn_world(2, &|_| args(&cfg), &[]).into_iter().map(Rank::wait).collect();
    for (r, (code, err, _)) in outs.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}: {err}");
    }
    let (a, b) = (final_state(&two_by_two), final_state(&four));
    assert_eq!((a.3, a.4.step, a.4.samples_seen), (b.3, b.4.step, b.4.samples_seen));
    let mut worst = 0.0f32;
    for ((_, _, va), (_, _, vb)) in a.0.iter().zip(&b.0) {
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs() / y.abs().max(1e-2));
        }
    }
    assert!(worst < 1e-3, "2 ranks × 2 parts vs 4 parts: relative difference {worst}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_killed_rank_stops_the_others_within_the_timeout_naming_it() {
    let dir = tmpdir("dist-kill");
    let out = dir.join("run");
    let cfg = config(&dir.join("a"), &out, 500, "max_steps = 100000");
    let timeout = 4.0;
    let mut ranks = spawn_world(3, &|_| args(&cfg), &[("DEMOVLP_DIST_TIMEOUT", timeout.to_string())]);
    // Wait for training steps, then kill rank 1 (no chance to say goodbye).
    let t0 = Instant::now();
    while !ranks[1].stderr.lock().unwrap().contains("step 3/") {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step");
        std::thread::sleep(Duration::from_millis(10));
    }
    ranks[1].child.kill().unwrap();
    let killed = Instant::now();
    let r2 = ranks.pop().unwrap();
    ranks.pop().unwrap().wait();
    let (code0, err0, _) = ranks.pop().unwrap().wait();
    let (code2, err2, _) = r2.wait();
    let took = killed.elapsed().as_secs_f64();
    assert!(took < timeout + 10.0, "the ranks took {took:.1} s to stop");
    assert_eq!(code0, Some(1), "{err0}");
    assert!(err0.contains("rank 1"), "{err0}");
    assert!(!err0.contains("panicked"), "{err0}");
    assert_ne!(code2, Some(0), "{err2}");
    assert!(err2.contains("rank 1") || err2.contains("rank 0"), "{err2}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_rank_that_hangs_is_named_after_the_timeout() {
    let dir = tmpdir("dist-hang");
    let out = dir.join("run");
    let cfg = config(&dir.join("a"), &out, 500, "max_steps = 100000");
    let mut ranks = spawn_world(2, &|_| args(&cfg), &[("DEMOVLP_DIST_TIMEOUT", "2".into())]);
    let t0 = Instant::now();
    while !ranks[1].stderr.lock().unwrap().contains("step 3/") {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGSTOP: alive, connection open, but silent.
    let pid1 = ranks[1].child.id() as libc::pid_t;
    unsafe { libc::kill(pid1, libc::SIGSTOP) };
    let stopped = Instant::now();
    let r1 = ranks.pop().unwrap();
    let (code0, err0, _) = ranks.pop().unwrap().wait();
    let took = stopped.elapsed().as_secs_f64();
    unsafe { libc::kill(pid1, libc::SIGKILL) };
    unsafe { libc::kill(pid1, libc::SIGCONT) };
    r1.wait();
    assert_eq!(code0, Some(1), "{err0}");
    assert!(err0.contains("rank 1 did not answer within 2 s"), "{err0}");
    assert!((1.5..12.0).contains(&took), "rank 0 stopped after {took:.1} s");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn mismatched_configs_and_missing_ranks_end_the_rendezvous_with_a_message() {
    let dir = tmpdir("dist-rdzv");
    let a = config(&dir.join("a"), &dir.join("run"), 2, "");
    let b = config(&dir.join("b"), &dir.join("run"), 2, "max_steps = 5");
    let outs: Vec<_> = spawn_world(2, &|r| args(if r == 0 { &a } else { &b }), &[]).into_iter().map(Rank::wait).collect();
    let hash = |err: &str| err.split(", config ").nth(1).unwrap().split(',').next().unwrap().to_string();
    let (h0, h1) = (hash(&outs[0].1), hash(&outs[1].1));
    assert_ne!(h0, h1);
    for (r, (code, err, _)) in outs.iter().enumerate() {
        assert_eq!(*code, Some(1), "rank {r}: {err}");
        assert!(err.contains("config hash") && err.contains(&h0) && err.contains(&h1), "rank {r}: {err}");
    }
    assert!(!dir.join("run").join(LATEST).exists());

    // Rank 0 failing after the rendezvous (weights it cannot read) tells rank 1 why.
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let ft = |_: usize| {
        let mut v = args(&a);
        v[0] = "finetune".into();
        v.extend(["--init".into(), bad.display().to_string(), "--output-dir".into(), dir.join("ft").display().to_string()]);
        v
    };
    let outs: Vec<_> = spawn_world(2, &ft, &[]).into_iter().map(Rank::wait).collect();
    for (r, (code, err, _)) in outs.iter().enumerate() {
        assert_eq!(*code, Some(1), "rank {r}: {err}");
        assert!(err.contains("bad.safetensors"), "rank {r}: {err}");
    }
    assert!(outs[1].1.contains("rank 0 stopped the run"), "{}", outs[1].1);

    // Two of three ranks: rank 0 gives up after the rendezvous timeout naming rank 2.
    let t0 = Instant::now();
    let outs: Vec<_> = {
        let env = [("DEMOVLP_RDZV_TIMEOUT", "3".to_string())];
        let r0 = Rank::spawn(&args(&a).iter().map(String::as_str).collect::<Vec<_>>(), &[rank_env(0, 3, 0), env.to_vec()].concat());
        let port = r0.port();
        let r1 = Rank::spawn(&args(&a).iter().map(String::as_str).collect::<Vec<_>>(), &[rank_env(1, 3, port), env.to_vec()].concat());
        vec![r0.wait(), r1.wait()]
    };
    assert!(t0.elapsed() < Duration::from_secs(60));
    let (code, err, _) = &outs[0];
    assert_eq!(*code, Some(1), "{err}");
    assert!(err.contains("rendezvous timed out after 3 s") && err.contains("joined: 0, 1") && err.contains("missing: 2"), "{err}");
    let (code, err, _) = &outs[1];
    assert_eq!(*code, Some(1), "{err}");
    assert!(err.contains("missing: 2"), "{err}");
    // A lone rank 1 says it cannot reach rank 0.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env = [rank_env(1, 2, port), vec![("DEMOVLP_RDZV_TIMEOUT", "1".to_string())]].concat();
    let (code, err, _) = Rank::spawn(&args(&a).iter().map(String::as_str).collect::<Vec<_>>(), &env).wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("could not reach rank 0") && err.contains(&format!("127.0.0.1:{port}")), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_on_one_rank_gives_one_resumable_checkpoint_and_an_exact_resume() {
    let dir = tmpdir("dist-sigterm");
    let max = 60;
    let one = dir.join("one");
    let j = single(&config(&dir.join("a"), &one, 40, &format!("max_steps = {max}\naccumulate_steps = 2")));
    assert_pinned("dist/sigterm", j["params_hash"].as_str().unwrap(), PIN_SIGTERM_RANKS);
    let want = final_state(&one);

    let cut = dir.join("cut");
    let cfg = config(&dir.join("b"), &cut, 40, &format!("max_steps = {max}"));
    let mut ranks = spawn_world(2, &|_| args(&cfg), &[]);
    let t0 = Instant::now();
    while !ranks[0].stderr.lock().unwrap().contains("step 4/") {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step");
        std::thread::sleep(Duration::from_millis(5));
    }
    // What a scheduler sends — here to rank 1 only.
    unsafe { libc::kill(ranks[1].child.id() as libc::pid_t, libc::SIGTERM) };
    let (code1, err1, _) = ranks.pop().unwrap().wait();
    let (code0, err0, j0) = ranks.pop().unwrap().wait();
    assert_eq!(code1, Some(143), "{err1}");
    assert_eq!(code0, Some(143), "{err0}");
    assert!(err0.contains("--resume") && err1.contains("SIGTERM"), "{err0}\n{err1}");
    assert_eq!(j0.unwrap()["interrupted"].as_bool(), Some(true));
    let mid = final_state(&cut);
    assert!(mid.4.step >= 4 && mid.4.step < max, "stopped at step {}", mid.4.step);
    let log = std::fs::read_to_string(cut.join("log.jsonl")).unwrap();
    let end: Vec<&str> = log.lines().filter(|l| l.contains("\"kind\":\"end\"")).collect();
    assert_eq!(end.len(), 1, "one end line: {log}");
    assert!(end[0].contains("\"interrupted\":true"), "{}", end[0]);

    let resume = |r: usize| {
        let mut a = args(&cfg);
        a.push("--resume".into());
        let _ = r;
        a
    };
    let outs: Vec<_> = spawn_world(2, &resume, &[]).into_iter().map(Rank::wait).collect();
    for (r, (code, err, _)) in outs.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}: {err}");
    }
    assert_same_bits(&final_state(&cut), &want, "SIGTERM + resume on 2 ranks vs one process uninterrupted");
    std::fs::remove_dir_all(&dir).ok();
}
