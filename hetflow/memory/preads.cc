// The disk reader's inner loop (hetflow/memory/reader.py), in C++ so that it runs
// without Python's GIL: a worker thread reads its whole batch of requests here, and
// the main thread's Python work (predicting, dispatching) no longer starves the
// disk's queue. Only the expected path: the first request that fails or comes back
// short ends the batch, and the reader's Python path retries it and the rest (falling
// back to buffered reads, bouncing a partial block, or raising with the file's name).
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>

namespace {
constexpr int64_t kMaxSegments = 1024;  // IOV_MAX on Linux
}

extern "C" {

// Reads requests [0, n) of one open file, in order, one preadv each. Request i reads
// at file offset `offsets[i]` into the segments `first[i]` .. `first[i + 1]` - 1, each
// `length[k]` bytes at address `address[k]`, and must deliver at least `need[i]` bytes.
// Returns n when every request did; otherwise the index of the first that did not
// (the caller's Python path retries it and reports what went wrong).
int64_t hetflow_read_batch(int fd, int64_t n, const int64_t* offsets, const int64_t* need,
                           const int64_t* first, const int64_t* address,
                           const int64_t* length) {
  struct iovec iov[kMaxSegments];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = first[i + 1] - first[i];
    if (count < 1 || count > kMaxSegments) return i;
    for (int64_t k = 0; k < count; ++k) {
      iov[k].iov_base = reinterpret_cast<void*>(address[first[i] + k]);
      iov[k].iov_len = static_cast<size_t>(length[first[i] + k]);
    }
    ssize_t got;
    do {
      got = preadv(fd, iov, static_cast<int>(count), offsets[i]);
    } while (got < 0 && errno == EINTR);
    if (got < need[i]) return i;
  }
  return n;
}

}  // extern "C"
