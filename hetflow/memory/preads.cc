// The disk reader's inner loop (hetflow/memory/reader.py), in C++ so that it runs
// without Python's GIL: the main thread's Python work (predicting, dispatching) no
// longer starves the disk's queue.
//
// Small random reads (neuron_cluster's 24 KiB records) are bound by requests per
// second, not bytes: on this project's VM disk one thread per request in flight gave
// ~35k reads/s; Linux native AIO, where one thread keeps `depth` requests queued in
// the kernel, ~50-60k (WORKSPACE_NOTES.md, ninth session). So a batch goes through
// io_submit when it can, with each thread's AIO context made on its first batch and
// freed when the thread exits, and through one preadv after another when it cannot
// (depth 1, no AIO in the kernel, or its limit fs.aio-max-nr reached).
//
// Only the expected path: a request that fails or comes back short is left to the
// reader's Python path, which retries it (falling back to buffered reads, bouncing a
// partial block, or raising with the file's name).
#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kMaxSegments = 1024;  // IOV_MAX on Linux
constexpr int kMaxDepth = 64;           // each thread's AIO context holds this many

int64_t Preadv(int fd, const struct iovec* iov, int64_t count, int64_t offset) {
  ssize_t got;
  do {
    got = preadv(fd, iov, static_cast<int>(count), offset);
  } while (got < 0 && errno == EINTR);
  return got < 0 ? -errno : got;
}

// One AIO context per thread: made on first use, destroyed when the thread exits
// (the reader's worker threads live as long as their ReaderPool).
class Context {
 public:
  ~Context() {
    if (id_ != 0) syscall(SYS_io_destroy, id_);
  }
  aio_context_t get() {
    if (id_ == 0 && !failed_ && syscall(SYS_io_setup, kMaxDepth, &id_) < 0) {
      id_ = 0;
      failed_ = true;  // no AIO here: this thread reads one request at a time
    }
    return id_;
  }
  // After an error that leaves requests in flight: io_destroy waits for them.
  void reset() {
    syscall(SYS_io_destroy, id_);
    id_ = 0;
  }

 private:
  aio_context_t id_ = 0;
  bool failed_ = false;
};

thread_local Context context;

// Requests [0, n) through io_submit, `depth` in flight. Returns false if the AIO
// context failed before any request was submitted (the caller reads them one by one).
bool ReadAsync(aio_context_t ctx, int fd, int64_t n, const int64_t* offsets,
               const struct iovec* iov, const int64_t* first, int depth, int64_t* done) {
  std::vector<struct iocb> cbs(n);
  std::vector<struct iocb*> queue(n);
  for (int64_t i = 0; i < n; ++i) {
    struct iocb& cb = cbs[i];
    cb = {};
    cb.aio_data = static_cast<uint64_t>(i);
    cb.aio_lio_opcode = IOCB_CMD_PREADV;
    cb.aio_fildes = static_cast<uint32_t>(fd);
    cb.aio_buf = reinterpret_cast<uint64_t>(iov + first[i]);
    cb.aio_nbytes = static_cast<uint64_t>(first[i + 1] - first[i]);
    cb.aio_offset = offsets[i];
    queue[i] = &cb;
  }
  struct io_event events[kMaxDepth];
  int64_t next = 0, in_flight = 0;
  while (next < n || in_flight > 0) {
    const int64_t room = std::min<int64_t>(depth - in_flight, n - next);
    if (room > 0) {
      long put = syscall(SYS_io_submit, ctx, room, queue.data() + next);
      if (put > 0) {
        next += put;
        in_flight += put;
      } else if (put < 0 && errno != EINTR && errno != EAGAIN) {
        if (next == 0) return false;
        done[next] = -errno;  // this request was refused: the Python path retries it
        ++next;
      } else if (in_flight == 0 && put < 0 && errno == EAGAIN) {
        done[next] = -EAGAIN;  // no room in the kernel and nothing to wait for
        ++next;
      }
    }
    if (in_flight == 0) continue;
    long got = syscall(SYS_io_getevents, ctx, 1, kMaxDepth, events, nullptr);
    if (got < 0) {
      if (errno == EINTR) continue;
      context.reset();  // waits for the requests in flight; theirs and the rest are retried
      return true;
    }
    for (long e = 0; e < got; ++e) done[events[e].data] = events[e].res;
    in_flight -= got;
  }
  return true;
}

}  // namespace

extern "C" {

// Reads requests [0, n) of one open file, up to `depth` at a time. Request i reads at
// file offset `offsets[i]` into the segments `first[i]` .. `first[i + 1]` - 1, each
// `length[k]` bytes at address `address[k]`, and must deliver at least `need[i]` bytes.
// done[i] gets the bytes it delivered, or -errno (-1: not attempted). Returns how
// many requests delivered their `need`, and sets *async to 1 if they went through AIO.
int64_t hetflow_read_requests(int fd, int64_t n, const int64_t* offsets, const int64_t* need,
                              const int64_t* first, const int64_t* address,
                              const int64_t* length, int64_t depth, int64_t* done,
                              int64_t* async) {
  std::vector<struct iovec> iov(first[n]);
  for (int64_t k = 0; k < first[n]; ++k) {
    iov[k].iov_base = reinterpret_cast<void*>(address[k]);
    iov[k].iov_len = static_cast<size_t>(length[k]);
  }
  for (int64_t i = 0; i < n; ++i) done[i] = -1;
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = first[i + 1] - first[i];
    ok &= count >= 1 && count <= kMaxSegments;
  }
  *async = 0;
  if (ok && depth > 1) {
    aio_context_t ctx = context.get();
    if (ctx != 0 &&
        ReadAsync(ctx, fd, n, offsets, iov.data(), first,
                  static_cast<int>(std::min<int64_t>(depth, kMaxDepth)), done)) {
      *async = 1;
    }
  }
  if (ok && !*async) {
    for (int64_t i = 0; i < n; ++i) {
      done[i] = Preadv(fd, iov.data() + first[i], first[i + 1] - first[i], offsets[i]);
      if (done[i] < need[i]) break;  // the rest go through the Python path
    }
  }
  int64_t delivered = 0;
  for (int64_t i = 0; i < n; ++i) delivered += done[i] >= need[i];
  return delivered;
}

}  // extern "C"
