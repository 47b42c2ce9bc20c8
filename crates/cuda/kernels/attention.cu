// Attention over token rows (q, k, v rows `ld` wide, head h at columns h*hd), with the
// additive padding mask [B, seq], optional dropout on the probabilities (layout of probs),
// and the key patterns of demovlp_kernels::attention (Full; Frames: the CLS row sees every
// key, a region row sees the CLS key then its own frame's R keys). Probabilities in the
// same compact layout as the CPU kernels. fp32, one block per (batch, head, query row).

struct Row { long long offset; int lead; int start; int count; };

__device__ __forceinline__ Row row_keys(int i, int seq, int regions) {
    Row r;
    if (regions == 0) { r.offset = (long long)i * seq; r.lead = 0; r.start = 0; r.count = seq; }
    else if (i == 0) { r.offset = 0; r.lead = 0; r.start = 0; r.count = seq; }
    else {
        int start = 1 + (i - 1) / regions * regions;
        r.offset = seq + (long long)(i - 1) * (regions + 1); r.lead = 1; r.start = start; r.count = regions;
    }
    return r;
}
__device__ __forceinline__ int key_at(const Row& r, int n) { return r.lead ? (n == 0 ? 0 : r.start + n - 1) : r.start + n; }
__device__ __forceinline__ long long probs_per_head(int seq, int regions) {
    return regions == 0 ? (long long)seq * seq : seq + (long long)(seq - 1) * (regions + 1);
}

#define THREADS 128

__device__ float block_reduce(float v, float* sh, bool is_max) {
    int t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] = is_max ? fmaxf(sh[t], sh[t + s]) : sh[t] + sh[t + s];
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// grid (seq, heads, batch); dynamic shared memory: seq floats. out head-major [B, H, seq, hd].
extern "C" __global__ void attention_forward(int seq, int heads, int hd, int regions, float scale,
                                             const float* q, const float* k, const float* v, long long ld,
                                             const float* mask, const float* drop, float* probs, float* out) {
    extern __shared__ float p[];
    __shared__ float red[THREADS];
    int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    Row r = row_keys(i, seq, regions);
    int nk = r.count + r.lead;
    long long bh = (long long)b * heads + h;
    long long base = bh * probs_per_head(seq, regions) + r.offset;
    const float* qi = q + ((long long)b * seq + i) * ld + h * hd;
    float m = -__int_as_float(0x7f800000);
    for (int n = threadIdx.x; n < nk; n += THREADS) {
        int j = key_at(r, n);
        const float* kj = k + ((long long)b * seq + j) * ld + h * hd;
        float s = 0.0f;
        for (int c = 0; c < hd; c++) s += qi[c] * kj[c];
        s = scale * s + mask[(long long)b * seq + j];
        p[n] = s;
        m = fmaxf(m, s);
    }
    m = block_reduce(m, red, true);
    float sum = 0.0f;
    for (int n = threadIdx.x; n < nk; n += THREADS) { float e = expf(p[n] - m); p[n] = e; sum += e; }
    sum = block_reduce(sum, red, false);
    for (int n = threadIdx.x; n < nk; n += THREADS) { p[n] = p[n] / sum; probs[base + n] = p[n]; }
    __syncthreads();
    float* o = out + (bh * seq + i) * hd;
    for (int c = threadIdx.x; c < hd; c += THREADS) {
        float acc = 0.0f;
        for (int n = 0; n < nk; n++) {
            int j = key_at(r, n);
            float w = p[n] * (drop ? drop[base + n] : 1.0f);
            acc += w * v[((long long)b * seq + j) * ld + h * hd + c];
        }
        o[c] = acc;
    }
}

// Backward, phase 1 (grid (seq, heads, batch)): ds (probs layout) = scale·p·(dp − Σ p·dp) with
// dp_j = m_j·(dout_i·v_j), and dq_i = Σ_j ds_j k_j (overwritten). dout rows `ld_dout` wide.
extern "C" __global__ void attention_backward_rows_ds(int seq, int heads, int hd, int regions, float scale,
                                                      const float* k, const float* v, long long ld,
                                                      const float* probs, const float* drop,
                                                      const float* dout, long long ld_dout, float* ds, float* dq, long long ld_d) {
    __shared__ float red[THREADS];
    int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    Row r = row_keys(i, seq, regions);
    int nk = r.count + r.lead;
    long long bh = (long long)b * heads + h;
    long long base = bh * probs_per_head(seq, regions) + r.offset;
    const float* doi = dout + ((long long)b * seq + i) * ld_dout + h * hd;
    float pdp = 0.0f;
    for (int n = threadIdx.x; n < nk; n += THREADS) {
        int j = key_at(r, n);
        const float* vj = v + ((long long)b * seq + j) * ld + h * hd;
        float s = 0.0f;
        for (int c = 0; c < hd; c++) s += doi[c] * vj[c];
        float dp = (drop ? drop[base + n] : 1.0f) * s;
        ds[base + n] = dp;
        pdp += probs[base + n] * dp;
    }
    pdp = block_reduce(pdp, red, false);
    for (int n = threadIdx.x; n < nk; n += THREADS) ds[base + n] = scale * probs[base + n] * (ds[base + n] - pdp);
    __syncthreads();
    for (int c = threadIdx.x; c < hd; c += THREADS) {
        float acc = 0.0f;
        for (int n = 0; n < nk; n++) acc += ds[base + n] * k[((long long)b * seq + key_at(r, n)) * ld + h * hd + c];
        dq[((long long)b * seq + i) * ld_d + h * hd + c] = acc;
    }
}

// Position of key j in query row i's keys, or -1 when row i does not see j.
__device__ __forceinline__ int pos_of(int i, int j, int seq, int regions) {
    if (regions == 0 || i == 0) return j;
    if (j == 0) return 0;
    int start = 1 + (i - 1) / regions * regions;
    return (j >= start && j < start + regions) ? 1 + j - start : -1;
}

// Backward, phase 2 (grid (seq, heads, batch), one block per key j): dk_j = Σ_i ds_ij q_i,
// dv_j = Σ_i p_ij·m_ij·dout_i over the query rows that see j, in row order (overwritten).
extern "C" __global__ void attention_backward_rows_dkv(int seq, int heads, int hd, int regions,
                                                       const float* q, long long ld, const float* probs, const float* drop,
                                                       const float* dout, long long ld_dout, const float* ds,
                                                       float* dk, float* dv, long long ld_d) {
    int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    long long bh = (long long)b * heads + h;
    long long pph = probs_per_head(seq, regions);
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int i = 0; i < seq; i++) {
            int n = pos_of(i, j, seq, regions);
            if (n < 0) continue;
            long long at = bh * pph + row_keys(i, seq, regions).offset + n;
            ak += ds[at] * q[((long long)b * seq + i) * ld + h * hd + c];
            av += probs[at] * (drop ? drop[at] : 1.0f) * dout[((long long)b * seq + i) * ld_dout + h * hd + c];
        }
        dk[((long long)b * seq + j) * ld_d + h * hd + c] = ak;
        dv[((long long)b * seq + j) * ld_d + h * hd + c] = av;
    }
}

// Head-major [B, H, seq, hd] to token rows `ld` wide.
extern "C" __global__ void merge_heads(const float* src, float* dst, long long ld, int batch, int heads, int seq, int hd) {
    long long n = (long long)batch * heads * seq * hd;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
        int c = x % hd; long long t = x / hd; int i = t % seq; t /= seq; int h = t % heads; int b = t / heads;
        dst[((long long)b * seq + i) * ld + h * hd + c] = src[x];
    }
}
