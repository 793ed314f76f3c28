// The disk reader's inner loops (hetflow/memory/reader.py), in C++ so that they run
// without Python's GIL: the main thread's Python work (predicting, dispatching) no
// longer starves the disk's queue.
//
// Small random reads (neuron_cluster's 24 KiB records) are bound by requests per
// second, not bytes: on this project's VM disk a thread per request in flight gave
// ~35k reads/s, Linux native AIO (the requests queued in the kernel) ~50-60k
// (WORKSPACE_NOTES.md, ninth session). And a worker thread woken to issue them first
// waits for the GIL, ~1 ms while the main thread runs Python. So a batch is queued
// in the kernel by the caller itself (`hetflow_aio_start`, in the thread that asks
// for the reads) and a worker only waits for it (`hetflow_aio_finish`). Where the
// kernel refuses AIO (none built in, or its limit fs.aio-max-nr reached), workers
// read one request after another (`hetflow_read_requests`).
//
// Only the expected path: a request that fails or comes back short is left to the
// reader's Python path, which retries it (falling back to buffered reads, bouncing a
// partial block, or raising with the file's name).
#include <errno.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace {

constexpr int64_t kMaxSegments = 1024;  // IOV_MAX on Linux
constexpr int kMaxDepth = 64;           // requests in flight per batch (an AIO context's size)

bool Countable(int64_t n, const int64_t* first) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = first[i + 1] - first[i];
    if (count < 1 || count > kMaxSegments) return false;
  }
  return true;
}

// Every request's segments as one array: request i's are [first[i], first[i + 1]).
std::vector<struct iovec> Segments(int64_t n, const int64_t* first, const int64_t* address,
                                   const int64_t* length) {
  std::vector<struct iovec> iov(first[n]);
  for (int64_t k = 0; k < first[n]; ++k) {
    iov[k].iov_base = reinterpret_cast<void*>(address[k]);
    iov[k].iov_len = static_cast<size_t>(length[k]);
  }
  return iov;
}

// AIO contexts are kept for reuse (making one costs a syscall, destroying one waits
// for the kernel): as many exist as batches were ever in flight at once.
std::mutex contexts_lock;
std::vector<aio_context_t> free_contexts;

aio_context_t TakeContext() {
  {
    std::lock_guard<std::mutex> hold(contexts_lock);
    if (!free_contexts.empty()) {
      aio_context_t ctx = free_contexts.back();
      free_contexts.pop_back();
      return ctx;
    }
  }
  aio_context_t ctx = 0;
  return syscall(SYS_io_setup, kMaxDepth, &ctx) < 0 ? 0 : ctx;
}

void GiveContext(aio_context_t ctx) {
  std::lock_guard<std::mutex> hold(contexts_lock);
  free_contexts.push_back(ctx);
}

// A forked child has none of its parent's AIO contexts (they belong to the parent's
// address space): it forgets them and makes its own.
void LockBeforeFork() { contexts_lock.lock(); }
void UnlockInParent() { contexts_lock.unlock(); }
void ForgetInChild() {
  free_contexts.clear();
  contexts_lock.unlock();
}
const int fork_handlers = pthread_atfork(LockBeforeFork, UnlockInParent, ForgetInChild);

// One batch in the kernel's queue: its requests, how many were submitted, how many
// are in flight, and where each one's outcome goes.
struct Batch {
  aio_context_t ctx;
  int depth;
  int64_t next = 0, in_flight = 0;
  std::vector<struct iovec> iov;
  std::vector<struct iocb> cbs;
  std::vector<struct iocb*> queue;
  int64_t* done;
};

// Submits requests until `depth` are in flight or none is left. A request the kernel
// refuses gets -errno (the Python path retries it). Returns false if the very first
// submission was refused (this file or kernel does no AIO; nothing is in flight).
bool Submit(Batch* b) {
  const int64_t n = static_cast<int64_t>(b->cbs.size());
  while (b->next < n && b->in_flight < b->depth) {
    const int64_t room = std::min<int64_t>(b->depth - b->in_flight, n - b->next);
    long put = syscall(SYS_io_submit, b->ctx, room, b->queue.data() + b->next);
    if (put > 0) {
      b->next += put;
      b->in_flight += put;
    } else if (put < 0 && errno == EINTR) {
      continue;
    } else if (put < 0 && errno == EAGAIN && b->in_flight > 0) {
      return true;  // the kernel is full: reap some first
    } else {
      if (b->next == 0 && b->in_flight == 0) return false;
      b->done[b->next++] = put < 0 ? -errno : -EIO;
    }
  }
  return true;
}

}  // namespace

extern "C" {

// Reads requests [0, n) of one open file, in order, one preadv each. Request i reads
// at file offset `offsets[i]` into the segments `first[i]` .. `first[i + 1]` - 1, each
// `length[k]` bytes at address `address[k]`, and must deliver at least `need[i]` bytes.
// done[i] gets the bytes it delivered, or -errno; the loop stops at the first that
// falls short (the rest stay -1, not attempted).
void hetflow_read_requests(int fd, int64_t n, const int64_t* offsets, const int64_t* need,
                           const int64_t* first, const int64_t* address,
                           const int64_t* length, int64_t* done) {
  for (int64_t i = 0; i < n; ++i) done[i] = -1;
  if (!Countable(n, first)) return;
  const std::vector<struct iovec> iov = Segments(n, first, address, length);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = first[i + 1] - first[i];
    ssize_t got;
    do {
      got = preadv(fd, iov.data() + first[i], static_cast<int>(count), offsets[i]);
    } while (got < 0 && errno == EINTR);
    done[i] = got < 0 ? -errno : got;
    if (done[i] < need[i]) return;
  }
}

// Queues requests [0, n) (as above) in the kernel, up to `depth` in flight, and
// returns at once: a handle for hetflow_aio_finish, or null if the kernel refused
// (nothing was queued; read them with hetflow_read_requests). The arrays and the
// buffers must stay alive until hetflow_aio_finish returns.
void* hetflow_aio_start(int fd, int64_t n, const int64_t* offsets, const int64_t* first,
                        const int64_t* address, const int64_t* length, int64_t depth,
                        int64_t* done) {
  if (n < 1 || !Countable(n, first)) return nullptr;
  aio_context_t ctx = TakeContext();
  if (ctx == 0) return nullptr;
  Batch* b = new Batch;
  b->ctx = ctx;
  b->depth = static_cast<int>(std::clamp<int64_t>(depth, 1, kMaxDepth));
  b->done = done;
  b->iov = Segments(n, first, address, length);
  b->cbs.resize(n);
  b->queue.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    struct iocb& cb = b->cbs[i];
    cb = {};
    cb.aio_data = static_cast<uint64_t>(i);
    cb.aio_lio_opcode = IOCB_CMD_PREADV;
    cb.aio_fildes = static_cast<uint32_t>(fd);
    cb.aio_buf = reinterpret_cast<uint64_t>(b->iov.data() + first[i]);
    cb.aio_nbytes = static_cast<uint64_t>(first[i + 1] - first[i]);
    cb.aio_offset = offsets[i];
    b->queue[i] = &cb;
    done[i] = -1;
  }
  if (!Submit(b)) {
    GiveContext(ctx);
    delete b;
    return nullptr;
  }
  return b;
}

// Queues the rest of a batch as its first requests land and waits for all of them;
// done[i] then holds what request i delivered (or -errno, or -1: not attempted).
// Frees the handle.
void hetflow_aio_finish(void* handle) {
  Batch* b = static_cast<Batch*>(handle);
  struct io_event events[kMaxDepth];
  bool healthy = true;
  while (b->in_flight > 0) {
    long got = syscall(SYS_io_getevents, b->ctx, 1, kMaxDepth, events, nullptr);
    if (got < 0) {
      if (errno == EINTR) continue;
      // Should not happen: destroying the context waits for what is in flight,
      // and those requests stay -1 for the Python path.
      syscall(SYS_io_destroy, b->ctx);
      healthy = false;
      break;
    }
    for (long e = 0; e < got; ++e) b->done[events[e].data] = events[e].res;
    b->in_flight -= got;
    Submit(b);
  }
  if (healthy) GiveContext(b->ctx);
  delete b;
}

}  // extern "C"
