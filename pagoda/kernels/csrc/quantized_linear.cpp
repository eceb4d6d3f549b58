// Matrix products with a quantized GGUF weight: torch.ops.pagoda.q8_0_linear.
// The PyTorch twin that defines what it computes: pagoda/model/ops/quantized_linear.py.

#include "simd.h"
#include <vector>

namespace pagoda {
namespace {

// out = x @ W.T in float32 for a weight stored as GGUF's Q8_0 blocks: row n, block b
// is scales[n, b] * codes[n, 32 b : 32 b + 32]. For a few rows of x, where reading
// the weight is the whole cost and 1 byte per weight beats bfloat16's 2.
template <typename T>
void q8_0_linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1), n = codes.size(0), blocks = k / 32;
  std::vector<float> xf(rows * k);
  for (int64_t i = 0; i < rows * k; ++i) xf[i] = to_f32(x.data_ptr<T>()[i]);
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int8_t* c = cp + j * k;
      const float* d = sp + j * blocks;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xf.data() + r * k;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; ++b) {
          const int8_t* cb = c + b * 32;
          const __m512 lo = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb))));
          const __m512 hi = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + 16))));
          const __m512 dot = _mm512_fmadd_ps(
              hi, _mm512_loadu_ps(xr + b * 32 + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xr + b * 32)));
          acc = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), dot, acc);
        }
        op[r * n + j] = _mm512_reduce_add_ps(acc);
#else
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          float dot = 0.f;
          for (int64_t i = 0; i < 32; ++i) dot += c[b * 32 + i] * xr[b * 32 + i];
          acc += d[b] * dot;
        }
        op[r * n + j] = acc;
#endif
      }
    }
  });
}

}  // namespace

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 32 == 0,
              "x must be contiguous [rows, k] with k a multiple of 32");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() &&
                  codes.dim() == 2 && codes.size(1) == x.size(1),
              "codes must be contiguous int8 [n, k]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == codes.size(0) && scales.size(1) == x.size(1) / 32,
              "scales must be contiguous float32 [n, k / 32]");
  at::Tensor out = at::empty({x.size(0), codes.size(0)}, x.options().dtype(at::kFloat));
  dispatch_float_types(x, "q8_0_linear", [&](auto t) {
    q8_0_linear_impl<decltype(t)>(x, codes, scales, out);
  });
  return out;
}

}  // namespace pagoda
