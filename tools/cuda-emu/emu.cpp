// Runs kernels/attention.cu on the CPU under the emulator (emu.h) and checks it against an f64
// reference: see README.md for how to build and run.
#include "emu.h"
namespace { alignas(16) unsigned char smem[256 * 1024]; }
#include "attention.cu"
#include <random>
#include <functional>
thread_local Idx threadIdx, blockIdx;
Idx blockDim, gridDim;
std::barrier<>* g_block_bar;
Warp g_warps[32];
thread_local std::vector<EmuCopy> g_cp_open;
thread_local std::vector<std::vector<EmuCopy>> g_cp_groups;

// One block at a time, one OS thread per CUDA thread. Shared memory starts as 0x7f garbage, and
// the 64 KB past `limit` (the launch's dynamic shared memory) must stay untouched.
static void launch(Idx grid, int threads, std::function<void()> k, int limit) {
    gridDim = grid; blockDim = {(unsigned)threads, 1, 1};
    std::barrier<> bb(threads); g_block_bar = &bb;
    std::vector<std::barrier<>*> wb;
    for (int w = 0; w < threads / 32; ++w) { wb.push_back(new std::barrier<>(32)); g_warps[w].bar = wb.back(); }
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
        memset(smem, 0x7f, sizeof smem);  // garbage (large floats), not zeros
        std::vector<std::thread> th;
        for (int t = 0; t < threads; ++t) th.emplace_back([=] {
            threadIdx = {(unsigned)t, 0, 0}; blockIdx = {x, y, z};
            g_cp_open.clear(); g_cp_groups.clear();
            k();
            if (!g_cp_open.empty() || !g_cp_groups.empty()) { printf("thread %d exits with cp.async copies not waited for\n", t); exit(3); }
        });
        for (auto& t : th) t.join();
        for (int i = limit; i < limit + 65536; ++i) if (smem[i] != 0x7f) { printf("smem overflow at %d (limit %d)\n", i, limit); exit(3); }
    }
    for (auto* b : wb) delete b;
}

static float bfr(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
static uint16_t bits(float x) { __nv_bfloat16 h = __float2bfloat16_rn(x); uint16_t u; memcpy(&u, &h, 2); return u; }
static uint32_t pk(float lo, float hi) { return bits(lo) | ((uint32_t)bits(hi) << 16); }

// The emulated mma.sync against a plain matrix product on random data. The lanes build their
// fragments the way the kernel does (register by register: a[0] = A[g][2t, 2t+1], ...), the
// emulator decodes them element by element from the PTX ISA's formulas; D must equal A B + C.
static int check_mma() {
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> U(-2, 2);
    double worst = 0;
    for (int rep = 0; rep < 20; ++rep) {
        float A[16][16], B[16][8], Cm[16][8], D[16][8];
        for (auto& r : A) for (auto& x : r) x = bfr(U(rng));
        for (auto& r : B) for (auto& x : r) x = bfr(U(rng));
        for (auto& r : Cm) for (auto& x : r) x = U(rng);
        for (auto& r : D) for (auto& x : r) x = NAN;
        launch({1, 1, 1}, 32, [&] {
            const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
            const uint32_t a[4] = {pk(A[g][2 * t], A[g][2 * t + 1]), pk(A[g + 8][2 * t], A[g + 8][2 * t + 1]),
                                   pk(A[g][2 * t + 8], A[g][2 * t + 9]), pk(A[g + 8][2 * t + 8], A[g + 8][2 * t + 9])};
            const uint32_t b[2] = {pk(B[2 * t][g], B[2 * t + 1][g]), pk(B[2 * t + 8][g], B[2 * t + 9][g])};
            float d[4] = {Cm[g][2 * t], Cm[g][2 * t + 1], Cm[g + 8][2 * t], Cm[g + 8][2 * t + 1]};
            kiln_emu_mma_m16n8k16_bf16(d, a, b);
            D[g][2 * t] = d[0]; D[g][2 * t + 1] = d[1]; D[g + 8][2 * t] = d[2]; D[g + 8][2 * t + 1] = d[3];
        }, 0);
        for (int i = 0; i < 16; ++i) for (int j = 0; j < 8; ++j) {
            double s = Cm[i][j];
            for (int k = 0; k < 16; ++k) s += (double)A[i][k] * B[k][j];
            const double e = std::isnan(D[i][j]) ? INFINITY : fabs(D[i][j] - s);
            worst = std::max(worst, e / std::max(1.0, fabs(s)));
        }
    }
    const bool ok = worst <= 1e-6;
    printf("mma.sync m16n8k16 emulation vs plain product (20 random 16x16x8): max rel err %.2e %s\n", worst, ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}

// One shape: forward (the SIMT kernel, or the tensor-core one with mma = true) then the backward
// from its out and lse, all against an f64 reference. Tolerances: out as tests/attention.rs does
// (2x the plain bf16 implementation's error + 1/256 of max|out|), lse 256 f32 ulps of (1 + max|lse|),
// the backward 2/256 of each gradient's max (as before).
int run(int B, int T, int NH, int hd, unsigned seed, bool mma) {
    const int C = NH * hd;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> U(-1, 1);
    std::vector<__nv_bfloat16> qkv(B * T * 3 * C), dout(B * T * C);
    for (auto& x : qkv) x = __float2bfloat16_rn(2 * U(rng));
    for (auto& x : dout) x = __float2bfloat16_rn(U(rng));
    const __nv_bfloat16 nanb = __float2bfloat16_rn(NAN);
    std::vector<__nv_bfloat16> out(B * T * C, nanb), dqkv(B * T * 3 * C, nanb);
    std::vector<float> lse(B * NH * T, NAN), dsum(B * NH * T, NAN);
    const int tiles = (T + 31) / 32;
    if (mma) {
        const int mt = (T + KILN_ATTN_MMA_ROWS - 1) / KILN_ATTN_MMA_ROWS;
        launch({(unsigned)mt, (unsigned)NH, (unsigned)B}, 128, [&] { attention_forward_mma(out.data(), lse.data(), qkv.data(), B, T, C, NH); }, attention_smem_bytes(KILN_ATTN_KERNEL_FORWARD_MMA, hd));
    } else {
        launch({(unsigned)tiles, (unsigned)NH, (unsigned)B}, 128, [&] { attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH); }, attention_smem_bytes(0, hd));
    }
    launch({(unsigned)((B * T * NH + 3) / 4), 1, 1}, 128, [&] { attention_backward_preprocess(dsum.data(), dout.data(), out.data(), B, T, C, NH); }, 0);
    launch({(unsigned)tiles, (unsigned)NH, (unsigned)B}, 128, [&] { attention_backward_dkdv(dqkv.data(), dout.data(), qkv.data(), lse.data(), dsum.data(), B, T, C, NH); }, attention_smem_bytes(1, hd));
    launch({(unsigned)tiles, (unsigned)NH, (unsigned)B}, 128, [&] { attention_backward_dq(dqkv.data(), dout.data(), qkv.data(), lse.data(), dsum.data(), B, T, C, NH); }, attention_smem_bytes(2, hd));
    // f64 reference, and the plain bf16 forward of tests/attention.rs (f32 scores and softmax,
    // normalised P rounded to bf16, f32 sums, output rounded to bf16).
    auto Q = [&](int b, int t, int p, int h, int d) { return (double)__bfloat162float(qkv[((size_t)(b * T + t)) * 3 * C + p * C + h * hd + d]); };
    auto G = [&](int b, int t, int h, int d) { return (double)__bfloat162float(dout[((size_t)(b * T + t)) * C + h * hd + d]); };
    double scale = 1.0 / sqrt((double)hd);
    double eo = 0, ep = 0, el = 0, ml = 0, eg[3] = {0, 0, 0}, mo = 0, mg[3] = {0, 0, 0};
    std::vector<double> ref_dqkv(B * T * 3 * C, 0.0);
    bool nan = false;
    for (int b = 0; b < B; ++b) for (int h = 0; h < NH; ++h) {
        std::vector<double> P(T * T, 0.0), O(T * hd, 0.0);
        for (int i = 0; i < T; ++i) {
            std::vector<double> s(i + 1); double m = -1e300;
            std::vector<float> sf(i + 1); float mf = -INFINITY;
            for (int j = 0; j <= i; ++j) {
                double a = 0; float af = 0;
                for (int d = 0; d < hd; ++d) { a += Q(b, i, 0, h, d) * Q(b, j, 1, h, d); af += (float)Q(b, i, 0, h, d) * (float)Q(b, j, 1, h, d); }
                s[j] = a * scale; m = std::max(m, s[j]);
                sf[j] = af * (float)(1.0f / sqrtf((float)hd)); mf = std::max(mf, sf[j]);
            }
            double l = 0; for (int j = 0; j <= i; ++j) l += exp(s[j] - m);
            float lf = 0; for (int j = 0; j <= i; ++j) { sf[j] = expf(sf[j] - mf); lf += sf[j]; }
            double L = m + log(l);
            for (int j = 0; j <= i; ++j) P[i * T + j] = exp(s[j] - L);
            float lk = lse[(b * NH + h) * T + i]; if (std::isnan(lk)) nan = true;
            el = std::max(el, fabs(lk - L)); ml = std::max(ml, fabs(L));
            for (int d = 0; d < hd; ++d) {
                double o = 0; float of = 0;
                for (int j = 0; j <= i; ++j) { o += P[i * T + j] * Q(b, j, 2, h, d); of += bfr(sf[j] / lf) * (float)Q(b, j, 2, h, d); }
                O[i * hd + d] = o;
                float ok = __bfloat162float(out[((size_t)(b * T + i)) * C + h * hd + d]); if (std::isnan(ok)) nan = true;
                eo = std::max(eo, fabs(ok - o)); mo = std::max(mo, fabs(o));
                ep = std::max(ep, fabs(bfr(of) - o));
            }
        }
        for (int i = 0; i < T; ++i) {
            double D = 0; for (int d = 0; d < hd; ++d) D += G(b, i, h, d) * O[i * hd + d];
            for (int j = 0; j <= i; ++j) {
                double p = P[i * T + j], dp = 0;
                for (int d = 0; d < hd; ++d) dp += G(b, i, h, d) * Q(b, j, 2, h, d);
                double ds = p * (dp - D) * scale;
                for (int d = 0; d < hd; ++d) {
                    ref_dqkv[((size_t)(b * T + i)) * 3 * C + h * hd + d] += ds * Q(b, j, 1, h, d);
                    ref_dqkv[((size_t)(b * T + j)) * 3 * C + C + h * hd + d] += ds * Q(b, i, 0, h, d);
                    ref_dqkv[((size_t)(b * T + j)) * 3 * C + 2 * C + h * hd + d] += p * G(b, i, h, d);
                }
            }
        }
    }
    for (size_t k = 0; k < ref_dqkv.size(); ++k) {
        int p = (k % (3 * C)) / C;
        float g = __bfloat162float(dqkv[k]); if (std::isnan(g)) nan = true;
        eg[p] = std::max(eg[p], fabs(g - ref_dqkv[k])); mg[p] = std::max(mg[p], fabs(ref_dqkv[k]));
    }
    const double out_bound = 2 * ep + mo / 256, lse_bound = 256 * 5.96e-8 * (1 + ml);
    printf("%s B=%d T=%d NH=%d hd=%d: out err %.2e (plain bf16 %.2e, bound %.2e)  lse err %.2e (bound %.2e)  dq %.2e/%.2f  dk %.2e/%.2f  dv %.2e/%.2f  nan=%d\n",
           mma ? "mma " : "simt", B, T, NH, hd, eo, ep, out_bound, el, lse_bound, eg[0], mg[0], eg[1], mg[1], eg[2], mg[2], nan);
    bool ok = !nan && eo <= out_bound && el <= lse_bound && eg[0] <= 2 * mg[0] / 256 + 1e-6 && eg[1] <= 2 * mg[1] / 256 + 1e-6 && eg[2] <= 2 * mg[2] / 256 + 1e-6;
    return ok ? 0 : 1;
}

// ./emu: the mma unit check, then both forwards at GPT-2's head dim and the SIMT kernels at the
// other head dims. ./emu big adds T = 1025 (slow: minutes).
int main(int argc, char** argv) {
    int bad = check_mma();
    const int shapes64[][3] = {{1, 1, 1}, {2, 7, 3}, {1, 97, 2}, {2, 64, 12}, {1, 130, 1}};
    unsigned seed = 1;
    for (auto& s : shapes64) for (bool mma : {true, false}) bad += run(s[0], s[1], s[2], 64, seed++, mma);
    bad += run(2, 33, 1, 128, 4, false);
    bad += run(1, 45, 2, 40, 5, false);
    bad += run(2, 64, 2, 32, 6, false);
    bad += run(1, 70, 1, 96, 7, false);
    if (argc > 1) for (bool mma : {true, false}) bad += run(1, 1025, 2, 64, 8, mma);
    printf(bad ? "FAIL %d\n" : "ALL OK\n", bad);
    return bad;
}
