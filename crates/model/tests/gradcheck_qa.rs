//! Finite differences through the QA head (weight norm, the multiplied attention mask,
//! max-pooled question, attention dropout on): every parameter tensor of the head and both
//! token inputs, against the cross-entropy loss.

use demovlp_kernels::gradcheck::{numeric_gradient, sample_coords};
use demovlp_kernels::Rng;
use demovlp_model::qa::{cross_entropy, HeadInput, QaHead, QaHeadConfig};

const B: usize = 3;
const L: usize = 5;
const N: usize = 4;

struct Case {
    head: QaHead,
    text: Vec<f32>,
    video: Vec<f32>,
    mask: Vec<f32>,
    labels: Vec<usize>,
}

fn case() -> Case {
    let cfg = QaHeadConfig { dim: 6, hidden: 5, answers: 7 };
    let mut head = QaHead::new(cfg);
    head.init_random(3);
    let mut rng = Rng::new(11);
    let text = (0..B * L * cfg.dim).map(|_| rng.normal()).collect();
    let video = (0..B * (1 + N) * cfg.dim).map(|_| rng.normal()).collect();
    let mut mask = vec![1.0; B * N];
    mask[N + 3] = 0.0; // one padded region
    mask[2 * N + 2] = 0.0;
    mask[2 * N + 3] = 0.0;
    Case { head, text, video, mask, labels: vec![1, 6, 3] }
}

/// The loss with the attention dropout's mask drawn from a fixed seed (the same mask for every
/// evaluation).
fn loss(head: &mut QaHead, text: &[f32], video: &[f32], mask: &[f32], labels: &[usize]) -> f64 {
    let input = HeadInput { batch: B, text_len: L, regions: N, text, video, object_mask: mask };
    head.forward(&input, Some(&mut Rng::new(99)));
    // Cross-entropy in f64 from the f32 logits (the finite differences' resolution is then
    // the logits' f32 rounding, not the loss's).
    let a = head.config.answers;
    let mut total = 0f64;
    for (bi, &y) in labels.iter().enumerate() {
        let row: Vec<f64> = head.acts.logits[bi * a..(bi + 1) * a].iter().map(|&x| x as f64).collect();
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        total += row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m - row[y];
    }
    total / labels.len() as f64
}

/// Agreement to 2e-3 of `scale` (the largest gradient of the group: the loss is evaluated in
/// f32, so tiny gradients next to large ones are resolved only to that scale).
fn check(name: &str, numeric: &[f64], analytic: &[f64], scale: f64, tol: f64) {
    for (i, (n, a)) in numeric.iter().zip(analytic).enumerate() {
        assert!((n - a).abs() <= tol * scale, "{name}[{i}]: numeric {n:e}, analytic {a:e} (scale {scale:e})");
    }
}

#[test]
fn gradcheck_qa_head_parameters_and_inputs() {
    let Case { mut head, text, video, mask, labels } = case();
    head.params.zero_grad();
    let l0 = loss(&mut head, &text, &video, &mask, &labels);
    assert!(l0.is_finite());
    let (_, d_logits) = cross_entropy(&head.acts.logits, &labels, head.config.answers);
    let mut d_text = vec![f32::NAN; text.len()];
    let mut d_video = vec![f32::NAN; video.len()];
    head.backward(&d_logits, L, &mut d_text, &mut d_video);
    let grads = head.params.grad.clone();
    let scale = grads.iter().fold(0f64, |m, &g| m.max(g.abs() as f64));
    let mut rng = Rng::new(5);
    for spec in head.params.specs().to_vec() {
        let coords: Vec<usize> = sample_coords(&mut rng, spec.len, 6).into_iter().map(|c| spec.offset + c).collect();
        let mut probe = head.clone();
        let base = probe.params.data.clone();
        let numeric = numeric_gradient(&base, &coords, 1e-3, |x| {
            probe.params.data.copy_from_slice(x);
            loss(&mut probe, &text, &video, &mask, &labels)
        });
        let analytic: Vec<f64> = coords.iter().map(|&c| grads[c] as f64).collect();
        check(&spec.name, &numeric, &analytic, scale, 2e-3);
    }
    let mut probe = head.clone();
    let coords = sample_coords(&mut rng, text.len(), 12);
    // The inputs' gradients are ~100× smaller than the parameters' (attention pooling): a
    // larger step, and 1 % of the largest, which the f32 logits resolve.
    let numeric = numeric_gradient(&text, &coords, 1e-2, |x| loss(&mut probe, x, &video, &mask, &labels));
    let scale = d_text.iter().fold(0f64, |m, &g| m.max(g.abs() as f64));
    check("d_text", &numeric, &coords.iter().map(|&c| d_text[c] as f64).collect::<Vec<_>>(), scale, 1e-2);
    let coords = sample_coords(&mut rng, video.len(), 12);
    let numeric = numeric_gradient(&video, &coords, 1e-2, |x| loss(&mut probe, &text, x, &mask, &labels));
    let scale = d_video.iter().fold(0f64, |m, &g| m.max(g.abs() as f64));
    check("d_video", &numeric, &coords.iter().map(|&c| d_video[c] as f64).collect::<Vec<_>>(), scale, 1e-2);
    // The CLS token of the video gets no gradient; every text position that never wins the
    // max gets none either.
    for bi in 0..B {
        assert!(d_video[bi * (1 + N) * 6..(bi * (1 + N) + 1) * 6].iter().all(|&g| g == 0.0));
    }
    assert!(d_text.iter().all(|g| g.is_finite()));
}
