// selftest.cu: small kernels with faults that a launch argument switches on, for tests/emu.rs,
// which checks that the emulated device's memcheck and race check catch each one and say where
// (kernels/emu/README.md lists the checks). Nothing in the training path launches them. On a GPU
// the faulty variants are undefined behaviour that compute-sanitizer reports the same way
// (memcheck, racecheck, synccheck); the tests run them only on the emulated device.
//
// Test: cargo test --release --features cuda --test emu

// out[i] = x[i + 1 within the block, wrapping], through shared memory. With barrier = 0 the
// __syncthreads between writing s and reading a neighbour's slot is missing: a race.
extern "C" __global__ void __launch_bounds__(256) selftest_rotate(float* out, const float* x, int barrier) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    s[t] = x[i];
    if (barrier) __syncthreads();
    out[i] = s[(t + 1) % blockDim.x];
}

// out[i] = i for i < n + overrun: overrun > 0 stores past the end of an n-element buffer.
extern "C" __global__ void selftest_fill(int* out, int n, int overrun) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n + overrun) out[i] = i;
}

// The block's sum of x in out[blockIdx.x]. With split = 1 the upper half of the block waits at a
// second __syncthreads of its own: a barrier not reached by every thread.
extern "C" __global__ void __launch_bounds__(256) selftest_block_sum(float* out, const float* x, int split) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    if (split && t >= (int)blockDim.x / 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    if (t == 0) {
        float acc = 0.0f;
        for (int j = 0; j < (int)blockDim.x; ++j) acc += s[j];
        out[blockIdx.x] = acc;
    }
}
