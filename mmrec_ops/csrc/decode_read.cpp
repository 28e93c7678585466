// CPU kernel of mmrec::decode_read: one query per (batch row, head) against a
// cache of K slots,
//
//   out[b, h] = sum_s p_s values[b, h, s],   p = softmax_s(q[b, h] . keys[b, h, s] / sqrt(d) + mask[s]).
//
// Small reads (a decode step of a few rows): one task per row, the scores of
// its K slots into a buffer, their maximum, the weights, then the weighted
// sum of the values, all in the accumulation type (float32, float64 for
// float64). Each key and value row is read as a float buffer padded to whole
// blocks of 16 lanes, so that the dot products (16 independent sums, added in
// a fixed order) and the weighted sums vectorise; the loops are compiled for
// baseline x86-64 and for AVX2 + FMA, picked at run time (vectorise.h).
// Larger reads go through BLAS (decode_read_blas), whose matrix-vector kernels
// amortise the horizontal sums that one dot product at a time pays. A row
// whose slots are all masked gives NaN, as softmax does. The gradients are
// composite (mmrec_ops/ops/decode_read.py): the op serves decoding, where only
// the forward is on the hot path.

#include "common.h"
#include "vectorise.h"

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace mmrec {

namespace {

constexpr const char* kDecodeRead = "mmrec::decode_read";

void check_decode_read_args(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& mask) {
  check_floating(q, kDecodeRead, "q");
  TORCH_CHECK_VALUE(
      q.dim() == 3, kDecodeRead, ": expected q of shape [B, H, d] (3 dims), got ",
      shape_string(q.sizes()));
  TORCH_CHECK_VALUE(
      keys.dim() == 4, kDecodeRead, ": expected keys of shape [B, H, K, d] (4 dims), got ", shape_string(keys.sizes()));
  check_like(keys, q, kDecodeRead, "keys", "q");
  const int64_t K = keys.size(2);
  check_shape(keys, {q.size(0), q.size(1), K, q.size(2)}, kDecodeRead, "keys");
  TORCH_CHECK_VALUE(K > 0, kDecodeRead, ": expected keys with at least one slot (K >= 1), got K = 0");
  check_like(values, q, kDecodeRead, "values", "q");
  check_shape(values, keys.sizes(), kDecodeRead, "values");
  check_like(mask, q, kDecodeRead, "mask", "q");
  check_shape(mask, {K}, kDecodeRead, "mask");
}

// A softmax weight exp(x), x = score - maximum <= 0: exactly 0 where
// exp_vectorisable would clamp (x < -87: a weight below 1.6e-38 of the largest).
MMREC_INLINE float softmax_weight(float x) {
  return x < -87.0f ? 0.0f : exp_vectorisable(x);
}
MMREC_INLINE double softmax_weight(double x) {
  return std::exp(x);
}

template <typename scalar_t, typename acc_t>
struct ReadProblem {
  const scalar_t *q, *keys, *values, *mask;
  scalar_t* out;
  int64_t H, d, n, K;  // n = padded(d)
  std::array<int64_t, 3> q_strides;
  std::array<int64_t, 4> key_strides, value_strides;
  int64_t mask_stride;
  acc_t scale;
};

// Per task: the query, a key or value row, the K scores and the output sums,
// each padded with zeros to n lanes.
template <typename acc_t>
struct RowBuffers {
  std::vector<acc_t> query, line, scores, sums;
  RowBuffers(int64_t n, int64_t K) : query(n), line(n), scores(K), sums(n) {}
};

template <typename acc_t>
MMREC_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += a[i + l] * b[i + l];
    }
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += lanes[l];
  }
  return total;
}

// Row s of a [K, d] key or value matrix as n accumulation-type lanes: in place
// when it already is one (contiguous, d a whole number of lanes), else loaded
// into `line`, zero-padded.
template <typename scalar_t, typename acc_t>
MMREC_INLINE const acc_t* slot_row(const scalar_t* rows, int64_t s, int64_t slot_stride, int64_t dim_stride,
                                   int64_t d, int64_t n, acc_t* line) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (dim_stride == 1 && d == n) {
      return rows + s * slot_stride;
    }
  }
  load(rows + s * slot_stride, dim_stride, d, line);
  return line;
}

template <typename scalar_t, typename acc_t>
MMREC_INLINE void read_row(const ReadProblem<scalar_t, acc_t>& p, int64_t row, RowBuffers<acc_t>& buf) {
  const int64_t b = row / p.H, h = row % p.H, d = p.d, n = p.n;
  const auto &qs = p.q_strides, &ks = p.key_strides, &vs = p.value_strides;
  acc_t *query = buf.query.data(), *line = buf.line.data(), *scores = buf.scores.data(), *sums = buf.sums.data();
  load(p.q + b * qs[0] + h * qs[1], qs[2], d, query);
  for (int64_t i = 0; i < d; ++i) {
    query[i] *= p.scale;
  }
  const scalar_t* key_row = p.keys + b * ks[0] + h * ks[1];
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (int64_t s = 0; s < p.K; ++s) {
    const acc_t* key = slot_row(key_row, s, ks[2], ks[3], d, n, line);
    scores[s] = dot(query, key, n) + static_cast<acc_t>(p.mask[s * p.mask_stride]);
    top = scores[s] > top ? scores[s] : top;
  }
  acc_t total = 0;
  for (int64_t s = 0; s < p.K; ++s) {
    scores[s] = softmax_weight(scores[s] - top);
    total += scores[s];
  }
  std::fill(sums, sums + n, acc_t(0));
  const scalar_t* value_row = p.values + b * vs[0] + h * vs[1];
  for (int64_t s = 0; s < p.K; ++s) {
    const acc_t* value = slot_row(value_row, s, vs[2], vs[3], d, n, line);
    const acc_t weight = scores[s];
    for (int64_t i = 0; i < n; ++i) {
      sums[i] += weight * value[i];
    }
  }
  scalar_t* out = p.out + row * d;
  for (int64_t i = 0; i < d; ++i) {
    out[i] = static_cast<scalar_t>(sums[i] / total);
  }
}

// The task loops, instantiated once per ISA (read_row is always_inline).
template <typename scalar_t, typename acc_t>
void read_rows_baseline(const ReadProblem<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  RowBuffers<acc_t> buf(p.n, p.K);
  for (int64_t row = begin; row < end; ++row) {
    read_row(p, row, buf);
  }
}

#if MMREC_X86_DISPATCH
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void read_rows_avx2(const ReadProblem<scalar_t, acc_t>& p, int64_t begin,
                                                        int64_t end) {
  RowBuffers<acc_t> buf(p.n, p.K);
  for (int64_t row = begin; row < end; ++row) {
    read_row(p, row, buf);
  }
}
#endif

template <typename scalar_t>
void decode_read_rows(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& mask, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  ReadProblem<scalar_t, acc_t> p;
  p.q = q.const_data_ptr<scalar_t>();
  p.keys = keys.const_data_ptr<scalar_t>();
  p.values = values.const_data_ptr<scalar_t>();
  p.mask = mask.const_data_ptr<scalar_t>();
  p.out = out.mutable_data_ptr<scalar_t>();
  p.H = q.size(1);
  p.d = q.size(2);
  p.n = padded(p.d);
  p.K = keys.size(2);
  std::copy_n(q.strides().begin(), 3, p.q_strides.begin());
  std::copy_n(keys.strides().begin(), 4, p.key_strides.begin());
  std::copy_n(values.strides().begin(), 4, p.value_strides.begin());
  p.mask_stride = mask.stride(0);
  p.scale = acc_t(1) / std::sqrt(acc_t(p.d));
  // Rows of about 32K multiply-adds at least per task: a decode step's few rows
  // run on one thread rather than pay for waking the others.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(p.K * p.n, 1));
  at::parallel_for(0, q.size(0) * p.H, grain, [&](int64_t begin, int64_t end) {
#if MMREC_X86_DISPATCH
    if (has_avx2_fma()) {
      return read_rows_avx2(p, begin, end);
    }
#endif
    read_rows_baseline(p, begin, end);
  });
}

// From this many (row, slot) pairs on, three BLAS calls (the scores, the
// softmax, the weighted sum) cost less than one pass per row: their fixed cost
// is paid back (measured on 2 cores at the tiny preset's cache of 368 slots of
// 32 channels: one pass per row wins at 4 rows, BLAS at 64).
constexpr int64_t kBlasPairs = 8192;

// The read as BLAS calls, in float32 for bfloat16/float16 (their BLAS would
// round the scores to the storage dtype).
Tensor decode_read_blas(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& mask) {
  const auto dtype = q.scalar_type();
  const bool upcast = dtype == at::kBFloat16 || dtype == at::kHalf;
  auto acc = [&](const Tensor& t) { return upcast ? t.to(at::kFloat) : t; };
  Tensor scores = at::matmul(acc(q).unsqueeze(2), acc(keys).transpose(2, 3)).squeeze(2);  // [B, H, K]
  scores.mul_(1.0 / std::sqrt(static_cast<double>(q.size(2)))).add_(acc(mask));
  Tensor out = at::matmul(at::softmax(scores, -1).unsqueeze(2), acc(values)).squeeze(2);  // [B, H, d]
  return out.to(dtype).contiguous();
}

Tensor decode_read_cpu(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& mask) {
  check_decode_read_args(q, keys, values, mask);
  if (q.numel() > 0 && q.size(0) * q.size(1) * keys.size(2) >= kBlasPairs) {
    return decode_read_blas(q, keys, values, mask);
  }
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
