// Elementwise kernels of the demovlp CUDA backend (fp32). Compiled at run time by NVRTC;
// each kernel has the semantics of the `demovlp_kernels` / `Cpu` method of the same name
// (see crates/model/src/backend/mod.rs). Grid-stride loops; `long long` sizes.

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void copy_2d(const float* src, long long sld, float* dst, long long dld, long long rows, long long cols) {
    GRID_STRIDE(i, rows * cols) {
        long long r = i / cols, c = i % cols;
        dst[r * dld + c] = src[r * sld + c];
    }
}

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad_f(float x) {
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

extern "C" __global__ void gelu_forward(const float* x, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = gelu_f(x[i]);
}

extern "C" __global__ void gelu_forward_with_grad(const float* x, float* y, float* dydx, long long n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        y[i] = gelu_f(v);
        dydx[i] = gelu_grad_f(v);
    }
}

extern "C" __global__ void gelu_backward_in_place(const float* x, float* d, long long n) {
    GRID_STRIDE(i, n) d[i] *= gelu_grad_f(x[i]);
}

extern "C" __global__ void relu_forward(const float* x, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

extern "C" __global__ void relu_backward(const float* x, const float* dy, float* dx, long long n) {
    GRID_STRIDE(i, n) if (x[i] > 0.0f) dx[i] += dy[i];
}

extern "C" __global__ void mul_in_place(float* x, const float* m, long long n) {
    GRID_STRIDE(i, n) x[i] *= m[i];
}

extern "C" __global__ void mul_into(const float* x, const float* m, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = x[i] * m[i];
}

extern "C" __global__ void add_in_place(float* y, const float* x, long long n) {
    GRID_STRIDE(i, n) y[i] += x[i];
}

// y[i] = x[i] * s (no contraction: the CPU's one product)
extern "C" __global__ void scale(const float* x, float s, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = __fmul_rn(x[i], s);
}

// y[i] += x[i mod m]
extern "C" __global__ void add_to_rows(float* y, const float* x, long long n, long long m) {
    GRID_STRIDE(i, n) y[i] += x[i % m];
}

// Column sums of x [rows, m] in two deterministic passes over many blocks (the bias
// gradients; crates/cuda/src/geometry.rs: `column_sums` is the same arithmetic on the host).
// Pass 1: grid (ceil(m / 32), chunks), block (32, 8): partial[chunk, col] = the chunk's rows,
// lane y taking rows y, y + 8, ..., the 8 lanes added in order.
#define COL_WIDTH 32
#define COL_LANES 8
extern "C" __global__ void col_sums_partial(const float* x, long long rows, long long m, long long chunk, float* partial) {
    __shared__ float sh[COL_LANES][COL_WIDTH + 1];
    long long col = (long long)blockIdx.x * COL_WIDTH + threadIdx.x;
    long long r0 = (long long)blockIdx.y * chunk;
    long long r1 = r0 + chunk < rows ? r0 + chunk : rows;
    float s = 0.0f;
    if (col < m)
        for (long long r = r0 + threadIdx.y; r < r1; r += COL_LANES) s += x[r * m + col];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < m) {
        float t = sh[0][threadIdx.x];
        for (int j = 1; j < COL_LANES; j++) t += sh[j][threadIdx.x];
        partial[(long long)blockIdx.y * m + col] = t;
    }
}

// Pass 2: acc[col] += the chunks' partial sums, in chunk order.
extern "C" __global__ void col_sums_finish(const float* partial, long long chunks, long long m, float* acc) {
    GRID_STRIDE(col, m) {
        float s = 0.0f;
        for (long long c = 0; c < chunks; c++) s += partial[c * m + col];
        acc[col] += s;
    }
}

// AdamW, the published variant (see StepCoeffs::apply): one run of elements.
extern "C" __global__ void adamw_update(float* p, const float* g, float* m, float* v, long long n,
                                        float step_size, float decay, float b1, float b2, float eps) {
    GRID_STRIDE(i, n) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] - step_size * (mi / (sqrtf(vi) + eps));
        pi -= decay * pi;
        p[i] = pi;
    }
}

// The same over a [rows, dim] table whose gradient is zero except on the rows of `row_of`
// (row_of[r] = index into grad_rows, or -1).
extern "C" __global__ void adamw_update_table_rows(float* p, float* m, float* v, long long rows, long long dim,
                                                   const int* row_of, const float* grad_rows,
                                                   float step_size, float decay, float b1, float b2, float eps) {
    GRID_STRIDE(i, rows * dim) {
        long long r = i / dim, c = i % dim;
        int gr = row_of[r];
        float gi = gr >= 0 ? grad_rows[(long long)gr * dim + c] : 0.0f;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] - step_size * (mi / (sqrtf(vi) + eps));
        pi -= decay * pi;
        p[i] = pi;
    }
}

// Dropout masks from the CPU's generator (demovlp_kernels::Rng, xoshiro256++), bit for bit:
// thread i draws elements i·2^c … (i+1)·2^c − 1 (c = chunk_log2) after jumping the state
// (s0..s3) ahead by i·2^c with the matrices T^(2^k) of `table` ([64][256][4] words: column b
// of T^(2^k) = the image of the state with only bit b set; crates/cuda/src/plan.rs, whose
// `dropout_mask_by_threads` is this kernel on the host). 0 with probability p, else `keep`.
typedef unsigned long long u64_t;
__device__ __forceinline__ u64_t rotl64(u64_t x, int k) { return (x << k) | (x >> (64 - k)); }

extern "C" __global__ void dropout_xoshiro(long long s0, long long s1, long long s2, long long s3, const long long* table,
                                           int chunk_log2, long long n, float p, float keep, float* out) {
    long long chunk = 1LL << chunk_log2;
    long long threads = (n + chunk - 1) >> chunk_log2;
    const u64_t* tab = (const u64_t*)table;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < threads; i += (long long)gridDim.x * blockDim.x) {
        u64_t s[4] = {(u64_t)s0, (u64_t)s1, (u64_t)s2, (u64_t)s3};
        for (int j = 0; (i >> j) != 0; j++) {
            if (((i >> j) & 1) == 0) continue;
            const u64_t* m = tab + (long long)(j + chunk_log2) * 256 * 4;
            u64_t r[4] = {0, 0, 0, 0};
            for (int b = 0; b < 256; b++) {
                if ((s[b >> 6] >> (b & 63)) & 1ULL) {
                    r[0] ^= m[b * 4];
                    r[1] ^= m[b * 4 + 1];
                    r[2] ^= m[b * 4 + 2];
                    r[3] ^= m[b * 4 + 3];
                }
            }
            s[0] = r[0]; s[1] = r[1]; s[2] = r[2]; s[3] = r[3];
        }
        long long end = (i + 1) * chunk < n ? (i + 1) * chunk : n;
        for (long long k = i * chunk; k < end; k++) {
            u64_t result = rotl64(s[0] + s[3], 23) + s[0];
            u64_t t = s[1] << 17;
            s[2] ^= s[0];
            s[3] ^= s[1];
            s[1] ^= s[2];
            s[0] ^= s[3];
            s[2] ^= t;
            s[3] = rotl64(s[3], 45);
            float u = (float)(result >> 40) * (1.0f / 16777216.0f);
            out[k] = u < p ? 0.0f : keep;
        }
    }
}
