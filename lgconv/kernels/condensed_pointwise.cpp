// CPU kernel of lgconv::condensed_pointwise: a condensed 1x1 conv (stride 1, no padding) in one pass.
//
// Per tile of pixels and per group, the kept inputs of the group are read once (clamped to their
// folded batch norm + ReLU bounds on the way) into a small packed block, then multiplied by the
// group's weights with a register-blocked micro-kernel: a few pixels times up to 32 outputs of
// accumulators, so every weight vector loaded from L1 is used by several pixels. Outputs go straight
// to their channel in the masked layer's order. Only float32 runs here; other dtypes take the same
// ATen ops as the Python reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "kernel_common.h"

namespace {

using lgconv_kernels::channels_last;
using lgconv_kernels::output_like;
using lgconv_kernels::kAccumulators;
using lgconv_kernels::kWide;
using lgconv_kernels::Vec;

constexpr int64_t kTile = 48;        // pixels per tile: a multiple of every micro-block's pixel count
constexpr int64_t kChunkBytes = 16384;  // weights of one block and one chunk of inputs stay in L1

// acc[p][:] (+)= bias + a[p][k] * w[k][:] over k in [0, K) for P pixels and V vectors of W outputs.
// a: P rows of packed inputs (row stride lda); w: K rows of weights (row stride ldw); out rows ldo.
template <int W, int V, int P>
inline void micro_kernel(const float* a, int64_t lda, const float* w, int64_t ldw, int64_t K,
                         const float* bias, bool accumulate, float* out, int64_t ldo) {
  using vec = typename Vec<W>::type;
  vec acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v)
      acc[p][v] = *reinterpret_cast<const vec*>((accumulate ? out + p * ldo : bias) + v * W);
  for (int64_t k = 0; k < K; ++k) {
    vec wk[V];
    for (int v = 0; v < V; ++v) wk[v] = *reinterpret_cast<const vec*>(w + k * ldw + v * W);
    for (int p = 0; p < P; ++p) {
      const float x = a[p * lda + k];
      for (int v = 0; v < V; ++v) acc[p][v] += x * wk[v];
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) *reinterpret_cast<vec*>(out + p * ldo + v * W) = acc[p][v];
}

// A block of W * V outputs for the first `rows` packed pixels (rounded up to whole micro-blocks;
// the packed block holds zeros there), over the inputs in chunks that fit L1.
template <int W, int V>
void block_kernel(const float* a, int64_t lda, const float* w, int64_t ldw, int64_t K, const float* bias,
                  float* out, int64_t ldo, int64_t rows) {
  constexpr int P = kAccumulators / V;
  static_assert(kTile % P == 0, "tiles hold whole micro-blocks");
  const int64_t chunk = std::max<int64_t>(16, kChunkBytes / (W * V * sizeof(float)));
  for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    for (int64_t p = 0; p < rows; p += P)
      micro_kernel<W, V, P>(a + p * lda + k0, lda, w + k0 * ldw, ldw, k1 - k0, bias, k0 > 0,
                            out + p * ldo, ldo);
  }
}

// For few outputs per group the packing pass would cost more than the products: read each input
// straight from its pixel (channels innermost), clamped after the broadcast, with no packed copy.
// rows: P pixel pointers; off: K channel offsets; lo/hi: K bounds or null.
template <int W, int V, int P>
inline void direct_kernel(const float* const* rows, const int64_t* off, const float* lo, const float* hi,
                          const float* w, int64_t ldw, int64_t K, const float* bias, float* out, int64_t ldo) {
  using vec = typename Vec<W>::type;
  vec acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = *reinterpret_cast<const vec*>(bias + v * W);
  for (int64_t k = 0; k < K; ++k) {
    vec wk[V];
    for (int v = 0; v < V; ++v) wk[v] = *reinterpret_cast<const vec*>(w + k * ldw + v * W);
    const int64_t o = off[k];
    for (int p = 0; p < P; ++p) {
      float x = rows[p][o];
      if (lo) x = x < lo[k] ? lo[k] : x;
      if (hi) x = x > hi[k] ? hi[k] : x;
      for (int v = 0; v < V; ++v) acc[p][v] += x * wk[v];
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) *reinterpret_cast<vec*>(out + p * ldo + v * W) = acc[p][v];
}

template <int W, int V>
void direct_block(const float* const* rows, const int64_t* off, const float* lo, const float* hi,
                  const float* w, int64_t ldw, int64_t K, const float* bias, float* out, int64_t ldo,
                  int64_t count) {
  constexpr int P = kAccumulators / V;
  for (int64_t p = 0; p < count; p += P)
    direct_kernel<W, V, P>(rows + p, off, lo, hi, w, ldw, K, bias, out + p * ldo, ldo);
}

using DirectFn = void (*)(const float* const*, const int64_t*, const float*, const float*, const float*,
                          int64_t, int64_t, const float*, float*, int64_t, int64_t);

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t,
                         int64_t);

struct Block {
  int64_t first, width;
  BlockFn fn;
};

// Output blocks covering `outputs` (a multiple of 8), widest first.
std::vector<Block> output_blocks(int64_t outputs) {
  std::vector<Block> blocks;
  for (int64_t first = 0; first < outputs;) {
    const int64_t left = outputs - first;
    Block b{first, 8, block_kernel<8, 1>};
#if defined(__AVX512F__)
    if (left >= 64) b = {first, 64, block_kernel<16, 4>};
    else if (left >= 48) b = {first, 48, block_kernel<16, 3>};
    else if (left >= 32) b = {first, 32, block_kernel<16, 2>};
    else if (left >= 16) b = {first, 16, block_kernel<16, 1>};
#else
    if (left >= 32) b = {first, 32, block_kernel<8, 4>};
    else if (left >= 24) b = {first, 24, block_kernel<8, 3>};
    else if (left >= 16) b = {first, 16, block_kernel<8, 2>};
#endif
    blocks.push_back(b);
    first += b.width;
  }
  return blocks;
}

// Planes path (pixels innermost: NCHW, or channel slices of it). A gathered input is a whole row
// of pixels, so the gather costs nothing: acc[o][j] (+)= w[o][k] * clamp(x[off[k] + j * W ...])
// for OB outputs and PV vectors of W pixels, the weights read in their own (outputs, kept) layout.
// w: OB row pointers; out: OB output row pointers (null: a padding row, not stored).
template <int W, int OB, int PV>
inline void plane_kernel(const float* x, const int64_t* off, const float* lo, const float* hi, int64_t K,
                         const float* const* w, const float* bias, float* const* out, bool prefetch) {
  using vec = typename Vec<W>::type;
  vec acc[OB][PV];
  for (int o = 0; o < OB; ++o)
    for (int j = 0; j < PV; ++j) acc[o][j] = vec{} + bias[o];
  for (int64_t k = 0; k < K; ++k) {
    const float* src = x + off[k];
    if (prefetch)  // the next chunk of this row: rows are too many streams for the hardware prefetcher
      for (int j = 0; j < PV; ++j) __builtin_prefetch(src + (PV + j) * W);
    vec xv[PV];
    for (int j = 0; j < PV; ++j) xv[j] = *reinterpret_cast<const vec*>(src + j * W);
    if (lo) {
      const vec l = vec{} + lo[k];
      for (int j = 0; j < PV; ++j) xv[j] = xv[j] < l ? l : xv[j];
    }
    if (hi) {
      const vec h = vec{} + hi[k];
      for (int j = 0; j < PV; ++j) xv[j] = xv[j] > h ? h : xv[j];
    }
    for (int o = 0; o < OB; ++o) {
      const float wk = w[o][k];
      for (int j = 0; j < PV; ++j) acc[o][j] += wk * xv[j];
    }
  }
  for (int o = 0; o < OB; ++o)
    if (out[o])
      for (int j = 0; j < PV; ++j) *reinterpret_cast<vec*>(out[o] + j * W) = acc[o][j];
}

#if defined(__AVX512F__)
constexpr int kPlaneOutputs = 8;  // 8 x 3 accumulators of 16 pixels
#else
constexpr int kPlaneOutputs = 4;  // 4 x 3 accumulators of 8 pixels
#endif
constexpr int kPlaneVectors = 3;

// The whole op on pixel planes: every (image, group, block of outputs, chunk of pixels) is one
// work item. Chunks are kPlaneVectors vectors; a plane's last partial vector is copied, zero
// padded, into a small buffer first so that every load is a whole vector.
void plane_pointwise(const float* x, int64_t N, int64_t HW, int64_t s0, const int64_t* offset, const float* lo,
                     const float* hi, int64_t groups, int64_t kept, const float* weight, const float* bias,
                     const int64_t* dest, int64_t group_outputs, float* y, int64_t o0, int64_t o1) {
  constexpr int W = kWide, OB = kPlaneOutputs, PV = kPlaneVectors;
  const int64_t chunk = W * PV;
  const int64_t chunks = (HW + chunk - 1) / chunk;
  const int64_t blocks = (group_outputs + OB - 1) / OB;
  const int64_t items = N * chunks * groups * blocks;
  const std::vector<float> zeros(std::max<int64_t>(kept, 1), 0.0f);
  const float zero_bias[OB] = {};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kept * OB * chunk));
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) {
    std::vector<float> tail(std::max<int64_t>(kept, 1) * W), tail_out(OB * W);
    std::vector<int64_t> tail_off(std::max<int64_t>(kept, 1));
    for (int64_t k = 0; k < kept; ++k) tail_off[k] = k * W;
    for (int64_t item = first; item < last; ++item) {
      // Chunks innermost: one thread streams along the same rows, with the same weights in cache.
      const int64_t c = item % chunks, b = (item / chunks) % blocks, g = (item / (chunks * blocks)) % groups,
                    n = item / (chunks * blocks * groups);
      const int64_t p0 = c * chunk, count = std::min(chunk, HW - p0);
      const float* w[OB];
      float bias_block[OB];
      int64_t rows[OB];
      const int64_t o_first = b * OB;
      for (int o = 0; o < OB; ++o) {
        const bool real = o_first + o < group_outputs;
        const int64_t r = g * group_outputs + o_first + o;
        w[o] = real ? weight + r * kept : zeros.data();
        bias_block[o] = real && bias ? bias[r] : zero_bias[o];
        rows[o] = real ? n * o0 + dest[r] * o1 : -1;
      }
      const float* xs = x + n * s0 + p0;
      const int64_t* off = offset + g * kept;
      const float* l = lo ? lo + g * kept : nullptr;
      const float* h = hi ? hi + g * kept : nullptr;
      float* out[OB];
      if (count == chunk) {
        for (int o = 0; o < OB; ++o) out[o] = rows[o] < 0 ? nullptr : y + rows[o] + p0;
        plane_kernel<W, OB, PV>(xs, off, l, h, kept, w, bias_block, out, p0 + 2 * chunk <= HW);
        continue;
      }
      int64_t p = 0;
      for (; p + W <= count; p += W) {
        for (int o = 0; o < OB; ++o) out[o] = rows[o] < 0 ? nullptr : y + rows[o] + p0 + p;
        plane_kernel<W, OB, 1>(xs + p, off, l, h, kept, w, bias_block, out, false);
      }
      if (p < count) {  // the last partial vector of the plane, through the padded buffer
        const int64_t r = count - p;
        for (int64_t k = 0; k < kept; ++k) {
          const float* src = xs + off[k] + p;
          std::copy(src, src + r, tail.data() + k * W);
          std::fill(tail.data() + k * W + r, tail.data() + (k + 1) * W, 0.0f);
        }
        for (int o = 0; o < OB; ++o) out[o] = tail_out.data() + o * W;
        plane_kernel<W, OB, 1>(tail.data(), tail_off.data(), l, h, kept, w, bias_block, out, false);
        for (int o = 0; o < OB; ++o)
          if (rows[o] >= 0) std::copy(tail_out.data() + o * W, tail_out.data() + o * W + r, y + rows[o] + p0 + p);
      }
    }
  });
}

// The same function with ATen ops (any dtype): gather, clamp, grouped 1x1 conv, reorder.
at::Tensor reference(const at::Tensor& input, const at::Tensor& index, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& low,
                     const std::optional<at::Tensor>& high, const std::optional<at::Tensor>& order,
                     int64_t groups) {
  at::Tensor x = input.index_select(1, index);
  if (low.has_value() || high.has_value()) {
    std::optional<at::Tensor> lo, hi;
    if (low.has_value()) lo = low->reshape({1, -1, 1, 1});
    if (high.has_value()) hi = high->reshape({1, -1, 1, 1});
    x = at::clamp(x, lo, hi);
  }
  at::Tensor out = at::conv2d(x, weight.reshape({weight.size(0), -1, 1, 1}), bias, at::IntArrayRef{1, 1},
                              at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, groups);
  if (order.has_value()) out = out.index_select(1, *order);
  at::Tensor result = output_like(input, out.size(1));
  result.copy_(out);
  return result;
}

}  // namespace

namespace lgconv_kernels {

at::Tensor condensed_pointwise_cpu(const at::Tensor& input, const at::Tensor& index, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& low,
                                   const std::optional<at::Tensor>& high, const std::optional<at::Tensor>& order,
                                   int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "condensed_pointwise: input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(groups > 0 && index.numel() % groups == 0 && weight.size(0) % groups == 0,
              "condensed_pointwise: groups must divide the index length and the outputs");
  const int64_t out_channels = weight.size(0);
  const int64_t kept = index.numel() / groups;
  TORCH_CHECK(weight.numel() == out_channels * kept,
              "condensed_pointwise: weight must hold (outputs, index length / groups) values");
  bool native = input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                (!bias.has_value() || bias->scalar_type() == at::kFloat) &&
                (!low.has_value() || low->scalar_type() == at::kFloat) &&
                (!high.has_value() || high->scalar_type() == at::kFloat);
  if (!native) return reference(input, index, weight, bias, low, high, order, groups);

  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t group_outputs = out_channels / groups;
  const int64_t padded = (group_outputs + 7) / 8 * 8;  // outputs per group, padded to whole vectors
  const std::vector<Block> blocks = output_blocks(padded);

  at::Tensor wc = weight.contiguous();
  at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!bc.defined() || bc.numel() == out_channels, "condensed_pointwise: bias must have one value per output");
  at::Tensor lo = low.has_value() ? low->contiguous() : at::Tensor();
  at::Tensor hi = high.has_value() ? high->contiguous() : at::Tensor();
  TORCH_CHECK((!lo.defined() || lo.numel() == kept * groups) && (!hi.defined() || hi.numel() == kept * groups),
              "condensed_pointwise: low and high need one bound per index entry");
  at::Tensor idx = index.scalar_type() == at::kLong ? index.contiguous() : index.to(at::kLong).contiguous();
  const int64_t* pidx = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(pidx[i] >= 0 && pidx[i] < C, "condensed_pointwise: index out of range for ", C, " inputs");

  // Destination channel of every grouped output row.
  std::vector<int64_t> dest(out_channels);
  if (order.has_value()) {
    at::Tensor ord = order->scalar_type() == at::kLong ? order->contiguous() : order->to(at::kLong).contiguous();
    TORCH_CHECK(ord.numel() == out_channels, "condensed_pointwise: order must list every output");
    const int64_t* o = ord.data_ptr<int64_t>();
    for (int64_t c = 0; c < out_channels; ++c) dest[o[c]] = c;
  } else {
    for (int64_t r = 0; r < out_channels; ++r) dest[r] = r;
  }

  at::Tensor output = output_like(input, out_channels);
  if (input.stride(3) == 1 && input.stride(2) == W && (input.stride(1) != 1 || C == 1) && H * W >= kWide &&
      output.stride(3) == 1 && output.stride(2) == W) {
    const int64_t s1p = input.stride(1);
    std::vector<int64_t> plane_offset(idx.numel());
    for (int64_t j = 0; j < idx.numel(); ++j) plane_offset[j] = pidx[j] * s1p;
    plane_pointwise(input.data_ptr<float>(), N, H * W, input.stride(0), plane_offset.data(),
                    lo.defined() ? lo.data_ptr<float>() : nullptr, hi.defined() ? hi.data_ptr<float>() : nullptr,
                    groups, kept, wc.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr, dest.data(),
                    group_outputs, output.data_ptr<float>(), output.stride(0), output.stride(1));
    return output;
  }
  // Weights transposed per group to (kept, padded outputs) and zero-padded; bias padded alike.
  const float* wsrc = wc.data_ptr<float>();
  std::vector<float> packed_w(groups * kept * padded, 0.0f), packed_b(groups * padded, 0.0f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t o = 0; o < group_outputs; ++o) {
      const float* row = wsrc + (g * group_outputs + o) * kept;
      float* col = packed_w.data() + g * kept * padded + o;
      for (int64_t k = 0; k < kept; ++k) col[k * padded] = row[k];
    }
  if (bc.defined()) {
    for (int64_t g = 0; g < groups; ++g)
      std::copy(bc.data_ptr<float>() + g * group_outputs, bc.data_ptr<float>() + (g + 1) * group_outputs,
                packed_b.data() + g * padded);
  }
  const float* x = input.data_ptr<float>();
  float* y = output.data_ptr<float>();
  const float* pw = packed_w.data();
  const float* pb = packed_b.data();
  const float* plo = lo.defined() ? lo.data_ptr<float>() : nullptr;
  const float* phi = hi.defined() ? hi.data_ptr<float>() : nullptr;
  const int64_t s0 = input.stride(0), s1 = input.stride(1), s2 = input.stride(2), s3 = input.stride(3);
  const int64_t o0 = output.stride(0), o1 = output.stride(1), o2 = output.stride(2), o3 = output.stride(3);
  const int64_t pixels = N * H * W, tiles = (pixels + kTile - 1) / kTile;
  const int64_t slots = groups * kept;
  const bool has_low = low.has_value(), has_high = high.has_value();
  std::vector<int64_t> offset(slots);  // element offset of every index entry's channel
  for (int64_t j = 0; j < slots; ++j) offset[j] = pidx[j] * s1;
  std::vector<bool> contiguous(groups, o1 == 1);  // a group's outputs land in consecutive channels
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 1; j < group_outputs; ++j)
      contiguous[g] = contiguous[g] && dest[g * group_outputs + j] == dest[g * group_outputs] + j;

  const bool direct = s1 == 1 && padded <= 16;
#if defined(__AVX512F__)
  const DirectFn direct_fn = padded <= 8 ? direct_block<8, 1> : direct_block<16, 1>;
#else
  const DirectFn direct_fn = padded <= 8 ? direct_block<8, 1> : direct_block<8, 2>;
#endif
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    // Packed clamped inputs (group, pixel, kept input) and one group's outputs for the tile; the
    // rows past the last pixel are zero so partial micro-blocks compute harmless values.
    std::vector<float> a(groups * kTile * kept, 0.0f);
    std::vector<float> acc(kTile * padded);
    std::vector<int64_t> in_off(kTile), out_off(kTile);
    std::vector<const float*> rows(kTile);
    auto store = [&](int64_t g, int64_t count) {  // one group's outputs to their channels
      const int64_t* gd = dest.data() + g * group_outputs;
      for (int64_t p = 0; p < count; ++p) {
        const float* src = acc.data() + p * padded;
        float* out = y + out_off[p];
        if (contiguous[g]) {
          std::copy(src, src + group_outputs, out + gd[0]);
        } else {
          for (int64_t j = 0; j < group_outputs; ++j) out[gd[j] * o1] = src[j];
        }
      }
    };
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t start = tile * kTile, count = std::min(kTile, pixels - start);
      for (int64_t p = 0; p < count; ++p) {
        const int64_t q = start + p, col = q % W, row = (q / W) % H, n = q / (W * H);
        in_off[p] = n * s0 + row * s2 + col * s3;
        out_off[p] = n * o0 + row * o2 + col * o3;
      }
      if (count < kTile)
        for (int64_t g = 0; g < groups; ++g)
          std::fill(a.begin() + (g * kTile + count) * kept, a.begin() + (g + 1) * kTile * kept, 0.0f);
      if (direct) {
        for (int64_t p = 0; p < kTile; ++p) rows[p] = x + in_off[std::min(p, count - 1)];
        for (int64_t g = 0; g < groups; ++g) {
          direct_fn(rows.data(), offset.data() + g * kept, has_low ? plo + g * kept : nullptr,
                    has_high ? phi + g * kept : nullptr, pw + g * kept * padded, padded, kept,
                    pb + g * padded, acc.data(), padded, count);
          store(g, count);
        }
        continue;
      }
      if (s1 == 1) {  // channels innermost: one pass over each pixel's inputs for all groups
        for (int64_t p = 0; p < count; ++p) {
          const float* src = x + in_off[p];
          if (p + 2 < count) __builtin_prefetch(x + in_off[p + 2]);
          for (int64_t g = 0; g < groups; ++g) {
            float* dst = a.data() + (g * kTile + p) * kept;
            const int64_t* off = offset.data() + g * kept;
            for (int64_t k = 0; k < kept; ++k) dst[k] = src[off[k]];
          }
        }
      } else {  // pixels innermost: one pass over each channel's pixels
        for (int64_t j = 0; j < slots; ++j) {
          const float* src = x + offset[j];
          float* dst = a.data() + (j / kept) * kTile * kept + j % kept;
          for (int64_t p = 0; p < count; ++p) dst[p * kept] = src[in_off[p]];
        }
      }
      if (has_low || has_high) {  // the folded batch norm + ReLU, vectorised over the kept inputs
        for (int64_t g = 0; g < groups; ++g) {
          const float* l = has_low ? plo + g * kept : nullptr;
          const float* u = has_high ? phi + g * kept : nullptr;
          for (int64_t p = 0; p < count; ++p) {
            float* dst = a.data() + (g * kTile + p) * kept;
            if (has_low)
              for (int64_t k = 0; k < kept; ++k) dst[k] = dst[k] < l[k] ? l[k] : dst[k];
            if (has_high)
              for (int64_t k = 0; k < kept; ++k) dst[k] = dst[k] > u[k] ? u[k] : dst[k];
          }
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float* ga = a.data() + g * kTile * kept;
        for (const Block& b : blocks)
          b.fn(ga, kept, pw + g * kept * padded + b.first, padded, kept, pb + g * padded + b.first,
               acc.data() + b.first, padded, count);
        store(g, count);
      }
    }
  });
  return output;
}

}  // namespace lgconv_kernels

TORCH_LIBRARY_IMPL(lgconv, CPU, m) { m.impl("condensed_pointwise", &lgconv_kernels::condensed_pointwise_cpu); }
