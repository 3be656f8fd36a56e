// What lgconv's CPU kernels share: the vector width and register budget of the machine they are
// built for (-march=native), the vector type, and the memory-format rule every op's output follows
// (the Python references and fakes in lgconv/kernels/pointwise.py use the same rule).
#pragma once

#include <ATen/ATen.h>

namespace lgconv_kernels {

#if defined(__AVX512F__)
constexpr int kAccumulators = 24;  // 32 vector registers: 24 accumulators, the rest for operands
constexpr int kWide = 16;          // floats per widest vector
#else
constexpr int kAccumulators = 12;  // 16 vector registers (AVX2, NEON)
constexpr int kWide = 8;
#endif

template <int W>
struct Vec {
  typedef float type __attribute__((vector_size(W * sizeof(float)), aligned(4)));
};

// Channels are the innermost dimension: the output is channels-last too.
inline bool channels_last(const at::Tensor& input) { return input.size(1) > 1 && input.stride(1) == 1; }

}  // namespace lgconv_kernels
