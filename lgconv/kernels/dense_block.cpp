// CPU kernel of lgconv::dense_block: a whole CondenseNet dense block of served layers in one op.
//
// Each layer is a condensed 1x1 conv (gather, folded batch norm + ReLU bounds, kept connections,
// channel order: lgconv::condensed_pointwise; no index means every input) on the block's channels
// so far, a ReLU, and a
// grouped 3x3 conv (lgconv::grouped_conv3x3, or ATen's conv where timing preferred it) whose
// outputs go straight into the next channels of the block's one output buffer. At batch 1 the
// Python and dispatch around some 200 small ops per CondenseNet-86 cost as much as their arithmetic;
// here they are one call, and the ReLU and the copy into the buffer are not passes of their own.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "kernel_common.h"

namespace {

at::Tensor dense_block_cpu(const at::Tensor& input, const c10::List<std::optional<at::Tensor>>& index,
                           at::TensorList weight1,
                           const c10::List<std::optional<at::Tensor>>& bias1,
                           const c10::List<std::optional<at::Tensor>>& low,
                           const c10::List<std::optional<at::Tensor>>& high,
                           const c10::List<std::optional<at::Tensor>>& order, at::IntArrayRef groups1,
                           at::TensorList weight2, const c10::List<std::optional<at::Tensor>>& bias2,
                           at::IntArrayRef groups2, const c10::List<bool>& native2) {
  const size_t layers = weight1.size();
  TORCH_CHECK(input.dim() == 4, "dense_block: input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(index.size() == layers && bias1.size() == layers && low.size() == layers && high.size() == layers &&
                  order.size() == layers && groups1.size() == layers && weight2.size() == layers &&
                  bias2.size() == layers && groups2.size() == layers && native2.size() == layers,
              "dense_block: every operand list must have one entry per layer");
  int64_t width = input.size(1);
  for (const at::Tensor& w : weight2) width += w.size(0);
  at::Tensor output = lgconv_kernels::output_like(input, width);
  int64_t filled = input.size(1);
  output.narrow(1, 0, filled).copy_(input);
  for (size_t i = 0; i < layers; ++i) {
    const at::Tensor so_far = output.narrow(1, 0, filled);
    const std::optional<at::Tensor> listed = index.get(i);  // none: every input, in order
    const at::Tensor kept = listed.has_value() ? *listed : at::arange(filled, input.options().dtype(at::kLong));
    const at::Tensor bottleneck = lgconv_kernels::condensed_pointwise_cpu(
        so_far, kept, weight1[i], bias1.get(i), low.get(i), high.get(i), order.get(i), groups1[i]);
    const int64_t growth = weight2[i].size(0);
    at::Tensor features = output.narrow(1, filled, growth);
    if (native2.get(i)) {
      lgconv_kernels::grouped_conv3x3_into(bottleneck, weight2[i], bias2.get(i), groups2[i], /*relu_input=*/true,
                                           features);
    } else {
      features.copy_(at::conv2d(at::relu(bottleneck), weight2[i], bias2.get(i), at::IntArrayRef{1, 1},
                                at::IntArrayRef{1, 1}, at::IntArrayRef{1, 1}, groups2[i]));
    }
    filled += growth;
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgconv, CPU, m) { m.impl("dense_block", &dense_block_cpu); }
