// Operator schemas of the `disalign` namespace. Kernels are registered per dispatch key elsewhere
// (csrc/cpu, csrc/cuda); fake kernels and autograd are registered in Python
// (disalign_ops/_registration.py), following pytorch/extension-cpp.
//
// grad_mask is [logits, alpha, beta, confidence] (bool[], not bool[4], so that a wrong length
// reaches the binding's check, which names it); a gradient that is not asked for comes back as an
// empty (0-element) tensor.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import disalign_ops._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(disalign, m) {
  // Loss of docs/contract.md section 2. reduction is "none", "mean" or "sum". For "mean"/"sum" the gradients
  // of the scalar loss (for grad_output = 1) are computed in the same pass over the logits for the
  // inputs set in grad_mask; for "none" grad_mask must be all false (see cross_entropy_backward).
  // Returns (loss, grad_logits, grad_alpha, grad_beta, grad_confidence).
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor alpha, Tensor beta, Tensor? confidence, "
      "Tensor? weight, int ignore_index, str reduction, bool[] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of reduction="none" for a per-row grad_loss (shape of target).
  // Returns (grad_logits, grad_alpha, grad_beta, grad_confidence).
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor alpha, "
      "Tensor beta, Tensor? confidence, Tensor? weight, int ignore_index, bool[] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // zhat = (1 + s*alpha) * z + s*beta (paper eq. 6), in the logits' dtype and strides.
  m.def("calibrate(Tensor logits, Tensor alpha, Tensor beta, Tensor? confidence) -> Tensor");
  m.def(
      "calibrate_backward(Tensor grad, Tensor logits, Tensor alpha, Tensor beta, Tensor? confidence, "
      "bool[] grad_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
