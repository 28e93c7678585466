// CPU kernels of mmrec::memory_read and mmrec::memory_read_backward: each query
// t = n Q + i over the keys it sees, its block's group (group_mask[n, i]) and
// the tokens t <= j <= t + W - 1 that exist (j >= first_token), in one softmax:
//
//   out_t = sum_c p_c v_c,  p = softmax(q_t . k_c / sqrt(d)),  lse_t = log sum_c exp(q_t . k_c / sqrt(d)).
//
// A block of Q queries reads the same K = G + Q + W - 1 candidates (its group,
// then the W - 1 tokens before it and its own Q), so the kernels are batched
// matrix products over blocks, as the CPU's attention is: scores [B, H, nb, Q, K]
// in the accumulation type (float32, float64 for float64), masked, the softmax
// and its log-sum-exp, the weighted sum. Blocks go in slices whose scores
// take at most kSliceBytes, so memory stays O(T (G + W)) in slices of bounded
// size. The backward recomputes the weights:
//
//   delta = grad_out . out - grad_lse,   grad_s = p (grad_out . v - delta),
//   grad_q = grad_s k / sqrt(d),  grad_k = grad_s q / sqrt(d),  grad_v = p grad_out,
//
// and adds each block's window gradients into the tokens they were cut from.

#include "common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace mmrec {

namespace {

constexpr const char* kMemoryRead = "mmrec::memory_read";
constexpr const char* kMemoryReadBackward = "mmrec::memory_read_backward";
constexpr int64_t kSliceBytes = int64_t(64) << 20;

void check_bool_mask(const Tensor& mask, const Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(
      mask.scalar_type() == at::kBool, kMemoryRead, ": expected ", name, " to be bool, got ",
      dtype_name(mask.scalar_type()));
  TORCH_CHECK_VALUE(
      mask.device() == q.device(), kMemoryRead, ": expected ", name, " to be on the device of q (", q.device().str(),
      "), got ", mask.device().str());
}

void check_memory_read_args(const Tensor& q, const Tensor& group, const Tensor& group_mask, const Tensor& tokens,
                            const Tensor& first_token, int64_t window) {
  check_floating(q, kMemoryRead, "q");
  TORCH_CHECK_VALUE(
      q.dim() == 4, kMemoryRead, ": expected q of shape [B, T, H, d] (4 dims), got ", shape_string(q.sizes()));
  TORCH_CHECK_VALUE(window >= 1, kMemoryRead, ": expected window >= 1, got ", std::to_string(window));
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(d >= 1, kMemoryRead, ": expected q with d >= 1 channels per head, got d = 0");
  TORCH_CHECK_VALUE(
      group.dim() == 5, kMemoryRead, ": expected group of shape [B, nb, G, 2, H d] (5 dims), got ",
      shape_string(group.sizes()));
  check_like(group, q, kMemoryRead, "group", "q");
  const int64_t nb = group.size(1), G = group.size(2);
  check_shape(group, {B, nb, G, 2, H * d}, kMemoryRead, "group");
  TORCH_CHECK_VALUE(
      group_mask.dim() == 3, kMemoryRead, ": expected group_mask of shape [nb, Q, G] (3 dims), got ",
      shape_string(group_mask.sizes()));
  check_bool_mask(group_mask, q, "group_mask");
  const int64_t Q = group_mask.size(1);
  check_shape(group_mask, {nb, Q, G}, kMemoryRead, "group_mask");
  TORCH_CHECK_VALUE(
      nb * Q >= T, kMemoryRead, ": expected group_mask's nb Q >= T (blocks covering every query), got nb = ",
      std::to_string(nb), ", Q = ", std::to_string(Q), ", T = ", std::to_string(T));
  check_like(tokens, q, kMemoryRead, "tokens", "q");
  check_shape(tokens, {B, window - 1 + T, 2, H * d}, kMemoryRead, "tokens");
  TORCH_CHECK_VALUE(
      first_token.scalar_type() == at::kLong && first_token.dim() == 0, kMemoryRead,
      ": expected first_token to be an int64 tensor of 0 dims, got ", dtype_name(first_token.scalar_type()),
      " of shape ", shape_string(first_token.sizes()));
  TORCH_CHECK_VALUE(
      first_token.device() == q.device(), kMemoryRead, ": expected first_token to be on the device of q (",
      q.device().str(), "), got ", first_token.device().str());
}

// One call's operands in the accumulation type, in the layouts of the block products.
struct Blocks {
  int64_t B, T, H, d, nb, Q, G, W, K;
  double scale;
  Tensor queries;      // [B, H, nb, Q, d]
  Tensor group;        // [B, H, nb, G, 2, d]
  Tensor tokens;       // [B, H, W - 1 + nb Q, 2, d], zero-padded
  Tensor group_mask;   // [nb, Q, G]
  Tensor window_mask;  // [nb, Q, Q + W - 1]: the band t <= j <= t + W - 1, and the token exists
  Tensor row_valid;    // [nb, Q, 1]: the query exists (t < T)

  Blocks(const Tensor& q, const Tensor& group_in, const Tensor& group_mask_in, const Tensor& tokens_in,
         const Tensor& first_token, int64_t window) {
    B = q.size(0), T = q.size(1), H = q.size(2), d = q.size(3);
    nb = group_in.size(1), G = group_in.size(2), Q = group_mask_in.size(1), W = window;
    K = G + Q + W - 1;
    scale = 1.0 / std::sqrt(static_cast<double>(d));
    const auto acc = at::toOpMathType(q.scalar_type());
    queries = at::constant_pad_nd(q.to(acc), {0, 0, 0, 0, 0, nb * Q - T}).view({B, nb, Q, H, d}).permute({0, 3, 1, 2, 4});
    group = group_in.to(acc).unflatten(-1, {H, d}).permute({0, 4, 1, 2, 3, 5});
    tokens = at::constant_pad_nd(tokens_in.to(acc), {0, 0, 0, 0, 0, nb * Q - T})
                 .unflatten(-1, {H, d})
                 .permute({0, 3, 1, 2, 4});
    group_mask = group_mask_in;
    const auto device = q.device();
    auto i = at::arange(Q, at::TensorOptions().dtype(at::kLong).device(device)).view({Q, 1});
    auto j = at::arange(Q + W - 1, at::TensorOptions().dtype(at::kLong).device(device));
    auto band = j.ge(i).logical_and(j.lt(i + W));
    auto token = at::arange(W - 1 + nb * Q, at::TensorOptions().dtype(at::kLong).device(device));
    auto exists = token.ge(first_token).logical_and(token.lt(W - 1 + T)).unfold(0, Q + W - 1, Q);  // [nb, Q + W - 1]
    window_mask = band.unsqueeze(0).logical_and(exists.unsqueeze(1));
    auto t = at::arange(nb * Q, at::TensorOptions().dtype(at::kLong).device(device)).view({nb, Q, 1});
    row_valid = t.lt(T);
  }

  // Blocks per slice: their scores take at most kSliceBytes.
  int64_t slice_blocks() const {
    const int64_t per_block = std::max<int64_t>(B * H * Q * K * 8, 1);
    return std::max<int64_t>(1, kSliceBytes / per_block);
  }

  // Keys and values [B, H, n, K, d] of blocks [n0, n1): the group, then the window.
  std::pair<Tensor, Tensor> keys_values(int64_t n0, int64_t n1) const {
    auto window = tokens.narrow(2, n0 * Q, (n1 - n0 - 1) * Q + Q + W - 1).unfold(2, Q + W - 1, Q);  // [B, H, n, 2, d, Q+W-1]
    auto g = group.narrow(2, n0, n1 - n0);
    auto keys = at::cat({g.select(4, 0), window.select(3, 0).transpose(-1, -2)}, 3);
    auto values = at::cat({g.select(4, 1), window.select(3, 1).transpose(-1, -2)}, 3);
    return {keys, values};
  }

  // [n, Q, K]: which keys each query of blocks [n0, n1) sees.
  Tensor visible(int64_t n0, int64_t n1) const {
    return at::cat({group_mask.narrow(0, n0, n1 - n0), window_mask.narrow(0, n0, n1 - n0)}, 2);
  }

  struct Weights {
    Tensor weights;  // [B, H, n, Q, K], the softmax over the keys each query sees
    Tensor lse;      // [B, H, n, Q, 1]
  };

  // The softmax of blocks [n0, n1) and its log-sum-exp, lse = max - log(max weight): the
  // vectorised softmax kernel does the one exponential per score (the largest weight,
  // exp(0) / sum, is at least 1 / K). A query that sees no key: NaN weights, lse -inf.
  Weights weights(const Tensor& queries, const Tensor& keys, int64_t n0, int64_t n1) const {
    auto scores = at::matmul(queries, keys.transpose(-1, -2)).mul_(scale);
    scores.masked_fill_(visible(n0, n1).logical_not(), -std::numeric_limits<double>::infinity());
    auto top = scores.amax(-1, true);
    auto p = at::softmax(scores, -1);
    auto lse = (top - p.amax(-1, true).log_()).masked_fill_(top.isneginf(), -std::numeric_limits<double>::infinity());
    return {p, lse};
  }
};

std::tuple<Tensor, Tensor> memory_read_cpu(const Tensor& q, const Tensor& group, const Tensor& group_mask,
                                           const Tensor& tokens, const Tensor& first_token, int64_t window) {
  check_memory_read_args(q, group, group_mask, tokens, first_token, window);
  const auto acc = at::toOpMathType(q.scalar_type());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  if (B * T * H == 0) {
    return {at::empty(q.sizes(), q.options()), at::empty({B, H, T}, q.options().dtype(acc))};
  }
  const Blocks blocks(q, group, group_mask, tokens, first_token, window);
  const int64_t nb = blocks.nb, Q = blocks.Q, d = blocks.d;
  Tensor out = at::empty({B, H, nb, Q, d}, q.options().dtype(acc));
  Tensor lse = at::empty({B, H, nb, Q}, q.options().dtype(acc));
  for (int64_t n0 = 0; n0 < nb; n0 += blocks.slice_blocks()) {
    const int64_t n1 = std::min(nb, n0 + blocks.slice_blocks());
    auto [keys, values] = blocks.keys_values(n0, n1);
    auto p = blocks.weights(blocks.queries.narrow(2, n0, n1 - n0), keys, n0, n1);
    out.narrow(2, n0, n1 - n0).copy_(at::matmul(p.weights, values));
    lse.narrow(2, n0, n1 - n0).copy_(p.lse.squeeze(-1));
  }
  return {
      out.flatten(2, 3).narrow(2, 0, T).permute({0, 2, 1, 3}).to(q.scalar_type()).contiguous(),
      lse.flatten(2, 3).narrow(2, 0, T).contiguous(),
  };
}

void check_lse_like(const Tensor& t, const Tensor& q, IntArrayRef shape, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(
      t.scalar_type() == acc && t.device() == q.device(), kMemoryReadBackward, ": expected ", name, " in ",
      dtype_name(acc), " on ", q.device().str(), ", got ", dtype_name(t.scalar_type()), " on ", t.device().str());
  check_shape(t, shape, kMemoryReadBackward, name);
}

void check_memory_read_backward_args(const Tensor& grad_out, const Tensor& grad_lse, const Tensor& q,
                                     const Tensor& out, const Tensor& lse) {
  const auto acc = at::toOpMathType(q.scalar_type());
  const std::vector<int64_t> lse_shape = {q.size(0), q.size(2), q.size(1)};
  check_like(grad_out, q, kMemoryReadBackward, "grad_out", "q");
  check_shape(grad_out, q.sizes(), kMemoryReadBackward, "grad_out");
  check_like(out, q, kMemoryReadBackward, "out", "q");
  check_shape(out, q.sizes(), kMemoryReadBackward, "out");
  check_lse_like(grad_lse, q, lse_shape, acc, "grad_lse");
  check_lse_like(lse, q, lse_shape, acc, "lse");
}

std::tuple<Tensor, Tensor, Tensor> memory_read_backward_cpu(const Tensor& grad_out, const Tensor& grad_lse,
                                                            const Tensor& q, const Tensor& group,
                                                            const Tensor& group_mask, const Tensor& tokens,
                                                            const Tensor& first_token, const Tensor& out,
                                                            const Tensor& lse, int64_t window) {
  check_memory_read_args(q, group, group_mask, tokens, first_token, window);
  check_memory_read_backward_args(grad_out, grad_lse, q, out, lse);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  if (B * T * H == 0) {
    return {at::zeros_like(q), at::zeros_like(group), at::zeros_like(tokens)};
  }
  const Blocks blocks(q, group, group_mask, tokens, first_token, window);
  const int64_t nb = blocks.nb, Q = blocks.Q, d = blocks.d, G = blocks.G, W = blocks.W;
  const auto acc = at::toOpMathType(q.scalar_type());
  auto by_block = [&](const Tensor& t) {  // [B, H, T] -> [B, H, nb, Q, 1], zero-padded
    return at::constant_pad_nd(t, {0, nb * Q - T}).view({B, H, nb, Q, 1});
  };
  Tensor grad_blocks =
      at::constant_pad_nd(grad_out.to(acc), {0, 0, 0, 0, 0, nb * Q - T}).view({B, nb, Q, H, d}).permute({0, 3, 1, 2, 4});
  Tensor delta = by_block((grad_out.to(acc) * out.to(acc)).sum(-1).permute({0, 2, 1}) - grad_lse);
  Tensor grad_q = at::empty({B, H, nb, Q, d}, q.options().dtype(acc));
  Tensor grad_group = at::empty({B, H, nb, G, 2, d}, q.options().dtype(acc));
  Tensor grad_tokens = at::zeros({B, H, W - 1 + nb * Q, 2, d}, q.options().dtype(acc));
  for (int64_t n0 = 0; n0 < nb; n0 += blocks.slice_blocks()) {
    const int64_t n1 = std::min(nb, n0 + blocks.slice_blocks()), n = n1 - n0;
    auto [keys, values] = blocks.keys_values(n0, n1);
    auto queries = blocks.queries.narrow(2, n0, n);
    auto grad = grad_blocks.narrow(2, n0, n);
    // Padding queries (t >= T) weigh nothing (a padding row may see no key: NaN weights).
    auto p = blocks.weights(queries, keys, n0, n1).weights.masked_fill_(blocks.row_valid.narrow(0, n0, n).logical_not(), 0.0);
    auto grad_values = at::matmul(p.transpose(-1, -2), grad);  // [B, H, n, K, d]
    auto grad_scores = p.mul_(at::matmul(grad, values.transpose(-1, -2)).sub_(delta.narrow(2, n0, n)));
    grad_q.narrow(2, n0, n).copy_(at::matmul(grad_scores, keys).mul_(blocks.scale));
    auto grad_keys = at::matmul(grad_scores.transpose(-1, -2), queries).mul_(blocks.scale);
    auto grad_group_slice = grad_group.narrow(2, n0, n);
    grad_group_slice.select(4, 0).copy_(grad_keys.narrow(3, 0, G));
    grad_group_slice.select(4, 1).copy_(grad_values.narrow(3, 0, G));
    for (int64_t b = 0; b < n; ++b) {  // the windows of consecutive blocks overlap
      auto target = grad_tokens.narrow(2, (n0 + b) * Q, Q + W - 1);
      target.select(3, 0).add_(grad_keys.select(2, b).narrow(2, G, Q + W - 1));
      target.select(3, 1).add_(grad_values.select(2, b).narrow(2, G, Q + W - 1));
    }
  }
  const auto dtype = q.scalar_type();
  return {
      grad_q.flatten(2, 3).narrow(2, 0, T).permute({0, 2, 1, 3}).to(dtype).contiguous(),
      grad_group.permute({0, 2, 3, 4, 1, 5}).flatten(4, 5).to(dtype).contiguous(),
      grad_tokens.narrow(2, 0, W - 1 + T).permute({0, 2, 3, 1, 4}).flatten(3, 4).to(dtype).contiguous(),
  };
}

}  // namespace

}  // namespace mmrec

TORCH_LIBRARY_IMPL(mmrec, CPU, m) {
  m.impl("memory_read", &mmrec::memory_read_cpu);
  m.impl("memory_read_backward", &mmrec::memory_read_backward_cpu);
}
