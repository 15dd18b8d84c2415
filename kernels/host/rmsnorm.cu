// Host twins of kernels/rmsnorm.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare them with src/backend/cpu/rmsnorm.rs without a GPU. Arrays are f32 (the kernels' bf16
// inputs widened); either output of the backward may be null.
#include <vector>

#include "../colsum.cuh"
#include "../rmsnorm.cuh"

// The forward with the CPU's mean square (summed in f64, as cpu::row_rstd does), then the shared
// formulas: cpu::rmsnorm_forward's bits.
extern "C" void kiln_host_rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t rows, int64_t c, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * c;
        double s = 0.0;
        for (int64_t i = 0; i < c; i++) s += (double)xr[i] * (double)xr[i];
        const float rs = rms_rstd((float)(s / (double)c), eps);
        rstd[r] = rs;
        for (int64_t i = 0; i < c; i++) out[r * c + i] = rms_out(xr[i], rs, w[i]);
    }
}

// dx with the CPU's serial row sums; dw exactly as the device computes it (groups of
// KILN_LN_DW_ROWS rows summed in row order with rms_dw_acc, then the groups in colsum.cuh's
// order), so the kernels' dw equals this bit for bit on the same (bf16-valued) inputs.
extern "C" void kiln_host_rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd, int64_t rows, int64_t c) {
    if (dx) {
        for (int64_t r = 0; r < rows; r++) {
            const float *g = dout + r * c, *xr = x + r * c;
            float m = 0.0f;
            for (int64_t i = 0; i < c; i++) m += rms_gwx(g[i], w[i], xr[i], rstd[r]);
            m /= (float)c;
            for (int64_t i = 0; i < c; i++) dx[r * c + i] = rms_dx(g[i], w[i], xr[i], rstd[r], m);
        }
    }
    if (!dw) return;
    const int64_t groups = (rows + KILN_LN_DW_ROWS - 1) / KILN_LN_DW_ROWS;
    std::vector<float> part(groups);  // this column's partial sums
    for (int64_t col = 0; col < c; col++) {
        for (int64_t gi = 0; gi < groups; gi++) {
            float acc = 0.0f;
            for (int64_t r = gi * KILN_LN_DW_ROWS; r < rows && r < (gi + 1) * KILN_LN_DW_ROWS; r++) acc = rms_dw_acc(acc, dout[r * c + col], x[r * c + col], rstd[r]);
            part[gi] = acc;
        }
        dw[col] = colsum_in_order(part.data(), 1, (int)groups);
    }
}
