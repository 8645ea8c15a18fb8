// Convolutions for XLA's CPU backend, computed by oneDNN (the library PyTorch's CPU convolutions
// use), as XLA FFI custom calls. micle_jax/models/native_conv.py registers and calls them.
//
// Layouts are JAX's: images NHWC, kernels HWIO (grouped: H, W, C/groups, O). Every call pads
// (k - 1) // 2 before and the rest after on both spatial axes: SimCLR's fixed padding for strided
// convolutions and SAME for stride 1, which coincide for the odd kernels the ResNets use.
//
// Three targets, each a pure function of its two operands:
//   micle_onednn_conv_forward          (x, w)  -> y
//   micle_onednn_conv_backward_data    (dy, w) -> dx
//   micle_onednn_conv_backward_weights (x, dy) -> dw
// Attributes: strides, groups, threads (OpenMP threads for this call; the caller runs one XLA
// device per core, so 1; on one device, every core). oneDNN picks its own weight layout, and the
// weights are reordered to and from HWIO on each call (cheap beside the convolution). The weight
// gradient also takes `method` (Method below: 0 automatic, 1 oneDNN's, 2 matrix products).
//
// oneDNN 3.x (the C++ API of 3.0 and later). On a CPU without AVX-512, the ungrouped weight
// gradient is not oneDNN's convolution but matrix products (WeightGradientByGemm): oneDNN's
// AVX2 weight-gradient kernel for NHWC ran at 40-60% of the speed of its forward pass.
//
// Primitives are created once per shape and cached; the scratchpad is per calling thread, so two
// devices' threads may run the same primitive at once. oneDNN's CPU convolutions are
// deterministic for a fixed shape, thread count and machine, and so is WeightGradientByGemm (a
// fixed split of the work between threads, summed in a fixed order), so resume stays
// bit-identical.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// build.py names the oneDNN release it fetched; headers of another one are a build error, and
// native_conv.py refuses a library whose version differs from these headers' at load time.
#if defined(MICLE_ONEDNN_MAJOR) && defined(MICLE_ONEDNN_MINOR)
static_assert(DNNL_VERSION_MAJOR == MICLE_ONEDNN_MAJOR && DNNL_VERSION_MINOR == MICLE_ONEDNN_MINOR,
              "oneDNN headers of another release than the library build.py fetched");
#endif

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

enum class Kind { kForward, kBackwardData, kBackwardWeights };

// The shape of one convolution, in oneDNN's terms.
struct Geometry {
  int64_t n, h, w, c, ho, wo, o, k, strides, groups, pad_lo, pad_hi;

  memory::desc Src() const { return Image(h, w, c); }
  memory::desc Dst() const { return Image(ho, wo, o); }
  memory::desc Weights(bool any) const {
    Tag t = any ? Tag::any : (groups == 1 ? Tag::hwio : Tag::hwigo);
    if (groups == 1) return memory::desc({o, c, k, k}, memory::data_type::f32, t);
    return memory::desc({groups, o / groups, c / groups, k, k}, memory::data_type::f32, t);
  }
  memory::desc UserWeights() const { return Weights(false); }

 private:
  memory::desc Image(int64_t hh, int64_t ww, int64_t cc) const {
    return memory::desc({n, cc, hh, ww}, memory::data_type::f32, Tag::nhwc);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// One convolution's primitive and, where oneDNN's weight layout differs from HWIO, the reorder.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights;  // the layout the primitive reads or writes its weights in
  bool reorder = false;
  dnnl::reorder to_or_from_user;  // HWIO -> weights (forward, data) or weights -> HWIO
  memory::desc scratch;
  std::string impl;
};

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

Plan MakePlan(Kind kind, const Geometry& g) {
  auto& eng = Engine();
  const dnnl::memory::dims strides = {g.strides, g.strides};
  const dnnl::memory::dims lo = {g.pad_lo, g.pad_lo}, hi = {g.pad_hi, g.pad_hi};
  const auto algo = dnnl::algorithm::convolution_direct;
  auto attr = Attr();
  dnnl::convolution_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, algo,
                                                g.Src(), g.Weights(true), g.Dst(), strides, lo,
                                                hi, attr);
  Plan plan;
  memory::desc scratch;
  if (kind == Kind::kForward) {
    plan.conv = dnnl::convolution_forward(fwd);
    plan.weights = fwd.weights_desc();
    scratch = fwd.scratchpad_desc();
    plan.impl = fwd.impl_info_str();
  } else if (kind == Kind::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(eng, algo, g.Src(), g.Weights(true),
                                                       g.Dst(), strides, lo, hi, fwd, attr);
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.weights = pd.weights_desc();
    scratch = pd.scratchpad_desc();
    plan.impl = pd.impl_info_str();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(eng, algo, g.Src(), g.Weights(true),
                                                          g.Dst(), strides, lo, hi, fwd, attr);
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.weights = pd.diff_weights_desc();
    scratch = pd.scratchpad_desc();
    plan.impl = pd.impl_info_str();
  }
  plan.scratch = scratch;
  plan.reorder = plan.weights != g.UserWeights();
  if (plan.reorder) {
    auto user = g.UserWeights();
    dnnl::reorder::primitive_desc r =
        kind == Kind::kBackwardWeights
            ? dnnl::reorder::primitive_desc(eng, plan.weights, eng, user)
            : dnnl::reorder::primitive_desc(eng, user, eng, plan.weights);
    plan.to_or_from_user = dnnl::reorder(r);
  }
  return plan;
}

std::string Key(Kind kind, const Geometry& g, int64_t threads) {
  std::ostringstream s;
  s << static_cast<int>(kind) << ',' << g.n << ',' << g.h << ',' << g.w << ',' << g.c << ','
    << g.o << ',' << g.k << ',' << g.strides << ',' << g.groups << ',' << threads;
  return s.str();
}

const Plan& GetPlan(Kind kind, const Geometry& g, int64_t threads) {
  static std::mutex* mu = new std::mutex;
  static auto* plans = new std::unordered_map<std::string, std::unique_ptr<Plan>>;
  const std::string key = Key(kind, g, threads);
  std::lock_guard<std::mutex> lock(*mu);
  auto it = plans->find(key);
  if (it == plans->end()) {
    it = plans->emplace(key, std::make_unique<Plan>(MakePlan(kind, g))).first;
  }
  return *it->second;
}

// Grows as needed and is reused by later calls on the same thread. 0: scratchpad, 1: weights in
// oneDNN's layout, 2: other threads' weight-gradient sums, 3: a thread's matrix of patches.
std::vector<uint8_t>& ThreadBuffer(int which) {
  thread_local std::vector<uint8_t> buffers[4];
  return buffers[which];
}

void* Reserve(int which, size_t bytes) {
  auto& b = ThreadBuffer(which);
  if (b.size() < bytes) b.resize(bytes);
  return b.data();
}

// Rows p0 .. p0 + rows of the patch matrix: row p (image n, output row i, column j) holds the
// k×k×c window of x whose corner is (i·s - pad_lo, j·s - pad_lo), zeros outside the image.
void CopyPatches(const Geometry& g, const float* x, int64_t p0, int64_t rows, float* out) {
  const int64_t kc = g.k * g.k * g.c, per_image = g.ho * g.wo;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = p0 + r, n = p / per_image, i = (p % per_image) / g.wo, j = p % g.wo;
    float* row = out + r * kc;
    for (int64_t a = 0; a < g.k; ++a) {
      const int64_t h = i * g.strides + a - g.pad_lo;
      for (int64_t b = 0; b < g.k; ++b) {
        const int64_t w = j * g.strides + b - g.pad_lo;
        float* dst = row + (a * g.k + b) * g.c;
        if (h < 0 || h >= g.h || w < 0 || w >= g.w) {
          std::fill(dst, dst + g.c, 0.0f);
        } else {
          const float* src = x + ((n * g.h + h) * g.w + w) * g.c;
          std::copy(src, src + g.c, dst);
        }
      }
    }
  }
}

// The geometry of a convolution of an n×h×w×c image by k×k kernels to o channels.
Geometry MakeGeometry(int64_t n, int64_t h, int64_t w, int64_t c, int64_t o, int64_t k,
                      int64_t strides, int64_t groups) {
  Geometry g;
  g.n = n;
  g.h = h;
  g.w = w;
  g.c = c;
  g.o = o;
  g.k = k;
  g.strides = strides;
  g.groups = groups;
  g.ho = (h - 1) / strides + 1;
  g.wo = (w - 1) / strides + 1;
  g.pad_lo = (k - 1) / 2;
  g.pad_hi = (k - 1) - g.pad_lo;
  return g;
}

// From the operands' shapes; the output side is checked against the image's in Check.
Geometry MakeGeometry(ffi::Span<const int64_t> image, ffi::Span<const int64_t> out_image,
                      ffi::Span<const int64_t> kernel, int64_t strides, int64_t groups) {
  Geometry g = MakeGeometry(image[0], image[1], image[2], image[3], kernel[3], kernel[0], strides,
                            groups);
  g.ho = out_image[1];
  g.wo = out_image[2];
  return g;
}

ffi::Error Check(const Geometry& g, ffi::Span<const int64_t> kernel) {
  if (kernel[0] != kernel[1] || kernel[2] * g.groups != g.c || g.o % g.groups != 0) {
    return ffi::Error::InvalidArgument("onednn_conv: kernel shape does not match the image");
  }
  if (g.ho != (g.h - 1) / g.strides + 1 || g.wo != (g.w - 1) / g.strides + 1) {
    return ffi::Error::InvalidArgument("onednn_conv: output side is not (side - 1) // s + 1");
  }
  return ffi::Error::Success();
}

// How the weight gradient is computed (the backward_weights call's `method` attribute).
enum Method : int64_t { kAuto = 0, kOneDnn = 1, kGemm = 2 };

// Whether the weight gradient is WeightGradientByGemm's rather than oneDNN's. kAuto: where it
// is ungrouped and the CPU lacks AVX-512, where oneDNN's weight-gradient kernel for NHWC is a
// direct AVX2 one that ran at 35-90% of the matrix products' speed on ResNet-18's layers
// (docs/benchmark.md); fixed per machine. Grouped convolutions are always oneDNN's.
bool GemmWeightGradient(const Geometry& g, int64_t method) {
  static const bool no_avx512 = [] {
    const int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
    return (isa & dnnl_cpu_isa_avx512_core) != dnnl_cpu_isa_avx512_core;
  }();
  if (g.groups != 1 || method == kOneDnn) return false;
  return method == kGemm || no_avx512;
}

// Output positions per matrix product: 256 rows of patches (576 KB at 64 channels) measured best
// or within noise of it on every ResNet shape.
constexpr int64_t kRowsPerChunk = 256;

// dw[kh, kw, c, o] = sum over output positions p of patch(x, p)[kh, kw, c] * dy[p, o]: the
// positions are cut into chunks of kRowsPerChunk, each chunk's patches copied into a
// [rows, k*k*c] matrix (zeros where the window hangs over the padding) and multiplied into dw by
// one sgemm, dw += patchesᵀ · dy[chunk]. Each thread takes a fixed contiguous run of chunks and
// sums into its own buffer (thread 0 into dw); the buffers are then added in thread order.
ffi::Error WeightGradientByGemm(const Geometry& g, int threads, const float* x, const float* dy,
                                float* dw) {
  const int64_t kc = g.k * g.k * g.c, positions = g.n * g.ho * g.wo, size = kc * g.o;
  const int64_t chunks = (positions + kRowsPerChunk - 1) / kRowsPerChunk;
  const bool direct = g.k == 1 && g.strides == 1;  // the patches are x itself
  float* others = static_cast<float*>(Reserve(2, sizeof(float) * size * (threads - 1)));
  std::vector<int> used(threads, 0), failed(threads, 0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* acc = t == 0 ? dw : others + (t - 1) * size;
    float* patches =
        direct ? nullptr : static_cast<float*>(Reserve(3, sizeof(float) * kRowsPerChunk * kc));
    for (int64_t chunk = chunks * t / nt; chunk < chunks * (t + 1) / nt; ++chunk) {
      const int64_t p0 = chunk * kRowsPerChunk;
      const int64_t rows = std::min(positions, p0 + kRowsPerChunk) - p0;
      const float* a = direct ? x + p0 * g.c : patches;
      if (!direct) CopyPatches(g, x, p0, rows, patches);
      const float beta = used[t] ? 1.0f : 0.0f;
      if (dnnl_sgemm('T', 'N', kc, g.o, rows, 1.0f, a, kc, dy + p0 * g.o, g.o, beta, acc, g.o) !=
          dnnl_success) {
        failed[t] = 1;
      }
      used[t] = 1;
    }
    if (!used[t]) std::fill(acc, acc + size, 0.0f);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < size; ++i) {
      float sum = dw[i];
      for (int u = 1; u < nt; ++u) sum += others[(u - 1) * size + i];
      dw[i] = sum;
    }
  }
  for (int f : failed) {
    if (f) return ffi::Error::Internal("onednn_conv: dnnl_sgemm failed in the weight gradient");
  }
  return ffi::Error::Success();
}

ffi::Error Run(Kind kind, const Geometry& g, int64_t threads, void* src_or_dsrc,
               void* weights, void* dst_or_ddst, int64_t method = kAuto) {
  omp_set_num_threads(static_cast<int>(threads));
  if (kind == Kind::kBackwardWeights && GemmWeightGradient(g, method)) {
    return WeightGradientByGemm(g, static_cast<int>(threads),
                                static_cast<const float*>(src_or_dsrc),
                                static_cast<const float*>(dst_or_ddst),
                                static_cast<float*>(weights));
  }
  try {
    const Plan& plan = GetPlan(kind, g, threads);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory user_w(g.UserWeights(), eng, weights);
    memory w = user_w;
    if (plan.reorder) w = memory(plan.weights, eng, Reserve(1, plan.weights.get_size()));
    memory scratch(plan.scratch, eng, Reserve(0, plan.scratch.get_size()));
    memory src(g.Src(), eng, src_or_dsrc), dst(g.Dst(), eng, dst_or_ddst);
    if (kind == Kind::kForward) {
      if (plan.reorder) plan.to_or_from_user.execute(stream, user_w, w);
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w},
                                 {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == Kind::kBackwardData) {
      if (plan.reorder) plan.to_or_from_user.execute(stream, user_w, w);
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, w},
                                 {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, w},
                                 {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (plan.reorder) plan.to_or_from_user.execute(stream, w, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t strides, int64_t groups,
                   int64_t threads) {
  Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), w.dimensions(), strides, groups);
  if (auto e = Check(g, w.dimensions()); e.failure()) return e;
  return Run(Kind::kForward, g, threads, x.untyped_data(), w.untyped_data(),
             y->untyped_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t strides, int64_t groups,
                        int64_t threads) {
  Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), w.dimensions(), strides, groups);
  if (auto e = Check(g, w.dimensions()); e.failure()) return e;
  return Run(Kind::kBackwardData, g, threads, dx->untyped_data(), w.untyped_data(),
             dy.untyped_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t strides, int64_t groups,
                           int64_t threads, int64_t method) {
  Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), dw->dimensions(), strides, groups);
  if (auto e = Check(g, dw->dimensions()); e.failure()) return e;
  return Run(Kind::kBackwardWeights, g, threads, x.untyped_data(), dw->untyped_data(),
             dy.untyped_data(), method);
}

}  // namespace

#define MICLE_BIND                                                                      \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<ffi::F32>>()                                                     \
      .Attr<int64_t>("strides")                                                         \
      .Attr<int64_t>("groups")                                                          \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(micle_onednn_conv_forward, Forward, MICLE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(micle_onednn_conv_backward_data, BackwardData, MICLE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(micle_onednn_conv_backward_weights, BackwardWeights,
                              MICLE_BIND.Attr<int64_t>("method"));

// For the benchmark's report: which implementation a shape runs (e.g. "brgconv:avx2 +reorder",
// or "patches+sgemm" for WeightGradientByGemm).
extern "C" int micle_onednn_conv_impl(int kind, const int64_t* dims, int64_t threads,
                                      int64_t method, char* out, int out_len) {
  // dims: n, h, w, c, o, k, strides, groups
  Geometry g = MakeGeometry(dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7]);
  omp_set_num_threads(static_cast<int>(threads));
  if (static_cast<Kind>(kind) == Kind::kBackwardWeights && GemmWeightGradient(g, method)) {
    snprintf(out, out_len, "patches+sgemm");
    return 0;
  }
  try {
    const Plan& plan = GetPlan(static_cast<Kind>(kind), g, threads);
    std::string s = plan.impl + (plan.reorder ? " +reorder" : "");
    snprintf(out, out_len, "%s", s.c_str());
  } catch (const dnnl::error& e) {
    snprintf(out, out_len, "error: %s", e.what());
    return 1;
  }
  return 0;
}

// oneDNN's version in the headers this was compiled with, then in the library loaded at run time
// (major, minor, patch each).
extern "C" void micle_onednn_versions(int64_t* out) {
  const dnnl_version_t* loaded = dnnl_version();
  out[0] = DNNL_VERSION_MAJOR;
  out[1] = DNNL_VERSION_MINOR;
  out[2] = DNNL_VERSION_PATCH;
  out[3] = loaded->major;
  out[4] = loaded->minor;
  out[5] = loaded->patch;
}

// The instruction set oneDNN's kernels use on this CPU, by oneDNN's name for it.
extern "C" void micle_onednn_isa(char* out, int out_len) {
  const char* name = "other";
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41: name = "sse41"; break;
    case dnnl::cpu_isa::avx: name = "avx"; break;
    case dnnl::cpu_isa::avx2: name = "avx2"; break;
    case dnnl::cpu_isa::avx2_vnni: name = "avx2_vnni"; break;
    case dnnl::cpu_isa::avx2_vnni_2: name = "avx2_vnni_2"; break;
    case dnnl::cpu_isa::avx512_core: name = "avx512_core"; break;
    case dnnl::cpu_isa::avx512_core_vnni: name = "avx512_core_vnni"; break;
    case dnnl::cpu_isa::avx512_core_bf16: name = "avx512_core_bf16"; break;
    case dnnl::cpu_isa::avx512_core_fp16: name = "avx512_core_fp16"; break;
    case dnnl::cpu_isa::avx512_core_amx: name = "avx512_core_amx"; break;
    case dnnl::cpu_isa::avx512_core_amx_fp16: name = "avx512_core_amx_fp16"; break;
    default: break;
  }
  snprintf(out, out_len, "%s", name);
}
