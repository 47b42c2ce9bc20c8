//! Parity of the losses with the published implementation (testdata/loss_*.safetensors).

mod common;
use common::*;
use demovlp_retrieval::{losses_forward, losses_forward_backward, LossConfig, LossInputs};

struct Case {
    t: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Case {
    fn new(name: &str) -> Self {
        Case { t: load(name) }
    }
    fn get(&self, k: &str) -> &[f32] {
        &self.t.get(k).unwrap_or_else(|| panic!("fixture has no tensor {k}")).1
    }
    fn shape(&self, k: &str) -> &[usize] {
        &self.t[k].0
    }
    fn inputs(&self) -> LossInputs<'_> {
        let lt = self.shape("in.local_text");
        let lv = self.shape("in.local_video");
        LossInputs {
            batch: lt[0],
            words: lt[1],
            regions: lv[1],
            dim: lt[2],
            global_text: self.get("in.global_text"),
            global_video: self.get("in.global_video"),
            local_text: self.get("in.local_text"),
            local_video: self.get("in.local_video"),
            text_mask_additive: self.get("in.text_mask_additive"),
            video_mask_additive: self.get("in.video_mask_additive"),
        }
    }
}

fn check_forward(name: &str) {
    let c = Case::new(name);
    let out = losses_forward(&LossConfig::default(), &c.inputs(), true);
    let g = rel_to_max(&out.global_sim_text_video, c.get("out.global_sim_text_video"));
    let l = rel_to_max(&out.local_sim_video_text, c.get("out.local_sim_video_text"));
    assert!(g < 1e-5, "{name}: global sims rel err {g}");
    assert!(l < 1e-5, "{name}: local sims rel err {l}");
    for (got, key) in [(out.loss_total, "out.loss_total"), (out.loss_global, "out.loss_global"), (out.loss_local, "out.loss_local")] {
        let want = c.get(key)[0];
        assert!(((got - want) / want).abs() < 1e-5, "{name}: {key} = {got}, fixture {want}");
    }
}

/// Gradients: `max_tol` bounds the worst element relative to the tensor's max magnitude;
/// `bulk_tol` must hold for all but 0.1 % of elements.
fn check_backward(name: &str, max_tol: f32, bulk_tol: f32) {
    let c = Case::new(name);
    let (out, gr) = losses_forward_backward(&LossConfig::default(), &c.inputs(), true);
    let want = c.get("out.loss_total")[0];
    assert!(((out.loss_total - want) / want).abs() < 1e-5);
    for (got, key) in [
        (&gr.global_text, "grad.global_text"),
        (&gr.global_video, "grad.global_video"),
        (&gr.local_text, "grad.local_text"),
        (&gr.local_video, "grad.local_video"),
    ] {
        let e = rel_to_max(got, c.get(key));
        let bulk = share_above(got, c.get(key), bulk_tol);
        eprintln!("{name} {key}: max rel err {e:.2e}, share above {bulk_tol:.0e}: {bulk:.2e}");
        assert!(e < max_tol, "{name}: {key} max rel err {e}");
        assert!(bulk < 1e-3, "{name}: {key}: {bulk} of elements off by more than {bulk_tol}");
    }
}

#[test]
fn loss_small_forward() {
    check_forward("loss_small.safetensors");
}

#[test]
fn loss_realistic_forward() {
    check_forward("loss_realistic.safetensors");
}

#[test]
fn loss_small_gradients() {
    check_backward("loss_small.safetensors", 1e-4, 2e-5);
}

/// At the published sizes the reference gradient itself is chaotic at the 1e-4 level:
/// padded words enter the softmax at ((A − 100) + m)·20 in f32, so a 1-ulp change of A
/// moves their logits by ~1.5e-4, and perturbing the inputs by 1 ulp moves the
/// reference's own gradient by up to 1.1e-4 of its max (measured with a NumPy replica).
/// Hence 3e-4 for the worst element, and 2e-5 for 99.9 % of them.
#[test]
fn loss_realistic_gradients() {
    check_backward("loss_realistic.safetensors", 3e-4, 2e-5);
}

#[test]
fn global_only_ablation() {
    let c = Case::new("loss_small.safetensors");
    let (out, gr) = losses_forward_backward(&LossConfig::default(), &c.inputs(), false);
    let want = c.get("out.loss_global")[0];
    assert!(((out.loss_total - want) / want).abs() < 1e-5);
    assert_eq!(out.loss_local, 0.0);
    assert!(out.local_sim_video_text.is_empty());
    assert!(gr.local_text.iter().all(|&v| v == 0.0) && gr.local_text.len() == c.get("in.local_text").len());
    assert!(rel_to_max(&gr.global_text, c.get("grad.global_text")) < 1e-4);
}
