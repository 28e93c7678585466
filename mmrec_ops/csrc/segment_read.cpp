// CPU kernels of mmrec::segment_read and mmrec::segment_read_backward: each query t
// over the tokens of the segments it chose, segments[b, segment_ids[b, t, j]] for each
// j whose id is not -1, in one softmax:
//
//   out_t = sum_c p_c v_c,  p = softmax(q_t . k_c / sqrt(d)),  lse_t = log sum_c exp(q_t . k_c / sqrt(d)),
//
// out_t = 0 and lse_t = -inf for a query with no segment. The queries go in slices whose
// gathered keys and values take at most kSliceBytes, so memory stays O(M S D) for the
// segments plus a slice of bounded size, whatever T: per slice the k S keys and values
// of each query are gathered, then the scores, the softmax and the weighted sum are
// batched products in the accumulation type (float32, float64 for float64). The backward
// recomputes the weights from lse:
//
//   delta = grad_out . out - grad_lse,   grad_s = p (grad_out . v - delta),
//   grad_q = grad_s k / sqrt(d),  grad_k = grad_s q / sqrt(d),  grad_v = p grad_out,
//
// and adds each query's key and value gradients into the segments they were gathered
// from (index_add_: several queries read one segment), in a fixed order.

#include "common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>

namespace mmrec {

namespace {

constexpr const char* kSegmentRead = "mmrec::segment_read";
constexpr const char* kSegmentReadBackward = "mmrec::segment_read_backward";
constexpr int64_t kSliceBytes = int64_t(64) << 20;

void check_segment_read_args(const Tensor& q, const Tensor& segments, const Tensor& segment_ids) {
  check_floating(q, kSegmentRead, "q");
  TORCH_CHECK_VALUE(
      q.dim() == 4, kSegmentRead, ": expected q of shape [B, T, H, d] (4 dims), got ", shape_string(q.sizes()));
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(d >= 1, kSegmentRead, ": expected q with d >= 1 channels per head, got d = 0");
  TORCH_CHECK_VALUE(
      segments.dim() == 5, kSegmentRead, ": expected segments of shape [B, M, S, 2, H d] (5 dims), got ",
      shape_string(segments.sizes()));
  check_like(segments, q, kSegmentRead, "segments", "q");
  const int64_t M = segments.size(1), S = segments.size(2);
  check_shape(segments, {B, M, S, 2, H * d}, kSegmentRead, "segments");
  TORCH_CHECK_VALUE(S >= 1, kSegmentRead, ": expected segments of S >= 1 tokens, got S = 0");
  TORCH_CHECK_VALUE(
      segment_ids.scalar_type() == at::kLong, kSegmentRead, ": expected segment_ids to be int64, got ",
      dtype_name(segment_ids.scalar_type()));
  TORCH_CHECK_VALUE(
      segment_ids.device() == q.device(), kSegmentRead, ": expected segment_ids to be on the device of q (",
      q.device().str(), "), got ", segment_ids.device().str());
  TORCH_CHECK_VALUE(
      segment_ids.dim() == 3, kSegmentRead, ": expected segment_ids of shape [B, T, k] (3 dims), got ",
      shape_string(segment_ids.sizes()));
  check_shape(segment_ids, {B, T, segment_ids.size(2)}, kSegmentRead, "segment_ids");
}

// The ids' values, which only the CPU kernels read (on CUDA the check would wait for the
// device): each -1 or a segment of the M.
void check_segment_ids_range(const Tensor& segment_ids, int64_t M) {
  if (segment_ids.numel() == 0) {
    return;
  }
  const auto [low_t, high_t] = at::aminmax(segment_ids);
  const int64_t low = low_t.item<int64_t>(), high = high_t.item<int64_t>();
  TORCH_CHECK_VALUE(
      low >= -1 && high < M, kSegmentRead, ": expected segment_ids in [-1, M) = [-1, ", std::to_string(M),
      "), got values from ", std::to_string(low), " to ", std::to_string(high));
}

// One call's operands in the accumulation type, and the gathering of a slice's keys.
struct Reads {
  int64_t B, T, H, d, M, S, k;
  double scale;
  Tensor queries;  // [B, T, H, d]
  Tensor table;    // [B M S, 2, H, d]: every token of every segment
  Tensor ids;      // [B, T, k]

  Reads(const Tensor& q, const Tensor& segments, const Tensor& segment_ids) {
    B = q.size(0), T = q.size(1), H = q.size(2), d = q.size(3);
    M = segments.size(1), S = segments.size(2), k = segment_ids.size(2);
    scale = 1.0 / std::sqrt(static_cast<double>(d));
    const auto acc = at::toOpMathType(q.scalar_type());
    queries = q.to(acc);
    table = segments.to(acc).reshape({B * M * S, 2, H, d});
    ids = segment_ids;
  }

  // Queries per slice: their gathered keys and values and their scores take at most kSliceBytes.
  int64_t slice_queries() const {
    const int64_t per_query = std::max<int64_t>(B * k * S * H * (2 * d + 4) * 8, 1);
    return std::max<int64_t>(1, kSliceBytes / per_query);
  }

  // [B, n, k S]: the row of `table` of each token queries [t0, t0 + n) read (a missing
  // segment's tokens point at row 0 and are masked by `visible`).
  Tensor rows(int64_t t0, int64_t n) const {
    const auto options = ids.options();
    auto first = at::arange(B, options).view({B, 1, 1}) * (M * S) + ids.narrow(1, t0, n).clamp_min(0) * S;
    return (first.unsqueeze(-1) + at::arange(S, options)).flatten(2);
  }

  // [B, n, 1, k S]: whether each of those tokens is read.
  Tensor visible(int64_t t0, int64_t n) const {
    return ids.narrow(1, t0, n).ge(0).unsqueeze(-1).expand({B, n, k, S}).flatten(2).unsqueeze(2);
  }

  // Keys and values [B, n, k S, H, d] of queries [t0, t0 + n).
  std::pair<Tensor, Tensor> keys_values(const Tensor& rows) const {
    auto gathered = table.index_select(0, rows.flatten()).view({B, rows.size(1), k * S, 2, H, d});
    return {gathered.select(3, 0), gathered.select(3, 1)};
  }

  // [B, n, H, k S]: the scaled scores, -inf where a token is not read.
  Tensor scores(const Tensor& queries_slice, const Tensor& keys, int64_t t0, int64_t n) const {
    auto s = at::einsum("bnhd,bnjhd->bnhj", {queries_slice, keys}).mul_(scale);
    return s.masked_fill_(visible(t0, n).logical_not(), -std::numeric_limits<double>::infinity());
  }
};

// The softmax weights exp(s - lse), lse [B, n, H]: 0 for every token of a query with no
// segment (lse -inf), where exp(-inf - -inf) would be NaN.
Tensor weights(const Tensor& scores, const Tensor& lse) {
  auto shift = at::where(lse.isneginf(), at::zeros({}, lse.options()), lse);
  return (scores - shift.unsqueeze(-1)).exp_();
}

std::tuple<Tensor, Tensor> segment_read_cpu(const Tensor& q, const Tensor& segments, const Tensor& segment_ids) {
  check_segment_read_args(q, segments, segment_ids);
  check_segment_ids_range(segment_ids, segments.size(1));
  const auto acc = at::toOpMathType(q.scalar_type());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  Tensor out = at::zeros(q.sizes(), q.options().dtype(acc));
  Tensor lse = at::full({B, T, H}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc));
  if (q.numel() > 0 && segment_ids.size(2) > 0 && segments.size(1) > 0) {
    const Reads reads(q, segments, segment_ids);
    for (int64_t t0 = 0; t0 < T; t0 += reads.slice_queries()) {
      const int64_t n = std::min(T - t0, reads.slice_queries());
      auto [keys, values] = reads.keys_values(reads.rows(t0, n));
      auto scores = reads.scores(reads.queries.narrow(1, t0, n), keys, t0, n);
      auto slice_lse = at::logsumexp(scores, -1);
      out.narrow(1, t0, n).copy_(at::einsum("bnhj,bnjhd->bnhd", {weights(scores, slice_lse), values}));
      lse.narrow(1, t0, n).copy_(slice_lse);
    }
  }
  return {out.to(q.scalar_type()).contiguous(), lse.permute({0, 2, 1}).contiguous()};
}

void check_lse_like(const Tensor& t, const Tensor& q, IntArrayRef shape, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(
      t.scalar_type() == acc && t.device() == q.device(), kSegmentReadBackward, ": expected ", name, " in ",
      dtype_name(acc), " on ", q.device().str(), ", got ", dtype_name(t.scalar_type()), " on ", t.device().str());
  check_shape(t, shape, kSegmentReadBackward, name);
}

void check_segment_read_backward_args(const Tensor& grad_out, const Tensor& grad_lse, const Tensor& q,
                                      const Tensor& out, const Tensor& lse) {
  const auto acc = at::toOpMathType(q.scalar_type());
  const std::vector<int64_t> lse_shape = {q.size(0), q.size(2), q.size(1)};
  check_like(grad_out, q, kSegmentReadBackward, "grad_out", "q");
  check_shape(grad_out, q.sizes(), kSegmentReadBackward, "grad_out");
  check_like(out, q, kSegmentReadBackward, "out", "q");
  check_shape(out, q.sizes(), kSegmentReadBackward, "out");
  check_lse_like(grad_lse, q, lse_shape, acc, "grad_lse");
  check_lse_like(lse, q, lse_shape, acc, "lse");
}

std::tuple<Tensor, Tensor> segment_read_backward_cpu(const Tensor& grad_out, const Tensor& grad_lse, const Tensor& q,
                                                     const Tensor& segments, const Tensor& segment_ids,
                                                     const Tensor& out, const Tensor& lse) {
  check_segment_read_args(q, segments, segment_ids);
  check_segment_read_backward_args(grad_out, grad_lse, q, out, lse);
  check_segment_ids_range(segment_ids, segments.size(1));
  if (q.numel() == 0 || segment_ids.size(2) == 0 || segments.size(1) == 0) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(segments, at::MemoryFormat::Contiguous)};
  }
  const Reads reads(q, segments, segment_ids);
  const int64_t T = reads.T, H = reads.H, d = reads.d;
  const auto acc = at::toOpMathType(q.scalar_type());
  Tensor grad = grad_out.to(acc);
  Tensor saved_lse = lse.permute({0, 2, 1});                                  // [B, T, H]
  Tensor delta = (grad * out.to(acc)).sum(-1) - grad_lse.permute({0, 2, 1});  // [B, T, H]
  Tensor grad_q = at::empty(q.sizes(), q.options().dtype(acc));
  Tensor grad_table = at::zeros_like(reads.table, at::MemoryFormat::Contiguous);
  for (int64_t t0 = 0; t0 < T; t0 += reads.slice_queries()) {
    const int64_t n = std::min(T - t0, reads.slice_queries());
    auto rows = reads.rows(t0, n);
    auto [keys, values] = reads.keys_values(rows);
    auto queries = reads.queries.narrow(1, t0, n);
    auto grad_slice = grad.narrow(1, t0, n);
    auto p = weights(reads.scores(queries, keys, t0, n), saved_lse.narrow(1, t0, n));  // [B, n, H, k S]
    auto grad_values = at::einsum("bnhj,bnhd->bnjhd", {p, grad_slice});
    auto grad_weights = at::einsum("bnhd,bnjhd->bnhj", {grad_slice, values});
    auto grad_scores = p.mul_(grad_weights.sub_(delta.narrow(1, t0, n).unsqueeze(-1)));
    grad_q.narrow(1, t0, n).copy_(at::einsum("bnhj,bnjhd->bnhd", {grad_scores, keys}).mul_(reads.scale));
    auto grad_keys = at::einsum("bnhj,bnhd->bnjhd", {grad_scores, queries}).mul_(reads.scale);
    grad_table.index_add_(0, rows.flatten(), at::stack({grad_keys, grad_values}, 3).view({-1, 2, H, d}));
  }
  const auto dtype = q.scalar_type();
  return {grad_q.to(dtype).contiguous(), grad_table.view(segments.sizes()).to(dtype).contiguous()};
}

}  // namespace

}  // namespace mmrec

TORCH_LIBRARY_IMPL(mmrec, CPU, m) {
  m.impl("segment_read", &mmrec::segment_read_cpu);
  m.impl("segment_read_backward", &mmrec::segment_read_backward_cpu);
}
