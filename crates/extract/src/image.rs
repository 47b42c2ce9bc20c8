//! The detector's input blob: BGR mean subtraction and resize, as the published
//! extractor's `get_image_blob` does it (600 short side, 1000 at most on the long side),
//! with OpenCV's bilinear resize on float32 reproduced bit for bit (its generic code path,
//! IPP off; the coordinate and weight rules are the fixture README's).

/// Pixel means (B, G, R) of the Caffe model.
pub const PIXEL_MEAN: [f64; 3] = [102.9801, 115.9465, 122.7717];

/// A frame as decoded: `[h, w, 3]` u8, BGR order.
#[derive(Clone, Debug)]
pub struct Frame {
    pub h: usize,
    pub w: usize,
    pub bgr: Vec<u8>,
}

/// The resized, mean-subtracted image: `[h, w, 3]` f32, BGR order (NHWC, one image).
#[derive(Clone, Debug)]
pub struct Blob {
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
    /// The scale applied (blob size / frame size).
    pub scale: f64,
}

/// The scale `get_image_blob` picks: `target / min(h, w)`, unless the long side would then
/// round (half to even, as `np.round`) above `max_size`, in which case `max_size / max(h, w)`.
pub fn blob_scale(h: usize, w: usize, target: usize, max_size: usize) -> f64 {
    let (short, long) = (h.min(w) as f64, h.max(w) as f64);
    let s = target as f64 / short;
    if (s * long).round_ties_even() > max_size as f64 {
        max_size as f64 / long
    } else {
        s
    }
}

/// Source cells and weights of one output coordinate.
struct Tap {
    i0: usize,
    i1: usize,
    a: f32,
}

/// OpenCV's INTER_LINEAR coordinate map for `dst` cells from `src` cells at scale `s`.
/// `reset_border`: the column rule (weight set to 0 outside the image) or the row rule
/// (indices clamped, weight kept).
fn taps(src: usize, dst: usize, s: f64, reset_border: bool) -> Vec<Tap> {
    let inv = 1.0 / s;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * inv - 0.5) as f32;
            let fl = f.floor();
            let mut a = f - fl;
            let x0 = fl as i64;
            let last = src as i64 - 1;
            if reset_border {
                let (mut i0, mut aa) = (x0, a);
                if i0 < 0 {
                    i0 = 0;
                    aa = 0.0;
                }
                if i0 >= last {
                    i0 = last;
                    aa = 0.0;
                }
                a = aa;
                Tap { i0: i0 as usize, i1: (i0 + 1).min(last) as usize, a }
            } else {
                Tap { i0: x0.clamp(0, last) as usize, i1: (x0 + 1).clamp(0, last) as usize, a }
            }
        })
        .collect()
}

/// Mean subtraction then resize by `scale` to `round_half_even(w·s)` × `round_half_even(h·s)`.
pub fn make_blob(frame: &Frame, scale: f64) -> Blob {
    let (h, w) = (frame.h, frame.w);
    let src: Vec<f32> = frame.bgr.iter().enumerate().map(|(i, &p)| (p as f64 - PIXEL_MEAN[i % 3]) as f32).collect();
    let dw = (w as f64 * scale).round_ties_even() as usize;
    let dh = (h as f64 * scale).round_ties_even() as usize;
    let cols = taps(w, dw, scale, true);
    let rows = taps(h, dh, scale, false);
    // Horizontal pass on every source row that a destination row reads.
    let hrow = |y: usize| -> Vec<f32> {
        let line = &src[y * w * 3..(y + 1) * w * 3];
        let mut out = vec![0f32; dw * 3];
        for (d, t) in cols.iter().enumerate() {
            for c in 0..3 {
                let p0 = line[t.i0 * 3 + c];
                let p1 = line[t.i1 * 3 + c];
                out[d * 3 + c] = p0 * (1.0 - t.a) + p1 * t.a;
            }
        }
        out
    };
    use rayon::prelude::*;
    let mut data = vec![0f32; dh * dw * 3];
    data.par_chunks_mut(dw * 3).zip(rows.par_iter()).for_each(|(out, t)| {
        let (r0, r1) = (hrow(t.i0), hrow(t.i1));
        let b0 = 1.0 - t.a;
        for i in 0..dw * 3 {
            out[i] = r0[i] * b0 + r1[i] * t.a;
        }
    });
    Blob { h: dh, w: dw, data, scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_rules() {
        // The README's cases: 97x131 -> 600 short side; 240x427 hits the max-size rule;
        // 400x667 gives 1000.5 which rounds to 1000 (half to even), so the scale stays 1.5.
        assert_eq!(blob_scale(97, 131, 600, 1000), 600.0 / 97.0);
        assert_eq!(blob_scale(240, 427, 600, 1000), 1000.0 / 427.0);
        assert_eq!(blob_scale(400, 667, 600, 1000), 1.5);
        assert_eq!(blob_scale(401, 667, 600, 1000), 600.0 / 401.0);
        // 61x48 -> 762x600 (762.5 rounds to even).
        let b = make_blob(&Frame { h: 61, w: 48, bgr: vec![0; 61 * 48 * 3] }, blob_scale(61, 48, 600, 1000));
        assert_eq!((b.h, b.w), (762, 600));
    }
}
