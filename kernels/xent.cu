// xent.cu: fused softmax cross-entropy over rows of logits [rows, V] whose rows lie `pitch`
// elements apart (pitch >= V: the classifier pads GPT-2's V = 50257, a multiple of nothing, to a
// pitch of 50304 so its GEMMs can read the logits by TMA; the columns past V are never read or
// written). Forward writes each row's loss = lse - logit[target] and lse (f32);
// backward overwrites the logits in place with dlogits = (softmax - onehot) * scale, from the
// saved lse, so the probabilities are never stored. CPU twin: src/backend/cpu/xent.rs
// (xent_forward, xent_backward); rows whose target is KILN_XENT_IGNORE (-100) get loss 0 and a
// zero gradient row.
//
// Work split: one block of KILN_XENT_THREADS threads per row (gridDim.x = rows). A row starts at
// an arbitrary address (row * pitch elements), so each row is cut into a head of < 16 bytes up to the
// first 16-byte boundary, a body read with 16-byte loads (8 bf16 or 4 f32), and a tail; threads
// take head/tail elements and body vectors in a strided loop. Forward: each thread keeps an
// online (max, sum) pair (xent.cuh); a __shfl_xor butterfly merges the pairs of a warp, then
// thread 0 merges the warps' pairs in warp order from shared memory, so the result is the same
// on every run. Backward: no communication, each element read, transformed, written in place.
//
// Variants: xent_forward / xent_backward take bf16 logits (what the GEMM produces on the device);
// xent_forward_f32 / xent_backward_f32 take f32 logits, as the CPU twin does. Same template.
// Targets outside [0, V) other than the ignore label are never dereferenced: the loss and the
// gradient row become NaN (the op checks targets before calling, so this is only a tripwire).
//
// Test: cargo test --release --features cuda --test xent
#include "xent.cuh"

namespace {

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ void from_f(__nv_bfloat16& d, float v) { d = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_f(float& d, float v) { d = v; }

// One 16-byte access holds N = 16 / sizeof(T) elements.
template <typename T>
__device__ __forceinline__ void load_vec(float (&f)[16 / sizeof(T)], const T* p) {
    union {
        uint4 u;
        T e[16 / sizeof(T)];
    } v;
    v.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int j = 0; j < (int)(16 / sizeof(T)); j++) f[j] = to_f(v.e[j]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[16 / sizeof(T)]) {
    union {
        uint4 u;
        T e[16 / sizeof(T)];
    } v;
#pragma unroll
    for (int j = 0; j < (int)(16 / sizeof(T)); j++) from_f(v.e[j], f[j]);
    *reinterpret_cast<uint4*>(p) = v.u;
}

// Elements before the row's first 16-byte boundary (the row is sizeof(T)-aligned), at most v.
template <typename T>
__device__ __forceinline__ int row_head(const T* row, int v) {
    const int h = (int)(((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / sizeof(T));
    return h < v ? h : v;
}

constexpr int WARPS = KILN_XENT_THREADS / 32;

template <typename T>
__device__ __forceinline__ void forward_row(float* losses, float* lse, const T* logits, const int32_t* targets, int v, int pitch) {
    constexpr int N = 16 / sizeof(T);
    const int64_t row = blockIdx.x;
    const T* z = logits + row * (int64_t)pitch;
    const int head = row_head(z, v);
    const int nvec = (v - head) / N;
    const int tail = head + nvec * N;
    const int tid = threadIdx.x;
    float m = -INFINITY, s = 0.0f;
    if (tid < head) xent_online_add(m, s, to_f(z[tid]));
    for (int k = tid; k < nvec; k += KILN_XENT_THREADS) {
        float f[N];
        load_vec<T>(f, z + head + (int64_t)k * N);
        float mx = f[0];
#pragma unroll
        for (int j = 1; j < N; j++) mx = fmaxf(mx, f[j]);
        xent_online_raise(m, s, mx);
#pragma unroll
        for (int j = 0; j < N; j++) s += expf(f[j] - m);
    }
    if (tail + tid < v) xent_online_add(m, s, to_f(z[tail + tid]));  // fewer than N < 32 remain
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        xent_online_merge(m, s, m2, s2);
    }
    __shared__ float wm[WARPS], ws[WARPS];
    if ((tid & 31) == 0) {
        wm[tid >> 5] = m;
        ws[tid >> 5] = s;
    }
    __syncthreads();
    if (tid == 0) {
        float M = wm[0], S = ws[0];
        for (int w = 1; w < WARPS; w++) xent_online_merge(M, S, wm[w], ws[w]);
        const float l = xent_lse(M, S);
        lse[row] = l;
        const int t = targets[row];
        losses[row] = t == KILN_XENT_IGNORE ? 0.0f : (t >= 0 && t < v ? l - to_f(z[t]) : NAN);
    }
}

template <typename T>
__device__ __forceinline__ void backward_row(T* dz_row_base, const float* lse, const int32_t* targets, int v, int pitch, float scale) {
    constexpr int N = 16 / sizeof(T);
    const int64_t row = blockIdx.x;
    T* z = dz_row_base + row * (int64_t)pitch;
    const int t = targets[row];
    const bool ignore = t == KILN_XENT_IGNORE;
    const bool bad = !ignore && (t < 0 || t >= v);
    const float l = lse[row];
    const int head = row_head(z, v);
    const int nvec = (v - head) / N;
    const int tail = head + nvec * N;
    const int tid = threadIdx.x;
    if (tid < head) from_f(z[tid], ignore ? 0.0f : bad ? NAN : xent_grad(to_f(z[tid]), l, scale, tid == t));
    for (int k = tid; k < nvec; k += KILN_XENT_THREADS) {
        const int i0 = head + k * N;
        float f[N];
        load_vec<T>(f, z + i0);
#pragma unroll
        for (int j = 0; j < N; j++) f[j] = ignore ? 0.0f : bad ? NAN : xent_grad(f[j], l, scale, i0 + j == t);
        store_vec<T>(z + i0, f);
    }
    const int i = tail + tid;
    if (i < v) from_f(z[i], ignore ? 0.0f : bad ? NAN : xent_grad(to_f(z[i]), l, scale, i == t));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(KILN_XENT_THREADS) xent_forward(float* losses, float* lse, const __nv_bfloat16* logits, const int32_t* targets, int v, int pitch) {
    forward_row(losses, lse, logits, targets, v, pitch);
}

extern "C" __global__ void __launch_bounds__(KILN_XENT_THREADS) xent_forward_f32(float* losses, float* lse, const float* logits, const int32_t* targets, int v, int pitch) {
    forward_row(losses, lse, logits, targets, v, pitch);
}

// dlogits holds the logits on entry and the gradient on exit.
extern "C" __global__ void __launch_bounds__(KILN_XENT_THREADS) xent_backward(__nv_bfloat16* dlogits, const float* lse, const int32_t* targets, int v, int pitch, float scale) {
    backward_row(dlogits, lse, targets, v, pitch, scale);
}

extern "C" __global__ void __launch_bounds__(KILN_XENT_THREADS) xent_backward_f32(float* dlogits, const float* lse, const int32_t* targets, int v, int pitch, float scale) {
    backward_row(dlogits, lse, targets, v, pitch, scale);
}
