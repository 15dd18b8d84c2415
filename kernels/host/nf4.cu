// Host twin of kernels/nf4.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare it with src/quant/nf4.rs without a GPU.
#include "../nf4.cuh"
#include <math.h>

// The f32 kernel, one unit (2 packed bytes, 4 elements) after another.
extern "C" void kiln_host_nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_codes,
                                         const float* nested_absmax, const float* tables, float offset,
                                         int32_t blocksize, int64_t n_units) {
    for (int64_t j = 0; j < n_units; j++) {
        const uint32_t word = (uint32_t)packed[2 * j] | ((uint32_t)packed[2 * j + 1] << 8);
        kiln_nf4_dequantize_word<2>(out + 4 * j, word, absmax_codes, nested_absmax, tables, offset, blocksize, j);
    }
}

// The quantization kernel, one block after another (the absmax a fold, as the lanes' maxima are).
extern "C" void kiln_host_nf4_quantize(uint8_t* packed, float* absmax, const float* x, const float* mids,
                                       int32_t blocksize, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const float* xb = x + b * blocksize;
        float a = 0.0f;
        for (int32_t i = 0; i < blocksize; i++) a = kiln_nan_max(a, fabsf(xb[i]));
        absmax[b] = a;
        for (int32_t k = 0; k < blocksize / 2; k++) packed[b * (blocksize / 2) + k] = kiln_nf4_pack(xb[2 * k], xb[2 * k + 1], a, mids);
    }
}
