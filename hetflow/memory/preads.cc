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

// Every request's segments as one array: request i's are [first[i], first[i + 1]), segment
// k `length[k]` bytes at buffer offset dest[k]. With O_DIRECT (`page` > 0) a one-segment
// request reads its last partial block whole where the buffer (`nbytes` at `address`) has
// room for the round-up; where it has not, the read comes back short and the reader's
// Python path reads that block through a bounce page.
std::vector<struct iovec> Segments(int64_t n, const int64_t* first, const int64_t* dest,
                                   const int64_t* length, int64_t address, int64_t nbytes,
                                   int64_t page) {
  std::vector<struct iovec> iov(first[n]);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = first[i]; k < first[i + 1]; ++k) {
      int64_t len = length[k];
      const int64_t rounded = page > 0 ? (len + page - 1) / page * page : len;
      if (first[i + 1] - first[i] == 1 && dest[k] + rounded <= nbytes) len = rounded;
      iov[k].iov_base = reinterpret_cast<void*>(address + dest[k]);
      iov[k].iov_len = static_cast<size_t>(len);
    }
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

// Reads requests [0, n) of one open file into the buffer of `nbytes` bytes at `address`,
// in order, one preadv each, as hetflow.memory.Requests holds them: request i reads at
// file offset `offsets[i]` into the segments `first[i]` .. `first[i + 1]` - 1, each
// `length[k]` bytes at buffer offset `dest[k]`, and must deliver at least `need[i]` bytes
// (`page`: as Segments). done[i] gets the bytes it delivered, or -errno; the loop stops at
// the first that falls short (the rest stay -1, not attempted).
void hetflow_read_requests(int fd, int64_t n, const int64_t* offsets, const int64_t* need,
                           const int64_t* first, const int64_t* dest, const int64_t* length,
                           int64_t address, int64_t nbytes, int64_t page, int64_t* done) {
  for (int64_t i = 0; i < n; ++i) done[i] = -1;
  if (!Countable(n, first)) return;
  const std::vector<struct iovec> iov = Segments(n, first, dest, length, address, nbytes, page);
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
                        const int64_t* dest, const int64_t* length, int64_t address,
                        int64_t nbytes, int64_t page, int64_t depth, int64_t* done) {
  if (n < 1 || !Countable(n, first)) return nullptr;
  aio_context_t ctx = TakeContext();
  if (ctx == 0) return nullptr;
  Batch* b = new Batch;
  b->ctx = ctx;
  b->depth = static_cast<int>(std::clamp<int64_t>(depth, 1, kMaxDepth));
  b->done = done;
  b->iov = Segments(n, first, dest, length, address, nbytes, page);
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

// The requests that read fixed-size records at sorted file `positions` (record i at
// positions[i] * (a_nbytes + b_nbytes)) into consecutive slots of a planar buffer: record
// i's first a_nbytes go to a_dest + i * a_nbytes, the other b_nbytes to
// b_dest + i * b_nbytes. One request per run of adjacent records, at most `max_run`
// records long (1: one per record). Fills offsets, sizes (room for n), first (n + 1),
// dest and length (2n), as hetflow.memory.Requests holds them; returns the request count.
// The same requests as Requests.planar's numpy formulation (reader.py), without its dozen
// array operations per call: neuron_cluster builds ~50 such batches a token.
int64_t hetflow_planar_requests(int64_t n, const int64_t* positions, int64_t a_nbytes,
                                int64_t b_nbytes, int64_t a_dest, int64_t b_dest,
                                int64_t max_run, int64_t* offsets, int64_t* sizes,
                                int64_t* first, int64_t* dest, int64_t* length) {
  const int64_t record = a_nbytes + b_nbytes;
  int64_t k = 0, run_first = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool breaks = i == 0 || positions[i] - positions[i - 1] != 1;
    if (breaks) run_first = i;
    if (breaks || (i - run_first) % max_run == 0) {
      offsets[k] = positions[i] * record;
      sizes[k] = 0;
      first[k] = 2 * i;
      ++k;
    }
    sizes[k - 1] += record;
    dest[2 * i] = a_dest + i * a_nbytes;
    length[2 * i] = a_nbytes;
    dest[2 * i + 1] = b_dest + i * b_nbytes;
    length[2 * i + 1] = b_nbytes;
  }
  first[k] = 2 * n;
  return k;
}

// The first of requests [0, n) (laid out as above, `segments` segments in all) that does
// not fit a buffer of `nbytes` bytes at `address` (a size below 0, no segment, segments
// not summing to its size, one outside the buffer), else, with O_DIRECT (`page` > 0),
// the first that it cannot serve (a file offset or destination off a page boundary, or
// a segment of a scattering request not a whole number of pages); -1 if none. The
// reader's Python check finds the same request and names it (reader.py, _check).
int64_t hetflow_check_requests(int64_t n, int64_t segments, const int64_t* offsets,
                               const int64_t* sizes, const int64_t* first,
                               const int64_t* dest, const int64_t* length, int64_t nbytes,
                               int64_t address, int64_t page) {
  if (first[0] != 0) return 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = first[i], b = first[i + 1];
    if (sizes[i] < 0 || b <= a || b > segments) return i;
    int64_t filled = 0;
    for (int64_t k = a; k < b; ++k) {
      if (dest[k] < 0 || dest[k] + length[k] > nbytes) return i;
      filled += length[k];
    }
    if (filled != sizes[i]) return i;
  }
  if (page <= 0) return -1;
  for (int64_t i = 0; i < n; ++i) {
    if (offsets[i] % page != 0) return i;
    const bool scattering = first[i + 1] - first[i] > 1;
    for (int64_t k = first[i]; k < first[i + 1]; ++k) {
      if ((address + dest[k]) % page != 0 || (scattering && length[k] % page != 0)) return i;
    }
  }
  return -1;
}

}  // extern "C"
