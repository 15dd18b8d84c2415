// embedding.cu: token + position embedding. Forward out[b, t, :] = wte[ids[b, t]] + wpe[t] (bf16
// tables and output, f32 add); backward dwte[id] = sum of dout rows whose token is id, dwpe[t] =
// sum over the batch of dout[b, t] (f32, overwritten). CPU twin: src/backend/cpu/embedding.rs
// (embedding_forward, embedding_backward).
//
// Kernels and work split:
// - embedding_forward: one warp per output row, KILN_EMB_WARPS rows per block; 16-byte accesses
//   (8 bf16) when C % 8 == 0 and every pointer is 16-byte aligned, else one bf16 per lane per step.
//   A token id outside [0, vocab) is never dereferenced: its row is written as NaN, so a bad id
//   that slipped past the op's check (the op errors before launching) shows in the loss. A null
//   wpe means token rows alone (rotary models, whose positions enter in the attention): the row
//   is copied bit for bit, as the CPU copies it.
// - embedding_backward_wte: deterministic without atomics and without a device sort. The host
//   (src/backend/cuda/embedding.rs, Buckets) groups the token rows by id once per step: the
//   distinct ids, and for each the rows holding it in ascending order (a sort of rows pairs on
//   the host, O(rows log rows), ~0.2 ms for GPT-2's 8192 tokens, plus three small uploads). The
//   grid is (distinct ids, column stripes of KILN_EMB_THREADS); a thread owns one column of one
//   id's row of dwte and adds that id's dout rows in ascending order, the CPU's order, then
//   stores. Rows of dwte whose id is absent from the batch are zeroed by a memset in the wrapper
//   (the CPU also overwrites the whole table). Cost: the memset of V * C floats dominates
//   (154 MB for GPT-2, ~40 us at H200 bandwidth); the sums read each dout element once. Load
//   imbalance: a frequent token's block walks all its rows (hundreds for "the" or "\n"), with
//   independent loads unrolled so several are in flight. Ids outside [0, vocab) are dropped from
//   the buckets (and the kernel checks again), so nothing is written out of bounds.
// - embedding_backward_wpe: one thread per (position, column), summing rows pos, pos + T, ... in
//   order (the CPU's order). Rows need not be a multiple of T (the CPU takes pos = row % T).
//
// Test: cargo test --release --features cuda --test embedding
#include "embedding.cuh"
#include "vec.cuh"

extern "C" __global__ void __launch_bounds__(KILN_EMB_WARPS * 32) embedding_forward(__nv_bfloat16* out, const int32_t* ids, const __nv_bfloat16* wte, const __nv_bfloat16* wpe, int rows, int t, int c, int vocab) {
    const int row = blockIdx.x * KILN_EMB_WARPS + (int)(threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const int32_t id = ids[row];
    __nv_bfloat16* o = out + (int64_t)row * c;
    if (!emb_valid(id, vocab)) {
        for (int i = lane; i < c; i += 32) o[i] = __float2bfloat16_rn(NAN);
        return;
    }
    const __nv_bfloat16* te = wte + (int64_t)id * c;
    if (wpe == nullptr) {
        if (c % 8 == 0 && aligned16(out) && aligned16(wte)) {
            for (int i = 8 * lane; i < c; i += 256) *reinterpret_cast<uint4*>(o + i) = *reinterpret_cast<const uint4*>(te + i);
        } else {
            for (int i = lane; i < c; i += 32) o[i] = te[i];
        }
        return;
    }
    const __nv_bfloat16* pe = wpe + (int64_t)(row % t) * c;
    if (c % 8 == 0 && aligned16(out) && aligned16(wte) && aligned16(wpe)) {
        for (int i = 8 * lane; i < c; i += 256) {
            float a[8], b[8];
            load8(a, te + i);
            load8(b, pe + i);
#pragma unroll
            for (int j = 0; j < 8; j++) a[j] = emb_add(a[j], b[j]);
            store8(o + i, a);
        }
    } else {
        for (int i = lane; i < c; i += 32) o[i] = __float2bfloat16_rn(emb_add(__bfloat162float(te[i]), __bfloat162float(pe[i])));
    }
}

// Grid (n_buckets, ceil(C / KILN_EMB_THREADS)). Bucket b is token id bucket_ids[b], found at the
// rows bucket_rows[bucket_start[b] .. bucket_start[b + 1]) (ascending). dwte's other rows are
// left as they are (the wrapper zeroes the table first).
extern "C" __global__ void __launch_bounds__(KILN_EMB_THREADS) embedding_backward_wte(float* dwte, const __nv_bfloat16* dout, const int32_t* bucket_ids, const int32_t* bucket_start, const int32_t* bucket_rows, int c, int vocab) {
    const int col = blockIdx.y * KILN_EMB_THREADS + threadIdx.x;
    if (col >= c) return;
    const int b = blockIdx.x;
    const int32_t id = bucket_ids[b];
    if (!emb_valid(id, vocab)) return;
    const int k0 = bucket_start[b], k1 = bucket_start[b + 1];
    float s = 0.0f;
#pragma unroll 4
    for (int k = k0; k < k1; k++) s = emb_add(s, __bfloat162float(dout[(int64_t)bucket_rows[k] * c + col]));
    dwte[(int64_t)id * c + col] = s;
}

// One thread per element of dwpe [T, C]: the sum over rows pos, pos + T, ... < rows, in order.
extern "C" __global__ void __launch_bounds__(KILN_EMB_THREADS) embedding_backward_wpe(float* dwpe, const __nv_bfloat16* dout, int rows, int t, int c) {
    const int64_t e = (int64_t)blockIdx.x * KILN_EMB_THREADS + threadIdx.x;
    if (e >= (int64_t)t * c) return;
    const int pos = (int)(e / c);
    float s = 0.0f;
    for (int r = pos; r < rows; r += t) s = emb_add(s, __bfloat162float(dout[(int64_t)r * c + (e - (int64_t)pos * c)]));
    dwpe[e] = s;
}
