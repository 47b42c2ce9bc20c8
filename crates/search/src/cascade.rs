//! The region first stage's two steps, both on the region codes ([`crate::codes`]): a coarse
//! scan of every clip, then the evaluation's own formula on the surviving clips' centroids.
//!
//! **Coarse** (every clip, table look-ups only): per clip, over its real region slots,
//!
//! ```text
//! words→regions  s1' = mean_{w real}  max_r T[code_r, w]
//! regions→words  s2' = mean_{r real}  max_w T[code_r, w]          T[c, w] = ⟨ĉ_c, ŵ_w⟩
//! ```
//!
//! the two directions of the region-word score with its soft attention replaced by a hard
//! maximum. Its ranking is coarse (measured on the demo's model at 100 000 clips: the
//! exhaustive top 10 lie within its best ~1 %, not its best 100), so it only chooses which
//! clips the next step scores.
//!
//! **Centroid** (the coarse step's best clips): the exact region-word formula of SPEC §6 —
//! LeakyReLU, the normalisation over the query axis, the λ-softmax over the context, the
//! focal keep, the cosine with the weighted context, the means over every position (or the
//! real ones, `masked_mean`) — with each region replaced by its centroid, plus the exact
//! global cosine. Everything that depends on a region enters through its code, so the
//! formula runs on per-query tables:
//!
//! ```text
//! t[c, l]  = ⟨ĉ_c, ŵ_l⟩                     every word position l (padding included)
//! e1[c, l] = exp(λ · leaky(t[c, l]) / (‖leaky(t[c, ·])‖ + ε))   word→region: the
//!            normalisation over the words depends on the region's code only
//! G[j, j'] = ⟨ŵ_j, ŵ_j'⟩                    real words (the region→word context's norms)
//! ```
//!
//! word→region: per position l, softmax weights e1[c_s, l] over the clip's real regions,
//! the focal keep (weight × regions > sum), cos(w_l, Σ kept e1·ĉ) = Σ kept e1·t / ‖Σ kept e1·ĉ‖;
//! region→word: per region slot (padding included), its normalisation over the clip's F·R
//! slots, the softmax over the real words, the focal keep, and
//! cos(ĉ, Σ r_j ŵ_j) = Σ r_j t / √(rᵀ G r). Measured (BENCHMARKS.md): on the demo's model it
//! puts the exhaustive top 10 within its best ~50 of 100 000 clips, where the coarse
//! ranking needs ~1 000; so the exact re-rank can be short.
//!
//! Slots that share a code are one centroid, so the step works per distinct code of a clip,
//! weighted by how many slots (real ones, every one) hold it — on the demo's model a clip's
//! 40 slots hold ~27 distinct codes. The word→region norms ‖Σ w ĉ‖ are a dense product in
//! registers (about half the focal weights are zero, too many for a branch on each to pay).

use demovlp_retrieval::fastmath::cephes_exp;
use demovlp_retrieval::local::{is_real, LEAKY_SLOPE, NORM_EPS};
use rayon::prelude::*;

use crate::codes::{hat_rows, Codes};
use crate::store::Index;

/// Whether the AVX2 + FMA forms of the scans run (the kernels' SIMD level is AVX2 or above).
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        demovlp_kernels::simd::level() != demovlp_kernels::simd::Level::Baseline
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Lanes of one coarse-table row (real words are scanned 16 at a time).
const LANES: usize = 16;

#[inline(always)]
fn leaky(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        LEAKY_SLOPE * x
    }
}

/// One query's tables over the codebook (see the module docs).
pub struct QueryTables {
    /// Word positions (padding included) and real words.
    lq: usize,
    w: usize,
    centroids: usize,
    dim: usize,
    masked_mean: bool,
    /// `[Lq]` whether each position is a real word.
    real_pos: Vec<bool>,
    /// Row stride of `t` / `e1` (Lq rounded up to 8; padding lanes 0).
    lqp: usize,
    /// `[C, lqp]` ⟨ĉ, ŵ_l⟩.
    t: Vec<f32>,
    /// `[C, lqp]` word→region softmax numerators.
    e1: Vec<f32>,
    /// Row stride of the real-word tables (W rounded up to 8).
    wp: usize,
    /// `[C, wp]` ⟨ĉ, ŵ⟩ of the real words (padding lanes 0).
    tw: Vec<f32>,
    /// `[C, wp]` λ·leaky(tw) (padding lanes −∞: weight 0) and leaky(tw)² (padding 0): the
    /// region→word logits before the per-clip normalisation, and what that sums.
    lt: Vec<f32>,
    sq: Vec<f32>,
    /// `[chunks, C, LANES]` the real words' columns of `tw` in 1/32767 (i16), 16 a chunk
    /// (padding lanes 0), and in the last lane of the last chunk ([`BEST`]) each centroid's
    /// best real word: the coarse scan's table (one row load gives both terms).
    coarse: Vec<i16>,
    chunks: usize,
    /// `[wp, wp]` Gram matrix of the real words' unit rows (padding 0).
    gram: Vec<f32>,
}

/// Scale of the coarse table's i16 cosines.
const Q16: f32 = 32767.0;
/// The coarse table's lane (of its last chunk) that holds a centroid's best real word.
const BEST: usize = LANES - 1;

impl QueryTables {
    /// `local` `[Lq, P]` the query's word embeddings (every position), `mask_additive` `[Lq]`.
    pub fn new(codes: &Codes, local: &[f32], mask_additive: &[f32], lambda: f32, masked_mean: bool) -> QueryTables {
        let cb = &codes.codebook;
        let (c, p) = (cb.centroids, cb.dim);
        let lq = mask_additive.len();
        let mut words = local.to_vec();
        hat_rows(&mut words, p);
        let real_pos: Vec<bool> = mask_additive.iter().map(|&m| is_real(m)).collect();
        let mut t = vec![0f32; c * lq];
        if lq > 0 {
            demovlp_kernels::gemm::sgemm(
                demovlp_kernels::gemm::Trans::No,
                demovlp_kernels::gemm::Trans::Yes,
                c,
                lq,
                p,
                1.0,
                &cb.rows,
                p,
                &words,
                p,
                0.0,
                &mut t,
                lq,
            );
        }
        let lqp = lq.div_ceil(8).max(1) * 8;
        let (mut tp, mut e1) = (vec![0f32; c * lqp], vec![0f32; c * lqp]);
        for ((trow, tprow), erow) in t.chunks_exact(lq.max(1)).zip(tp.chunks_exact_mut(lqp)).zip(e1.chunks_exact_mut(lqp)) {
            let n = trow.iter().map(|&x| leaky(x) * leaky(x)).sum::<f32>().sqrt() + NORM_EPS;
            for ((e, tpv), &x) in erow.iter_mut().zip(tprow.iter_mut()).zip(trow) {
                *e = cephes_exp(lambda * (leaky(x) / n));
                *tpv = x;
            }
        }
        let real_idx: Vec<usize> = (0..lq).filter(|&l| real_pos[l]).collect();
        let w = real_idx.len();
        let wp = w.div_ceil(8).max(1) * 8;
        let (mut tw, mut lt, mut sq) = (vec![0f32; c * wp], vec![f32::NEG_INFINITY; c * wp], vec![0f32; c * wp]);
        for k in 0..c {
            for (j, &l) in real_idx.iter().enumerate() {
                let x = t[k * lq + l];
                tw[k * wp + j] = x;
                lt[k * wp + j] = lambda * leaky(x);
                sq[k * wp + j] = leaky(x) * leaky(x);
            }
        }
        // The words, then one lane for the best word: a query of up to 15 words fits one chunk.
        let chunks = (w + 1).div_ceil(LANES);
        let q16 = |x: f32| (x * Q16).round().clamp(-Q16, Q16) as i16;
        let mut coarse = vec![0i16; chunks * c * LANES];
        for k in 0..c {
            let row = &tw[k * wp..k * wp + w];
            for (j, &x) in row.iter().enumerate() {
                coarse[((j / LANES) * c + k) * LANES + j % LANES] = q16(x);
            }
            coarse[((chunks - 1) * c + k) * LANES + BEST] = q16(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        }
        let mut gram = vec![0f32; wp * wp];
        for (a, &la) in real_idx.iter().enumerate() {
            for (b, &lb) in real_idx.iter().enumerate() {
                gram[a * wp + b] = crate::ann::dot(&words[la * p..(la + 1) * p], &words[lb * p..(lb + 1) * p]);
            }
        }
        QueryTables { lq, w, centroids: c, dim: p, masked_mean, real_pos, lqp, t: tp, e1, wp, tw, lt, sq, coarse, chunks, gram }
    }

    /// Real words of the query.
    pub fn words(&self) -> usize {
        self.w
    }
}

/// The coarse score s1' + s2' of every clip (−∞ for a clip without a real region or a query
/// without a real word).
pub fn coarse_scores(codes: &Codes, qt: &QueryTables) -> Vec<f32> {
    let n = codes.real.len();
    let mut out = vec![f32::NEG_INFINITY; n];
    if qt.w == 0 {
        return out;
    }
    const BLOCK: usize = 2048;
    let avx2 = avx2();
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, o)| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (that is what the level says).
            unsafe { coarse_block_avx2(o, b * BLOCK, codes, qt) };
            return;
        }
        let _ = avx2;
        coarse_block(o, b * BLOCK, codes, qt);
    });
    out
}

/// [`coarse_block`] with the 16-lane i16 maxima and sums as AVX2 instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn coarse_block_avx2(out: &mut [f32], first: usize, codes: &Codes, qt: &QueryTables) {
    coarse_block_with(out, first, codes, qt, |tab, cs, m| unsafe { max_rows_avx2(tab, cs, m) })
}

/// The sum over the first `m` lanes of the lane-wise maximum of the 16-lane rows `cs` of
/// `tab`, and the sum of their [`BEST`] lanes; two rows in flight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn max_rows_avx2(tab: &[i16], cs: &[u16], m: usize) -> (i32, i32) {
    use std::arch::x86_64::*;
    let load = |k: u16| {
        let r = &tab[k as usize * LANES..(k as usize + 1) * LANES];
        _mm256_loadu_si256(r.as_ptr() as *const __m256i)
    };
    let (mut a, mut b) = (_mm256_set1_epi16(i16::MIN), _mm256_set1_epi16(i16::MIN));
    // i32 lane 7 = i16 lane 15 (BEST), sign-extended by the shift.
    let (mut sa, mut sb) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut pairs = cs.chunks_exact(2);
    for pr in &mut pairs {
        let (x, y) = (load(pr[0]), load(pr[1]));
        a = _mm256_max_epi16(a, x);
        b = _mm256_max_epi16(b, y);
        sa = _mm256_add_epi32(sa, _mm256_srai_epi32::<16>(x));
        sb = _mm256_add_epi32(sb, _mm256_srai_epi32::<16>(y));
    }
    for &k in pairs.remainder() {
        let x = load(k);
        a = _mm256_max_epi16(a, x);
        sa = _mm256_add_epi32(sa, _mm256_srai_epi32::<16>(x));
    }
    // Σ of the first m lanes: a multiply-add by 1 on those lanes (0 elsewhere), then the
    // eight i32 sums.
    let ones = _mm256_and_si256(
        _mm256_cmpgt_epi16(_mm256_set1_epi16(m as i16), _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
        _mm256_set1_epi16(1),
    );
    let v = _mm256_madd_epi16(_mm256_max_epi16(a, b), ones);
    let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
    let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b10_11_00_01>(v));
    (_mm_cvtsi128_si32(v), _mm256_extract_epi32::<7>(_mm256_add_epi32(sa, sb)))
}

/// [`coarse_scores`] of clips `first..first + out.len()` (portable form).
fn coarse_block(out: &mut [f32], first: usize, codes: &Codes, qt: &QueryTables) {
    coarse_block_with(out, first, codes, qt, |tab, cs, m| {
        let (mut acc, mut sum) = ([i16::MIN; LANES], 0i32);
        for &k in cs {
            let row = &tab[k as usize * LANES..(k as usize + 1) * LANES];
            for l in 0..LANES {
                acc[l] = acc[l].max(row[l]);
            }
            sum += row[BEST] as i32;
        }
        (acc[..m].iter().map(|&x| x as i32).sum(), sum)
    })
}

/// The coarse score of each clip, `max_rows(table chunk, codes, m)` giving the sum over the
/// first m lanes of the lane-wise maximum of a clip's rows in one 16-lane chunk of the table,
/// and the sum of their [`BEST`] lanes.
#[inline(always)]
fn coarse_block_with(
    out: &mut [f32],
    first: usize,
    codes: &Codes,
    qt: &QueryTables,
    max_rows: impl Fn(&[i16], &[u16], usize) -> (i32, i32),
) {
    let nl = codes.locals;
    let c = qt.centroids;
    for (j, o) in out.iter_mut().enumerate() {
        let i = first + j;
        let n = codes.real[i] as usize;
        if n == 0 {
            *o = f32::NEG_INFINITY;
            continue;
        }
        let cs = &codes.real_first[i * nl..i * nl + n];
        let (mut s1, mut s2) = (0i32, 0i32);
        for ch in 0..qt.chunks {
            let m = qt.w.saturating_sub(ch * LANES).min(LANES);
            let (words, best) = max_rows(&qt.coarse[ch * c * LANES..(ch + 1) * c * LANES], cs, m);
            s1 += words;
            // The last chunk's BEST lane (never a word's: its words fill at most 15 lanes).
            s2 = best;
        }
        *o = s1 as f32 / Q16 / qt.w as f32 + s2 as f32 / Q16 / n as f32;
    }
}

/// Scratch of [`centroid_local`], one a thread.
#[derive(Default)]
struct Scratch {
    /// `[C]` the serial of the clip that last saw each code, and the code's place in `uniq`.
    stamp: Vec<u32>,
    at: Vec<u32>,
    serial: u32,
    /// The clip's distinct codes (in order of first slot) and how many slots hold each: real
    /// slots (`real_n`) and every slot (`all_n`).
    uniq: Vec<u16>,
    real_n: Vec<f32>,
    all_n: Vec<f32>,
    /// The distinct codes of the real slots and their counts.
    ru: Vec<u16>,
    rn: Vec<f32>,
    /// `[lqp]` the word→region softmax sums, Σ kept weight · t, ‖Σ kept weight · ĉ‖².
    z: Vec<f32>,
    num: Vec<f32>,
    v: Vec<f32>,
    /// `[ru, lqp]` count × kept weight of each distinct real code at each position.
    wt: Vec<f32>,
    /// `[P]` the portable weighted sum.
    acc: Vec<f32>,
    // The region→word direction's (queries with more than 32 real words).
    n2: Vec<f32>,
    e: Vec<f32>,
    num2: Vec<f32>,
    g: Vec<f32>,
}

impl Scratch {
    /// Groups the slots of a clip by code (`mask`: which slots are real regions). Slots with
    /// one code are one centroid, so every term below is computed once per distinct code and
    /// weighted by its count (a clip's 40 slots hold ~27 distinct codes on the demo's model).
    fn group(&mut self, centroids: usize, slots: &[u16], mask: &[u8]) {
        if self.stamp.len() != centroids {
            (self.stamp, self.at, self.serial) = (vec![0; centroids], vec![0; centroids], 0);
        }
        self.serial = self.serial.wrapping_add(1);
        if self.serial == 0 {
            self.stamp.fill(0);
            self.serial = 1;
        }
        self.uniq.clear();
        self.real_n.clear();
        self.all_n.clear();
        for (&k, &m) in slots.iter().zip(mask) {
            let ku = k as usize;
            if self.stamp[ku] != self.serial {
                self.stamp[ku] = self.serial;
                self.at[ku] = self.uniq.len() as u32;
                self.uniq.push(k);
                self.real_n.push(0.0);
                self.all_n.push(0.0);
            }
            let u = self.at[ku] as usize;
            self.all_n[u] += 1.0;
            if m != 0 {
                self.real_n[u] += 1.0;
            }
        }
        self.ru.clear();
        self.rn.clear();
        for (&k, &n) in self.uniq.iter().zip(&self.real_n) {
            if n > 0.0 {
                self.ru.push(k);
                self.rn.push(n);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn centroid_local_avx2(codes: &Codes, index: &Index, qt: &QueryTables, i: usize, s: &mut Scratch) -> f32 {
    centroid_local(codes, index, qt, i, s, true)
}

/// Row `k` of a `[C, stride]` table.
#[inline(always)]
fn row(t: &[f32], k: usize, stride: usize) -> &[f32] {
    &t[k * stride..(k + 1) * stride]
}

/// The region-word score of clip `i` with its regions replaced by their centroids (see the
/// module docs); −∞ without a real region or a real word. `avx2`: the caller runs with AVX2
/// and FMA.
#[inline(always)]
fn centroid_local(codes: &Codes, index: &Index, qt: &QueryTables, i: usize, s: &mut Scratch, avx2: bool) -> f32 {
    let nl = codes.locals;
    let (lq, lqp, w, p) = (qt.lq, qt.lqp, qt.w, qt.dim);
    s.group(qt.centroids, &codes.codes[i * nl..(i + 1) * nl], index.mask(i));
    if s.ru.is_empty() || w == 0 {
        return f32::NEG_INFINITY;
    }
    // Word→region: queries = the word positions, contexts = the real regions.
    let lc = nl as f32;
    s.z.clear();
    s.z.resize(lqp, 0.0);
    for (&k, &n) in s.ru.iter().zip(&s.rn) {
        for (z, &e) in s.z.iter_mut().zip(row(&qt.e1, k as usize, lqp)) {
            *z += n * e;
        }
    }
    s.num.clear();
    s.num.resize(lqp, 0.0);
    s.wt.clear();
    s.wt.resize(s.ru.len() * lqp, 0.0);
    for ((&k, &n), wrow) in s.ru.iter().zip(&s.rn).zip(s.wt.chunks_exact_mut(lqp)) {
        let (erow, trow) = (row(&qt.e1, k as usize, lqp), row(&qt.t, k as usize, lqp));
        // The focal keep of every position at once (weight × regions above the row's sum).
        for ((((w, &e), &t), &z), num) in wrow.iter_mut().zip(erow).zip(trow).zip(&s.z).zip(s.num.iter_mut()) {
            *w = if e * lc > z { n * e } else { 0.0 };
            *num += *w * t;
        }
    }
    // ‖Σ_r w[r, l] ĉ_r‖² of every position l.
    s.v.clear();
    s.v.resize(lqp, 0.0);
    let rows = &codes.codebook.rows;
    if avx2 && p % 32 == 0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller runs with AVX2 and FMA; p is a multiple of 32.
        unsafe {
            weighted_norms_avx2(rows, p, &s.ru, &s.wt, lq, lqp, &mut s.v)
        };
    } else {
        weighted_norms(rows, p, &s.ru, &s.wt, lq, lqp, &mut s.v, &mut s.acc);
    }
    let (mut s1, mut n1) = (0f32, 0usize);
    for l in 0..lq {
        if qt.masked_mean && !qt.real_pos[l] {
            continue;
        }
        let n = s.v[l].sqrt();
        s1 += if n > 0.0 { s.num[l] / n } else { 0.0 };
        n1 += 1;
    }
    // Region→word: queries = every region slot (the real ones with `masked_mean`), contexts =
    // the real words.
    let mult = if qt.masked_mean { &s.real_n } else { &s.all_n };
    #[cfg(target_arch = "x86_64")]
    if avx2 && qt.wp <= 32 {
        // SAFETY: the caller runs with AVX2 and FMA; the stride is 8 × the const argument.
        let (s2, n2) = unsafe {
            match qt.wp {
                8 => dir2_avx2::<1>(qt, &s.uniq, mult, &s.all_n),
                16 => dir2_avx2::<2>(qt, &s.uniq, mult, &s.all_n),
                24 => dir2_avx2::<3>(qt, &s.uniq, mult, &s.all_n),
                _ => dir2_avx2::<4>(qt, &s.uniq, mult, &s.all_n),
            }
        };
        return s1 / n1.max(1) as f32 + s2 / n2.max(1.0);
    }
    let (s2, n2) = match qt.wp {
        8 => dir2_lanes::<8>(qt, &s.uniq, mult, &s.all_n),
        16 => dir2_lanes::<16>(qt, &s.uniq, mult, &s.all_n),
        24 => dir2_lanes::<24>(qt, &s.uniq, mult, &s.all_n),
        32 => dir2_lanes::<32>(qt, &s.uniq, mult, &s.all_n),
        // Queries with more than 32 real words: the scratch on the heap.
        wp => {
            for b in [&mut s.n2, &mut s.e, &mut s.num2, &mut s.g] {
                b.clear();
                b.resize(wp, 0.0);
            }
            dir2(qt, &s.uniq, mult, &s.all_n, wp, &mut s.n2, &mut s.e, &mut s.num2, &mut s.g)
        }
    };
    s1 / n1.max(1) as f32 + s2 / n2.max(1.0)
}

/// `out[l] = ‖Σ_u wt[u, l] · rows[codes[u]]‖²` for the positions l < `lq` (`wt` `[codes,
/// lqp]`; portable form of [`weighted_norms_avx2`]).
#[allow(clippy::too_many_arguments)]
fn weighted_norms(rows: &[f32], p: usize, codes: &[u16], wt: &[f32], lq: usize, lqp: usize, out: &mut [f32], acc: &mut Vec<f32>) {
    acc.resize(p, 0.0);
    for (l, o) in out[..lq].iter_mut().enumerate() {
        acc.fill(0.0);
        for (&k, wrow) in codes.iter().zip(wt.chunks_exact(lqp)) {
            let w = wrow[l];
            for (a, &b) in acc.iter_mut().zip(row(rows, k as usize, p)) {
                *a += w * b;
            }
        }
        *o = crate::ann::dot(acc, acc);
    }
}

/// [`weighted_norms`] as a dense register-blocked product: three positions × 32 dimensions
/// in twelve AVX registers, every distinct code streamed through them (no branch on the focal
/// keep's zeros: about half the weights are kept, and a branch on each cost more than the
/// multiplications it saved). `p` a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_norms_avx2(rows: &[f32], p: usize, codes: &[u16], wt: &[f32], lq: usize, lqp: usize, out: &mut [f32]) {
    let mut l0 = 0;
    while l0 < lq {
        match lq - l0 {
            1 => norms_block_avx2::<1>(rows, p, codes, wt, l0, lqp, out),
            2 => norms_block_avx2::<2>(rows, p, codes, wt, l0, lqp, out),
            _ => norms_block_avx2::<3>(rows, p, codes, wt, l0, lqp, out),
        }
        l0 += 3;
    }
}

/// Positions `l0..l0 + R` of [`weighted_norms_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn norms_block_avx2<const R: usize>(rows: &[f32], p: usize, codes: &[u16], wt: &[f32], l0: usize, lqp: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    for d0 in (0..p).step_by(32) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for (u, &k) in codes.iter().enumerate() {
            let c = &rows[k as usize * p + d0..k as usize * p + d0 + 32];
            let w = &wt[u * lqp + l0..u * lqp + l0 + R];
            let wv: [__m256; R] = std::array::from_fn(|i| _mm256_set1_ps(w[i]));
            for j in 0..4 {
                let x = _mm256_loadu_ps(c.as_ptr().add(8 * j));
                for i in 0..R {
                    acc[i][j] = _mm256_fmadd_ps(x, wv[i], acc[i][j]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let mut t = _mm256_mul_ps(a[0], a[0]);
            for v in &a[1..] {
                t = _mm256_fmadd_ps(*v, *v, t);
            }
            out[l0 + i] += hsum_ps(t);
        }
    }
}

/// Σ of the eight lanes of `x`, in [`lanes_sum`]'s order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum_ps(x: std::arch::x86_64::__m256) -> f32 {
    let mut h = [0f32; 8];
    std::arch::x86_64::_mm256_storeu_ps(h.as_mut_ptr(), x);
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

/// Σ of `x`, eight partial sums (vectorisable, a fixed order).
#[inline(always)]
fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    let mut t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in x.chunks_exact(8).remainder() {
        t += v;
    }
    t
}

/// [`dir2`] in `V` AVX registers (the tables' stride is 8·V): the same terms, the exponential
/// bit-identical to the scalar one, the sums in another order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dir2_avx2<const V: usize>(qt: &QueryTables, uniq: &[u16], mult: &[f32], all_n: &[f32]) -> (f32, f32) {
    use demovlp_retrieval::rows::cephes_exp_avx2;
    use std::arch::x86_64::*;
    let (w, wp) = (qt.w, 8 * V);
    debug_assert_eq!(qt.wp, wp);
    let load = |t: &[f32], k: usize| -> [__m256; V] {
        let r = &t[k * wp..(k + 1) * wp];
        std::array::from_fn(|v| _mm256_loadu_ps(r.as_ptr().add(8 * v)))
    };
    let hsum = |x: [__m256; V]| hsum_ps(x[1..].iter().fold(x[0], |t, v| _mm256_add_ps(t, *v)));
    let mut inv = [_mm256_setzero_ps(); V];
    for (&k, &n) in uniq.iter().zip(all_n) {
        let (x, n) = (load(&qt.sq, k as usize), _mm256_set1_ps(n));
        for v in 0..V {
            inv[v] = _mm256_fmadd_ps(n, x[v], inv[v]);
        }
    }
    // 1 / (√Σ + ε) on the real words' lanes, 1 on the padding lanes (their logits are −∞).
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (v, x) in inv.iter_mut().enumerate() {
        let real = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32 - 8 * v as i32), lane));
        let r = _mm256_div_ps(_mm256_set1_ps(1.0), _mm256_add_ps(_mm256_sqrt_ps(*x), _mm256_set1_ps(NORM_EPS)));
        *x = _mm256_blendv_ps(_mm256_set1_ps(1.0), r, real);
    }
    let lcw = _mm256_set1_ps(qt.lq as f32);
    let (mut s2, mut count) = (0f32, 0f32);
    let mut ea = [0f32; 32];
    for (&k, &m) in uniq.iter().zip(mult) {
        if m == 0.0 {
            continue;
        }
        let (lrow, trow) = (load(&qt.lt, k as usize), load(&qt.tw, k as usize));
        let mut e: [__m256; V] = std::array::from_fn(|v| cephes_exp_avx2(_mm256_mul_ps(lrow[v], inv[v])));
        let sum = _mm256_set1_ps(hsum(e));
        // Focal keep (above the mean weight over all Lq positions), then the cosine of the
        // region with the kept words' weighted sum, eᵀ G e as a dense product.
        for x in e.iter_mut() {
            *x = _mm256_and_ps(*x, _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(*x, lcw), sum));
        }
        let num = hsum(std::array::from_fn(|v| _mm256_mul_ps(e[v], trow[v])));
        for (v, x) in e.iter().enumerate() {
            _mm256_storeu_ps(ea.as_mut_ptr().add(8 * v), *x);
        }
        let mut g = [_mm256_setzero_ps(); V];
        for (a, &x) in ea[..w].iter().enumerate() {
            let (gr, x) = (load(&qt.gram, a), _mm256_set1_ps(x));
            for v in 0..V {
                g[v] = _mm256_fmadd_ps(x, gr[v], g[v]);
            }
        }
        let den = hsum(std::array::from_fn(|v| _mm256_mul_ps(g[v], e[v])));
        s2 += m * if den > 0.0 { num / den.sqrt() } else { 0.0 };
        count += m;
    }
    (s2, count)
}

/// [`dir2`] with its scratch on the stack, `N` = the tables' stride (the compiler sees every
/// length).
#[inline(always)]
fn dir2_lanes<const N: usize>(qt: &QueryTables, uniq: &[u16], mult: &[f32], all_n: &[f32]) -> (f32, f32) {
    let (mut inv, mut e, mut num, mut g) = ([0f32; N], [0f32; N], [0f32; N], [0f32; N]);
    dir2(qt, uniq, mult, all_n, N, &mut inv, &mut e, &mut num, &mut g)
}

/// The region→word direction of [`centroid_local`] over the real words in `wp` lanes (the
/// tables' stride; every scratch slice has that length), once per distinct code `uniq` (held
/// by `all_n` slots, averaged `mult` times): the softmax over the real words of its logits
/// divided by the clip's norm over every slot, the focal keep, and Σ e·t / √(eᵀ G e).
/// Returns (Σ over the averaged slots, their count).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dir2(
    qt: &QueryTables,
    uniq: &[u16],
    mult: &[f32],
    all_n: &[f32],
    wp: usize,
    inv: &mut [f32],
    e: &mut [f32],
    num: &mut [f32],
    g: &mut [f32],
) -> (f32, f32) {
    let w = qt.w;
    let lcw = qt.lq as f32;
    inv.fill(0.0);
    for (&k, &n) in uniq.iter().zip(all_n) {
        for (a, &x) in inv.iter_mut().zip(row(&qt.sq, k as usize, wp)) {
            *a += n * x;
        }
    }
    // 1 / (√Σ + ε) (padding lanes: 1, their logits are −∞).
    for (j, x) in inv.iter_mut().enumerate() {
        *x = if j < w { 1.0 / (x.sqrt() + NORM_EPS) } else { 1.0 };
    }
    let (mut s2, mut count) = (0f32, 0f32);
    for (&k, &m) in uniq.iter().zip(mult) {
        if m == 0.0 {
            continue;
        }
        let (lrow, trow) = (row(&qt.lt, k as usize, wp), row(&qt.tw, k as usize, wp));
        for ((e, &x), &inv) in e.iter_mut().zip(lrow).zip(inv.iter()) {
            *e = cephes_exp(x * inv);
        }
        let sum = lanes_sum(e);
        // Focal keep (above the mean weight over all Lq positions), then the cosine of the
        // region with the kept words' weighted sum: eᵀ G e as a dense product (no branch on
        // the zeros).
        for ((e, &x), num) in e.iter_mut().zip(trow).zip(num.iter_mut()) {
            *e = if *e * lcw > sum { *e } else { 0.0 };
            *num = *e * x;
        }
        g.fill(0.0);
        for (a, &ea) in e[..w].iter().enumerate() {
            for (gb, &x) in g.iter_mut().zip(row(&qt.gram, a, wp)) {
                *gb += x * ea;
            }
        }
        for (gb, &eb) in g.iter_mut().zip(e.iter()) {
            *gb *= eb;
        }
        let den = lanes_sum(g);
        s2 += m * if den > 0.0 { lanes_sum(num) / den.sqrt() } else { 0.0 };
        count += m;
    }
    (s2, count)
}

/// Asks the caches for the lines of `x` (no effect where the architecture has no prefetch).
#[inline(always)]
fn prefetch<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (p, bytes) = (x.as_ptr() as *const i8, std::mem::size_of_val(x));
        for off in (0..bytes).step_by(64) {
            // SAFETY: an address inside the slice; a prefetch accesses no memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// How many clips ahead [`centroid_scores`] asks for a clip's codes, mask and global row
/// (the clips are scattered over the index: each would otherwise cost a few memory latencies).
const AHEAD: usize = 4;

/// Global cosine + the centroid region-word score of each of `clips` (non-finite as −∞).
pub fn centroid_scores(codes: &Codes, index: &Index, qt: &QueryTables, global_unit: &[f32], clips: &[usize]) -> Vec<f32> {
    centroid_scores_on(codes, index, qt, global_unit, clips, avx2())
}

/// [`centroid_scores`] in its portable form (what a CPU without AVX2 runs; public for the
/// tests, which hold both forms to the exact formula).
#[doc(hidden)]
pub fn centroid_scores_portable(codes: &Codes, index: &Index, qt: &QueryTables, global_unit: &[f32], clips: &[usize]) -> Vec<f32> {
    centroid_scores_on(codes, index, qt, global_unit, clips, false)
}

fn centroid_scores_on(codes: &Codes, index: &Index, qt: &QueryTables, global_unit: &[f32], clips: &[usize], avx2: bool) -> Vec<f32> {
    let nl = codes.locals;
    let mut out = vec![0f32; clips.len()];
    const CHUNK: usize = 256;
    // What the centroid step reads of clip i.
    let fetch = |i: usize| {
        prefetch(&codes.codes[i * nl..(i + 1) * nl]);
        prefetch(index.mask(i));
        prefetch(index.global(i));
    };
    out.par_chunks_mut(CHUNK).zip(clips.par_chunks(CHUNK)).for_each_init(Scratch::default, |s, (out, clips)| {
        clips.iter().take(AHEAD).for_each(|&i| fetch(i));
        for (j, (o, &i)) in out.iter_mut().zip(clips).enumerate() {
            if let Some(&next) = clips.get(j + AHEAD) {
                fetch(next);
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA (that is what the level says).
            let local =
                if avx2 { unsafe { centroid_local_avx2(codes, index, qt, i, s) } } else { centroid_local(codes, index, qt, i, s, false) };
            #[cfg(not(target_arch = "x86_64"))]
            let local = centroid_local(codes, index, qt, i, s, avx2);
            let v = crate::ann::dot(global_unit, index.global(i)) + local;
            *o = if v.is_finite() { v } else { f32::NEG_INFINITY };
        }
    });
    out
}
