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

// For helpers inlined into a kernel's inner loop, so their vectors stay in registers (GCC
// otherwise calls them and passes the vectors on the stack).
#define PAGODA_INLINE inline __attribute__((always_inline))

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
// 8 values of a row as float32, and back.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int i = 0; i < 8; ++i) p[i] = at::BFloat16(tmp[i]);
}

#ifdef __FMA__
// e^x for x <= 0, as exp16: 2^f by the same series, and 2^n put into the exponent's bits,
// with n clamped at -126, the smallest normal exponent (e^x under 1.2e-38 comes out as that).
inline __m256 exp8(__m256 x) {
  const __m256 t = _mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                 _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718f));
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) {
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  }
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// float32 vectors of the widest kind the build has, for kernels written once for both:
// 16 lanes with AVX-512, 8 with AVX2 and FMA.
#define PAGODA_VEC 1
namespace vec {
#ifdef __AVX512F__
using F32 = __m512;
constexpr int64_t kLanes = 16;
template <typename T>
PAGODA_INLINE F32 load(const T* p) { return load16(p); }
template <typename T>
PAGODA_INLINE void store(T* p, F32 v) { store16(p, v); }
PAGODA_INLINE F32 zero() { return _mm512_setzero_ps(); }
PAGODA_INLINE F32 set1(float x) { return _mm512_set1_ps(x); }
PAGODA_INLINE F32 add(F32 a, F32 b) { return _mm512_add_ps(a, b); }
PAGODA_INLINE F32 sub(F32 a, F32 b) { return _mm512_sub_ps(a, b); }
PAGODA_INLINE F32 mul(F32 a, F32 b) { return _mm512_mul_ps(a, b); }
PAGODA_INLINE F32 fmadd(F32 a, F32 b, F32 c) { return _mm512_fmadd_ps(a, b, c); }
PAGODA_INLINE F32 div(F32 a, F32 b) { return _mm512_div_ps(a, b); }
PAGODA_INLINE F32 abs(F32 a) { return _mm512_abs_ps(a); }
// a where x < 0, else b.
PAGODA_INLINE F32 if_negative(F32 x, F32 a, F32 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero(), _CMP_LT_OQ), b, a);
}
PAGODA_INLINE float sum(F32 v) { return _mm512_reduce_add_ps(v); }
PAGODA_INLINE F32 exp(F32 x) { return exp16(x); }
#else
using F32 = __m256;
constexpr int64_t kLanes = 8;
template <typename T>
PAGODA_INLINE F32 load(const T* p) { return load8(p); }
template <typename T>
PAGODA_INLINE void store(T* p, F32 v) { store8(p, v); }
PAGODA_INLINE F32 zero() { return _mm256_setzero_ps(); }
PAGODA_INLINE F32 set1(float x) { return _mm256_set1_ps(x); }
PAGODA_INLINE F32 add(F32 a, F32 b) { return _mm256_add_ps(a, b); }
PAGODA_INLINE F32 sub(F32 a, F32 b) { return _mm256_sub_ps(a, b); }
PAGODA_INLINE F32 mul(F32 a, F32 b) { return _mm256_mul_ps(a, b); }
PAGODA_INLINE F32 fmadd(F32 a, F32 b, F32 c) { return _mm256_fmadd_ps(a, b, c); }
PAGODA_INLINE F32 div(F32 a, F32 b) { return _mm256_div_ps(a, b); }
PAGODA_INLINE F32 abs(F32 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
// a where x < 0, else b.
PAGODA_INLINE F32 if_negative(F32 x, F32 a, F32 b) {
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, zero(), _CMP_LT_OQ));
}
PAGODA_INLINE float sum(F32 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
PAGODA_INLINE F32 exp(F32 x) { return exp8(x); }
#endif
}  // namespace vec
#endif

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
#ifdef PAGODA_VEC
  vec::F32 total = vec::zero();
  for (; p + vec::kLanes <= len; p += vec::kLanes) {
    const vec::F32 e = vec::exp(vec::sub(vec::load(scores + p), vec::set1(top)));
    vec::store(scores + p, e);
    total = vec::add(total, e);
  }
  sum = vec::sum(total);
#endif
  for (; p < len; ++p) {
    scores[p] = std::exp(scores[p] - top);
    sum += scores[p];
  }
  return sum;
}

}  // namespace pagoda
