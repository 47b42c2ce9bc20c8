// The retrieval losses on the device (SPEC §6), forward and backward, fused: nothing of size
// (B, B, words, regions) is ever allocated. Semantics of crates/retrieval/src/{global,loss,
// local,rows}.rs; where the CPU sums in a fixed order the GPU sums by warp/block trees, so
// results agree to rounding (the focal keep test `P·Lc − ΣP > 0` can flip on an exact tie).
//
// - Global contrastive loss: `l2_rows` (clamped norms), a cuBLAS GEMM for G, then
//   `global_loss_ce` (one block, f64 softmaxes and loss, as the CPU), GEMMs for dT̂, dV̂,
//   `l2_rows_backward`.
// - Region-word alignment: `l2_rows` (norm + ε), then per chunk of videos one GEMM for the
//   word × region cosine blocks M of every (text, video) pair of the chunk, and
//   `rwa_pair_forward` / `rwa_pair_backward`: one block per pair (grid-stride over the
//   chunk's pairs), both directions attend → focal → weighted context → cosine → mean with
//   the explicit weighted context of crates/retrieval/src/local.rs, per-block scratch in
//   global memory (bounded by the grid, not by the pair count); `align_loss` (one block,
//   f64, as the CPU's `alignment_loss`) between the two; the backward accumulates the
//   gradients of the raw rows (through the cosines) and of the normalised rows (through
//   M and the contexts) with atomics, and `l2_rows_backward` folds the latter into the
//   former. Gradient bits therefore depend on the atomics' order (values do not, beyond
//   rounding).
//
// Compiled with --fmad=false: a·b + c rounds twice, as the CPU's scalar code.

#define NORM_EPS 1e-8f
#define SIM_EPS 1e-8f
#define LEAKY_SLOPE 0.1f
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float leaky_f(float x) { return x > 0.0f ? x : LEAKY_SLOPE * x; }
__device__ __forceinline__ bool is_real_f(float m) { return m > -0.5f; }

// crates/retrieval/src/fastmath.rs `cephes_exp`, the same operations in the same order.
__device__ __forceinline__ float cephes_exp(float x) {
    const float LOG2E = 1.44269504088896340736f;
    const float LN2_HI = 0.6933594f;
    const float LN2_LO = -2.1219444e-4f;
    const float MAGIC = 12582912.0f;
    float xc = fminf(fmaxf(x, -87.0f), 88.0f);
    float t = xc * LOG2E + MAGIC;
    float n = t - MAGIC;
    float r = xc - n * LN2_HI - n * LN2_LO;
    float p = 1.9875691e-4f;
    p = p * r + 1.3981999e-3f;
    p = p * r + 8.333452e-3f;
    p = p * r + 4.1665796e-2f;
    p = p * r + 1.6666665e-1f;
    p = p * r + 0.5f;
    float y = p * (r * r) + r + 1.0f;
    int ni = __float_as_int(t) - __float_as_int(MAGIC);
    float scale = __int_as_float((ni + 127) << 23);
    return x < -87.0f ? 0.0f : y * scale;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Rows of x [rows, dim] normalised, one warp per row. clamp = 1 (the global loss):
// hat = x / max(‖x‖, 1e-8), norm = the clamped norm; clamp = 0 (the alignment's l2norm):
// hat = x / (‖x‖ + 1e-8), norm = ‖x‖. raw = ‖x‖ either way.
extern "C" __global__ void l2_rows(const float* x, long long rows, int dim, int clamp, float* hat, float* norm, float* raw) {
    int lane = threadIdx.x & 31;
    long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        const float* xr = x + r * dim;
        float s = 0.0f;
        for (int k = lane; k < dim; k += 32) s += xr[k] * xr[k];
        float nrm = sqrtf(warp_sum(s));
        float den = clamp ? fmaxf(nrm, SIM_EPS) : nrm + NORM_EPS;
        for (int k = lane; k < dim; k += 32) hat[r * dim + k] = xr[k] / den;
        if (lane == 0) {
            norm[r] = clamp ? den : nrm;
            raw[r] = nrm;
        }
    }
}

// Backward of `l2_rows`. clamp = 1: gx = (g − x̂⟨g, x̂⟩)/‖x‖ where the norm is not clamped,
// g / 1e-8 where it is (overwrites gx). clamp = 0: gx += g/(‖x‖+ε) − x·⟨g, x⟩/((‖x‖+ε)²‖x‖).
extern "C" __global__ void l2_rows_backward(const float* g, const float* hat, const float* x, const float* norm, const float* raw,
                                            long long rows, int dim, int clamp, float* gx) {
    int lane = threadIdx.x & 31;
    long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        const float* gr = g + r * dim;
        const float* xr = x + r * dim;
        float* out = gx + r * dim;
        if (clamp) {
            const float* hr = hat + r * dim;
            float nrm = norm[r];
            if (raw[r] > SIM_EPS) {
                float d = 0.0f;
                for (int k = lane; k < dim; k += 32) d += gr[k] * hr[k];
                d = warp_sum(d);
                for (int k = lane; k < dim; k += 32) out[k] = (gr[k] - hr[k] * d) / nrm;
            } else {
                for (int k = lane; k < dim; k += 32) out[k] = gr[k] / SIM_EPS;
            }
        } else {
            float n = norm[r];
            float ne = n + NORM_EPS;
            float d = 0.0f;
            for (int k = lane; k < dim; k += 32) d += gr[k] * xr[k];
            d = warp_sum(d);
            float c = n > 0.0f ? d / (ne * ne * n) : 0.0f;
            for (int k = lane; k < dim; k += 32) out[k] += gr[k] / ne - xr[k] * c;
        }
    }
}

// The symmetric InfoNCE of G [b, b] (rows = texts) at temperature τ, in f64 as the CPU:
// out[0] = L_g; with want_grad, gg = dL/dG = (softmax_row + softmax_col − 2I)/(bτ).
// One block; scratch holds 4·b doubles (row max, row sum, column max, column sum).
extern "C" __global__ void global_loss_ce(const float* g, int b, float temperature, int want_grad, double* scratch, float* gg,
                                          float* out) {
    __shared__ double sh[256];
    double inv_tau = 1.0 / (double)temperature;
    double* rmax = scratch;
    double* rsum = scratch + b;
    double* cmax = scratch + 2 * b;
    double* csum = scratch + 3 * b;
    double loss = 0.0;
    for (int o = threadIdx.x; o < 2 * b; o += blockDim.x) {
        int line = o % b;
        bool col = o >= b;
        double m = -1.0 / 0.0;
        for (int k = 0; k < b; k++) {
            double z = (double)g[col ? k * b + line : line * b + k] * inv_tau;
            m = z > m ? z : m;
        }
        double s = 0.0;
        for (int k = 0; k < b; k++) s += exp((double)g[col ? k * b + line : line * b + k] * inv_tau - m);
        double zd = (double)g[line * b + line] * inv_tau;
        loss -= (zd - m - log(s)) / b;
        if (col) {
            cmax[line] = m;
            csum[line] = s;
        } else {
            rmax[line] = m;
            rsum[line] = s;
        }
    }
    sh[threadIdx.x] = loss;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = (float)sh[0];
    if (!want_grad) return;
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
        int i = e / b, j = e % b;
        double z = (double)g[e] * inv_tau;
        double row = exp(z - rmax[i]) / rsum[i];
        double col = exp(z - cmax[j]) / csum[j];
        double eye = i == j ? 2.0 : 0.0;
        gg[e] = (float)((row + col - eye) * inv_tau / b);
    }
}

// L_rwa of S [b, b] (rows = videos), crates/retrieval/src/loss.rs `alignment_loss` in f64:
// out[0] = mean_v Σ_t p (log p − log(δ + 1e-6)), p = softmax_t(λ S[v, :]); with want_grad,
// gs = dL/dS. log_on / log_off are the host's f32 logs of 1 + 1e-6 and 1e-6. One block.
extern "C" __global__ void align_loss(const float* s, int b, float lambda, float log_on, float log_off, int want_grad, float* gs,
                                      float* out) {
    __shared__ double sh[256];
    double lam = (double)lambda;
    double loss = 0.0;
    for (int v = threadIdx.x; v < b; v += blockDim.x) {
        const float* row = s + (long long)v * b;
        double mx = -1.0 / 0.0;
        for (int t = 0; t < b; t++) {
            double y = (double)row[t] * lam;
            mx = y > mx ? y : mx;
        }
        double se = 0.0;
        for (int t = 0; t < b; t++) se += exp((double)row[t] * lam - mx);
        double lse = mx + log(se);
        double f = 0.0;
        for (int t = 0; t < b; t++) {
            double y = (double)row[t] * lam;
            double e = y - lse - (t == v ? (double)log_on : (double)log_off);
            f += exp(y - lse) * e;
        }
        loss += f / b;
        if (want_grad) {
            for (int t = 0; t < b; t++) {
                double y = (double)row[t] * lam;
                double e = y - lse - (t == v ? (double)log_on : (double)log_off);
                gs[(long long)v * b + t] = (float)(lam * exp(y - lse) * (e - f) / b);
            }
        }
    }
    sh[threadIdx.x] = loss;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = (float)sh[0];
}

// ---- region-word alignment, one block per (text, video) pair --------------------------

// One pair's operands. M row-major [w, ldm] at `m` (words × regions); text t: raw/hat
// rows [w, dim], norms and additive mask [w]; video v likewise with n regions.
struct Pair {
    int w, n, dim;
    float lambda;
    int masked_mean;
    const float* m;
    long long ldm;
    const float *t_raw, *t_hat, *t_norm, *t_mask;
    const float *v_raw, *v_hat, *v_norm, *v_mask;
};

// Per-block scratch (floats), the same layout in both kernels; `rwa_scratch_len` on the
// host (crates/cuda/src/backend/losses.rs) is 4·w·n + (w + n)·(dim + 6).
struct Scratch {
    float *p1, *p2;     // [w, n] word→region softmax, [n, w] region→word softmax
    float *g1, *g2;     // the same shapes: gradients of the logits' inputs (backward)
    float *wc1, *wc2;   // [w, dim], [n, dim]: weighted contexts, then their gradients
    float *st1, *st2;   // per query row: total ΣP, kept sum, ‖wc‖, cosine ([4, w], [4, n])
    float *cn1, *cn2;   // step-3 norms of the contexts: [n] over words, [w] over regions
    float *cc1, *cc2;   // backward of the step-3 norms: [n], [w]
};

__device__ Scratch scratch_of(float* base, int w, int n, int dim) {
    Scratch s;
    long long wn = (long long)w * n;
    s.p1 = base;
    s.p2 = s.p1 + wn;
    s.g1 = s.p2 + wn;
    s.g2 = s.g1 + wn;
    s.wc1 = s.g2 + wn;
    s.wc2 = s.wc1 + (long long)w * dim;
    s.st1 = s.wc2 + (long long)n * dim;
    s.st2 = s.st1 + 4 * w;
    s.cn1 = s.st2 + 4 * n;
    s.cn2 = s.cn1 + n;
    s.cc1 = s.cn2 + w;
    s.cc2 = s.cc1 + n;
    return s;
}

// One attend direction, seen from its query rows: D(l, s) the cosine of query l and context
// s (M or its transpose), the query side's raw rows, norms and mask, the context side's
// normalised rows, mask and step-3 norms, and where its softmax, contexts and row
// statistics live.
struct Dir {
    int lq, lc, dim;
    const float* m;
    long long ldm;
    int transposed;  // D(l, s) = M[s, l] (region → word)
    const float *q_raw, *q_norm, *q_mask;
    const float *c_hat, *c_mask;
    float *cnorm, *p, *g, *wc, *st, *cc;
};

__device__ __forceinline__ float dval(const Dir& d, int l, int s) {
    return d.transposed ? d.m[(long long)s * d.ldm + l] : d.m[(long long)l * d.ldm + s];
}

__device__ Dir dir_of(const Pair& x, const Scratch& sc, int which) {
    Dir d;
    d.dim = x.dim;
    d.m = x.m;
    d.ldm = x.ldm;
    if (which == 0) {  // word → region
        d.lq = x.w; d.lc = x.n; d.transposed = 0;
        d.q_raw = x.t_raw; d.q_norm = x.t_norm; d.q_mask = x.t_mask;
        d.c_hat = x.v_hat; d.c_mask = x.v_mask;
        d.cnorm = sc.cn1; d.p = sc.p1; d.g = sc.g1; d.wc = sc.wc1; d.st = sc.st1; d.cc = sc.cc1;
    } else {  // region → word
        d.lq = x.n; d.lc = x.w; d.transposed = 1;
        d.q_raw = x.v_raw; d.q_norm = x.v_norm; d.q_mask = x.v_mask;
        d.c_hat = x.t_hat; d.c_mask = x.t_mask;
        d.cnorm = sc.cn2; d.p = sc.p2; d.g = sc.g2; d.wc = sc.wc2; d.st = sc.st2; d.cc = sc.cc2;
    }
    return d;
}

// Step 3 of both directions: for every region, sqrt(Σ_words LeakyReLU(M)²) + ε, and for
// every word, sqrt(Σ_regions LeakyReLU(M)²) + ε; each a sequential sum in the CPU's order.
__device__ void pair_norms(const Pair& x, const Scratch& sc) {
    for (int i = threadIdx.x; i < x.n + x.w; i += blockDim.x) {
        float acc = 0.0f;
        if (i < x.n) {
            for (int l = 0; l < x.w; l++) { float y = leaky_f(x.m[(long long)l * x.ldm + i]); acc += y * y; }
            sc.cn1[i] = sqrtf(acc) + NORM_EPS;
        } else {
            int l = i - x.n;
            for (int s = 0; s < x.n; s++) { float y = leaky_f(x.m[(long long)l * x.ldm + s]); acc += y * y; }
            sc.cn2[l] = sqrtf(acc) + NORM_EPS;
        }
    }
}

// The focal-kept, renormalised weight of context s of row l (0 where dropped).
__device__ __forceinline__ float kept_weight(const Dir& d, int l, int s) {
    float p = d.p[(long long)l * d.lc + s];
    float total = d.st[l], kept = d.st[d.lq + l];
    return p * (float)d.lc - total > 0.0f ? p / kept : 0.0f;
}

// Query row l of direction d, by one warp: softmax over the contexts of
// ((LeakyReLU(D)/n_s + m_q) + m_c)·λ, the focal rule, the weighted context, the cosine.
__device__ void dir_row(const Dir& d, int l, float lambda) {
    int lane = threadIdx.x & 31;
    float mq = d.q_mask[l];
    float* prow = d.p + (long long)l * d.lc;
    float mx = -1.0f / 0.0f;
    for (int s = lane; s < d.lc; s += 32) {
        float z = ((leaky_f(dval(d, l, s)) / d.cnorm[s] + mq) + d.c_mask[s]) * lambda;
        prow[s] = z;
        mx = fmaxf(mx, z);
    }
    mx = warp_max(mx);
    float se = 0.0f;
    for (int s = lane; s < d.lc; s += 32) {
        float e = cephes_exp(prow[s] - mx);
        prow[s] = e;
        se += e;
    }
    float inv = 1.0f / warp_sum(se);
    float tot = 0.0f;
    for (int s = lane; s < d.lc; s += 32) {
        float p = prow[s] * inv;
        prow[s] = p;
        tot += p;
    }
    float total = warp_sum(tot);
    float ks = 0.0f;
    for (int s = lane; s < d.lc; s += 32) {
        float p = prow[s];
        if (p * (float)d.lc - total > 0.0f) ks += p;
    }
    float kept = warp_sum(ks);
    __syncwarp();
    // Weighted context wc[k] = Σ_s R[s]·ĉ_s[k], lanes over k.
    float* wc = d.wc + (long long)l * d.dim;
    for (int k = lane; k < d.dim; k += 32) wc[k] = 0.0f;
    for (int s = 0; s < d.lc; s++) {
        float p = prow[s];
        if (!(p * (float)d.lc - total > 0.0f)) continue;  // uniform across the warp
        float r = p / kept;
        const float* c = d.c_hat + (long long)s * d.dim;
        for (int k = lane; k < d.dim; k += 32) wc[k] += r * c[k];
    }
    const float* q = d.q_raw + (long long)l * d.dim;
    float u = 0.0f, w2 = 0.0f;
    for (int k = lane; k < d.dim; k += 32) {
        u += q[k] * wc[k];
        w2 += wc[k] * wc[k];
    }
    u = warp_sum(u);
    float wn = sqrtf(warp_sum(w2));
    if (lane == 0) {
        d.st[l] = total;
        d.st[d.lq + l] = kept;
        d.st[2 * d.lq + l] = wn;
        d.st[3 * d.lq + l] = u / fmaxf(d.q_norm[l] * wn, NORM_EPS);
    }
}

// Both directions' rows, warps over the w + n query rows.
__device__ void pair_rows(const Pair& x, const Scratch& sc) {
    Dir d0 = dir_of(x, sc, 0), d1 = dir_of(x, sc, 1);
    int warps = blockDim.x >> 5;
    for (int i = threadIdx.x >> 5; i < x.w + x.n; i += warps) {
        if (i < x.w) dir_row(d0, i, x.lambda);
        else dir_row(d1, i - x.w, x.lambda);
    }
}

// Real query rows of a direction (the masked mean's count).
__device__ int real_rows(const Dir& d) {
    int c = 0;
    for (int l = 0; l < d.lq; l++) c += is_real_f(d.q_mask[l]);
    return c;
}

// sim of a direction from its rows' cosines: the mean over all query rows (published), or
// over the real ones (masked_mean). Sequential, in row order, as the CPU.
__device__ float dir_sim(const Dir& d, int masked_mean) {
    float sum = 0.0f;
    int real = 0;
    for (int l = 0; l < d.lq; l++) {
        if (!masked_mean || is_real_f(d.q_mask[l])) {
            sum += d.st[3 * d.lq + l];
            real++;
        }
    }
    if (masked_mean) return real == 0 ? 0.0f : sum / (float)real;
    return sum / (float)d.lq;
}

__device__ Pair pair_of(int t, int vl, int v, int w, int n, int dim, float lambda, int masked_mean, const float* m, long long ldm,
                        const float* t_raw, const float* t_hat, const float* t_norm, const float* t_mask, const float* v_raw,
                        const float* v_hat, const float* v_norm, const float* v_mask) {
    Pair x;
    x.w = w; x.n = n; x.dim = dim; x.lambda = lambda; x.masked_mean = masked_mean;
    x.m = m + (long long)t * w * ldm + (long long)vl * n;
    x.ldm = ldm;
    x.t_raw = t_raw + (long long)t * w * dim; x.t_hat = t_hat + (long long)t * w * dim;
    x.t_norm = t_norm + (long long)t * w; x.t_mask = t_mask + (long long)t * w;
    x.v_raw = v_raw + (long long)v * n * dim; x.v_hat = v_hat + (long long)v * n * dim;
    x.v_norm = v_norm + (long long)v * n; x.v_mask = v_mask + (long long)v * n;
    return x;
}

// S_loc[v, t] = s2 + s1 (rows = videos, nt texts per row) for the nt × nvc pairs of texts
// 0..nt and videos v0..v0+nvc, whose cosine blocks are M [nt·w, ldm] (column (v − v0)·n + r).
// Grid-stride over the pairs; `scratch` holds gridDim.x blocks of `per_block` floats.
extern "C" __global__ void rwa_pair_forward(int nt, int nvc, int v0, int w, int n, int dim, float lambda, int masked_mean,
                                            const float* m, long long ldm, const float* t_raw, const float* t_hat,
                                            const float* t_norm, const float* t_mask, const float* v_raw, const float* v_hat,
                                            const float* v_norm, const float* v_mask, float* scratch, long long per_block,
                                            float* s_out) {
    Scratch sc = scratch_of(scratch + blockIdx.x * per_block, w, n, dim);
    for (long long pi = blockIdx.x; pi < (long long)nt * nvc; pi += gridDim.x) {
        int t = (int)(pi % nt), vl = (int)(pi / nt), v = v0 + vl;
        Pair x = pair_of(t, vl, v, w, n, dim, lambda, masked_mean, m, ldm, t_raw, t_hat, t_norm, t_mask, v_raw, v_hat, v_norm, v_mask);
        pair_norms(x, sc);
        __syncthreads();
        pair_rows(x, sc);
        __syncthreads();
        if (threadIdx.x == 0) {
            float s1 = dir_sim(dir_of(x, sc, 0), masked_mean);
            float s2 = dir_sim(dir_of(x, sc, 1), masked_mean);
            s_out[(long long)v * nt + t] = s2 + s1;
        }
        __syncthreads();
    }
}

// The mean's weight of query row l.
__device__ __forceinline__ float row_weight(const Dir& d, int l, int masked_mean, int real) {
    if (!masked_mean) return 1.0f / (float)d.lq;
    return is_real_f(d.q_mask[l]) ? 1.0f / (float)real : 0.0f;
}

// Backward of one query row, by one warp (crates/retrieval/src/local.rs `Direction::backward`):
// the cosine (d raw query row → atomics into gq_raw; d wc kept in place of wc), the kept
// contexts' d R, the renormalisation and the softmax → d logits in g (row l).
__device__ void dir_row_backward(const Dir& d, int l, float gsim, float lambda, int masked_mean, int real, float* gq_raw) {
    int lane = threadIdx.x & 31;
    float gc = gsim * row_weight(d, l, masked_mean, real);
    float* wc = d.wc + (long long)l * d.dim;
    const float* q = d.q_raw + (long long)l * d.dim;
    float* gq = gq_raw + (long long)l * d.dim;
    if (gc != 0.0f) {
        float qn = d.q_norm[l], wn = d.st[2 * d.lq + l], c = d.st[3 * d.lq + l];
        float den = qn * wn;
        if (den > NORM_EPS) {
            float a = gc / den, b = gc * c / (qn * qn);
            float e = gc / den, f = gc * c / (wn * wn);
            for (int k = lane; k < d.dim; k += 32) {
                float wk = wc[k], qk = q[k];
                atomicAdd(gq + k, a * wk - b * qk);
                wc[k] = e * qk - f * wk;
            }
        } else {
            float a = gc / NORM_EPS;
            for (int k = lane; k < d.dim; k += 32) {
                float wk = wc[k], qk = q[k];
                atomicAdd(gq + k, a * wk);
                wc[k] = a * qk;
            }
        }
    } else {
        for (int k = lane; k < d.dim; k += 32) wc[k] = 0.0f;
    }
    __syncwarp();
    // d R[l, s] = ⟨d wc, ĉ_s⟩ where kept (elsewhere unused: the renormalisation passes none).
    float* grow = d.g + (long long)l * d.lc;
    for (int s = 0; s < d.lc; s++) {
        float r = kept_weight(d, l, s);
        float v = 0.0f;
        if (r > 0.0f) {
            const float* c = d.c_hat + (long long)s * d.dim;
            for (int k = lane; k < d.dim; k += 32) v += wc[k] * c[k];
            v = warp_sum(v);
        }
        if (lane == 0) grow[s] = v;
    }
    __syncwarp();
    float rdot = 0.0f;
    for (int s = lane; s < d.lc; s += 32) rdot += kept_weight(d, l, s) * grow[s];
    rdot = warp_sum(rdot);
    float inv = 1.0f / d.st[d.lq + l];
    const float* prow = d.p + (long long)l * d.lc;
    float pdot = 0.0f;
    for (int s = lane; s < d.lc; s += 32) {
        float gp = kept_weight(d, l, s) > 0.0f ? (grow[s] - rdot) * inv : 0.0f;
        grow[s] = gp;
        pdot += gp * prow[s];
    }
    pdot = warp_sum(pdot);
    for (int s = lane; s < d.lc; s += 32) grow[s] = lambda * prow[s] * (grow[s] - pdot);
}

// Gradients of g_s[v, t]·S_loc[v, t] for the same pairs as `rwa_pair_forward`, both
// directions weighted by g_s (skipped where it is 0): the raw local rows' gradients (through
// the cosines) accumulate into g_t_raw [T, w, dim] / g_v_raw [V, n, dim], the normalised
// rows' (through M and the contexts) into g_t_hat / g_v_hat, all by atomics.
extern "C" __global__ void rwa_pair_backward(int nt, int nvc, int v0, int w, int n, int dim, float lambda, int masked_mean,
                                             const float* m, long long ldm, const float* t_raw, const float* t_hat,
                                             const float* t_norm, const float* t_mask, const float* v_raw, const float* v_hat,
                                             const float* v_norm, const float* v_mask, float* scratch, long long per_block,
                                             const float* gs, float* g_t_raw, float* g_v_raw, float* g_t_hat, float* g_v_hat) {
    Scratch sc = scratch_of(scratch + blockIdx.x * per_block, w, n, dim);
    int warps = blockDim.x >> 5;
    for (long long pi = blockIdx.x; pi < (long long)nt * nvc; pi += gridDim.x) {
        int t = (int)(pi % nt), vl = (int)(pi / nt), v = v0 + vl;
        float g = gs[(long long)v * nt + t];
        if (g == 0.0f) continue;  // uniform across the block
        Pair x = pair_of(t, vl, v, w, n, dim, lambda, masked_mean, m, ldm, t_raw, t_hat, t_norm, t_mask, v_raw, v_hat, v_norm, v_mask);
        Dir d0 = dir_of(x, sc, 0), d1 = dir_of(x, sc, 1);
        // Recompute the pair's forward (like flash attention), then go back through it.
        pair_norms(x, sc);
        __syncthreads();
        pair_rows(x, sc);
        __syncthreads();
        int real0 = masked_mean ? real_rows(d0) : 0, real1 = masked_mean ? real_rows(d1) : 0;
        float* gtr = g_t_raw + (long long)t * w * dim;
        float* gvr = g_v_raw + (long long)v * n * dim;
        for (int i = threadIdx.x >> 5; i < w + n; i += warps) {
            if (i < w) dir_row_backward(d0, i, g, lambda, masked_mean, real0, gtr);
            else dir_row_backward(d1, i - w, g, lambda, masked_mean, real1, gvr);
        }
        __syncthreads();
        // Step 3 backward: per context s, Σ_l dA[l, s]·LeakyReLU(D[l, s]) / (n_s² (n_s − ε)).
        for (int i = threadIdx.x; i < n + w; i += blockDim.x) {
            const Dir& d = i < n ? d0 : d1;
            int s = i < n ? i : i - n;
            float acc = 0.0f;
            for (int l = 0; l < d.lq; l++) acc += d.g[(long long)l * d.lc + s] * leaky_f(dval(d, l, s));
            float nn = d.cnorm[s], raw = nn - NORM_EPS;
            d.cc[s] = raw > 0.0f ? acc / (nn * nn * raw) : 0.0f;
        }
        __syncthreads();
        // d D = (dA/n_s − LeakyReLU(D)·cc_s)·LeakyReLU'(D), in place.
        for (long long e = threadIdx.x; e < 2LL * w * n; e += blockDim.x) {
            const Dir& d = e < (long long)w * n ? d0 : d1;
            long long f = e < (long long)w * n ? e : e - (long long)w * n;
            int l = (int)(f / d.lc), s = (int)(f % d.lc);
            float dv = dval(d, l, s);
            float gl = d.g[f] / d.cnorm[s] - leaky_f(dv) * d.cc[s];
            d.g[f] = dv > 0.0f ? gl : LEAKY_SLOPE * gl;
        }
        __syncthreads();
        // d Ŵ[i, k] = Σ_r dM[i, r]·R̂[r, k] + Σ_r R2[r, i]·d wc2[r, k]  (dM = g1 + g2ᵀ), and
        // d R̂[r, k] = Σ_i dM[i, r]·Ŵ[i, k] + Σ_i R1[i, r]·d wc1[i, k].
        float* gth = g_t_hat + (long long)t * w * dim;
        float* gvh = g_v_hat + (long long)v * n * dim;
        for (long long e = threadIdx.x; e < (long long)(w + n) * dim; e += blockDim.x) {
            int row = (int)(e / dim), k = (int)(e % dim);
            float acc = 0.0f;
            if (row < w) {
                int i = row;
                for (int r = 0; r < n; r++) {
                    float dm = sc.g1[(long long)i * n + r] + sc.g2[(long long)r * w + i];
                    acc += dm * x.v_hat[(long long)r * dim + k];
                    float rw = kept_weight(d1, r, i);
                    if (rw > 0.0f) acc += rw * sc.wc2[(long long)r * dim + k];
                }
                atomicAdd(gth + (long long)i * dim + k, acc);
            } else {
                int r = row - w;
                for (int i = 0; i < w; i++) {
                    float dm = sc.g1[(long long)i * n + r] + sc.g2[(long long)r * w + i];
                    acc += dm * x.t_hat[(long long)i * dim + k];
                    float rw = kept_weight(d0, i, r);
                    if (rw > 0.0f) acc += rw * sc.wc1[(long long)i * dim + k];
                }
                atomicAdd(gvh + (long long)r * dim + k, acc);
            }
        }
        __syncthreads();
    }
}

// score[t, v] = G[t, v] + S_loc[v, t] (aligned) or + S_loc[t, v] (reference: the published
// untransposed sum, nt = nv), in place in G [nt, nv].
extern "C" __global__ void add_local_scores(float* g, const float* s_loc, int nt, int nv, int reference) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < (long long)nt * nv; e += (long long)gridDim.x * blockDim.x) {
        long long t = e / nv, v = e % nv;
        g[e] += reference ? s_loc[t * nt + v] : s_loc[v * nt + t];
    }
}
