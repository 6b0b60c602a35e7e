// Input checks and dtype dispatch shared by every kernel family. A failed check names what was passed and
// what is supported, so wrong input never yields a silent wrong result.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace minivllm {
// Numbers and shapes as text, for check messages built up as strings.
inline std::string str(int64_t value) { return std::to_string(value); }

// Whether t's data starts at a multiple of `bytes` (the kernels' vector loads need 16).
inline bool aligned(const at::Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

inline std::string str(c10::IntArrayRef dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}
}  // namespace minivllm

#define MINIVLLM_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got ", (t).device())
#define MINIVLLM_CHECK_LAST_DIM_CONTIGUOUS(t) \
  TORCH_CHECK((t).stride(-1) == 1, #t " must be contiguous in its last dimension, got strides ", (t).strides())
#define MINIVLLM_CHECK_DTYPE(t, dtype) \
  TORCH_CHECK((t).scalar_type() == (dtype), #t " must be ", (dtype), ", got ", (t).scalar_type())

// Runs the body with `scalar_t` bound to at::Half or at::BFloat16; anything else is refused.
#define MINIVLLM_DISPATCH_HALF_TYPES(dtype, name, ...)                                              \
  [&] {                                                                                             \
    if ((dtype) == at::ScalarType::Half) {                                                          \
      using scalar_t = at::Half;                                                                    \
      return __VA_ARGS__();                                                                         \
    } else if ((dtype) == at::ScalarType::BFloat16) {                                               \
      using scalar_t = at::BFloat16;                                                                \
      return __VA_ARGS__();                                                                         \
    }                                                                                               \
    TORCH_CHECK(false, name ": dtype ", (dtype), " is not supported; use torch.float16 or torch.bfloat16"); \
  }()
