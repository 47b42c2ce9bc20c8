//! Questions the synthetic corpus can answer truthfully (issue 13 E): every clip is defined
//! by its [`ClipSpec`] (a main object with a class, a colour and a motion; maybe a second,
//! still object of another or the same class), so questions about those facts have one right
//! answer. A question is only asked when it is unambiguous (no "what colour is the dog?"
//! when the clip shows two dogs).
//!
//! | question | answer | answer type |
//! | --- | --- | --- |
//! | what colour is the {object}? | its colour (10) | color |
//! | which way does the {object} move? | left, right, up, down, nowhere | where |
//! | what is moving? (main object not still) | the main object's class (24) | object |
//! | how many objects are there? | one, two | number |

use super::world::{COLOURS, OBJECTS};
use super::{ClipSpec, Motion};

/// One question about a clip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub question: String,
    pub answer: String,
    pub answer_type: &'static str,
}

/// Every answer a question can have, in a fixed order (the answer vocabulary).
pub fn answer_vocabulary() -> Vec<String> {
    let mut v: Vec<String> = COLOURS.iter().map(|c| c.to_string()).collect();
    v.extend(["left", "right", "up", "down", "nowhere"].map(String::from));
    v.extend(OBJECTS.iter().map(|(n, _)| n.to_string()));
    v.extend(["one", "two"].map(String::from));
    v
}

fn direction(m: Motion) -> &'static str {
    match m {
        Motion::Left => "left",
        Motion::Right => "right",
        Motion::Up => "up",
        Motion::Down => "down",
        Motion::Still => "nowhere",
    }
}

/// The unambiguous questions about `clip`, in a fixed order.
pub fn questions(clip: &ClipSpec) -> Vec<Question> {
    let mut out = Vec::new();
    let q = |question: String, answer: &str, answer_type: &'static str| Question { question, answer: answer.to_string(), answer_type };
    let main = &clip.main;
    let name = OBJECTS[main.class].0;
    let same_class = clip.second.as_ref().is_some_and(|s| s.class == main.class);
    if !same_class {
        out.push(q(format!("what colour is the {name}?"), COLOURS[main.colour], "color"));
        out.push(q(format!("which way does the {name} move?"), direction(main.motion), "where"));
        if let Some(s) = &clip.second {
            out.push(q(format!("what colour is the {}?", OBJECTS[s.class].0), COLOURS[s.colour], "color"));
        }
    }
    if main.motion != Motion::Still {
        out.push(q("what is moving?".to_string(), name, "object"));
    }
    out.push(q("how many objects are there?".to_string(), if clip.second.is_some() { "two" } else { "one" }, "number"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{CorpusConfig, Split, SyntheticCorpus};

    #[test]
    fn questions_are_true_of_their_clip_and_answers_in_the_vocabulary() {
        let mut c = CorpusConfig::new(11);
        (c.pretrain_videos, c.pretrain_images, c.finetune_train, c.val, c.test) = (1, 1, 200, 1, 1);
        let corpus = SyntheticCorpus::new(c);
        let vocab = answer_vocabulary();
        let mut types = std::collections::BTreeMap::new();
        for clip in corpus.clips(Split::FinetuneTrain) {
            let qs = questions(clip);
            assert!(!qs.is_empty());
            for q in &qs {
                assert!(vocab.contains(&q.answer), "{q:?}");
                *types.entry(q.answer_type).or_insert(0) += 1;
                // The answer agrees with the clip's own caption (generated from the same spec).
                let cap = &clip.captions[0];
                match q.answer_type {
                    "color" if q.question.contains(OBJECTS[clip.main.class].0) => {
                        assert!(cap.contains(&format!("{} {}", q.answer, OBJECTS[clip.main.class].0)), "{cap:?} vs {q:?}")
                    }
                    "object" => assert!(cap.contains(&q.answer) && clip.main.motion != Motion::Still),
                    "number" => assert_eq!(q.answer == "two", clip.second.is_some()),
                    "where" if q.answer != "nowhere" => {
                        assert!(cap.contains(&q.answer) || q.answer == "up" || q.answer == "down", "{cap:?} vs {q:?}")
                    }
                    _ => {}
                }
            }
            // Never ambiguous: one question text per clip at most once.
            let mut texts: Vec<&str> = qs.iter().map(|q| q.question.as_str()).collect();
            texts.sort();
            texts.dedup();
            assert_eq!(texts.len(), qs.len());
        }
        assert_eq!(types.len(), 4, "{types:?}");
    }
}
