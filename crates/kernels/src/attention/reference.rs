//! The row-loop attention: every pattern, one query row at a time, with the probabilities
//! in the same compact layout. The reference the GEMM paths are tested against (and the
//! attention of the model crate's reference backend).

use super::{axpy, AttnShape};
use crate::fastmath::dot;
use crate::softmax::softmax_in_place;
use rayon::prelude::*;

/// Row-loop implementation for any pattern: the reference for the GEMM paths.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_loops(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    mask: &[f32],
    drop: Option<&[f32]>,
    probs: &mut [f32],
    out: &mut [f32],
) {
    s.check();
    let (seq, hd, heads) = (s.seq, s.head_dim, s.heads);
    assert_eq!(mask.len(), s.batch * seq, "attention: mask must be [B, seq]");
    let pph = s.probs_per_head();
    out[..s.batch * heads * seq * hd].par_chunks_mut(seq * hd).zip(probs[..s.probs_len()].par_chunks_mut(pph)).enumerate().for_each(
        |(bh, (out, probs))| {
            let (b, h) = (bh / heads, bh % heads);
            let at = |j: usize| (b * seq + j) * ld + h * hd..(b * seq + j) * ld + h * hd + hd;
            for i in 0..seq {
                let keys = s.row(i);
                let qi = &q[at(i)];
                let p = &mut probs[keys.offset..keys.offset + keys.len()];
                for (pj, j) in p.iter_mut().zip(keys.iter()) {
                    *pj = scale * dot(qi, &k[at(j)]) + mask[b * seq + j];
                }
                softmax_in_place(p);
                let o = &mut out[i * hd..(i + 1) * hd];
                o.iter_mut().for_each(|x| *x = 0.0);
                let dm = drop.map(|d| &d[bh * pph + keys.offset..bh * pph + keys.offset + keys.len()]);
                for (n, (&pj, j)) in p.iter().zip(keys.iter()).enumerate() {
                    axpy(pj * dm.map_or(1.0, |m| m[n]), &v[at(j)], o);
                }
            }
        },
    );
}

/// Backward of [`attention_forward_loops`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_loops(
    s: &AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    probs: &[f32],
    drop: Option<&[f32]>,
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    s.check();
    let (seq, hd, heads) = (s.seq, s.head_dim, s.heads);
    let pph = s.probs_per_head();
    let n = s.batch * heads * seq * hd;
    dq[..n].par_chunks_mut(seq * hd).zip(dk[..n].par_chunks_mut(seq * hd).zip(dv[..n].par_chunks_mut(seq * hd))).enumerate().for_each(
        |(bh, (dq, (dk, dv)))| {
            let (b, h) = (bh / heads, bh % heads);
            let at = |j: usize| (b * seq + j) * ld + h * hd..(b * seq + j) * ld + h * hd + hd;
            let probs = &probs[bh * pph..(bh + 1) * pph];
            let dout = &dout[bh * seq * hd..(bh + 1) * seq * hd];
            let mut ds = vec![0.0f32; seq];
            for i in 0..seq {
                let keys = s.row(i);
                let p = &probs[keys.offset..keys.offset + keys.len()];
                let doi = &dout[i * hd..(i + 1) * hd];
                let ds = &mut ds[..keys.len()];
                let dm = drop.map(|d| &d[bh * pph + keys.offset..bh * pph + keys.offset + keys.len()]);
                // dv_j += p_j·m_j·dout_i; dp_j = m_j·(dout_i·v_j)
                for (n, ((dsj, &pj), j)) in ds.iter_mut().zip(p).zip(keys.iter()).enumerate() {
                    let m = dm.map_or(1.0, |m| m[n]);
                    axpy(pj * m, doi, &mut dv[j * hd..(j + 1) * hd]);
                    *dsj = m * dot(doi, &v[at(j)]);
                }
                // softmax backward, then the scale of the scores
                let pdp: f32 = p.iter().zip(ds.iter()).map(|(a, b)| a * b).sum();
                for (dsj, &pj) in ds.iter_mut().zip(p) {
                    *dsj = scale * pj * (*dsj - pdp);
                }
                let qi = &q[at(i)];
                for (&dsj, j) in ds.iter().zip(keys.iter()) {
                    axpy(dsj, &k[at(j)], &mut dq[i * hd..(i + 1) * hd]);
                    axpy(dsj, qi, &mut dk[j * hd..(j + 1) * hd]);
                }
            }
        },
    );
}
