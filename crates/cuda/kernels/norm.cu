// LayerNorm forward/backward (fp32 values, f64 row statistics as the CPU kernel), one block
// of 256 threads per row; the weight/bias gradients by column over rows in order (deterministic).

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

// dw[i] += Σ_rows dy·x̂, db[i] += Σ_rows dy (rows in order).
extern "C" __global__ void layernorm_backward_dwdb(const float* x, const float* mean, const float* rstd, const float* dy,
                                                   float* dw, float* db, long long rows, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float sw = 0.0f, sb = 0.0f;
    for (long long r = 0; r < rows; r++) {
        float g = dy[r * d + i];
        sw += g * (x[r * d + i] - mean[r]) * rstd[r];
        sb += g;
    }
    dw[i] += sw;
    db[i] += sb;
}
