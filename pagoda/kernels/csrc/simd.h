// What every kernel file shares: float32 arithmetic on float and bfloat16 tensors,
// 16 lanes at a time with AVX-512 where the build has it, and the checks of the
// arguments every op makes.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pagoda {

inline float to_f32(float x) { return x; }
inline float to_f32(at::BFloat16 x) { return static_cast<float>(x); }
template <typename T>
inline T from_f32(float x) { return static_cast<T>(x); }
// What storing in T and reading back gives: the rounding the PyTorch twin applies.
template <typename T>
inline float round_to(float x) { return to_f32(from_f32<T>(x)); }

#ifdef __AVX512F__
// 16 values of a row as float32, and back, rounding to nearest even as c10 does.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(tmp[i]);
#endif
}

// e^x for x <= 0: 2^n * 2^f with n = round(x log2 e), and 2^f by its Taylor series on
// |f| <= 0.5 (relative error below 2e-7, under float32's own rounding of the sum).
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                 _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) {
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512F__) || defined(__F16C__)
// The half-precision float stored at p (a GGUF block's scale; any alignment).
inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
#endif

#ifdef __AVX2__
// 8 values of a row as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
#endif

// For helpers inlined into a kernel's inner loop, so their vectors stay in registers (GCC
// otherwise calls them and passes the vectors on the stack).
#define PAGODA_INLINE inline __attribute__((always_inline))

// Calls f with a value of x's element type (float or at::BFloat16), the types the
// kernels are written for; any other type is an error naming the op.
template <typename F>
inline void dispatch_float_types(const at::Tensor& x, const char* op, F&& f) {
  if (x.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, " takes float32 or bfloat16");
    f(at::BFloat16{});
  }
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// Softmax numerators of one row in place; returns their sum.
inline float exp_shifted(float* scores, int64_t len) {
  const float top = *std::max_element(scores, scores + len);
  float sum = 0.f;
  int64_t p = 0;
#ifdef __AVX512F__
  __m512 total = _mm512_setzero_ps();
  for (; p + 16 <= len; p += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + p), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + p, e);
    total = _mm512_add_ps(total, e);
  }
  sum = _mm512_reduce_add_ps(total);
#endif
  for (; p < len; ++p) {
    scores[p] = std::exp(scores[p] - top);
    sum += scores[p];
  }
  return sum;
}

}  // namespace pagoda
