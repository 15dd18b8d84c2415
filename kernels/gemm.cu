// gemm.cu: C = op(A) @ op(B) (+ bias) (then GELU), bf16 operands, f32 accumulation, bf16 or f32
// output; and the bias gradient (column sums of dY). CPU twin: src/backend/cpu/gemm.rs.
//
// Types: A, B and the optional bias [n] are bf16 (the bias is a weight, and weights are bf16 on the
// device); out and the optional pre-activation share one type, bf16 or f32 (flags).
//
// Layout, as on the CPU: every matrix is row-major; op(A) = A^T means A is stored [K, M], op(B) =
// B^T means B is stored [N, K]. Each matrix's rows lie lda, ldb, ldc elements apart (at least its
// stored width; wider for a padded matrix such as the classifier's logits, whose columns past the
// width are never read or written). The epilogue (bias, optional accumulate into the old output,
// optional GELU with the pre-activation saved, rounding to the output type) is gemm.cuh's, one
// definition for every kernel here and for the host twin (kernels/host/gemm.cu).
//
// gemm_mma_{nn,nt,tn,tt} (first letter: A transposed, second: B transposed): the shipped variant
// (GemmVariant::MmaSync in src/backend/cuda/gemm.rs). One block of 256 threads (8 warps, 2 along
// M x 4 along N) computes a 128 x 128 output tile; each warp a 64 x 32 piece of it as 4 x 4
// mma.sync.m16n8k16 bf16 tiles (64 f32 accumulators per thread). K advances 32 at a time: the A
// and B tiles of the next step are copied global -> shared with cp.async (16 bytes per copy,
// cache-global) while the tensor cores work on the current one (two shared stages, 34-40 KB
// static shared memory). gemm_mma_small_{nn,nt,tn,tt}: the same code on 64 x 64 tiles, 4 warps of
// 32 x 32 (2 x 4 mma tiles), 17-20 KB; the wrapper takes it when 128 x 128 tiles would give fewer
// blocks than the GPU has SMs (small M: GPT-2 at short T, the tests' shapes).
// Tiles are staged in shared memory exactly as they lie in global memory (the copy never
// transposes); ldmatrix, with or without .trans, turns either layout into the
// mma fragments, so the four transpose combinations differ only in the shared tile shapes and
// the ldmatrix addresses. Rows are padded by 16 bytes, which makes every ldmatrix phase hit 8
// distinct 16-byte bank groups. Edges: a 16-byte chunk that is not wholly inside the matrix, or
// whose global address is not 16-byte aligned (a row pitch that is no multiple of 8, e.g. K = 29
// or an unpadded vocabulary of 50257), is loaded element by element with bounds checks and zero
// fill: correct for every shape, but such operands lose the asynchronous copy (the slow path is
// per chunk, so only the misaligned operand pays). Outputs are stored with per-element bounds
// checks.
//
// gemm_wgmma_{nn,nt,tn,tt}: the Hopper kernels (GemmVariant::Wgmma), wgmma fed by TMA through an
// mbarrier ring, a producer warpgroup and two consumers, persistent over 128 x 128 tiles; the
// section above them says how. Same epilogue, stored as column pairs. TMA needs every operand's
// rows 16-byte aligned (a row pitch that is a multiple of 8; the tensor maps carry lda and ldb);
// the wrapper takes the mma.sync kernels for any other shape.
//
// gemm_naive: the obviously-correct reference, one thread per output (16 x 16 blocks), f32
// accumulation straight from global memory; every transpose, bias, GELU and accumulate. The tests
// hold every variant to the same bound against the CPU; the bench shows the tensor-core speedup.
//
// gemm_bias_backward_partial + gemm_bias_backward_finish: dbias[j] = sum_i dY[i, j], f32 out,
// deterministic without atomics, at copy bandwidth. The partial kernel's grid is 2-D: blockIdx.x
// picks 256 columns, blockIdx.y a group of KILN_GEMM_BIAS_GROUP rows, so a GPT-2 step (8192 rows)
// has 128 groups in flight per 256 columns instead of one block per 32 columns. In a block each
// lane owns 8 columns, read as one 16-byte word per row where n % 8 == 0 (every GPT-2 width; 2-byte
// loads 32 columns apart otherwise, still coalesced), and each of the 4 row lanes sums every 4th
// row of the group; the lanes' sums are added in lane order and written as the group's partial
// [groups, n]. The finish kernel adds the groups per column in colsum.cuh's fixed order. The
// partials are 1/64 of dY's bytes in f32 (3%), written once and read once. One group (rows <= 64)
// writes dbias itself.
//
// Tested by: cargo test --release --features cuda --test gemm
// Timed by:  kiln bench kernels (GemmVariant::Naive is the in-family baseline)
#include "colsum.cuh"
#include "gemm.cuh"
#include "hopper.cuh"
#include "nf4.cuh"

namespace {

typedef __nv_bfloat16 bf16;

constexpr int BK = KILN_GEMM_BK;
constexpr int PAD = 8;  // bf16 elements (16 bytes) of padding per shared row
static_assert(BK % 16 == 0, "k16 steps");

// A block-tile configuration: BM x BN outputs per block, WARPS_M x WARPS_N warps, each owning a
// (BM / WARPS_M) x (BN / WARPS_N) piece as m16n8 mma tiles.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct Tiling {
    static constexpr int BM = BM_;
    static constexpr int BN = BN_;
    static constexpr int WARPS_M = WARPS_M_;
    static constexpr int WARPS_N = WARPS_N_;
    static constexpr int THREADS = WARPS_M * WARPS_N * 32;
    static constexpr int WM = BM / WARPS_M;
    static constexpr int WN = BN / WARPS_N;
    static constexpr int MT = WM / 16;
    static constexpr int NT = WN / 8;
    static_assert(WM % 16 == 0 && WN % 16 == 0, "B fragments come in pairs of n8 tiles");
};
// Large: 128 x 128, 8 warps of 64 x 32 (64 accumulators per thread).
typedef Tiling<KILN_GEMM_BM, KILN_GEMM_BN, 2, 4> Large;
// Small: 64 x 64, 4 warps of 32 x 32, for products whose large-tile grid would leave SMs idle.
typedef Tiling<KILN_GEMM_SMALL_BM, KILN_GEMM_SMALL_BN, 2, 2> Small;
static_assert(Large::THREADS == KILN_GEMM_THREADS && Small::THREADS == KILN_GEMM_SMALL_THREADS, "header");

#ifndef KILN_CUDA_EMU
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Under KILN_CUDA_EMU (the emulated device, kernels/emu/) the inline-PTX helpers below call the
// emulator's implementations of the same instructions (kiln_emu_*, kernels/emu/emu.h) instead.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#ifdef KILN_CUDA_EMU
    kiln_emu_cp_async_16(dst, src, true);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef KILN_CUDA_EMU
    kiln_emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef KILN_CUDA_EMU
    kiln_emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8 x 8 b16 matrices; lanes 8q..8q+7 give the row addresses of matrix q, register q receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
#ifdef KILN_CUDA_EMU
    kiln_emu_ldmatrix_x4(r, p, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
#endif
}

// As ldmatrix_x4, each 8 x 8 matrix transposed on the way.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
#ifdef KILN_CUDA_EMU
    kiln_emu_ldmatrix_x4(r, p, true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
#endif
}

// c (16 x 8, f32) += a (16 x 16, row) @ b (16 x 8, col).
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef KILN_CUDA_EMU
    const uint32_t b[2] = {b0, b1};
    kiln_emu_mma_m16n8k16_bf16(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Copy the ROWS x COLS tile at (row0, col0) of the row-major matrix g [rows, cols] (rows `pitch`
// elements apart, pitch >= cols) into shared memory s (row pitch PITCH), zero outside the matrix. Whole in-bounds 16-byte-aligned chunks go
// by cp.async; any other chunk element by element (synchronous, bounds-checked).
template <int THREADS, int ROWS, int COLS, int PITCH>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int rows, int cols, int pitch, int row0, int col0) {
    constexpr int CPR = COLS / 8;  // 16-byte chunks per tile row
    constexpr int CHUNKS = ROWS * CPR;
    static_assert(COLS % 8 == 0 && CHUNKS % THREADS == 0, "whole chunks, the same count per thread");
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        const int r = c / CPR;
        const int cc = (c % CPR) * 8;
        const int gr = row0 + r;
        const int gc = col0 + cc;
        bf16* dst = s + r * PITCH + cc;
        const bool row_ok = gr < rows;
        const bf16* src = g + (row_ok ? static_cast<int64_t>(gr) * pitch + gc : 0);
        if (row_ok && gc + 8 <= cols && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
            cp_async16(dst, src);
        } else {
            uint32_t w[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t lo = (row_ok && gc + 2 * j < cols) ? __bfloat16_as_ushort(src[2 * j]) : 0u;
                const uint32_t hi = (row_ok && gc + 2 * j + 1 < cols) ? __bfloat16_as_ushort(src[2 * j + 1]) : 0u;
                w[j] = lo | (hi << 16);
            }
            *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

// An NF4 weight as the fused kernels read it (nf4.cuh's layout; absmax_codes null: single
// quantization, f32 absmax in nested).
struct Nf4Operand {
    const uint8_t* packed;
    const uint8_t* absmax_codes;
    const float* nested;
    const float* tables;
    float offset;
    int blocksize;
};

// load_tile for an NF4 matrix w [rows, cols] (row-major element order): each 16-byte chunk of
// the shared tile (8 elements) is decoded from its 4 packed bytes and its block's absmax and
// rounded to bf16, the values nf4_dequantize_bf16 writes, so the product equals dequantize-then-
// GEMM bit for bit. A chunk that is not wholly inside the matrix, or whose 8 elements do not start
// at a multiple of 8 (cols not a multiple of 8), is decoded element by element with zero fill.
// The stores are synchronous; the barrier after the pipeline's wait publishes them.
template <int THREADS, int ROWS, int COLS, int PITCH>
__device__ __forceinline__ void load_tile_nf4(bf16* s, const Nf4Operand& w, int rows, int cols, int row0, int col0) {
    constexpr int CPR = COLS / 8;
    constexpr int CHUNKS = ROWS * CPR;
    static_assert(COLS % 8 == 0 && CHUNKS % THREADS == 0, "whole chunks, the same count per thread");
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        const int r = c / CPR;
        const int cc = (c % CPR) * 8;
        const int gr = row0 + r;
        const int gc = col0 + cc;
        const int64_t e = static_cast<int64_t>(gr) * cols + gc;
        __align__(16) __nv_bfloat162 h[4];
        if (gr < rows && gc + 8 <= cols && cols % 8 == 0) {
            float v[8];
            const uint32_t word = *reinterpret_cast<const uint32_t*>(w.packed + e / 2);
            kiln_nf4_dequantize_word<4>(v, word, w.absmax_codes, w.nested, w.tables, w.offset, w.blocksize, e / 8);
#pragma unroll
            for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
        } else {
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                v[j] = 0.0f;
                if (gr < rows && gc + j < cols) {
                    const int64_t ej = e + j;
                    const uint8_t byte = w.packed[ej / 2];
                    const uint32_t nib = (ej & 1) ? (byte & 0xFu) : (byte >> 4);
                    const float a = kiln_nf4_absmax(w.absmax_codes, w.nested, w.tables, w.offset, ej / w.blocksize);
                    v[j] = kiln_mul_rn(w.tables[256 + nib], a);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
        }
        *reinterpret_cast<uint4*>(s + r * PITCH + cc) = *reinterpret_cast<const uint4*>(h);
    }
}

__device__ __forceinline__ void store_value(void* p, int64_t idx, float v, bool out_f32) {
    if (out_f32) {
        static_cast<float*>(p)[idx] = v;
    } else {
        static_cast<bf16*>(p)[idx] = __float2bfloat16_rn(v);
    }
}

// The epilogue of output element idx (column col) from its f32 dot product; gemm.cuh's math.
__device__ __forceinline__ void store_output(void* out, void* pre, const bf16* bias, int64_t idx, int col, float acc,
                                             int flags) {
    const bool out_f32 = (flags & KILN_GEMM_OUT_F32) != 0;
    const bool accumulate = (flags & KILN_GEMM_ACCUMULATE) != 0;
    float old = 0.0f;
    if (accumulate) {
        old = out_f32 ? static_cast<const float*>(out)[idx] : __bfloat162float(static_cast<const bf16*>(out)[idx]);
    }
    const float b = bias != nullptr ? __bfloat162float(bias[col]) : 0.0f;
    const float v = kiln_gemm_preact(acc, bias != nullptr, b, accumulate, old);
    if (pre != nullptr) {
        store_value(pre, idx, v, out_f32);
    }
    store_value(out, idx, kiln_gemm_activate(v, (flags & KILN_GEMM_GELU) != 0), out_f32);
}

// store_output for the adjacent columns col and col + 1 of one row (idx, idx + 1), with one
// 4-byte (bf16) or 8-byte (f32) access per buffer where both are inside the row and idx is even
// (ldc even: every row starts aligned); element by element otherwise.
[[maybe_unused]] __device__ __forceinline__ void store_output_pair(void* out, void* pre, const bf16* bias, int64_t idx, int col, int n, float a0,
                                                  float a1, int flags) {
    if (col + 1 >= n || (idx & 1)) {
        store_output(out, pre, bias, idx, col, a0, flags);
        if (col + 1 < n) store_output(out, pre, bias, idx + 1, col + 1, a1, flags);
        return;
    }
    const bool out_f32 = (flags & KILN_GEMM_OUT_F32) != 0;
    const bool accumulate = (flags & KILN_GEMM_ACCUMULATE) != 0;
    const bool gelu = (flags & KILN_GEMM_GELU) != 0;
    float old0 = 0.0f, old1 = 0.0f;
    if (accumulate) {
        if (out_f32) {
            const float2 o = *reinterpret_cast<const float2*>(static_cast<const float*>(out) + idx);
            old0 = o.x, old1 = o.y;
        } else {
            const __nv_bfloat162 o = *reinterpret_cast<const __nv_bfloat162*>(static_cast<const bf16*>(out) + idx);
            old0 = __low2float(o), old1 = __high2float(o);
        }
    }
    const float b0 = bias != nullptr ? __bfloat162float(bias[col]) : 0.0f;
    const float b1 = bias != nullptr ? __bfloat162float(bias[col + 1]) : 0.0f;
    const float v0 = kiln_gemm_preact(a0, bias != nullptr, b0, accumulate, old0);
    const float v1 = kiln_gemm_preact(a1, bias != nullptr, b1, accumulate, old1);
    auto put = [&](void* p, float x0, float x1) {
        if (out_f32) {
            *reinterpret_cast<float2*>(static_cast<float*>(p) + idx) = make_float2(x0, x1);
        } else {
            *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(p) + idx) = __floats2bfloat162_rn(x0, x1);
        }
    };
    if (pre != nullptr) put(pre, v0, v1);
    put(out, kiln_gemm_activate(v0, gelu), kiln_gemm_activate(v1, gelu));
}

// B_NF4: B is the NF4 weight `wq` (b unused), decoded into the shared tiles by load_tile_nf4.
template <typename T, bool TRANS_A, bool TRANS_B, bool B_NF4 = false>
__device__ __forceinline__ void gemm_mma_body(void* out, void* pre, const bf16* a, const bf16* b, const bf16* bias,
                                              int m, int n, int k, int lda, int ldb, int ldc, int flags,
                                              Nf4Operand wq = Nf4Operand{}) {
    constexpr int BM = T::BM, BN = T::BN, WM = T::WM, WN = T::WN, MT = T::MT, NT = T::NT, THREADS = T::THREADS;
    // Shared tiles as they lie in global memory: A [BM][BK] or, transposed, [BK][BM]; B [BK][BN]
    // or, transposed, [BN][BK].
    constexpr int A_ROWS = TRANS_A ? BK : BM;
    constexpr int A_COLS = TRANS_A ? BM : BK;
    constexpr int A_PITCH = A_COLS + PAD;
    constexpr int B_ROWS = TRANS_B ? BN : BK;
    constexpr int B_COLS = TRANS_B ? BK : BN;
    constexpr int B_PITCH = B_COLS + PAD;
    __shared__ __align__(16) bf16 sa[2][A_ROWS * A_PITCH];
    __shared__ __align__(16) bf16 sb[2][B_ROWS * B_PITCH];
    // An NF4 operand's tables (1 KB) in shared memory: the tile decode looks up every element.
    __shared__ float nf4_tables[B_NF4 ? KILN_NF4_TABLE_LEN : 1];
    if constexpr (B_NF4) {
        for (int i = threadIdx.x; i < KILN_NF4_TABLE_LEN; i += blockDim.x) nf4_tables[i] = wq.tables[i];
        wq.tables = nf4_tables;
        __syncthreads();
    }

    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / T::WARPS_N) * WM;  // the warp's first row within the block tile
    const int wn = (warp % T::WARPS_N) * WN;  // and its first column
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int ktiles = (k + BK - 1) / BK;

    auto load = [&](int stage, int kt) {
        const int k0 = kt * BK;
        if constexpr (TRANS_A) {
            load_tile<THREADS, BK, BM, A_PITCH>(sa[stage], a, k, m, lda, k0, m0);
        } else {
            load_tile<THREADS, BM, BK, A_PITCH>(sa[stage], a, m, k, lda, m0, k0);
        }
        if constexpr (B_NF4 && TRANS_B) {
            load_tile_nf4<THREADS, BN, BK, B_PITCH>(sb[stage], wq, n, k, n0, k0);
        } else if constexpr (B_NF4) {
            load_tile_nf4<THREADS, BK, BN, B_PITCH>(sb[stage], wq, k, n, k0, n0);
        } else if constexpr (TRANS_B) {
            load_tile<THREADS, BN, BK, B_PITCH>(sb[stage], b, n, k, ldb, n0, k0);
        } else {
            load_tile<THREADS, BK, BN, B_PITCH>(sb[stage], b, k, n, ldb, k0, n0);
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[i][j][e] = 0.0f;
            }
        }
    }

    if (ktiles > 0) {
        load(0, 0);
    }
    cp_async_commit();
    for (int kt = 0; kt < ktiles; ++kt) {
        // The stage written here was last read in iteration kt - 1, which ended in a barrier.
        if (kt + 1 < ktiles) {
            load((kt + 1) & 1, kt + 1);
        }
        cp_async_commit();   // possibly empty: one group per iteration keeps the count simple
        cp_async_wait<1>();  // this thread's copies of step kt have landed ...
        __syncthreads();     // ... and everyone's, with the element-wise stores
        const bf16* As = sa[kt & 1];
        const bf16* Bs = sb[kt & 1];
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            // A fragment of tile mt: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7,
            // k 8-15), (rows 8-15, k 8-15), i.e. registers a0..a3 of mma.m16n8k16.
            uint32_t af[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int r0 = wm + mt * 16;
                if constexpr (TRANS_A) {
                    const int kk = ks + (lane & 7) + ((lane >> 4) << 3);
                    const int mm = r0 + ((lane >> 3) & 1) * 8;
                    ldmatrix_x4_trans(af[mt], As + kk * A_PITCH + mm);
                } else {
                    const int mm = r0 + (lane & 15);
                    const int kk = ks + (lane >> 4) * 8;
                    ldmatrix_x4(af[mt], As + mm * A_PITCH + kk);
                }
            }
            // B fragments of n8 tiles 2p and 2p + 1: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
            // (n 8-15, k 0-7), (n 8-15, k 8-15), i.e. b0, b1 of tile 2p then b0, b1 of tile 2p + 1.
            uint32_t bfr[NT][2];
#pragma unroll
            for (int p = 0; p < NT / 2; ++p) {
                const int c0 = wn + p * 16;
                uint32_t r[4];
                if constexpr (TRANS_B) {
                    const int nn = c0 + (lane & 7) + ((lane >> 4) << 3);
                    const int kk = ks + ((lane >> 3) & 1) * 8;
                    ldmatrix_x4(r, Bs + nn * B_PITCH + kk);
                } else {
                    const int kk = ks + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int nn = c0 + (lane >> 4) * 8;
                    ldmatrix_x4_trans(r, Bs + kk * B_PITCH + nn);
                }
                bfr[2 * p][0] = r[0];
                bfr[2 * p][1] = r[1];
                bfr[2 * p + 1][0] = r[2];
                bfr[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma_bf16_16816(acc[mt][nt], af[mt], bfr[nt][0], bfr[nt][1]);
                }
            }
        }
        __syncthreads();  // everyone is done with this stage before it is refilled
    }
    cp_async_wait<0>();  // nothing is in flight (the last groups are empty); keep it explicit

    // Accumulator e of tile (mt, nt) is row (lane / 4) + 8 (e / 2), column 2 (lane % 4) + e % 2.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm + mt * 16 + (lane >> 2) + (e >> 1) * 8;
                const int col = n0 + wn + nt * 8 + (lane & 3) * 2 + (e & 1);
                if (row < m && col < n) {
                    store_output(out, pre, bias, static_cast<int64_t>(row) * ldc + col, col, acc[mt][nt][e], flags);
                }
            }
        }
    }
}

// ---- Hopper (sm_90a): gemm_wgmma_* ----
//
// One block per SM, persistent: it walks output tiles t = blockIdx.x, + gridDim.x, ..., numbered
// down KILN_GEMM_WGMMA_GROUP tile rows at a time and then across (grouped rasterisation: the
// blocks in flight share A's and B's panels in L2). Warpgroup 0 is the producer: after giving
// back registers (setmaxnreg) one thread streams 64-wide K slices of A and B by TMA, with the
// 128-byte swizzle, into a ring of 4 stages, each with a `full` mbarrier (its arrival plus the
// copies' bytes) and an `empty` one (the 256 consumer threads are done with it). Warpgroups 1 and
// 2 are the consumers, rows 0-63 and 64-127 of the tile: each waits for a full stage, issues four
// m64n128k16 wgmma on it, keeps that group in flight while it waits for the next stage, and frees
// a stage once the wgmma reading it have retired; at the end of the tile it writes its 64 x 128
// accumulators through the shared epilogue (store_output_pair). The ring runs on across tiles, so
// the producer fetches the next tile's slices while the consumers finish the last one's epilogue.
//
// Layouts (the tensor maps are made by the wrapper, src/backend/cuda/gemm.rs): A stored [m, k]
// (K-major) comes as one 128-row box per stage; A stored [k, m] (M-major) as two boxes of 64 k
// lines x 64 m, one per consumer; B stored [n, k] (K-major) as one 128-row box; B stored [k, n]
// (N-major) as two boxes of 64 k lines x 64 n, `lbo` 8 KB apart. Each box is 8 KB per 64 rows or
// lines and every one starts on a 1024-byte swizzle atom. K-major operands step k16 by 32 bytes
// along the swizzled rows, MN-major ones by two 8-line atoms (2 KB). Edges past m, n and k arrive
// as zeros, so only the epilogue checks bounds.
constexpr int WG_BM = KILN_GEMM_WGMMA_BM, WG_BN = KILN_GEMM_WGMMA_BN, WG_BK = KILN_GEMM_WGMMA_BK;
constexpr int WG_STAGES = KILN_GEMM_WGMMA_STAGES;
constexpr uint32_t WG_BOX = 64 * WG_BK * 2;                             // 64 rows (or lines) of one stage: 8 KB
constexpr uint32_t WG_STAGE = (WG_BM + WG_BN) * WG_BK * 2;              // A and B of one stage: 32 KB
static_assert(WG_BM == 128 && WG_BN == 128 && WG_BK == 64, "the boxes and descriptors below assume 128 x 128 x 64");
static_assert(KILN_GEMM_WGMMA_SMEM >= 16 * WG_STAGES + 1023 + WG_STAGES * WG_STAGE, "shared memory budget");

// The output tile (tm, tn) of tile number t: KILN_GEMM_WGMMA_GROUP tile rows at a time, down
// each column of the group before the next.
__device__ __forceinline__ void wgmma_tile_at(int t, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int per_group = KILN_GEMM_WGMMA_GROUP * tiles_n;
    const int first = (t / per_group) * KILN_GEMM_WGMMA_GROUP;
    const int rows = min(tiles_m - first, KILN_GEMM_WGMMA_GROUP);
    tm = first + (t % per_group) % rows;
    tn = (t % per_group) / rows;
}

template <bool TRANS_A, bool TRANS_B>
__device__ __forceinline__ void gemm_wgmma_body(void* out, void* pre, const bf16* bias, const KilnTensorMap* ma, const KilnTensorMap* mb,
                                                int m, int n, int k, int ldc, int flags) {
#if KILN_SM90A
    extern __shared__ __align__(16) unsigned char wgmma_gemm_smem[];
    uint64_t* full = reinterpret_cast<uint64_t*>(wgmma_gemm_smem);
    uint64_t* empty = full + WG_STAGES;
    unsigned char* tiles = sm90_align(wgmma_gemm_smem + 16 * WG_STAGES, 1024);
    const int tiles_m = (m + WG_BM - 1) / WG_BM, tiles_n = (n + WG_BN - 1) / WG_BN, n_tiles = tiles_m * tiles_n;
    const int k_tiles = (k + WG_BK - 1) / WG_BK;
    if (threadIdx.x == 0) {
        for (int s = 0; s < WG_STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 256);
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (threadIdx.x < 128) {  // the producer warpgroup
        setmaxnreg_dec<40>();
        if (threadIdx.x != 0) return;
        int it = 0;  // k slices issued by this block, over all its tiles: stage it % S, round it / S
        for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
            int tm, tn;
            wgmma_tile_at(t, tiles_m, tiles_n, tm, tn);
            const int m0 = tm * WG_BM, n0 = tn * WG_BN;
            for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                const int s = it % WG_STAGES, k0 = kt * WG_BK;
                // Round r of stage s needs round r - 1 freed (the first round passes at once).
                mbar_wait(&empty[s], ((it / WG_STAGES) & 1) ^ 1);
                unsigned char* as = tiles + s * WG_STAGE;
                unsigned char* bs = as + WG_BM * WG_BK * 2;
                mbar_arrive_expect_tx(&full[s], WG_STAGE);
                if (TRANS_A) {
                    tma_load_2d(as, ma, m0, k0, &full[s]);
                    tma_load_2d(as + WG_BOX, ma, m0 + 64, k0, &full[s]);
                } else {
                    tma_load_2d(as, ma, k0, m0, &full[s]);
                }
                if (TRANS_B) {
                    tma_load_2d(bs, mb, k0, n0, &full[s]);
                } else {
                    tma_load_2d(bs, mb, n0, k0, &full[s]);
                    tma_load_2d(bs + WG_BOX, mb, n0 + 64, k0, &full[s]);
                }
            }
        }
        return;
    }

    setmaxnreg_inc<232>();
    const int c = threadIdx.x / 128 - 1;  // this consumer's rows: 64c .. 64c + 63 of the tile
    const int q = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    float d[WG_BN / 2];
    int it = 0;
    for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
        int tm, tn;
        wgmma_tile_at(t, tiles_m, tiles_n, tm, tn);
        const int m0 = tm * WG_BM + 64 * c, n0 = tn * WG_BN;
#pragma unroll
        for (int i = 0; i < WG_BN / 2; ++i) d[i] = 0.0f;
        int held = -1;  // the stage the wgmma group in flight reads
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
            const int s = it % WG_STAGES;
            mbar_wait(&full[s], (it / WG_STAGES) & 1);
            const unsigned char* as = tiles + s * WG_STAGE + c * WG_BOX;
            const unsigned char* bs = tiles + s * WG_STAGE + WG_BM * WG_BK * 2;
            wgmma_fence_operands(d);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < WG_BK / 16; ++kk) {
                const uint64_t da = TRANS_A ? wgmma_desc(as + kk * 2048, WG_BOX, 1024, 128) : wgmma_desc(as + kk * 32, 16, 1024, 128);
                const uint64_t db = TRANS_B ? wgmma_desc(bs + kk * 32, 16, 1024, 128) : wgmma_desc(bs + kk * 2048, WG_BOX, 1024, 128);
                wgmma_m64k16<WG_BN, TRANS_A ? 1 : 0, TRANS_B ? 0 : 1>(d, da, db, 1);
            }
            wgmma_commit();
            wgmma_wait<1>();  // the previous slice's group has retired: its stage can be refilled
            wgmma_fence_operands(d);
            if (held >= 0) mbar_arrive(&empty[held]);
            held = s;
        }
        wgmma_wait<0>();
        wgmma_fence_operands(d);
        if (held >= 0) mbar_arrive(&empty[held]);
        // Register 4j + 2h + e: row 16q + lane / 4 + 8h, column 8j + 2 (lane % 4) + e.
#pragma unroll
        for (int j = 0; j < WG_BN / 8; ++j) {
            const int col = n0 + 8 * j + 2 * (lane % 4);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + 16 * q + lane / 4 + 8 * h;
                if (row < m && col < n)
                    store_output_pair(out, pre, bias, static_cast<int64_t>(row) * ldc + col, col, n, d[4 * j + 2 * h],
                                      d[4 * j + 2 * h + 1], flags);
            }
        }
    }
#else
    __trap();
#endif
}

}  // namespace

// out [m, n] (bf16 or f32 by flags) = op(A) @ op(B) (+ bias [n]) (+ out_old) (then GELU, with the
// pre-activation written to `pre` when it is not null). nn: A [m, k], B [k, n]; nt: B stored
// [n, k]; tn: A stored [k, m]; tt: both. Large tiles: grid (ceil(n / 128), ceil(m / 128)), 256
// threads; small (_small_): grid (ceil(n / 64), ceil(m / 64)), 128 threads.
extern "C" __global__ void gemm_mma_nn(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Large, false, false>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}
extern "C" __global__ void gemm_mma_nt(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Large, false, true>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}
extern "C" __global__ void gemm_mma_tn(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Large, true, false>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}
extern "C" __global__ void gemm_mma_tt(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Large, true, true>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}
extern "C" __global__ void gemm_mma_small_nn(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Small, false, false>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}
extern "C" __global__ void gemm_mma_small_nt(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Small, false, true>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}
extern "C" __global__ void gemm_mma_small_tn(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Small, true, false>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}
extern "C" __global__ void gemm_mma_small_tt(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int flags) {
    gemm_mma_body<Small, true, true>(out, pre, a, b, bias, m, n, k, lda, ldb, ldc, flags);
}

// The Hopper kernels (sm_90a; they trap elsewhere): the same product and epilogue as gemm_mma_*,
// A and B read through the tensor maps `ma` and `mb` (TMA, 128-byte swizzle: boxes of 64 x 128
// rows for a K-major operand, 64 x 64 for an MN-major one). Grid: at most one block per SM (fewer
// when there are fewer tiles), KILN_GEMM_WGMMA_THREADS threads, KILN_GEMM_WGMMA_SMEM bytes of
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(KILN_GEMM_WGMMA_THREADS) gemm_wgmma_nn(void* out, void* pre, const __nv_bfloat16* bias, const __grid_constant__ KilnTensorMap ma, const __grid_constant__ KilnTensorMap mb, int m, int n, int k, int ldc, int flags) {
    gemm_wgmma_body<false, false>(out, pre, bias, &ma, &mb, m, n, k, ldc, flags);
}
extern "C" __global__ void __launch_bounds__(KILN_GEMM_WGMMA_THREADS) gemm_wgmma_nt(void* out, void* pre, const __nv_bfloat16* bias, const __grid_constant__ KilnTensorMap ma, const __grid_constant__ KilnTensorMap mb, int m, int n, int k, int ldc, int flags) {
    gemm_wgmma_body<false, true>(out, pre, bias, &ma, &mb, m, n, k, ldc, flags);
}
extern "C" __global__ void __launch_bounds__(KILN_GEMM_WGMMA_THREADS) gemm_wgmma_tn(void* out, void* pre, const __nv_bfloat16* bias, const __grid_constant__ KilnTensorMap ma, const __grid_constant__ KilnTensorMap mb, int m, int n, int k, int ldc, int flags) {
    gemm_wgmma_body<true, false>(out, pre, bias, &ma, &mb, m, n, k, ldc, flags);
}
extern "C" __global__ void __launch_bounds__(KILN_GEMM_WGMMA_THREADS) gemm_wgmma_tt(void* out, void* pre, const __nv_bfloat16* bias, const __grid_constant__ KilnTensorMap ma, const __grid_constant__ KilnTensorMap mb, int m, int n, int k, int ldc, int flags) {
    gemm_wgmma_body<true, true>(out, pre, bias, &ma, &mb, m, n, k, ldc, flags);
}

// The fused NF4 GEMM: out [m, n] = A [m, k] @ op(W) (+ bias) (then GELU), W an NF4 weight
// (nf4.cuh's layout) decoded tile by tile into shared memory and never materialised: nf4_nn reads
// W stored [k, n] (x @ W, a QLoRA layer's forward), nf4_nt W stored [n, k] (dY @ W^T with W
// [in, out], its input gradient). Equal bit for bit to nf4_dequantize_bf16 then gemm_mma_*.
#define KILN_GEMM_NF4_PARAMS void *out, void *pre, const __nv_bfloat16 *a, const uint8_t *packed, const uint8_t *absmax_codes, const float *nested, const float *tables, float offset, int blocksize, const __nv_bfloat16 *bias, int m, int n, int k, int lda, int ldc, int flags
#define KILN_GEMM_NF4_OPERAND Nf4Operand{packed, absmax_codes, nested, tables, offset, blocksize}
extern "C" __global__ void gemm_mma_nf4_nn(KILN_GEMM_NF4_PARAMS) {
    gemm_mma_body<Large, false, false, true>(out, pre, a, nullptr, bias, m, n, k, lda, 0, ldc, flags, KILN_GEMM_NF4_OPERAND);
}
extern "C" __global__ void gemm_mma_nf4_nt(KILN_GEMM_NF4_PARAMS) {
    gemm_mma_body<Large, false, true, true>(out, pre, a, nullptr, bias, m, n, k, lda, 0, ldc, flags, KILN_GEMM_NF4_OPERAND);
}
extern "C" __global__ void gemm_mma_small_nf4_nn(KILN_GEMM_NF4_PARAMS) {
    gemm_mma_body<Small, false, false, true>(out, pre, a, nullptr, bias, m, n, k, lda, 0, ldc, flags, KILN_GEMM_NF4_OPERAND);
}
extern "C" __global__ void gemm_mma_small_nf4_nt(KILN_GEMM_NF4_PARAMS) {
    gemm_mma_body<Small, false, true, true>(out, pre, a, nullptr, bias, m, n, k, lda, 0, ldc, flags, KILN_GEMM_NF4_OPERAND);
}

// The reference: one thread per output element, f32 accumulation in k order. trans_a / trans_b
// are 0 or 1. Grid (ceil(n / 16), ceil(m / 16)), 16 x 16 threads.
extern "C" __global__ void gemm_naive(void* out, void* pre, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* bias, int m, int n, int k, int lda, int ldb, int ldc, int trans_a, int trans_b, int flags) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y * blockDim.y + threadIdx.y;
    if (i >= m || j >= n) {
        return;
    }
    float s = 0.0f;
    for (int p = 0; p < k; ++p) {
        const float x = __bfloat162float(trans_a ? a[static_cast<int64_t>(p) * lda + i] : a[static_cast<int64_t>(i) * lda + p]);
        const float y = __bfloat162float(trans_b ? b[static_cast<int64_t>(j) * ldb + p] : b[static_cast<int64_t>(p) * ldb + j]);
        s = fmaf(x, y, s);  // the product of two bf16 is exact in f32 either way
    }
    store_output(out, pre, bias, static_cast<int64_t>(i) * ldc + j, j, s, flags);
}

// part [ceil(rows / KILN_GEMM_BIAS_GROUP), n] f32: column sums of dout [rows, n] over each group
// of rows. Grid (ceil(n / 256), groups), block (32, KILN_GEMM_BIAS_LANES). VEC (n % 8 == 0 and
// dout 16-byte aligned): lane l owns columns 8l .. 8l + 7 of the block's 256; else l + 32e.
template <bool VEC>
__device__ __forceinline__ void bias_partial(float* part, const __nv_bfloat16* dout, int rows, int n) {
    constexpr int LANES = KILN_GEMM_BIAS_LANES;
    // One padding word every 32: lane l's 8 columns (8l + e) then fall in 32 distinct banks for
    // each e, and a warp's 32 consecutive columns still do.
    __shared__ float sums[LANES][256 + 8];
    auto at = [](int j) { return j + j / 32; };
    const int lane = threadIdx.x, y = threadIdx.y, c0 = blockIdx.x * 256;
    const int r0 = blockIdx.y * KILN_GEMM_BIAS_GROUP, r1 = min(r0 + KILN_GEMM_BIAS_GROUP, rows);
    auto col = [&](int e) { return VEC ? c0 + 8 * lane + e : c0 + lane + 32 * e; };
    float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = r0 + y; r < r1; r += LANES) {
        const __nv_bfloat16* row = dout + static_cast<int64_t>(r) * n;
        if (VEC) {
            if (col(0) < n) {
                const uint4 u = *reinterpret_cast<const uint4*>(row + col(0));
                const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    s[2 * i] += __uint_as_float(w[i] << 16);
                    s[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
                }
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                if (col(e) < n) s[e] += __bfloat162float(row[col(e)]);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sums[y][at(col(e) - c0)] = s[e];
    __syncthreads();
    // 128 threads, 256 columns: each adds two columns' lane sums in lane order.
    for (int j = y * 32 + lane; j < 256; j += 32 * LANES) {
        if (c0 + j >= n) continue;
        float t = 0.0f;
#pragma unroll
        for (int l = 0; l < LANES; ++l) t += sums[l][at(j)];
        part[static_cast<int64_t>(blockIdx.y) * n + c0 + j] = t;
    }
}

extern "C" __global__ void __launch_bounds__(32 * KILN_GEMM_BIAS_LANES) gemm_bias_backward_partial(float* part, const __nv_bfloat16* dout, int rows, int n) {
    if (n % 8 == 0 && (reinterpret_cast<uintptr_t>(dout) & 15) == 0) bias_partial<true>(part, dout, rows, n);
    else bias_partial<false>(part, dout, rows, n);
}

// dbias [n] = the sum over groups of part [groups, n] (colsum.cuh's fixed order). Grid
// ceil(n / 32), block (32, KILN_COLSUM_WARPS).
extern "C" __global__ void __launch_bounds__(32 * KILN_COLSUM_WARPS) gemm_bias_backward_finish(float* dbias, const float* part, int groups, int n) {
    __shared__ float colsums[KILN_COLSUM_WARPS][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const float t = colsum_block(colsums, part, n, groups, col, col < n);
    if (threadIdx.y == 0 && col < n) dbias[col] = t;
}
