// CPU kernel of lgconv::avg_pool2x2: 2x2 average pooling with stride 2 (no padding, floor mode)
// on pixel planes. ATen's avg_pool2d on NCHW tensors runs about 8x slower than on channels-last
// ones; CondenseNet's transitions pool the whole block output, so in NCHW this pass was a tenth of
// the network's time. One pass, planes in parallel; anything but float32 planes takes at::avg_pool2d.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "kernel_common.h"

namespace {

using lgconv_kernels::channels_last;

at::Tensor avg_pool2x2_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 4, "avg_pool2x2: input must be (N, C, H, W), got ", input.sizes());
  if (input.scalar_type() != at::kFloat || channels_last(input) || input.stride(3) != 1) {
    at::Tensor out = at::avg_pool2d(input, {2, 2}, {2, 2});
    return out.contiguous(channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t Ho = H / 2, Wo = W / 2;
  at::Tensor output = at::empty({N, C, Ho, Wo}, input.options());
  const float* x = input.data_ptr<float>();
  float* y = output.data_ptr<float>();
  const int64_t s0 = input.stride(0), s1 = input.stride(1), s2 = input.stride(2);
  at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W)), [&](int64_t first, int64_t last) {
    for (int64_t plane = first; plane < last; ++plane) {
      const float* src = x + (plane / C) * s0 + (plane % C) * s1;
      float* dst = y + plane * Ho * Wo;
      for (int64_t i = 0; i < Ho; ++i) {
        const float* top = src + 2 * i * s2;
        const float* bottom = top + s2;
        float* out = dst + i * Wo;
        for (int64_t j = 0; j < Wo; ++j)
          out[j] = ((top[2 * j] + top[2 * j + 1]) + (bottom[2 * j] + bottom[2 * j + 1])) * 0.25f;
      }
    }
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgconv, CPU, m) { m.impl("avg_pool2x2", &avg_pool2x2_cpu); }
