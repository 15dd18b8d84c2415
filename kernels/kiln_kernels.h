// kiln_kernels.h: the structs and constants that the CUDA kernels and the Rust side share.
//
// build.rs reads this file and generates the Rust twins (src/abi.rs includes them), so the two
// sides cannot drift: change a field or a constant here and both sides change. The generator
// understands exactly two forms, one per line:
//   #define KILN_NAME <integer or float literal>      -> pub const KILN_NAME: i64 / f32
//   typedef struct { <type> <field>; ... } Name;      -> #[repr(C)] pub struct Name
// with field types float, double, int32_t, uint32_t, int64_t and uint64_t. Keep every shared item
// in one of those forms; anything else here is C++-only.
#pragma once
#include <stdint.h>

// ---- common ----
#define KILN_WARP_SIZE 32

// ---- adamw ----
// The per-step scalars of one AdamW update, computed once on the host (optim/adamw.rs,
// AdamWScalars::new) and passed by value to the kernel: torch's operation order needs them as is.
typedef struct {
    float decay;            // 1 - lr * weight_decay (1 for parameters without decay)
    float beta1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float step_size;        // lr / (1 - beta1^t)
    float bc2_sqrt;         // sqrt(1 - beta2^t)
    float eps;
} AdamWScalars;

// One parameter tensor in the multi-tensor AdamW launch (kernels/adamw.cu): device addresses of
// its f32 master weights p, moments m and v and gradient g, all of n elements; p_bf16 is the
// address of a bf16 copy of p to refresh after the update, or 0 for none. The launch splits every
// tensor into chunks of KILN_ADAMW_CHUNK elements; chunk_start is the number of chunks of all the
// tensors before this one (a prefix sum), so work item w belongs to the last tensor whose
// chunk_start <= w. decay is 1 for tensors with weight decay, 0 without; reserved is padding.
typedef struct {
    uint64_t p;
    uint64_t m;
    uint64_t v;
    uint64_t g;
    uint64_t p_bf16;
    int64_t n;
    int64_t chunk_start;
    int32_t decay;
    int32_t reserved;
} AdamWTensor;
// Elements per work item (one block-sized pass of several elements per thread) and threads per block.
#define KILN_ADAMW_CHUNK 4096
#define KILN_ADAMW_BLOCK 256

// ---- adamw8bit ----
// One parameter tensor in the multi-tensor 8-bit AdamW launch (kernels/adamw8bit.cu): device
// addresses of its f32 weights p and gradient g (n elements each) and of its moments. With
// bitsandbytes' blockwise 8-bit state (absmax1 non-zero), state1 and state2 are u8 codes of m into
// the signed dynamic map and of v into the unsigned one, with one f32 absmax each per block of
// KILN_ADAM8_BLOCK elements at absmax1 and absmax2. Without it (absmax1 = absmax2 = 0: tensors
// under bitsandbytes' min_8bit_size), state1 and state2 are m and v in f32. Every tensor is cut into
// blocks of KILN_ADAM8_BLOCK elements, one work item each; block_start is the number of blocks of
// the tensors before this one. decay is 1 for tensors with weight decay; reserved is padding.
typedef struct {
    uint64_t p;
    uint64_t g;
    uint64_t state1;
    uint64_t state2;
    uint64_t absmax1;
    uint64_t absmax2;
    int64_t n;
    int64_t block_start;
    int32_t decay;
    int32_t reserved;
} Adam8Tensor;
// Elements per quantization block and threads per block of the kernel (one element a thread).
#define KILN_ADAM8_BLOCK 256
// Floats of the kernel's table: the signed map (m), the unsigned map (v), then each map's 255
// midpoints padded to 256.
#define KILN_ADAM8_TABLES 1024

// ---- gemm ----
// Bits of the `flags` argument of the gemm_* kernels (kernels/gemm.cu) and of
// kiln_host_gemm_epilogue. Bias and the pre-activation are switched by passing a null pointer.
// OUT_F32: out (and pre) are f32; otherwise bf16, rounded to nearest-even.
// ACCUMULATE: out = out_old + product (cpu::gemm::matmul's `accumulate`).
// GELU: out = gelu(pre-activation).
#define KILN_GEMM_OUT_F32 1
#define KILN_GEMM_ACCUMULATE 2
#define KILN_GEMM_GELU 4
// Tile of the mma.sync kernels: a block of KILN_GEMM_THREADS threads computes a
// KILN_GEMM_BM x KILN_GEMM_BN tile of the output, stepping K by KILN_GEMM_BK.
#define KILN_GEMM_BM 128
#define KILN_GEMM_BN 128
#define KILN_GEMM_BK 32
#define KILN_GEMM_THREADS 256
// The small tile (gemm_mma_small_*), for products whose 128 x 128 grid would leave SMs idle.
#define KILN_GEMM_SMALL_BM 64
#define KILN_GEMM_SMALL_BN 64
#define KILN_GEMM_SMALL_THREADS 128
// The Hopper kernels (gemm_wgmma_*, sm_90a): KILN_GEMM_WGMMA_THREADS threads (a producer
// warpgroup and two consumer warpgroups) per block, persistent over KILN_GEMM_WGMMA_BM x
// KILN_GEMM_WGMMA_BN output tiles taken in groups of KILN_GEMM_WGMMA_GROUP tile rows, K stepped by
// KILN_GEMM_WGMMA_BK through KILN_GEMM_WGMMA_STAGES shared stages; KILN_GEMM_WGMMA_SMEM bytes of
// dynamic shared memory (the stages' 32 KB each, 1 KB to align them, the mbarriers).
#define KILN_GEMM_WGMMA_BM 128
#define KILN_GEMM_WGMMA_BN 128
#define KILN_GEMM_WGMMA_BK 64
#define KILN_GEMM_WGMMA_STAGES 4
#define KILN_GEMM_WGMMA_GROUP 8
#define KILN_GEMM_WGMMA_THREADS 384
#define KILN_GEMM_WGMMA_SMEM 132160
// Block of the naive kernel: KILN_GEMM_NAIVE_TILE x KILN_GEMM_NAIVE_TILE threads, one per output.
#define KILN_GEMM_NAIVE_TILE 16
// gemm_bias_backward_partial: a block of 32 x KILN_GEMM_BIAS_LANES threads sums 256 columns
// (8 per thread) over a group of KILN_GEMM_BIAS_GROUP rows, the row lanes interleaved.
#define KILN_GEMM_BIAS_LANES 4
#define KILN_GEMM_BIAS_GROUP 64
// The finish step of the column sums (colsum.cuh: gemm_bias_backward_finish,
// layernorm_backward_dwdb_finish, rmsnorm_backward_dw_finish): warps per block of 32 columns.
#define KILN_COLSUM_WARPS 8

// ---- attention ----
// Causal flash attention (kernels/attention.cu). A tile is 32 keys or 32 query rows (one per
// lane); a block is 4 warps of 8 rows each, so 4 x 8 = one tile of rows per block.
#define KILN_ATTN_TILE 32
#define KILN_ATTN_WARPS 4
#define KILN_ATTN_ROWS 8
// bf16 elements of padding after each row of a tile that lanes read row-per-lane (bank conflicts).
#define KILN_ATTN_PAD 8
// Head dims the kernels take: multiples of 8 up to this.
#define KILN_ATTN_MAX_HEAD_DIM 128
// Which kernel kiln_host_attention_smem_bytes sizes.
#define KILN_ATTN_KERNEL_FORWARD 0
#define KILN_ATTN_KERNEL_DKDV 1
#define KILN_ATTN_KERNEL_DQ 2
// The tensor-core forward (attention_forward_mma, sm_80+): 64 query rows per block (4 warps of 16,
// one mma.sync m16 row block each) against tiles of 64 keys, at head dim KILN_ATTN_MMA_HEAD_DIM
// and twice it (attention_mma_head_dim).
#define KILN_ATTN_KERNEL_FORWARD_MMA 3
#define KILN_ATTN_MMA_ROWS 64
#define KILN_ATTN_MMA_HEAD_DIM 64
// The tensor-core dQ (attention_backward_dq_mma, sm_80+): the forward's tiles, with dO beside Q.
#define KILN_ATTN_KERNEL_DQ_MMA 4
// The tensor-core dK/dV (attention_backward_dkdv_mma, sm_80+): 64 keys per block (16 per warp)
// against the same tiles of queries, with Q, dO and their rows' lse and D double-buffered.
#define KILN_ATTN_KERNEL_DKDV_MMA 5

// ---- layernorm ----
// Rows per block of the one-warp-per-row kernels (forward, residual forward, backward dx).
#define KILN_LN_WARPS 8
// Rows per block of those kernels (each warp takes every KILN_LN_WARPS-th): the weights a block
// stages in shared memory serve this many rows.
#define KILN_LN_BLOCK_ROWS 32
// Rows of at most this many columns (C % 8 == 0) stay in registers between a row kernel's walks
// (8 16-byte words a lane), and the weights are staged in shared memory once per block, so every
// byte is read from global memory once: SmolLM2 (576, 960, 2048) and GPT-2 (768, 1024, 1280, 1600).
#define KILN_LN_CACHE_C 2048
// dw/db: rows per partial-sum group, and columns (threads) per block of the partial/finish kernels.
#define KILN_LN_DW_ROWS 64
#define KILN_LN_DW_THREADS 256

// ---- rope ----
// Threads per block of rope_pack / rope_unpack (one block per row).
#define KILN_ROPE_THREADS 128

// ---- elementwise ----
// Threads per block of every elementwise kernel (each thread takes 8 elements per grid-stride step).
#define KILN_ELEMENTWISE_BLOCK 256

// ---- embedding ----
// Rows per block of the forward (one warp per row).
#define KILN_EMB_WARPS 8
// Columns (threads) per block of the backward kernels.
#define KILN_EMB_THREADS 256

// ---- xent ----
// Threads per block; one block per row of logits.
#define KILN_XENT_THREADS 256
// The target that marks a position without a label (PyTorch's ignore_index, cpu::xent::IGNORE).
#define KILN_XENT_IGNORE -100

// ---- reduce ----
// Threads per block of every reduce kernel (a power of two: the block sum is a halving tree).
#define KILN_REDUCE_THREADS 256
// Most blocks (partial sums) per buffer in reduce_sum_squares_partial; more elements are folded
// in by a grid-stride loop, so the partial count, and the bits, depend only on n.
#define KILN_REDUCE_MAX_BLOCKS 1024

// ---- nf4 ----
// Threads per block of nf4_dequantize (one thread per packed byte).
#define KILN_NF4_THREADS 256
