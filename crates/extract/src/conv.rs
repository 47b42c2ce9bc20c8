//! Convolutions and pooling on NHWC feature maps, through the [`Backend`] seam.
//!
//! A convolution is an im2col matrix `[n·ho·wo, k·k·cin]` (skipped for a 1×1 stride-1
//! convolution, whose input already is that matrix) times the weights `[cout, k·k·cin]`
//! with the folded-BatchNorm bias: the backend's `linear_forward` (on the CPU, the packed
//! GEMM of `demovlp_kernels`). The ReLU and the residual add are backend kernels too.
//! The im2col gather and the Caffe max pool run on the host over
//! [`Backend::read_host`] / [`Backend::write_host`] (no copy on the CPU; a device backend
//! would move the map across — they are the parts not yet on the device).
//!
//! Every map and im2col matrix comes from a [`Pool`] of buffers that finished layers gave
//! back: a frame runs the same shapes chunk after chunk (res5 over the proposals), so after
//! the first chunk no layer allocates (fresh memory costs a page fault and the kernel's
//! zeroing of every page, about a sixth of a frame on the CPU when each layer allocated).

use std::sync::Mutex;

use demovlp_model::Backend;
use rayon::prelude::*;

use crate::weights::{ConvSpec, HostBlock, HostConv};

/// A batch of feature maps, NHWC.
pub struct Map<B: Backend> {
    pub buf: B::Buf,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

/// Buffers given back by finished layers, for later layers to reuse. Their contents are
/// unspecified: whoever takes one overwrites all of it.
pub struct Pool<B: Backend> {
    /// Each buffer with the most values it has held (its allocation).
    free: Mutex<Vec<(B::Buf, usize)>>,
}

impl<B: Backend> Default for Pool<B> {
    fn default() -> Self {
        Pool { free: Mutex::new(Vec::new()) }
    }
}

impl<B: Backend> Pool<B> {
    /// A buffer of `n` values: the smallest free allocation that holds them, else the
    /// largest one grown, else a new one.
    pub fn take(&self, be: &B, n: usize) -> B::Buf {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let fits = free.iter().enumerate().filter(|(_, (_, cap))| *cap >= n).min_by_key(|(_, (_, cap))| *cap);
        let pick = fits.or_else(|| free.iter().enumerate().max_by_key(|(_, (_, cap))| *cap)).map(|(i, _)| i);
        let mut b = pick.map(|i| free.swap_remove(i).0).unwrap_or_default();
        drop(free);
        be.fit(&mut b, n);
        b
    }

    /// Gives a buffer back.
    pub fn give(&self, b: B::Buf) {
        let cap = B::buf_len(&b);
        if cap > 0 {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            // A buffer shrunk by `fit` keeps its allocation: remember the larger size.
            free.push((b, cap));
        }
    }

    /// Gives a map's buffer back.
    pub fn give_map(&self, m: Map<B>) {
        self.give(m.buf)
    }
}

impl<B: Backend> Map<B> {
    /// A map from host values `[n, h, w, c]`.
    pub fn from_host(be: &B, data: &[f32], n: usize, h: usize, w: usize, c: usize) -> Map<B> {
        assert_eq!(data.len(), n * h * w * c, "map of {n}x{h}x{w}x{c} from {} values", data.len());
        Map::filled(be, &Pool::default(), n, h, w, c, |d| d.copy_from_slice(data))
    }
    /// A map `[n, h, w, c]` in a pooled buffer whose every value `fill` writes on the host.
    pub fn filled(be: &B, pool: &Pool<B>, n: usize, h: usize, w: usize, c: usize, fill: impl FnOnce(&mut [f32])) -> Map<B> {
        let mut buf = pool.take(be, n * h * w * c);
        be.write_host(&mut buf, n * h * w * c, fill);
        Map { buf, n, h, w, c }
    }
    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values on the host, `[n, h, w, c]`.
    pub fn to_host(&self, be: &B) -> Vec<f32> {
        be.to_host(B::view(&self.buf))
    }
}

/// A convolution's weights on the backend.
pub struct Conv<B: Backend> {
    pub spec: ConvSpec,
    w: B::Buf,
    b: B::Buf,
}

/// Host values into a backend buffer.
pub fn upload<B: Backend>(be: &B, v: &[f32]) -> B::Buf {
    let mut buf = B::Buf::default();
    be.write_host(&mut buf, v.len(), |d| d.copy_from_slice(v));
    buf
}

impl<B: Backend> Conv<B> {
    pub fn new(be: &B, c: &HostConv) -> Conv<B> {
        Conv { spec: c.spec, w: upload(be, &c.w), b: upload(be, &c.b) }
    }

    /// FLOPs (2 per multiply-add) on an `h × w` input, and the output size.
    pub fn flops(&self, h: usize, w: usize) -> (f64, usize, usize) {
        let (oh, ow) = (self.spec.out_len(h), self.spec.out_len(w));
        (2.0 * (oh * ow * self.spec.patch() * self.spec.cout) as f64, oh, ow)
    }

    /// y = conv(x) + b, then ReLU when `relu`; buffers from `pool`.
    pub fn forward(&self, be: &B, x: &Map<B>, relu: bool, pool: &Pool<B>) -> Map<B> {
        let s = self.spec;
        assert_eq!(x.c, s.cin, "convolution of {} inputs on a map of {} channels", s.cin, x.c);
        let (ho, wo) = (s.out_len(x.h), s.out_len(x.w));
        let rows = x.n * ho * wo;
        let k = s.patch();
        let mut y = pool.take(be, rows * s.cout);
        if s.k == 1 && s.stride == 1 && s.pad == 0 {
            be.linear_forward(B::view(&x.buf), s.cin, B::view(&self.w), Some(B::view(&self.b)), B::view_mut(&mut y), rows, s.cin, s.cout);
        } else {
            let mut col = pool.take(be, rows * k);
            be.read_host(B::view(&x.buf), |xs| be.write_host(&mut col, rows * k, |c| im2col(xs, x.h, x.w, &s, ho, wo, c)));
            be.linear_forward(B::view(&col), k, B::view(&self.w), Some(B::view(&self.b)), B::view_mut(&mut y), rows, k, s.cout);
            pool.give(col);
        }
        let mut out = Map { buf: y, n: x.n, h: ho, w: wo, c: s.cout };
        if relu {
            relu_in_place(be, &mut out, pool);
        }
        out
    }
}

/// ReLU through the backend (into a second buffer, which then replaces the first).
fn relu_in_place<B: Backend>(be: &B, m: &mut Map<B>, pool: &Pool<B>) {
    let mut r = pool.take(be, m.len());
    be.relu_forward(B::view(&m.buf), B::view_mut(&mut r));
    pool.give(std::mem::replace(&mut m.buf, r));
}

/// The im2col matrix of an NHWC map: row (n, oy, ox), columns (ky, kx, ci); taps outside
/// the map are 0 (zero padding).
#[allow(clippy::too_many_arguments)]
fn im2col(x: &[f32], h: usize, w: usize, s: &ConvSpec, ho: usize, wo: usize, col: &mut [f32]) {
    let (c, k) = (s.cin, s.k);
    let patch = s.patch();
    col.par_chunks_mut(patch * wo).enumerate().for_each(|(r, out)| {
        let (img, oy) = (r / ho, r % ho);
        for ox in 0..wo {
            let dst = &mut out[ox * patch..(ox + 1) * patch];
            for ky in 0..k {
                let iy = (oy * s.stride + ky * s.dilation) as isize - s.pad as isize;
                for kx in 0..k {
                    let ix = (ox * s.stride + kx * s.dilation) as isize - s.pad as isize;
                    let d = &mut dst[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                        d.fill(0.0);
                    } else {
                        let at = ((img * h + iy as usize) * w + ix as usize) * c;
                        d.copy_from_slice(&x[at..at + c]);
                    }
                }
            }
        }
    });
}

/// Output length of Caffe's max pool (kernel `k`, stride `s`, no padding, ceil mode):
/// ceil((n − k)/s) + 1, less one when the last window would start outside the input.
pub fn pool_out_len(n: usize, k: usize, s: usize) -> usize {
    let mut o = (n.saturating_sub(k)).div_ceil(s) + 1;
    if (o - 1) * s >= n {
        o -= 1;
    }
    o
}

/// Caffe max pool 3×3, stride 2, ceil mode (the stem's), windows clipped to the map.
pub fn max_pool<B: Backend>(be: &B, x: &Map<B>, pool: &Pool<B>) -> Map<B> {
    let (k, st) = (3, 2);
    let (ho, wo) = (pool_out_len(x.h, k, st), pool_out_len(x.w, k, st));
    let (h, w, c) = (x.h, x.w, x.c);
    let mut y = pool.take(be, x.n * ho * wo * c);
    be.read_host(B::view(&x.buf), |xs| {
        be.write_host(&mut y, x.n * ho * wo * c, |out| {
            out.par_chunks_mut(wo * c).enumerate().for_each(|(r, row)| {
                let (img, oy) = (r / ho, r % ho);
                let (y0, y1) = (oy * st, (oy * st + k).min(h));
                for ox in 0..wo {
                    let (x0, x1) = (ox * st, (ox * st + k).min(w));
                    let o = &mut row[ox * c..(ox + 1) * c];
                    o.fill(f32::NEG_INFINITY);
                    for iy in y0..y1 {
                        for ix in x0..x1 {
                            let at = ((img * h + iy) * w + ix) * c;
                            for (m, &v) in o.iter_mut().zip(&xs[at..at + c]) {
                                if v > *m {
                                    *m = v;
                                }
                            }
                        }
                    }
                }
            })
        })
    });
    Map { buf: y, n: x.n, h: ho, w: wo, c }
}

/// A bottleneck block on the backend.
pub struct Block<B: Backend> {
    conv1: Conv<B>,
    conv2: Conv<B>,
    conv3: Conv<B>,
    shortcut: Option<Conv<B>>,
}

impl<B: Backend> Block<B> {
    pub fn new(be: &B, b: &HostBlock) -> Block<B> {
        Block {
            conv1: Conv::new(be, &b.conv1),
            conv2: Conv::new(be, &b.conv2),
            conv3: Conv::new(be, &b.conv3),
            shortcut: b.shortcut.as_ref().map(|s| Conv::new(be, s)),
        }
    }

    /// Multiply-add FLOPs (2 per multiply-add) on an `h × w` input, and the output size.
    pub fn flops(&self, h: usize, w: usize) -> (f64, usize, usize) {
        let mut total = 0.0;
        let (mut ch, mut cw) = (h, w);
        for c in [&self.conv1, &self.conv2, &self.conv3] {
            let (f, oh, ow) = c.flops(ch, cw);
            total += f;
            (ch, cw) = (oh, ow);
        }
        if let Some(s) = &self.shortcut {
            total += s.flops(h, w).0;
        }
        (total, ch, cw)
    }

    /// relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut(x)); intermediate buffers go
    /// back to `pool` (`x` stays the caller's).
    pub fn forward(&self, be: &B, x: &Map<B>, pool: &Pool<B>) -> Map<B> {
        let y1 = self.conv1.forward(be, x, true, pool);
        let y2 = self.conv2.forward(be, &y1, true, pool);
        pool.give_map(y1);
        let mut y = self.conv3.forward(be, &y2, false, pool);
        pool.give_map(y2);
        match &self.shortcut {
            Some(s) => {
                let sc = s.forward(be, x, false, pool);
                be.add_in_place(B::view_mut(&mut y.buf), B::view(&sc.buf));
                pool.give_map(sc);
            }
            None => be.add_in_place(B::view_mut(&mut y.buf), B::view(&x.buf)),
        }
        relu_in_place(be, &mut y, pool);
        y
    }

    /// Runs `blocks` on `x` in turn, giving each input back to `pool` once used.
    pub fn chain(blocks: &[Block<B>], be: &B, mut x: Map<B>, pool: &Pool<B>) -> Map<B> {
        for b in blocks {
            let y = b.forward(be, &x, pool);
            pool.give_map(std::mem::replace(&mut x, y));
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use demovlp_model::Cpu;

    #[test]
    fn pool_sizes_follow_ceil_mode() {
        // 600x810 blob -> stem 300x405 -> pool 150x202 (the fixture's frame 0).
        assert_eq!((pool_out_len(300, 3, 2), pool_out_len(405, 3, 2)), (150, 202));
        assert_eq!(pool_out_len(4, 3, 2), 2); // windows [0,3), [2,4)
        assert_eq!(pool_out_len(5, 3, 2), 2);
        assert_eq!(pool_out_len(6, 3, 2), 3); // last window [4,6) clipped
    }

    /// A direct convolution (NCHW-free loops) against im2col + GEMM, with stride,
    /// padding and dilation.
    #[test]
    fn conv_matches_direct_loops() {
        let be = Cpu;
        let (n, h, w, cin, cout) = (2, 7, 6, 3, 5);
        for (k, stride, dilation) in [(3, 1, 1), (3, 1, 2), (1, 2, 1), (7, 2, 1), (3, 2, 1)] {
            let pad = dilation * (k - 1) / 2;
            let spec = ConvSpec { cin, cout, k, stride, pad, dilation };
            let wts: Vec<f32> = (0..cout * k * k * cin).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let bias: Vec<f32> = (0..cout).map(|i| i as f32 * 0.1).collect();
            let x: Vec<f32> = (0..n * h * w * cin).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let conv = Conv::new(&be, &HostConv { spec, w: wts.clone(), b: bias.clone() });
            let y = conv.forward(&be, &Map::from_host(&be, &x, n, h, w, cin), false, &Pool::default());
            let (ho, wo) = (spec.out_len(h), spec.out_len(w));
            assert_eq!((y.h, y.w), (ho, wo));
            let got = y.to_host(&be);
            for img in 0..n {
                for oy in 0..ho {
                    for ox in 0..wo {
                        for o in 0..cout {
                            let mut acc = bias[o] as f64;
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky * dilation) as isize - pad as isize;
                                    let ix = (ox * stride + kx * dilation) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    for ci in 0..cin {
                                        acc += wts[((o * k + ky) * k + kx) * cin + ci] as f64
                                            * x[((img * h + iy as usize) * w + ix as usize) * cin + ci] as f64;
                                    }
                                }
                            }
                            let g = got[((img * ho + oy) * wo + ox) * cout + o] as f64;
                            assert!((g - acc).abs() < 1e-4, "k{k} s{stride} d{dilation}: {g} vs {acc}");
                        }
                    }
                }
            }
        }
    }
}
