// Host emulation of the CUDA features kernels/attention.cu and kernels/gemm.cu use, for checking
// kernels without a GPU: one std::thread per CUDA thread, std::barrier for __syncthreads/__syncwarp,
// warp shuffles, mma.sync and ldmatrix through a per-warp exchange area, cp.async as deferred
// copies. Include this, define the dynamic shared memory array `smem` in an anonymous namespace (or,
// for gemm.cu's static __shared__ arrays, see gemm_emu.cpp), then include the kernel source
// (compiled with -DKILN_CUDA_EMU, which routes the kernels' inline PTX to the kiln_emu_* functions).
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <barrier>
#include <thread>
#include <vector>
#include <algorithm>
#include <cuda_bf16.h>
#undef __global__
#define __global__
#define __launch_bounds__(x)
#undef __shared__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
struct Idx { unsigned x, y, z; };
extern thread_local Idx threadIdx, blockIdx;
extern Idx blockDim, gridDim;
struct Warp {
    std::barrier<>* bar;
    float ex[32];
    uint32_t a[32][4], b[32][2];  // mma.sync operands of each lane
    float c[32][4];
    const void* addr[32];  // ldmatrix row addresses of each lane
};
extern std::barrier<>* g_block_bar;
extern Warp g_warps[32];
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline void __syncwarp() { g_warps[threadIdx.x / 32].bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int o) {
    Warp& w = g_warps[threadIdx.x / 32];
    int lane = threadIdx.x % 32;
    w.ex[lane] = x;
    w.bar->arrive_and_wait();
    float y = w.ex[lane ^ o];
    w.bar->arrive_and_wait();
    return y;
}
inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
using std::min;

// bf16 bits -> float (bf16 is the top half of an f32).
inline float emu_bf16_bits(uint32_t h) { return __uint_as_float((h & 0xffffu) << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c with c = d, written from the PTX
// ISA's fragment tables (section "Matrix Fragments for mma.m16n8k16 with floating point type"):
// groupID = laneid >> 2, threadID_in_group = laneid % 4; element i of a lane's fragment
// (register i / 2, low half for even i) sits at
//   A: row = groupID (i in {0,1,4,5}) or groupID + 8 (otherwise),
//      col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4;
//   B: row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2; col = groupID;
//   C, D (one f32 per register): row = groupID (i < 2) or groupID + 8, col = threadID_in_group * 2 + (i & 1).
// Every lane deposits its fragments, the warp meets, each lane rebuilds the whole A (16 x 16),
// B (16 x 8) and C, and computes its own four D elements (exact products summed in double,
// rounded once to f32; the hardware's internal rounding differs slightly, within f32).
inline void kiln_emu_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    Warp& w = g_warps[threadIdx.x / 32];
    const int lane = threadIdx.x % 32;
    for (int r = 0; r < 4; ++r) { w.a[lane][r] = a[r]; w.c[lane][r] = d[r]; }
    for (int r = 0; r < 2; ++r) w.b[lane][r] = b[r];
    w.bar->arrive_and_wait();
    float A[16][16], B[16][8], Cm[16][8];
    for (int l = 0; l < 32; ++l) {
        const int gid = l >> 2, tig = l % 4;
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = emu_bf16_bits(w.a[l][i / 2] >> (16 * (i & 1)));
        }
        for (int i = 0; i < 4; ++i) {
            const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][gid] = emu_bf16_bits(w.b[l][i / 2] >> (16 * (i & 1)));
        }
        for (int i = 0; i < 4; ++i) Cm[i < 2 ? gid : gid + 8][tig * 2 + (i & 1)] = w.c[l][i];
    }
    w.bar->arrive_and_wait();  // all lanes have read the exchange area before it is reused
    const int gid = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? gid : gid + 8, col = tig * 2 + (i & 1);
        double s = Cm[row][col];
        for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)B[k][col];
        d[i] = (float)s;
    }
}

// cp.async: a copy is recorded at issue and its destination filled with 0x7f garbage at once; the
// bytes land only when cp.async.wait_group retires its group. So a read that misses a wait (or the
// __syncthreads after it), and a refill that races with another warp still reading the buffer,
// both see garbage (large finite floats / bf16) and show up as wrong results.
struct EmuCopy { void* dst; const void* src; bool valid; };
extern thread_local std::vector<EmuCopy> g_cp_open;                  // issued, not committed
extern thread_local std::vector<std::vector<EmuCopy>> g_cp_groups;  // committed, oldest first
inline void kiln_emu_cp_async_16(void* dst, const void* src, bool valid) {
    memset(dst, 0x7f, 16);
    g_cp_open.push_back({dst, src, valid});
}
inline void kiln_emu_cp_async_commit() {
    g_cp_groups.push_back(g_cp_open);
    g_cp_open.clear();
}
inline void kiln_emu_cp_async_wait(int n) {
    while ((int)g_cp_groups.size() > n) {
        for (const EmuCopy& c : g_cp_groups.front()) {
            if (c.valid) memcpy(c.dst, c.src, 16);
            else memset(c.dst, 0, 16);
        }
        g_cp_groups.erase(g_cp_groups.begin());
    }
}

// When set by the harness: whether [p, p + n) lies in the block's shared memory (ldmatrix checks
// every row address with it).
inline bool (*g_smem_check)(const void* p, size_t n) = nullptr;

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 {r0, r1, r2, r3}, [p], from the PTX ISA's
// description ("Warp-level matrix load instruction: ldmatrix"): lanes 8q .. 8q + 7 give the
// addresses of rows 0 .. 7 of matrix q (each row 8 contiguous b16, 16 bytes, 16-byte aligned);
// register q of every lane receives a fragment of matrix q, laid out as in the figure "ldmatrix
// fragment layout for one 8x8 Matrix with 16-bit elements": a group of four consecutive lanes
// loads one row, so lane l holds row l / 4, columns 2 (l % 4) (low half) and 2 (l % 4) + 1 (high
// half). With .trans the matrix is read column-major: the eight addressed rows are its columns,
// so lane l holds element l / 4 of addressed rows 2 (l % 4) (low half) and 2 (l % 4) + 1 (high).
// The warp meets before reading (all addresses given, all earlier shared stores done by the
// caller's own synchronisation) and after (the exchange area is free again).
inline void kiln_emu_ldmatrix_x4(uint32_t r[4], const void* p, bool trans) {
    Warp& w = g_warps[threadIdx.x / 32];
    const int lane = threadIdx.x % 32;
    if ((reinterpret_cast<uintptr_t>(p) & 15) != 0) { printf("ldmatrix: lane %d row address %p not 16-byte aligned\n", lane, p); exit(3); }
    if (g_smem_check && !g_smem_check(p, 16)) {
        printf("ldmatrix: lane %d row address %p outside shared memory\n", lane, p); exit(3);
    }
    w.addr[lane] = p;
    w.bar->arrive_and_wait();
    const int g = lane >> 2, t = lane % 4;
    for (int q = 0; q < 4; ++q) {
        uint32_t v = 0;
        for (int j = 0; j < 2; ++j) {
            const uint16_t* row = static_cast<const uint16_t*>(w.addr[8 * q + (trans ? 2 * t + j : g)]);
            v |= (uint32_t)row[trans ? g : 2 * t + j] << (16 * j);
        }
        r[q] = v;
    }
    w.bar->arrive_and_wait();
}
