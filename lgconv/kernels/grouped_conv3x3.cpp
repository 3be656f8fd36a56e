// CPU kernel of lgconv::grouped_conv3x3: a grouped 3x3 conv (stride 1, padding 1) over pixel planes.
//
// oneDNN's grouped convs are slow on planes (NCHW) with few channels per group, as in CondenseNet's
// dense layers (8 to 32 inputs and 2 to 8 outputs per group). Here each (image, group) copies its
// input planes once into a zero-bordered buffer (through a ReLU, where lgconv::dense_block asks for
// one); outputs are then computed over the flattened
// buffer, PV vectors of W positions at a time for OB outputs, each of the 9 taps a shifted
// unaligned load, so the inner loop has no border tests. Positions that fall on the border columns
// are computed and dropped. Only float32 on planes runs here; anything else takes at::conv2d.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernel_common.h"

namespace {

using lgconv_kernels::channels_last;
using lgconv_kernels::kAccumulators;
using lgconv_kernels::kWide;
using lgconv_kernels::Vec;

// acc[o][j] = bias[o] + sum over inputs and taps of w[o][tap] * pad[input][q + shift(tap) + j * W],
// stored to out + o * ldo + j * W. w: OB rows of (inputs * 9) weights.
template <int OB, int PV>
void tile(const float* pad, int64_t plane, int64_t row, int64_t inputs, const float* const* w,
          const float* bias, float* out, int64_t ldo) {
  constexpr int W = kWide;
  using vec = typename Vec<W>::type;
  vec acc[OB][PV];
  for (int o = 0; o < OB; ++o)
    for (int j = 0; j < PV; ++j) acc[o][j] = vec{} + bias[o];
  for (int64_t c = 0; c < inputs; ++c) {
    for (int ky = 0; ky < 3; ++ky) {
      const float* src = pad + c * plane + ky * row;
      for (int kx = 0; kx < 3; ++kx) {
        vec xv[PV];
        for (int j = 0; j < PV; ++j) xv[j] = *reinterpret_cast<const vec*>(src + kx + j * W);
        const int64_t tap = c * 9 + ky * 3 + kx;
        for (int o = 0; o < OB; ++o) {
          const float wk = w[o][tap];
          for (int j = 0; j < PV; ++j) acc[o][j] += wk * xv[j];
        }
      }
    }
  }
  for (int o = 0; o < OB; ++o)
    for (int j = 0; j < PV; ++j) *reinterpret_cast<vec*>(out + o * ldo + j * W) = acc[o][j];
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float* const*, const float*, float*,
                        int64_t);

template <int OB>
constexpr int vectors_for() {
  return std::max(1, std::min(12, kAccumulators / OB));
}

struct Shape {
  int outputs;  // OB
  int vectors;  // PV
  TileFn fn;
};

// The widest output block that does not waste most of its rows on a group's few outputs.
Shape shape_for(int64_t group_outputs) {
  if (group_outputs >= 8) return {8, vectors_for<8>(), tile<8, vectors_for<8>()>};
  if (group_outputs >= 4) return {4, vectors_for<4>(), tile<4, vectors_for<4>()>};
  if (group_outputs >= 2) return {2, vectors_for<2>(), tile<2, vectors_for<2>()>};
  return {1, vectors_for<1>(), tile<1, vectors_for<1>()>};
}

}  // namespace

namespace lgconv_kernels {

void grouped_conv3x3_into(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t groups, bool relu_input, at::Tensor& output) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "grouped_conv3x3: input must be (N, C, H, W) and weight (outputs, inputs / groups, 3, 3)");
  TORCH_CHECK(groups > 0 && input.size(1) == weight.size(1) * groups && weight.size(0) % groups == 0,
              "grouped_conv3x3: groups must divide the outputs, and inputs must be groups x weight.size(1)");
  TORCH_CHECK(!bias.has_value() || bias->numel() == weight.size(0),
              "grouped_conv3x3: bias must have one value per output");
  const bool native = input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                      (!bias.has_value() || bias->scalar_type() == at::kFloat) && !channels_last(input) &&
                      input.stride(3) == 1 && output.scalar_type() == at::kFloat && output.stride(3) == 1;
  if (!native) {
    output.copy_(at::conv2d(relu_input ? at::relu(input) : input, weight, bias, at::IntArrayRef{1, 1},
                            at::IntArrayRef{1, 1}, at::IntArrayRef{1, 1}, groups));
    return;
  }

  const int64_t N = input.size(0), H = input.size(2), Wd = input.size(3);
  const int64_t outputs = weight.size(0), inputs = weight.size(1);
  const int64_t group_outputs = outputs / groups;
  const Shape shape = shape_for(group_outputs);
  const int64_t row = Wd + 2, plane = (H + 2) * row;
  const int64_t span = shape.vectors * kWide;                   // positions per tile
  const int64_t valid = (H - 1) * row + Wd;                     // last output position + 1
  const int64_t tiles = (valid + span - 1) / span;
  const int64_t slack = tiles * span + 2 * row + 2 - plane;      // the last tile reads past the plane
  const int64_t buffer = inputs * plane + std::max<int64_t>(slack, 0) + kWide;
  const int64_t blocks = (group_outputs + shape.outputs - 1) / shape.outputs;

  at::Tensor wc = weight.contiguous();
  at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* x = input.data_ptr<float>();
  const float* pw = wc.data_ptr<float>();
  const float* pb = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* y = output.data_ptr<float>();
  const int64_t s0 = input.stride(0), s1 = input.stride(1), s2 = input.stride(2);
  const int64_t d0 = output.stride(0), d1 = output.stride(1), d2 = output.stride(2);
  const std::vector<float> zeros(inputs * 9, 0.0f);

  at::parallel_for(0, N * groups, 1, [&](int64_t first, int64_t last) {
    std::vector<float> pad(buffer, 0.0f);  // borders stay zero: only the interiors are written
    std::vector<float> acc(shape.outputs * span);
    for (int64_t item = first; item < last; ++item) {
      const int64_t n = item / groups, g = item % groups;
      for (int64_t c = 0; c < inputs; ++c)
        for (int64_t r = 0; r < H; ++r) {
          const float* src = x + n * s0 + (g * inputs + c) * s1 + r * s2;
          float* dst = pad.data() + c * plane + (r + 1) * row + 1;
          if (relu_input)
            for (int64_t i = 0; i < Wd; ++i) dst[i] = src[i] > 0.0f ? src[i] : 0.0f;
          else
            std::copy(src, src + Wd, dst);
        }
      for (int64_t b = 0; b < blocks; ++b) {
        const float* w[8];
        float bias_block[8];
        const int64_t o0 = g * group_outputs + b * shape.outputs;
        const int64_t rows = std::min<int64_t>(shape.outputs, group_outputs - b * shape.outputs);
        for (int o = 0; o < shape.outputs; ++o) {
          w[o] = o < rows ? pw + (o0 + o) * inputs * 9 : zeros.data();
          bias_block[o] = o < rows && pb ? pb[o0 + o] : 0.0f;
        }
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t q0 = t * span;
          shape.fn(pad.data() + q0, plane, row, inputs, w, bias_block, acc.data(), span);
          // Keep the positions inside the image: q = r * row + col with col < Wd.
          for (int64_t q = q0; q < std::min(q0 + span, valid);) {
            const int64_t r = q / row, col = q % row;
            if (col >= Wd) {
              q += row - col;
              continue;
            }
            const int64_t run = std::min({Wd - col, q0 + span - q, valid - q});
            for (int64_t o = 0; o < rows; ++o)
              std::copy(acc.data() + o * span + (q - q0), acc.data() + o * span + (q - q0) + run,
                        y + n * d0 + (o0 + o) * d1 + r * d2 + col);
            q += run;
          }
        }
      }
    }
  });
}

}  // namespace lgconv_kernels

namespace {

at::Tensor grouped_conv3x3_cpu(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t groups) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "grouped_conv3x3: input must be (N, C, H, W) and weight ",
              "(outputs, inputs / groups, 3, 3)");
  at::Tensor output = lgconv_kernels::output_like(input, weight.size(0));
  lgconv_kernels::grouped_conv3x3_into(input, weight, bias, groups, /*relu_input=*/false, output);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(lgconv, CPU, m) { m.impl("grouped_conv3x3", &grouped_conv3x3_cpu); }
