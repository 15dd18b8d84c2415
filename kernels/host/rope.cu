// Host twins of kernels/rope.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare them with src/backend/cpu/rope.rs without a GPU. Arrays are f32; cs is the kernels'
// table [positions, hd] (cos of pair i at [p, i], sin at [p, hd/2 + i]).
#include "../rope.cuh"

// One head vector rotated by position p's angles (inverse: by their negatives).
static void rotate(float* y, const float* x, const float* cs, int64_t hd, bool inverse) {
    const int64_t h2 = hd / 2;
    for (int64_t i = 0; i < h2; i++) {
        const float c = cs[i], s = inverse ? -cs[h2 + i] : cs[h2 + i];
        y[i] = rope_lo(x[i], x[i + h2], c, s);
        y[i + h2] = rope_hi(x[i], x[i + h2], c, s);
    }
}

extern "C" void kiln_host_rope_pack(float* qkv, const float* q, const float* k, const float* v, const float* cs, int64_t rows, int64_t t, int64_t offset, int64_t hd, int64_t nh, int64_t nkv) {
    const int64_t w = (nh + 2 * nkv) * hd;
    for (int64_t r = 0; r < rows; r++) {
        const float* c = cs + (offset + r % t) * hd;
        float* out = qkv + r * w;
        for (int64_t h = 0; h < nh; h++) rotate(out + h * hd, q + (r * nh + h) * hd, c, hd, false);
        for (int64_t h = 0; h < nkv; h++) rotate(out + (nh + h) * hd, k + (r * nkv + h) * hd, c, hd, false);
        for (int64_t j = 0; j < nkv * hd; j++) out[(nh + nkv) * hd + j] = v[r * nkv * hd + j];
    }
}

extern "C" void kiln_host_rope_unpack(float* dq, float* dk, float* dv, const float* dqkv, const float* cs, int64_t rows, int64_t t, int64_t offset, int64_t hd, int64_t nh, int64_t nkv) {
    const int64_t w = (nh + 2 * nkv) * hd;
    for (int64_t r = 0; r < rows; r++) {
        const float* c = cs + (offset + r % t) * hd;
        const float* g = dqkv + r * w;
        for (int64_t h = 0; h < nh; h++) rotate(dq + (r * nh + h) * hd, g + h * hd, c, hd, true);
        for (int64_t h = 0; h < nkv; h++) rotate(dk + (r * nkv + h) * hd, g + (nh + h) * hd, c, hd, true);
        for (int64_t j = 0; j < nkv * hd; j++) dv[r * nkv * hd + j] = g[(nh + nkv) * hd + j];
    }
}
