// runtime.cpp: the emulated CUDA device behind `--device emu` (src/backend/cuda/emu.rs is its Rust
// side). Device memory, the launch of a kernel over its grid, the emulated warp-level instructions,
// the memcheck and the per-launch counters. The kernels themselves are compiled from kernels/*.cu
// by build.rs with emu.h; this file is compiled without instrumentation.
//
// Execution. A launch's blocks are shared out to a pool of worker OS threads (one per core,
// KILN_EMU_THREADS overrides). A worker runs one block at a time: every CUDA thread of the block is
// a fiber with its own stack, and the fibers take turns on the worker: a fiber runs until it waits
// at a barrier (__syncthreads, or a warp-level operation: __syncwarp, a shuffle, mma.sync,
// ldmatrix) or exits, and the last thread to arrive at a barrier releases the others. A barrier
// that can never be released (some live thread of the block is waiting elsewhere) is reported as a
// fault, not a hang.
//
// Memcheck. Device memory is bump-allocated from one reserved address range and never reused, so
// every address is either inside a live allocation or identifiably not. Each allocation has a
// shadow byte per byte saying whether anything wrote it; allocations start poisoned (0xff bytes,
// a NaN in f32 and bf16) and unwritten. Each access of kernel code is checked: global accesses
// against their allocation's bounds, reads against the shadow, accesses of 2, 4, 8 and 16 bytes
// against natural alignment, dynamic shared memory against the launch's size, and cp.async and
// ldmatrix addresses against shared memory and 16-byte alignment. The first fault stops the launch
// and is reported with the kernel, block, thread and address.
//
// Counters. Per launch: global requests (one per warp-level access instruction), the 32-byte
// sectors they touch (distinct per request, as the memory system moves them) against the distinct
// sectors of the whole launch (the fewest it could move: each byte read once, written once), the
// shared-memory wavefronts per request against the conflict-free count (bank conflicts), mma.sync
// instructions and barriers. Lanes of a warp are matched into one request by the order of their
// accesses (the k-th global access of each lane), which is exact when the warp does not diverge.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "emu.h"


namespace kiln_emu {

// ------------------------------------------------------------------------------------------------
// Limits of the emulated device: those of sm_90 (H100 / H200).
constexpr unsigned MAX_THREADS = 1024;
constexpr size_t SHARED_OPTIN = 232448;  // 227 KB per block with the opt-in attribute
constexpr size_t SHARED_DEFAULT = 48 * 1024;
constexpr size_t STACK = 256 * 1024;     // per fiber
constexpr size_t DYN_CAP = SHARED_OPTIN + 4096;

// ------------------------------------------------------------------------------------------------
// Device memory.
struct Alloc {
    uintptr_t base;
    size_t size;
    uint64_t id;
    uint8_t* init;  // 1 where written
    uint8_t* rsec;  // per 32-byte sector: read in this launch
    uint8_t* wsec;  // per 32-byte sector: written in this launch
    std::atomic<uint64_t>* touched;  // which of the launch's sampled blocks touched it (bit n: pick n; bit 0 unsampled)
};
static std::mutex g_mem_mu;
static uintptr_t g_arena = 0;
static size_t g_arena_size = 0;
static uintptr_t g_bump = 0;
static uint64_t g_next_id = 1;
static std::vector<Alloc> g_allocs;                            // sorted by base (bump order)
static std::vector<std::pair<uintptr_t, size_t>> g_freed;      // freed ranges, sorted
static size_t g_live_bytes = 0;

static bool arena_init() {
    if (g_arena) return true;
    for (size_t gib : {1024, 256, 64, 16}) {
        size_t size = gib << 30;
        void* p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p != MAP_FAILED) {
            g_arena = reinterpret_cast<uintptr_t>(p);
            g_arena_size = size;
            g_bump = g_arena + 4096;
            return true;
        }
    }
    return false;
}

static size_t page_up(size_t n) { return (n + 4095) & ~size_t(4095); }

static const Alloc* find_alloc(uintptr_t a) {
    auto it = std::upper_bound(g_allocs.begin(), g_allocs.end(), a, [](uintptr_t x, const Alloc& al) { return x < al.base; });
    if (it == g_allocs.begin()) return nullptr;
    --it;
    return &*it;
}

// Records that [a, a + n) of allocation `al` now holds written bytes.
static void mark_written(const Alloc* al, uintptr_t a, size_t n) { memset(al->init + (a - al->base), 1, n); }

static bool was_freed(uintptr_t a) {
    auto it = std::upper_bound(g_freed.begin(), g_freed.end(), a, [](uintptr_t x, const std::pair<uintptr_t, size_t>& r) { return x < r.first; });
    if (it == g_freed.begin()) return false;
    --it;
    return a < it->first + it->second;
}

// ------------------------------------------------------------------------------------------------
// Fibers.
enum class State : uint8_t { Runnable, WaitBlock, WaitWarp, WaitMbar, Exited };
enum class WarpOp : uint8_t { None, Syncwarp, Shfl, Mma, Ldmatrix };
static const char* op_name(WarpOp k) {
    switch (k) {
        case WarpOp::Syncwarp: return "__syncwarp";
        case WarpOp::Shfl: return "a warp shuffle";
        case WarpOp::Mma: return "mma.sync";
        case WarpOp::Ldmatrix: return "ldmatrix";
        default: return "nothing";
    }
}

struct Copy {
    void* dst;
    const void* src;
    bool valid;
};

// A wgmma this thread issued and has not yet seen retire: its accumulators (the thread's own
// registers, written when a wgmma.wait_group retires it) and the warpgroup's record of the operands.
struct WgPending {
    float* d;
    uint32_t op;  // index into Worker::wg_ops of the thread's warpgroup
};

struct Thread {
    Dim3 tid;  // first member: emu.h's thread_idx() reads it
    int lin, lane, warp;
    void* sp;
    char* stack_lo;
    State state;
    uint32_t gseq, sseq;
    std::vector<Copy> cp_open;
    std::vector<std::vector<Copy>> cp_groups;
    // Hopper: wgmma issued since the last commit, committed groups, the thread's count of wgmma
    // issued (its position in the warpgroup's list), and the mbarrier phase it waits for.
    std::vector<WgPending> wg_open;
    std::vector<std::vector<WgPending>> wg_groups;
    uint32_t wg_seq;
    uint32_t mbar_off, mbar_parity;
};

struct Slot {
    uint32_t v;
    uint32_t a[4], b[2];
    float c[4];
    const void* addr;
    uint32_t r[4];
};

struct Warp {
    int live;
    uint32_t live_mask;
    uint32_t arrived_mask;
    uint32_t mask;
    unsigned gen;
    WarpOp kind;
    const char* file;
    int line;
    Slot slot[2][32];
    bool trans;
};

// A warp-level global request: the distinct sectors its lanes touch.
struct GReq {
    uint64_t sec[32];
    uint32_t n, extra;
};
// A warp-level shared request: each lane's address and size.
struct SReq {
    uintptr_t addr[32];
    uint32_t lanes;
    uint8_t size;
};

struct Stats {
    uint64_t global_requests = 0, global_sectors = 0, global_bytes = 0;
    uint64_t shared_requests = 0, shared_wavefronts = 0, shared_ideal = 0;
    uint64_t mma = 0, barriers = 0, flops = 0;
    void add(const Stats& o) {
        global_requests += o.global_requests; global_sectors += o.global_sectors; global_bytes += o.global_bytes;
        shared_requests += o.shared_requests; shared_wavefronts += o.shared_wavefronts; shared_ideal += o.shared_ideal;
        mma += o.mma; barriers += o.barriers; flops += o.flops;
    }
};

struct LaunchState {
    Launch dims;
    const char* name;
    kiln_emu_entry entry;
    void** args;
    size_t smem;
    size_t static_smem_limit;
    uint64_t total_blocks;
    std::vector<uint64_t> picks;  // the blocks to run when sampling (see kiln_emu_set_sample); empty: all
    std::atomic<uint64_t> next{0};
    std::atomic<bool> abort{false};
    std::mutex mu;
    std::string fault;
    Stats stats;
};
static LaunchState* g_launch = nullptr;
// Sampling (kiln_emu_set_sample): at most this many blocks of each launch run; 0: all of them.
static unsigned g_sample = 0;

// The race check's record of one byte of shared memory in the current barrier phase (entries from
// an older phase are empty): its last writer, and who read it since.
struct Race {
    uint32_t phase;
    uint16_t writer;  // linear thread index + 1; 0: none
    uint32_t wgen;    // the writer's warp generation (warp-level operations completed) at the write
    uint32_t rwarps;  // warps with a thread that read it
    uint32_t rgen;    // while one warp read it: that warp's generation at its latest read(s)
    uint32_t rlanes;  // and the lanes that read at that generation
};

struct Region {
    uintptr_t base;
    size_t size;
    uint64_t epoch;
    const char* name;
    Race* race;
};

// An mbarrier (PTX ISA, "mbarrier"): kept beside shared memory, keyed by its offset in the block's
// dynamic shared memory. A phase completes when its pending arrivals reach zero and its
// transaction count is zero; then the next phase starts with `count` pending arrivals, the bulk
// copies that signalled it land, and the threads waiting for it resume.
struct Landing {
    unsigned char* dst;
    std::vector<unsigned char> bytes;
};
struct Mbar {
    uint32_t count, pending;
    int64_t tx;
    uint32_t phase;  // phases completed
    std::vector<Landing> landings;
};

// A warpgroup's wgmma, as its first thread to issue it found the operands: A (64 x 16) and
// B (n x 16), gathered row by row in K whichever their major-ness, to compute each thread's accumulators when it retires the
// operation and, when the last thread has, to check that the shared memory under the descriptors
// did not change meanwhile (the tensor cores read it asynchronously until then).
struct WgOp {
    uint64_t da, db;
    int n, scale_d, trans_a, trans_b;
    std::vector<uint16_t> a, b;  // bf16 bits, row-major (rows x 16)
    int outstanding;
};

struct Worker {
    std::vector<Thread> threads;
    std::vector<char*> stacks;
    Warp warps[32];
    void* sched_sp = nullptr;
    std::deque<int> runq;
    int live = 0, arrived = 0;
    const char* bar_file = nullptr;
    int bar_line = 0;
    unsigned char* dyn = nullptr;
    std::vector<Region> statics;
    size_t static_bytes = 0;
    uint64_t epoch = 0;
    Race* dyn_race = nullptr;
    uint32_t phase = 0;                 // barrier phase: advances at every block and every __syncthreads
    const char* phase_file = nullptr;   // the __syncthreads that began it (null: the block's start)
    int phase_line = 0;
    std::vector<GReq> greq[32];
    std::vector<SReq> sreq[32];
    Stats stats;
    bool faulted = false;
    std::unordered_map<uint32_t, Mbar> mbars;
    std::vector<WgOp> wg_ops[8];  // per warpgroup (warps 4g .. 4g + 3)
};

thread_local Thread* cur = nullptr;
thread_local Dim3 cur_block{0, 0, 0};
thread_local const Launch* cur_launch = nullptr;
static thread_local Worker* cur_worker = nullptr;
static thread_local unsigned cur_pick = 0;  // which of a sampled launch's blocks runs (0 unsampled)

// ------------------------------------------------------------------------------------------------
// Context switch: saves the callee-saved registers, the SSE and x87 control words and the stack
// pointer of the running context in *from, and resumes the one whose stack pointer is `to`.
#if defined(__x86_64__) && !defined(KILN_EMU_UCONTEXT)
extern "C" void kiln_emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl kiln_emu_switch
    .type kiln_emu_switch,@function
kiln_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kiln_emu_switch, .-kiln_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
static void fiber_main();
// A fresh fiber's stack as kiln_emu_switch expects to find it: control words, six registers, and
// fiber_main as the return address, entered with the stack aligned as after a call.
static void* fiber_init(char* lo) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + STACK) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                          // fiber_main's (absent) return address
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);    // kiln_emu_switch returns here
    for (int i = 0; i < 6; ++i) *--sp = 0;              // rbp rbx r12 r13 r14 r15
    *--sp = 0x1f80ull | (0x037full << 32);              // mxcsr, x87 control word
    return sp;
}
static inline void switch_to(void** from, void* to) { kiln_emu_switch(from, to); }
static void* leave_context() { return nullptr; }      // where a fiber that never resumes saves itself
static void* scheduler_context() { return nullptr; }  // the worker's own context (set by the switch)
#else
// Elsewhere (and on x86-64 with -DKILN_EMU_UCONTEXT, which is how it is tested): POSIX ucontext.
// Slower, since swapcontext also saves the signal mask with a system call. A context pointer is a
// ucontext_t: a fiber's sits at the top of its own stack; the scheduler's is `sched` below.
}  // namespace kiln_emu
#include <ucontext.h>
namespace kiln_emu {
static void fiber_main();
static void* fiber_init(char* lo) {
    const size_t room = (sizeof(ucontext_t) + 63) & ~size_t(63);
    ucontext_t* uc = reinterpret_cast<ucontext_t*>(lo + STACK - room);
    getcontext(uc);
    uc->uc_stack.ss_sp = lo;
    uc->uc_stack.ss_size = STACK - room;
    uc->uc_link = nullptr;
    makecontext(uc, &fiber_main, 0);
    return uc;
}
static thread_local ucontext_t sched, scratch;
static void* leave_context() { return &scratch; }
static void* scheduler_context() { return &sched; }  // of the OS thread running the block
static inline void switch_to(void** from, void* to) {
    swapcontext(static_cast<ucontext_t*>(*from), static_cast<ucontext_t*>(to));
}
#endif

// ------------------------------------------------------------------------------------------------
// Faults.
static std::string where() {
    char buf[256];
    Thread* t = cur;
    snprintf(buf, sizeof buf, "kernel %s, block (%u, %u, %u), thread (%u, %u, %u)", g_launch ? g_launch->name : "?",
             cur_block.x, cur_block.y, cur_block.z, t ? t->tid.x : 0, t ? t->tid.y : 0, t ? t->tid.z : 0);
    return buf;
}

static void record_fault(const std::string& msg) {
    std::lock_guard<std::mutex> g(g_launch->mu);
    if (g_launch->fault.empty()) g_launch->fault = msg;
    g_launch->abort.store(true);
}

// Stops the running fiber for good: the worker abandons the block.
[[noreturn]] static void fault(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    record_fault(where() + ": " + buf);
    Worker* w = cur_worker;
    w->faulted = true;
    void* dummy = leave_context();
    switch_to(&dummy, w->sched_sp);
    __builtin_unreachable();
}

void trap(const char* file, int line) { fault("__trap() at %s:%d", file, line); }

// ------------------------------------------------------------------------------------------------
// Memory checks (called from the instrumentation hooks below and from the emulated instructions).
static void describe_stray(char* buf, size_t len, uintptr_t a, size_t n) {
    if (was_freed(a)) {
        snprintf(buf, len, "%zu-byte access at 0x%lx, inside device memory that was already freed", n, (unsigned long)a);
        return;
    }
    const Alloc* al = find_alloc(a);
    if (al && a < al->base + al->size)
        snprintf(buf, len, "%zu-byte access at 0x%lx runs %zu bytes past the end of allocation #%lu (%zu bytes at 0x%lx, access at offset %zu)",
                 n, (unsigned long)a, (size_t)(a + n - (al->base + al->size)), (unsigned long)al->id, al->size, (unsigned long)al->base,
                 (size_t)(a - al->base));
    else if (al)
        snprintf(buf, len, "%zu-byte access at 0x%lx is outside every device allocation: %zu bytes past the end of allocation #%lu (%zu bytes at 0x%lx)",
                 n, (unsigned long)a, (size_t)(a - (al->base + al->size)), (unsigned long)al->id, al->size, (unsigned long)al->base);
    else
        snprintf(buf, len, "%zu-byte access at 0x%lx is outside every device allocation", n, (unsigned long)a);
}

static inline void check_align(uintptr_t a, size_t n, const char* space) {
    if ((n == 2 || n == 4 || n == 8 || n == 16) && (a & (n - 1)))
        fault("misaligned %zu-byte %s access at 0x%lx (a %zu-byte access needs a %zu-byte aligned address)", n, space, (unsigned long)a, n, n);
}

static void global_access(Thread* t, uintptr_t a, size_t n, bool write, bool aligned = true) {
    const Alloc* al = find_alloc(a);
    if (!al || a + n > al->base + al->size || a < al->base) {
        char buf[512];
        describe_stray(buf, sizeof buf, a, n);
        fault("out-of-bounds global %s: %s", write ? "store" : "load", buf);
    }
    if (aligned) check_align(a, n, "global");
    const size_t off = a - al->base;
    if (write) {
        mark_written(al, a, n);
        al->wsec[off / 32] = 1;
        al->wsec[(off + n - 1) / 32] = 1;
    } else {
        // A sampled launch reads what the blocks it skipped would have written: no check then.
        for (size_t i = 0; i < n && !g_sample; ++i)
            if (!al->init[off + i])
                fault("uninitialised global load: %zu-byte read at 0x%lx (offset %zu of allocation #%lu, %zu bytes) of device memory that nothing has written",
                      n, (unsigned long)a, off + i, (unsigned long)al->id, al->size);
        al->rsec[off / 32] = 1;
        al->rsec[(off + n - 1) / 32] = 1;
    }
    const uint64_t bit = 1ull << cur_pick;
    if (!(al->touched->load(std::memory_order_relaxed) & bit)) al->touched->fetch_or(bit, std::memory_order_relaxed);
    // Counters: this access joins request number gseq of its warp.
    Worker* w = cur_worker;
    std::vector<GReq>& reqs = w->greq[t->warp];
    const uint32_t k = t->gseq++;
    if (k >= reqs.size()) reqs.resize(k + 1, GReq{{}, 0, 0});
    GReq& r = reqs[k];
    for (uint64_t s = a / 32; s <= (a + n - 1) / 32; ++s) {
        bool seen = false;
        for (uint32_t i = 0; i < r.n; ++i) seen |= r.sec[i] == s;
        if (seen) continue;
        if (r.n < 32) r.sec[r.n++] = s;
        else r.extra++;
    }
    w->stats.global_bytes += n;
}

// Where [a, a + n) lies in the running block's shared memory: the race records of its bytes, what a
// message calls that memory, and the offset in it. `race` is null unless the range is inside the
// launch's dynamic shared memory or one live static array.
struct SharedAt {
    Race* race;
    const char* space;
    size_t off;
};
static SharedAt shared_at(Worker* w, uintptr_t a, size_t n) {
    const uintptr_t d = reinterpret_cast<uintptr_t>(w->dyn);
    if (a >= d && a + n <= d + g_launch->smem) return {w->dyn_race + (a - d), "dynamic shared memory", a - d};
    for (Region& r : w->statics)
        if (r.epoch == w->epoch && a >= r.base && a + n <= r.base + r.size) return {r.race + (a - r.base), r.name, a - r.base};
    return {nullptr, nullptr, 0};
}

static void shared_stat(Thread* t, uintptr_t a, size_t n) {
    Worker* w = cur_worker;
    std::vector<SReq>& reqs = w->sreq[t->warp];
    const uint32_t k = t->sseq++;
    if (k >= reqs.size()) reqs.resize(k + 1, SReq{{}, 0, 0});
    SReq& r = reqs[k];
    r.addr[t->lane] = a;
    r.lanes |= 1u << t->lane;
    r.size = (uint8_t)std::max<size_t>(r.size, n);
}

// The race check (what compute-sanitizer's racecheck does): two threads of a block touching one
// byte of shared memory in one barrier phase, at least one of them writing, is a hazard unless
// both are lanes of one warp and a warp-level operation (__syncwarp, a shuffle, mma.sync, ldmatrix)
// completed between the two accesses. cp.async writes its destination at issue and again when its
// wait lands it; ldmatrix reads each lane's row. KILN_EMU_RACECHECK=0 turns the check off.
static const bool g_racecheck = [] {
    const char* e = getenv("KILN_EMU_RACECHECK");
    return !(e && e[0] == '0');
}();

// `other` is the other thread's linear index, or -1 with `other_warps` naming its warp.
static void race_fault(Worker* w, const char* what, bool other_wrote, int other, uint32_t other_warps, bool write, size_t n,
                       const SharedAt& at) {
    char who[96];
    if (other >= 0) {
        const Dim3& o = w->threads[other].tid;
        snprintf(who, sizeof who, "thread (%u, %u, %u)", o.x, o.y, o.z);
    } else {
        snprintf(who, sizeof who, "a thread of warp %d", __builtin_ctz(other_warps));
    }
    char since[160];
    if (w->phase_file) snprintf(since, sizeof since, "the __syncthreads at %s:%d", w->phase_file, w->phase_line);
    else snprintf(since, sizeof since, "the block's start");
    fault("shared-memory race (%s): this thread %s %zu byte(s) at %s byte %zu, which %s %s earlier with no barrier between "
          "(both since %s)",
          what, write ? "writes" : "reads", n, at.space, at.off, who, other_wrote ? "wrote" : "read", since);
}

static void race(Worker* w, Thread* t, const SharedAt& at, size_t n, bool write) {
    if (!g_racecheck || !at.race) return;
    Race* e = at.race;
    const uint32_t gen = w->warps[t->warp].gen;
    const uint32_t me = (uint32_t)t->lin + 1, wbit = 1u << t->warp;
    for (size_t i = 0; i < n; ++i, ++e) {
        if (e->phase != w->phase) *e = Race{w->phase, 0, 0, 0, 0, 0};
        if (e->writer && e->writer != me) {
            const int o = e->writer - 1;
            if (o / 32 != t->warp || e->wgen == gen)
                race_fault(w, write ? "write after write" : "read after write", true, o, 0, write, n, at);
        }
        if (write) {
            const uint32_t others = e->rwarps & ~wbit;
            if (others) race_fault(w, "write after read", false, -1, others, write, n, at);
            if (e->rwarps && e->rgen == gen && (e->rlanes & ~(1u << t->lane)))
                race_fault(w, "write after read", false, t->warp * 32 + __builtin_ctz(e->rlanes & ~(1u << t->lane)), 0, write, n, at);
            e->writer = (uint16_t)me;
            e->wgen = gen;
        } else {
            if (e->rwarps == wbit || e->rwarps == 0) {
                if (e->rwarps == 0 || gen != e->rgen) e->rlanes = 0;
                e->rgen = gen;
                e->rlanes |= 1u << t->lane;
            }
            e->rwarps |= wbit;
        }
    }
}

static inline void access(uintptr_t a, size_t n, bool write) {
    Thread* t = cur;
    if (!t) return;
    if (a - reinterpret_cast<uintptr_t>(t->stack_lo) < STACK) return;  // the thread's own locals
    if (a - g_arena < g_arena_size) return global_access(t, a, n, write);
    Worker* w = cur_worker;
    const uintptr_t d = reinterpret_cast<uintptr_t>(w->dyn);
    if (a - d < DYN_CAP) {
        if (a + n > d + g_launch->smem)
            fault("dynamic shared memory %s of %zu bytes at byte %zu, past the %zu bytes the launch gave", write ? "store" : "load", n,
                  (size_t)(a - d), g_launch->smem);
        check_align(a, n, "shared");
        shared_stat(t, a, n);
        race(w, t, {w->dyn_race + (a - d), "dynamic shared memory", a - d}, n, write);
        return;
    }
    for (Region& r : w->statics)
        if (a - r.base < r.size) {
            if (r.epoch != w->epoch) break;
            check_align(a, n, "shared");
            shared_stat(t, a, n);
            race(w, t, {r.race + (a - r.base), r.name, a - r.base}, n, write);
            return;
        }
    // Anything else (constant tables, the C library's own data) is not device memory kiln manages.
}

unsigned char* dyn_smem() { return cur_worker->dyn; }

void shared_static(void* p, size_t bytes, const char* name) {
    Worker* w = cur_worker;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    for (Region& r : w->statics)
        if (r.base == a) {
            if (r.epoch == w->epoch) return;
            r.epoch = w->epoch;
            w->static_bytes += bytes;
            goto poison;
        }
    w->statics.push_back({a, bytes, w->epoch, name, static_cast<Race*>(calloc(bytes, sizeof(Race)))});
    w->static_bytes += bytes;
poison:
    if (w->static_bytes + g_launch->smem > SHARED_OPTIN)
        fault("the block uses %zu bytes of static and %zu of dynamic shared memory, over sm_90's %zu", w->static_bytes, g_launch->smem, SHARED_OPTIN);
    memset(p, 0x7f, bytes);  // shared memory starts as garbage
}

// ------------------------------------------------------------------------------------------------
// Scheduling.
static inline void yield_to_scheduler() {
    Thread* t = cur;
    switch_to(&t->sp, cur_worker->sched_sp);
}

static void release_block(Worker* w) {
    w->phase++;
    w->phase_file = w->bar_file;
    w->phase_line = w->bar_line;
    w->arrived = 0;
    w->bar_file = nullptr;
    w->stats.barriers++;
    for (Thread& t : w->threads)
        if (t.state == State::WaitBlock) {
            t.state = State::Runnable;
            w->runq.push_back(t.lin);
        }
}

void block_barrier(const char* file, int line) {
    Worker* w = cur_worker;
    Thread* t = cur;
    if (w->arrived == 0) {
        w->bar_file = file;
        w->bar_line = line;
    } else if (w->bar_line != line || strcmp(w->bar_file, file) != 0) {
        fault("__syncthreads at %s:%d while other threads of the block wait at the one at %s:%d (every thread must reach the same barrier)",
              file, line, w->bar_file, w->bar_line);
    }
    if (++w->arrived == w->live) {
        release_block(w);
        return;
    }
    t->state = State::WaitBlock;
    yield_to_scheduler();
}

// The warp-level operations: every participating lane deposits its operands in slot[gen & 1], the
// last to arrive runs `done` over the whole warp and releases the others, and each lane then
// reads its results from the same slot (the next operation uses the other one).
template <typename F>
static Slot* warp_op(WarpOp kind, uint32_t mask, const char* file, int line, F&& fill, void (*done)(Warp&, Slot*)) {
    Worker* w = cur_worker;
    Thread* t = cur;
    Warp& wp = w->warps[t->warp];
    const uint32_t bit = 1u << t->lane;
    if (!(mask & bit)) fault("%s at %s:%d with a mask (0x%08x) that leaves out the calling lane %d", op_name(kind), file, line, mask, t->lane);
    if (mask & ~wp.live_mask) {
        const int gone = __builtin_ctz(mask & ~wp.live_mask);
        fault("%s at %s:%d names lane %d in its mask (0x%08x), but that lane has exited or does not exist", op_name(kind), file, line,
              gone, mask);
    }
    if (wp.arrived_mask == 0) {
        wp.kind = kind;
        wp.mask = mask;
        wp.file = file;
        wp.line = line;
    } else if (wp.kind != kind || wp.mask != mask) {
        fault("%s (mask 0x%08x) at %s:%d while other lanes of the warp wait at %s (mask 0x%08x) at %s:%d", op_name(kind), mask, file, line,
              op_name(wp.kind), wp.mask, wp.file, wp.line);
    }
    Slot* s = wp.slot[wp.gen & 1];
    fill(s[t->lane]);
    wp.arrived_mask |= bit;
    if (wp.arrived_mask == wp.mask) {
        if (done) done(wp, s);
        wp.arrived_mask = 0;
        wp.gen++;
        for (int l = 0; l < 32; ++l)
            if ((wp.mask >> l) & 1) {
                Thread& o = w->threads[t->warp * 32 + l];
                if (o.state == State::WaitWarp) {
                    o.state = State::Runnable;
                    w->runq.push_back(o.lin);
                }
            }
        return s;
    }
    t->state = State::WaitWarp;
    yield_to_scheduler();
    return s;
}

void warp_barrier(unsigned mask, const char* file, int line) {
    warp_op(WarpOp::Syncwarp, mask, file, line, [](Slot&) {}, nullptr);
}

static uint32_t shfl(unsigned mask, uint32_t v, int src, int width, const char* file, int line) {
    if (width <= 0 || width > 32 || (width & (width - 1))) fault("shuffle at %s:%d with width %d (must be a power of two up to 32)", file, line, width);
    Slot* s = warp_op(WarpOp::Shfl, mask, file, line, [&](Slot& sl) { sl.v = v; }, nullptr);
    const int lane = cur->lane;
    const int base = lane & ~(width - 1);
    const int from = base + (src & (width - 1));
    if (!((mask >> from) & 1)) return v;  // a lane outside the mask: the hardware's value is undefined; keep ours
    return s[from].v;
}
uint32_t shfl_xor(unsigned mask, uint32_t v, int lane_mask, int width, const char* file, int line) {
    const int lane = cur->lane;
    const int src = (lane ^ lane_mask);
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) return shfl(mask, v, lane & (width - 1), width, file, line);
    return shfl(mask, v, src, width, file, line);
}
uint32_t shfl_idx(unsigned mask, uint32_t v, int src_lane, int width, const char* file, int line) {
    return shfl(mask, v, src_lane, width, file, line);
}
uint32_t shfl_down(unsigned mask, uint32_t v, unsigned delta, int width, const char* file, int line) {
    const int lane = cur->lane;
    const int within = lane & (width - 1);
    const int src = within + (int)delta < width ? within + (int)delta : within;
    return shfl(mask, v, src, width, file, line);
}

static inline float bf16_bits(uint32_t h) {
    uint32_t u = (h & 0xffffu) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 from the PTX ISA's fragment tables ("Matrix
// Fragments for mma.m16n8k16 with floating point type"), g = lane >> 2, t = lane % 4, element i of
// a lane's fragment (register i / 2, low half for even i):
//   A: row g for i in {0, 1, 4, 5}, else g + 8; column 2t + (i & 1), + 8 for i >= 4;
//   B: row 2t + (i & 1), + 8 for i >= 2; column g;
//   C, D: row g for i < 2, else g + 8; column 2t + (i & 1).
// The last lane to arrive rebuilds A (16 x 16), B (16 x 8) and C, and computes every lane's D
// (products summed exactly in double, rounded once to f32) into the lanes' c slots.
static void mma_done(Warp& wp, Slot* s) {
    (void)wp;
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l % 4;
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = bf16_bits(s[l].a[i / 2] >> (16 * (i & 1)));
        }
        for (int i = 0; i < 4; ++i) B[t * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] = bf16_bits(s[l].b[i / 2] >> (16 * (i & 1)));
        for (int i = 0; i < 4; ++i) C[i < 2 ? g : g + 8][t * 2 + (i & 1)] = s[l].c[i];
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l % 4;
        for (int i = 0; i < 4; ++i) {
            const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
            double acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += (double)A[row][k] * (double)B[k][col];
            s[l].c[i] = (float)acc;
        }
    }
    cur_worker->stats.mma++;
}

void count_flops(uint64_t n) {
    if (cur_worker) cur_worker->stats.flops += n;
}

void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    Slot* s = warp_op(WarpOp::Mma, 0xffffffffu, "mma.sync", 0, [&](Slot& sl) {
        memcpy(sl.a, a, 16);
        memcpy(sl.b, b, 8);
        memcpy(sl.c, d, 16);
    }, mma_done);
    memcpy(d, s[cur->lane].c, 16);
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA, "ldmatrix"): lanes 8q .. 8q + 7 give
// the row addresses of matrix q (8 contiguous b16 each, 16-byte aligned); register q of lane l gets
// row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (low half first); with .trans, element l / 4 of
// the addressed rows 2 (l % 4) and 2 (l % 4) + 1.
static void ldmatrix_done(Warp& wp, Slot* s) {
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l % 4;
        for (int q = 0; q < 4; ++q) {
            uint32_t v = 0;
            for (int j = 0; j < 2; ++j) {
                const uint16_t* row = static_cast<const uint16_t*>(s[8 * q + (wp.trans ? 2 * t + j : g)].addr);
                v |= (uint32_t)row[wp.trans ? g : 2 * t + j] << (16 * j);
            }
            s[l].r[q] = v;
        }
    }
}

void ldmatrix_x4(uint32_t r[4], const void* p, bool trans) {
    Worker* w = cur_worker;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a & 15) fault("ldmatrix row address 0x%lx is not 16-byte aligned", (unsigned long)a);
    const SharedAt at = shared_at(w, a, 16);
    if (!at.race) fault("ldmatrix row address 0x%lx (16 bytes) is not inside the block's shared memory", (unsigned long)a);
    shared_stat(cur, a, 16);
    race(w, cur, at, 16, false);
    w->warps[cur->warp].trans = trans;
    Slot* s = warp_op(WarpOp::Ldmatrix, 0xffffffffu, "ldmatrix", 0, [&](Slot& sl) { sl.addr = p; }, ldmatrix_done);
    memcpy(r, s[cur->lane].r, 16);
}

// cp.async: checked and counted at issue (a 16-byte global read, a 16-byte shared write); the
// destination fills with garbage at once and the bytes land only when a wait retires the group,
// so a read that misses its wait or barrier sees garbage.
void cp_async_16(void* dst, const void* src, bool valid) {
    Thread* t = cur;
    Worker* w = cur_worker;
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), a = reinterpret_cast<uintptr_t>(src);
    if (d & 15) fault("cp.async shared destination 0x%lx is not 16-byte aligned", (unsigned long)d);
    const SharedAt at = shared_at(w, d, 16);
    if (!at.race) fault("cp.async destination 0x%lx (16 bytes) is not inside the block's shared memory", (unsigned long)d);
    if (valid) {
        if (a & 15) fault("cp.async global source 0x%lx is not 16-byte aligned", (unsigned long)a);
        if (a - g_arena >= g_arena_size) fault("cp.async source 0x%lx is not device memory", (unsigned long)a);
        global_access(t, a, 16, false);
    }
    shared_stat(t, d, 16);
    race(w, t, at, 16, true);
    memset(dst, 0x7f, 16);
    t->cp_open.push_back({dst, src, valid});
}
void cp_async_commit() {
    Thread* t = cur;
    t->cp_groups.push_back(std::move(t->cp_open));
    t->cp_open.clear();
}
void cp_async_wait(int n) {
    Thread* t = cur;
    Worker* w = cur_worker;
    while ((int)t->cp_groups.size() > n) {
        for (const Copy& c : t->cp_groups.front()) {
            // Checked at issue to lie in the block's shared memory, where it still is.
            race(w, t, shared_at(w, reinterpret_cast<uintptr_t>(c.dst), 16), 16, true);
            if (c.valid) memcpy(c.dst, c.src, 16);
            else memset(c.dst, 0, 16);
        }
        t->cp_groups.erase(t->cp_groups.begin());
    }
}

// ------------------------------------------------------------------------------------------------
// Hopper (sm_90, sm_90a): shared addresses, mbarriers, TMA tiled loads and wgmma, each from the PTX
// ISA's description of the instruction. The operands live in the block's dynamic shared memory.
// The race check does not see the copy engine's writes or the tensor cores' reads (they are
// ordered by mbarriers and wgmma.wait_group, not barriers); instead a TMA destination holds garbage
// until its mbarrier phase completes, and a wgmma's shared memory must not change until every
// thread of the warpgroup has retired it.

// The shared address of the dynamic shared memory's first byte: deliberately not a multiple of
// 1024, so a kernel that needs an aligned swizzle atom must align it itself, as on a GPU, where
// dynamic shared memory is only guaranteed 16-byte alignment.
constexpr uint32_t SMEM_WINDOW = 0x410;

uint32_t smem_addr(const void* p) {
    Worker* w = cur_worker;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p), d = reinterpret_cast<uintptr_t>(w->dyn);
    if (a - d >= DYN_CAP)
        fault("shared address of 0x%lx requested: the emulator gives shared addresses (mbarriers, TMA destinations, wgmma "
              "descriptors) only in dynamic shared memory", (unsigned long)a);
    return SMEM_WINDOW + (uint32_t)(a - d);
}

// The bytes [s, s + n) of the shared window, checked to lie in the launch's dynamic shared memory.
static unsigned char* smem_bytes(uint32_t s, size_t n, const char* what) {
    if (s < SMEM_WINDOW || s - SMEM_WINDOW + n > g_launch->smem)
        fault("%s at shared address 0x%x (%zu bytes) is outside the launch's %zu bytes of dynamic shared memory (shared addresses "
              "0x%x to 0x%zx)", what, s, n, g_launch->smem, SMEM_WINDOW, SMEM_WINDOW + g_launch->smem);
    return cur_worker->dyn + (s - SMEM_WINDOW);
}

// mbarrier.init/arrive/expect_tx/try_wait.parity (PTX ISA, "Parallel Synchronization and
// Communication Instructions: mbarrier"): the object is 8 bytes, 8-byte aligned, in shared memory.
static uint32_t mbar_off(const void* bar, const char* what) {
    const uint32_t s = smem_addr(bar);
    if (s & 7) fault("%s: the mbarrier at shared address 0x%x is not 8-byte aligned", what, s);
    smem_bytes(s, 8, what);
    return s - SMEM_WINDOW;
}
static Mbar& mbar_at(uint32_t off, const char* what) {
    auto it = cur_worker->mbars.find(off);
    if (it == cur_worker->mbars.end())
        fault("%s on dynamic shared memory byte %u, where no mbarrier.init made an mbarrier", what, off);
    return it->second;
}

void mbar_init(void* bar, unsigned count) {
    const uint32_t off = mbar_off(bar, "mbarrier.init");
    if (count == 0 || count >= (1u << 20)) fault("mbarrier.init with an expected arrival count of %u (1 to 2^20 - 1)", count);
    cur_worker->mbars[off] = Mbar{count, count, 0, 0, {}};
}

// Completes the current phase: the copies that signalled it land, the next phase begins, and the
// threads waiting for this one resume.
static void mbar_complete(Worker* w, uint32_t off, Mbar& m) {
    for (const Landing& l : m.landings) memcpy(l.dst, l.bytes.data(), l.bytes.size());
    m.landings.clear();
    m.phase++;
    m.pending = m.count;
    m.tx = 0;
    for (Thread& t : w->threads)
        if (t.state == State::WaitMbar && t.mbar_off == off && (m.phase & 1) != t.mbar_parity) {
            t.state = State::Runnable;
            w->runq.push_back(t.lin);
        }
}

// The transaction count moves by `bytes` (expect_tx adds, a copy's complete_tx subtracts).
static void mbar_tx(uint32_t off, int64_t bytes) {
    Mbar& m = mbar_at(off, "an mbarrier transaction");
    m.tx += bytes;
    if (m.tx >= (1 << 20) || m.tx <= -(1 << 20))
        fault("the transaction count of the mbarrier at dynamic shared memory byte %u reached %lld (its range is +-(2^20 - 1))", off,
              (long long)m.tx);
    if (m.pending == 0 && m.tx == 0) mbar_complete(cur_worker, off, m);
}

void mbar_arrive(void* bar, uint32_t expect_tx) {
    const uint32_t off = mbar_off(bar, "mbarrier.arrive");
    Mbar& m = mbar_at(off, "mbarrier.arrive");
    m.tx += expect_tx;
    m.pending--;
    if (m.pending == 0 && m.tx == 0) mbar_complete(cur_worker, off, m);
}

void mbar_expect_tx(void* bar, uint32_t bytes) {
    const uint32_t off = mbar_off(bar, "mbarrier.expect_tx");
    mbar_tx(off, bytes);
}

// try_wait.parity waits for the phase of the given parity to complete: the phase in progress has
// parity (phases completed) & 1. The emulator blocks the thread until then and returns true.
bool mbar_try_wait(void* bar, uint32_t parity) {
    const uint32_t off = mbar_off(bar, "mbarrier.try_wait");
    const Mbar& m = mbar_at(off, "mbarrier.try_wait");
    if ((m.phase & 1) != (parity & 1)) return true;
    Thread* t = cur;
    t->state = State::WaitMbar;
    t->mbar_off = off;
    t->mbar_parity = parity & 1;
    yield_to_scheduler();
    return true;
}

// A tensor map as kiln_emu_tensor_map_encode_tiled writes it into a CUtensorMap's 128 bytes (the
// driver's own encoding is not documented; the parameters and the rules they must meet are).
struct TensorMap {
    uint32_t magic;
    uint8_t elem, rank, swizzle, pad;
    uint64_t addr;
    uint32_t dims[5];
    uint32_t pad2;
    uint64_t strides[4];  // bytes between consecutive indices of dimensions 1 .. rank - 1
    uint16_t box[5];
};
static_assert(sizeof(TensorMap) <= 128, "a CUtensorMap has 128 bytes");
constexpr uint32_t TENSOR_MAP_MAGIC = 0x6b544d31;  // "1MTk"

// The swizzle of the 128B/64B/32B modes (TMA and wgmma alike): bits 4.. of a shared address XORed
// with the bits from 7 up, 3, 2 or 1 of them (the 16-byte chunk within a `span`-byte row, XOR the
// row within the 8-row atom).
static inline uint32_t swizzle(uint32_t a, unsigned span) { return span ? a ^ (((a >> 7) & (span / 16 - 1)) << 4) : a; }

// cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes: the box at `c` lands
// at dst (row-major, the innermost dimension contiguous, swizzled), elements outside the tensor
// zero; the copy signals complete_tx with the whole box's bytes on the mbarrier.
void tma_load(void* dst, const void* map, const int* c, int n, void* bar) {
    Thread* t = cur;
    TensorMap m;
    memcpy(&m, map, sizeof m);
    if (m.magic != TENSOR_MAP_MAGIC)
        fault("cp.async.bulk.tensor with a tensor map the emulator did not encode (make it with Cuda::tensor_map_2d)");
    if (n != m.rank) fault("cp.async.bulk.tensor.%dd with a tensor map of rank %d", n, m.rank);
    const uint32_t s = smem_addr(dst);
    const size_t row = (size_t)m.box[0] * m.elem;
    size_t total = row;
    for (int i = 1; i < m.rank; ++i) total *= m.box[i];
    const uint32_t align = m.swizzle ? 8u * m.swizzle : 128u;
    if (s % align)
        fault("TMA destination at shared address 0x%x is not %u-byte aligned (%s)", s, align,
              m.swizzle ? "a swizzled box starts on its swizzle atom: 8 rows of the swizzle span" : "the copy engine's rule");
    if (m.swizzle && row != m.swizzle)
        fault("TMA box rows of %zu bytes with the %u-byte swizzle: the emulator takes rows that span the swizzle exactly", row, m.swizzle);
    unsigned char* base = smem_bytes(s, total, "TMA destination");
    const uint32_t off = mbar_off(bar, "cp.async.bulk.tensor");
    mbar_at(off, "cp.async.bulk.tensor");
    Landing l{base, std::vector<unsigned char>(total, 0)};
    const size_t rows = total / row;
    std::vector<unsigned char> line(row);
    for (size_t r = 0; r < rows; ++r) {
        // The outer coordinates of box row r; a row outside the tensor is all zeros.
        bool inside = true;
        uint64_t goff = 0;
        size_t rest = r;
        for (int i = 1; i < m.rank; ++i) {
            const int64_t ci = (int64_t)c[i] + (int64_t)(rest % m.box[i]);
            rest /= m.box[i];
            if (ci < 0 || ci >= (int64_t)m.dims[i]) inside = false;
            else goff += (uint64_t)ci * m.strides[i - 1];
        }
        std::fill(line.begin(), line.end(), 0);
        if (inside) {
            const int64_t x0 = std::max<int64_t>(c[0], 0), x1 = std::min<int64_t>((int64_t)c[0] + m.box[0], m.dims[0]);
            if (x0 < x1) {
                const uintptr_t ga = m.addr + goff + (uint64_t)x0 * m.elem;
                const size_t len = (size_t)(x1 - x0) * m.elem;
                // Counted as the copy engine moves it: each 32-byte sector once.
                for (uintptr_t a = ga; a < ga + len;) {
                    const uintptr_t e = std::min<uintptr_t>(ga + len, (a / 32 + 1) * 32);
                    global_access(t, a, e - a, false, false);
                    a = e;
                }
                memcpy(line.data() + (x0 - c[0]) * m.elem, reinterpret_cast<const void*>(ga), len);
            }
        }
        for (size_t b = 0; b < row; b += 16) {
            const uint32_t at = swizzle(s + (uint32_t)(r * row + b), m.swizzle) - s;
            memcpy(l.bytes.data() + at, line.data() + b, 16);
        }
    }
    memset(base, 0x7f, total);  // garbage until the phase completes
    Mbar& mb = mbar_at(off, "cp.async.bulk.tensor");
    mb.landings.push_back(std::move(l));
    mbar_tx(off, -(int64_t)total);
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 with A and B in shared memory, each K-major
// or, with its imm-trans flag, MN-major (PTX ISA, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate": "Matrix Descriptor", "Shared Memory Matrix Layout" and "Major-ness
// supported by Strides"). A descriptor holds the start address >> 4 (bits 0-13), the
// leading-dimension byte offset >> 4 (16-29), the stride-dimension byte offset >> 4 (32-45), a
// base offset (49-51) and the swizzle mode (62-63: none, 128B, 64B, 32B).
static unsigned desc_swizzle(uint64_t d) {
    static const unsigned span[4] = {0, 128, 64, 32};
    return span[d >> 62];
}
static void desc_check(uint64_t d, const char* which, int mn_major) {
    if ((d >> 49) & 7) fault("wgmma %s descriptor with a base offset of %u: the emulator takes swizzle atoms aligned to their size", which,
                             (unsigned)((d >> 49) & 7));
    const unsigned span = desc_swizzle(d);
    const uint32_t start = (uint32_t)(d & 0x3fff) << 4;
    if (span && mn_major && start % (8 * span))
        fault("wgmma %s descriptor (MN-major): the %u-byte swizzle atom at shared address 0x%x is not aligned to %u bytes (the "
              "emulator takes MN-major operands that start on an atom)", which, span, start, 8 * span);
    if (span && !mn_major && start % span + 32 > span)
        fault("wgmma %s descriptor: the 16 K elements at shared address 0x%x cross the %u-byte swizzle row", which, start, span);
    if (span && !mn_major && (start - start % span) % (8 * span))
        fault("wgmma %s descriptor: the %u-byte swizzle atom at shared address 0x%x is not aligned to %u bytes", which, span,
              start - start % span, 8 * span);
}
// Element (r, k) of an operand (r its row in M or N). K-major: core matrices of 8 rows of 16
// bytes; without a swizzle a core matrix is 128 contiguous bytes, the next in K `lbo` bytes on and
// the next 8 rows `sbo` bytes on; with one, a row of the atom is `span` bytes of K, 8 rows make the
// atom and the next 8 rows are `sbo` bytes on. MN-major: the roles turn; a line of the atom holds
// M or N elements for one k. Without a swizzle a core matrix is 8 lines of k of 16 bytes (8
// elements of M or N), the next 8 elements of M or N `sbo` bytes on and the next 8 k `lbo` bytes
// on; with one, a line is `span` bytes of M or N, 8 lines (8 k) make the atom, the next `span` / 2
// elements of M or N are `lbo` bytes on and the next 8 k `sbo` bytes on. The 16-byte chunks are
// swizzled by address in every mode.
static uint32_t operand_addr(uint64_t d, int r, int k, int mn_major) {
    const uint32_t start = (uint32_t)(d & 0x3fff) << 4, lbo = (uint32_t)((d >> 16) & 0x3fff) << 4,
                   sbo = (uint32_t)((d >> 32) & 0x3fff) << 4;
    const unsigned span = desc_swizzle(d);
    if (mn_major) {
        if (!span) return start + (r / 8) * sbo + (r % 8) * 2 + (k / 8) * lbo + (k % 8) * 16;
        const unsigned e = span / 2;
        return swizzle(start + (r / e) * lbo + (k / 8) * sbo + (k % 8) * span + (r % e) * 2, span);
    }
    if (!span) return start + (r / 8) * sbo + (r % 8) * 16 + (k / 8) * lbo + (k % 8) * 2;
    return swizzle(start + (r / 8) * sbo + (r % 8) * span + k * 2, span);
}
static void wg_read(uint64_t d, int rows, int mn_major, std::vector<uint16_t>& out) {
    out.resize((size_t)rows * 16);
    for (int r = 0; r < rows; ++r)
        for (int k = 0; k < 16; ++k) memcpy(&out[r * 16 + k], smem_bytes(operand_addr(d, r, k, mn_major), 2, "wgmma operand"), 2);
}

void wgmma_bf16(float* d, int n, uint64_t da, uint64_t db, int scale_d, int trans_a, int trans_b) {
    Thread* t = cur;
    Worker* w = cur_worker;
    const int g = t->warp / 4;
    if ((int)w->threads.size() < 128 * (g + 1))
        fault("wgmma from warp %d, in a block of %zu threads: a warpgroup is 4 whole warps (128 threads)", t->warp, w->threads.size());
    if (n < 8 || n > 256 || n % 8) fault("wgmma with N = %d (8 to 256, a multiple of 8)", n);
    std::vector<WgOp>& ops = w->wg_ops[g];
    const uint32_t seq = t->wg_seq++;
    if (seq == ops.size()) {
        desc_check(da, "A", trans_a);
        desc_check(db, "B", trans_b);
        WgOp op{da, db, n, scale_d, trans_a, trans_b, {}, {}, 128};
        wg_read(da, 64, trans_a, op.a);
        wg_read(db, n, trans_b, op.b);
        ops.push_back(std::move(op));
        w->stats.mma += (uint64_t)n / 2;  // 64 x n x 16: n / 2 mma.sync.m16n8k16 of work
    } else {
        const WgOp& op = ops[seq];
        if (op.da != da || op.db != db || op.n != n || op.scale_d != scale_d || op.trans_a != trans_a || op.trans_b != trans_b)
            fault("wgmma number %u of warpgroup %d: this thread's operands (A 0x%lx, B 0x%lx, N %d, scale-d %d, trans %d %d) differ "
                  "from those another thread of the warpgroup gave (A 0x%lx, B 0x%lx, N %d, scale-d %d, trans %d %d)", seq, g,
                  (unsigned long)da, (unsigned long)db, n, scale_d, trans_a, trans_b, (unsigned long)op.da, (unsigned long)op.db,
                  op.n, op.scale_d, op.trans_a, op.trans_b);
    }
    t->wg_open.push_back({d, seq});
}

// Retires one wgmma for this thread: its accumulators, in the layout of the PTX ISA's "Matrix
// Fragments for wgmma .m64nNk16" (warp q of the warpgroup holds rows 16q .. 16q + 15; register
// 4j + i of lane l: row 16q + l / 4 (+ 8 for i >= 2), column 8j + 2 (l % 4) + (i & 1)), products
// summed exactly and rounded once, as the emulated mma.sync does.
static void wg_retire(Worker* w, Thread* t, const WgPending& p) {
    WgOp& op = w->wg_ops[t->warp / 4][p.op];
    const int q = t->warp % 4, lane = t->lane;
    for (int j = 0; j < op.n / 8; ++j)
        for (int i = 0; i < 4; ++i) {
            const int row = 16 * q + lane / 4 + (i >= 2 ? 8 : 0), col = 8 * j + 2 * (lane % 4) + (i & 1);
            double acc = op.scale_d ? p.d[4 * j + i] : 0.0;
            for (int k = 0; k < 16; ++k) acc += (double)bf16_bits(op.a[row * 16 + k]) * (double)bf16_bits(op.b[col * 16 + k]);
            p.d[4 * j + i] = (float)acc;
        }
    if (--op.outstanding == 0) {
        std::vector<uint16_t> a, b;
        wg_read(op.da, 64, op.trans_a, a);
        wg_read(op.db, op.n, op.trans_b, b);
        if (a != op.a || b != op.b)
            fault("the shared memory of wgmma number %u of warpgroup %d changed before every thread's wgmma.wait_group retired it (the "
                  "tensor cores read it until then)", p.op, t->warp / 4);
        op.a = {};
        op.b = {};
    }
}

void wgmma_commit() {
    Thread* t = cur;
    t->wg_groups.push_back(std::move(t->wg_open));
    t->wg_open.clear();
}

void wgmma_wait(int n) {
    Thread* t = cur;
    Worker* w = cur_worker;
    while ((int)t->wg_groups.size() > n) {
        for (const WgPending& p : t->wg_groups.front()) wg_retire(w, t, p);
        t->wg_groups.erase(t->wg_groups.begin());
    }
}

// setmaxnreg.{inc,dec}.sync.aligned.u32: a warpgroup asks for a new per-thread register count. The
// emulated threads have no register file, so only the operand is checked (PTX ISA: 24 to 256, a
// multiple of 8).
void setmaxnreg(int regs) {
    if (regs < 24 || regs > 256 || regs % 8) fault("setmaxnreg %d: the count must be 24 to 256 and a multiple of 8", regs);
}

static void thread_exit(Worker* w, Thread* t) {
    if (!t->cp_open.empty() || !t->cp_groups.empty()) fault("the thread exits with cp.async copies it never waited for");
    if (!t->wg_open.empty() || !t->wg_groups.empty()) fault("the thread exits with wgmma operations no wgmma.wait_group retired");
    Warp& wp = w->warps[t->warp];
    const uint32_t bit = 1u << t->lane;
    if (wp.arrived_mask && (wp.mask & bit))
        fault("the thread exits while lanes of its warp wait for it at %s (%s:%d)", op_name(wp.kind), wp.file, wp.line);
    wp.live--;
    wp.live_mask &= ~bit;
    t->state = State::Exited;
    w->live--;
    if (w->arrived > 0 && w->arrived == w->live) release_block(w);
}

static void fiber_main() {
    Worker* w = cur_worker;
    Thread* t = cur;
    g_launch->entry(g_launch->args);
    thread_exit(w, t);
    void* dummy = leave_context();
    switch_to(&dummy, w->sched_sp);
    __builtin_unreachable();
}

// Bank conflicts of one shared request: the 32 banks are 4 bytes wide; 8-byte accesses are served
// a half-warp at a time, 16-byte ones a quarter-warp; in each phase the wavefronts are the most
// distinct 4-byte words any one bank holds.
static void bank_stats(const SReq& r, Stats& st) {
    const int per_phase = r.size <= 4 ? 32 : r.size == 8 ? 16 : 8;
    for (int p = 0; p < 32; p += per_phase) {
        uint64_t words[32][8];
        int nw[32] = {0};
        bool any = false;
        int worst = 0;
        for (int l = p; l < p + per_phase; ++l) {
            if (!((r.lanes >> l) & 1)) continue;
            any = true;
            const uintptr_t a = r.addr[l];
            for (uintptr_t wd = a / 4; wd <= (a + std::max<int>(r.size, 1) - 1) / 4; ++wd) {
                const int bank = wd % 32;
                bool seen = false;
                for (int i = 0; i < nw[bank]; ++i) seen |= words[bank][i] == wd;
                if (!seen && nw[bank] < 8) words[bank][nw[bank]++] = wd;
                worst = std::max(worst, nw[bank]);
            }
        }
        if (any) {
            st.shared_wavefronts += worst;
            st.shared_ideal += 1;
        }
    }
    st.shared_requests++;
}

static void finish_block_stats(Worker* w, int warps) {
    for (int i = 0; i < warps; ++i) {
        for (const GReq& r : w->greq[i]) {
            if (r.n == 0 && r.extra == 0) continue;
            w->stats.global_requests++;
            w->stats.global_sectors += r.n + r.extra;
        }
        w->greq[i].clear();
        for (const SReq& r : w->sreq[i])
            if (r.lanes) bank_stats(r, w->stats);
        w->sreq[i].clear();
    }
}

static void run_block(Worker* w, Dim3 b) {
    const Launch& L = g_launch->dims;
    const int n = (int)(L.block.x * L.block.y * L.block.z);
    const int warps = (n + 31) / 32;
    cur_block = b;
    w->epoch++;
    w->phase++;
    w->phase_file = nullptr;
    w->static_bytes = 0;
    w->faulted = false;
    while ((int)w->stacks.size() < n) {
        void* p = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            record_fault("cannot allocate fiber stacks for the emulated threads");
            return;
        }
        w->stacks.push_back(static_cast<char*>(p));
    }
    w->threads.resize(n);
    for (int i = 0; i < warps; ++i) {
        Warp& wp = w->warps[i];
        const int lanes = std::min(32, n - 32 * i);
        wp.live = lanes;
        wp.live_mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
        wp.arrived_mask = 0;
        wp.gen = 0;
    }
    w->live = n;
    w->arrived = 0;
    w->runq.clear();
    w->mbars.clear();
    for (auto& ops : w->wg_ops) ops.clear();
    w->sched_sp = scheduler_context();
    memset(w->dyn, 0x7f, g_launch->smem);
    for (int i = 0; i < n; ++i) {
        Thread& t = w->threads[i];
        t.tid = {(unsigned)(i % L.block.x), (unsigned)((i / L.block.x) % L.block.y), (unsigned)(i / (L.block.x * L.block.y))};
        t.lin = i;
        t.lane = i % 32;
        t.warp = i / 32;
        t.stack_lo = w->stacks[i];
        t.sp = fiber_init(t.stack_lo);
        t.state = State::Runnable;
        t.gseq = t.sseq = 0;
        t.cp_open.clear();
        t.cp_groups.clear();
        t.wg_open.clear();
        t.wg_groups.clear();
        t.wg_seq = 0;
        w->runq.push_back(i);
    }
    while (!w->runq.empty()) {
        const int i = w->runq.front();
        w->runq.pop_front();
        cur = &w->threads[i];
        switch_to(&w->sched_sp, cur->sp);
        cur = nullptr;
        if (w->faulted) return;
    }
    if (w->live > 0) {
        // Deadlock: some live threads wait at a barrier others never reach.
        std::string msg;
        int at_block = 0, at_warp = 0;
        int at_mbar = 0;
        const Thread* first_block = nullptr;
        const Thread* first_warp = nullptr;
        const Thread* first_mbar = nullptr;
        for (const Thread& t : w->threads) {
            if (t.state == State::WaitBlock) { at_block++; if (!first_block) first_block = &t; }
            if (t.state == State::WaitWarp) { at_warp++; if (!first_warp) first_warp = &t; }
            if (t.state == State::WaitMbar) { at_mbar++; if (!first_mbar) first_mbar = &t; }
        }
        char buf[768];
        if (first_mbar) {
            const Mbar& m = w->mbars[first_mbar->mbar_off];
            snprintf(buf, sizeof buf,
                     "mbarrier deadlock: %d thread(s) wait for the phase of parity %u of the mbarrier at dynamic shared memory byte %u, "
                     "which never completes (%u of %u arrivals pending, transaction count %lld)%s",
                     at_mbar, first_mbar->mbar_parity, first_mbar->mbar_off, m.pending, m.count, (long long)m.tx,
                     at_block ? ", while other threads wait at __syncthreads" : "");
            first_block = first_mbar;
        } else if (first_block && first_warp) {
            const Warp& wp = w->warps[first_warp->warp];
            snprintf(buf, sizeof buf,
                     "barrier deadlock: %d thread(s) wait at __syncthreads (%s:%d) while %d wait at %s (%s:%d), e.g. thread %u; "
                     "a barrier is not reached by every live thread of the block",
                     at_block, w->bar_file, w->bar_line, at_warp, op_name(wp.kind), wp.file, wp.line, first_warp->tid.x);
        } else if (first_warp) {
            const Warp& wp = w->warps[first_warp->warp];
            snprintf(buf, sizeof buf, "barrier deadlock: %d lane(s) wait at %s (%s:%d) for lanes of their warp that never arrive", at_warp,
                     op_name(wp.kind), wp.file, wp.line);
        } else {
            snprintf(buf, sizeof buf, "barrier deadlock: %d thread(s) wait at __syncthreads (%s:%d) that %d other live thread(s) never reach",
                     at_block, w->bar_file, w->bar_line, w->live - at_block);
        }
        cur = first_block ? const_cast<Thread*>(first_block) : const_cast<Thread*>(first_warp);
        record_fault(where() + ": " + buf);
        cur = nullptr;
        return;
    }
    // Every thread of a warpgroup issues each of its wgmma (.sync.aligned): one that some never
    // issued is still outstanding here.
    for (int g = 0; g < 8; ++g)
        for (size_t i = 0; i < w->wg_ops[g].size(); ++i)
            if (w->wg_ops[g][i].outstanding) {
                char buf[256];
                snprintf(buf, sizeof buf, "wgmma number %zu of warpgroup %d was issued by %d of its 128 threads: all of them must issue it",
                         i, g, 128 - w->wg_ops[g][i].outstanding);
                record_fault(where() + ": " + buf);
                return;
            }
    finish_block_stats(w, warps);
}

// ------------------------------------------------------------------------------------------------
// The worker pool.
struct Pool {
    std::mutex mu;
    std::condition_variable cv, done_cv;
    uint64_t gen = 0;
    int busy = 0;
    std::vector<std::thread> threads;
    std::vector<Worker*> workers;
};
static Pool* g_pool = nullptr;

static void work(Worker* w) {
    LaunchState* L = g_launch;
    cur_worker = w;
    cur_launch = &L->dims;
    w->stats = Stats{};
    const uint64_t gx = L->dims.grid.x, gy = L->dims.grid.y;
    for (;;) {
        if (L->abort.load()) break;
        const uint64_t n = L->next.fetch_add(1);
        if (n >= (L->picks.empty() ? L->total_blocks : L->picks.size())) break;
        const uint64_t i = L->picks.empty() ? n : L->picks[n];
        cur_pick = L->picks.empty() ? 0 : (unsigned)n;
        run_block(w, Dim3{(unsigned)(i % gx), (unsigned)((i / gx) % gy), (unsigned)(i / (gx * gy))});
    }
    {
        std::lock_guard<std::mutex> g(L->mu);
        L->stats.add(w->stats);
    }
    cur_worker = nullptr;
    cur_launch = nullptr;
}

static int worker_count() {
    if (const char* e = getenv("KILN_EMU_THREADS")) {
        const int n = atoi(e);
        if (n > 0) return n;
    }
    const unsigned n = std::thread::hardware_concurrency();
    return n ? (int)n : 1;
}

static Worker* new_worker() {
    Worker* w = new Worker();
    void* p = mmap(nullptr, DYN_CAP, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    w->dyn = static_cast<unsigned char*>(p);
    void* r = mmap(nullptr, DYN_CAP * sizeof(Race), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    w->dyn_race = static_cast<Race*>(r);
    return w;
}

static void pool_start() {
    if (g_pool) return;
    g_pool = new Pool();
    const int n = worker_count();
    for (int i = 0; i < n; ++i) g_pool->workers.push_back(new_worker());
    // Worker 0 is the launching thread itself; the others wait for launches.
    for (int i = 1; i < n; ++i) {
        Worker* w = g_pool->workers[i];
        g_pool->threads.emplace_back([w] {
            uint64_t seen = 0;
            for (;;) {
                {
                    std::unique_lock<std::mutex> lk(g_pool->mu);
                    g_pool->cv.wait(lk, [&] { return g_pool->gen != seen; });
                    seen = g_pool->gen;
                }
                work(w);
                std::lock_guard<std::mutex> g(g_pool->mu);
                if (--g_pool->busy == 0) g_pool->done_cv.notify_all();
            }
        });
        g_pool->threads.back().detach();
    }
}

// The distinct sectors one direction of a launch touched in one allocation (its sector map), or,
// when only a sample of the blocks ran (scale = all blocks / blocks run > 1), an estimate of what
// all of them would touch. The sample's count times the scale is right when blocks touch disjoint
// data (a row kernel's rows, AdamW's chunks) and too high when they share it (a GEMM's operand
// tiles, a norm's weights); where every sampled block touched the allocation (`shared`), it is
// capped by the span from the first sector touched to the last, which the sample (holding the
// grid's first and last blocks) covers.
static double sector_estimate(const uint8_t* map, size_t secs, double scale, bool shared) {
    size_t first = secs, last = 0, n = 0;
    for (size_t i = 0; i < secs; ++i)
        if (map[i]) {
            n++;
            first = std::min(first, i);
            last = i;
        }
    if (n == 0 || scale <= 1.0) return (double)n;
    const double scaled = (double)n * scale;
    return shared ? std::min((double)(last - first + 1), scaled) : scaled;
}

// The `n` blocks a sampled launch runs, as linear indices x + gx * yz, sorted: spread evenly along
// the grid's x and, independently, along the rest (y and z), from block 0 to the last block, so a
// per-block cost that grows along x (a causal attention's query tiles) or along y (a GEMM's rows of
// tiles) is averaged over its whole range. Where two picks coincide (a short dimension), the
// duplicate is replaced by the nearest block not yet picked.
static std::vector<uint64_t> sample_blocks(uint64_t gx, uint64_t gyz, uint64_t n) {
    const uint64_t total = gx * gyz;
    std::vector<uint64_t> picks;
    std::vector<bool> taken(total, false);
    for (uint64_t j = 0; j < n; ++j) {
        const uint64_t x = (j * (gx - 1) + (n - 1) / 2) / (n - 1), yz = (j * (gyz - 1) + (n - 1) / 2) / (n - 1);
        const uint64_t at = x + gx * yz;
        uint64_t i = at;
        for (uint64_t d = 1; taken[i]; ++d) {
            if (at + d < total && !taken[at + d]) i = at + d;
            else if (at >= d && !taken[at - d]) i = at - d;
        }
        taken[i] = true;
        picks.push_back(i);
    }
    std::sort(picks.begin(), picks.end());
    return picks;
}

// Distinct sectors of the launch (read and written), from the touched allocations' sector maps;
// an estimate when `run` of the blocks ran as a sample (sector_estimate).
static uint64_t unique_sectors(double scale, uint64_t run) {
    double n = 0;
    const uint64_t every = run >= 64 ? ~0ull : (1ull << run) - 1;
    for (Alloc& al : g_allocs) {
        const uint64_t picks = al.touched->load();
        if (!picks) continue;
        const size_t secs = (al.size + 31) / 32;
        const bool shared = picks == every;
        n += sector_estimate(al.rsec, secs, scale, shared) + sector_estimate(al.wsec, secs, scale, shared);
        memset(al.rsec, 0, secs);
        memset(al.wsec, 0, secs);
        al.touched->store(0);
    }
    return (uint64_t)std::llround(n);
}

}  // namespace kiln_emu

// ------------------------------------------------------------------------------------------------
// Instrumentation hooks: GCC's -fsanitize=kernel-address with
// --param asan-instrumentation-with-call-threshold=0 calls these before every load and store of
// the kernel code.
using kiln_emu::access;
#define KILN_HOOK(n)                                                                                \
    extern "C" void __asan_load##n##_noabort(uintptr_t a) { access(a, n, false); }                \
    extern "C" void __asan_store##n##_noabort(uintptr_t a) { access(a, n, true); }
KILN_HOOK(1)
KILN_HOOK(2)
KILN_HOOK(4)
KILN_HOOK(8)
KILN_HOOK(16)
extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) { access(a, n, false); }
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) { access(a, n, true); }
extern "C" void __asan_handle_no_return() {}

// ------------------------------------------------------------------------------------------------
// The C interface (src/backend/cuda/emu.rs).
extern "C" {

struct KilnEmuStats {
    uint64_t global_requests, global_sectors, global_bytes, unique_sectors;
    uint64_t shared_requests, shared_wavefronts, shared_ideal;
    uint64_t mma, barriers, blocks, threads;
    uint64_t flops, run_blocks;
};

// Per calling thread: Rust reads them right after the call that set them.
static thread_local std::string g_error;
static thread_local KilnEmuStats g_last_stats;

const char* kiln_emu_error() { return g_error.c_str(); }

void kiln_emu_last_stats(KilnEmuStats* out) { *out = g_last_stats; }

uint64_t kiln_emu_live_bytes() { return kiln_emu::g_live_bytes; }

// Sampling, for a prediction of a step too large to emulate whole (kiln bench train-step
// --predict): from now on a launch of more than `blocks` (2 to 64) blocks runs only that many, evenly
// spaced over its grid and including the first and the last, and its counters are scaled to the
// whole grid (the distinct sectors estimated, see sector_estimate). Outputs of the skipped blocks
// are never written, so the memcheck's uninitialised-read checks are off while sampling (bounds,
// alignment and barriers are still checked) and results are garbage: counters only. 0 turns it
// off.
void kiln_emu_set_sample(unsigned blocks) {
    std::lock_guard<std::mutex> g(kiln_emu::g_mem_mu);
    kiln_emu::g_sample = blocks == 1 ? 2 : std::min(blocks, 64u);
}

// n bytes of device memory, 0xff-filled and unwritten (or zeroed and written); 0 when out of memory.
uintptr_t kiln_emu_malloc(size_t n, int zero) {
    using namespace kiln_emu;
    std::lock_guard<std::mutex> g(g_mem_mu);
    if (!arena_init()) return 0;
    const size_t size = std::max<size_t>(n, 1);
    const size_t span = page_up(size);
    if (g_bump + span + 4096 > g_arena + g_arena_size) return 0;
    const uintptr_t base = g_bump;
    if (mprotect(reinterpret_cast<void*>(base), span, PROT_READ | PROT_WRITE) != 0) return 0;
    g_bump += span + 4096;  // an unmapped guard page after every allocation
    Alloc al;
    al.base = base;
    al.size = size;
    al.id = g_next_id++;
    al.init = static_cast<uint8_t*>(calloc(size, 1));
    al.rsec = static_cast<uint8_t*>(calloc((size + 31) / 32, 1));
    al.wsec = static_cast<uint8_t*>(calloc((size + 31) / 32, 1));
    al.touched = new std::atomic<uint64_t>(0);
    if (!al.init || !al.rsec || !al.wsec) return 0;
    memset(reinterpret_cast<void*>(base), zero ? 0 : 0xff, size);
    if (zero) memset(al.init, 1, size);
    g_allocs.push_back(al);
    g_live_bytes += size;
    return base;
}

void kiln_emu_free(uintptr_t p) {
    using namespace kiln_emu;
    std::lock_guard<std::mutex> g(g_mem_mu);
    auto it = std::lower_bound(g_allocs.begin(), g_allocs.end(), p, [](const Alloc& al, uintptr_t x) { return al.base < x; });
    if (it == g_allocs.end() || it->base != p) return;
    const size_t span = page_up(it->size);
    madvise(reinterpret_cast<void*>(p), span, MADV_DONTNEED);
    mprotect(reinterpret_cast<void*>(p), span, PROT_NONE);
    free(it->init);
    free(it->rsec);
    free(it->wsec);
    delete it->touched;
    g_live_bytes -= it->size;
    g_freed.push_back({p, it->size});
    g_allocs.erase(it);
}

// Whether [p, p + n) lies in one live allocation; else an error message.
static bool host_range(uintptr_t p, size_t n, const char* what) {
    using namespace kiln_emu;
    const Alloc* al = find_alloc(p);
    if (n == 0) return true;
    if (!al || p + n > al->base + al->size) {
        char buf[512];
        describe_stray(buf, sizeof buf, p, n);
        g_error = std::string(what) + ": " + buf;
        return false;
    }
    return true;
}

int kiln_emu_htod(uintptr_t dst, const void* src, size_t n) {
    using namespace kiln_emu;
    std::lock_guard<std::mutex> g(g_mem_mu);
    if (!host_range(dst, n, "host-to-device copy")) return 1;
    memcpy(reinterpret_cast<void*>(dst), src, n);
    if (n) mark_written(find_alloc(dst), dst, n);
    return 0;
}

int kiln_emu_dtoh(void* dst, uintptr_t src, size_t n) {
    using namespace kiln_emu;
    std::lock_guard<std::mutex> g(g_mem_mu);
    if (!host_range(src, n, "device-to-host copy")) return 1;
    // What the memcheck does for kernel loads, for the host's reads too: bytes nothing wrote (a
    // kernel launched over too few blocks, a skipped copy) are an error, not silent garbage.
    if (n) {
        const Alloc* al = find_alloc(src);
        const size_t off = src - al->base;
        const void* hole = g_sample ? nullptr : memchr(al->init + off, 0, n);
        if (hole) {
            const size_t at = static_cast<const uint8_t*>(hole) - al->init;
            size_t end = at;
            while (end < off + n && !al->init[end]) ++end;
            char buf[512];
            snprintf(buf, sizeof buf,
                     "device-to-host copy of %zu bytes at offset %zu of allocation #%lu (%zu bytes) reads bytes nothing has written: "
                     "offsets %zu..%zu (the first unwritten run) were never stored by a kernel, copy or memset",
                     n, off, (unsigned long)al->id, al->size, at, end);
            g_error = buf;
            return 1;
        }
    }
    memcpy(dst, reinterpret_cast<const void*>(src), n);
    return 0;
}

int kiln_emu_dtod(uintptr_t dst, uintptr_t src, size_t n) {
    using namespace kiln_emu;
    std::lock_guard<std::mutex> g(g_mem_mu);
    if (!host_range(src, n, "device-to-device copy (source)") || !host_range(dst, n, "device-to-device copy (destination)")) return 1;
    if (n == 0) return 0;
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    const Alloc* s = find_alloc(src);
    const Alloc* d = find_alloc(dst);
    memmove(d->init + (dst - d->base), s->init + (src - s->base), n);
    return 0;
}

int kiln_emu_memset(uintptr_t dst, int byte, size_t n) {
    using namespace kiln_emu;
    std::lock_guard<std::mutex> g(g_mem_mu);
    if (!host_range(dst, n, "memset")) return 1;
    memset(reinterpret_cast<void*>(dst), byte, n);
    if (n) mark_written(find_alloc(dst), dst, n);
    return 0;
}

// cuTensorMapEncodeTiled for the emulated device: the same parameters (element size in bytes for
// the data type; no interleave, no L2 promotion, zero fill), checked by the rules the driver's
// documentation gives, written in the emulator's own layout. Returns 0, or 1 with the reason.
int kiln_emu_tensor_map_encode_tiled(void* out, unsigned elem, unsigned rank, uintptr_t addr, const uint64_t* dims,
                                     const uint64_t* strides, const uint32_t* box, const uint32_t* estrides, unsigned swizzle) {
    using namespace kiln_emu;
    char buf[512];
    const char* bad = nullptr;
    if (rank < 1 || rank > 5) bad = "the rank must be 1 to 5";
    else if (elem != 1 && elem != 2 && elem != 4 && elem != 8) bad = "the element size must be 1, 2, 4 or 8 bytes";
    else if (addr % 16) bad = "the global address must be 16-byte aligned";
    else if (swizzle != 0 && swizzle != 32 && swizzle != 64 && swizzle != 128) bad = "the swizzle must be none, 32, 64 or 128 bytes";
    else if (((size_t)box[0] * elem) % 16) bad = "the box's inner dimension must span a multiple of 16 bytes";
    else if (swizzle && (size_t)box[0] * elem > swizzle) bad = "the box's inner dimension must span at most the swizzle's bytes";
    for (unsigned i = 0; !bad && i < rank; ++i) {
        if (dims[i] == 0 || dims[i] > (1ull << 32)) bad = "every global dimension must be 1 to 2^32";
        else if (box[i] == 0 || box[i] > 256) bad = "every box dimension must be 1 to 256";
        else if (estrides[i] != 1) bad = "element strides other than 1 are not emulated";
        else if (i > 0 && (strides[i - 1] % 16 || strides[i - 1] >= (1ull << 40))) bad = "every global stride must be a multiple of 16 bytes under 2^40";
    }
    if (bad) {
        snprintf(buf, sizeof buf, "tensor map rejected: %s", bad);
        g_error = buf;
        return 1;
    }
    {
        std::lock_guard<std::mutex> g(g_mem_mu);
        if (!host_range(addr, 1, "tensor map")) return 1;
    }
    TensorMap m{};
    m.magic = TENSOR_MAP_MAGIC;
    m.elem = (uint8_t)elem;
    m.rank = (uint8_t)rank;
    m.swizzle = (uint8_t)swizzle;
    m.addr = addr;
    for (unsigned i = 0; i < rank; ++i) {
        m.dims[i] = (uint32_t)std::min<uint64_t>(dims[i], 0xffffffffu);
        m.box[i] = (uint16_t)box[i];
        if (i > 0) m.strides[i - 1] = strides[i - 1];
    }
    memset(out, 0, 128);
    memcpy(out, &m, sizeof m);
    return 0;
}

// Runs kernel `name` (entry: its launch entry, bound: its __launch_bounds__ or 0) over the grid,
// synchronously, holding the memory lock. Returns 0, or 1 with the reason in kiln_emu_error().
int kiln_emu_launch(const char* name, kiln_emu_entry entry, unsigned bound, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                    unsigned by, unsigned bz, unsigned smem, unsigned smem_optin, void** args) {
    using namespace kiln_emu;
    char buf[512];
    const uint64_t threads = (uint64_t)bx * by * bz;
    const char* bad = nullptr;
    if (gx == 0 || gy == 0 || gz == 0) bad = "a grid dimension is 0";
    else if (gx > 2147483647u || gy > 65535 || gz > 65535) bad = "the grid exceeds sm_90's limits (x < 2^31, y and z <= 65535)";
    else if (bx == 0 || by == 0 || bz == 0) bad = "a block dimension is 0";
    else if (bx > 1024 || by > 1024 || bz > 64 || threads > MAX_THREADS) bad = "the block exceeds sm_90's limits (at most 1024 threads; z <= 64)";
    if (bad) {
        snprintf(buf, sizeof buf, "launch of %s rejected: %s (grid (%u, %u, %u), block (%u, %u, %u))", name, bad, gx, gy, gz, bx, by, bz);
        g_error = buf;
        return 1;
    }
    if (bound && threads > bound) {
        snprintf(buf, sizeof buf, "launch of %s rejected: %lu threads per block, over its __launch_bounds__(%u)", name, (unsigned long)threads, bound);
        g_error = buf;
        return 1;
    }
    if (smem > SHARED_OPTIN || (smem > SHARED_DEFAULT && smem > smem_optin)) {
        snprintf(buf, sizeof buf,
                 "launch of %s rejected: %u bytes of dynamic shared memory, over %s (cuFuncSetAttribute with "
                 "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES raises the 48 KB default up to 227 KB)",
                 name, smem, smem > SHARED_OPTIN ? "sm_90's 227 KB" : smem_optin > SHARED_DEFAULT ? "the kernel's opt-in attribute" : "the 48 KB default");
        g_error = buf;
        return 1;
    }
    // One launch at a time, and no allocation or copy while one runs (the workers read the
    // allocation table without a lock): host threads (tests run in parallel) take turns.
    std::lock_guard<std::mutex> mem_guard(g_mem_mu);
    pool_start();
    LaunchState L;
    L.dims = Launch{Dim3{gx, gy, gz}, Dim3{bx, by, bz}};
    L.name = name;
    L.entry = entry;
    L.args = args;
    L.smem = smem;
    L.total_blocks = (uint64_t)gx * gy * gz;
    if (g_sample && L.total_blocks > g_sample) L.picks = sample_blocks(gx, (uint64_t)gy * gz, g_sample);
    const uint64_t run_blocks = L.picks.empty() ? L.total_blocks : L.picks.size();
    g_launch = &L;
    {
        std::lock_guard<std::mutex> g(g_pool->mu);
        g_pool->busy = (int)g_pool->workers.size() - 1;
        g_pool->gen++;
    }
    g_pool->cv.notify_all();
    work(g_pool->workers[0]);
    {
        std::unique_lock<std::mutex> lk(g_pool->mu);
        g_pool->done_cv.wait(lk, [] { return g_pool->busy == 0; });
    }
    g_launch = nullptr;
    // A sampled launch's counters, scaled to the whole grid.
    const double scale = (double)L.total_blocks / (double)run_blocks;
    const auto all = [scale](uint64_t v) { return (uint64_t)std::llround((double)v * scale); };
    g_last_stats = KilnEmuStats{all(L.stats.global_requests), all(L.stats.global_sectors), all(L.stats.global_bytes),
                                unique_sectors(scale, run_blocks), all(L.stats.shared_requests), all(L.stats.shared_wavefronts),
                                all(L.stats.shared_ideal), all(L.stats.mma), all(L.stats.barriers), L.total_blocks,
                                L.total_blocks * threads, all(L.stats.flops), run_blocks};
    if (!L.fault.empty()) {
        g_error = "emulated CUDA fault in " + L.fault;
        return 1;
    }
    return 0;
}

}  // extern "C"
