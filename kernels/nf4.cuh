// nf4.cuh: NF4 quantization and dequantization in bitsandbytes' layout, shared by kernels/nf4.cu and its host twin
// (kernels/host/nf4.cu).
//
// Layout (quant/nf4.rs, bitsandbytes' Linear4bit with compress_statistics=True): element 2k in the
// high nibble of packed byte k, element 2k+1 in the low nibble; one absmax per block of
// `blocksize` elements, itself stored as an 8-bit code into the signed dynamic map with one f32
// scale per 256 codes and one f32 offset: absmax = map[code] * nested + offset. An element is
// NF4_CODE[nibble] * absmax.
//
// Bit-exactness: the same three f32 operations as the CPU (quant::nf4: dequantize_blockwise, then
// += offset, then the NF4 product), each explicitly rounded (kiln_mul_rn, kiln_add_rn), which nvcc
// never contracts into an FMA; so the device, the host twin and the CPU agree to the bit.
#pragma once
#include "common.cuh"
#include "elementwise.cuh"

// The tables a dequantization reads: the 256-entry signed dynamic map, then the 16 NF4 values.
#define KILN_NF4_TABLE_LEN (256 + 16)

// Block `blk`'s absmax: from its 8-bit code, or, when absmax_codes is null (single quantization,
// bitsandbytes' compress_statistics=False), the f32 absmax itself, stored in nested_absmax.
KILN_HD float kiln_nf4_absmax(const uint8_t* absmax_codes, const float* nested_absmax, const float* tables,
                              float offset, int64_t blk) {
    if (absmax_codes == nullptr) return nested_absmax[blk];
    return kiln_add_rn(kiln_mul_rn(tables[absmax_codes[blk]], nested_absmax[blk / 256]), offset);
}

// The 2 * N elements of the N packed bytes starting at byte N * j (elements 2Nj .. 2Nj + 2N - 1,
// the first of each byte in its high nibble), given as a word read little-endian: byte b is bits
// 8b .. 8b + 7. N is 2 or 4 and the block size a multiple of 8 (bitsandbytes' are powers of two
// from 32), so the elements share one block and one absmax.
template <int N>
KILN_HD void kiln_nf4_dequantize_word(float v[2 * N], uint32_t word, const uint8_t* absmax_codes,
                                      const float* nested_absmax, const float* tables, float offset,
                                      int32_t blocksize, int64_t j) {
    const float a = kiln_nf4_absmax(absmax_codes, nested_absmax, tables, offset, 2 * N * j / blocksize);
    for (int b = 0; b < N; b++) {
        const uint32_t byte = (word >> (8 * b)) & 0xFFu;
        v[2 * b] = kiln_mul_rn(tables[256 + (byte >> 4)], a);
        v[2 * b + 1] = kiln_mul_rn(tables[256 + (byte & 0xFu)], a);
    }
}

// Quantization (quant::nf4::quantize_nf4): a block's absmax a = max |x|; each element's code is
// the number of the 15 NF4 midpoints (host-computed, passed in) strictly below
// clamp(x * (1 / a), -1, 1), or 7 (the exact zero) for every element of an all-zero block. The
// product and the reciprocal are explicitly rounded; the comparisons are exact.
KILN_HD uint8_t kiln_nf4_code(float x, float a, float inv, const float* mids) {
    if (a == 0.0f) return 7;
    float s = kiln_mul_rn(x, inv);
    s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);  // a NaN stays NaN and is below no midpoint
    uint8_t c = 0;
    for (int k = 0; k < 15; k++) c += mids[k] < s;
    return c;
}

// The byte of an element pair (x0 the first, in the high nibble) of a block with absmax a.
KILN_HD uint8_t kiln_nf4_pack(float x0, float x1, float a, const float* mids) {
    const float inv = kiln_div_rn(1.0f, a);
    return (uint8_t)((kiln_nf4_code(x0, a, inv, mids) << 4) | kiln_nf4_code(x1, a, inv, mids));
}
