//! Shared by the model crate's fixture tests: the model of a recorded batch.
#![allow(dead_code)]

use demovlp_model::{io, BatchRef, Model};
use demovlp_testutil::{testdata, Fixture};

/// The model with the recorded weights, loaded the way `demovlp import --key-prefix param.`
/// loads them (sizes inferred from the tensor shapes, head counts from the recorded config):
/// every declared parameter must come from the recording, and nothing but the QA head's
/// `head.*` tensors may be left over.
pub fn model(fx: &Fixture) -> Model {
    let heads = |k: &str| fx.config[k].as_u64().unwrap() as usize;
    let (m, report) = io::import_weights_report(&testdata(&fx.name), Some("param."), heads("theads"), heads("heads"))
        .unwrap_or_else(|e| panic!("{}: {e:#}", fx.name));
    assert!(report.missing.is_empty(), "{}: the recording lacks {:?}", fx.name, report.missing);
    assert_eq!(report.loaded.len(), m.params.specs().len(), "{}: every declared parameter loaded", fx.name);
    let foreign: Vec<&String> = report.skipped.iter().filter(|k| !k.starts_with("head.")).collect();
    assert!(foreign.is_empty(), "{}: parameters the model does not declare: {foreign:?}", fx.name);
    m
}

pub fn batch(fx: &Fixture) -> BatchRef<'_> {
    let s = fx.shape("in.object");
    BatchRef {
        batch: s[0],
        frames: s[1],
        regions: s[2],
        text_len: fx.shape("in.input_ids")[1],
        object: fx.f("in.object"),
        object_mask: fx.f("in.object_mask"),
        input_ids: fx.i("in.input_ids"),
        attention_mask: fx.i("in.attention_mask"),
    }
}
