//! The arguments of `import` and `replay`, and the recorded batches `replay` and the
//! benches run (the published implementation's `in.*` tensors, or a synthetic batch of the
//! same layout) — shared by the retrieval and the QA model commands.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use demovlp_model::io;
use demovlp_model::BatchRef;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Weights with published names: the trainer's .pth (torch zip) or a .safetensors file.
    pub input: PathBuf,
    /// Model directory to write (model.safetensors + config.json). Weights with `head.*`
    /// tensors (the published QA model) give a QA model directory: the head's sizes under
    /// `qa_head` in config.json, its tensors in model.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Use only tensors whose name starts with this prefix, with it removed (e.g. `param.`).
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Attention heads of the text tower (not visible in weights; default: the checkpoint's
    /// saved config when it has one, else the published 12).
    #[arg(long)]
    pub text_heads: Option<usize>,
    /// Attention heads of the video tower (not visible in weights; default: the checkpoint's
    /// saved config when it has one, else the published 12).
    #[arg(long)]
    pub video_heads: Option<usize>,
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Model directory (ours, or a Hugging Face DistilBERT/BERT directory). A QA model
    /// directory replays the QA model: the batch needs `in.labels` [B], and it writes
    /// `out.text_tokens`, `out.video_tokens`, `out.question`, `out.attention`, `out.logits`,
    /// `out.loss` (and `grad.*` of the towers and the head).
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors with `in.object`, `in.object_mask`, `in.input_ids`, `in.attention_mask`.
    #[arg(long)]
    pub batch: PathBuf,
    /// Where to write `out.*` (and `grad.*`, `after_adamw.*`).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write `grad.<name>` for every parameter that receives a gradient.
    #[arg(long)]
    pub grads: bool,
    /// Take one AdamW step from fresh state and write `after_adamw.<name>` for every
    /// parameter: `lr,beta1,beta2,eps,weight_decay`.
    #[arg(long, value_name = "LR,BETA1,BETA2,EPS,WD")]
    pub adamw: Option<String>,
    /// Region-word alignment means over real positions only (not the published behaviour).
    #[arg(long)]
    pub masked_mean: bool,
    /// Contrastive loss only (no region-word alignment).
    #[arg(long)]
    pub global_only: bool,
    /// Where to compute (and the GEMM precision on a GPU).
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// A recorded batch's inputs.
pub(crate) struct RecordedBatch {
    pub(crate) b: usize,
    pub(crate) f: usize,
    pub(crate) r: usize,
    pub(crate) l: usize,
    pub(crate) object: Vec<f32>,
    pub(crate) object_mask: Vec<f32>,
    pub(crate) input_ids: Vec<i64>,
    pub(crate) attention_mask: Vec<i64>,
}

impl RecordedBatch {
    /// Refuses a batch the model cannot take (`path` names it in the message): the region
    /// feature width, more frames than temporal embeddings, a longer text than the
    /// positions, token ids outside the vocabulary.
    pub(crate) fn check_fits(&self, c: &demovlp_model::ModelConfig, path: &std::path::Path) -> Result<()> {
        let x = self;
        ensure!(
            x.object.len() == x.b * x.f * x.r * (c.video.feature_dim + c.video.box_dim),
            "{}: in.object's last axis is not {}",
            path.display(),
            c.video.feature_dim + c.video.box_dim
        );
        ensure!(
            x.f <= c.video.max_frames,
            "{}: {} frames, the model has temporal embeddings for {}",
            path.display(),
            x.f,
            c.video.max_frames
        );
        ensure!(
            x.l <= c.text.max_position_embeddings,
            "{}: text length {} exceeds the model's {} positions",
            path.display(),
            x.l,
            c.text.max_position_embeddings
        );
        if let Some(bad) = x.input_ids.iter().find(|&&i| i < 0 || i as usize >= c.text.vocab_size) {
            bail!("{}: token id {bad} outside the model's vocabulary of {}", path.display(), c.text.vocab_size);
        }
        Ok(())
    }

    pub(crate) fn batch_ref(&self) -> BatchRef<'_> {
        BatchRef {
            batch: self.b,
            frames: self.f,
            regions: self.r,
            text_len: self.l,
            object: &self.object,
            object_mask: &self.object_mask,
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
        }
    }
}

pub(crate) fn read_batch(path: &std::path::Path) -> Result<RecordedBatch> {
    batch_from(&io::read_safetensors(path)?, path)
}

/// The `in.*` inputs of a recorded batch already read from `path`.
pub(crate) fn batch_from(st: &io::SafetensorsFile, path: &std::path::Path) -> Result<RecordedBatch> {
    let ctx = || path.display().to_string();
    let obj = st.get("in.object").with_context(ctx)?;
    ensure!(obj.shape.len() == 4, "{}: in.object has shape {:?}, expected [B,F,R,2054]", path.display(), obj.shape);
    let (b, f, r) = (obj.shape[0], obj.shape[1], obj.shape[2]);
    let ids = st.get("in.input_ids").with_context(ctx)?;
    ensure!(ids.shape.len() == 2 && ids.shape[0] == b, "{}: in.input_ids has shape {:?}, expected [{b},L]", path.display(), ids.shape);
    let l = ids.shape[1];
    let check = |name: &str, want: &[usize]| -> Result<()> {
        let t = st.get(name).with_context(ctx)?;
        ensure!(t.shape == want, "{}: {name} has shape {:?}, expected {want:?}", path.display(), t.shape);
        Ok(())
    };
    check("in.object_mask", &[b, f, r])?;
    check("in.attention_mask", &[b, l])?;
    Ok(RecordedBatch {
        b,
        f,
        r,
        l,
        object: st.f32("in.object").with_context(ctx)?,
        object_mask: st.f32("in.object_mask").with_context(ctx)?,
        input_ids: st.i64("in.input_ids").with_context(ctx)?,
        attention_mask: st.i64("in.attention_mask").with_context(ctx)?,
    })
}
