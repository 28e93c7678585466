// CPU kernel of mmrec::decode_read: one query per (batch row, head) against a
// cache of K slots,
//
//   out[b, h] = sum_s p_s values[b, h, s],   p = softmax_s(q[b, h] . keys[b, h, s] / sqrt(d) + mask[s]).
//
// One task per row: its scores in a buffer of K, the maximum, then the
// weighted sum of the values, all in the accumulation type (float32, float64
// for float64). A row whose slots are all masked gives NaN, as softmax does.
// Its gradients are composite (mmrec_ops/ops/decode_read.py): the op serves
// decoding, where only the forward is on the hot path.

#include "common.h"

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace mmrec {

namespace {

constexpr const char* kDecodeRead = "mmrec::decode_read";

void check_decode_read_args(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& mask) {
  check_floating(q, kDecodeRead, "q");
  TORCH_CHECK_VALUE(q.dim() == 3, kDecodeRead, ": expected q of shape [B, H, d] (3 dims), got ", q.sizes());
  TORCH_CHECK_VALUE(
      keys.dim() == 4, kDecodeRead, ": expected keys of shape [B, H, K, d] (4 dims), got ", keys.sizes());
  check_like(keys, q, kDecodeRead, "keys", "q");
  const int64_t K = keys.size(2);
  check_shape(keys, {q.size(0), q.size(1), K, q.size(2)}, kDecodeRead, "keys");
  TORCH_CHECK_VALUE(K > 0, kDecodeRead, ": expected keys with at least one slot (K >= 1), got K = 0");
  check_like(values, q, kDecodeRead, "values", "q");
  check_shape(values, keys.sizes(), kDecodeRead, "values");
  check_like(mask, q, kDecodeRead, "mask", "q");
  check_shape(mask, {K}, kDecodeRead, "mask");
}

template <typename scalar_t>
void decode_read_rows(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& mask, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = q.size(1), d = q.size(2), K = keys.size(2);
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = keys.const_data_ptr<scalar_t>();
  const scalar_t* v_ptr = values.const_data_ptr<scalar_t>();
  const scalar_t* mask_ptr = mask.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const auto qs = q.strides(), ks = keys.strides(), vs = values.strides();
  const int64_t mask_s = mask.stride(0);
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(d));
  // Rows of about 32K multiply-adds at least per task: a decode step's few rows
  // run on one thread rather than pay for waking the others.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K * d, 1));
  at::parallel_for(0, q.size(0) * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> query(d), scores(K), acc(d);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, h = row % H;
      const scalar_t* q_row = q_ptr + b * qs[0] + h * qs[1];
      const scalar_t* k_row = k_ptr + b * ks[0] + h * ks[1];
      const scalar_t* v_row = v_ptr + b * vs[0] + h * vs[1];
      for (int64_t i = 0; i < d; ++i) {
        query[i] = static_cast<acc_t>(q_row[i * qs[2]]) * scale;
      }
      acc_t top = -std::numeric_limits<acc_t>::infinity();
      for (int64_t s = 0; s < K; ++s) {
        const scalar_t* key = k_row + s * ks[2];
        acc_t score = static_cast<acc_t>(mask_ptr[s * mask_s]);
        for (int64_t i = 0; i < d; ++i) {
          score += query[i] * static_cast<acc_t>(key[i * ks[3]]);
        }
        scores[s] = score;
        top = std::max(top, score);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t total = 0;
      for (int64_t s = 0; s < K; ++s) {
        const acc_t p = std::exp(scores[s] - top);
        total += p;
        const scalar_t* value = v_row + s * vs[2];
        for (int64_t i = 0; i < d; ++i) {
          acc[i] += p * static_cast<acc_t>(value[i * vs[3]]);
        }
      }
      scalar_t* o = out_ptr + row * d;
      for (int64_t i = 0; i < d; ++i) {
        o[i] = static_cast<scalar_t>(acc[i] / total);
      }
    }
  });
}

Tensor decode_read_cpu(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& mask) {
  check_decode_read_args(q, keys, values, mask);
  Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_read_cpu", [&] {
    decode_read_rows<scalar_t>(q, keys, values, mask, out);
  });
  return out;
}

}  // namespace

}  // namespace mmrec

TORCH_LIBRARY_IMPL(mmrec, CPU, m) {
  m.impl("decode_read", &mmrec::decode_read_cpu);
}
