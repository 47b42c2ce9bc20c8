// The fallback fp32 GEMM when libcublas is not available: column-major
// C[m, n] = op(A)·op(B) + beta·C (alpha 1), op = transpose when ta / tb, 16 x 16 shared tiles,
// fp32 accumulation in k order. grid (ceil(m/16), ceil(n/16)), block (16, 16).

#define TILE 16

extern "C" __global__ void sgemm_tiled(int ta, int tb, int m, int n, int k, const float* a, long long lda,
                                       const float* b, long long ldb, float beta, float* c, long long ldc) {
    __shared__ float as[TILE][TILE + 1];
    __shared__ float bs[TILE][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.x * TILE + tx;  // of C (m)
    int col = blockIdx.y * TILE + ty;  // of C (n)
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        // as[tx][ty] = op(A)[row, k0 + ty]; bs[tx][ty] = op(B)[k0 + tx, col]
        int ka = k0 + ty, kb = k0 + tx;
        float va = 0.0f, vb = 0.0f;
        if (row < m && ka < k) va = ta ? a[(long long)row * lda + ka] : a[(long long)ka * lda + row];
        if (col < n && kb < k) vb = tb ? b[(long long)kb * ldb + col] : b[(long long)col * ldb + kb];
        as[tx][ty] = va;
        bs[tx][ty] = vb;
        __syncthreads();
        for (int kk = 0; kk < TILE; kk++) acc += as[tx][kk] * bs[kk][ty];
        __syncthreads();
    }
    if (row < m && col < n) {
        float* cp = c + (long long)col * ldc + row;
        *cp = beta == 0.0f ? acc : acc + beta * *cp;
    }
}
