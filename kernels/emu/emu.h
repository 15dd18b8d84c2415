// emu.h: kiln's emulated CUDA device, the part the kernels see.
//
// build.rs compiles every kernels/<family>.cu a second time, as host C++, with this header included
// first (see kernels/emu/README.md). The CUDA features the kernels use are emulated here and in
// runtime.cpp: threads and blocks (each CUDA thread a fiber; a block's threads take turns on one
// OS thread between barriers; blocks run in parallel on the CPU's cores), __syncthreads and
// __syncwarp, warp shuffles, mma.sync m16n8k16 bf16, ldmatrix x4 (.trans), cp.async with
// commit/wait groups, mbarriers, TMA tiled loads, wgmma, static and dynamic shared memory, and a memcheck: every memory access of
// kernel code is compiled with GCC's -fsanitize=kernel-address instrumentation, whose hooks
// (__asan_load4_noabort, ...) runtime.cpp implements to check it against the device allocation,
// shared memory or stack it belongs to.
//
// Where the emulated arithmetic differs from the hardware's:
//   - nvcc contracts a * b + c into one FMA by default; the host build is compiled with
//     -ffp-contract=off, so it rounds the product and the sum separately (differences in the last
//     bit of f32 results);
//   - expf, logf, tanhf, sqrtf come from the host's libm (the GPU's expf/logf are within 2 ulp,
//     sqrtf is correctly rounded on both);
//   - mma.sync and wgmma sum the 16 products of each output element exactly in double and round
//     once to f32; the tensor cores' internal rounding differs slightly (within f32 of the exact
//     sum).
// Hopper's mbarriers, TMA tiled loads (cp.async.bulk.tensor) and wgmma (bf16, K- or MN-major
// operands, every swizzle mode) are emulated too, for kernels/hopper.cuh; kernels/emu/README.md says how.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_bf16.h>

#undef __global__
#define __global__
#define __launch_bounds__(...)
#undef __align__
#define __align__(n) __attribute__((aligned(n)))
#undef __grid_constant__
#define __grid_constant__
// build.rs rewrites `__shared__` in the kernel source to KILN_EMU_SHARED (a static array becomes one
// per OS thread, which is one per running block) and registers each array with
// kiln_emu::shared_static, and turns `extern __shared__ T name[];` into a pointer to the block's
// dynamic shared memory (kiln_emu::dyn_smem()).
#define KILN_EMU_SHARED static thread_local

namespace kiln_emu {

struct Dim3 {
    unsigned x, y, z;
};

struct Thread;
struct Launch {
    Dim3 grid, block;
};

// The fiber running on this OS thread (null outside a kernel), its block index and the launch.
extern thread_local Thread* cur;
extern thread_local Dim3 cur_block;
extern thread_local const Launch* cur_launch;

// Read by the threadIdx macro: the CUDA thread's index is the first member of runtime.cpp's Thread.
inline const Dim3& thread_idx() { return *reinterpret_cast<const Dim3*>(cur); }

unsigned char* dyn_smem();
void shared_static(void* p, size_t bytes, const char* name);
[[noreturn]] void trap(const char* file, int line);

void block_barrier(const char* file, int line);
void warp_barrier(unsigned mask, const char* file, int line);
uint32_t shfl_xor(unsigned mask, uint32_t v, int lane_mask, int width, const char* file, int line);
uint32_t shfl_idx(unsigned mask, uint32_t v, int src_lane, int width, const char* file, int line);
uint32_t shfl_down(unsigned mask, uint32_t v, unsigned delta, int width, const char* file, int line);
void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]);
void count_flops(uint64_t n);
void ldmatrix_x4(uint32_t r[4], const void* p, bool trans);
void cp_async_16(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int n);
// Hopper (runtime.cpp's "Hopper" section).
uint32_t smem_addr(const void* p);
void mbar_init(void* bar, unsigned count);
void mbar_arrive(void* bar, uint32_t expect_tx);
void mbar_expect_tx(void* bar, uint32_t bytes);
bool mbar_try_wait(void* bar, uint32_t parity);
void tma_load(void* dst, const void* map, const int* c, int n, void* bar);
void wgmma_bf16(float* d, int n, uint64_t da, uint64_t db, int scale_d, int trans_a, int trans_b);
void setmaxnreg(int regs);
void wgmma_commit();
void wgmma_wait(int n);

template <typename T>
inline uint32_t to_bits(T v) {
    static_assert(sizeof(T) == 4, "the emulated shuffles move 32-bit values");
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}
template <typename T>
inline T from_bits(uint32_t u) {
    T v;
    memcpy(&v, &u, 4);
    return v;
}

}  // namespace kiln_emu

#define threadIdx (kiln_emu::thread_idx())
#define blockIdx (kiln_emu::cur_block)
#define blockDim (kiln_emu::cur_launch->block)
#define gridDim (kiln_emu::cur_launch->grid)
#define warpSize 32

#define __syncthreads() kiln_emu::block_barrier(__FILE__, __LINE__)
#define __syncwarp(...) kiln_emu::warp_barrier(kiln_emu_mask(__VA_ARGS__), __FILE__, __LINE__)
inline unsigned kiln_emu_mask() { return 0xffffffffu; }
inline unsigned kiln_emu_mask(unsigned m) { return m; }
#define __trap() kiln_emu::trap(__FILE__, __LINE__)
// The floating-point operations a thread issues on CUDA cores, declared by the kernel where it
// issues them (common.cuh): counted per launch for kiln bench train-step --predict.
#define KILN_FLOPS(n) kiln_emu::count_flops(n)

#define __shfl_xor_sync(mask, v, ...) kiln_emu_shfl_xor(mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_sync(mask, v, ...) kiln_emu_shfl_idx(mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) kiln_emu_shfl_down(mask, v, __FILE__, __LINE__, __VA_ARGS__)
template <typename T>
inline T kiln_emu_shfl_xor(unsigned mask, T v, const char* f, int l, int lane_mask, int width = 32) {
    return kiln_emu::from_bits<T>(kiln_emu::shfl_xor(mask, kiln_emu::to_bits(v), lane_mask, width, f, l));
}
template <typename T>
inline T kiln_emu_shfl_idx(unsigned mask, T v, const char* f, int l, int src, int width = 32) {
    return kiln_emu::from_bits<T>(kiln_emu::shfl_idx(mask, kiln_emu::to_bits(v), src, width, f, l));
}
template <typename T>
inline T kiln_emu_shfl_down(unsigned mask, T v, const char* f, int l, unsigned delta, int width = 32) {
    return kiln_emu::from_bits<T>(kiln_emu::shfl_down(mask, kiln_emu::to_bits(v), delta, width, f, l));
}

// The kernels' inline-PTX helpers call these under KILN_CUDA_EMU.
inline void kiln_emu_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    kiln_emu::mma_m16n8k16_bf16(d, a, b);
}
inline void kiln_emu_ldmatrix_x4(uint32_t r[4], const void* p, bool trans) { kiln_emu::ldmatrix_x4(r, p, trans); }
inline void kiln_emu_cp_async_16(void* dst, const void* src, bool valid) { kiln_emu::cp_async_16(dst, src, valid); }
inline void kiln_emu_cp_async_commit() { kiln_emu::cp_async_commit(); }
inline void kiln_emu_cp_async_wait(int n) { kiln_emu::cp_async_wait(n); }

#ifndef __CUDA_ARCH__
inline float __uint_as_float(uint32_t u) { return kiln_emu::from_bits<float>(u); }
inline uint32_t __float_as_uint(float f) { return kiln_emu::to_bits(f); }
#endif
using std::max;
using std::min;

// Calls kernel k with the launch's argument list: args[i] points at the i-th argument's value, as
// in cuLaunchKernel's kernelParams.
template <typename... A, size_t... I>
inline void kiln_emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
inline void kiln_emu_invoke(void (*k)(A...), void** args) {
    kiln_emu_call(k, args, std::index_sequence_for<A...>{});
}

// The C interface runtime.cpp gives the Rust side (src/backend/cuda/emu.rs).
extern "C" {
typedef void (*kiln_emu_entry)(void** args);
}
