// Host twins of kernels/layernorm.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare them with src/backend/cpu/layernorm.rs without a GPU. Arrays are f32 (the kernels' bf16
// inputs widened); any output pointer of the backward may be null.
#include <vector>

#include "../colsum.cuh"
#include "../layernorm.cuh"

// The forward with the CPU's serial row sums: the formulas of layernorm.cuh in the CPU's order,
// so it reproduces cpu::layernorm_forward bit for bit.
extern "C" void kiln_host_layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int64_t rows, int64_t c, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * c;
        float s = 0.0f;
        for (int64_t i = 0; i < c; i++) s += xr[i];
        const float mu = ln_mean(s, (int)c);
        float sq = 0.0f;
        for (int64_t i = 0; i < c; i++) sq += (xr[i] - mu) * (xr[i] - mu);
        const float rs = ln_rstd(ln_var(sq, (int)c), eps);
        mean[r] = mu;
        rstd[r] = rs;
        for (int64_t i = 0; i < c; i++) out[r * c + i] = ln_out(xr[i], mu, rs, w[i], b[i]);
    }
}

// dx with the CPU's serial row sums; dw and db exactly as the device computes them (groups of
// KILN_LN_DW_ROWS rows summed in row order with ln_dw_acc, then the groups in colsum.cuh's
// order), so the kernels' dw/db equal these bit for bit on the same (bf16-valued) inputs.
extern "C" void kiln_host_layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, const float* mean, const float* rstd, int64_t rows, int64_t c) {
    if (dx) {
        for (int64_t r = 0; r < rows; r++) {
            const float *g = dout + r * c, *xr = x + r * c;
            float m1 = 0.0f, m2 = 0.0f;
            for (int64_t i = 0; i < c; i++) {
                const float dxhat = g[i] * w[i];
                m1 += dxhat;
                m2 += dxhat * ln_xhat(xr[i], mean[r], rstd[r]);
            }
            m1 /= (float)c;
            m2 /= (float)c;
            for (int64_t i = 0; i < c; i++) dx[r * c + i] = ln_dx(g[i], w[i], ln_xhat(xr[i], mean[r], rstd[r]), rstd[r], m1, m2);
        }
    }
    if (!dw && !db) return;
    const int64_t groups = (rows + KILN_LN_DW_ROWS - 1) / KILN_LN_DW_ROWS;
    std::vector<float> part(2 * groups);  // this column's [groups, 2] partial sums
    for (int64_t col = 0; col < c; col++) {
        for (int64_t gi = 0; gi < groups; gi++) {
            float aw = 0.0f, ab = 0.0f;
            for (int64_t r = gi * KILN_LN_DW_ROWS; r < rows && r < (gi + 1) * KILN_LN_DW_ROWS; r++) {
                const float g = dout[r * c + col];
                aw = ln_dw_acc(aw, g, ln_xhat(x[r * c + col], mean[r], rstd[r]));
                ab += g;
            }
            part[2 * gi] = aw;
            part[2 * gi + 1] = ab;
        }
        if (dw) dw[col] = colsum_in_order(part.data(), 2, (int)groups);
        if (db) db[col] = colsum_in_order(part.data() + 1, 2, (int)groups);
    }
}
