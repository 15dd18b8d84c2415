// host/attention.cu: host twins of the attention math in attention.cuh, linked into kiln under
// feature `cuda` and tested against src/backend/cpu/attention.rs by tests/attention.rs (no GPU
// needed): cargo test --release --features cuda --test attention
#include "common.cuh"
#include "attention.cuh"

// One online-softmax step: folds n scores s (values v [n][hd]) into *m, *l and acc [hd].
extern "C" void kiln_host_attention_online_softmax_update(float* m, float* l, float* acc, const float* s,
                                                          const float* v, int32_t n, int32_t hd) {
    attention_online_softmax_update(m, l, acc, s, v, n, hd);
}

// The log-sum-exp the forward stores for each row: lse[i] = m[i] + log(l[i]).
extern "C" void kiln_host_attention_lse(float* lse, const float* m, const float* l, int64_t n) {
    for (int64_t i = 0; i < n; ++i) lse[i] = attention_lse(m[i], l[i]);
}

// The backward's recomputed probability p[i] = exp(s[i] - lse[i]) for already scaled scores.
extern "C" void kiln_host_attention_prob(float* p, const float* s, const float* lse, int64_t n) {
    for (int64_t i = 0; i < n; ++i) p[i] = attention_prob(s[i], lse[i]);
}

// dS elementwise: ds[i] = p[i] * (dp[i] - d[i]) (before the 1/sqrt(hd) scale).
extern "C" void kiln_host_attention_dscore(float* ds, const float* p, const float* dp, const float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) ds[i] = attention_dscore(p[i], dp[i], d[i]);
}

// Bytes of dynamic shared memory kernel `kernel` (KILN_ATTN_KERNEL_*) needs at head dim hd, or -1
// for an unknown kernel. The launch wrappers size their launches with this.
extern "C" int32_t kiln_host_attention_smem_bytes(int32_t kernel, int32_t hd) { return attention_smem_bytes(kernel, hd); }
