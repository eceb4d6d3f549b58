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

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

namespace pagoda {

inline constexpr int64_t kSuper = 256;  // values a super-block

// As above, for the AVX2 GEMM, whose microkernel sums u8 x s8 pairs into int16 (maddubs):
// the codes and dx as above, the sums of each 32 codes (int16, Q4_K's minimums), and for
// each 16 codes -32 times the sums of the two int16 halves of its dwords (codes 0, 1, 4, 5,
// 8, 9, 12, 13 and 2, 3, 6, 7, ..., 15) as one dword: the Q6_K offset an int16 pair starts
// from (|.| <= 8 x 32 x 127 = 32512).
struct InputRows {
  int64_t supers;
  const int8_t* codes;   // [rows, supers * 256]
  const float* scale;    // [rows, supers]
  const int16_t* sum32;  // [rows, supers * 8]
  const int32_t* off16;  // [rows, supers * 16]
};

struct InputStorage {
  std::vector<int8_t> codes;
  std::vector<float> scale;
  std::vector<int16_t> sum32;
  std::vector<int32_t> off16;
};

template <typename T>
inline InputRows quantize_inputs(const at::Tensor& x, InputStorage& s) {
  const int64_t rows = x.size(0), k = x.size(1), supers = k / kSuper;
  s.codes.resize(rows * k);
  s.scale.resize(rows * supers);
  s.sum32.resize(rows * supers * 8);
  s.off16.resize(rows * supers * 16);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < supers; ++b) {
        const int64_t cell = r * supers + b;
        const T* v = xp + cell * kSuper;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 32; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, load8(v + 8 * i)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        // 127 / amax by a division instruction, as the twin divides
        const float id =
            amax > 0.f ? _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(127.f), _mm_set_ss(amax))) : 0.f;
        s.scale[cell] = amax / 127.f;
        int8_t* c = s.codes.data() + cell * kSuper;
        int32_t* o16 = s.off16.data() + cell * 16;
        const __m256 scale = _mm256_set1_ps(id);
        for (int i = 0; i < 8; ++i) {  // 32 codes at a time
          __m256i q[4];
          for (int e = 0; e < 4; ++e) {
            q[e] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(v + 32 * i + 8 * e), scale));
          }
          // packs interleave the 128-bit lanes: dwords 0, 4, 1, 5, ... put them back in order
          const __m256i bytes = _mm256_permutevar8x32_epi32(
              _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
              _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 32 * i), bytes);
          // int16 pair sums, then each 128-bit lane's 4 dwords added as int16 pairs
          __m256i pairs = _mm256_maddubs_epi16(ones, bytes);
          pairs = _mm256_add_epi16(pairs, _mm256_shuffle_epi32(pairs, 0x4E));
          pairs = _mm256_add_epi16(pairs, _mm256_shuffle_epi32(pairs, 0xB1));
          const __m256i off = _mm256_mullo_epi16(pairs, _mm256_set1_epi16(-32));
          o16[2 * i] = _mm256_extract_epi32(off, 0);
          o16[2 * i + 1] = _mm256_extract_epi32(off, 4);
          const int32_t lo = _mm256_extract_epi32(pairs, 0), hi = _mm256_extract_epi32(pairs, 4);
          s.sum32[cell * 8 + i] = static_cast<int16_t>(
              static_cast<int16_t>(lo) + static_cast<int16_t>(lo >> 16) +
              static_cast<int16_t>(hi) + static_cast<int16_t>(hi >> 16));
        }
      }
    }
  });
  return {supers, s.codes.data(), s.scale.data(), s.sum32.data(), s.off16.data()};
}

}  // namespace pagoda

#endif
