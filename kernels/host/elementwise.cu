// Host twins of kernels/elementwise.cuh: the device math compiled for the CPU (build.rs, with
// -ffp-contract=off) so CI can compare it with src/backend/cpu/elementwise.rs without a GPU.
#include "../elementwise.cuh"

extern "C" void kiln_host_gelu(float* out, const float* in, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = kiln_gelu(in[i]);
}

extern "C" void kiln_host_gelu_grad(float* out, const float* in, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = kiln_gelu_grad(in[i]);
}

// dinp = dout * gelu'(inp), in the kernel's order.
extern "C" void kiln_host_gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n) {
    for (int64_t i = 0; i < n; i++) dinp[i] = kiln_mul_rn(dout[i], kiln_gelu_grad(inp[i]));
}

// mask[i] = keep(seed, first + i, p): `first` lets a test cover indices past 2^32 cheaply.
extern "C" void kiln_host_dropout_mask(uint8_t* mask, uint64_t seed, float p, uint64_t first, int64_t n) {
    for (int64_t i = 0; i < n; i++) mask[i] = kiln_dropout_keep(seed, first + (uint64_t)i, p) ? 1 : 0;
}
