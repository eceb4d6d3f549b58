// The input rows of a product with K-quant weights quantized as llama.cpp's Q8_K does:
// int8 codes per 256 values with one float scale, and the sums of their codes per 8, 16 and
// 32 (for the sub-blocks' minimum terms). The int8 GEMM (quantized_gemm.cpp) reads them; its
// twin is pagoda/model/ops/quantized_gemm.py's quantize_inputs_torch.

#pragma once

#include "simd.h"

#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)

namespace pagoda {

inline constexpr int64_t kSuper = 256;  // values a super-block

// The input rows quantized per 256 values: codes = round(x * 127 / amax) (to nearest even),
// dx = amax / 127, the sums of each 16 codes (int32) and of each 32 (int16), and -32 times
// the sum of each 8 (int32: the int8 GEMM's Q6_K offset, a half sub-block at a time).
struct InputRows {
  int64_t supers;
  const int8_t* codes;   // [rows, supers * 256]
  const float* scale;    // [rows, supers]
  const int32_t* sum16;  // [rows, supers * 16]
  const int16_t* sum32;  // [rows, supers * 8]
  const int32_t* off8;   // [rows, supers * 32]
};

struct InputStorage {
  std::vector<int8_t> codes;
  std::vector<float> scale;
  std::vector<int32_t> sum16;
  std::vector<int16_t> sum32;
  std::vector<int32_t> off8;
};

template <typename T>
inline InputRows quantize_inputs(const at::Tensor& x, InputStorage& s) {
  const int64_t rows = x.size(0), k = x.size(1), supers = k / kSuper;
  s.codes.resize(rows * k);
  s.scale.resize(rows * supers);
  s.sum16.resize(rows * supers * 16);
  s.sum32.resize(rows * supers * 8);
  s.off8.resize(rows * supers * 32);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < supers; ++b) {
        const int64_t cell = r * supers + b;
        const T* v = xp + cell * kSuper;
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < 16; ++i) m = _mm512_max_ps(m, _mm512_abs_ps(load16(v + 16 * i)));
        const float amax = _mm512_reduce_max_ps(m);
        // 127 / amax by a division instruction, as the twin divides
        const float id =
            amax > 0.f ? _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(127.f), _mm_set_ss(amax))) : 0.f;
        s.scale[cell] = amax / 127.f;
        int8_t* c = s.codes.data() + cell * kSuper;
        int32_t* s16 = s.sum16.data() + cell * 16;
        int32_t* o8 = s.off8.data() + cell * 32;
        for (int i = 0; i < 16; ++i) {
          const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(v + 16 * i), _mm512_set1_ps(id)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 16 * i), _mm512_cvtsepi32_epi8(q));
          const int32_t low = _mm512_mask_reduce_add_epi32(0x00FF, q);
          const int32_t high = _mm512_mask_reduce_add_epi32(0xFF00, q);
          o8[2 * i] = -32 * low;
          o8[2 * i + 1] = -32 * high;
          s16[i] = low + high;
        }
        for (int j = 0; j < 8; ++j) {
          s.sum32[cell * 8 + j] = static_cast<int16_t>(s16[2 * j] + s16[2 * j + 1]);
        }
      }
    }
  });
  return {supers, s.codes.data(), s.scale.data(), s.sum16.data(), s.sum32.data(),
          s.off8.data()};
}

}  // namespace pagoda

#endif
