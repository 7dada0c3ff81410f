// The launch emulation's scheduler (see include/cuda_emu.h), the kernels compiled for the
// host, and a C entry point that launches one of them by name with cuLaunchKernel-style
// parameters (an array of pointers to the argument values).
#include "cuda_emu.h"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// The kernels, as they are given to NVRTC.
#include "attention.cu"
#include "matvec.cu"
#include "norm.cu"
#include "quant.cu"
#include "sample.cu"

// Switch stacks: push the callee-saved registers, store the stack pointer in *from, load
// `to` and pop the registers saved there. (swapcontext would also save the signal mask, a
// system call per switch, which made a forward pass take seconds.)
extern "C" void fm_emu_switch(void** from, void* to);
asm(R"(
    .pushsection .text
    .globl fm_emu_switch
    .type fm_emu_switch, @function
fm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fm_emu_switch, .-fm_emu_switch
    .popsection
)");

namespace emu {

thread_local Launch launch_state;
thread_local Thread* current;

namespace {

enum class State { Ready, Waiting, Done };

struct Barrier {
    int expected = 0, arrived = 0;
    unsigned gen = 0;
};

struct Fiber {
    Thread t;
    void* sp = nullptr;
    State state = State::Ready;
    Barrier* on = nullptr;
    unsigned gen = 0;
};

constexpr size_t STACK_BYTES = 128 * 1024;

// The fibers' stacks, kept for the next launch on this host thread.
struct Stacks {
    std::vector<char*> all;
    ~Stacks() {
        for (char* s : all) free(s);
    }
    char* get(size_t i) {
        while (all.size() <= i) all.push_back(static_cast<char*>(malloc(STACK_BYTES)));
        return all[i];
    }
};

struct Block {
    std::vector<Fiber> fibers;
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<uint64_t> slots;
    void* sched = nullptr;
    const std::function<void()>* body = nullptr;
    Fiber* running = nullptr;
};

thread_local Block* active;
thread_local Stacks stacks;

void wait(Barrier& b) {
    Fiber* f = active->running;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        b.gen++;
        return;
    }
    f->state = State::Waiting;
    f->on = &b;
    f->gen = b.gen;
    fm_emu_switch(&f->sp, active->sched);
}

// A fiber's first frame: run the body, then hand back to the scheduler for good.
[[noreturn]] void entry() {
    (*active->body)();
    Fiber* f = active->running;
    f->state = State::Done;
    fm_emu_switch(&f->sp, active->sched);
    __builtin_unreachable();
}

// Make fiber i start at `entry` on its own stack: below a zero return address (so `entry`
// starts with the stack aligned as after a call), `entry`'s address for the switch's `ret`
// and six zeroed registers for it to pop.
void start(Fiber& f, size_t i) {
    f.state = State::Ready;
    f.on = nullptr;
    uintptr_t top = (reinterpret_cast<uintptr_t>(stacks.get(i)) + STACK_BYTES) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&entry);
    for (int r = 0; r < 6; r++) *--sp = nullptr;
    f.sp = sp;
}

// Run the block's threads until all return; an error when they wait for each other forever.
std::string run_block(Block& b) {
    for (size_t i = 0; i < b.fibers.size(); i++) start(b.fibers[i], i);
    for (;;) {
        bool progress = false, done = true;
        for (Fiber& f : b.fibers) {
            if (f.state == State::Done) continue;
            done = false;
            if (f.state == State::Waiting) {
                if (f.on->gen == f.gen) continue;
                f.state = State::Ready;
            }
            b.running = &f;
            current = &f.t;
            fm_emu_switch(&b.sched, f.sp);
            progress = true;
        }
        if (done) return "";
        if (!progress) {
            char msg[200];
            snprintf(msg, sizeof msg,
                     "block (%u, %u, %u): threads wait at a barrier (__syncthreads or a warp "
                     "shuffle) that other threads of the block or warp never reach",
                     launch_state.block.x, launch_state.block.y, launch_state.block.z);
            return msg;
        }
    }
}

}  // namespace

void sync_block() { wait(active->block); }
void sync_warp() { wait(active->warps[current->warp]); }
void* warp_slot(int lane) { return &active->slots[(current->warp * 2 + current->parity) * 32 + lane]; }

// Run `body` as a kernel over the grid; "" or what went wrong.
std::string launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024) return "a block of " + std::to_string(n) + " threads (1 to 1024)";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        return "a grid dimension out of range";
    Block b;
    b.fibers.resize(n);
    b.block.expected = (int)n;
    int warps = (int)(n + 31) / 32;
    b.warps.resize(warps);
    b.slots.assign((size_t)warps * 64, 0);
    for (unsigned i = 0; i < n; i++) {
        Thread& t = b.fibers[i].t;
        t.idx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
        t.lane = (int)(i % 32);
        t.warp = (int)(i / 32);
        t.parity = 0;
        b.warps[t.warp].expected++;
    }
    b.body = &body;
    Block* outer = active;
    active = &b;
    launch_state.grid = {grid.x, grid.y, grid.z};
    launch_state.block_dim = {block.x, block.y, block.z};
    std::string err;
    for (unsigned z = 0; z < grid.z && err.empty(); z++)
        for (unsigned y = 0; y < grid.y && err.empty(); y++)
            for (unsigned x = 0; x < grid.x && err.empty(); x++) {
                launch_state.block = {x, y, z};
                err = run_block(b);
            }
    active = outer;
    current = nullptr;
    return err;
}

}  // namespace emu

// A kernel only half of whose threads reach its barrier: the emulation must report it.
extern "C" void emu_selftest_divergent_sync(int* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}

namespace {

struct Kernel {
    const char* name;
    size_t args;
    std::function<void(void**)> call;
};

template <typename... A, size_t... I>
void invoke(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}

template <typename... A>
Kernel kernel(const char* name, void (*k)(A...)) {
    return Kernel{name, sizeof...(A),
                  [k](void** p) { invoke(k, p, std::index_sequence_for<A...>{}); }};
}

#define FM_K(n) kernel(#n, &n)

const std::vector<Kernel>& kernels() {
    static const std::vector<Kernel> all = {
        FM_K(quantize_q8),   FM_K(quantize_q8k), FM_K(to_f16),      FM_K(matvec_f32),
        FM_K(matvec_f16),    FM_K(matvec_q4_0),  FM_K(matvec_q4_1), FM_K(matvec_q5_0),
        FM_K(matvec_q5_1),   FM_K(matvec_q8_0),  FM_K(matvec_q4_k), FM_K(matvec_q5_k),
        FM_K(matvec_q6_k),   FM_K(embed_f32),    FM_K(embed_f16),   FM_K(embed_q4_0),
        FM_K(embed_q4_1),    FM_K(embed_q5_0),   FM_K(embed_q5_1),  FM_K(embed_q8_0),
        FM_K(embed_q4_k),    FM_K(embed_q5_k),   FM_K(embed_q6_k),  FM_K(rms_norm),
        FM_K(rope),          FM_K(silu_mul),     FM_K(add),         FM_K(add_bias),
        FM_K(kv_store),      FM_K(attention),    FM_K(argmax),      FM_K(apply_penalties),
        FM_K(sample),        FM_K(emu_selftest_divergent_sync),
    };
    return all;
}

void copy_err(const std::string& msg, char* err, size_t len) {
    if (len == 0) return;
    size_t n = std::min(msg.size(), len - 1);
    memcpy(err, msg.data(), n);
    err[n] = 0;
}

}  // namespace

extern "C" size_t fm_emu_kernel_count() { return kernels().size(); }

extern "C" const char* fm_emu_kernel_name(size_t i) {
    return i < kernels().size() ? kernels()[i].name : nullptr;
}

// Launch kernel `name`: 0 when it ran, else 1 with the reason in `err`.
extern "C" int fm_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                             void** params, size_t nparams, char* err, size_t err_len) {
    for (const Kernel& k : kernels()) {
        if (strcmp(k.name, name) != 0) continue;
        if (k.args != nparams) {
            copy_err(std::string(name) + " takes " + std::to_string(k.args) + " parameters, got " +
                         std::to_string(nparams),
                     err, err_len);
            return 1;
        }
        std::function<void()> body = [&] { k.call(params); };
        std::string e = emu::launch(dim3(grid[0], grid[1], grid[2]),
                                    dim3(block[0], block[1], block[2]), body);
        if (e.empty()) return 0;
        copy_err(std::string(name) + ": " + e, err, err_len);
        return 1;
    }
    copy_err(std::string("no kernel named ") + name, err, err_len);
    return 1;
}
