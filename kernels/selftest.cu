// selftest.cu: small kernels with faults that a launch argument switches on, for tests/emu.rs,
// which checks that the emulated device's memcheck and race check catch each one and say where
// (kernels/emu/README.md lists the checks). Nothing in the training path launches them. On a GPU
// the faulty variants are undefined behaviour that compute-sanitizer reports the same way
// (memcheck, racecheck, synccheck); the tests run them only on the emulated device.
//
// Test: cargo test --release --features cuda --test emu

// out[i] = x[i + 1 within the block, wrapping], through shared memory. With barrier = 0 the
// __syncthreads between writing s and reading a neighbour's slot is missing: a race.
extern "C" __global__ void __launch_bounds__(256) selftest_rotate(float* out, const float* x, int barrier) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    s[t] = x[i];
    if (barrier) __syncthreads();
    out[i] = s[(t + 1) % blockDim.x];
}

// out[i] = i for i < n + overrun: overrun > 0 stores past the end of an n-element buffer.
extern "C" __global__ void selftest_fill(int* out, int n, int overrun) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n + overrun) out[i] = i;
}

// The block's sum of x in out[blockIdx.x]. With split = 1 the upper half of the block waits at a
// second __syncthreads of its own: a barrier not reached by every thread.
extern "C" __global__ void __launch_bounds__(256) selftest_block_sum(float* out, const float* x, int split) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    if (split && t >= (int)blockDim.x / 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    if (t == 0) {
        float acc = 0.0f;
        for (int j = 0; j < (int)blockDim.x; ++j) acc += s[j];
        out[blockIdx.x] = acc;
    }
}

// ---- Hopper: the emulated mbarrier, TMA and wgmma against plain computations (tests/hopper.rs,
// which runs them on an sm_90 GPU where there is one, so the emulator's reading of the PTX ISA is
// checked against the hardware's). ----
#include "hopper.cuh"

// out (64 x N f32, row-major) = a (64 x K) b (N x K)^T, with a and b stored in shared memory with
// `swizzle` (0, 32, 64, 128) and multiplied by K / 16 wgmma. K-major (trans = 0): K = swizzle / 2,
// one swizzle row, or 64 without. MN-major (trans = 1, both operands): K = 64, the lines of M or N
// side by side `lbo` apart and the 8-k groups after them. With clobber = 1 thread 0 changes A
// while the wgmma are in flight.
template <int N, int TRANS>
__device__ __forceinline__ void wgmma_tile(float* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int swizzle, int clobber) {
#if KILN_SM90A
    extern __shared__ __align__(16) unsigned char wgmma_smem[];
    const int K = swizzle && !TRANS ? swizzle / 2 : 64;
    // (lbo, sbo) of an operand with `rows` rows, and where its k16 step kk starts.
    auto strides = [&](int rows, uint32_t& lbo, uint32_t& sbo) {
        if (!TRANS) {
            lbo = 128;
            sbo = swizzle ? 8 * swizzle : (K / 8) * 128;
        } else if (swizzle) {
            lbo = 8 * swizzle;                        // the next swizzle / 2 rows: the next atom
            sbo = (rows / (swizzle / 2)) * lbo;       // the next 8 k: past all of them
        } else {
            sbo = 128;                                // the next 8 rows: the next core matrix
            lbo = (rows / 8) * 128;                   // the next 8 k: past all of them
        }
    };
    uint32_t alb, asb, blb, bsb;
    strides(64, alb, asb);
    strides(N, blb, bsb);
    unsigned char* As = sm90_align(wgmma_smem, 1024);
    unsigned char* Bs = As + 64 * K * 2;
    auto at = [&](int r, int k, uint32_t lbo, uint32_t sbo) {
        return TRANS ? mnmajor_offset(r, k, swizzle, lbo, sbo) : kmajor_offset(r, k, swizzle, lbo, sbo);
    };
    for (int i = threadIdx.x; i < 64 * K; i += blockDim.x)
        *reinterpret_cast<__nv_bfloat16*>(As + at(i / K, i % K, alb, asb)) = a[i];
    for (int i = threadIdx.x; i < N * K; i += blockDim.x)
        *reinterpret_cast<__nv_bfloat16*>(Bs + at(i / K, i % K, blb, bsb)) = b[i];
    fence_proxy_async();
    __syncthreads();
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
    wgmma_fence_operands(d);
    wgmma_fence();
    for (int kk = 0; kk < K / 16; ++kk) {
        // K-major: 32 bytes along a swizzle row, or two core matrices; MN-major: two 8-k groups.
        const uint32_t ka = TRANS ? kk * 2 * (swizzle ? asb : alb) : swizzle ? kk * 32 : kk * 2 * alb;
        const uint32_t kb = TRANS ? kk * 2 * (swizzle ? bsb : blb) : swizzle ? kk * 32 : kk * 2 * blb;
        wgmma_m64k16<N, TRANS, TRANS>(d, wgmma_desc(As + ka, alb, asb, swizzle), wgmma_desc(Bs + kb, blb, bsb, swizzle), kk > 0);
    }
    wgmma_commit();
    if (clobber && threadIdx.x == 0) *reinterpret_cast<__nv_bfloat16*>(As) = __float2bfloat16(1000.0f);
    wgmma_wait<0>();
    wgmma_fence_operands(d);
    const int q = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int j = 0; j < N / 8; ++j)
        for (int i = 0; i < 4; ++i)
            out[(16 * q + lane / 4 + (i >= 2 ? 8 : 0)) * N + 8 * j + 2 * (lane % 4) + (i & 1)] = d[4 * j + i];
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_n64(float* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int swizzle, int clobber) {
    wgmma_tile<64, 0>(out, a, b, swizzle, clobber);
}
extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_n128(float* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int swizzle, int clobber) {
    wgmma_tile<128, 0>(out, a, b, swizzle, clobber);
}
extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_mn_n64(float* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int swizzle, int clobber) {
    wgmma_tile<64, 1>(out, a, b, swizzle, clobber);
}
extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_mn_n128(float* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int swizzle, int clobber) {
    wgmma_tile<128, 1>(out, a, b, swizzle, clobber);
}

// The rows x cols box of `map` (a 2-D bf16 tensor) at (c0 inner, c1 outer) through TMA, unswizzled
// into out (rows x cols, row-major). With arrive = 0 nobody arrives on the mbarrier: a deadlock.
extern "C" __global__ void __launch_bounds__(128) selftest_tma(__nv_bfloat16* out, const __grid_constant__ KilnTensorMap map, int c0, int c1, int rows, int cols, int swizzle, int arrive) {
#if KILN_SM90A
    extern __shared__ __align__(16) unsigned char tma_smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(tma_smem);
    unsigned char* box = sm90_align(tma_smem + 8, 1024);
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        mbar_fence_init();
    }
    __syncthreads();
    if (threadIdx.x == 0 && arrive) {
        mbar_arrive_expect_tx(bar, rows * cols * 2);
        tma_load_2d(box, &map, c0, c1, bar);
    }
    mbar_wait(bar, 0);
    for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
        const uint32_t at = (i / cols) * cols * 2 + (i % cols) * 2;
        const uint32_t sw = swizzle ? at ^ (((at >> 7) & (swizzle / 16 - 1)) << 4) : at;
        out[i] = *reinterpret_cast<const __nv_bfloat16*>(box + sw);
    }
#else
    __trap();
#endif
}

// out (M x N f32, row-major) = a (M x K) b (N x K)^T, both row-major: the core loop of a Hopper
// GEMM on one 64 x 128 output tile per block. Warp 4 (the producer; one thread issues) streams
// 64-wide K slices of A and B by TMA, with the 128-byte swizzle, into a ring of stages; each stage
// has a `full` mbarrier (one arrival, plus the copies' bytes) and an `empty` one (the 128 consumer
// threads are done with it). The consumer warpgroup waits for a full stage, multiplies it with
// four wgmma (16 of K each: the descriptors' start moves 32 bytes along the swizzled rows),
// retires them and frees the stage. K past the tensor arrives as zeros.
#define SELFTEST_PIPE_STAGES 2
extern "C" __global__ void __launch_bounds__(160) selftest_tma_wgmma(float* out, const __grid_constant__ KilnTensorMap ma, const __grid_constant__ KilnTensorMap mb, int M, int N, int K) {
#if KILN_SM90A
    extern __shared__ __align__(16) unsigned char pipe_smem[];
    constexpr int BM = 64, BN = 128, BK = 64, S = SELFTEST_PIPE_STAGES;
    constexpr uint32_t A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
    uint64_t* full = reinterpret_cast<uint64_t*>(pipe_smem);
    uint64_t* empty = full + S;
    unsigned char* tiles = sm90_align(pipe_smem + 16 * S, 1024);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, k_tiles = (K + BK - 1) / BK;
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 128);
        }
        mbar_fence_init();
    }
    __syncthreads();
    if (threadIdx.x >= 128) {
        if (threadIdx.x == 128)
            for (int kt = 0; kt < k_tiles; ++kt) {
                const int s = kt % S;
                // Round kt / S of stage s needs round kt / S - 1 freed (the first round passes).
                mbar_wait(&empty[s], ((kt / S) & 1) ^ 1);
                unsigned char* st = tiles + s * (A_BYTES + B_BYTES);
                mbar_arrive_expect_tx(&full[s], A_BYTES + B_BYTES);
                tma_load_2d(st, &ma, kt * BK, m0, &full[s]);
                tma_load_2d(st + A_BYTES, &mb, kt * BK, n0, &full[s]);
            }
        return;
    }
    float d[BN / 2];
    for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt % S;
        mbar_wait(&full[s], (kt / S) & 1);
        const unsigned char* st = tiles + s * (A_BYTES + B_BYTES);
        wgmma_fence_operands(d);
        wgmma_fence();
        for (int kk = 0; kk < BK / 16; ++kk)
            wgmma_m64k16<BN>(d, wgmma_desc(st + kk * 32, 16, 1024, 128), wgmma_desc(st + A_BYTES + kk * 32, 16, 1024, 128), 1);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(d);
        mbar_arrive(&empty[s]);
    }
    const int q = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int j = 0; j < BN / 8; ++j)
        for (int i = 0; i < 4; ++i) {
            const int r = m0 + 16 * q + lane / 4 + (i >= 2 ? 8 : 0), c = n0 + 8 * j + 2 * (lane % 4) + (i & 1);
            if (r < M && c < N) out[(size_t)r * N + c] = d[4 * j + i];
        }
#else
    __trap();
#endif
}
