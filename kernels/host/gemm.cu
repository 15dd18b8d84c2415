// Host twin of the GEMM epilogue (kernels/gemm.cuh), for tests that run without a GPU.
//
// kiln_host_gemm_epilogue applies, over arrays, exactly what every gemm_* kernel does to an output
// element once its f32 dot product is known: bias, accumulate, pre-activation, GELU, rounding to
// the output type. Tests feed it a product computed by the CPU backend and compare the result with
// cpu::gemm::matmul_forward / matmul.
#include "../gemm.cuh"

// out [m, n] = epilogue(acc [m, n]) under `flags` (KILN_GEMM_*). bias [n] may be null; the kernels
// read it as bf16, so give bf16-representable values to mirror them. With KILN_GEMM_ACCUMULATE,
// out holds the old output on entry. pre [m, n] may be null; otherwise it receives the
// pre-activation. Without KILN_GEMM_OUT_F32, out and pre receive values rounded to bf16
// (nearest-even), returned as f32.
extern "C" void kiln_host_gemm_epilogue(float* out, float* pre, const float* acc, const float* bias, int64_t m,
                                        int64_t n, int flags) {
    const bool out_f32 = (flags & KILN_GEMM_OUT_F32) != 0;
    const bool accumulate = (flags & KILN_GEMM_ACCUMULATE) != 0;
    const bool gelu = (flags & KILN_GEMM_GELU) != 0;
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
            const int64_t idx = i * n + j;
            const float old = accumulate ? out[idx] : 0.0f;
            const float v = kiln_gemm_preact(acc[idx], bias != nullptr, bias != nullptr ? bias[j] : 0.0f, accumulate, old);
            if (pre != nullptr) {
                pre[idx] = kiln_gemm_round(v, out_f32);
            }
            out[idx] = kiln_gemm_round(kiln_gemm_activate(v, gelu), out_f32);
        }
    }
}
