// Runs the memory-bound kernels (kernels/layernorm.cu, xent.cu, embedding.cu, reduce.cu,
// elementwise.cu, adamw.cu) on the CPU under the emulator (emu.h) and checks them against plain
// C++ references that mirror src/backend/cpu/<family>.rs (f64 where the kernel is only meant to be
// close, the CPU's own f32 operation order where the kernel claims the CPU's bits). Launch
// configurations are the wrappers' (src/backend/cuda/<family>.rs); grid-stride kernels also run on
// a 1- and 2-block grid (what the SM cap gives a large tensor). Outputs are NaN-poisoned before
// every launch; pointers are tried 16-byte aligned and off by one element (the scalar paths).
// See README.md for how to build and run.
#include "emu.h"
namespace { alignas(16) unsigned char smem[16]; }
// Static __shared__ arrays (reduce.cu, xent.cu) become function-local statics: one array for
// all the emulated threads of the block (blocks run one after another).
#undef __shared__
#define __shared__ static
#include <math.h>
#include "common.cuh"
#include "vec.cuh"
#include <random>
#include <functional>
#include <map>
#include <string>
// Each family in its own namespace: the files share helper names in anonymous namespaces.
// adamw.cu goes with elementwise.cu (adamw.cuh includes elementwise.cuh once).
namespace ln {
#include "layernorm.cu"
}
namespace xe {
#include "xent.cu"
}
namespace em {
#include "embedding.cu"
}
namespace rd {
#include "reduce.cu"
}
namespace ew {
#include "elementwise.cu"
#include "adamw.cu"
}

thread_local Idx threadIdx, blockIdx;
Idx blockDim, gridDim;
std::barrier<>* g_block_bar;
Warp g_warps[32];
thread_local std::vector<EmuCopy> g_cp_open;
thread_local std::vector<std::vector<EmuCopy>> g_cp_groups;

// One block at a time, one OS thread per CUDA thread. A thread that returns drops out of the block
// and warp barriers (exited threads do not hold up bar.sync), after poisoning its shuffle slot, so
// a shuffle that reads a lane which already left reads NaN.
static void launch(Idx grid, int threads, const std::function<void()>& k) {
    gridDim = grid; blockDim = {(unsigned)threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bb(threads); g_block_bar = &bb;
        std::vector<std::barrier<>*> wb;
        for (int w = 0; w < (threads + 31) / 32; ++w) { wb.push_back(new std::barrier<>(std::min(32, threads - 32 * w))); g_warps[w].bar = wb.back(); }
        std::vector<std::thread> th;
        th.reserve(threads);
        for (int t = 0; t < threads; ++t) th.emplace_back([=, &k] {
            threadIdx = {(unsigned)t, 0, 0}; blockIdx = {x, y, z};
            k();
            g_warps[t / 32].ex[t % 32] = NAN;
            g_warps[t / 32].bar->arrive_and_drop();
            g_block_bar->arrive_and_drop();
        });
        for (auto& t : th) t.join();
        for (auto* b : wb) delete b;
    }
}

// ---- buffers: 64-byte aligned storage, the data at element offset `off` (off = 1 misaligns) ----
template <typename T>
struct Buf {
    std::vector<unsigned char> raw;
    T* p;
    size_t n;
    Buf(size_t n_, int off = 0) : raw((n_ + 64) * sizeof(T) + 128), n(n_) {
        uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63);
        p = reinterpret_cast<T*>(a) + off;
    }
    T& operator[](size_t i) { return p[i]; }
    const T& operator[](size_t i) const { return p[i]; }
};
using bf = __nv_bfloat16;
static float f(bf h) { return __bfloat162float(h); }
static bf b16(float x) { return __float2bfloat16_rn(x); }
static float bfr(float x) { return f(b16(x)); }
static uint32_t fbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
template <typename T> static void poison(Buf<T>& b) { for (size_t i = 0; i < b.n; ++i) b[i] = (T)NAN; }
static void poison(Buf<bf>& b) { for (size_t i = 0; i < b.n; ++i) b[i] = b16(NAN); }

// A bf16 output against an exact (f64) value: the error in bf16 ulps of max(|ref|, floor). A
// kernel whose f32 value is close rounds to within 0.5 ulp; 1 allows a rounding flip. NaN: inf.
static double ulps(float got, double ref, double floor) {
    if (std::isnan(got) || std::isnan(ref)) return INFINITY;
    double a = std::max(fabs(ref), floor);
    int e; frexp(a, &e);  // a in [2^(e-1), 2^e): bf16 ulp 2^(e-1-7)
    return fabs(got - ref) / ldexp(1.0, e - 8);
}
// An f32 output against an exact value: relative to scale.
static double rel(double got, double ref, double scale) {
    if (std::isnan(got) || std::isnan(ref)) return INFINITY;
    return fabs(got - ref) / std::max(scale, 1e-30);
}

static int g_fail = 0;
static void report(const std::string& name, const char* what, double err, double tol) {
    const bool ok = err <= tol;
    if (!ok) ++g_fail;
    printf("  %-52s %-10s max err %.3g (tol %.3g) %s\n", name.c_str(), what, err, tol, ok ? "ok" : "FAIL");
}
static std::mt19937 rng(1234);
static float U(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

// ============================== layernorm ==============================
// CPU: src/backend/cpu/layernorm.rs. Reference in f64 from the bf16 inputs.
static void test_layernorm(int rows, int c, int off) {
    const std::string tag = "layernorm rows " + std::to_string(rows) + " C " + std::to_string(c) + (off ? " misaligned" : "");
    const float eps = 1e-5f;
    const size_t n = (size_t)rows * c;
    Buf<bf> x(n, off), a(n, off), r(n, off), w(c, off), bb(c, off), dout(n, off), out(n, off), h(n, off), dx(n, off);
    Buf<float> mean(rows), rstd(rows);
    for (size_t i = 0; i < n; ++i) { a[i] = b16(U(-2, 2) + 0.5f); r[i] = b16(U(-1, 1)); dout[i] = b16(U(-1, 1)); x[i] = b16(U(-3, 3) + 1.0f); }
    for (int i = 0; i < c; ++i) { w[i] = b16(U(0.5f, 1.5f)); bb[i] = b16(U(-0.5f, 0.5f)); }
    const unsigned grid = (unsigned)std::max(1, (rows + KILN_LN_WARPS - 1) / KILN_LN_WARPS);
    for (int residual = 0; residual < 2; ++residual) {
        poison(out); poison(mean); poison(rstd); poison(h);
        if (residual)
            launch({grid, 1, 1}, 32 * KILN_LN_WARPS, [&] { ln::layernorm_residual_forward(h.p, out.p, mean.p, rstd.p, a.p, r.p, w.p, bb.p, rows, c, eps); });
        else
            launch({grid, 1, 1}, 32 * KILN_LN_WARPS, [&] { ln::layernorm_forward(out.p, mean.p, rstd.p, x.p, w.p, bb.p, rows, c, eps); });
        double eo = 0, em = 0, er = 0, eh = 0;
        for (int row = 0; row < rows; ++row) {
            std::vector<double> xv(c);
            for (int i = 0; i < c; ++i) {
                if (residual) {
                    const float hv = bfr(f(a[row * c + i]) + f(r[row * c + i]));  // the CPU's f32 add, rounded to bf16
                    eh = std::max(eh, fbits(f(h[row * c + i])) == fbits(hv) ? 0.0 : INFINITY);
                    xv[i] = hv;
                } else xv[i] = f(x[row * c + i]);
            }
            double s = 0; for (double v : xv) s += v;
            const double mu = s / c;
            double q = 0; for (double v : xv) q += (v - mu) * (v - mu);
            const double rs = 1.0 / sqrt(q / c + eps);
            em = std::max(em, rel(mean[row], mu, 1e-6 * (fabs(mu) + 1)));
            er = std::max(er, rel(rstd[row], rs, 1e-6 * rs));
            for (int i = 0; i < c; ++i) {
                const double y = (xv[i] - mu) * rs * f(w[i]) + f(bb[i]);
                eo = std::max(eo, ulps(f(out[row * c + i]), y, 1e-3));
            }
        }
        const std::string t2 = tag + (residual ? " residual fwd" : " forward");
        report(t2, "out ulps", eo, 1.0);
        report(t2, "mean 1e-6", em, 2.0);
        report(t2, "rstd 1e-6", er, 2.0);
        if (residual) report(t2, "h bits", eh, 0.0);
    }
    // backward from the kernel's forward stats of x (mean/rstd as the CPU would save them)
    poison(out); poison(mean); poison(rstd);
    launch({grid, 1, 1}, 32 * KILN_LN_WARPS, [&] { ln::layernorm_forward(out.p, mean.p, rstd.p, x.p, w.p, bb.p, rows, c, eps); });
    poison(dx);
    launch({grid, 1, 1}, 32 * KILN_LN_WARPS, [&] { ln::layernorm_backward_dx(dx.p, dout.p, x.p, w.p, mean.p, rstd.p, rows, c); });
    const int groups = (rows + KILN_LN_DW_ROWS - 1) / KILN_LN_DW_ROWS;
    const int stripes = (c + KILN_LN_DW_THREADS - 1) / KILN_LN_DW_THREADS;
    Buf<float> partial(std::max(1, groups * 2 * c)), dw(c), db(c);
    double edx = 0, edw = 0, edb = 0;
    for (int which = 0; which < 3; ++which) {  // both, dw only, db only (a null output)
        poison(partial); poison(dw); poison(db);
        if (groups > 0) launch({(unsigned)groups, (unsigned)stripes, 1}, KILN_LN_DW_THREADS, [&] { ln::layernorm_backward_dwdb_partial(partial.p, dout.p, x.p, mean.p, rstd.p, rows, c); });
        float* pw = which == 2 ? nullptr : dw.p;
        float* pb = which == 1 ? nullptr : db.p;
        launch({(unsigned)stripes, 1, 1}, KILN_LN_DW_THREADS, [&] { ln::layernorm_backward_dwdb_finish(pw, pb, partial.p, groups, c); });
        for (int i = 0; i < c; ++i) {
            double sw = 0, sb = 0, aw = 0, ab = 0;
            for (int row = 0; row < rows; ++row) {
                const double g = f(dout[row * c + i]), xh = (f(x[row * c + i]) - (double)mean[row]) * rstd[row];
                sw += g * xh; sb += g; aw += fabs(g * xh); ab += fabs(g);
            }
            if (pw) edw = std::max(edw, rel(dw[i], sw, 1e-6 * (aw + 1e-3)));
            else if (!std::isnan(dw[i])) edw = INFINITY;  // a null output must stay untouched
            if (pb) edb = std::max(edb, rel(db[i], sb, 1e-6 * (ab + 1e-3)));
            else if (!std::isnan(db[i])) edb = INFINITY;
        }
    }
    for (int row = 0; row < rows; ++row) {
        const double mu = mean[row], rs = rstd[row];
        double m1 = 0, m2 = 0, amax = 0;
        for (int i = 0; i < c; ++i) {
            const double dxh = (double)f(dout[row * c + i]) * f(w[i]), xh = (f(x[row * c + i]) - mu) * rs;
            m1 += dxh; m2 += dxh * xh;
        }
        m1 /= c; m2 /= c;
        std::vector<double> ref(c);
        for (int i = 0; i < c; ++i) {
            const double xh = (f(x[row * c + i]) - mu) * rs;
            ref[i] = rs * ((double)f(dout[row * c + i]) * f(w[i]) - m1 - xh * m2);
            amax = std::max(amax, fabs(ref[i]));
        }
        for (int i = 0; i < c; ++i) edx = std::max(edx, ulps(f(dx[row * c + i]), ref[i], amax * 1e-3));
    }
    report(tag + " backward", "dx ulps", edx, 1.0);
    report(tag + " backward", "dw 1e-6", edw, 2.0);
    report(tag + " backward", "db 1e-6", edb, 2.0);
}

// ============================== xent ==============================
// CPU: src/backend/cpu/xent.rs. lse in f64 from the (bf16 or f32) logits; loss = lse - z[t];
// dlogits = (softmax - onehot) * scale, zero rows for IGNORE.
template <typename T>
static void test_xent(int rows, int v, int off) {
    const bool is_bf = sizeof(T) == 2;
    const std::string tag = std::string("xent ") + (is_bf ? "bf16" : "f32 ") + " rows " + std::to_string(rows) + " V " + std::to_string(v) + (off ? " misaligned" : "");
    const size_t n = (size_t)rows * v;
    Buf<T> z(n, off), d(n, off);
    Buf<int32_t> tg(rows);
    Buf<float> loss(rows), lse(rows);
    for (size_t i = 0; i < n; ++i) { const float x = U(-4, 4); z[i] = is_bf ? (T)b16(x) : (T)x; }
    if (rows >= 3) z[v + 5 % v] = is_bf ? (T)b16(30.0f) : (T)30.0f;  // one dominant logit in row 1
    for (int r = 0; r < rows; ++r) tg[r] = (r % 5 == 2) ? KILN_XENT_IGNORE : (int)(rng() % v);
    if (rows >= 7) tg[6] = v - 1;
    if (rows >= 2) tg[1] = 0;
    if (rows >= 33) tg[31] = v;  // out of range, not IGNORE: the kernels' tripwire, NaN loss and gradient row
    auto bad = [&](int r) { return tg[r] != KILN_XENT_IGNORE && (tg[r] < 0 || tg[r] >= v); };
    poison(loss); poison(lse);
    launch({(unsigned)rows, 1, 1}, KILN_XENT_THREADS, [&] {
        if constexpr (sizeof(T) == 2) xe::xent_forward(loss.p, lse.p, z.p, tg.p, v);
        else xe::xent_forward_f32(loss.p, lse.p, z.p, tg.p, v);
    });
    auto zf = [&](size_t i) -> double { if constexpr (sizeof(T) == 2) return f(z[i]); else return z[i]; };
    double el = 0, es = 0, ed = 0;
    std::vector<double> L(rows);
    for (int r = 0; r < rows; ++r) {
        double m = -1e300; for (int i = 0; i < v; ++i) m = std::max(m, zf((size_t)r * v + i));
        double s = 0; for (int i = 0; i < v; ++i) s += exp(zf((size_t)r * v + i) - m);
        L[r] = m + log(s);
        es = std::max(es, rel(lse[r], L[r], 1e-6 * (fabs(L[r]) + 1)));
        if (bad(r)) { if (!std::isnan(loss[r])) el = INFINITY; continue; }
        const double lref = tg[r] == KILN_XENT_IGNORE ? 0.0 : L[r] - zf((size_t)r * v + tg[r]);
        el = std::max(el, rel(loss[r], lref, 1e-6 * (fabs(L[r]) + 1)));
    }
    report(tag + " forward", "lse 1e-6", es, 2.0);
    report(tag + " forward", "loss 1e-6", el, 2.0);
    // backward in place from the kernel's lse
    const float scale = 1.0f / 7.0f;
    for (size_t i = 0; i < n; ++i) d[i] = z[i];
    launch({(unsigned)rows, 1, 1}, KILN_XENT_THREADS, [&] {
        if constexpr (sizeof(T) == 2) xe::xent_backward(d.p, lse.p, tg.p, v, scale);
        else xe::xent_backward_f32(d.p, lse.p, tg.p, v, scale);
    });
    for (int r = 0; r < rows; ++r) for (int i = 0; i < v; ++i) {
        const size_t k = (size_t)r * v + i;
        if (bad(r)) { double g; if constexpr (sizeof(T) == 2) g = f(d[k]); else g = d[k]; if (!std::isnan(g)) ed = INFINITY; continue; }
        const double ref = tg[r] == KILN_XENT_IGNORE ? 0.0 : (exp(zf(k) - L[r]) - (i == tg[r])) * (double)scale;
        double got; if constexpr (sizeof(T) == 2) got = f(d[k]); else got = d[k];
        double e;
        if (is_bf) e = ulps((float)got, ref, 1e-6 * scale);
        else e = rel(got, ref, 1e-5 * fabs(ref) + 1e-7 * scale);  // expf/lse f32 error, ~1e-6 relative
        if (tg[r] == KILN_XENT_IGNORE && got != 0.0) e = INFINITY;
        ed = std::max(ed, e);
    }
    report(tag + " backward", is_bf ? "dz ulps" : "dz 1e-5", ed, is_bf ? 1.0 : 2.0);
}

// ============================== embedding ==============================
// CPU: src/backend/cpu/embedding.rs; the kernels claim its bits (f32 adds in row order).
struct Buckets { std::vector<int32_t> ids, start, rows; };
static Buckets buckets(const std::vector<int32_t>& ids, int vocab) {  // src/backend/cuda/embedding.rs Buckets::new
    std::vector<std::pair<int32_t, int32_t>> pairs;
    for (int r = 0; r < (int)ids.size(); ++r) if (ids[r] >= 0 && ids[r] < vocab) pairs.push_back({ids[r], r});
    std::sort(pairs.begin(), pairs.end());
    Buckets b;
    for (size_t k = 0; k < pairs.size(); ++k) {
        if (b.ids.empty() || b.ids.back() != pairs[k].first) { b.ids.push_back(pairs[k].first); b.start.push_back((int32_t)k); }
        b.rows.push_back(pairs[k].second);
    }
    b.start.push_back((int32_t)pairs.size());
    return b;
}
static void test_embedding(int rows, int t, int c, int vocab, int off, bool bad_id = false) {
    const std::string tag = "embedding rows " + std::to_string(rows) + " T " + std::to_string(t) + " C " + std::to_string(c) + " V " + std::to_string(vocab) + (off ? " misaligned" : "") + (bad_id ? " bad ids" : "");
    Buf<bf> wte((size_t)vocab * c, off), wpe((size_t)t * c, off), out((size_t)rows * c, off), dout((size_t)rows * c, off);
    Buf<int32_t> ids(rows);
    Buf<float> dwte((size_t)vocab * c), dwpe((size_t)t * c);
    for (size_t i = 0; i < wte.n; ++i) wte[i] = b16(U(-1, 1));
    for (size_t i = 0; i < wpe.n; ++i) wpe[i] = b16(U(-1, 1));
    for (size_t i = 0; i < dout.n; ++i) dout[i] = b16(U(-1, 1));
    std::vector<int32_t> idv(rows);
    for (int r = 0; r < rows; ++r) idv[r] = (int32_t)(rng() % std::min(vocab, 5 + rows / 3));  // repeats
    if (rows > 3) idv[3] = vocab - 1;
    if (bad_id) { idv[rows - 1] = vocab; idv[0] = -1; }  // never dereferenced: NaN rows forward, dropped backward
    auto valid = [&](int r) { return idv[r] >= 0 && idv[r] < vocab; };
    for (int r = 0; r < rows; ++r) ids[r] = idv[r];
    poison(out);
    launch({(unsigned)((rows + KILN_EMB_WARPS - 1) / KILN_EMB_WARPS), 1, 1}, 32 * KILN_EMB_WARPS, [&] { em::embedding_forward(out.p, ids.p, wte.p, wpe.p, rows, t, c, vocab); });
    double ef = 0;
    for (int r = 0; r < rows; ++r) for (int i = 0; i < c; ++i) {
        if (!valid(r)) { if (!std::isnan(f(out[(size_t)r * c + i]))) ef = INFINITY; continue; }
        const float ref = f(wte[(size_t)idv[r] * c + i]) + f(wpe[(size_t)(r % t) * c + i]);
        if (fbits(f(out[(size_t)r * c + i])) != fbits(bfr(ref))) ef = std::max<double>(ef, std::isnan(f(out[(size_t)r * c + i])) ? INFINITY : fabs(f(out[(size_t)r * c + i]) - ref));
    }
    report(tag + " forward", "bits", ef, 0.0);
    // backward: the wrapper zeroes dwte, builds the buckets, launches (buckets, stripes)
    for (size_t i = 0; i < dwte.n; ++i) dwte[i] = 0.0f;
    const Buckets b = buckets(idv, vocab);
    Buf<int32_t> bid(b.ids.size()), bst(b.start.size()), brw(std::max<size_t>(1, b.rows.size()));
    for (size_t i = 0; i < b.ids.size(); ++i) bid[i] = b.ids[i];
    for (size_t i = 0; i < b.start.size(); ++i) bst[i] = b.start[i];
    for (size_t i = 0; i < b.rows.size(); ++i) brw[i] = b.rows[i];
    const unsigned stripes = (unsigned)((c + KILN_EMB_THREADS - 1) / KILN_EMB_THREADS);
    if (!b.ids.empty()) launch({(unsigned)b.ids.size(), stripes, 1}, KILN_EMB_THREADS, [&] { em::embedding_backward_wte(dwte.p, dout.p, bid.p, bst.p, brw.p, c, vocab); });
    poison(dwpe);
    launch({(unsigned)std::max<size_t>(1, ((size_t)t * c + KILN_EMB_THREADS - 1) / KILN_EMB_THREADS), 1, 1}, KILN_EMB_THREADS, [&] { em::embedding_backward_wpe(dwpe.p, dout.p, rows, t, c); });
    std::vector<float> rw((size_t)vocab * c, 0.0f), rp((size_t)t * c, 0.0f);  // the CPU's f32 sums in row order
    for (int r = 0; r < rows; ++r) for (int i = 0; i < c; ++i) {
        if (valid(r)) rw[(size_t)idv[r] * c + i] += f(dout[(size_t)r * c + i]);
        rp[(size_t)(r % t) * c + i] += f(dout[(size_t)r * c + i]);
    }
    double ew_ = 0, ep = 0;
    for (size_t i = 0; i < rw.size(); ++i) if (fbits(dwte[i]) != fbits(rw[i])) ew_ = std::max<double>(ew_, std::isnan(dwte[i]) ? INFINITY : fabs(dwte[i] - rw[i]));
    for (size_t i = 0; i < rp.size(); ++i) if (fbits(dwpe[i]) != fbits(rp[i])) ep = std::max<double>(ep, std::isnan(dwpe[i]) ? INFINITY : fabs(dwpe[i] - rp[i]));
    report(tag + " backward", "dwte bits", ew_, 0.0);
    report(tag + " backward", "dwpe bits", ep, 0.0);
}

// ============================== reduce ==============================
// CPU: src/backend/cpu/reduce.rs (sum of squares in f64; scale x *= s).
static void test_reduce(const std::vector<int64_t>& sizes, int off) {
    std::string tag = "reduce sizes";
    for (auto s : sizes) tag += " " + std::to_string(s);
    if (off) tag += " misaligned";
    std::vector<Buf<float>> xs;
    for (auto s : sizes) { xs.emplace_back(s, off); for (int64_t i = 0; i < s; ++i) xs.back()[i] = U(-2, 2); }
    std::vector<int> counts; int total = 0;
    for (auto s : sizes) { counts.push_back(rd::reduce_blocks(s)); total += counts.back(); }
    Buf<double> partial(std::max(1, total)), out(1);
    poison(partial); poison(out);
    int o = 0; int64_t mpt = 0;
    for (size_t k = 0; k < sizes.size(); ++k) {
        if (counts[k] == 0) continue;
        double* slots = partial.p + o; const float* x = xs[k].p; const int64_t n = sizes[k];
        launch({(unsigned)counts[k], 1, 1}, KILN_REDUCE_THREADS, [&] { rd::reduce_sum_squares_partial(slots, x, n); });
        o += counts[k];
        mpt = std::max(mpt, rd::reduce_per_thread(n));
    }
    double ref = 0;
    for (auto& x : xs) for (size_t i = 0; i < x.n; ++i) ref += (double)x[i] * x[i];
    if (total > 0) {
        launch({1, 1, 1}, KILN_REDUCE_THREADS, [&] { rd::reduce_sum_squares_finish(out.p, partial.p, total); });
        const double bound = (mpt * ldexp(1.0, -24) + 1e-12) * ref;  // reduce.cuh's bound
        report(tag, "sumsq", fabs(out[0] - ref), bound);
    }
    // scale: the wrapper's grid, then grids of 1 and 2 blocks (grid-stride)
    const float s = 0.37f;
    for (size_t k = 0; k < sizes.size(); ++k) {
        const int64_t n = sizes[k];
        if (n == 0) continue;
        const int natural = (int)std::max<int64_t>(1, (n + 4 * KILN_REDUCE_THREADS - 1) / (4 * KILN_REDUCE_THREADS));
        for (int grid : {natural, 1, 2}) {
            std::vector<float> before(xs[k].p, xs[k].p + n);
            float* x = xs[k].p;
            launch({(unsigned)grid, 1, 1}, KILN_REDUCE_THREADS, [&] { rd::reduce_scale(x, s, n); });
            double e = 0;
            for (int64_t i = 0; i < n; ++i) if (fbits(x[i]) != fbits(before[i] * s)) e = INFINITY;
            report("reduce_scale n " + std::to_string(n) + " grid " + std::to_string(grid) + (off ? " misaligned" : ""), "bits", e, 0.0);
        }
    }
}

// ============================== elementwise ==============================
// CPU: src/backend/cpu/elementwise.rs, its fast_exp / fast_tanh / gelu / gelu_grad / dropout_keep
// written out again here from the Rust (compile with -ffp-contract=off, as build.rs does for the
// twins): the kernels claim its bits up to the bf16 rounding of inputs and outputs.
static float cpu_fast_exp(float x) {
    const float LOG2E = 1.44269504088896340736f, LN2_HI = 0.69314575f, LN2_LO = 1.4286068e-6f, ROUND = 12582912.0f;
    x = std::isnan(x) ? x : std::min(std::max(x, -87.0f), 88.0f);
    const float k = (x * LOG2E + ROUND) - ROUND;
    const float r = (x - k * LN2_HI) - k * LN2_LO;
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
    uint32_t u = (uint32_t)((int32_t)k + 127) << 23; float two; memcpy(&two, &u, 4);
    return p * two;
}
static float cpu_fast_tanh(float u) { const float e = cpu_fast_exp(2.0f * std::min(fabsf(u), 20.0f)); return copysignf(1.0f - 2.0f / (e + 1.0f), u); }
static const float GELU_K = 0.7978846f, GELU_C = 0.044715f;
static float cpu_gelu(float x) { const float u = GELU_K * (x + GELU_C * x * x * x); return 0.5f * x * (1.0f + cpu_fast_tanh(u)); }
static float cpu_gelu_grad(float x) {
    const float u = GELU_K * (x + GELU_C * x * x * x), t = cpu_fast_tanh(u), du = GELU_K * (1.0f + 3.0f * GELU_C * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}
static bool cpu_dropout_keep(uint64_t seed, uint64_t i, float p) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / (float)(1ull << 24)) >= p;
}
// bits of a bf16 output vs the CPU f32 value rounded; returns the worst |diff| (0 = all equal).
static double cmp_bf(const Buf<bf>& got, const std::vector<float>& ref) {
    double e = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const float g = f(got[i]), r = bfr(ref[i]);
        if (fbits(g) != fbits(r)) e = std::max<double>(e, std::isnan(g) ? INFINITY : std::max<double>(fabs(g - r), 1e-30));
    }
    return e;
}
static double cmp_f(const Buf<float>& got, const std::vector<float>& ref) {
    double e = 0;
    for (size_t i = 0; i < ref.size(); ++i)
        if (fbits(got[i]) != fbits(ref[i])) e = std::max<double>(e, std::isnan(got[i]) ? INFINITY : std::max<double>(fabs(got[i] - ref[i]), 1e-30));
    return e;
}
static void test_elementwise(int64_t n, int off, bool small_grid) {
    const int64_t groups8 = (n + 7) / 8;
    const unsigned natural = (unsigned)std::max<int64_t>(1, (groups8 + KILN_ELEMENTWISE_BLOCK - 1) / KILN_ELEMENTWISE_BLOCK);
    const unsigned natural4 = (unsigned)std::max<int64_t>(1, ((n + 3) / 4 + KILN_ELEMENTWISE_BLOCK - 1) / KILN_ELEMENTWISE_BLOCK);
    const unsigned natural1 = (unsigned)std::max<int64_t>(1, (n + KILN_ELEMENTWISE_BLOCK - 1) / KILN_ELEMENTWISE_BLOCK);
    const unsigned g8 = small_grid ? 1 : natural, g4 = small_grid ? 1 : natural4, g1 = small_grid ? 1 : natural1;
    const std::string tag = "elementwise n " + std::to_string(n) + (off ? " misaligned" : "") + (small_grid ? " grid 1" : "");
    const int BL = KILN_ELEMENTWISE_BLOCK;
    Buf<bf> a(n, off), bb(n, off), out(n, off), d(n, off);
    Buf<float> fa(n, off), fb(n, off), fo(n, off);
    Buf<uint8_t> mask(n, off), mask2(n, off);
    for (int64_t i = 0; i < n; ++i) {
        const float x = i % 97 == 3 ? U(-12, 12) : U(-4, 4);  // some inputs in the tanh saturation range
        a[i] = b16(x); bb[i] = b16(U(-2, 2)); fa[i] = U(-3, 3); fb[i] = U(-3, 3);
    }
    if (n > 10) { a[1] = b16(0.0f); a[2] = b16(-0.0f); a[5] = b16(100.0f); a[6] = b16(-100.0f); }
    std::vector<float> ref(n);
    // gelu forward
    poison(out);
    launch({g8, 1, 1}, BL, [&] { ew::elementwise_gelu_forward(out.p, a.p, n); });
    for (int64_t i = 0; i < n; ++i) ref[i] = cpu_gelu(f(a[i]));
    report(tag + " gelu_forward", "bits", cmp_bf(out, ref), 0.0);
    // gelu backward
    poison(out);
    launch({g8, 1, 1}, BL, [&] { ew::elementwise_gelu_backward(out.p, a.p, bb.p, n); });
    for (int64_t i = 0; i < n; ++i) ref[i] = f(bb[i]) * cpu_gelu_grad(f(a[i]));
    report(tag + " gelu_backward", "bits", cmp_bf(out, ref), 0.0);
    // residual
    poison(out);
    launch({g8, 1, 1}, BL, [&] { ew::elementwise_residual_forward(out.p, a.p, bb.p, n); });
    for (int64_t i = 0; i < n; ++i) ref[i] = f(a[i]) + f(bb[i]);
    report(tag + " residual_forward", "bits", cmp_bf(out, ref), 0.0);
    // add_assign (dst in place)
    for (int64_t i = 0; i < n; ++i) d[i] = a[i];
    launch({g8, 1, 1}, BL, [&] { ew::elementwise_add_assign(d.p, bb.p, n); });
    report(tag + " add_assign", "bits", cmp_bf(d, ref), 0.0);
    // add_assign_f32
    for (int64_t i = 0; i < n; ++i) fo[i] = fa[i];
    launch({g4, 1, 1}, BL, [&] { ew::elementwise_add_assign_f32(fo.p, fb.p, n); });
    for (int64_t i = 0; i < n; ++i) ref[i] = fa[i] + fb[i];
    report(tag + " add_assign_f32", "bits", cmp_f(fo, ref), 0.0);
    // casts
    poison(out);
    launch({g8, 1, 1}, BL, [&] { ew::elementwise_cast_f32_to_bf16(out.p, fa.p, n); });
    for (int64_t i = 0; i < n; ++i) ref[i] = fa[i];
    report(tag + " cast_f32_to_bf16", "bits", cmp_bf(out, ref), 0.0);
    poison(fo);
    launch({g8, 1, 1}, BL, [&] { ew::elementwise_cast_bf16_to_f32(fo.p, a.p, n); });
    for (int64_t i = 0; i < n; ++i) ref[i] = f(a[i]);
    report(tag + " cast_bf16_to_f32", "bits", cmp_f(fo, ref), 0.0);
    // dropout: mask, forward with the stored mask, one-pass with and without a mask
    const uint64_t seed = 0x1234567890abcdefull; const float p = 0.3f, scale = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < n; ++i) mask[i] = 0xee;
    launch({g1, 1, 1}, BL, [&] { ew::elementwise_dropout_mask(mask.p, seed, p, n); });
    double em_ = 0; int kept = 0;
    for (int64_t i = 0; i < n; ++i) { const int k = cpu_dropout_keep(seed, i, p); kept += k; if (mask[i] != k) em_ = INFINITY; }
    report(tag + " dropout_mask", "bits", em_, 0.0);
    poison(out);
    launch({g8, 1, 1}, BL, [&] { ew::elementwise_dropout_forward(out.p, a.p, mask.p, scale, n); });
    for (int64_t i = 0; i < n; ++i) ref[i] = mask[i] != 0 ? f(a[i]) * scale : 0.0f;
    report(tag + " dropout_forward", "bits", cmp_bf(out, ref), 0.0);
    for (int with_mask = 0; with_mask < 2; ++with_mask) {
        poison(out); for (int64_t i = 0; i < n; ++i) mask2[i] = 0xee;
        uint8_t* mp = with_mask ? mask2.p : nullptr;
        launch({g8, 1, 1}, BL, [&] { ew::elementwise_dropout(out.p, mp, a.p, seed, p, scale, n); });
        double e2 = cmp_bf(out, ref);
        for (int64_t i = 0; i < n; ++i) if (mask2[i] != (with_mask ? mask[i] : 0xee)) e2 = INFINITY;
        report(tag + (with_mask ? " dropout (mask)" : " dropout (no mask)"), "bits", e2, 0.0);
    }
    (void)kept;
}

// ============================== adamw ==============================
// CPU: optim::adamw (src/optim/adamw.rs): AdamWScalars::new in f64, adamw_update in f32.
static void test_adamw(const std::vector<int64_t>& sizes, int grid_override) {
    std::string tag = "adamw sizes";
    for (auto s : sizes) tag += " " + std::to_string(s);
    const double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1; const int t = 3;
    AdamWScalars s;
    s.decay = (float)(1.0 - lr * wd); s.beta1 = (float)b1; s.one_minus_beta1 = (float)(1.0 - b1);
    s.beta2 = (float)b2; s.one_minus_beta2 = (float)(1.0 - b2);
    s.step_size = (float)(lr / (1.0 - pow(b1, t))); s.bc2_sqrt = (float)sqrt(1.0 - pow(b2, t)); s.eps = (float)eps;
    const size_t k = sizes.size();
    std::vector<Buf<float>> P, M, V, G; std::vector<Buf<bf>> PB;
    std::vector<AdamWTensor> desc(k);
    int64_t start = 0;
    for (size_t j = 0; j < k; ++j) {
        const int64_t n = sizes[j];
        P.emplace_back(n); M.emplace_back(n); V.emplace_back(n); G.emplace_back(n); PB.emplace_back(n);
        for (int64_t i = 0; i < n; ++i) { P[j][i] = U(-1, 1); M[j][i] = U(-0.1f, 0.1f); V[j][i] = U(0, 0.01f); G[j][i] = U(-1, 1); }
        if (n > 2) { G[j][0] = 0.0f; V[j][1] = 0.0f; G[j][1] = 0.0f; M[j][1] = 0.0f; }  // v = 0: denom = eps
        poison(PB[j]);
    }
    for (size_t j = 0; j < k; ++j) {
        desc[j] = AdamWTensor{(uint64_t)P[j].p, (uint64_t)M[j].p, (uint64_t)V[j].p, (uint64_t)G[j].p, j % 2 ? 0 : (uint64_t)PB[j].p, sizes[j], start, (int32_t)(j % 3 != 1), 0};
        start += (sizes[j] + KILN_ADAMW_CHUNK - 1) / KILN_ADAMW_CHUNK;  // plan()
    }
    const int64_t work = start;
    // references, from copies
    std::vector<std::vector<float>> rp(k), rm(k), rv(k);
    for (size_t j = 0; j < k; ++j) {
        AdamWScalars sj = s; if (!desc[j].decay) sj.decay = 1.0f;
        for (int64_t i = 0; i < sizes[j]; ++i) {
            float p = P[j][i], m = M[j][i], v = V[j][i]; const float g = G[j][i];
            p *= sj.decay;
            m += sj.one_minus_beta1 * (g - m);
            v = v * sj.beta2 + sj.one_minus_beta2 * g * g;
            const float denom = sqrtf(v) / sj.bc2_sqrt + sj.eps;
            p += -sj.step_size * (m / denom);
            rp[j].push_back(p); rm[j].push_back(m); rv[j].push_back(v);
        }
    }
    Buf<AdamWTensor> table(k);
    for (size_t j = 0; j < k; ++j) table[j] = desc[j];
    const unsigned grid = grid_override > 0 ? grid_override : (unsigned)std::max<int64_t>(1, work);  // clamp(1, 4 * SMs)
    if (work > 0) launch({grid, 1, 1}, KILN_ADAMW_BLOCK, [&] { ew::adamw_step(table.p, (int32_t)k, work, s); });
    double e = 0;
    for (size_t j = 0; j < k; ++j) {
        for (int64_t i = 0; i < sizes[j]; ++i) {
            if (fbits(P[j][i]) != fbits(rp[j][i]) || fbits(M[j][i]) != fbits(rm[j][i]) || fbits(V[j][i]) != fbits(rv[j][i])) e = std::max(e, std::isnan(P[j][i]) ? INFINITY : std::max(1e-30, (double)fabs(P[j][i] - rp[j][i])));
            const float pb = f(PB[j][i]);
            if (desc[j].p_bf16 ? fbits(pb) != fbits(bfr(rp[j][i])) : !std::isnan(pb)) e = INFINITY;
        }
    }
    report(tag + " grid " + std::to_string(grid), "bits", e, 0.0);
}

int main(int argc, char** argv) {
    std::string only = argc > 1 ? argv[1] : "";
    const bool big = only == "big";  // adds a sum of squares past KILN_REDUCE_MAX_BLOCKS blocks (~1 min)
    if (big) only = "";
    auto want = [&](const char* fam) { return only.empty() || only == fam; };
    if (want("layernorm")) {
        printf("layernorm (forward, residual forward, backward dx, dw/db partial + finish)\n");
        for (int rows : {0, 1, 7, 33, 70}) for (int c : {13, 64, 100, 264}) test_layernorm(rows, c, 0);
        test_layernorm(7, 64, 1);
        test_layernorm(33, 264, 1);
        test_layernorm(3, 768, 0);  // GPT-2's C: three 16-byte steps per lane
    }
    if (want("xent")) {
        printf("xent (forward, backward in place; bf16 and f32 logits)\n");
        for (int rows : {1, 7, 33}) for (int v : {1000, 257, 13}) {
            test_xent<bf>(rows, v, 0);
            test_xent<float>(rows, v, 0);
        }
        test_xent<bf>(7, 1000, 1);
        test_xent<float>(7, 257, 1);
        test_xent<bf>(3, 3000, 3);
        for (int v : {1, 3}) { test_xent<bf>(7, v, 1); test_xent<float>(7, v, 0); }
        test_xent<bf>(2, 50257, 0);  // GPT-2's V
        test_xent<float>(2, 50257, 0);
    }
    if (want("embedding")) {
        printf("embedding (forward, backward wte with the wrapper's buckets, backward wpe)\n");
        for (int rows : {1, 7, 33}) for (int c : {13, 64, 100, 264}) test_embedding(rows, std::min(rows, 5), c, rows == 33 ? 1000 : 257, 0);
        test_embedding(33, 33, 64, 257, 1);
        test_embedding(33, 4, 264, 257, 1);
        test_embedding(33, 8, 64, 257, 0, true);
        test_embedding(7, 7, 13, 1000, 1, true);
    }
    if (want("reduce")) {
        printf("reduce (sum of squares partial + finish over several buffers, scale)\n");
        test_reduce({1}, 0);
        test_reduce({7, 1025, 0, 1}, 0);
        test_reduce({1025, 70001}, 1);
        test_reduce({7, 4099}, 1);
        if (big) test_reduce({300001}, 0);  // 1024 blocks, the partial kernel's grid-stride loop
    }
    if (want("elementwise")) {
        printf("elementwise (gelu fwd/bwd, residual, add_assign, add_assign_f32, casts, dropout)\n");
        for (int64_t n : {0, 1, 7, 8, 1025, 4099, 70001}) for (int off : {0, 1}) test_elementwise(n, off, false);
        test_elementwise(4099, 0, true);
        test_elementwise(70001, 0, true);
    }
    if (want("adamw")) {
        printf("adamw (multi-tensor step)\n");
        const std::vector<int64_t> sizes = {1, 7, 0, 1025, 4096, 4097, 13, 8193};
        test_adamw(sizes, 0);
        test_adamw(sizes, 1);
        test_adamw(sizes, 2);
        test_adamw({0, 0, 5}, 0);
    }
    if (g_fail) { printf("FAIL %d\n", g_fail); return 1; }
    printf("ALL OK\n");
    return 0;
}
