// What hetflow's native kernels (matvec.cc, neuron.cc) share: exact widening of bfloat16 and
// float16 values, and the split of a call's work between the calling thread and XLA's
// intra-op thread pool. hetflow/models/native/__init__.py compiles the sources into one
// library and keys its cache by every source and this header.

#ifndef HETFLOW_NATIVE_COMMON_H_
#define HETFLOW_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(HETFLOW_NO_SIMD)
#define HETFLOW_AVX512 1
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace hetflow {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
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
}

// Threads that computed at least one chunk in the last parallel call, and the threads XLA's
// pool offered it (diagnostics: hetflow_native_last_workers, hetflow_native_pool_threads).
inline std::atomic<int> g_last_workers{0};
inline std::atomic<int> g_pool_threads{0};

template <typename Body>
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks;
  Body body;
  Work(int64_t n, Body b) : chunks(n), body(std::move(b)) {}
  std::atomic<int> workers{0};
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
// XLA's pool, and counts the call in `calls`. Chunks are claimed from an atomic counter, so
// the caller never waits for a task that has not started (no deadlock when the pool is busy
// or runs tasks inline). Body must capture by value: a task may start after this returns
// (it then finds no chunk left and touches nothing else).
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t chunks, Body body,
                  std::atomic<int64_t>& calls) {
  g_pool_threads.store(static_cast<int>(pool.num_threads()), std::memory_order_relaxed);
  calls.fetch_add(1, std::memory_order_relaxed);
  int64_t threads = std::min<int64_t>(pool.num_threads(), std::thread::hardware_concurrency());
  threads = std::max<int64_t>(1, std::min(threads, chunks));
  if (threads == 1) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    g_last_workers.store(1, std::memory_order_relaxed);
    return;
  }
  auto work = std::make_shared<Work<Body>>(chunks, std::move(body));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < chunks) {
#if defined(HETFLOW_AVX512)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  g_last_workers.store(work->workers.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

}  // namespace hetflow

#endif  // HETFLOW_NATIVE_COMMON_H_
