// Host twins of kernels/embedding.cuh and of the embedding kernels' loops, compiled for the CPU
// (build.rs, -ffp-contract=off) so CI can compare them with src/backend/cpu/embedding.rs without a
// GPU. f32 tables; the backward takes the same bucket lists the wrapper uploads for the kernel,
// which checks the host-side bucketing (src/backend/cuda/embedding.rs) along with the sums.
#include "../embedding.cuh"
#include <math.h>

extern "C" void kiln_host_embedding_forward(float* out, const int32_t* ids, const float* wte, const float* wpe, int64_t rows, int64_t t, int64_t c, int64_t vocab) {
    for (int64_t r = 0; r < rows; r++) {
        const int32_t id = ids[r];
        for (int64_t i = 0; i < c; i++) {
            out[r * c + i] = emb_valid(id, (int)vocab) ? emb_add(wte[id * c + i], wpe[(r % t) * c + i]) : NAN;
        }
    }
}

// dwte rows named by the buckets are overwritten with their sums; other rows are left as they are
// (the caller zeroes the table first, as the wrapper does on the device).
extern "C" void kiln_host_embedding_backward_wte(float* dwte, const float* dout, const int32_t* bucket_ids, const int32_t* bucket_start, const int32_t* bucket_rows, int64_t n_buckets, int64_t c, int64_t vocab) {
    for (int64_t b = 0; b < n_buckets; b++) {
        const int32_t id = bucket_ids[b];
        if (!emb_valid(id, (int)vocab)) continue;
        for (int64_t col = 0; col < c; col++) {
            float s = 0.0f;
            for (int32_t k = bucket_start[b]; k < bucket_start[b + 1]; k++) s = emb_add(s, dout[(int64_t)bucket_rows[k] * c + col]);
            dwte[id * c + col] = s;
        }
    }
}

extern "C" void kiln_host_embedding_backward_wpe(float* dwpe, const float* dout, int64_t rows, int64_t t, int64_t c) {
    for (int64_t e = 0; e < t * c; e++) {
        const int64_t pos = e / c;
        float s = 0.0f;
        for (int64_t r = pos; r < rows; r += t) s = emb_add(s, dout[r * c + e - pos * c]);
        dwpe[e] = s;
    }
}
