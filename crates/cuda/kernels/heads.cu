// The QA head's small kernels (see crates/model/src/backend/host.rs for the host versions).

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void max_over_positions(const float* x, float* arg, float* out, int batch, int len, int dim) {
    GRID_STRIDE(e, (long long)batch * dim) {
        long long b = e / dim, k = e % dim;
        float best = x[b * len * dim + k]; int at = 0;
        for (int t = 1; t < len; t++) { float v = x[(b * len + t) * dim + k]; if (v > best) { best = v; at = t; } }
        out[e] = best; arg[e] = (float)at;
    }
}

// dx zeroed before; dx[b, arg, k] = dout[b, k].
extern "C" __global__ void max_over_positions_backward(const float* dout, const float* arg, float* dx, int batch, int len, int dim) {
    GRID_STRIDE(e, (long long)batch * dim) {
        long long b = e / dim, k = e % dim;
        dx[(b * len + (long long)arg[e]) * dim + k] = dout[e];
    }
}

#define THREADS 256
__device__ double block_sum_d(double v, double* sh) {
    int t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) { if (t < s) sh[t] += sh[t + s]; __syncthreads(); }
    double r = sh[0];
    __syncthreads();
    return r;
}

// One block: w = g·v/‖v‖ (the scale in f64, rounded once).
extern "C" __global__ void weight_norm(const float* g, const float* v, float* w, long long n) {
    __shared__ double sh[THREADS];
    double s = 0.0;
    for (long long i = threadIdx.x; i < n; i += THREADS) s += (double)v[i] * (double)v[i];
    double norm = sqrt(block_sum_d(s, sh));
    float scale = (float)((double)g[0] / norm);
    for (long long i = threadIdx.x; i < n; i += THREADS) w[i] = v[i] * scale;
}

// One block: dg += ⟨dw, v⟩/‖v‖, dv += (g/‖v‖)·dw − (g·⟨dw, v⟩/‖v‖³)·v.
extern "C" __global__ void weight_norm_backward(const float* g, const float* v, const float* dw, float* dg, float* dv, long long n) {
    __shared__ double sh[THREADS];
    double s = 0.0, d = 0.0;
    for (long long i = threadIdx.x; i < n; i += THREADS) { s += (double)v[i] * (double)v[i]; d += (double)dw[i] * (double)v[i]; }
    double norm = sqrt(block_sum_d(s, sh));
    double dot = block_sum_d(d, sh);
    double gg = (double)g[0];
    if (threadIdx.x == 0) dg[0] += (float)(dot / norm);
    double a = gg / norm, c = gg * dot / (norm * norm * norm);
    for (long long i = threadIdx.x; i < n; i += THREADS) dv[i] += (float)(a * (double)dw[i] - c * (double)v[i]);
}

extern "C" __global__ void mul_broadcast(const float* x, const float* y, float* out, int batch, int n, int h) {
    GRID_STRIDE(e, (long long)batch * n * h) { long long k = e % h, b = e / h / n; out[e] = x[e] * y[b * h + k]; }
}

// dx = dout ⊙ y; dy[b, k] += Σ_r dout ⊙ x (r in order; one thread per (b, k)).
extern "C" __global__ void mul_broadcast_backward(const float* x, const float* y, const float* dout, float* dx, float* dy, int batch, int n, int h) {
    GRID_STRIDE(e, (long long)batch * h) {
        long long b = e / h, k = e % h;
        float yk = y[e], s = dy[e];
        for (int r = 0; r < n; r++) { long long i = (b * n + r) * h + k; dx[i] = dout[i] * yk; s += dout[i] * x[i]; }
        dy[e] = s;
    }
}

// One thread per row of n (the rows are short: regions per clip).
extern "C" __global__ void softmax_rows(const float* x, float* y, long long rows, int n) {
    GRID_STRIDE(rw, rows) {
        const float* xr = x + rw * n; float* yr = y + rw * n;
        float m = -__int_as_float(0x7f800000);
        for (int i = 0; i < n; i++) m = fmaxf(m, xr[i]);
        float s = 0.0f;
        for (int i = 0; i < n; i++) { yr[i] = expf(xr[i] - m); s += yr[i]; }
        for (int i = 0; i < n; i++) yr[i] /= s;
    }
}

extern "C" __global__ void softmax_rows_backward(const float* y, const float* dy, float* dx, long long rows, int n) {
    GRID_STRIDE(rw, rows) {
        const float* yr = y + rw * n; const float* dyr = dy + rw * n;
        float dot = 0.0f;
        for (int i = 0; i < n; i++) dot += yr[i] * dyr[i];
        for (int i = 0; i < n; i++) dx[rw * n + i] = yr[i] * (dyr[i] - dot);
    }
}

extern "C" __global__ void weighted_sum(const float* w, const float* o, float* out, int batch, int n, int dim) {
    GRID_STRIDE(e, (long long)batch * dim) {
        long long b = e / dim, c = e % dim;
        float acc = 0.0f;
        for (int r = 0; r < n; r++) acc += w[b * n + r] * o[(b * n + r) * dim + c];
        out[e] = acc;
    }
}

extern "C" __global__ void weighted_sum_backward_w(const float* o, const float* dout, float* dw, int batch, int n, int dim) {
    GRID_STRIDE(e, (long long)batch * n) {
        long long b = e / n;
        float s = 0.0f;
        for (int c = 0; c < dim; c++) s += o[e * dim + c] * dout[b * dim + c];
        dw[e] = s;
    }
}

extern "C" __global__ void weighted_sum_backward_o(const float* w, const float* dout, float* d_o, int batch, int n, int dim) {
    GRID_STRIDE(e, (long long)batch * n * dim) { long long c = e % dim, br = e / dim, b = br / n; d_o[e] = w[br] * dout[b * dim + c]; }
}
