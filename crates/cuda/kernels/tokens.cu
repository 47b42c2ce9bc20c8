// Embeddings and the video token assembly (deterministic: every accumulation runs in the
// CPU kernels' order, one thread per column).

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void embedding_forward(const long long* ids, long long tokens, const float* table, long long dim, float* out) {
    GRID_STRIDE(x, tokens * dim) { long long t = x / dim, c = x % dim; out[x] = table[ids[t] * dim + c]; }
}

// dtable[ids[t]] += dout[t], tokens in order (one thread per column).
extern "C" __global__ void embedding_backward(const long long* ids, long long tokens, const float* dout, long long dim, float* dtable) {
    GRID_STRIDE(c, dim) { for (long long t = 0; t < tokens; t++) dtable[ids[t] * dim + c] += dout[t * dim + c]; }
}

// grad_rows[row_of[t]] += dout[t] (row_of[t] < 0: skipped); grad_rows zeroed before.
extern "C" __global__ void embedding_backward_rows(const int* row_of, long long tokens, const float* dout, long long dim, float* grad_rows) {
    GRID_STRIDE(c, dim) { for (long long t = 0; t < tokens; t++) if (row_of[t] >= 0) grad_rows[(long long)row_of[t] * dim + c] += dout[t * dim + c]; }
}

extern "C" __global__ void video_tokens_forward(int batch, int frames, int regions, long long d, const float* cls, const float* pos0,
                                                const float* temporal, const float* region_emb, float* x) {
    long long nr = (long long)frames * regions, seq = 1 + nr;
    GRID_STRIDE(e, batch * seq * d) {
        long long c = e % d, t = (e / d) % seq, b = e / d / seq;
        x[e] = t == 0 ? cls[c] + pos0[c] : region_emb[(b * nr + t - 1) * d + c] + temporal[((t - 1) / regions) * d + c];
    }
}

// d(region_emb) = dx's region rows (overwritten).
extern "C" __global__ void video_tokens_backward_regions(int batch, int frames, int regions, long long d, const float* dx, float* d_region) {
    long long nr = (long long)frames * regions, seq = 1 + nr;
    GRID_STRIDE(e, batch * nr * d) {
        long long c = e % d, j = (e / d) % nr, b = e / d / nr;
        d_region[e] = dx[(b * seq + 1 + j) * d + c];
    }
}

// cls += Σ_b dx[b, 0]; pos0 likewise; temporal[f] += Σ_b Σ_{j in f} dx[b, 1 + j] (clips, then regions, in order).
extern "C" __global__ void video_tokens_backward_params(int batch, int frames, int regions, long long d, const float* dx,
                                                        float* cls, float* pos0, float* temporal) {
    long long nr = (long long)frames * regions, seq = 1 + nr;
    GRID_STRIDE(e, (1 + frames) * d) {
        long long c = e % d, f = e / d;
        if (f == 0) {
            float a = cls[c], p = pos0[c];
            for (int b = 0; b < batch; b++) { float g = dx[b * seq * d + c]; a += g; p += g; }
            cls[c] = a; pos0[c] = p;
        } else {
            float* t = temporal + (f - 1) * d + c;
            float s = *t;
            for (int b = 0; b < batch; b++)
                for (int r = 0; r < regions; r++) s += dx[(b * seq + 1 + (f - 1) * regions + r) * d + c];
            *t = s;
        }
    }
}

// Broadcast bias: y[i] = b[i mod m].
extern "C" __global__ void set_rows(float* y, const float* b, long long n, long long m) {
    GRID_STRIDE(i, n) y[i] = b[i % m];
}

// fp32 -> bf16 (round to nearest even) for the bf16 GEMM inputs.
extern "C" __global__ void to_bf16(const float* x, long long ldx, unsigned short* y, long long rows, long long cols) {
    GRID_STRIDE(e, rows * cols) {
        long long r = e / cols, c = e % cols;
        unsigned int u = __float_as_uint(x[r * ldx + c]);
        unsigned int rounded = u + 0x7fffu + ((u >> 16) & 1u);
        y[e] = (unsigned short)(rounded >> 16);
    }
}
