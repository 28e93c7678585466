// Shared argument checks and the strided [B, T, G, C] view used by the CPU
// kernels of mmrec.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <vector>

namespace mmrec {

using at::IntArrayRef;
using at::Tensor;

// The dtype as Python spells it, so that errors read the same from the C++
// kernels and from the Python (fake, CUDA) ones.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// A shape as "[2, 3, 5]", as at::IntArrayRef prints. Built with std::to_string rather
// than iostreams: in extensions built on the lent GPU machines (their g++ against torch
// 2.11), streaming an integer into an error message, c10::str(t.sizes()), killed the
// process with SIGSEGV where a message of text alone raised.
inline std::string shape_string(IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

// Accepts exactly the storage dtypes the design supports; anything else is a
// clear error that names the op and the argument.
inline void check_floating(const Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_VALUE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
      op, ": expected ", name, " to be float32, float64, bfloat16 or float16, got ", dtype_name(dtype));
}

inline void check_like(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(
      t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have the dtype of ", ref_name, " (",
      dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(
      t.device() == ref.device(), op, ": expected ", name, " to be on the device of ", ref_name, " (", ref.device(),
      "), got ", t.device());
}

inline void check_shape(const Tensor& t, IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK_VALUE(
      t.sizes() == expected, op, ": expected ", name, " of shape ", shape_string(expected), ", got ",
      shape_string(t.sizes()));
}

// Shape of one time step of a [B, T, ...] tensor: [B, ...].
inline std::vector<int64_t> step_shape(IntArrayRef seq_shape) {
  std::vector<int64_t> shape(seq_shape.begin(), seq_shape.end());
  shape.erase(shape.begin() + 1);
  return shape;
}

// Strides of one tensor in the [B, T, G, C] view (st unused for per-step tensors).
struct Strides4 {
  int64_t b = 0, t = 0, g = 0, c = 0;
};

// The trailing (channel) dims of several same-shaped tensors folded into at
// most two dims [G, C], each with one stride per tensor. Folding two adjacent
// dims is possible when it is possible in every tensor at once, so that a
// [B, H, T, d] tensor passed as .transpose(1, 2) keeps G = H, C = d without a
// copy, while contiguous tensors fold to G = 1, C = prod(channels).
struct ChannelLayout {
  int64_t G = 1, C = 1;
  std::vector<std::array<int64_t, 2>> strides;  // per tensor: {stride of G, stride of C}
  bool ok = false;                              // false: more than two dims remain
};

// channel_strides[k] holds tensor k's strides over the channel dims `sizes`.
inline ChannelLayout fold_channels(IntArrayRef sizes, const std::vector<IntArrayRef>& channel_strides) {
  const size_t n_tensors = channel_strides.size();
  struct Group {
    int64_t size;
    std::vector<int64_t> strides;
  };
  std::vector<Group> groups;  // innermost first
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    if (sizes[d] == 1) {
      continue;  // a unit dim has no meaningful stride
    }
    std::vector<int64_t> strides(n_tensors);
    for (size_t k = 0; k < n_tensors; ++k) {
      strides[k] = channel_strides[k][d];
    }
    if (!groups.empty()) {
      Group& inner = groups.back();
      bool foldable = true;
      for (size_t k = 0; k < n_tensors; ++k) {
        foldable = foldable && strides[k] == inner.strides[k] * inner.size;
      }
      if (foldable) {
        inner.size *= sizes[d];
        continue;
      }
    }
    groups.push_back({sizes[d], strides});
  }
  ChannelLayout layout;
  layout.ok = groups.size() <= 2;
  if (!layout.ok) {
    return layout;
  }
  layout.strides.assign(n_tensors, {0, 0});
  if (!groups.empty()) {
    layout.C = groups[0].size;
    for (size_t k = 0; k < n_tensors; ++k) {
      layout.strides[k][1] = groups[0].strides[k];
    }
  }
  if (groups.size() == 2) {
    layout.G = groups[1].size;
    for (size_t k = 0; k < n_tensors; ++k) {
      layout.strides[k][0] = groups[1].strides[k];
    }
  }
  return layout;
}

// Channel strides of a [B, T, ...] tensor (dims 2..) or a [B, ...] step tensor (dims 1..).
inline IntArrayRef seq_channel_strides(const Tensor& t) {
  return t.strides().slice(2);
}
inline IntArrayRef step_channel_strides(const Tensor& t) {
  return t.strides().slice(1);
}

// Channels per task for `rows` independent batch rows of L channels each.
// Whole rows are best: a task then reads each time step's channels as one
// contiguous run, and the hardware prefetcher streams them (measured on 2 cores:
// splitting a 2 KB row in halves made the contiguous scan markedly slower). Rows
// are split only to give every thread an equal share of tasks, or to bound the
// per-task state buffer. C = 0 (an empty channel dim) makes one piece of no
// channels, so the caller has no task to run.
inline int64_t channel_chunk(int64_t rows, int64_t C) {
  constexpr int64_t kMaxChunk = 4096, kMinChunk = 64;
  const int64_t threads = at::get_num_threads();
  int64_t pieces = std::max<int64_t>((C + kMaxChunk - 1) / kMaxChunk, 1);
  auto balanced = [&](int64_t k) { return (rows * k) % threads == 0 || rows * k >= 8 * threads; };
  while (!balanced(pieces) && C / (pieces + 1) >= kMinChunk) {
    ++pieces;
  }
  const int64_t chunk = (C + pieces - 1) / pieces;
  return std::max<int64_t>(pieces == 1 ? chunk : (chunk + 15) / 16 * 16, 1);
}

}  // namespace mmrec
