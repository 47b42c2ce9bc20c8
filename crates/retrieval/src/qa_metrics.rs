//! Video QA accuracy as the published `evaluate_qa` computes it (SPEC §8): a prediction is
//! right when its answer string equals the ground truth's (so an answer outside the
//! vocabulary can never be right); accuracy overall and per answer type, as fractions, with
//! 0 for a type that has no questions, and each type's share of the questions.

use serde_json::{json, Map, Value};

/// The published answer types, in the published order.
pub const ANSWER_TYPES: [&str; 9] = ["what", "who", "how", "where", "when", "object", "number", "color", "location"];

/// One evaluated question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QaRecord {
    pub question_id: String,
    /// The predicted answer string.
    pub prediction: String,
    /// The ground-truth answer string.
    pub answer: String,
    /// One of [`ANSWER_TYPES`] (other types are counted overall and reported by name too);
    /// `None` when the dataset has no types (own data): counted overall only.
    pub answer_type: Option<String>,
}

/// Per-type counts.
#[derive(Clone, Debug, Default, PartialEq)]
struct Tally {
    questions: usize,
    correct: usize,
}

impl Tally {
    fn acc(&self) -> f64 {
        if self.questions == 0 {
            0.0
        } else {
            self.correct as f64 / self.questions as f64
        }
    }
}

/// `{"overall_acc", "<type>_acc" for every published type (and any other type seen),
/// "ratios": {"<type>_ratio": [share, count]}, "questions"}` — the published metrics dict
/// plus the question count.
pub fn qa_metrics(records: &[QaRecord]) -> Value {
    let mut types: Vec<(String, Tally)> = ANSWER_TYPES.iter().map(|t| (t.to_string(), Tally::default())).collect();
    let mut overall = Tally::default();
    for r in records {
        let right = r.prediction == r.answer;
        overall.questions += 1;
        overall.correct += right as usize;
        if let Some(t) = &r.answer_type {
            let i = match types.iter().position(|(name, _)| name == t) {
                Some(i) => i,
                None => {
                    types.push((t.clone(), Tally::default()));
                    types.len() - 1
                }
            };
            types[i].1.questions += 1;
            types[i].1.correct += right as usize;
        }
    }
    let mut m = Map::new();
    m.insert("overall_acc".into(), json!(overall.acc()));
    let mut ratios = Map::new();
    for (name, t) in &types {
        m.insert(format!("{name}_acc"), json!(t.acc()));
        let share = if records.is_empty() { 0.0 } else { t.questions as f64 / records.len() as f64 };
        ratios.insert(format!("{name}_ratio"), json!([share, t.questions]));
    }
    m.insert("ratios".into(), Value::Object(ratios));
    m.insert("questions".into(), json!(records.len()));
    Value::Object(m)
}
