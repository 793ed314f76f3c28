// What hetflow's native kernels (matvec.cc, neuron.cc) share: exact widening of 16-bit
// floats, the portable loops' lanes, prefetching, and the split of a kernel's chunks between the calling thread and XLA's pool.
//
// Everything here has internal linkage (an unnamed namespace): each kernel file gets its
// own copy. Both kernel files include simd.h first: where it defines HETFLOW_SIMD16 (AVX-512
// or AVX2), the caller spins with _mm_pause for the pool's last chunks; elsewhere it yields.

#ifndef HETFLOW_MODELS_NATIVE_PARALLEL_H_
#define HETFLOW_MODELS_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__F16C__) && !defined(HETFLOW_NO_SIMD)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__) && !defined(HETFLOW_NO_SIMD)
  return _cvtsh_ss(h);  // one instruction (x86 since 2012), exactly the conversion below
#else
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// The portable loops' lanes: each of kLanes accumulators sums its own products (no
// reassociation, so -O3 vectorizes them without -ffast-math); summed once per row.
constexpr int kLanes = 16;

inline float lanes_sum(const float* acc) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// Prefetches [p, p + bytes) into every cache level (x86: prefetcht0).
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// What a kernel file's parallel calls did: diagnostics its C functions report.
struct ParallelStats {
  std::atomic<int64_t> calls{0};
  std::atomic<int> pool_threads{0};  // threads XLA's pool offered the last call
  std::atomic<int> last_workers{0};  // threads that computed a chunk in the last call
};

template <typename Body>
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> workers{0};
  int64_t chunks;
  Body body;
  Work(int64_t n, Body b) : chunks(n), body(std::move(b)) {}
  void run() {
    bool counted = false;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      if (!counted) {
        workers.fetch_add(1, std::memory_order_relaxed);
        counted = true;
      }
      body(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Calls body(c) for c in [0, chunks), on the calling thread and up to threads - 1 tasks of
// XLA's pool. Body must capture by value: a task may start after this returns (it then
// finds no chunk left and touches nothing else). Chunks are claimed from an atomic
// counter, so the caller never waits for a task that has not started.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, Body body, ParallelStats& stats) {
  stats.pool_threads.store(static_cast<int>(pool.num_threads()), std::memory_order_relaxed);
  stats.calls.fetch_add(1, std::memory_order_relaxed);
  int64_t threads = std::min<int64_t>(pool.num_threads(), std::thread::hardware_concurrency());
  threads = std::max<int64_t>(1, std::min(threads, chunks));
  if (threads == 1) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    stats.last_workers.store(1, std::memory_order_relaxed);
    return;
  }
  auto work = std::make_shared<Work<Body>>(chunks, std::move(body));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < chunks) {
#if defined(HETFLOW_SIMD16)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  stats.last_workers.store(work->workers.load(std::memory_order_relaxed),
                           std::memory_order_relaxed);
}

}  // namespace

#endif  // HETFLOW_MODELS_NATIVE_PARALLEL_H_
