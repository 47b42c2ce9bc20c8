//! `demovlp bench search` end to end at a tiny size: the JSON line's contract fields, recall
//! 1.0 with the exact scan forced, high recall through the graph.

use std::process::Command;

fn bench(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_demovlp"))
        .args(["bench", "search", "--clips", "2000", "--queries", "20", "--warmup", "2", "--dim", "64", "--frames", "2"])
        .args(["--regions", "12", "--text-len", "16", "--rerank", "50", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout {so}\nstderr {se}");
    assert_eq!(so.lines().count(), 1, "--json prints one line: {so}");
    serde_json::from_str(so.lines().last().unwrap()).unwrap_or_else(|e| panic!("{e}: {so}"))
}

fn num(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k} missing or not a number in {v}"))
}

#[test]
fn json_line_fields_and_recall() {
    let exact = bench(&["--candidates", "exact"]);
    assert_eq!(exact["clips"], 2000);
    assert!(exact["data"].as_str().unwrap().starts_with("planted"), "{exact}");
    // The whole search against exhaustive scoring, on all 20 timed queries (20 × 2000 clips is
    // within the default budget): real numbers.
    assert_eq!(exact["exhaustive_queries"], 20, "{exact}");
    for k in ["agreement_at_1", "recall_at_10_vs_exhaustive"] {
        assert!((0.0..=1.0).contains(&num(&exact, k)), "{k} in {exact}");
    }
    assert!(exact.get("exhaustive_note").is_none(), "{exact}");
    assert_eq!(exact["candidates"], "exact");
    assert_eq!(num(&exact, "recall_at_10"), 1.0);
    assert_eq!(num(&exact, "build_s"), 0.0);
    for k in ["p50_ms", "p99_ms", "rerank_p50_ms", "exact_p50_ms", "search_p50_ms", "peak_rss_mb"] {
        assert!(num(&exact, k) > 0.0, "{k} in {exact}");
    }
    assert!(num(&exact, "p50_ms") <= num(&exact, "p99_ms"));

    let ann = bench(&["--candidates", "ann", "--ef-sweep", "8,200"]);
    assert_eq!(ann["candidates"], "ann");
    assert!(num(&ann, "build_s") > 0.0);
    let r = num(&ann, "recall_at_10");
    assert!((0.95..=1.0).contains(&r), "recall@10 {r}");
    assert_eq!(ann["sweep"].as_array().unwrap().len(), 3);
    assert!(num(&ann["sweep"][2], "recall_at_10") >= num(&ann["sweep"][1], "recall_at_10"), "ef 200 below ef 8: {ann}");
    assert!(num(&ann, "ratio_vs_exact") > 0.0);

    // Bad settings: exit 1 naming the flag, no panic.
    let out =
        Command::new(env!("CARGO_BIN_EXE_demovlp")).args(["bench", "search", "--clips", "100", "--quantization", "q4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("quantization"));
}
