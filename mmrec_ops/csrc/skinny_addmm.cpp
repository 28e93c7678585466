// CPU kernel of mmrec::skinny_addmm: out = bias + x @ weight, x [M, K], weight [K, N],
// bias [N].
//
// On a CPU the kernel is ATen's addmm (BLAS, whose GEMM reads each block of the weight
// once for all rows), with the op's argument checks and a contiguous output. The split
// over K that the op exists for answers a GPU's need for many programs streaming at once:
// it is the CUDA kernel's (mmrec_ops/triton/skinny_addmm.py). The gradients are
// composite (mmrec_ops/ops/skinny_addmm.py).

#include "common.h"

#include <torch/library.h>

namespace mmrec {

namespace {

constexpr const char* kSkinnyAddmm = "mmrec::skinny_addmm";

void check_skinny_addmm_args(const Tensor& bias, const Tensor& x, const Tensor& weight) {
  check_floating(x, kSkinnyAddmm, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, kSkinnyAddmm, ": expected x of shape [M, K] (2 dims), got ", shape_string(x.sizes()));
  TORCH_CHECK_VALUE(
      weight.dim() == 2, kSkinnyAddmm, ": expected weight of shape [K, N] (2 dims), got ",
      shape_string(weight.sizes()));
  check_like(weight, x, kSkinnyAddmm, "weight", "x");
  check_shape(weight, {x.size(1), weight.size(1)}, kSkinnyAddmm, "weight");
  check_like(bias, x, kSkinnyAddmm, "bias", "x");
  check_shape(bias, {weight.size(1)}, kSkinnyAddmm, "bias");
}

Tensor skinny_addmm_cpu(const Tensor& bias, const Tensor& x, const Tensor& weight) {
  check_skinny_addmm_args(bias, x, weight);
  return at::addmm(bias, x, weight).contiguous();
}

}  // namespace

}  // namespace mmrec

TORCH_LIBRARY_IMPL(mmrec, CPU, m) {
  m.impl("skinny_addmm", &mmrec::skinny_addmm_cpu);
}
