//! The README's search walk-through, as a new user runs it: `demo --quick --out`, then
//! `index` with default settings (frames, regions, text length from the model's training
//! config), then `search`. Checks that search at its defaults finds what `eval` finds on the
//! same clips (R@1 and R@10 within 2 points, first caption as `eval` uses), and the CLI
//! contract: on an index of every split, `search --queries FILE -k 10 --json` at defaults
//! agrees with exhaustive scoring (`--rerank N`, N ≥ clips) on the top clip for ≥ 95 % of
//! the test captions (first and second alike) and returns ≥ 95 % of its top 10. Also: the
//! index works from another directory, appending with another model is refused naming
//! both, and `search --json | head -1` ends quietly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn demovlp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_demovlp"))
}

fn run(args: &[&str], cwd: Option<&Path>) -> String {
    let mut c = demovlp();
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let o = c.output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "demovlp {args:?} failed\nstdout {so}\nstderr {se}");
    so
}

fn results(jsonl: &str) -> Vec<Vec<String>> {
    jsonl
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["results"].as_array().unwrap().iter().map(|h| h["clip"].as_str().unwrap().to_string()).collect()
        })
        .collect()
}

/// (agreement@1, recall@10) of `got` against `exhaustive`, per query lists of clip ids.
fn agreement(got: &[Vec<String>], exhaustive: &[Vec<String>]) -> (f64, f64) {
    assert_eq!(got.len(), exhaustive.len());
    let n = got.len() as f64;
    let top = got.iter().zip(exhaustive).filter(|(g, e)| g.first() == e.first()).count() as f64 / n;
    let rec = got.iter().zip(exhaustive).map(|(g, e)| e.iter().filter(|c| g.contains(c)).count() as f64 / e.len() as f64).sum::<f64>() / n;
    (top, rec)
}

#[test]
fn readme_walkthrough_search_finds_what_eval_finds() {
    let dir = demovlp_testutil::tmpdir("search-walkthrough");
    let out = dir.join("demo-out");
    run(&["demo", "--quick", "--out", out.to_str().unwrap()], None);
    let ann = out.join("corpus/annotations/synth_msrvtt_test.jsonl");
    let samples: Vec<Value> = std::fs::read_to_string(&ann).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(samples.len(), 500);
    let captions = |i: usize| -> PathBuf {
        let p = dir.join(format!("captions{i}.txt"));
        let text: Vec<&str> = samples.iter().map(|s| s["captions"][i].as_str().unwrap()).collect();
        std::fs::write(&p, text.join("\n") + "\n").unwrap();
        p
    };
    let (q1, q2) = (captions(0), captions(1));
    let model = out.join("global_rwa_model");
    let features = out.join("corpus/features");

    // The walk-through: index the test split with default settings, paths as typed (relative).
    run(
        &[
            "index",
            "--model",
            "demo-out/global_rwa_model",
            "--features",
            "demo-out/corpus/features",
            "--annotations",
            "demo-out/corpus/annotations/synth_msrvtt_test.jsonl",
            "--out",
            "my-index",
        ],
        Some(&dir),
    );
    let idx = dir.join("my-index");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(idx.join("index.json")).unwrap()).unwrap();
    let st = &m["settings"];
    // Frames, regions and text length come from the model's training config (the demo's
    // --quick fine-tuning: 4 frames × 10 regions, 24 tokens), the model path is stored absolute.
    assert_eq!((st["frames"].as_u64(), st["regions"].as_u64(), st["text_len"].as_u64()), (Some(4), Some(10), Some(24)), "{st}");
    assert!(Path::new(st["model"].as_str().unwrap()).is_absolute(), "{st}");
    assert!(st["shape_from"].as_str().unwrap().ends_with("train_config.toml"), "{st}");

    // Search from another directory, at defaults, each clip's first caption (what eval uses).
    let got =
        results(&run(&["search", idx.to_str().unwrap(), "--queries", q1.to_str().unwrap(), "-k", "10", "--json"], Some(Path::new("/"))));
    let clips: Vec<&str> = samples.iter().map(|s| s["clip"].as_str().unwrap()).collect();
    let n = clips.len() as f64;
    let r1 = 100.0 * got.iter().zip(&clips).filter(|(g, c)| g.first().map(String::as_str) == Some(**c)).count() as f64 / n;
    let r10 = 100.0 * got.iter().zip(&clips).filter(|(g, c)| g.iter().any(|x| x == *c)).count() as f64 / n;
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(out.join("global_rwa_test_metrics.json")).unwrap()).unwrap();
    let (e1, e10) = (eval["t2v"]["R1"].as_f64().unwrap(), eval["t2v"]["R10"].as_f64().unwrap());
    eprintln!("search R@1 {r1:.1} R@10 {r10:.1}; eval R@1 {e1:.1} R@10 {e10:.1}");
    assert!((r1 - e1).abs() <= 2.0 && (r10 - e10).abs() <= 2.0, "search R@1 {r1} R@10 {r10}, eval R@1 {e1} R@10 {e10}");
    assert!(e1 > 10.0, "the demo model is far above chance: eval R@1 {e1}");

    // The contract: every split in one index (`--all` finds the nested clip folders).
    let all = dir.join("all-index");
    let so = run(
        &["index", "--model", model.to_str().unwrap(), "--features", features.to_str().unwrap(), "--all", "--out", all.to_str().unwrap()],
        None,
    );
    let summary: Value = serde_json::from_str(so.lines().last().unwrap()).unwrap();
    let total = summary["total_clips"].as_u64().unwrap();
    assert!(total > 1000, "{summary}");
    for q in [&q1, &q2] {
        let q = q.to_str().unwrap();
        let a = all.to_str().unwrap();
        let fast = results(&run(&["search", a, "--queries", q, "-k", "10", "--json"], None));
        let exh = results(&run(&["search", a, "--queries", q, "-k", "10", "--json", "--rerank", &total.to_string()], None));
        let (top, rec) = agreement(&fast, &exh);
        let old = results(&run(&["search", a, "--queries", q, "-k", "10", "--json", "--first-stage", "global"], None));
        let (otop, orec) = agreement(&old, &exh);
        eprintln!("{q}: defaults agreement@1 {top:.3} recall@10 {rec:.3}; global first stage {otop:.3} / {orec:.3}");
        assert!(top >= 0.95 && rec >= 0.95, "{q}: agreement@1 {top}, recall@10 {rec} against exhaustive scoring");
    }

    // The benchmark on a collection this model embeds: the JSON line's contract fields.
    let so = run(
        &[
            "bench",
            "search",
            "--model",
            model.to_str().unwrap(),
            "--clips",
            "1500",
            "--queries",
            "20",
            "--exhaustive-queries",
            "10",
            "--json",
        ],
        None,
    );
    let b: Value = serde_json::from_str(so.lines().last().unwrap()).unwrap();
    assert!(b["data"].as_str().unwrap().contains("model-embedded"), "{b}");
    assert_eq!((b["clips"].as_u64(), b["exhaustive_queries"].as_u64()), (Some(1500), Some(10)), "{b}");
    assert!(b["index_bytes"].as_u64().unwrap() > 1500 * 40 * 64 * 2, "{b}");
    for f in ["agreement_at_1", "recall_at_10_vs_exhaustive"] {
        assert!(b[f].as_f64().unwrap() >= 0.9, "{f}: {b}");
    }
    assert!(b["p50_ms"].as_f64().unwrap() > 0.0 && b["build_s"].as_f64().unwrap() > 0.0, "{b}");
    // The cascade's coarse depth at 1500 clips (its minimum) and the previous release's stage
    // measured beside it, no better than the cascade.
    assert_eq!(b["coarse_depth"].as_u64(), Some(1000), "{b}");
    let codes = b["codes_stage"]["recall_at_10_vs_exhaustive"].as_f64().unwrap();
    assert!(codes <= b["recall_at_10_vs_exhaustive"].as_f64().unwrap(), "{b}");

    // Appending with another model is refused, naming both.
    let o = demovlp()
        .args(["index", "--model", out.join("global_model").to_str().unwrap(), "--features", features.to_str().unwrap()])
        .args(["--annotations", out.join("corpus/annotations/synth_msrvtt_val.jsonl").to_str().unwrap(), "--out", idx.to_str().unwrap()])
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{se}");
    assert!(se.contains("global_model") && se.contains("global_rwa_model"), "{se}");

    // A closed stdout ends the command quietly.
    let mut child = demovlp()
        .args(["search", idx.to_str().unwrap(), "--queries", q1.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"query\""), "{line}");
    let o = child.wait_with_output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{se}");
    assert!(!se.contains("panicked"), "{se}");
    std::fs::remove_dir_all(&dir).ok();
}
