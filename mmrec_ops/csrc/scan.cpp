// CPU kernels of mmrec::scan and mmrec::scan_backward.
//
//   forward:  h_t = gamma_t * h_{t-1} + x_t                 (h_{-1} = h0)
//   backward: dx_t = dh_t + gamma_{t+1} * dx_{t+1}           (a reverse scan)
//             dgamma_t = dx_t * h_{t-1},  dh0 = gamma_0 * dx_0
// (with reverse=True, "t+1" and "t-1" swap roles).
//
// Each task owns a batch row (or a range of its channels) and walks time with
// its running state in a float32 (float64 for float64) buffer, so every input
// element is read once and every output written once; tasks run in parallel
// with at::parallel_for, and the loop over contiguous channels vectorises.

#include "autograd.h"
#include "common.h"

#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mmrec {
namespace {

constexpr const char* kScan = "mmrec::scan";
constexpr const char* kScanBackward = "mmrec::scan_backward";

// Base pointer plus [B, T, G, C] strides of one tensor.
template <typename T>
struct View {
  T* data;
  Strides4 s;
  T* at(int64_t b, int64_t t, int64_t g, int64_t c) const {
    return data + b * s.b + t * s.t + g * s.g + c * s.c;
  }
};

template <typename T>
View<T> make_view(const Tensor& tensor, const ChannelLayout& layout, size_t k, bool per_step) {
  Strides4 s;
  s.b = tensor.stride(0);
  s.t = per_step ? 0 : tensor.stride(1);
  s.g = layout.strides[k][0];
  s.c = layout.strides[k][1];
  return {static_cast<T*>(tensor.data_ptr()), s};
}

// The work of one task: batch b and the channels [f0, f0 + n) of the
// flattened [G, C] channels (f = g * C + c).
struct Task {
  int64_t b, f0, n;
};

// Splits the work into tasks: one per batch row when there are enough rows,
// each walking all its channels per time step, so that every tensor, whatever
// its layout, is read as a few long monotone streams (a contiguous row, or one
// run per group g of a transposed view).
struct Tiling {
  int64_t B, G, C, chunk, n_chunks;
  Tiling(int64_t B_, int64_t G_, int64_t C_) : B(B_), G(G_), C(C_) {
    chunk = channel_chunk(B, G * C);
    n_chunks = (G * C + chunk - 1) / chunk;
  }
  int64_t tasks() const {
    return B * n_chunks;
  }
  Task task(int64_t index) const {
    const int64_t f0 = (index % n_chunks) * chunk;
    return {index / n_chunks, f0, std::min(chunk, G * C - f0)};
  }
  // Calls body(g, c0, len, offset) for each run of contiguous channels
  // [c0, c0 + len) of group g in the task (offset: its place in the task),
  // last group first when kDescending.
  template <bool kDescending, typename Body>
  void for_each_run(const Task& task, Body&& body) const {
    if (task.n == 0) {
      return;
    }
    const int64_t g_first = task.f0 / C, g_last = (task.f0 + task.n - 1) / C;
    for (int64_t k = 0; k <= g_last - g_first; ++k) {
      const int64_t g = kDescending ? g_last - k : g_first + k;
      const int64_t c0 = std::max<int64_t>(task.f0 - g * C, 0);
      const int64_t c1 = std::min<int64_t>(C, task.f0 + task.n - g * C);
      body(g, c0, c1 - c0, g * C + c0 - task.f0);
    }
  }
};

// Visits i = 0 .. n-1, or n-1 .. 0 when kDescending. A pass that walks time
// backwards visits channels backwards too, so that memory is read as one
// monotone descending stream, which the hardware prefetcher follows; rows
// descending but channels ascending ran markedly slower (measured on 2 cores).
template <bool kDescending, typename Body>
inline void for_each_channel(int64_t n, Body&& body) {
  if constexpr (kDescending) {
    for (int64_t i = n - 1; i >= 0; --i) {
      body(i);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      body(i);
    }
  }
}

// Loads a task's initial state: h0, or the implicit constant.
template <typename acc_t, typename scalar_t>
void load_initial(
    const Tiling& tiling, const View<const scalar_t>* h0, const Task& task, acc_t implicit, acc_t* out) {
  tiling.for_each_run<false>(task, [&](int64_t g, int64_t c0, int64_t n, int64_t offset) {
    for (int64_t i = 0; i < n; ++i) {
      out[offset + i] = h0 ? static_cast<acc_t>(*h0->at(task.b, 0, g, c0 + i)) : implicit;
    }
  });
}

// Outputs at least this large are written with non-temporal (streaming)
// stores: they will not stay in cache for the next op anyway, and streaming
// skips reading each output line before it is overwritten, a third of the
// forward's memory traffic (faster on 2 cores, measured).
constexpr int64_t kStreamingBytes = 8 << 20;

// dst[i] = a[i] (* b[i]) for i < n, with streaming stores (call stream_fence()
// before the data is read by another thread). Visits i in descending order
// when kDescending, like the pass that calls it (see for_each_channel).
template <bool kDescending>
inline void stream_store(float* dst, const float* a, const float* b, int64_t n) {
  auto one = [&](int64_t i) { dst[i] = b ? a[i] * b[i] : a[i]; };
#if defined(__SSE2__)
  // [lo, hi): the part of the run whose 16-byte vectors are aligned in dst.
  int64_t lo = 0;
  while (lo < n && (reinterpret_cast<uintptr_t>(dst + lo) & 15) != 0) {
    ++lo;
  }
  const int64_t hi = lo + (n - lo) / 4 * 4;
  auto four = [&](int64_t i) {
    const __m128 v = b ? _mm_mul_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)) : _mm_loadu_ps(a + i);
    _mm_stream_ps(dst + i, v);
  };
  if constexpr (kDescending) {
    for (int64_t i = n - 1; i >= hi; --i) {
      one(i);
    }
    for (int64_t i = hi - 4; i >= lo; i -= 4) {
      four(i);
    }
    for (int64_t i = lo - 1; i >= 0; --i) {
      one(i);
    }
  } else {
    for (int64_t i = 0; i < lo; ++i) {
      one(i);
    }
    for (int64_t i = lo; i < hi; i += 4) {
      four(i);
    }
    for (int64_t i = hi; i < n; ++i) {
      one(i);
    }
  }
#else
  for_each_channel<kDescending>(n, one);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Streaming applies to float32 runs of unit stride (the common, large case).
template <typename scalar_t, bool kUnit>
constexpr bool kCanStream = kUnit && std::is_same_v<scalar_t, float>;

// One time step, h = gamma * h + x, over a run. kUnit: every channel stride
// is 1, which lets the compiler vectorise.
template <bool kUnit, bool kHasX, bool kDescending, typename scalar_t, typename acc_t>
inline void forward_step(
    const scalar_t* __restrict__ gamma, int64_t gs, const scalar_t* __restrict__ x, int64_t xs,
    scalar_t* __restrict__ out, acc_t* __restrict__ state, int64_t n, bool stream) {
  auto update = [&](int64_t i) {
    acc_t h = static_cast<acc_t>(gamma[kUnit ? i : i * gs]) * state[i];
    if constexpr (kHasX) {
      h += static_cast<acc_t>(x[kUnit ? i : i * xs]);
    }
    state[i] = h;
    return h;
  };
  if constexpr (kCanStream<scalar_t, kUnit>) {
    if (stream) {
      for_each_channel<kDescending>(n, update);
      stream_store<kDescending>(out, state, nullptr, n);
      return;
    }
  }
  for_each_channel<kDescending>(n, [&](int64_t i) { out[i] = static_cast<scalar_t>(update(i)); });
}

template <typename scalar_t, bool kUnit, bool kHasX, bool kReverse>
void scan_forward_tasks(
    const Tiling& tiling, int64_t T, const View<const scalar_t>& gamma, const View<const scalar_t>& x,
    const View<const scalar_t>* h0, const View<scalar_t>& out, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, tiling.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> state(tiling.chunk);
    for (int64_t index = begin; index < end; ++index) {
      const Task task = tiling.task(index);
      const int64_t b = task.b;
      load_initial(tiling, h0, task, kHasX ? acc_t(0) : acc_t(1), state.data());
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = kReverse ? T - 1 - step : step;
        tiling.for_each_run<kReverse>(task, [&](int64_t g, int64_t c0, int64_t n, int64_t offset) {
          forward_step<kUnit, kHasX, kReverse>(
              gamma.at(b, t, g, c0), gamma.s.c, x.at(b, t, g, c0), x.s.c, out.at(b, t, g, c0),
              state.data() + offset, n, stream);
        });
      }
    }
    stream_fence();
  });
}

// One step of the adjoint scan: acc = dh + gamma_next * acc, then the
// gradients of x and gamma at this step. hprev is h one step earlier in the
// forward direction (h0 at the first step, a float buffer of stride 1).
template <bool kUnit, bool kDescending, typename scalar_t, typename acc_t, typename hprev_t>
inline void backward_step(
    const scalar_t* __restrict__ grad_h, int64_t dhs, const scalar_t* __restrict__ gamma, int64_t gs,
    const hprev_t* __restrict__ hprev, int64_t hs, scalar_t* __restrict__ grad_x,
    scalar_t* __restrict__ grad_gamma, acc_t* __restrict__ acc, acc_t* __restrict__ gamma_next, int64_t n,
    bool stream) {
  auto update = [&](int64_t i) {
    const acc_t a = static_cast<acc_t>(grad_h[kUnit ? i : i * dhs]) + gamma_next[i] * acc[i];
    acc[i] = a;
    gamma_next[i] = static_cast<acc_t>(gamma[kUnit ? i : i * gs]);
    return a;
  };
  if constexpr (kCanStream<scalar_t, kUnit> && std::is_same_v<hprev_t, float>) {
    if (stream) {
      for_each_channel<kDescending>(n, update);
      stream_store<kDescending>(grad_x, acc, nullptr, n);
      stream_store<kDescending>(grad_gamma, acc, hprev, n);
      return;
    }
  }
  for_each_channel<kDescending>(n, [&](int64_t i) {
    const acc_t a = update(i);
    grad_x[i] = static_cast<scalar_t>(a);
    grad_gamma[i] = static_cast<scalar_t>(a * static_cast<acc_t>(hprev[kUnit ? i : i * hs]));
  });
}

template <typename scalar_t, bool kUnit, bool kReverse>
void scan_backward_tasks(
    const Tiling& tiling, int64_t T, bool has_x, const View<const scalar_t>& grad_h,
    const View<const scalar_t>& gamma, const View<const scalar_t>& h, const View<const scalar_t>* h0,
    const View<scalar_t>& grad_gamma, const View<scalar_t>& grad_x, const View<scalar_t>& grad_h0, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  // The adjoint walks time against the forward direction.
  constexpr bool kDescending = !kReverse;
  at::parallel_for(0, tiling.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(tiling.chunk), gamma_next(tiling.chunk), initial(tiling.chunk);
    for (int64_t index = begin; index < end; ++index) {
      const Task task = tiling.task(index);
      const int64_t b = task.b;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(gamma_next.begin(), gamma_next.end(), acc_t(0));
      load_initial(tiling, h0, task, has_x ? acc_t(0) : acc_t(1), initial.data());
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = kReverse ? step : T - 1 - step;
        const int64_t t_prev = kReverse ? t + 1 : t - 1;  // forward predecessor of t
        tiling.for_each_run<kDescending>(task, [&](int64_t g, int64_t c0, int64_t n, int64_t offset) {
          const auto dh = grad_h.at(b, t, g, c0);
          const auto gm = gamma.at(b, t, g, c0);
          const auto dx = grad_x.at(b, t, g, c0);
          const auto dg = grad_gamma.at(b, t, g, c0);
          acc_t* a = acc.data() + offset;
          acc_t* gn = gamma_next.data() + offset;
          if (step == T - 1) {
            backward_step<kUnit, kDescending>(
                dh, grad_h.s.c, gm, gamma.s.c, initial.data() + offset, int64_t(1), dx, dg, a, gn, n, stream);
          } else {
            backward_step<kUnit, kDescending>(
                dh, grad_h.s.c, gm, gamma.s.c, h.at(b, t_prev, g, c0), h.s.c, dx, dg, a, gn, n, stream);
          }
        });
      }
      tiling.for_each_run<false>(task, [&](int64_t g, int64_t c0, int64_t n, int64_t offset) {
        scalar_t* dh0 = grad_h0.at(b, 0, g, c0);
        for (int64_t i = 0; i < n; ++i) {
          dh0[i * grad_h0.s.c] = static_cast<scalar_t>(gamma_next[offset + i] * acc[offset + i]);
        }
      });
    }
    stream_fence();
  });
}

void check_scan_inputs(
    const char* op, const Tensor& gamma, const std::optional<Tensor>& x, const std::optional<Tensor>& h0) {
  check_floating(gamma, op, "gamma");
  TORCH_CHECK_VALUE(
      gamma.dim() >= 2, op, ": expected gamma of shape [B, T, ...] (at least 2 dims), got ",
      shape_string(gamma.sizes()));
  if (x) {
    check_like(*x, gamma, op, "x", "gamma");
    check_shape(*x, gamma.sizes(), op, "x");
  }
  if (h0) {
    check_like(*h0, gamma, op, "h0", "gamma");
    check_shape(*h0, step_shape(gamma.sizes()), op, "h0");
  }
}

// Channel strides of h0, or, when h0 is omitted, ones that add no constraint
// to the fold (gamma's own).
IntArrayRef h0_channel_strides(const Tensor& h0, const Tensor& gamma) {
  return h0.defined() ? step_channel_strides(h0) : seq_channel_strides(gamma);
}

// Folds the channel dims of all tensors in one layout; if they cannot fold
// to two dims (an exotic layout of 3+ unfoldable dims), the inputs are made
// contiguous, which always folds.
template <typename Fold>
ChannelLayout fold_or_contiguous(Fold fold, std::vector<Tensor*> inputs) {
  ChannelLayout layout = fold();
  if (!layout.ok) {
    for (Tensor* t : inputs) {
      if (t->defined()) {
        *t = t->contiguous();
      }
    }
    layout = fold();
  }
  TORCH_INTERNAL_ASSERT(layout.ok);
  return layout;
}

Tensor scan_cpu(
    const Tensor& gamma_in, const std::optional<Tensor>& x_in, const std::optional<Tensor>& h0_in, bool reverse) {
  check_scan_inputs(kScan, gamma_in, x_in, h0_in);
  Tensor gamma = gamma_in;
  Tensor x = x_in.value_or(gamma_in);  // stands in for an omitted x: same strides, never read
  Tensor h0 = h0_in.value_or(Tensor());
  Tensor out = at::empty(gamma.sizes(), gamma.options());
  const auto sizes = gamma.sizes();
  auto fold = [&] {
    return fold_channels(
        sizes.slice(2), {seq_channel_strides(gamma), seq_channel_strides(x), seq_channel_strides(out),
                         h0_channel_strides(h0, gamma)});
  };
  const ChannelLayout layout = fold_or_contiguous(fold, {&gamma, &x, &h0});
  const Tiling tiling(sizes[0], layout.G, layout.C);
  const bool unit = layout.strides[0][1] == 1 && layout.strides[1][1] == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gamma.scalar_type(), "mmrec_scan_cpu", [&] {
    const auto g = make_view<const scalar_t>(gamma, layout, 0, false);
    const auto xv = make_view<const scalar_t>(x, layout, 1, false);
    const auto o = make_view<scalar_t>(out, layout, 2, false);
    const auto h0v = h0.defined() ? make_view<const scalar_t>(h0, layout, 3, true) : View<const scalar_t>{};
    const View<const scalar_t>* h0p = h0.defined() ? &h0v : nullptr;
    const int64_t T = sizes[1];
    // Template flags: unit channel stride, x given, reverse.
    using Launch = void (*)(
        const Tiling&, int64_t, const View<const scalar_t>&, const View<const scalar_t>&,
        const View<const scalar_t>*, const View<scalar_t>&, bool);
    const Launch variants[2][2][2] = {
        {{scan_forward_tasks<scalar_t, false, false, false>, scan_forward_tasks<scalar_t, false, false, true>},
         {scan_forward_tasks<scalar_t, false, true, false>, scan_forward_tasks<scalar_t, false, true, true>}},
        {{scan_forward_tasks<scalar_t, true, false, false>, scan_forward_tasks<scalar_t, true, false, true>},
         {scan_forward_tasks<scalar_t, true, true, false>, scan_forward_tasks<scalar_t, true, true, true>}}};
    variants[unit][x_in.has_value()][reverse](tiling, T, g, xv, h0p, o, out.nbytes() >= kStreamingBytes);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> scan_backward_cpu(
    const Tensor& grad_h_in, const Tensor& gamma_in, const Tensor& h_in, const std::optional<Tensor>& h0_in,
    bool has_x, bool reverse) {
  check_scan_inputs(kScanBackward, gamma_in, std::nullopt, h0_in);
  check_like(grad_h_in, gamma_in, kScanBackward, "grad_h", "gamma");
  check_shape(grad_h_in, gamma_in.sizes(), kScanBackward, "grad_h");
  check_like(h_in, gamma_in, kScanBackward, "h", "gamma");
  check_shape(h_in, gamma_in.sizes(), kScanBackward, "h");
  Tensor grad_h = grad_h_in, gamma = gamma_in, h = h_in;
  Tensor h0 = h0_in.value_or(Tensor());
  const auto sizes = gamma.sizes();
  Tensor grad_gamma = at::empty(sizes, gamma.options());
  Tensor grad_x = at::empty(sizes, gamma.options());
  Tensor grad_h0 = at::empty(step_shape(sizes), gamma.options());
  auto fold = [&] {
    return fold_channels(
        sizes.slice(2), {seq_channel_strides(grad_h), seq_channel_strides(gamma), seq_channel_strides(h),
                         seq_channel_strides(grad_gamma), h0_channel_strides(h0, gamma)});
  };
  const ChannelLayout layout = fold_or_contiguous(fold, {&grad_h, &gamma, &h, &h0});
  const Tiling tiling(sizes[0], layout.G, layout.C);
  const bool unit = layout.strides[0][1] == 1 && layout.strides[1][1] == 1 && layout.strides[2][1] == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gamma.scalar_type(), "mmrec_scan_backward_cpu", [&] {
    const auto dh = make_view<const scalar_t>(grad_h, layout, 0, false);
    const auto g = make_view<const scalar_t>(gamma, layout, 1, false);
    const auto hv = make_view<const scalar_t>(h, layout, 2, false);
    // grad_gamma, grad_x and grad_h0 are contiguous, so they share one fold.
    const auto dg = make_view<scalar_t>(grad_gamma, layout, 3, false);
    const auto dx = make_view<scalar_t>(grad_x, layout, 3, false);
    const auto dh0 = make_view<scalar_t>(grad_h0, layout, 3, true);
    const auto h0v = h0.defined() ? make_view<const scalar_t>(h0, layout, 4, true) : View<const scalar_t>{};
    const View<const scalar_t>* h0p = h0.defined() ? &h0v : nullptr;
    const int64_t T = sizes[1];
    using Launch = void (*)(
        const Tiling&, int64_t, bool, const View<const scalar_t>&, const View<const scalar_t>&,
        const View<const scalar_t>&, const View<const scalar_t>*, const View<scalar_t>&, const View<scalar_t>&,
        const View<scalar_t>&, bool);
    const Launch variants[2][2] = {
        {scan_backward_tasks<scalar_t, false, false>, scan_backward_tasks<scalar_t, false, true>},
        {scan_backward_tasks<scalar_t, true, false>, scan_backward_tasks<scalar_t, true, true>}};
    variants[unit][reverse](tiling, T, has_x, dh, g, hv, h0p, dg, dx, dh0, grad_x.nbytes() >= kStreamingBytes);
  });
  return {grad_gamma, grad_x, grad_h0};
}

// ---------------------------------------------------------------------------
// Autograd kernel of scan, for every device (autograd.h says why in C++).

using ScanSignature = Tensor(const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, bool);
using ScanBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, bool, bool);

const c10::TypedOperatorHandle<ScanSignature>& scan_op() {
  static const auto op = mmrec_op<ScanSignature>(kScan);
  return op;
}

const c10::TypedOperatorHandle<ScanBackwardSignature>& scan_backward_op() {
  static const auto op = mmrec_op<ScanBackwardSignature>(kScanBackward);
  return op;
}

// Reverse mode: the node of h = scan(gamma, x, h0), its inputs in that order.
//   grad_gamma, grad_x, grad_h0 = scan_backward(grad_h, gamma, h, h0, has_x, reverse)
struct ScanBackwardNode final : Node {
  SavedVariable gamma, h, h0;
  bool has_x = false, has_h0 = false, reverse = false;

  std::string name() const override {
    return "MmrecScanBackward";
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor& grad_h = grads[0];
    if (!grad_h.defined()) {
      return variable_list(3);
    }
    const Tensor g = gamma.unpack(), out = h.unpack(getptr());
    const auto first = unpack_optional(h0, has_h0);
    std::tuple<Tensor, Tensor, Tensor> result;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph: through scan_backward's own autograd kernel, which
      // gives second derivatives.
      result = scan_backward_op().call(grad_h, g, out, first, has_x, reverse);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = scan_backward_op().call(grad_h, g, out, first, has_x, reverse);
    }
    const auto& [grad_gamma, grad_x, grad_h0] = result;
    return {grad_for(*this, 0, grad_gamma), grad_for(*this, 1, grad_x, has_x), grad_for(*this, 2, grad_h0, has_h0)};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    gamma.reset_data();
    h.reset_data();
    h0.reset_data();
  }
};

// h without the input at the boundary: h_{t-1} at step t (h_{t+1} in reverse),
// `first` (h0, or the implicit 0 / 1) at the first step the scan takes.
Tensor previous_state(const Tensor& h, const Tensor& first, bool reverse) {
  const int64_t T = h.size(1);
  if (reverse) {
    return at::cat({h.narrow(1, 1, T - 1), first.unsqueeze(1)}, 1);
  }
  return at::cat({first.unsqueeze(1), h.narrow(1, 0, T - 1)}, 1);
}

// Forward mode. The tangent of h is a scan with gamma's decay,
//   dh_t = gamma_t * dh_{t-1} + dgamma_t * h_{t-1} + dx_t,   dh_{-1} = dh0,
// of the primals gamma, h and h0 (a tangent undefined where an input has none).
Tensor scan_tangent(
    const Tensor& gamma, const Tensor& h, const std::optional<Tensor>& h0, bool has_x, bool reverse,
    const Tensor& gamma_t, const Tensor& x_t, const Tensor& h0_t) {
  Tensor drive = x_t;
  if (gamma_t.defined() && gamma.size(1) > 0) {
    const Tensor first = h0.has_value() ? *h0 : at::full_like(h.select(1, 0), has_x ? 0.0 : 1.0);
    const Tensor term = gamma_t * previous_state(h, first, reverse);
    drive = drive.defined() ? drive + term : term;
  }
  if (!drive.defined() && !h0_t.defined()) {
    return at::zeros_like(h);
  }
  auto optional = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
  return scan_op().call(gamma, optional(drive), optional(h0_t), reverse);
}

Tensor scan_autograd(
    const Tensor& gamma, const std::optional<Tensor>& x, const std::optional<Tensor>& h0, bool reverse) {
  Tensor h;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    h = scan_op().call(gamma, x, h0, reverse);
  }
  if (torch::autograd::compute_requires_grad(gamma, x, h0)) {
    auto node = make_node<ScanBackwardNode>();
    node->set_next_edges(torch::autograd::collect_next_edges(gamma, x, h0));
    node->gamma = SavedVariable(gamma, /*is_output=*/false);
    node->h0 = SavedVariable(h0, /*is_output=*/false);
    node->has_x = x.has_value();
    node->has_h0 = h0.has_value();
    node->reverse = reverse;
    torch::autograd::set_history(h, node);
    node->h = SavedVariable(h, /*is_output=*/true);
  }
  const Tensor gamma_t = tangent(gamma), x_t = tangent(x), h0_t = tangent(h0);
  if (gamma_t.defined() || x_t.defined() || h0_t.defined()) {
    h._set_fw_grad(
        scan_tangent(primal(gamma), h, primal(h0), x.has_value(), reverse, gamma_t, x_t, h0_t), /*level=*/0,
        /*is_inplace_op=*/false);
  }
  return h;
}

}  // namespace
}  // namespace mmrec

TORCH_LIBRARY_IMPL(mmrec, CPU, m) {
  m.impl("scan", &mmrec::scan_cpu);
  m.impl("scan_backward", &mmrec::scan_backward_cpu);
}

TORCH_LIBRARY_IMPL(mmrec, Autograd, m) {
  m.impl("scan", &mmrec::scan_autograd);
}
