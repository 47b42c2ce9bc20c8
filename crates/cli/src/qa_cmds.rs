//! Video QA models in `import` and `replay` (issue 13): weights with `head.*` tensors become
//! a QA model directory (`demovlp_train::qa`), and `replay` on such a directory runs the
//! published `ObjectQARelation` on a recorded batch with `in.labels`.

use anyhow::{bail, ensure, Context, Result};
use demovlp_model::io::{self, TensorRef};
use demovlp_model::BatchRef;
use demovlp_train::qa::{import_qa_weights, load_qa_dir, save_qa_dir};

use crate::model_cmds::{read_batch, ImportArgs, ReplayArgs};

/// `import` of weights holding `head.*` tensors. `Ok(false)`: none, not a QA model.
pub fn import_qa(a: &ImportArgs) -> Result<bool> {
    let Some((model, report)) = import_qa_weights(&a.input, a.key_prefix.as_deref(), a.text_heads.unwrap_or(12), a.video_heads.unwrap_or(12))? else {
        return Ok(false);
    };
    save_qa_dir(&model, None, &a.out)?;
    let (c, h) = (&model.base.config, &model.head.config);
    eprintln!(
        "imported {} as a QA model: {:?} text tower {}x{} ({} heads), video tower {}x{} ({} heads, {} frames), P = {}, \
         head hidden {} with {} answers; {}",
        a.input.display(),
        c.text.kind,
        c.text.layers,
        c.text.dim,
        c.text.heads,
        c.video.depth,
        c.video.dim,
        c.video.heads,
        c.video.max_frames,
        c.proj_dim,
        h.hidden,
        h.answers,
        report.summary()
    );
    if !report.skipped.is_empty() {
        eprintln!("skipped (no place in the model): {}", report.skipped.join(", "));
    }
    if !report.missing.is_empty() {
        eprintln!("absent from the input, left zero (unused by the model): {}", report.missing.join(", "));
    }
    println!("{}", a.out.display());
    Ok(true)
}

/// `replay` on a QA model directory: `out.text_tokens`, `out.video_tokens`, `out.question`,
/// `out.attention`, `out.logits`, `out.loss`, and with `--grads` `grad.<name>` of every
/// parameter (towers and head) that receives one.
pub fn replay_qa(a: ReplayArgs) -> Result<()> {
    ensure!(a.adamw.is_none(), "--adamw is not offered for QA models (replay a retrieval model directory for the AdamW step)");
    ensure!(!a.masked_mean && !a.global_only, "--masked-mean / --global-only are retrieval-loss options; a QA model has none");
    let mut m = load_qa_dir(&a.model)?.model;
    let x = read_batch(&a.batch)?;
    let st = io::read_safetensors(&a.batch)?;
    let labels_t =
        st.get("in.labels").with_context(|| format!("{}: a QA replay needs in.labels [B] (answer indices)", a.batch.display()))?;
    ensure!(labels_t.shape == [x.b], "{}: in.labels has shape {:?}, expected [{}]", a.batch.display(), labels_t.shape, x.b);
    let na = m.head.config.answers;
    let labels: Vec<usize> =
        labels_t
            .to_i64()?
            .into_iter()
            .map(|v| {
                if v >= 0 && (v as usize) < na {
                    Ok(v as usize)
                } else {
                    bail!("{}: label {v} outside the {na} answers", a.batch.display())
                }
            })
            .collect::<Result<_>>()?;
    let c = &m.base.config;
    ensure!(
        x.object.len() == x.b * x.f * x.r * (c.video.feature_dim + c.video.box_dim),
        "{}: in.object's last axis is not {}",
        a.batch.display(),
        c.video.feature_dim + c.video.box_dim
    );
    ensure!(
        x.f <= c.video.max_frames,
        "{}: {} frames, the model has temporal embeddings for {}",
        a.batch.display(),
        x.f,
        c.video.max_frames
    );
    ensure!(
        x.l <= c.text.max_position_embeddings,
        "{}: text length {} exceeds the model's {} positions",
        a.batch.display(),
        x.l,
        c.text.max_position_embeddings
    );
    if let Some(bad) = x.input_ids.iter().find(|&&i| i < 0 || i as usize >= c.text.vocab_size) {
        bail!("{}: token id {bad} outside the model's vocabulary of {}", a.batch.display(), c.text.vocab_size);
    }
    let batch = BatchRef {
        batch: x.b,
        frames: x.f,
        regions: x.r,
        text_len: x.l,
        object: &x.object,
        object_mask: &x.object_mask,
        input_ids: &x.input_ids,
        attention_mask: &x.attention_mask,
    };
    let (text, video) = m.base.forward_tokens(&batch, false);
    let (text, video) = (text.to_vec(), video.to_vec());
    let o = m.forward_backward(&batch, &labels);
    let (b, p, l, n) = (x.b, m.head.config.dim, x.l, x.f * x.r);
    let loss = [o.loss];
    let mut out: Vec<(String, Vec<usize>, TensorRef)> = vec![
        ("out.text_tokens".into(), vec![b, l, p], TensorRef::F32(&text)),
        ("out.video_tokens".into(), vec![b, 1 + n, p], TensorRef::F32(&video)),
        ("out.question".into(), vec![b, p], TensorRef::F32(&m.head.acts.question)),
        ("out.attention".into(), vec![b, n], TensorRef::F32(&m.head.acts.attention)),
        ("out.logits".into(), vec![b, na], TensorRef::F32(&o.logits)),
        ("out.loss".into(), vec![1], TensorRef::F32(&loss)),
    ];
    if a.grads {
        out.extend(io::grads_as_tensors(&m.base.params, "grad."));
        out.extend(io::grads_as_tensors(&m.head.params, "grad."));
    }
    io::write_safetensors_refs(&a.out, &out, &[])?;
    eprintln!(
        "replayed {} on a QA model (B={b}, F={}, R={}, L={l}, {na} answers): loss {:.6}; wrote {} tensors to {}",
        a.batch.display(),
        x.f,
        x.r,
        o.loss,
        out.len(),
        a.out.display()
    );
    Ok(())
}
