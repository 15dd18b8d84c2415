// Host twins of kernels/xent.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare the online log-sum-exp and the gradient formula with src/backend/cpu/xent.rs without a
// GPU. f32 logits; targets as the CPU takes them (KILN_XENT_IGNORE marks a position without one).
#include "../xent.cuh"

// Forward over `lanes` simulated lanes: lane j folds elements j, j + lanes, ... into its own
// (max, sum) pair one at a time (xent_online_add), then the pairs merge in lane order
// (xent_online_merge). lanes = 1 is the plain online recurrence; lanes = 256 is the block's shape.
// lanes is clamped to [1, 1024] (no heap, so the twins need no C++ runtime).
extern "C" void kiln_host_xent_forward(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t rows, int64_t v, int32_t lanes) {
    float m[1024], s[1024];
    lanes = lanes < 1 ? 1 : lanes > 1024 ? 1024 : lanes;
    for (int64_t r = 0; r < rows; r++) {
        const float* z = logits + r * v;
        for (int j = 0; j < lanes; j++) {
            m[j] = -INFINITY;
            s[j] = 0.0f;
        }
        for (int64_t i = 0; i < v; i++) xent_online_add(m[i % lanes], s[i % lanes], z[i]);
        float M = m[0], S = s[0];
        for (int j = 1; j < lanes; j++) xent_online_merge(M, S, m[j], s[j]);
        lse[r] = xent_lse(M, S);
        const int32_t t = targets[r];
        losses[r] = t == KILN_XENT_IGNORE ? 0.0f : (t >= 0 && t < v ? lse[r] - z[t] : NAN);
    }
}

// dlogits = (softmax - onehot) * scale from the saved lse; zero rows where the target is ignored.
extern "C" void kiln_host_xent_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets, int64_t rows, int64_t v, float scale) {
    for (int64_t r = 0; r < rows; r++) {
        const int32_t t = targets[r];
        for (int64_t i = 0; i < v; i++) {
            dlogits[r * v + i] = t == KILN_XENT_IGNORE ? 0.0f : xent_grad(logits[r * v + i], lse[r], scale, i == t);
        }
    }
}
