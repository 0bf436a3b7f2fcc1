// A command-line front end to the emulated CUDA kernels that needs no torch: the same
// launch functions the extension calls, on raw little-endian files. Python (fused_attn.emu)
// writes the inputs, runs this program and checks the outputs against fused_attn.reference.
// It exists for builds the extension cannot be: sanitizers (-fsanitize=address,undefined)
// and mutated copies of the kernel sources (tests/test_emulator.py).
//
//   emu_driver [--schedule round_robin|warp] OP DIR key=value...
//
// OP attention: B H HK Lq Lk D dtype(f16|bf16) causal mask_kind scale dropout_p seed
//   [window_left window_right softcap]
//   reads q k v dout [mask] (contiguous; mask (B, H, Lq, Lk) uint8 or dtype), writes out
//   stats dq dk dv [dmask].
// OP feed_forward: M d_model d_ff activation dtype dropout_p seed has_b1 has_b2 has_residual
//   reads x w1 [b1] w2 [b2] [residual] dout, writes out hidden pre dx dw1 dw2 [db1] [db2].
// OP layer_norm: rows cols dtype wdtype eps has_residual has_weight has_bias
//   reads x [residual] [weight] [bias] dy, writes y sum mean rstd dx [dw] [db].
// OP selftest: name=deadlock|barrier_skip|smem_out_of_bounds|divergent_collective|cp_async_wait:
//   small kernels that break the rules on purpose; all but the last must fail the launch
//   with the emulator's message; cp_async_wait writes before.bin and after.bin, a cp.async
//   destination read before and after its wait.
// Prints the emulator's counters as one JSON line; exit status 1 with a message on failure.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/attention_common.cuh"

namespace fa = fused_attn;
namespace emu = fused_attn::emu;

namespace {

struct Args {
  std::map<std::string, std::string> kv;
  long long i(const char* k) const { return std::stoll(at(k)); }
  double f(const char* k) const { return std::stod(at(k)); }
  long long i_or(const char* k, long long fallback) const { return kv.count(k) ? i(k) : fallback; }
  double f_or(const char* k, double fallback) const { return kv.count(k) ? f(k) : fallback; }
  const std::string& at(const char* k) const {
    auto it = kv.find(k);
    if (it == kv.end()) throw std::runtime_error(std::string("missing argument ") + k);
    return it->second;
  }
};

struct Files {
  std::string dir;
  std::vector<std::vector<unsigned char>> keep;
  void* read(const std::string& name, size_t bytes) {
    std::ifstream in(dir + "/" + name + ".bin", std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + dir + "/" + name + ".bin");
    keep.emplace_back(bytes + 16);
    // 16-byte aligned, as the torch allocator gives
    auto* p = keep.back().data();
    p += (16 - reinterpret_cast<uintptr_t>(p) % 16) % 16;
    in.read(reinterpret_cast<char*>(p), static_cast<std::streamsize>(bytes));
    if (static_cast<size_t>(in.gcount()) != bytes) throw std::runtime_error(name + ".bin is too short");
    return p;
  }
  void* out(size_t bytes, unsigned char fill = 0xff) {
    keep.emplace_back(bytes + 16, fill);  // NaN-poisoned unless asked otherwise
    auto* p = keep.back().data();
    return p + (16 - reinterpret_cast<uintptr_t>(p) % 16) % 16;
  }
  void write(const std::string& name, const void* p, size_t bytes) {
    std::ofstream o(dir + "/" + name + ".bin", std::ios::binary);
    o.write(static_cast<const char*>(p), static_cast<std::streamsize>(bytes));
  }
};

fa::DType dtype_of(const std::string& s) {
  if (s == "f16") return fa::DType::F16;
  if (s == "bf16") return fa::DType::BF16;
  if (s == "f32") return fa::DType::F32;
  throw std::runtime_error("dtype must be f16, bf16 or f32, got " + s);
}

void check(const char* err, const char* what) {
  if (err != nullptr) throw std::runtime_error(std::string(what) + ": " + err);
}

void attention(const Args& a, Files& f) {
  fa::AttentionParams p{};
  p.B = a.i("B"), p.H = a.i("H"), p.HK = a.i("HK"), p.Lq = a.i("Lq"), p.Lk = a.i("Lk"), p.D = a.i("D");
  p.DV = p.D;
  p.dtype = dtype_of(a.at("dtype"));
  const size_t e = fa::dtype_size(p.dtype);
  p.causal = static_cast<int32_t>(a.i("causal"));
  p.mask_kind = static_cast<int32_t>(a.i("mask_kind"));
  p.scale = static_cast<float>(a.f("scale"));
  p.dropout_p = static_cast<float>(a.f("dropout_p"));
  p.seed = static_cast<uint64_t>(a.i("seed"));
  p.threshold = fa::dropout_threshold(a.f("dropout_p"));
  p.window_left = a.i_or("window_left", -1), p.window_right = a.i_or("window_right", -1);
  p.windowed = p.window_left >= 0 || p.window_right >= 0;
  p.softcap = a.f_or("softcap", 0.0);
  const size_t nq = p.B * p.H * p.Lq * p.D, nk = p.B * p.HK * p.Lk * p.D, nmask = p.B * p.H * p.Lq * p.Lk;
  p.q = f.read("q", nq * e), p.k = f.read("k", nk * e), p.v = f.read("v", nk * e);
  p.dout = f.read("dout", nq * e);
  p.rows_q = p.Lq, p.rows_k = p.Lk;  // everything contiguous (B, H, L, D)
  for (int64_t* s : {p.q_stride, p.do_stride, p.out_stride, p.dq_stride})
    s[0] = p.H * p.Lq * p.D, s[1] = p.Lq * p.D, s[2] = p.D;
  for (int64_t* s : {p.k_stride, p.v_stride, p.dk_stride, p.dv_stride})
    s[0] = p.HK * p.Lk * p.D, s[1] = p.Lk * p.D, s[2] = p.D;
  if (p.mask_kind != fa::kMaskNone) {
    p.mask = f.read("mask", nmask * (p.mask_kind == fa::kMaskBool ? 1 : e));
    p.mask_dtype = p.dtype;
    p.mask_stride[0] = p.H * p.Lq * p.Lk, p.mask_stride[1] = p.Lq * p.Lk, p.mask_stride[2] = p.Lk, p.mask_stride[3] = 1;
  }
  p.out = f.out(nq * e);
  p.stats = static_cast<float*>(f.out(2 * p.B * p.H * p.Lq * 4));
  check(fa::cuda_emu::attention_fwd(p, nullptr), "attention_fwd");
  f.write("out", p.out, nq * e);
  f.write("stats", p.stats, 2 * p.B * p.H * p.Lq * 4);
  p.dq = f.out(nq * e), p.dk = f.out(nk * e), p.dv = f.out(nk * e);
  if (p.mask_kind == fa::kMaskFloat) p.dmask = f.out(nmask * 4, 0);
  auto* delta = static_cast<float*>(f.out(p.B * p.H * p.Lq * 4));
  check(fa::cuda_emu::attention_bwd(p, delta, nullptr), "attention_bwd");
  f.write("dq", p.dq, nq * e), f.write("dk", p.dk, nk * e), f.write("dv", p.dv, nk * e);
  if (p.mask_kind == fa::kMaskFloat) f.write("dmask", p.dmask, nmask * 4);
}

void feed_forward(const Args& a, Files& f) {
  fa::FeedForwardParams p{};
  p.M = a.i("M"), p.d_model = a.i("d_model"), p.d_ff = a.i("d_ff");
  p.activation = static_cast<int32_t>(a.i("activation"));
  p.dtype = dtype_of(a.at("dtype"));
  p.dropout_p = static_cast<float>(a.f("dropout_p"));
  p.seed = static_cast<uint64_t>(a.i("seed"));
  p.threshold = fa::dropout_threshold(a.f("dropout_p"));
  const size_t e = fa::dtype_size(p.dtype), xm = p.M * p.d_model, hm = p.M * p.d_ff, w = p.d_model * p.d_ff;
  p.x = f.read("x", xm * e), p.w1 = f.read("w1", w * e), p.w2 = f.read("w2", w * e);
  if (a.i("has_b1")) p.b1 = f.read("b1", p.d_ff * e);
  if (a.i("has_b2")) p.b2 = f.read("b2", p.d_model * e);
  if (a.i("has_residual")) p.residual = f.read("residual", xm * e);
  p.dout = f.read("dout", xm * e);
  p.out = f.out(xm * e), p.pre = f.out(hm * e);
  void* hidden = f.out(hm * e);
  check(fa::cuda_emu::feed_forward_fwd(p, hidden, nullptr), "feed_forward_fwd");
  f.write("out", p.out, xm * e), f.write("hidden", hidden, hm * e), f.write("pre", p.pre, hm * e);
  p.dx = f.out(xm * e), p.dw1 = f.out(w * e), p.dw2 = f.out(w * e);
  if (p.b1) p.db1 = static_cast<float*>(f.out(p.d_ff * 4));
  if (p.b2) p.db2 = static_cast<float*>(f.out(p.d_model * 4));
  void* dh = f.out(hm * e);
  auto* partial = static_cast<float*>(
      f.out(fa::cuda_emu::feed_forward_column_partial_chunks(p.M) * std::max(p.d_model, p.d_ff) * 4));
  check(fa::cuda_emu::feed_forward_bwd(p, hidden, dh, partial, nullptr), "feed_forward_bwd");
  f.write("dx", p.dx, xm * e), f.write("dw1", p.dw1, w * e), f.write("dw2", p.dw2, w * e);
  if (p.db1) f.write("db1", p.db1, p.d_ff * 4);
  if (p.db2) f.write("db2", p.db2, p.d_model * 4);
}

void layer_norm(const Args& a, Files& f) {
  fa::LayerNormFwdParams p{};
  p.rows = a.i("rows"), p.cols = a.i("cols");
  p.dtype = dtype_of(a.at("dtype")), p.wdtype = dtype_of(a.at("wdtype"));
  p.eps = static_cast<float>(a.f("eps"));
  const size_t e = fa::dtype_size(p.dtype), we = fa::dtype_size(p.wdtype), n = p.rows * p.cols;
  p.x = f.read("x", n * e);
  if (a.i("has_residual")) p.residual = f.read("residual", n * e), p.sum_out = f.out(n * e);
  if (a.i("has_weight")) p.weight = f.read("weight", p.cols * we);
  if (a.i("has_bias")) p.bias = f.read("bias", p.cols * we);
  p.y = f.out(n * e);
  p.mean = static_cast<float*>(f.out(p.rows * 4)), p.rstd = static_cast<float*>(f.out(p.rows * 4));
  check(fa::cuda_emu::layer_norm_fwd(p, nullptr), "layer_norm_fwd");
  f.write("y", p.y, n * e), f.write("mean", p.mean, p.rows * 4), f.write("rstd", p.rstd, p.rows * 4);
  if (p.sum_out) f.write("sum", p.sum_out, n * e);
  fa::LayerNormBwdParams b{};
  b.rows = p.rows, b.cols = p.cols, b.dtype = p.dtype, b.wdtype = p.wdtype;
  b.dy = f.read("dy", n * e);
  b.x = p.sum_out ? p.sum_out : p.x;
  b.weight = p.weight, b.mean = p.mean, b.rstd = p.rstd;
  b.dx = f.out(n * e);
  b.partial_rows = fa::cuda_emu::layer_norm_bwd_partial_rows(b.rows, b.cols, 0);
  if (p.weight)
    b.dw_partial = static_cast<float*>(f.out(b.partial_rows * b.cols * 4, 0)),
    b.dw = static_cast<float*>(f.out(b.cols * 4));
  if (p.bias)
    b.db_partial = static_cast<float*>(f.out(b.partial_rows * b.cols * 4, 0)),
    b.db = static_cast<float*>(f.out(b.cols * 4));
  check(fa::cuda_emu::layer_norm_bwd(b, nullptr), "layer_norm_bwd");
  f.write("dx", b.dx, n * e);
  if (b.dw) f.write("dw", b.dw, b.cols * 4);
  if (b.db) f.write("db", b.db, b.cols * 4);
}

namespace selftest {
using namespace fused_attn::cuda_emu;
using namespace fused_attn::cuda_emu::attn;

__global__ void deadlock(float* out) {  // lane 0 waits at a second shuffle the others never reach
  float v = warp_sum(1.f);
  if (threadIdx.x == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void barrier_skip(float* out) {  // the second warp returns before the barrier
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void smem_out_of_bounds(float* out) {  // the rows of lanes 8-15 lie past the 256 bytes
  FUSED_ATTN_DYNAMIC_SMEM(smem);
  uint32_t r[4];
  ldmatrix_x4(r, smem + (threadIdx.x & 7) * 16 + (threadIdx.x >> 3) * 128);
  out[threadIdx.x] = float(r[0]);
}

__global__ void divergent_collective(float* out) {  // half a warp shuffles, the other half loads
  FUSED_ATTN_DYNAMIC_SMEM(smem);
  float v = 0.f;
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else {
    uint32_t r[4];
    ldmatrix_x4(r, smem + (threadIdx.x & 15) * 16);
    v = float(r[0]);
  }
  out[threadIdx.x] = v;
}

__global__ void cp_async_visibility(const float* in, float* before, float* after) {
  FUSED_ATTN_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  cp_async_16(s + 4 * threadIdx.x, in + 4 * threadIdx.x, true);
  cp_async_commit();
  for (int i = 0; i < 4; ++i) before[4 * threadIdx.x + i] = s[4 * threadIdx.x + i];
  cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) after[4 * threadIdx.x + i] = s[4 * threadIdx.x + i];
}

void run(const Args& a, Files& f) {
  const std::string name = a.at("name");
  auto* out = static_cast<float*>(f.out(64 * 4));
  if (name == "deadlock") {
    launch_kernel(deadlock, 1, 32, 0, nullptr, out);
  } else if (name == "barrier_skip") {
    launch_kernel(barrier_skip, 1, 64, 0, nullptr, out);
  } else if (name == "smem_out_of_bounds") {
    launch_kernel(smem_out_of_bounds, 1, 32, 256, nullptr, out);
  } else if (name == "divergent_collective") {
    launch_kernel(divergent_collective, 1, 32, 256, nullptr, out);
  } else if (name == "cp_async_wait") {
    auto* in = static_cast<float*>(f.out(128 * 4));
    for (int i = 0; i < 128; ++i) in[i] = float(i);
    auto* before = static_cast<float*>(f.out(128 * 4));
    auto* after = static_cast<float*>(f.out(128 * 4));
    launch_kernel(cp_async_visibility, 1, 32, 512, nullptr, in, before, after);
    f.write("before", before, 128 * 4), f.write("after", after, 128 * 4);
  } else {
    throw std::runtime_error("unknown selftest " + name);
  }
  check(launch_error(), name.c_str());
}
}  // namespace selftest

}  // namespace

int main(int argc, char** argv) {
  int i = 1;
  if (i + 1 < argc && std::string(argv[i]) == "--schedule") {
    const std::string s = argv[i + 1];
    if (s != "round_robin" && s != "warp") {
      std::fprintf(stderr, "--schedule must be round_robin or warp, got %s\n", s.c_str());
      return 2;
    }
    emu::config().schedule = s == "warp" ? emu::Schedule::kWarp : emu::Schedule::kRoundRobin;
    i += 2;
  }
  if (argc - i < 2) {
    std::fprintf(
        stderr, "usage: %s [--schedule round_robin|warp] attention|feed_forward|layer_norm|selftest DIR key=value...\n",
        argv[0]);
    return 2;
  }
  const std::string op = argv[i];
  Files files{argv[i + 1], {}};
  Args args;
  for (int j = i + 2; j < argc; ++j) {
    const std::string kv = argv[j];
    const auto eq = kv.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "expected key=value, got %s\n", kv.c_str());
      return 2;
    }
    args.kv[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  try {
    if (op == "attention") {
      attention(args, files);
    } else if (op == "feed_forward") {
      feed_forward(args, files);
    } else if (op == "layer_norm") {
      layer_norm(args, files);
    } else if (op == "selftest") {
      selftest::run(args, files);
    } else {
      throw std::runtime_error("unknown op " + op);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emu_driver %s: %s\n", op.c_str(), e.what());
    return 1;
  }
  const emu::Stats& s = emu::stats();
  std::printf(
      "{\"launches\": %llu, \"blocks\": %llu, \"barriers\": %llu, \"shuffles\": %llu, \"mma\": %llu, "
      "\"ldmatrix\": %llu, \"ldmatrix_phases\": %llu, \"ldmatrix_conflicts\": %llu, \"cp_async\": %llu, "
      "\"cp_async_phases\": %llu, \"cp_async_conflicts\": %llu, \"switches\": %llu}\n",
      (unsigned long long)s.launches, (unsigned long long)s.blocks, (unsigned long long)s.barriers,
      (unsigned long long)s.shuffles, (unsigned long long)s.mma, (unsigned long long)s.ldmatrix,
      (unsigned long long)s.ldmatrix_phases, (unsigned long long)s.ldmatrix_conflicts, (unsigned long long)s.cp_async,
      (unsigned long long)s.cp_async_phases, (unsigned long long)s.cp_async_conflicts, (unsigned long long)s.switches);
  return 0;
}
