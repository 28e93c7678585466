// CPU kernels of mmrec::recurrence and mmrec::recurrence_backward.
//
//   forward:  a_t = W h_{t-1} + b,  s_t = sigmoid(a_t),  h_t = z_t * s_t + gamma_t * h_{t-1}
//   backward (BPTT, t = T-1 .. 0, carry c_T = 0):
//             g_t = dh_t + c_{t+1}
//             dz_t = g_t * s_t,  dgamma_t = g_t * h_{t-1},  da_t = g_t * z_t * s_t * (1 - s_t)
//             c_t = gamma_t * g_t + W^T da_t,   dh0 = c_0
//             dW = sum_{b,t} da_t h_{t-1}^T,   db = sum_{b,t} da_t
//
// One task per (batch row, head) walks time with its state in a float32
// (float64 for float64) buffer; the head's d x d weight, converted once per
// call into a zero-padded float buffer of ~16 KB (d = 64), stays in L1 for the
// whole sequence. The backward recomputes the gate from the saved h_{t-1}
// rather than storing it: the pre-activations of all steps do not depend on
// the reverse pass, so one batched GEMM computes them before it, and the
// sequential part is left with one matvec per step (W^T da), as the forward.
// It writes da_t to a float buffer and forms dW and db from it with one more
// batched GEMM after the pass. The step loops are compiled twice,
// for baseline x86-64 and for AVX2 + FMA, and the faster one is picked at run
// time: the build itself targets baseline x86-64 so that the wheel runs
// anywhere.

#include "autograd.h"
#include "common.h"
#include "vectorise.h"

#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mmrec {
namespace {

constexpr const char* kRecurrence = "mmrec::recurrence";
constexpr const char* kRecurrenceBackward = "mmrec::recurrence_backward";

// exp_vectorisable's clamp at -87 is far beyond where sigmoid has saturated
// to float precision.
MMREC_INLINE float sigmoid(float a) {
  return 1.0f / (1.0f + exp_vectorisable(-a));
}
MMREC_INLINE double sigmoid(double a) {
  return 1.0 / (1.0 + std::exp(-a));
}

// out[o] += sum_i M[i * n + o] * v[i] for o < n (n a multiple of kLanes).
// Blocks of up to 64 outputs keep their sums in registers while M streams
// from L1 (eight independent FMA chains per step for 64 float lanes).
template <int64_t kBlock, typename acc_t>
MMREC_INLINE void matvec_block(const acc_t* M, const acc_t* v, acc_t* out, int64_t n, int64_t o0) {
  acc_t sum[kBlock];
  for (int64_t k = 0; k < kBlock; ++k) {
    sum[k] = out[o0 + k];
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t vi = v[i];
    const acc_t* row = M + i * n + o0;
#pragma omp simd
    for (int64_t k = 0; k < kBlock; ++k) {
      sum[k] += row[k] * vi;
    }
  }
  for (int64_t k = 0; k < kBlock; ++k) {
    out[o0 + k] = sum[k];
  }
}

template <typename acc_t>
MMREC_INLINE void matvec_accumulate(const acc_t* M, const acc_t* v, acc_t* out, int64_t n) {
  int64_t o0 = 0;
  for (; o0 + 64 <= n; o0 += 64) {
    matvec_block<64>(M, v, out, n, o0);
  }
  for (; o0 + 32 <= n; o0 += 32) {
    matvec_block<32>(M, v, out, n, o0);
  }
  for (; o0 < n; o0 += kLanes) {
    matvec_block<kLanes>(M, v, out, n, o0);
  }
}

// A [B, T, H, d] (or [B, H, d] with t = 0) tensor's base pointer and strides.
template <typename T>
struct Seq {
  T* data = nullptr;
  int64_t sb = 0, st = 0, sh = 0, sd = 0;
  T* at(int64_t b, int64_t t, int64_t h) const {
    return data + b * sb + t * st + h * sh;
  }
};

template <typename T>
Seq<T> seq_view(const Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
Seq<T> step_view(const std::optional<Tensor>& t) {
  if (!t.has_value()) {
    return {};
  }
  return {static_cast<T*>(t->data_ptr()), t->stride(0), 0, t->stride(1), t->stride(2)};
}


// Everything a task needs; weights are float (double) buffers [H, n, n] with
// n = padded(d), zero outside d x d, so padded lanes stay 0.
template <typename scalar_t>
struct Problem {
  int64_t B, T, H, d, n;
  Seq<const scalar_t> z, gamma;
};

template <typename scalar_t, typename acc_t>
struct ForwardProblem : Problem<scalar_t> {
  Seq<const scalar_t> h0;
  const acc_t* w_in_major;  // [H][i][o] = W[o][i]: a = W h walks it row by row
  const acc_t* bias;        // [H][n]
  scalar_t* out;            // contiguous [B, T, H, d]
};

template <typename scalar_t, typename acc_t>
struct BackwardProblem : Problem<scalar_t> {
  const acc_t* w_out_major;  // [H][o][i] = W[o][i]: W^T da walks it row by row
  Seq<const scalar_t> grad_h;
  scalar_t *grad_z, *grad_gamma, *grad_h0;  // contiguous
  // Head-major [H, B, T, d]: h_{t-1} and a_t = W h_{t-1} + b (inputs), da_t (output).
  const acc_t *h_prev, *pre;
  acc_t* grad_pre;
};

template <typename scalar_t, typename acc_t>
void load_h0(const ForwardProblem<scalar_t, acc_t>& p, int64_t b, int64_t head, acc_t* state) {
  std::fill(state, state + p.n, acc_t(0));
  if (p.h0.data != nullptr) {
    load(p.h0.at(b, 0, head), p.h0.sd, p.d, state);
  }
}

// Gate pre-activation a = W h_prev + b into `pre`.
template <typename scalar_t, typename acc_t>
MMREC_INLINE void pre_activation(const ForwardProblem<scalar_t, acc_t>& p, int64_t head, const acc_t* h_prev, acc_t* pre) {
  std::copy(p.bias + head * p.n, p.bias + (head + 1) * p.n, pre);
  matvec_accumulate(p.w_in_major + head * p.n * p.n, h_prev, pre, p.n);
}

template <typename scalar_t, typename acc_t>
MMREC_INLINE void forward_task(const ForwardProblem<scalar_t, acc_t>& p, int64_t b, int64_t head) {
  const int64_t d = p.d;
  std::vector<acc_t> buffers(4 * p.n);
  acc_t *state = buffers.data(), *pre = state + p.n, *z = pre + p.n, *gamma = z + p.n;
  load_h0(p, b, head, state);
  for (int64_t t = 0; t < p.T; ++t) {
    load(p.z.at(b, t, head), p.z.sd, d, z);
    load(p.gamma.at(b, t, head), p.gamma.sd, d, gamma);
    pre_activation(p, head, state, pre);
    scalar_t* out = p.out + ((b * p.T + t) * p.H + head) * d;
#pragma omp simd
    for (int64_t o = 0; o < d; ++o) {
      state[o] = z[o] * sigmoid(pre[o]) + gamma[o] * state[o];
      out[o] = static_cast<scalar_t>(state[o]);
    }
  }
}

template <typename scalar_t, typename acc_t>
MMREC_INLINE void backward_task(const BackwardProblem<scalar_t, acc_t>& p, int64_t b, int64_t head) {
  const int64_t d = p.d, n = p.n;
  std::vector<acc_t> buffers(5 * n, acc_t(0));
  acc_t *carry = buffers.data(), *z = carry + n, *gamma = z + n, *grad = gamma + n, *grad_pre = grad + n;
  const acc_t* w_out_major = p.w_out_major + head * n * n;
  for (int64_t t = p.T - 1; t >= 0; --t) {
    load(p.z.at(b, t, head), p.z.sd, d, z);
    load(p.gamma.at(b, t, head), p.gamma.sd, d, gamma);
    load(p.grad_h.at(b, t, head), p.grad_h.sd, d, grad);
    const int64_t offset = ((b * p.T + t) * p.H + head) * d;
    const int64_t head_major = ((head * p.B + b) * p.T + t) * d;
    const acc_t *h_prev = p.h_prev + head_major, *pre = p.pre + head_major;
#pragma omp simd
    for (int64_t o = 0; o < d; ++o) {
      const acc_t s = sigmoid(pre[o]);
      const acc_t g = grad[o] + carry[o];
      p.grad_z[offset + o] = static_cast<scalar_t>(g * s);
      p.grad_gamma[offset + o] = static_cast<scalar_t>(g * h_prev[o]);
      grad_pre[o] = g * z[o] * s * (acc_t(1) - s);
      p.grad_pre[head_major + o] = grad_pre[o];
      carry[o] = gamma[o] * g;
    }
    matvec_accumulate(w_out_major, grad_pre, carry, n);
  }
  scalar_t* grad_h0 = p.grad_h0 + (b * p.H + head) * d;
  for (int64_t o = 0; o < d; ++o) {
    grad_h0[o] = static_cast<scalar_t>(carry[o]);
  }
}

// The task loops, instantiated once per ISA: the task bodies are always_inline,
// so each instantiation compiles them with its own target.
template <typename scalar_t, typename acc_t>
void forward_tasks_baseline(const ForwardProblem<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    forward_task(p, task / p.H, task % p.H);
  }
}
template <typename scalar_t, typename acc_t>
void backward_tasks_baseline(const BackwardProblem<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    backward_task(p, task / p.H, task % p.H);
  }
}

#if MMREC_X86_DISPATCH
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void forward_tasks_avx2(
    const ForwardProblem<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    forward_task(p, task / p.H, task % p.H);
  }
}
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void backward_tasks_avx2(
    const BackwardProblem<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    backward_task(p, task / p.H, task % p.H);
  }
}
#endif


template <typename scalar_t, typename acc_t>
void forward_tasks(const ForwardProblem<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
#if MMREC_X86_DISPATCH
  if (has_avx2_fma()) {
    return forward_tasks_avx2(p, begin, end);
  }
#endif
  forward_tasks_baseline(p, begin, end);
}

template <typename scalar_t, typename acc_t>
void backward_tasks(const BackwardProblem<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
#if MMREC_X86_DISPATCH
  if (has_avx2_fma()) {
    return backward_tasks_avx2(p, begin, end);
  }
#endif
  backward_tasks_baseline(p, begin, end);
}

void check_recurrence_args(
    const char* op, const Tensor& z, const Tensor& gamma, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& h0) {
  check_floating(z, op, "z");
  TORCH_CHECK_VALUE(z.dim() == 4, op, ": expected z of shape [B, T, H, d] (4 dims), got ", shape_string(z.sizes()));
  const int64_t B = z.size(0), H = z.size(2), d = z.size(3);
  check_like(gamma, z, op, "gamma", "z");
  check_shape(gamma, z.sizes(), op, "gamma");
  check_like(weight, z, op, "weight", "z");
  check_shape(weight, {H, d, d}, op, "weight");
  if (bias.has_value()) {
    check_like(*bias, z, op, "bias", "z");
    check_shape(*bias, {H, d}, op, "bias");
  }
  if (h0.has_value()) {
    check_like(*h0, z, op, "h0", "z");
    check_shape(*h0, {B, H, d}, op, "h0");
  }
}

// The weight as an accumulation-dtype buffer [H, n, n], zero padded, in the
// order the matvec walks it; and the bias as [H, n].
Tensor padded_weight(const Tensor& weight, at::ScalarType acc, int64_t n, bool in_major) {
  const int64_t H = weight.size(0), d = weight.size(1);
  Tensor w = at::zeros({H, n, n}, weight.options().dtype(acc));
  w.narrow(1, 0, d).narrow(2, 0, d).copy_(in_major ? weight.transpose(1, 2) : weight);
  return w;
}

Tensor padded_bias(const std::optional<Tensor>& bias, const Tensor& weight, at::ScalarType acc, int64_t n) {
  Tensor b = at::zeros({weight.size(0), n}, weight.options().dtype(acc));
  if (bias.has_value()) {
    b.narrow(1, 0, weight.size(1)).copy_(*bias);
  }
  return b;
}

at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// h_{t-1} for every step, head-major [H, B * T, d] in the accumulation dtype:
// h0 (or 0) at t = 0, the saved h shifted by one step after.
Tensor head_major_h_prev(const Tensor& h, const std::optional<Tensor>& h0, at::ScalarType acc) {
  const int64_t B = h.size(0), T = h.size(1), H = h.size(2), d = h.size(3);
  Tensor h_prev = at::empty({H, B, T, d}, h.options().dtype(acc));
  if (h0.has_value()) {
    h_prev.select(2, 0).copy_(h0->permute({1, 0, 2}));
  } else {
    h_prev.select(2, 0).zero_();
  }
  h_prev.narrow(2, 1, T - 1).copy_(h.narrow(1, 0, T - 1).permute({2, 0, 1, 3}));
  return h_prev.view({H, B * T, d});
}

template <typename scalar_t>
void fill_problem(Problem<scalar_t>& p, const Tensor& z, const Tensor& gamma) {
  p.B = z.size(0);
  p.T = z.size(1);
  p.H = z.size(2);
  p.d = z.size(3);
  p.n = padded(p.d);
  p.z = seq_view<const scalar_t>(z);
  p.gamma = seq_view<const scalar_t>(gamma);
}

Tensor recurrence_cpu(
    const Tensor& z, const Tensor& gamma, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& h0) {
  check_recurrence_args(kRecurrence, z, gamma, weight, bias, h0);
  Tensor out = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  const auto acc = acc_type(z.scalar_type());
  const int64_t n = padded(z.size(3));
  const Tensor w_in_major = padded_weight(weight, acc, n, /*in_major=*/true);
  const Tensor b = padded_bias(bias, weight, acc, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "mmrec_recurrence", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardProblem<scalar_t, acc_t> p;
    fill_problem(p, z, gamma);
    p.h0 = step_view<const scalar_t>(h0);
    p.w_in_major = w_in_major.const_data_ptr<acc_t>();
    p.bias = b.const_data_ptr<acc_t>();
    p.out = out.data_ptr<scalar_t>();
    at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) { forward_tasks(p, begin, end); });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_backward_cpu(
    const Tensor& grad_h, const Tensor& z, const Tensor& gamma, const Tensor& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& h0, const Tensor& h) {
  check_recurrence_args(kRecurrenceBackward, z, gamma, weight, bias, h0);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"grad_h", grad_h}, {"h", h}}) {
    check_like(t, z, kRecurrenceBackward, name, "z");
    check_shape(t, z.sizes(), kRecurrenceBackward, name);
  }
  const int64_t B = z.size(0), T = z.size(1), H = z.size(2), d = z.size(3);
  const auto options = z.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor grad_z = at::empty(z.sizes(), options), grad_gamma = at::empty(z.sizes(), options);
  Tensor grad_h0 = at::empty({B, H, d}, options);
  const auto acc = acc_type(z.scalar_type());
  if (T == 0 || B * H * d == 0) {
    grad_h0.zero_();
    return {grad_z, grad_gamma, at::zeros_like(weight, options), at::zeros({H, d}, options), grad_h0};
  }
  const int64_t n = padded(d);
  const Tensor w_out_major = padded_weight(weight, acc, n, /*in_major=*/false);
  const Tensor h_prev = head_major_h_prev(h, h0, acc);
  const Tensor w_t = weight.to(acc).transpose(1, 2);
  const Tensor pre = bias.has_value() ? at::baddbmm(bias->to(acc).unsqueeze(1), h_prev, w_t) : at::bmm(h_prev, w_t);
  Tensor grad_pre = at::empty({H, B * T, d}, options.dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "mmrec_recurrence_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardProblem<scalar_t, acc_t> p;
    fill_problem(p, z, gamma);
    p.w_out_major = w_out_major.const_data_ptr<acc_t>();
    p.grad_h = seq_view<const scalar_t>(grad_h);
    p.grad_z = grad_z.data_ptr<scalar_t>();
    p.grad_gamma = grad_gamma.data_ptr<scalar_t>();
    p.grad_h0 = grad_h0.data_ptr<scalar_t>();
    p.grad_pre = grad_pre.data_ptr<acc_t>();
    p.h_prev = h_prev.const_data_ptr<acc_t>();
    p.pre = pre.const_data_ptr<acc_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) { backward_tasks(p, begin, end); });
  });
  // dW[h] = sum over (b, t) of da h_prev^T: one GEMM per head, [d, B*T] x [B*T, d].
  Tensor grad_weight = at::bmm(grad_pre.transpose(1, 2), h_prev);
  Tensor grad_bias = grad_pre.sum(1);
  return {grad_z, grad_gamma, grad_weight.to(z.scalar_type()), grad_bias.to(z.scalar_type()), grad_h0};
}

// ---------------------------------------------------------------------------
// Autograd kernel of recurrence, for every device (autograd.h says why in C++).

using RecurrenceSignature =
    Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&);
using RecurrenceBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const Tensor&);

const c10::TypedOperatorHandle<RecurrenceSignature>& recurrence_op() {
  static const auto op = mmrec_op<RecurrenceSignature>(kRecurrence);
  return op;
}

const c10::TypedOperatorHandle<RecurrenceBackwardSignature>& recurrence_backward_op() {
  static const auto op = mmrec_op<RecurrenceBackwardSignature>(kRecurrenceBackward);
  return op;
}

// Reverse mode: the node of h = recurrence(z, gamma, weight, bias, h0), its
// inputs in that order; backpropagation through time is recurrence_backward.
struct RecurrenceBackwardNode final : Node {
  SavedVariable z, gamma, weight, bias, h0, h;
  bool has_bias = false, has_h0 = false;

  std::string name() const override {
    return "MmrecRecurrenceBackward";
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor& grad_h = grads[0];
    if (!grad_h.defined()) {
      return variable_list(5);
    }
    const Tensor z_ = z.unpack(), gamma_ = gamma.unpack(), weight_ = weight.unpack(), h_ = h.unpack(getptr());
    const auto bias_ = unpack_optional(bias, has_bias), h0_ = unpack_optional(h0, has_h0);
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> result;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph: through recurrence_backward's autograd kernel, which
      // records a node that refuses second derivatives (rather than autograd
      // handing back zeros for them).
      result = recurrence_backward_op().call(grad_h, z_, gamma_, weight_, bias_, h0_, h_);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = recurrence_backward_op().call(grad_h, z_, gamma_, weight_, bias_, h0_, h_);
    }
    const auto& [grad_z, grad_gamma, grad_weight, grad_bias, grad_h0] = result;
    return {grad_for(*this, 0, grad_z), grad_for(*this, 1, grad_gamma), grad_for(*this, 2, grad_weight),
            grad_for(*this, 3, grad_bias, has_bias), grad_for(*this, 4, grad_h0, has_h0)};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&z, &gamma, &weight, &bias, &h0, &h}) {
      saved->reset_data();
    }
  }
};

Tensor recurrence_autograd(
    const Tensor& z, const Tensor& gamma, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& h0) {
  // No tangent formula: refuse rather than drop the tangents.
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(tangent(z).defined() || tangent(gamma).defined() || tangent(weight).defined() || tangent(bias).defined() ||
        tangent(h0).defined()),
      kRecurrence,
      " has no forward-mode derivative: torch.func.jvp, torch.func.jacfwd and torch.autograd.forward_ad are not "
      "supported for it. Use reverse mode instead (torch.func.grad, vjp, jacrev, or loss.backward()).");
  Tensor h;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    h = recurrence_op().call(z, gamma, weight, bias, h0);
  }
  if (torch::autograd::compute_requires_grad(z, gamma, weight, bias, h0)) {
    auto node = make_node<RecurrenceBackwardNode>();
    node->set_next_edges(torch::autograd::collect_next_edges(z, gamma, weight, bias, h0));
    node->z = SavedVariable(z, /*is_output=*/false);
    node->gamma = SavedVariable(gamma, /*is_output=*/false);
    node->weight = SavedVariable(weight, /*is_output=*/false);
    node->bias = SavedVariable(bias, /*is_output=*/false);
    node->h0 = SavedVariable(h0, /*is_output=*/false);
    node->has_bias = bias.has_value();
    node->has_h0 = h0.has_value();
    torch::autograd::set_history(h, node);
    node->h = SavedVariable(h, /*is_output=*/true);
  }
  return h;
}

}  // namespace
}  // namespace mmrec

TORCH_LIBRARY_IMPL(mmrec, CPU, m) {
  m.impl("recurrence", &mmrec::recurrence_cpu);
  m.impl("recurrence_backward", &mmrec::recurrence_backward_cpu);
}

TORCH_LIBRARY_IMPL(mmrec, Autograd, m) {
  m.impl("recurrence", &mmrec::recurrence_autograd);
}
