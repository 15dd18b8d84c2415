// Host twin of kernels/nf4.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare it with src/quant/nf4.rs without a GPU.
#include "../nf4.cuh"

// The whole kernel, one packed byte after another.
extern "C" void kiln_host_nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_codes,
                                         const float* nested_absmax, const float* tables, float offset,
                                         int32_t blocksize, int64_t n_bytes) {
    for (int64_t k = 0; k < n_bytes; k++) {
        const float2 v = kiln_nf4_dequantize_byte(packed, absmax_codes, nested_absmax, tables, offset, blocksize, k);
        out[2 * k] = v.x;
        out[2 * k + 1] = v.y;
    }
}
