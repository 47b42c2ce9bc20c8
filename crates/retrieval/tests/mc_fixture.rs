//! Multiple-choice scoring against `testdata/mc_small.safetensors` (the published MC
//! evaluation on given embeddings): both score matrices, both predictions, both accuracies.

use demovlp_retrieval::mc::{accuracy_percent, mc_scores};
use demovlp_retrieval::EmbeddingSet;
use demovlp_testutil::{rel_err, Fixture};

#[test]
fn mc_small_reference_and_aligned_scores() {
    let fx = Fixture::load("mc_small.safetensors");
    let s = fx.shape("in.local_text").to_vec(); // [Q, K, W, P]
    let (q, k, w, p) = (s[0], s[1], s[2], s[3]);
    let n = fx.shape("in.local_video")[1];
    let text_mask: Vec<f32> =
        fx.i("in.attention_mask").chunks(w + 1).flat_map(|r| r[1..].iter().map(|&m| (m as f32 - 1.0) * 100.0)).collect();
    let texts = EmbeddingSet {
        count: q * k,
        len: w,
        dim: p,
        global: fx.f("in.global_text"),
        local: fx.f("in.local_text"),
        mask_additive: &text_mask,
    };
    let videos = EmbeddingSet {
        count: q,
        len: n,
        dim: p,
        global: fx.f("in.global_video"),
        local: fx.f("in.local_video"),
        mask_additive: fx.f("in.video_mask_additive"),
    };
    let got = mc_scores(&texts, &videos, k, 20.0, false);
    let e_ref = rel_err(&got.reference, fx.f("out.scores_reference"));
    let e_al = rel_err(&got.aligned, fx.f("out.scores_aligned"));
    eprintln!("mc_small: scores_reference {e_ref:.1e}, scores_aligned {e_al:.1e}");
    assert!(e_ref < 1e-6 && e_al < 1e-6, "scores differ: reference {e_ref:.3e}, aligned {e_al:.3e}");
    let as_usize = |k: &str| fx.i(k).iter().map(|&x| x as usize).collect::<Vec<_>>();
    assert_eq!(got.pred_reference, as_usize("out.pred_reference"));
    assert_eq!(got.pred_aligned, as_usize("out.pred_aligned"));
    // The two modes disagree on this fixture (the reference's global term is constant).
    assert_ne!(got.pred_reference, got.pred_aligned);
    let answers = as_usize("in.answers");
    let meta = |key: &str| -> String {
        let bytes = std::fs::read(demovlp_testutil::testdata("mc_small.safetensors")).unwrap();
        let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        h.metadata().as_ref().unwrap()[key].clone()
    };
    assert_eq!(format!("{:.2}", accuracy_percent(&got.pred_reference, &answers)), meta("accuracy_reference"));
    assert_eq!(format!("{:.2}", accuracy_percent(&got.pred_aligned, &answers)), meta("accuracy_aligned"));
}
