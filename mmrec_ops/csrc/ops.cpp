// The mmrec operator schemas (the one place they are defined) and the Python
// module `mmrec_ops._C` that carries the library into the process.
//
// Kernels live beside their op: csrc/<op>.cpp registers the CPU and autograd
// kernels, mmrec_ops/ops/<op>.py the fake, CUDA (Triton) and vmap kernels and
// the autograd kernel of the backward op.

#include <Python.h>
#include <torch/library.h>

#define MMREC_STRINGIFY_(x) #x
#define MMREC_STRINGIFY(x) MMREC_STRINGIFY_(x)

// The torch version this library is built with, as a tagged string in the
// file: _library.py reads it from the file when the library cannot load
// (undefined symbols of another torch), to name both versions.
#define MMREC_TORCH_TAG "mmrec-built-with-torch:"
extern "C" __attribute__((used)) const char mmrec_built_with_torch[] =
    MMREC_TORCH_TAG MMREC_STRINGIFY(MMREC_TORCH_VERSION);

TORCH_LIBRARY(mmrec, m) {
  // h_t = gamma_t * h_{t-1} + x_t over dim 1 (t = T-1 .. 0 when reverse).
  // x omitted: x = 0; h0 omitted: 1 without x (cumulative product), else 0.
  m.def("scan(Tensor gamma, Tensor? x=None, Tensor? h0=None, bool reverse=False) -> Tensor");
  // Gradients of scan from the saved output h. has_x says whether x was
  // given, which fixes the implicit h0 (0 with x, 1 without).
  m.def(
      "scan_backward(Tensor grad_h, Tensor gamma, Tensor h, Tensor? h0, bool has_x, bool reverse) "
      "-> (Tensor grad_gamma, Tensor grad_x, Tensor grad_h0)");
  // Per head: h_t = z_t * sigmoid(W h_{t-1} + b) + gamma_t * h_{t-1}, h_{-1} = h0 (default 0).
  // z, gamma: [B, T, H, d]; weight: [H, d, d] (row = output unit); bias: [H, d]; h0: [B, H, d].
  m.def("recurrence(Tensor z, Tensor gamma, Tensor weight, Tensor? bias=None, Tensor? h0=None) -> Tensor");
  // Gradients of recurrence (BPTT, one reverse pass) from the saved output h.
  // grad_bias and grad_h0 are returned whether or not bias and h0 were given.
  m.def(
      "recurrence_backward(Tensor grad_h, Tensor z, Tensor gamma, Tensor weight, Tensor? bias, Tensor? h0, "
      "Tensor h) -> (Tensor grad_z, Tensor grad_gamma, Tensor grad_weight, Tensor grad_bias, Tensor grad_h0)");
  // One query per row against a cache (a decode step's read):
  // out[b, h] = softmax_s(q[b, h] . keys[b, h, s] / sqrt(d) + mask[s]) . values[b, h, s].
  // q: [B, H, d]; keys, values: [B, H, K, d]; mask: [K], added to the scores (0, or -inf for an empty slot).
  m.def("decode_read(Tensor q, Tensor keys, Tensor values, Tensor mask) -> Tensor");
  // Each token's read of its memories (a training step's read), one softmax per query t = n Q + i:
  // over group[b, n, c] where group_mask[n, i, c], and tokens[b, j] where t <= j <= t + W - 1 and
  // j >= first_token. q: [B, T, H, d]; group: [B, nb, G, 2, H d] (keys, values); group_mask: [nb, Q, G]
  // bool, nb Q >= T; tokens: [B, W - 1 + T, 2, H d]; first_token: int64 [], the first token that
  // exists (those before it precede the sequence's start).
  // out: [B, T, H, d]; lse: [B, H, T], the log of each softmax's denominator (float32; float64 for float64).
  m.def(
      "memory_read(Tensor q, Tensor group, Tensor group_mask, Tensor tokens, Tensor first_token, int window) "
      "-> (Tensor out, Tensor lse)");
  // Gradients of memory_read from its saved outputs; grad_lse: [B, H, T] in lse's dtype.
  m.def(
      "memory_read_backward(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor group, Tensor group_mask, "
      "Tensor tokens, Tensor first_token, Tensor out, Tensor lse, int window) "
      "-> (Tensor grad_q, Tensor grad_group, Tensor grad_tokens)");
  // Each query's read of the long-term segments it chose, one softmax per query over the tokens of its
  // segments: query t reads segments[b, segment_ids[b, t, j]] for each j whose id is not -1.
  // q: [B, T, H, d]; segments: [B, M, S, 2, H d] (keys, values of M segments of S tokens);
  // segment_ids: [B, T, k] int64 in [-1, M) (-1: no segment in that place).
  // out: [B, T, H, d] (0 for a query with no segment); lse: [B, H, T] (-inf there), float32
  // (float64 for float64).
  m.def("segment_read(Tensor q, Tensor segments, Tensor segment_ids) -> (Tensor out, Tensor lse)");
  // Gradients of segment_read from its saved outputs; grad_lse: [B, H, T] in lse's dtype.
  m.def(
      "segment_read_backward(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor segments, Tensor segment_ids, "
      "Tensor out, Tensor lse) -> (Tensor grad_q, Tensor grad_segments)");
  // A matrix product of a few rows (a decode step's projections): out = bias + x @ weight.
  // bias: [N]; x: [M, K]; weight: [K, N].
  m.def("skinny_addmm(Tensor bias, Tensor x, Tensor weight) -> Tensor");
}

extern "C" {
// `import mmrec_ops._C` loads this shared object, and with it the
// TORCH_LIBRARY registrations above: libtorch is already in the process
// because mmrec_ops imports torch first, so no LD_LIBRARY_PATH is needed.
PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "MM-Rec compiled operator library (registers torch.ops.mmrec.*).",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "built_with_torch", mmrec_built_with_torch + sizeof(MMREC_TORCH_TAG) - 1) < 0 ||
      PyModule_AddStringConstant(module, "built_version", MMREC_STRINGIFY(MMREC_VERSION)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
