//! `demovlp eval-mc` end to end (issue 13 B): a model imported from the `model_tiny`
//! recording, real extractor-layout clips (`testdata/region_features`), our JSONL question
//! format, a small WordPiece vocabulary. Checked: the predictions file (one line per
//! question, prediction = argmax of its scores, `correct` = prediction == answer), the
//! accuracy = share of correct lines, the two combinations agree on option 0 (both use
//! cos(text_0, v) there), a question asked twice with its options in another order scores as
//! the same options, `--reference-eval` reports the published combination, and a clip
//! without features is an error naming it.

use std::process::Command;

use demovlp_testutil::{testdata, tmpdir};
use serde_json::Value;

fn demovlp(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_demovlp")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn vocab() -> String {
    let mut v: Vec<String> = (0..100).map(|i| if i == 0 { "[PAD]".into() } else { format!("[unused{i}]") }).collect();
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    v.extend("a the man woman dog cat is runs sits on in red blue car road table plays ball".split(' ').map(String::from));
    v.join("\n") + "\n"
}

#[test]
fn eval_mc_on_real_clips_writes_consistent_predictions() {
    let dir = tmpdir("eval-mc-cli");
    let model = dir.join("model");
    let (ok, _, err) = demovlp(&[
        "import",
        testdata("model_tiny.safetensors").to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--key-prefix",
        "param.",
        "--text-heads",
        "4",
        "--video-heads",
        "4",
    ]);
    assert!(ok, "{err}");
    std::fs::write(dir.join("vocab.txt"), vocab()).unwrap();
    let opts = ["a man runs on the road", "a red car", "a cat sits on a table", "a woman plays ball"];
    let perm = [opts[2], opts[0], opts[3], opts[1]]; // the same options, another order
    let q = |clip: &str, o: &[&str], ans: usize| serde_json::json!({"clip": clip, "options": o, "answer": ans}).to_string();
    let lines = [q("video7020", &opts, 0), q("video9771", &opts, 2), q("video7020", &perm, 1), q("video9771", &opts, 3)];
    let questions = dir.join("q.jsonl");
    std::fs::write(&questions, lines.join("\n") + "\n").unwrap();
    let pred = dir.join("pred.jsonl");
    let (features, vocab_path) = (testdata("region_features"), dir.join("vocab.txt"));
    let base = [
        "eval-mc",
        "--model",
        model.to_str().unwrap(),
        "--questions",
        questions.to_str().unwrap(),
        "--features",
        features.to_str().unwrap(),
        "--tokenizer",
        vocab_path.to_str().unwrap(),
        "--frames",
        "3",
        "--regions",
        "5",
        "--text-len",
        "12",
    ];
    let mut args = base.to_vec();
    args.extend(["--predictions", pred.to_str().unwrap()]);
    let (ok, out, err) = demovlp(&args);
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((summary["task"].as_str(), summary["mode"].as_str(), summary["questions"].as_u64()), (Some("mc"), Some("aligned"), Some(4)));

    let rows: Vec<Value> = std::fs::read_to_string(&pred).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    let f = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
    let argmax = |s: &[f64]| (0..s.len()).fold(0, |b, i| if s[i] > s[b] { i } else { b });
    let mut correct = 0;
    for (i, r) in rows.iter().enumerate() {
        let (al, re) = (f(&r["scores_aligned"]), f(&r["scores_reference"]));
        assert_eq!(al.len(), 4);
        assert_eq!(f(&r["scores"]), al, "default mode is the corrected combination");
        assert_eq!(r["prediction"].as_u64().unwrap() as usize, argmax(&al), "row {i}");
        assert_eq!(r["prediction_reference"].as_u64().unwrap() as usize, argmax(&re), "row {i}");
        assert_eq!(r["correct"].as_bool().unwrap(), r["prediction"] == r["answer"]);
        assert_eq!(al[0], re[0], "row {i}: both combinations use cos(text_0, v) for option 0");
        correct += r["correct"].as_bool().unwrap() as usize;
    }
    assert!((summary["accuracy"].as_f64().unwrap() - 25.0 * correct as f64).abs() < 1e-9, "{summary}");
    // Question 2 = question 0's clip with permuted options: the same scores, permuted.
    let (a0, a2) = (f(&rows[0]["scores_aligned"]), f(&rows[2]["scores_aligned"]));
    for (j, o) in perm.iter().enumerate() {
        let i0 = opts.iter().position(|x| x == o).unwrap();
        assert!((a2[j] - a0[i0]).abs() < 1e-5, "option {o:?}: {} vs {}", a2[j], a0[i0]);
    }
    assert!(a0.iter().any(|&x| (x - a0[0]).abs() > 1e-6), "all options scored alike: {a0:?}");

    let mut args = base.to_vec();
    args.push("--reference-eval");
    let (ok, out, err) = demovlp(&args);
    assert!(ok, "{err}");
    let s2: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(s2["mode"], "reference");
    assert_eq!(s2["accuracy"], summary["accuracy_reference"]);
    let ref_correct = rows.iter().filter(|r| r["prediction_reference"] == r["answer"]).count();
    assert!((s2["accuracy"].as_f64().unwrap() - 25.0 * ref_correct as f64).abs() < 1e-9);

    // A question about a clip that has no features: an error naming it.
    std::fs::write(&questions, q("no_such_clip", &opts, 0) + "\n").unwrap();
    let (ok, _, err) = demovlp(&base);
    assert!(!ok && err.contains("no_such_clip"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
