// What lgconv's CPU kernels share: the vector width and register budget of the machine they are
// built for (-march=native), the vector type, the memory-format rule every op's output follows
// (the Python references and fakes in lgconv/kernels/pointwise.py use the same rule), and the
// kernels that lgconv::dense_block composes.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

// An uninitialised (N, channels, H, W) output laid out by that rule (Python: pointwise.empty_output).
inline at::Tensor output_like(const at::Tensor& input, int64_t channels) {
  return at::empty({input.size(0), channels, input.size(2), input.size(3)},
                   input.options().memory_format(channels_last(input) ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous));
}

// lgconv::condensed_pointwise on CPU (condensed_pointwise.cpp).
at::Tensor condensed_pointwise_cpu(const at::Tensor& input, const at::Tensor& index, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& low,
                                   const std::optional<at::Tensor>& high, const std::optional<at::Tensor>& order,
                                   int64_t groups);

// lgconv::grouped_conv3x3 of relu(input) when relu_input, else of input, written into output: an
// (N, outputs, H, W) tensor of any strides, such as a channel slice of a dense block's buffer
// (grouped_conv3x3.cpp).
void grouped_conv3x3_into(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t groups, bool relu_input, at::Tensor& output);

}  // namespace lgconv_kernels
