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

// y[i] += x[i mod m]
extern "C" __global__ void add_to_rows(float* y, const float* x, long long n, long long m) {
    GRID_STRIDE(i, n) y[i] += x[i % m];
}

// acc[j] += sum over rows r (in order) of x[r*m + j]
extern "C" __global__ void sum_rows_into(float* acc, const float* x, long long m, long long rows) {
    GRID_STRIDE(j, m) {
        float s = acc[j];
        for (long long r = 0; r < rows; r++) s += x[r * m + j];
        acc[j] = s;
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
