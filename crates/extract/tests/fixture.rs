//! The detector against `testdata/extract/` (the bottom-up-attention fixture: a reduced-width
//! detector of the published topology with seeded weights, three frames, every stage's
//! tensors, NMS and selection cases, and the reference's `.npz` files). Tolerances are the
//! fixture README's.

use std::collections::BTreeSet;

use demovlp_extract::image::{blob_scale, make_blob};
use demovlp_extract::nms::{nms, select, BoxF, SelectConfig};
use demovlp_extract::roi::roi_pool;
use demovlp_extract::{load_weights, Detector, DetectorConfig, Frame};
use demovlp_model::Cpu;
use demovlp_testutil::{testdata, Fixture};

fn boxes(v: &[f32]) -> Vec<BoxF> {
    v.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Per-entry relative error with an absolute floor.
fn assert_rel(got: &[f32], want: &[f32], rel: f32, floor: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * w.abs().max(floor), "{what}[{i}]: {g} vs {w}");
    }
}

/// NCHW `[1, C, H, W]` → NHWC.
fn nchw_to_nhwc(v: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut o = vec![0.0; v.len()];
    for ci in 0..c {
        for y in 0..h {
            for x in 0..w {
                o[(y * w + x) * c + ci] = v[(ci * h + y) * w + x];
            }
        }
    }
    o
}

#[test]
fn nms_cases_exact() {
    let f = Fixture::load("extract/extract_cases.safetensors");
    let meta = f.meta_json("meta");
    let cases = meta["nms"].as_object().unwrap();
    assert_eq!(cases.len(), 9);
    for (name, c) in cases {
        let thresh = c["thresh"].as_f64().unwrap() as f32;
        let keep = nms(&boxes(f.f(&format!("nms.{name}.boxes"))), f.f(&format!("nms.{name}.scores")), thresh);
        let want: Vec<usize> = f.i(&format!("nms.{name}.keep")).iter().map(|&i| i as usize).collect();
        assert_eq!(keep, want, "nms case {name}");
    }
}

#[test]
fn selection_cases_exact() {
    let f = Fixture::load("extract/extract_cases.safetensors");
    let meta = f.meta_json("meta");
    let cases = meta["selection"].as_object().unwrap();
    assert_eq!(cases.len(), 6);
    for (name, c) in cases {
        let classes = c["num_classes"].as_u64().unwrap() as usize;
        let (keep, max_conf) =
            select(&boxes(f.f(&format!("sel.{name}.boxes"))), f.f(&format!("sel.{name}.probs")), classes, &SelectConfig::default());
        let want: Vec<usize> = f.i(&format!("sel.{name}.keep")).iter().map(|&i| i as usize).collect();
        assert_eq!(keep, want, "selection case {name}");
        assert_eq!(max_conf, f.f(&format!("sel.{name}.max_conf")), "selection case {name}: max_conf");
    }
}

#[test]
fn both_pth_formats_load_the_same_weights() {
    let a = load_weights(&testdata("extract/bua_tiny.pth")).unwrap();
    let b = load_weights(&testdata("extract/bua_tiny_legacy.pth")).unwrap();
    assert_eq!(a.source_key, "model");
    assert_eq!(b.source_key, "model");
    assert_eq!(a.arch, b.arch);
    assert_eq!(a.arch.blocks, [1, 1, 2, 2]);
    assert_eq!(a.arch.widths, [8, 16, 32, 64]);
    assert_eq!(a.arch.bottlenecks, [4, 8, 16, 32]);
    assert_eq!((a.arch.stem, a.arch.rpn_conv, a.arch.anchors), (8, 32, 12));
    assert_eq!((a.arch.classes, a.arch.attributes, a.arch.cls_embed, a.arch.attr_hidden), (1601, 401, 256, 512));
    // res2's first block keeps its width (8 -> 8): no projection; res3's has one.
    assert!(a.stages[0][0].shortcut.is_none() && a.stages[1][0].shortcut.is_some());
    assert_eq!(a.stem.w, b.stem.w);
    assert_eq!(a.res5[1].conv3.w, b.res5[1].conv3.w);
    assert_eq!(a.cls_embed, b.cls_embed);
    assert_eq!(a.cell_anchors[0], [-38.0, -16.0, 53.0, 31.0]);
    assert_eq!(a.cell_anchors[11], [-168.0, -344.0, 183.0, 359.0]);
    assert!(a.unused.is_empty(), "{:?}", a.unused);
}

struct Frames {
    f: Fixture,
    det: Detector<Cpu>,
    meta: serde_json::Value,
}

fn setup() -> Frames {
    let f = Fixture::load("extract/extract_tiny.safetensors");
    let meta = f.meta_json("meta");
    let w = load_weights(&testdata("extract/bua_tiny.pth")).unwrap();
    Frames { det: Detector::new(Cpu, &w, DetectorConfig::default()), f, meta }
}

fn frame(f: &Fixture, i: usize) -> Frame {
    let shape = &f.u8s[&format!("frame{i}.image_bgr")].0;
    Frame { h: shape[0], w: shape[1], bgr: f.u8(&format!("frame{i}.image_bgr")).to_vec() }
}

#[test]
fn blob_is_bit_exact() {
    let f = Fixture::load("extract/extract_tiny.safetensors");
    let meta = f.meta_json("meta");
    for i in 0..3 {
        let fr = frame(&f, i);
        let m = &meta["frames"][i];
        let s = blob_scale(fr.h, fr.w, 600, 1000);
        assert_eq!(s, m["im_scale"].as_f64().unwrap(), "frame {i}: scale");
        let b = make_blob(&fr, s);
        assert_eq!([b.h, b.w], [m["blob_hw"][0].as_u64().unwrap() as usize, m["blob_hw"][1].as_u64().unwrap() as usize]);
        let (rows, cols) = (f.i(&format!("frame{i}.blob_rows")), f.i(&format!("frame{i}.blob_cols")));
        let want = f.f(&format!("frame{i}.blob_sub"));
        let mut bad = 0;
        for c in 0..3 {
            for (ri, &r) in rows.iter().enumerate() {
                for (ci, &col) in cols.iter().enumerate() {
                    let got = b.data[(r as usize * b.w + col as usize) * 3 + c];
                    let w = want[(c * rows.len() + ri) * cols.len() + ci];
                    if got.to_bits() != w.to_bits() {
                        bad += 1;
                    }
                }
            }
        }
        assert_eq!(bad, 0, "frame {i}: {bad} blob values differ in bits");
    }
}

/// Every stage of each frame: res4, RPN probabilities, the sorted candidates, NMS,
/// proposals, RoIPool, features, heads, selection and the npz content.
#[test]
fn stages_match_the_reference() {
    let Frames { f, det, meta } = setup();
    for i in 0..3 {
        let p = |n: &str| format!("frame{i}.{n}");
        let m = &meta["frames"][i];
        let t = det.trace(&frame(&f, i));
        // res4
        let (h4, w4) = t.res4_hw;
        assert_eq!([h4, w4], [m["res4_hw"][0].as_u64().unwrap() as usize, m["res4_hw"][1].as_u64().unwrap() as usize]);
        let res4_ref = nchw_to_nhwc(f.f(&p("res4")), 32, h4, w4);
        let err = max_abs_diff(&t.res4, &res4_ref);
        assert!(err <= 1e-5 * max_abs(&res4_ref), "frame {i}: res4 error {err}");
        // RPN
        assert!(max_abs_diff(&t.proposals.fg_prob, f.f(&p("rpn_fg_prob"))) <= 1e-5, "frame {i}: rpn_fg_prob");
        let counts = &m["gaps"]["counts"];
        assert_eq!(t.proposals.topk_index.len(), counts["pre_nms"].as_u64().unwrap() as usize, "frame {i}: pre-NMS count");
        let topk_ref: Vec<usize> = f.i(&p("rpn_topk_index")).iter().map(|&x| x as usize).collect();
        // The proposal set must be exact; the order may differ only at the listed near ties.
        let keep_ref: Vec<usize> = f.i(&p("rpn_nms_keep")).iter().map(|&k| topk_ref[k as usize]).collect();
        let keep_got: Vec<usize> = t.proposals.nms_keep.iter().map(|&k| t.proposals.topk_index[k]).collect();
        assert_eq!(keep_got.iter().collect::<BTreeSet<_>>(), keep_ref.iter().collect::<BTreeSet<_>>(), "frame {i}: proposal set");
        let ties: BTreeSet<usize> =
            m["gaps"]["near_tie_rows"].as_array().unwrap().iter().map(|r| r[0].as_u64().unwrap() as usize).collect();
        for r in 0..keep_ref.len() {
            if keep_got[r] != keep_ref[r] {
                assert!(ties.contains(&r) || (r > 0 && ties.contains(&(r - 1))), "frame {i}: proposal row {r} out of order");
            }
        }
        let props_ref = f.f(&p("proposals"));
        let props_got: Vec<f32> = t.proposals.boxes.iter().flatten().copied().collect();
        let order_agrees = keep_got == keep_ref;
        if order_agrees {
            assert!(max_abs_diff(&props_got, props_ref) <= 2e-3, "frame {i}: proposals");
            assert!(max_abs_diff(&t.proposals.scores, f.f(&p("proposal_scores"))) <= 1e-5, "frame {i}: proposal scores");
        }
        // Decoded boxes of the sorted candidates (the common prefix where both orders agree).
        let n_cmp = t.proposals.topk_index.iter().zip(&topk_ref).take_while(|(a, b)| a == b).count();
        assert!(n_cmp >= 300, "frame {i}: sorted candidates agree on only {n_cmp}");
        let tb: Vec<f32> = t.proposals.topk_boxes[..n_cmp].iter().flatten().copied().collect();
        assert!(max_abs_diff(&tb, &f.f(&p("rpn_topk_boxes"))[..4 * n_cmp]) <= 2e-3, "frame {i}: topk boxes");

        // RoIPool and features, given the reference proposals and res4.
        let ref_boxes = boxes(props_ref);
        let pooled = roi_pool(&res4_ref, h4, w4, 32, &ref_boxes[..6], 14, 1.0 / 16.0);
        let want = f.f(&p("roipool_first"));
        let mut want_nhwc = Vec::new();
        for r in 0..6 {
            want_nhwc.extend(nchw_to_nhwc(&want[r * 32 * 196..(r + 1) * 32 * 196], 32, 14, 14));
        }
        assert!(max_abs_diff(&pooled, &want_nhwc) <= 1e-5 * max_abs(&want_nhwc), "frame {i}: roipool");
        let x = det.box_features(&res4_ref, h4, w4, &ref_boxes);
        let x_ref = f.f(&p("x"));
        let err = max_abs_diff(&x, x_ref);
        assert!(err <= 1e-5 * max_abs(x_ref), "frame {i}: x error {err}");
        let (cls, attr, labels) = det.heads(x_ref);
        let labels_ref: Vec<usize> = f.i(&p("cls_argmax_with_bg")).iter().map(|&l| l as usize).collect();
        assert_eq!(labels, labels_ref, "frame {i}: class argmax");

        // Selection on the reference proposals' probabilities.
        let sel_ref: Vec<usize> = f.i(&p("selected")).iter().map(|&s| s as usize).collect();
        let dets_ref = boxes(f.f(&p("dets")));
        let (sel, max_conf) = select(&dets_ref, &cls, 1601, &SelectConfig::default());
        assert_eq!(sel, sel_ref, "frame {i}: selected (reference proposals)");
        assert_rel(&max_conf, f.f(&p("max_conf")), 1e-4, 1e-3, &format!("frame {i}: max_conf"));
        let cls_sel: Vec<f32> = sel.iter().flat_map(|&r| cls[r * 1601..(r + 1) * 1601].to_vec()).collect();
        assert_rel(&cls_sel, f.f(&p("cls_prob_selected")), 1e-4, 1e-6, &format!("frame {i}: cls_prob"));
        let attr_sel: Vec<f32> = sel.iter().flat_map(|&r| attr[r * 401..(r + 1) * 401].to_vec()).collect();
        assert_rel(&attr_sel, f.f(&p("attr_prob_selected")), 1e-4, 1e-6, &format!("frame {i}: attr_prob"));

        // End to end: the npz content.
        let r = &t.regions;
        assert_eq!(r.len(), m["num_bbox"].as_u64().unwrap() as usize, "frame {i}: num_bbox");
        let ids: Vec<i64> = r.objects_id.clone();
        assert_eq!(ids, f.i(&p("npz.objects_id")), "frame {i}: objects_id");
        assert_eq!(r.attrs_id, f.i(&p("npz.attrs_id")), "frame {i}: attrs_id");
        assert_rel(&r.objects_conf, f.f(&p("npz.objects_conf")), 1e-4, 0.0, &format!("frame {i}: objects_conf"));
        assert_rel(&r.attrs_conf, f.f(&p("npz.attrs_conf")), 1e-4, 0.0, &format!("frame {i}: attrs_conf"));
        let bb: Vec<f32> = r.bbox.iter().flatten().copied().collect();
        assert!(max_abs_diff(&bb, f.f(&p("npz.bbox"))) <= 2e-3, "frame {i}: bbox");
        let xr = f.f(&p("npz.x"));
        assert!(max_abs_diff(&r.x, xr) <= 1e-5 * max_abs(xr), "frame {i}: npz x");
    }
}
