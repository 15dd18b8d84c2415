// rope.cu: rotary position embeddings fused with the packing of q, k and v into the attention's
// qkv layout. CPU twin: src/backend/cpu/rope.rs (rope_pack, rope_unpack).
//
// Llama projects q [rows, nh hd], k and v [rows, nkv hd] with three linears (each its own LoRA
// target). In training the attention kernels read those three buffers and rotate q and k as they
// load them (attention.cu, "RoPE on load"), so no pass exists for RoPE at all. Generation appends
// packed rows [q | k | v] of (nh + 2 nkv) hd to the KV cache, and there the rotation rides on the
// packing copy: rope_pack reads q, k and v once and writes qkv once, rotated; rope_unpack is its
// backward (dq, dk rotated back, dv copied), and the reference the fused kernels are tested
// against.
//
// cs is the table [positions, hd] f32: cos of pair i at [p, i], sin at [p, hd/2 + i], built by
// the CPU (rope.cuh says why) and kept on the device by the wrapper. Row r of the batch is at
// position offset + r % t (offset: the cached length during generation).
//
// Work split: one block of KILN_ROPE_THREADS per row. Threads take two adjacent pairs (i, i + 1)
// of a head at a time as bf16x2 loads and stores when hd % 4 == 0 (every Llama) and the buffers
// are word-aligned, one pair otherwise; the v part (or dv) is copied in bf16x2 where its width is even. A warp's loads are
// two runs of consecutive words (the halves of the head), its stores the same.
//
// Test: cargo test --release --features cuda --test rope
#include "rope.cuh"

namespace {

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3) == 0; }

// Rotates the q and k heads of one row: src q [nh hd], k [nkv hd] -> dst [q | k] (contiguous in
// the packed row), or the reverse for the backward (INV: -sin, and src/dst swap roles).
template <bool PAIRS, bool INV>
__device__ __forceinline__ void rotate_row(bf16* q_out, bf16* k_out, const bf16* q_in, const bf16* k_in, const float* cs, int hd, int nh, int nkv) {
    const int h2 = hd / 2;
    const int step = PAIRS ? 2 : 1;
    const int per_head = h2 / step;
    const int n = (nh + nkv) * per_head;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const int head = j / per_head;
        const int i = (j - head * per_head) * step;
        const bf16* src = head < nh ? q_in + head * hd : k_in + (head - nh) * hd;
        bf16* dst = head < nh ? q_out + head * hd : k_out + (head - nh) * hd;
        if (PAIRS) {
            const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + i));
            const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + i + h2));
            const float2 c = *reinterpret_cast<const float2*>(cs + i);
            float2 s = *reinterpret_cast<const float2*>(cs + h2 + i);
            if (INV) s = make_float2(-s.x, -s.y);
            *reinterpret_cast<__nv_bfloat162*>(dst + i) = __floats2bfloat162_rn(rope_lo(a.x, b.x, c.x, s.x), rope_lo(a.y, b.y, c.y, s.y));
            *reinterpret_cast<__nv_bfloat162*>(dst + i + h2) = __floats2bfloat162_rn(rope_hi(a.x, b.x, c.x, s.x), rope_hi(a.y, b.y, c.y, s.y));
        } else {
            const float a = __bfloat162float(src[i]), b = __bfloat162float(src[i + h2]);
            const float c = cs[i], s = INV ? -cs[h2 + i] : cs[h2 + i];
            dst[i] = __float2bfloat16_rn(rope_lo(a, b, c, s));
            dst[i + h2] = __float2bfloat16_rn(rope_hi(a, b, c, s));
        }
    }
}

// dst[0 .. n) = src[0 .. n), in bf16x2 words when n is even and both are word-aligned.
__device__ __forceinline__ void copy_row(bf16* dst, const bf16* src, int n) {
    if (n % 2 == 0 && aligned4(dst) && aligned4(src)) {
        for (int j = threadIdx.x; j < n / 2; j += blockDim.x) {
            reinterpret_cast<__nv_bfloat162*>(dst)[j] = reinterpret_cast<const __nv_bfloat162*>(src)[j];
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x) dst[j] = src[j];
    }
}

}  // namespace

// qkv [rows, (nh + 2 nkv) hd] from q [rows, nh hd], k and v [rows, nkv hd]; grid (rows).
extern "C" __global__ void __launch_bounds__(KILN_ROPE_THREADS) rope_pack(bf16* qkv, const bf16* q, const bf16* k, const bf16* v, const float* cs, int t, int offset, int hd, int nh, int nkv) {
    const int64_t row = blockIdx.x;
    const int w = (nh + 2 * nkv) * hd;
    const float* c = cs + (int64_t)(offset + (int)(row % t)) * hd;
    bf16* out = qkv + row * w;
    const bf16 *qr = q + row * nh * hd, *kr = k + row * nkv * hd;
    if (hd % 4 == 0 && aligned4(qkv) && aligned4(q) && aligned4(k)) {
        rotate_row<true, false>(out, out + nh * hd, qr, kr, c, hd, nh, nkv);
    } else {
        rotate_row<false, false>(out, out + nh * hd, qr, kr, c, hd, nh, nkv);
    }
    copy_row(out + (nh + nkv) * hd, v + row * nkv * hd, nkv * hd);
}

// dq [rows, nh hd], dk and dv [rows, nkv hd] from dqkv; grid (rows).
extern "C" __global__ void __launch_bounds__(KILN_ROPE_THREADS) rope_unpack(bf16* dq, bf16* dk, bf16* dv, const bf16* dqkv, const float* cs, int t, int offset, int hd, int nh, int nkv) {
    const int64_t row = blockIdx.x;
    const int w = (nh + 2 * nkv) * hd;
    const float* c = cs + (int64_t)(offset + (int)(row % t)) * hd;
    const bf16* g = dqkv + row * w;
    bf16 *qr = dq + row * nh * hd, *kr = dk + row * nkv * hd;
    if (hd % 4 == 0 && aligned4(dqkv) && aligned4(dq) && aligned4(dk)) {
        rotate_row<true, true>(qr, kr, g, g + nh * hd, c, hd, nh, nkv);
    } else {
        rotate_row<false, true>(qr, kr, g, g + nh * hd, c, hd, nh, nkv);
    }
    copy_row(dv + row * nkv * hd, g + (nh + nkv) * hd, nkv * hd);
}
