//! The command-line contracts of the downstream-task commands on the fixtures:
//! `demovlp mc-scores` (mc_small) and `demovlp qa-metrics` (qa_metrics.json), and their
//! refusals of bad input (exit code 1 and a message naming the file and the problem).

use std::process::{Command, Output};

use demovlp_testutil::{rel_err, testdata, tmpdir, Fixture};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).output().unwrap()
}

fn last_json_line(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim_end().lines().last().expect("no stdout")).unwrap()
}

#[test]
fn mc_scores_reproduces_mc_small() {
    let dir = tmpdir("mc-scores");
    let out = dir.join("scores.safetensors");
    let fx = testdata("mc_small.safetensors");
    let o = run(&["mc-scores", "--embeddings", fx.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = last_json_line(&o);
    assert_eq!(v["accuracy_reference"], 83.33);
    assert_eq!(v["accuracy_aligned"], 66.67);
    assert_eq!(v["questions"], 6);
    let (got, want) = (Fixture::load_path(&out), Fixture::load("mc_small.safetensors"));
    for k in ["out.scores_reference", "out.scores_aligned"] {
        assert!(rel_err(got.f(k), want.f(k)) < 1e-6, "{k}");
    }
    for k in ["out.pred_reference", "out.pred_aligned"] {
        assert_eq!(got.i(k), want.i(k), "{k}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn qa_metrics_reproduces_the_published_evaluation_and_refuses_bad_lines() {
    let dir = tmpdir("qa-metrics");
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(testdata("qa_metrics.json")).unwrap()).unwrap();
    let mut lines = String::new();
    for r in fx["results"].as_array().unwrap() {
        let gt = &fx["qid2data"][r["question_id"].to_string().as_str()];
        let pred = &fx["label2ans"][r["answer"].as_u64().unwrap() as usize];
        lines += &format!(
            "{}\n",
            serde_json::json!({"question_id": r["question_id"], "prediction": pred, "answer": gt["answer"], "answer_type": gt["answer_type"]})
        );
    }
    let good = dir.join("pred.jsonl");
    std::fs::write(&good, &lines).unwrap();
    let o = run(&["qa-metrics", "--predictions", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = last_json_line(&o);
    for (k, want) in fx["metrics"].as_object().unwrap() {
        if k == "ratios" {
            continue;
        }
        assert!((v[k].as_f64().unwrap() - want.as_f64().unwrap()).abs() < 1e-12, "{k}: {} vs {want}", v[k]);
    }

    for (tag, content, needle) in [
        ("notjson", "{\"question_id\": 1, \"prediction\": \"a\"\n", "line 1: not JSON"),
        ("noanswer", "{\"question_id\": 1, \"prediction\": \"a\"}\n", "line 1: no \"answer\""),
        ("dup", "{\"question_id\": 1, \"prediction\": \"a\", \"answer\": \"a\"}\n{\"question_id\": 1, \"prediction\": \"a\", \"answer\": \"b\"}\n", "appears twice"),
        ("empty", "\n", "no predictions"),
    ] {
        let p = dir.join(format!("{tag}.jsonl"));
        std::fs::write(&p, content).unwrap();
        let o = run(&["qa-metrics", "--predictions", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{tag}: {err}");
        assert!(err.contains(needle) && err.contains(&format!("{tag}.jsonl")), "{tag}: {err}");
    }
    let o = run(&["qa-metrics", "--predictions", dir.join("absent.jsonl").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("absent.jsonl"));
    std::fs::remove_dir_all(&dir).ok();
}
