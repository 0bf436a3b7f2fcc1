// A CUDA warp emulator: the kernels of csrc/cuda/*.cu, compiled by the host C++ compiler
// with FUSED_ATTN_EMU defined, run on the CPU from the same source.
//
// Execution model. A launch runs its blocks one after another. Every thread of a block is
// a user-level fiber (ucontext) on the calling OS thread. A fiber runs until it parks: at
// __syncthreads, at a warp collective (shuffle, ldmatrix, mma.sync) or when it returns.
// When every fiber of the block (round-robin schedule) or of the warp being run ("warp"
// schedule) is parked, the scheduler completes what can complete: a warp collective whose
// 32 lanes all wait at it, a barrier that every thread of the block has reached. Nothing
// left to run and nothing to complete is a deadlock; a barrier that some threads skip
// (they returned) and a warp collective whose lanes wait at different instructions are
// errors too. Errors fail the launch: cudaGetLastError() reports them with a message.
//
// Schedules. "round_robin": each pass runs every runnable thread in index order to its
// next park. "warp": one warp runs until all its lanes wait at a barrier (or have
// returned) before the next warp starts, the order that exposes a missing __syncthreads
// (a warp reads shared memory that other warps have not written yet).
//
// Instructions, with the register fragment layouts of the PTX ISA (the functions in
// `layout` below; tests/test_emulator.py checks them against NVIDIA CuTe's traits):
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: the 16 products of
//     each output are exact in double and summed in double with C, then rounded to float
//     once (hardware sums in an unspecified order with at least float precision).
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: rows from the addresses of
//     lanes 0-7 (matrix 0), 8-15, 16-23, 24-31; each address 16-byte aligned and inside
//     the block's shared memory.
//   cp.async.cg.shared.global 16 bytes (zero-filled past src-size) with commit_group /
//     wait_group N: the copy happens at the wait; until then its destination holds NaN
//     (0xFF bytes), so a missing or too weak wait shows up as NaN.
//   __shfl_xor_sync with a full mask, __syncthreads.
// Shared memory (dynamic and static) is a separate, exactly sized, NaN-filled allocation
// per block; ldmatrix and cp.async check their shared addresses against it.
//
// Bank conflicts (32 banks of 4 bytes): each ldmatrix matrix is one phase of 8 rows of 16
// bytes; the 16-byte cp.async writes of a warp instruction go in 4 phases of 8 lanes. A
// phase costs as many wavefronts as the most distinct 4-byte words any bank holds; every
// wavefront past the first is a conflict. Plain C++ loads and stores of shared memory are
// not counted (the kernels' tile traffic is all ldmatrix and cp.async).
//
// Transcendentals (exp2f, expf, erff, tanhf, rsqrtf) use the host's libm, accurate to an
// ulp or two like the GPU's; __expf is the exact expf, not the GPU's approximation.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "layouts.h"

// ------------------------------------------------------------------ CUDA's names

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// 16-bit floating-point storage types with round-to-nearest-even conversions.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace fused_attn::emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t half_from_float(float f) {
  const uint32_t x = float_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a >= 0x7f800000u)
    return static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24 (exact scaling, RNE)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(bits_float(a) * 16777216.0f)));
  }
  uint32_t h = ((((a >> 23) - 127 + 15) << 10) | ((a & 0x7fffffu) >> 13));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<uint16_t>(sign | h);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = float(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e - 15 + 127) << 23) | (m << 13));
}

inline uint16_t bf16_from_float(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// ------------------------------------------------------------------ runtime state

enum class Schedule { kRoundRobin, kWarp };

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, shuffles = 0, mma = 0;
  uint64_t ldmatrix = 0, ldmatrix_phases = 0, ldmatrix_conflicts = 0;
  uint64_t cp_async = 0, cp_async_phases = 0, cp_async_conflicts = 0;
  uint64_t switches = 0;
};

struct Config {
  Schedule schedule = Schedule::kRoundRobin;
  int sm_count = 2;              // what cudaDevAttrMultiProcessorCount reports: small, so grid-stride loops loop
  size_t stack_bytes = 1 << 17;  // per fiber
};

inline Config& config() {
  static Config c;
  return c;
}
inline Stats& stats() {
  static Stats s;
  return s;
}
inline std::string& last_error() {
  static thread_local std::string e;
  return e;
}
inline std::string& pending_error() {
  static thread_local std::string e;
  return e;
}

enum class Park { kRunnable, kBarrier, kCollective, kExited };
enum class Op { kNone, kShfl, kLdmatrix, kMmaF16, kMmaBf16 };

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;
};

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  int linear = 0, warp = 0, lane = 0;
  Park park = Park::kRunnable;
  Op op = Op::kNone;
  // collective operands and results
  uint32_t shfl_value = 0, shfl_mask = 0;
  int shfl_src = 0;
  const unsigned char* ldm_addr = nullptr;
  int ldm_num = 0;
  bool ldm_trans = false;
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
  uint32_t out[4] = {};
  // cp.async: the open group and the committed ones, oldest first
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> groups;
  uint64_t cp_count = 0;
};

struct Region {
  unsigned char* begin;
  size_t bytes;
};

class Fault : public std::exception {
 public:
  explicit Fault(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
  std::string msg;
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Thread> threads;
  std::vector<Region> shared;  // [0]: dynamic shared memory
  std::map<const void*, unsigned char*> statics;
  std::map<std::pair<int, uint64_t>, std::vector<std::pair<int, uintptr_t>>> cp_phases;  // (warp, nth) -> (lane, addr)
  std::function<void()> body;
  ucontext_t scheduler;
  std::string error;
};

inline thread_local Block* g_block = nullptr;
inline thread_local Thread* g_thread = nullptr;

[[noreturn]] inline void fault(const std::string& what) { throw Fault(what); }

inline std::string thread_name(const Thread& t) {
  return "thread " + std::to_string(t.linear) + " (warp " + std::to_string(t.warp) + ", lane " +
         std::to_string(t.lane) + ")";
}

inline const Region* find_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const Region& r : g_block->shared) {
    if (c >= r.begin && c + bytes <= r.begin + r.bytes) return &r;
  }
  return nullptr;
}

inline void check_shared(const void* p, size_t bytes, const char* what) {
  if (find_shared(p, bytes) != nullptr) return;
  std::string regions;
  for (const Region& r : g_block->shared) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " [%p, +%zu)", static_cast<void*>(r.begin), r.bytes);
    regions += buf;
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s: shared address %p (+%zu bytes) is outside the block's shared memory:", what, p,
                bytes);
  fault(std::string(buf) + regions);
}

// Wavefronts a phase of 16-byte accesses needs: the most distinct words any bank holds.
inline int phase_wavefronts(const std::vector<uintptr_t>& addrs) {
  std::map<int, std::vector<uintptr_t>> words;
  for (uintptr_t a : addrs) {
    for (uintptr_t w = a / 4; w < (a + 16) / 4; ++w) {
      auto& v = words[static_cast<int>(w % 32)];
      if (std::find(v.begin(), v.end(), w) == v.end()) v.push_back(w);
    }
  }
  size_t most = 1;
  for (auto& [bank, v] : words) most = std::max(most, v.size());
  return static_cast<int>(most);
}

// ------------------------------------------------------------------ parking (called on a fiber)

inline void park(Park how) {
  Thread* t = g_thread;
  t->park = how;
  ++stats().switches;
  swapcontext(&t->ctx, &g_block->scheduler);
}

inline void syncthreads() { park(Park::kBarrier); }

inline void collective(Op op) {
  g_thread->op = op;
  park(Park::kCollective);
}

// ------------------------------------------------------------------ completing a warp collective

inline void complete_shfl(std::vector<Thread*>& lanes) {
  ++stats().shuffles;
  for (Thread* t : lanes) {
    if (t->shfl_mask != 0xffffffffu) fault(thread_name(*t) + ": only full-warp shuffle masks are emulated");
  }
  for (Thread* t : lanes) {
    const int src = t->shfl_src;
    t->out[0] = (src >= 0 && src < 32) ? lanes[src]->shfl_value : t->shfl_value;
  }
}

inline void complete_ldmatrix(std::vector<Thread*>& lanes) {
  ++stats().ldmatrix;
  const int num = lanes[0]->ldm_num;
  const bool trans = lanes[0]->ldm_trans;
  for (Thread* t : lanes) {
    if (t->ldm_num != num || t->ldm_trans != trans)
      fault(thread_name(*t) + ": ldmatrix lanes disagree on .x" + std::to_string(num) + " / .trans");
  }
  for (int m = 0; m < num; ++m) {
    uint16_t mat[8][8];
    std::vector<uintptr_t> phase;
    for (int r = 0; r < 8; ++r) {
      const Thread* src = lanes[layout::ldmatrix_row_lane(m, r)];
      const unsigned char* a = src->ldm_addr;
      if (reinterpret_cast<uintptr_t>(a) % 16 != 0)
        fault(thread_name(*src) + ": ldmatrix row address is not 16-byte aligned");
      check_shared(a, 16, "ldmatrix");
      std::memcpy(mat[r], a, 16);
      phase.push_back(reinterpret_cast<uintptr_t>(a));
    }
    ++stats().ldmatrix_phases;
    stats().ldmatrix_conflicts += phase_wavefronts(phase) - 1;
    for (Thread* t : lanes) {
      uint16_t half[2];
      for (int h = 0; h < 2; ++h) {
        const Coord c = layout::ldmatrix(t->lane, h, trans);
        half[h] = mat[c.row][c.col];
      }
      t->out[m] = uint32_t(half[0]) | (uint32_t(half[1]) << 16);
    }
  }
}

inline void complete_mma(std::vector<Thread*>& lanes, bool bf16) {
  ++stats().mma;
  auto value = [bf16](uint32_t reg, int h) {
    const uint16_t bits = static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffffu);
    return double(bf16 ? bf16_to_float(bits) : half_to_float(bits));
  };
  double A[16][16], B[16][8], C[16][8];
  for (const Thread* t : lanes) {
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) {
        const Coord c = layout::mma_a(t->lane, r, h);
        A[c.row][c.col] = value(t->a[r], h);
      }
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) {
        const Coord c = layout::mma_b(t->lane, r, h);
        B[c.row][c.col] = value(t->b[r], h);
      }
    for (int i = 0; i < 4; ++i) {
      const Coord c = layout::mma_c(t->lane, i);
      C[c.row][c.col] = t->c[i];
    }
  }
  for (Thread* t : lanes) {
    for (int i = 0; i < 4; ++i) {
      const Coord c = layout::mma_c(t->lane, i);
      double acc = C[c.row][c.col];
      for (int k = 0; k < 16; ++k) acc += A[c.row][k] * B[k][c.col];
      t->out[i] = float_bits(static_cast<float>(acc));
    }
  }
}

// Completes warp w's collective if all its lanes wait at it. Returns whether it did.
inline bool try_complete_warp(int w) {
  Block& b = *g_block;
  std::vector<Thread*> lanes;
  const int first = w * 32, last = std::min<int>(first + 32, static_cast<int>(b.threads.size()));
  for (int i = first; i < last; ++i) {
    Thread& t = b.threads[i];
    if (t.park != Park::kCollective) return false;
    lanes.push_back(&t);
  }
  if (lanes.size() != 32)
    fault("warp " + std::to_string(w) + " has fewer than 32 threads: warp collectives need all 32");
  const Op op = lanes[0]->op;
  for (Thread* t : lanes) {
    if (t->op != op) fault("warp " + std::to_string(w) + ": lanes wait at different warp collectives (divergence)");
  }
  switch (op) {
    case Op::kShfl: complete_shfl(lanes); break;
    case Op::kLdmatrix: complete_ldmatrix(lanes); break;
    case Op::kMmaF16: complete_mma(lanes, false); break;
    case Op::kMmaBf16: complete_mma(lanes, true); break;
    case Op::kNone: fault("internal: a collective without an operation");
  }
  for (Thread* t : lanes) t->park = Park::kRunnable, t->op = Op::kNone;
  return true;
}

// ------------------------------------------------------------------ the instructions

template <bool kBf16>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Thread* t = g_thread;
  std::memcpy(t->a, a, sizeof t->a);
  std::memcpy(t->b, b, sizeof t->b);
  std::memcpy(t->c, c, sizeof t->c);
  collective(kBf16 ? Op::kMmaBf16 : Op::kMmaF16);
  for (int i = 0; i < 4; ++i) c[i] = bits_float(t->out[i]);
}

inline void ldmatrix(uint32_t* r, int num, bool trans, const void* p) {
  Thread* t = g_thread;
  t->ldm_addr = static_cast<const unsigned char*>(p);
  t->ldm_num = num;
  t->ldm_trans = trans;
  collective(Op::kLdmatrix);
  for (int i = 0; i < num; ++i) r[i] = t->out[i];
}

template <typename T>
inline T shfl(uint32_t mask, T v, int src_lane) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  Thread* t = g_thread;
  std::memcpy(&t->shfl_value, &v, 4);
  t->shfl_mask = mask;
  t->shfl_src = src_lane;
  collective(Op::kShfl);
  T out;
  std::memcpy(&out, &t->out[0], 4);
  return out;
}

// cp.async.cg 16 bytes: src_bytes (0 or 16) are copied at the wait, the rest zero-filled.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  Thread* t = g_thread;
  ++stats().cp_async;
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    fault(thread_name(*t) + ": cp.async shared address is not 16-byte aligned");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fault(thread_name(*t) + ": cp.async global address is not 16-byte aligned");
  check_shared(dst, 16, "cp.async");
  auto* d = static_cast<unsigned char*>(dst);
  std::memset(d, 0xff, 16);  // NaN until the wait
  t->open_group.push_back({d, static_cast<const unsigned char*>(src), src_bytes});
  g_block->cp_phases[{t->warp, t->cp_count++}].push_back({t->lane, reinterpret_cast<uintptr_t>(d)});
}

inline void cp_async_commit() {
  Thread* t = g_thread;
  t->groups.push_back(std::move(t->open_group));
  t->open_group.clear();
}

inline void cp_async_wait(int newest_pending) {
  Thread* t = g_thread;
  while (static_cast<int>(t->groups.size()) > newest_pending) {
    for (const Copy& c : t->groups.front()) {
      std::memset(c.dst, 0, 16);
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    }
    t->groups.pop_front();
  }
}

inline unsigned char* dynamic_smem() { return g_block->shared[0].begin; }

// A kernel's static __shared__ array: one NaN-filled allocation per block and declaration.
template <typename Array>
inline Array& static_smem(const void* key) {
  Block& b = *g_block;
  auto it = b.statics.find(key);
  if (it == b.statics.end()) {
    auto* mem = static_cast<unsigned char*>(::operator new(sizeof(Array), std::align_val_t(16)));
    std::memset(mem, 0xff, sizeof(Array));
    b.shared.push_back({mem, sizeof(Array)});
    it = b.statics.emplace(key, mem).first;
  }
  return *reinterpret_cast<Array*>(it->second);
}

// ------------------------------------------------------------------ the scheduler

inline void fiber_main() {
  Thread* t = g_thread;
  try {
    g_block->body();
  } catch (const Fault& f) {
    if (g_block->error.empty()) g_block->error = f.msg;
  } catch (const std::exception& e) {
    if (g_block->error.empty()) g_block->error = std::string("exception in a thread: ") + e.what();
  }
  t->park = Park::kExited;
  // returning switches to uc_link: the scheduler
}

class Stacks {
 public:
  unsigned char* get(size_t count, size_t bytes) {
    if (count * bytes > size_) {
      if (mem_) munmap(mem_, size_);
      size_ = count * bytes;
      void* m = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) fault("cannot map fiber stacks");
      mem_ = static_cast<unsigned char*>(m);
    }
    return mem_;
  }

 private:
  unsigned char* mem_ = nullptr;
  size_t size_ = 0;
};

inline void resume(Thread& t) {
  g_thread = &t;
  ++stats().switches;
  swapcontext(&g_block->scheduler, &t.ctx);
  g_thread = nullptr;
}

inline std::string describe_stuck(const Block& b) {
  std::string s;
  for (size_t w = 0; w * 32 < b.threads.size(); ++w) {
    int counts[4] = {0, 0, 0, 0};
    for (size_t i = w * 32; i < std::min(b.threads.size(), w * 32 + 32); ++i) ++counts[int(b.threads[i].park)];
    s += "; warp " + std::to_string(w) + ": " + std::to_string(counts[1]) + " at __syncthreads, " +
         std::to_string(counts[2]) + " at a warp collective, " + std::to_string(counts[3]) + " returned";
    if (counts[2] > 0 && counts[2] < 32) s += " (a warp collective with missing lanes)";
  }
  return s;
}

// Runs the threads of warps [w0, w1) until none of them can run without the others.
inline bool run_warps(Block& b, int w0, int w1) {
  bool progress = false;
  const int n = static_cast<int>(b.threads.size());
  for (bool again = true; again;) {
    again = false;
    for (int i = w0 * 32; i < std::min(n, w1 * 32); ++i) {
      Thread& t = b.threads[i];
      if (t.park != Park::kRunnable) continue;
      resume(t);
      progress = again = true;
      if (!b.error.empty()) return true;
    }
    for (int w = w0; w < w1; ++w) {
      if (try_complete_warp(w)) progress = again = true;
    }
  }
  return progress;
}

inline void run_block(Block& b, unsigned char* stacks, size_t stack_bytes) {
  const int n = static_cast<int>(b.threads.size()), warps = (n + 31) / 32;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks + size_t(i) * stack_bytes;
    t.ctx.uc_stack.ss_size = stack_bytes;
    t.ctx.uc_link = &b.scheduler;
    makecontext(&t.ctx, fiber_main, 0);
  }
  try {
    while (true) {
      bool progress = false;
      if (config().schedule == Schedule::kWarp) {
        for (int w = 0; w < warps && b.error.empty(); ++w) progress |= run_warps(b, w, w + 1);
      } else {
        progress = run_warps(b, 0, warps);
      }
      if (!b.error.empty()) return;
      int exited = 0, barrier = 0;
      for (const Thread& t : b.threads) exited += t.park == Park::kExited, barrier += t.park == Park::kBarrier;
      if (exited == n) return;
      if (barrier > 0 && barrier + exited == n) {
        if (exited > 0)
          fault("__syncthreads not reached by every thread: " + std::to_string(exited) + " of " + std::to_string(n) +
                " threads returned while the others wait at the barrier");
        ++stats().barriers;
        for (Thread& t : b.threads) t.park = Park::kRunnable;
        continue;
      }
      if (!progress) fault("deadlock: no thread can run" + describe_stuck(b));
    }
  } catch (const Fault& f) {
    if (b.error.empty()) b.error = f.msg;
  }
}

inline void count_cp_async_conflicts(Block& b) {
  for (auto& [key, accesses] : b.cp_phases) {
    std::sort(accesses.begin(), accesses.end());
    for (int q = 0; q < 4; ++q) {  // quarter-warps: lanes 8q .. 8q+7
      std::vector<uintptr_t> phase;
      for (auto& [lane, addr] : accesses)
        if (lane / 8 == q) phase.push_back(addr);
      if (phase.empty()) continue;
      ++stats().cp_async_phases;
      stats().cp_async_conflicts += phase_wavefronts(phase) - 1;
    }
  }
}

inline std::map<const void*, size_t>& max_dynamic_smem() {
  static std::map<const void*, size_t> m;
  return m;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  if (!pending_error().empty()) return;  // a failed launch poisons the context until the error is read
  ++stats().launches;
  const size_t threads = size_t(block.x) * block.y * block.z;
  auto fail = [](const std::string& m) { pending_error() = "emulated kernel launch failed: " + m; };
  if (threads == 0 || threads > 1024) return fail("block of " + std::to_string(threads) + " threads (1..1024)");
  auto lim = max_dynamic_smem().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = lim == max_dynamic_smem().end() ? 48 * 1024 : lim->second;
  if (smem_bytes > allowed)
    return fail(std::to_string(smem_bytes) + " bytes of dynamic shared memory, more than the " +
                std::to_string(allowed) + " the kernel allows (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  static Stacks stacks_pool;
  const size_t stack_bytes = config().stack_bytes;
  unsigned char* stacks = stacks_pool.get(threads, stack_bytes);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.block_idx = dim3(bx, by, bz), b.block_dim = block, b.grid_dim = grid;
        b.body = [&params, kernel] { std::apply(kernel, params); };
        auto* dyn = static_cast<unsigned char*>(::operator new(std::max<size_t>(smem_bytes, 1), std::align_val_t(16)));
        std::memset(dyn, 0xff, smem_bytes);
        b.shared.push_back({dyn, smem_bytes});
        b.threads.resize(threads);
        for (size_t i = 0; i < threads; ++i) {
          Thread& t = b.threads[i];
          t.linear = static_cast<int>(i), t.warp = static_cast<int>(i / 32), t.lane = static_cast<int>(i % 32);
          t.idx = dim3(static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                       static_cast<unsigned>(i / (size_t(block.x) * block.y)));
        }
        ++stats().blocks;
        stats().threads += threads;
        g_block = &b;
        run_block(b, stacks, stack_bytes);
        count_cp_async_conflicts(b);
        g_block = nullptr;
        for (Region& r : b.shared) ::operator delete(r.begin, std::align_val_t(16));
        if (!b.error.empty()) {
          return fail("block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) +
                      "): " + b.error);
        }
      }
}

}  // namespace fused_attn::emu

// ------------------------------------------------------------------ the CUDA runtime API subset

#define threadIdx (::fused_attn::emu::g_thread->idx)
#define blockIdx (::fused_attn::emu::g_block->block_idx)
#define blockDim (::fused_attn::emu::g_block->block_dim)
#define gridDim (::fused_attn::emu::g_block->grid_dim)

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaGetLastError() {
  auto& p = fused_attn::emu::pending_error();
  if (p.empty()) return cudaSuccess;
  fused_attn::emu::last_error() = p;
  p.clear();
  return cudaErrorLaunchFailure;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : fused_attn::emu::last_error().c_str();
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute, int bytes) {
  fused_attn::emu::max_dynamic_smem()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = fused_attn::emu::config().sm_count;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

inline void __syncthreads() { fused_attn::emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return fused_attn::emu::shfl(mask, v, fused_attn::emu::g_thread->lane ^ lane_mask);
}

inline float __half2float(__half h) { return fused_attn::emu::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{fused_attn::emu::half_from_float(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return fused_attn::emu::bf16_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{fused_attn::emu::bf16_from_float(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float f) { return fused_attn::emu::float_bits(f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
