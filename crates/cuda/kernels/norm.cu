// LayerNorm forward/backward (fp32 values, f64 row statistics as the CPU kernel), one block
// of 256 threads per row; the weight/bias gradients by a deterministic two-pass column
// reduction over many blocks.

#define THREADS 256

__device__ double block_sum(double v, double* sh) {
    int t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] += sh[t + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

extern "C" __global__ void layernorm_forward(const float* x, const float* w, const float* b, float eps, float* y,
                                             float* mean, float* rstd, long long rows, int d) {
    __shared__ double sh[THREADS];
    long long row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + row * d;
    double s = 0.0;
    for (int i = threadIdx.x; i < d; i += THREADS) s += (double)xr[i];
    double mu = block_sum(s, sh) / d;
    double q = 0.0;
    for (int i = threadIdx.x; i < d; i += THREADS) { double c = (double)xr[i] - mu; q += c * c; }
    double var = block_sum(q, sh) / d;
    double rs = 1.0 / sqrt(var + (double)eps);
    for (int i = threadIdx.x; i < d; i += THREADS) y[row * d + i] = ((float)(((double)xr[i] - mu) * rs)) * w[i] + b[i];
    if (threadIdx.x == 0) { mean[row] = (float)mu; rstd[row] = (float)rs; }
}

// dx += d/dx (one block per row).
extern "C" __global__ void layernorm_backward_dx(const float* x, const float* w, const float* mean, const float* rstd,
                                                 const float* dy, float* dx, long long rows, int d) {
    __shared__ double sh[THREADS];
    long long row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + row * d;
    const float* dyr = dy + row * d;
    float mu = mean[row], rs = rstd[row];
    double a = 0.0, c = 0.0;
    for (int i = threadIdx.x; i < d; i += THREADS) {
        float xh = (xr[i] - mu) * rs;
        float g = dyr[i] * w[i];
        a += (double)g;
        c += (double)g * (double)xh;
    }
    float mg = (float)(block_sum(a, sh) / d);
    float mgx = (float)(block_sum(c, sh) / d);
    for (int i = threadIdx.x; i < d; i += THREADS) {
        float xh = (xr[i] - mu) * rs;
        dx[row * d + i] += rs * (dyr[i] * w[i] - mg - xh * mgx);
    }
}

// dw[i] += Σ_rows dy·x̂, db[i] += Σ_rows dy: pass 1 of the two-pass column reduction
// (elementwise.cu's col_sums_partial with the term dy·x̂; `col_sums_finish` adds the chunks).
// grid (ceil(d / 32), chunks), block (32, 8).
extern "C" __global__ void layernorm_dwdb_partial(const float* x, const float* mean, const float* rstd, const float* dy,
                                                  long long rows, int d, long long chunk, float* pw, float* pb) {
    __shared__ float shw[8][33];
    __shared__ float shb[8][33];
    long long col = (long long)blockIdx.x * 32 + threadIdx.x;
    long long r0 = (long long)blockIdx.y * chunk;
    long long r1 = r0 + chunk < rows ? r0 + chunk : rows;
    float sw = 0.0f, sb = 0.0f;
    if (col < d)
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            float g = dy[r * d + col];
            sw += g * ((x[r * d + col] - mean[r]) * rstd[r]);
            sb += g;
        }
    shw[threadIdx.y][threadIdx.x] = sw;
    shb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && col < d) {
        float tw = shw[0][threadIdx.x], tb = shb[0][threadIdx.x];
        for (int j = 1; j < 8; j++) { tw += shw[j][threadIdx.x]; tb += shb[j][threadIdx.x]; }
        pw[(long long)blockIdx.y * d + col] = tw;
        pb[(long long)blockIdx.y * d + col] = tb;
    }
}
