//! QA accuracy against `testdata/qa_metrics.json` (the published `evaluate_qa` on a list of
//! predictions, some ground truths outside the vocabulary, one type with no questions).

use demovlp_retrieval::qa_metrics::{qa_metrics, QaRecord, ANSWER_TYPES};
use demovlp_testutil::testdata;

#[test]
fn reproduces_the_published_evaluate_qa() {
    let fx: serde_json::Value = serde_json::from_slice(&std::fs::read(testdata("qa_metrics.json")).unwrap()).unwrap();
    let label2ans: Vec<&str> = fx["label2ans"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let records: Vec<QaRecord> = fx["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let qid = r["question_id"].to_string();
            let gt = &fx["qid2data"][qid.as_str()];
            QaRecord {
                question_id: qid.clone(),
                prediction: label2ans[r["answer"].as_u64().unwrap() as usize].to_string(),
                answer: gt["answer"].as_str().unwrap().to_string(),
                answer_type: Some(gt["answer_type"].as_str().unwrap().to_string()),
            }
        })
        .collect();
    // Some ground-truth answers cannot be predicted at all.
    assert!(records.iter().any(|r| !label2ans.contains(&r.answer.as_str())));
    let got = qa_metrics(&records);
    let want = &fx["metrics"];
    let close = |a: &serde_json::Value, b: &serde_json::Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-12;
    assert!(close(&got["overall_acc"], &want["overall_acc"]), "overall {} vs {}", got["overall_acc"], want["overall_acc"]);
    for t in ANSWER_TYPES {
        let k = format!("{t}_acc");
        assert!(close(&got[&k], &want[&k]), "{k}: {} vs {}", got[&k], want[&k]);
        let r = format!("{t}_ratio");
        assert!(close(&got["ratios"][&r][0], &want["ratios"][&r][0]), "{r}");
        assert_eq!(got["ratios"][&r][1], want["ratios"][&r][1], "{r}");
    }
    assert_eq!(want["color_acc"], 0, "the fixture has a type without questions");
    assert_eq!(got["questions"], records.len());
}
