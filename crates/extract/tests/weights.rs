//! Weight loading: sizes read from the keys and shapes, every key checked with errors that
//! name it, and the synthesiser's anchors equal to the checkpoint buffer.

use demovlp_extract::load_weights;
use demovlp_extract::synth::{caffe_cell_anchors, random_state_dict};
use demovlp_extract::weights::from_tensors;
use demovlp_extract::weights::Arch;
use demovlp_model::io::safetensors::Tensor;
use demovlp_testutil::testdata;

fn small() -> Arch {
    Arch {
        stem: 16,
        blocks: [2, 1, 3, 1],
        widths: [24, 32, 48, 64],
        bottlenecks: [4, 8, 12, 16],
        rpn_conv: 8,
        anchors: 12,
        classes: 7,
        attributes: 5,
        cls_embed: 6,
        attr_hidden: 10,
    }
}

fn err(sd: std::collections::BTreeMap<String, Tensor>) -> String {
    format!("{:#}", from_tensors(sd).unwrap_err())
}

#[test]
fn sizes_come_from_keys_and_shapes() {
    let a = small();
    let w = from_tensors(random_state_dict(&a, 1)).unwrap();
    assert_eq!(w.arch.blocks, a.blocks);
    assert_eq!(w.arch.widths, a.widths);
    assert_eq!(w.arch.bottlenecks, a.bottlenecks);
    assert_eq!((w.arch.stem, w.arch.rpn_conv, w.arch.anchors), (16, 8, 12));
    assert_eq!((w.arch.classes, w.arch.attributes, w.arch.cls_embed, w.arch.attr_hidden), (7, 5, 6, 10));
    // Projection shortcuts exactly where the width changes (16 -> 24 in res2 here).
    assert!(w.stages[0][0].shortcut.is_some() && w.stages[0][1].shortcut.is_none());
    // Strides: res3/res4's first conv1, never res5's; res5's conv2 dilated.
    assert_eq!((w.stages[1][0].conv1.spec.stride, w.stages[2][0].conv1.spec.stride, w.res5[0].conv1.spec.stride), (2, 2, 1));
    assert_eq!((w.res5[0].conv2.spec.dilation, w.res5[0].conv2.spec.pad), (2, 2));
}

#[test]
fn every_key_is_checked_by_name() {
    let base = || random_state_dict(&small(), 1);
    for key in [
        "backbone.stem.conv1.norm.running_var",
        "backbone.res4.2.conv3.weight",
        "backbone.res3.0.shortcut.weight",
        "proposal_generator.anchor_generator.cell_anchors.0",
        "proposal_generator.rpn_head.anchor_deltas.bias",
        "roi_heads.res5.0.conv2.norm.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.attr_linear2.bias",
    ] {
        let mut sd = base();
        sd.remove(key);
        let e = err(sd);
        assert!(e.contains(key), "removing {key}: {e}");
    }
    // Wrong shapes name the key and both shapes.
    let mut sd = base();
    sd.insert("backbone.res2.1.conv2.weight".into(), Tensor::f32(vec![4, 4, 1, 1], vec![0.0; 16]));
    let e = err(sd);
    assert!(e.contains("backbone.res2.1.conv2.weight") && e.contains("[4, 4, 1, 1]") && e.contains("[4, 4, 3, 3]"), "{e}");
    let mut sd = base();
    sd.insert("roi_heads.box_predictor.cls_embed.weight".into(), Tensor::f32(vec![6, 6], vec![0.0; 36]));
    assert!(err(sd).contains("roi_heads.box_predictor.cls_embed.weight"));
    // A stage with no blocks at all.
    let mut sd = base();
    sd.retain(|k, _| !k.starts_with("roi_heads.res5."));
    assert!(err(sd).contains("roi_heads.res5.0.conv1.weight"));
    // Extra keys are reported, not fatal.
    let mut sd = base();
    sd.insert("backbone.res2.0.conv1.norm.num_batches_tracked".into(), Tensor::i64(vec![], vec![0]));
    assert_eq!(from_tensors(sd).unwrap().unused, vec!["backbone.res2.0.conv1.norm.num_batches_tracked".to_string()]);
}

#[test]
fn synthesised_anchors_are_the_checkpoint_buffer() {
    let w = load_weights(&testdata("extract/bua_tiny.pth")).unwrap();
    assert_eq!(caffe_cell_anchors(), w.cell_anchors);
}

#[test]
fn unreadable_weight_files_are_named() {
    let dir = demovlp_testutil::tmpdir("extract-weights");
    let p = dir.join("junk.pth");
    std::fs::write(&p, b"hello world").unwrap();
    let e = format!("{:#}", load_weights(&p).unwrap_err());
    assert!(e.contains("junk.pth"), "{e}");
    let e = format!("{:#}", load_weights(&dir.join("missing.pth")).unwrap_err());
    assert!(e.contains("missing.pth"), "{e}");
}
