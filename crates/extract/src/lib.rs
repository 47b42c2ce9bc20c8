//! `demovlp extract`: region features from raw video, the first stage of every demovlp
//! workflow. A faithful port of the Caffe-mode inference of MILVLG/bottom-up-attention.pytorch
//! (ResNet-101 C4 Faster R-CNN trained on Visual Genome, 1600 objects, 400 attributes):
//!
//! - [`weights`]: the published `.pth` (both `torch.save` formats) or safetensors, sizes
//!   read from the keys and shapes, BatchNorm folded;
//! - [`image`]: blob making (mean subtraction, OpenCV-exact bilinear resize);
//! - [`conv`]: NHWC convolutions (im2col + GEMM) and pooling on the `Backend` seam;
//! - [`rpn`], [`roi`], [`nms`]: proposals, RoIPool, Caffe NMS and box selection;
//! - [`detector`]: the network end to end;
//! - [`output`]: per-frame `.npz` files in the published layout, clips written atomically;
//! - [`video`]: decoding with the `ffmpeg` program and the uniform frame sample;
//! - [`synth`]: seeded random weights of any size (benchmarks, tests);
//! - [`run`]: the extraction driver (folders of videos or images, resume, progress);
//! - [`packed`]: extraction straight into a packed feature store, as `demovlp pack` makes it.

pub mod conv;
pub mod detector;
pub mod image;
pub mod nms;
pub mod output;
pub mod packed;
pub mod roi;
pub mod rpn;
pub mod run;
pub mod synth;
pub mod video;
pub mod weights;

pub use detector::{Detector, DetectorConfig, Regions, Trace};
pub use image::Frame;
pub use weights::{load_weights, DetectorWeights};
