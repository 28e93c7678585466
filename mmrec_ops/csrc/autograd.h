// What the Autograd kernels of mmrec::scan and mmrec::recurrence share.
//
// Why C++ and why not torch::autograd::Function: the Python autograd layer
// (torch.library.register_autograd, or an autograd.Function) costs tens of
// microseconds of host time per call and per backward, more than a scan
// kernel takes on a GPU. torch::autograd::Function::apply refuses to run
// under torch.func ("cannot use C++ torch::autograd::Function with functorch
// transforms", pytorch/pytorch#103957), and it has no forward mode. So the
// kernels are written the way ATen's own autograd kernels (VariableType) are:
// a Node subclass whose backward calls the backward op through the
// dispatcher, the op itself called below autograd, forward mode by hand.
// torch.func handles such kernels as it handles every ATen op (each transform
// level sees the ops they call, with their batching rules), and AOTAutograd
// traces the ops they call.

#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <memory>
#include <optional>
#include <type_traits>

namespace mmrec {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// A new node of type N, held as the autograd graph holds nodes:
// c10::intrusive_ptr from torch 2.13 on, std::shared_ptr before
// (pytorch/pytorch#181782). P is a parameter so that only the branch of the
// torch at hand is compiled.
template <class N, class P = decltype(torch::autograd::Edge::function)>
auto make_node() {
  if constexpr (std::is_same_v<P, std::shared_ptr<Node>>) {
    return std::shared_ptr<N>(new N());
  } else {
    return c10::make_intrusive<N>();
  }
}

// The handle of an mmrec op, looked up once: calls through it skip the
// name lookup of torch.ops.
template <typename Signature>
c10::TypedOperatorHandle<Signature> mmrec_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The forward-mode tangent of t at the (only) level ATen's kernels use; an
// undefined tensor when t is absent or has none.
inline at::Tensor tangent(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->_fw_grad(/*level=*/0) : at::Tensor();
}

// t without its tangent (a view), for formulas that must not carry one.
inline at::Tensor primal(const at::Tensor& t) {
  return t._fw_primal(/*level=*/0);
}

inline std::optional<at::Tensor> primal(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(primal(*t)) : std::nullopt;
}

// A saved optional input; unpacks to nullopt when it was omitted.
inline std::optional<at::Tensor> unpack_optional(const SavedVariable& saved, bool given) {
  return given ? std::optional<at::Tensor>(saved.unpack()) : std::nullopt;
}

// g when the node must pass it on to its input i (given, and that input
// requires grad), else an undefined tensor: the engine ignores it.
inline at::Tensor grad_for(Node& node, size_t i, const at::Tensor& g, bool given = true) {
  return given && node.should_compute_output(i) ? g : at::Tensor();
}

}  // namespace mmrec
