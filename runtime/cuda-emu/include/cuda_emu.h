// A launch emulation of the CUDA built-ins the kernels use, for running them on the host in
// tests. A launch runs the grid's blocks one after another on the calling thread; a block's
// threads are fibers (ucontext) that run until they reach a barrier (__syncthreads, or a warp
// shuffle's exchange) and are switched there, so every thread of a block sees the others'
// shared-memory writes exactly at the barriers, as on a GPU. Fibers make the runs
// deterministic and cheap on a machine with few cores; a kernel that waits at a barrier some
// threads never reach (a __syncthreads in divergent code, a thread that returned early) is
// reported as an error instead of hanging.
#pragma once

#ifndef __x86_64__
#error "the launch emulation switches stacks with x86-64 code"
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <string>

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

namespace emu {

// The launch and the thread being run (one launch at a time per host thread).
struct Launch {
    uint3 grid, block_dim, block;
};

struct Thread {
    uint3 idx;
    int lane, warp;
    // Which set of shuffle slots this lane uses next.
    int parity;
};

extern thread_local Launch launch_state;
extern thread_local Thread* current;

// Wait at the block's barrier (every thread of the block must come).
void sync_block();
// Wait at the warp's barrier (every lane of the calling thread's warp must come).
void sync_warp();
// A per-warp exchange slot of the calling lane (8 bytes), and lane `src`'s of the same warp.
void* warp_slot(int lane);

// A shuffle: each lane writes its value, the warp meets, each lane reads its source's. The
// slots alternate between two sets, so one meeting per shuffle suffices: no lane can write a
// set again before every lane has read it (that takes passing the next meeting).
template <typename T>
T shfl(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    memcpy(warp_slot(current->lane), &v, sizeof(T));
    sync_warp();
    T out;
    memcpy(&out, warp_slot(src), sizeof(T));
    current->parity ^= 1;
    return out;
}

}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// No aliasing promises on the host: fibers share memory the compiler cannot see.
#define __restrict__
// Shared memory: one copy per host thread, which runs one block at a time.
#define __shared__ static thread_local

#define threadIdx (::emu::current->idx)
#define blockIdx (::emu::launch_state.block)
#define blockDim (::emu::launch_state.block_dim)
#define gridDim (::emu::launch_state.grid)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::shfl(v, emu::current->lane ^ mask);
}

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta) {
    int src = emu::current->lane + (int)delta;
    return emu::shfl(v, src < 32 ? src : emu::current->lane);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src) {
    return emu::shfl(v, src & 31);
}

// Four signed bytes of a times those of b, plus c.
inline int __dp4a(int a, int b, int c) {
    for (int k = 0; k < 4; k++) c += (int)(int8_t)(a >> (8 * k)) * (int)(int8_t)(b >> (8 * k));
    return c;
}

// Fibers of one block never run at the same time: atomics are plain read-modify-writes.
template <typename T>
T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}

inline int atomicMax(int* p, int v) {
    int old = *p;
    *p = std::max(old, v);
    return old;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

using std::max;
using std::min;

// f16 conversions through the compiler's _Float16 (round to nearest even, as the device's
// cvt.rn.f16.f32 and the CPU engine's `half` crate).
static inline float fm_h2f(unsigned short h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

static inline unsigned short fm_f2h(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    memcpy(&h, &v, 2);
    return h;
}
