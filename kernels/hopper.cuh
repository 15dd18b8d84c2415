// hopper.cuh: Hopper's asynchronous machinery, one PTX instruction per helper (PTX ISA 8.0+), for
// kernels that feed the tensor cores through the copy engine: shared addresses, mbarriers, TMA
// tiled loads (cp.async.bulk.tensor) and wgmma with shared-memory matrix descriptors. Under
// KILN_CUDA_EMU each helper calls the emulated device's version of its instruction
// (kernels/emu/emu.h), so a kernel built on them runs, and is checked, without a GPU.
//
// KILN_SM90A is 1 where the instructions exist: device code compiled for sm_90a
// (-gencode=arch=compute_90a,code=sm_90a defines __CUDA_ARCH_FEAT_SM90_ALL) and the emulated
// device. A kernel that uses them compiles its body under `#if KILN_SM90A` and traps elsewhere;
// its Rust wrapper only launches it on an sm_90 device.
//
// Layouts (the emulator's runtime.cpp decodes the same ones, from the PTX ISA's "Shared Memory
// Matrix Layout"): a K-major bf16 operand is stored as core matrices of 8 rows x 16 bytes. With a
// swizzle of `span` bytes (32, 64 or 128) a row of K elements spans `span` bytes, 8 rows make an
// atom of 8 * span bytes (aligned to its size), atoms follow each other `sbo` bytes apart down
// the rows, and the 16-byte chunks are permuted: address bits 4.. XOR bits 7.. (3 bits for 128B,
// 2 for 64B, 1 for 32B). Without a swizzle each core matrix is 128 contiguous bytes, the next
// one in K `lbo` bytes on and the next 8 rows `sbo` bytes on. An MN-major operand (a tile stored
// with M or N contiguous, as TMA lands a [k, n] matrix) turns the roles: a line of the atom holds
// span / 2 elements of M or N for one k, 8 lines (8 k) make the atom, `lbo` steps to the next
// span / 2 of M or N and `sbo` to the next 8 k (mnmajor_offset). TMA writes the same swizzle when
// its tensor map names it.
#pragma once
#include "common.cuh"

#if defined(KILN_CUDA_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KILN_SM90A 1
#else
#define KILN_SM90A 0
#endif

// A CUtensorMap (cuda.h's opaque 128 bytes, made on the host by cuTensorMapEncodeTiled, or by
// the emulator's twin of it: Cuda::tensor_map_2d), passed by value as a
// `const __grid_constant__ KilnTensorMap` kernel parameter, whose address the copy engine reads.
#ifdef KILN_CUDA_EMU
struct KilnTensorMap {
    unsigned long long opaque[16];
};
#else
struct __align__(64) KilnTensorMap {
    unsigned long long opaque[16];
};
#endif

// The shared-window address of a pointer into shared memory (dynamic shared memory on the
// emulated device).
static __device__ __forceinline__ uint32_t sm90_smem(const void* p) {
#ifdef KILN_CUDA_EMU
    return kiln_emu::smem_addr(p);
#else
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// p advanced to the next shared address that is a multiple of `align` (a power of two).
template <typename T>
static __device__ __forceinline__ T* sm90_align(T* p, uint32_t align) {
    const uint32_t s = sm90_smem(p);
    return reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(p) + ((align - (s & (align - 1))) & (align - 1)));
}

// ---- mbarrier: 8 bytes of shared memory that count arrivals and bytes in flight per phase ----

static __device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#ifdef KILN_CUDA_EMU
    kiln_emu::mbar_init(bar, count);
#else
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(sm90_smem(bar)), "r"(count) : "memory");
#endif
}

// Makes this thread's mbarrier.init visible to the copy engine; a __syncthreads then publishes the
// barriers to the block.
static __device__ __forceinline__ void mbar_fence_init() {
#ifndef KILN_CUDA_EMU
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival that also expects `bytes` more to land in this phase (the TMA loads it covers).
static __device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef KILN_CUDA_EMU
    kiln_emu::mbar_arrive(bar, bytes);
#else
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(sm90_smem(bar)), "r"(bytes) : "memory");
#endif
}

static __device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#ifdef KILN_CUDA_EMU
    kiln_emu::mbar_arrive(bar, 0);
#else
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(sm90_smem(bar)) : "memory");
#endif
}

// Waits until the phase with this parity (0 for the first phase, 1 for the second, ...) completes.
static __device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef KILN_CUDA_EMU
    kiln_emu::mbar_try_wait(bar, parity);
#else
    const uint32_t s = sm90_smem(bar);
    uint32_t done = 0;
    while (!done)
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(s), "r"(parity)
            : "memory");
#endif
}

// ---- TMA ----

// The box of the 2-D tensor `map` whose first element is (c0 inner, c1 outer) into dst (aligned
// to 128 bytes, or to the swizzle atom), completing its bytes on `bar`. Elements outside the
// tensor arrive as zeros.
static __device__ __forceinline__ void tma_load_2d(void* dst, const KilnTensorMap* map, int c0, int c1, uint64_t* bar) {
#ifdef KILN_CUDA_EMU
    const int c[2] = {c0, c1};
    kiln_emu::tma_load(dst, map, c, 2, bar);
#else
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            sm90_smem(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(sm90_smem(bar))
        : "memory");
#endif
}

// Orders this thread's ordinary shared-memory stores before the async proxy (wgmma, TMA) reads
// them; a __syncthreads after it orders them for the whole block.
static __device__ __forceinline__ void fence_proxy_async() {
#ifndef KILN_CUDA_EMU
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ---- wgmma ----

// The byte offset of element (r, k) of a K-major bf16 tile laid out for a descriptor with this
// swizzle (0, 32, 64 or 128; with one, k < swizzle / 2), from a base aligned to the atom.
KILN_HD uint32_t kmajor_offset(int r, int k, int swizzle, uint32_t lbo, uint32_t sbo) {
    if (!swizzle) return (r / 8) * sbo + (r % 8) * 16 + (k / 8) * lbo + (k % 8) * 2;
    const uint32_t a = (r / 8) * sbo + (r % 8) * swizzle + k * 2;
    return a ^ (((a >> 7) & (swizzle / 16 - 1)) << 4);
}

// The byte offset of element (r, k) of an MN-major bf16 tile (r along M or N) for a descriptor
// with this swizzle, from a base aligned to 1024 bytes. With a swizzle of `span` bytes a line of
// span / 2 elements of M or N holds one k, 8 lines (8 k) make an atom, the next span / 2 elements
// of M or N are `lbo` bytes on and the next 8 k `sbo` bytes on; without one a core matrix is 8
// lines of 8 elements, the next 8 elements of M or N `sbo` bytes on and the next 8 k `lbo` bytes
// on (the PTX ISA's "Major-ness supported by Strides").
KILN_HD uint32_t mnmajor_offset(int r, int k, int swizzle, uint32_t lbo, uint32_t sbo) {
    if (!swizzle) return (r / 8) * sbo + (r % 8) * 2 + (k / 8) * lbo + (k % 8) * 16;
    const int e = swizzle / 2;
    const uint32_t a = (r / e) * lbo + (k / 8) * sbo + (k % 8) * swizzle + (r % e) * 2;
    return a ^ (((a >> 7) & (swizzle / 16 - 1)) << 4);
}

// The shared-memory matrix descriptor of a tile at p (PTX ISA, "Matrix Descriptor
// Format"): start address, leading- and stride-dimension byte offsets (each >> 4 in 14 bits), and
// the swizzle mode in bits 62-63 (1: 128B, 2: 64B, 3: 32B).
static __device__ __forceinline__ uint64_t wgmma_desc(const void* p, uint32_t lbo, uint32_t sbo, int swizzle) {
    const uint64_t mode = swizzle == 128 ? 1 : swizzle == 64 ? 2 : swizzle == 32 ? 3 : 0;
    return (uint64_t)((sm90_smem(p) >> 4) & 0x3fff) | ((uint64_t)((lbo >> 4) & 0x3fff) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3fff) << 32) | (mode << 62);
}

// Before the first wgmma that reads accumulators other instructions wrote.
static __device__ __forceinline__ void wgmma_fence() {
#ifndef KILN_CUDA_EMU
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

static __device__ __forceinline__ void wgmma_commit() {
#ifdef KILN_CUDA_EMU
    kiln_emu::wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups of this thread's wgmma are still in flight.
template <int N>
static __device__ __forceinline__ void wgmma_wait() {
#ifdef KILN_CUDA_EMU
    kiln_emu::wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accumulator reads or writes across the wgmma that owns them
// (after a wait, before the next issue).
template <int R>
static __device__ __forceinline__ void wgmma_fence_operands(float (&d)[R]) {
#ifndef KILN_CUDA_EMU
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// d (64 x N f32, in the fragment layout: warp q of the warpgroup holds rows 16q .. 16q + 15;
// register 4j + i of lane l is row 16q + l / 4 (+ 8 for i >= 2), column 8j + 2 (l % 4) + (i & 1))
// = A (64 x 16) B (16 x N) + (scale_d ? d : 0), A and B bf16 in shared memory: K-major, or
// MN-major where TA (for A) or TB (for B) is 1 (the instruction's imm-trans-a / imm-trans-b).
// Issued by all 128 threads of a warpgroup; d is not to be touched until a wgmma_wait retires it.
template <int N, int TA = 0, int TB = 0>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
    static_assert(N == 64 || N == 128, "the kernels use m64n64k16 and m64n128k16");
#ifdef KILN_CUDA_EMU
    kiln_emu::wgmma_bf16(d, N, da, db, scale_d, TA, TB);
#else
    if constexpr (N == 64) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "l"(da), "l"(db), "r"(scale_d), "n"(TA), "n"(TB));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,\n"
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,\n"
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
              "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
              "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
              "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(da), "l"(db), "r"(scale_d), "n"(TA), "n"(TB));
    }
#endif
}

// ---- setmaxnreg: a warpgroup hands registers back (dec) or takes them (inc), so a producer that
// only issues copies can leave its share to the consumers' accumulators. REGS: 24 to 256, a
// multiple of 8; the kernel's __launch_bounds__ fixes the count it starts from. ----

template <int REGS>
static __device__ __forceinline__ void setmaxnreg_dec() {
#ifdef KILN_CUDA_EMU
    kiln_emu::setmaxnreg(REGS);
#else
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}

template <int REGS>
static __device__ __forceinline__ void setmaxnreg_inc() {
#ifdef KILN_CUDA_EMU
    kiln_emu::setmaxnreg(REGS);
#else
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}
