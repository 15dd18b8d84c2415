// nf4.cuh: NF4 dequantization in bitsandbytes' layout, shared by kernels/nf4.cu and its host twin
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

// The two elements of packed byte k (elements 2k and 2k + 1), as a pair: the kernel stores it as
// one 8-byte float2, the host twin as two floats.
KILN_HD float2 kiln_nf4_dequantize_byte(const uint8_t* packed, const uint8_t* absmax_codes,
                                        const float* nested_absmax, const float* tables, float offset,
                                        int32_t blocksize, int64_t k) {
    const uint8_t byte = packed[k];
    // blocksize is even (bitsandbytes' sizes are powers of two from 32), so both elements share a block.
    const float a = kiln_nf4_absmax(absmax_codes, nested_absmax, tables, offset, 2 * k / blocksize);
    return make_float2(kiln_mul_rn(tables[256 + (byte >> 4)], a), kiln_mul_rn(tables[256 + (byte & 0xF)], a));
}
