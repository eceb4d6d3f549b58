// gguf_linear's kernel and the dequantizer's decoding with AVX2 (+ FMA, F16C), for
// quantized_linear.cpp, which includes this header on a CPU without AVX-512.
//
// The products of quantized_linear_avx512.h in 256-bit registers, for a CPU without
// AVX-512. A unit of 4 blocks of 32 weights (half a K-quant super-block, or 4 consecutive legacy
// blocks) is decoded into four registers, one a block, its 32 codes in weight order, and the
// input rows are quantized into the same order. A block's dot product is maddubs (u8 x s8,
// pairs summed into int16) then madd with ones (into 8 dwords: dwords 0-3 from its first 16
// weights, 4-7 from its last 16), and two rounds of hadd bring a unit's 4 blocks into one
// register laid out as the scales are:
//
//   dword lane i (0..3):  the first 16 weights of block i;  lane 4 + i: its last 16
//
// so one float product per unit and input row scales them all: acc += float(dot) *
// (scale * dx) + min * (dx * sum of the input codes). maddubs saturates at 32767: codes of at
// most 6 bits (63 * 127 * 2 = 16002) fit; Q8_0's signed codes are multiplied as |q| times x
// with q's sign (128 * 127 * 2 = 32512), with no minimum.

#pragma once

#include "simd.h"

#include <type_traits>
#include <vector>

namespace pagoda {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kUnit = 4;  // blocks a unit
constexpr int64_t kUnitValues = kUnit * kBlock;
constexpr int kMaxRowsPerPass = 4;

// One unit of 4 blocks: w = scale * q + min, q[i] block i's codes in weight order (int8 for
// a signed format, uint8 otherwise); scale and min per lane as above.
struct Unit {
  __m256i q[4];
  __m256 scale, min;
};

inline __m256i load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// The 4 lanes of v in lanes 0-3 and again in 4-7.
PAGODA_INLINE __m256 twice(__m128 v) { return _mm256_set_m128(v, v); }

// The legacy formats' units: at(i) is block i (i = 0..3); the last unit of a row may hold
// fewer than 4 blocks, the others read as a block of zeros (scale 0; their inputs are zero).
template <int64_t kBytes>
struct FullUnit {
  const uint8_t* p;
  PAGODA_INLINE const uint8_t* operator()(int i) const { return p + i * kBytes; }
};
alignas(64) constexpr uint8_t kZeroBlock[64] = {};
template <int64_t kBytes>
struct PartUnit {
  const uint8_t* p;
  int64_t blocks;
  PAGODA_INLINE const uint8_t* operator()(int i) const {
    return i < blocks ? p + i * kBytes : kZeroBlock;
  }
};

// The float16 at(i) + offset for blocks i = 0..3, as float32.
template <typename At>
PAGODA_INLINE __m128 f16x4(At at, int offset) {
  uint16_t h[4];
  for (int i = 0; i < 4; ++i) std::memcpy(&h[i], at(i) + offset, 2);
  return _mm_cvtph_ps(_mm_setr_epi16(h[0], h[1], h[2], h[3], 0, 0, 0, 0));
}

// 16 nibble bytes: weights 0-15 the low nibbles, 16-31 the high ones.
PAGODA_INLINE __m256i legacy_nibbles(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

// Legacy Q5_*: bit l of the block's 32-bit qh is weight l's fifth bit; as 16 in byte l.
PAGODA_INLINE __m256i legacy_fifth_bits(const uint8_t* p) {
  uint32_t h;
  std::memcpy(&h, p, 4);
  // byte l: byte l / 8 of qh (shuffled within each 128-bit half, which both hold qh)
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(int(h)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                       3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

struct Q8_0 {
  static constexpr int64_t kBytes = 34, kBlocks = 1;
  static constexpr bool kSigned = true;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Unit* u) {
    for (int i = 0; i < 4; ++i) u->q[i] = load256(at(i) + 2);
    u->scale = twice(f16x4(at, 0));
    u->min = _mm256_setzero_ps();
  }
};

struct Q4_0 {
  static constexpr int64_t kBytes = 18, kBlocks = 1;
  static constexpr bool kSigned = false;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Unit* u) {
    for (int i = 0; i < 4; ++i) u->q[i] = legacy_nibbles(at(i) + 2);
    u->scale = twice(f16x4(at, 0));
    u->min = _mm256_mul_ps(u->scale, _mm256_set1_ps(-8.f));
  }
};

struct Q5_0 {
  static constexpr int64_t kBytes = 22, kBlocks = 1;
  static constexpr bool kSigned = false;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Unit* u) {
    for (int i = 0; i < 4; ++i) {
      u->q[i] = _mm256_or_si256(legacy_nibbles(at(i) + 6), legacy_fifth_bits(at(i) + 2));
    }
    u->scale = twice(f16x4(at, 0));
    u->min = _mm256_mul_ps(u->scale, _mm256_set1_ps(-16.f));
  }
};

struct Q4_1 {
  static constexpr int64_t kBytes = 20, kBlocks = 1;
  static constexpr bool kSigned = false;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Unit* u) {
    for (int i = 0; i < 4; ++i) u->q[i] = legacy_nibbles(at(i) + 4);
    u->scale = twice(f16x4(at, 0));
    u->min = twice(f16x4(at, 2));
  }
};

struct Q5_1 {
  static constexpr int64_t kBytes = 24, kBlocks = 1;
  static constexpr bool kSigned = false;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Unit* u) {
    for (int i = 0; i < 4; ++i) {
      u->q[i] = _mm256_or_si256(legacy_nibbles(at(i) + 8), legacy_fifth_bits(at(i) + 4));
    }
    u->scale = twice(f16x4(at, 0));
    u->min = twice(f16x4(at, 2));
  }
};

// Q4_K and Q5_K: sub-blocks 4h .. 4h + 3's scales d sc and minimums -dmin mn.
PAGODA_INLINE void k4_scales(const uint8_t* p, int h, Unit* u) {
  // The 12 bytes at p + 4: bytes 0-3 hold scales 0-3 in their low 6 bits, 4-7 minimums 0-3;
  // scales and minimums 4-7 take their low 4 bits from the low and high nibbles of bytes
  // 8-11 and their top 2 bits from the top of bytes 0-3 and 4-7: rearranged into 8 scale
  // bytes and 8 minimum bytes.
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4));
  const __m128i low = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7,
                                                        8, 9, 10, 11));
  const __m128i top = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1,
                                                        -1, 4, 5, 6, 7));
  const __m128i six = _mm_and_si128(low, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0));
  const __m128i high = _mm_and_si128(_mm_srli_epi16(low, 4), _mm_setr_epi32(0, 0, 0, 0x0f0f0f0f));
  const __m128i bits = _mm_and_si128(_mm_srli_epi16(top, 2), _mm_set1_epi8(0x30));
  const __m128i bytes = _mm_or_si128(_mm_or_si128(six, high), bits);  // scales 0-7, mins 0-7
  // scales 4h .. 4h + 3 and minimums 4h .. 4h + 3 as 8 floats
  const __m256 v32 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
      _mm_shuffle_epi8(bytes, h == 0 ? _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, -1, -1, -1, -1,
                                                     -1, -1, -1, -1)
                                     : _mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, -1, -1, -1,
                                                     -1, -1, -1, -1, -1))));
  uint32_t dd;
  std::memcpy(&dd, p, 4);
  const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128(int(dd)));  // d, dmin
  const __m256 both = _mm256_mul_ps(
      v32, _mm256_setr_ps(_mm_cvtss_f32(d), _mm_cvtss_f32(d), _mm_cvtss_f32(d), _mm_cvtss_f32(d),
                          -_mm_cvtss_f32(_mm_movehdup_ps(d)), -_mm_cvtss_f32(_mm_movehdup_ps(d)),
                          -_mm_cvtss_f32(_mm_movehdup_ps(d)), -_mm_cvtss_f32(_mm_movehdup_ps(d))));
  u->scale = _mm256_permute2f128_ps(both, both, 0x00);
  u->min = _mm256_permute2f128_ps(both, both, 0x11);
}

// Q4_K's nibbles at p for sub-blocks 4h .. 4h + 3: sub-block 2m + s is the low (s = 0) or
// high nibbles of bytes 32 m .. 32 m + 31.
PAGODA_INLINE void k4_nibbles(const uint8_t* p, int h, Unit* u) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int m = 0; m < 2; ++m) {
    const __m256i v = load256(p + 32 * (2 * h + m));
    u->q[2 * m] = _mm256_and_si256(v, mask);
    u->q[2 * m + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  }
}

// Q4_K: [d][dmin][12 B scales][128 B nibbles]; w = d sc q - dmin mn. Unit h: sub-blocks
// 4h .. 4h + 3.
struct Q4_K {
  static constexpr int64_t kBytes = 144, kBlocks = 8;
  static constexpr bool kSigned = false;
  static PAGODA_INLINE void decode(const uint8_t* p, int h, Unit* u) {
    k4_scales(p, h, u);
    k4_nibbles(p + 16, h, u);
  }
};

// Q5_K: [d][dmin][12 B scales][32 B fifth bits][128 B nibbles], the nibbles as Q4_K's; bit
// j of fifth-bit byte l is the fifth bit of weight l of sub-block j.
struct Q5_K {
  static constexpr int64_t kBytes = 176, kBlocks = 8;
  static constexpr bool kSigned = false;
  static PAGODA_INLINE void decode(const uint8_t* p, int h, Unit* u) {
    k4_scales(p, h, u);
    k4_nibbles(p + 48, h, u);
    const __m256i qh = load256(p + 16);
    for (int i = 0; i < 4; ++i) {
      // bit j of every byte to bit 0, then to bit 4 (what crosses a byte lands elsewhere)
      const __m256i bit = _mm256_slli_epi16(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(4 * h + i)), 4);
      u->q[i] = _mm256_or_si256(u->q[i], _mm256_and_si256(bit, _mm256_set1_epi8(0x10)));
    }
  }
};

// Q6_K: [128 B low nibbles][64 B top 2 bits][16 x int8 scales][d]. Weight l of block 4h + c
// (h: half, 128 weights; c: quarter): nibble (c < 2 ? low : high) of ql[64 h + 32 (c & 1) + l],
// bits 2c, 2c + 1 of qh[32 h + l], scale sc[8 h + 2 c + l / 16]; w = d sc (q - 32). Unit h.
struct Q6_K {
  static constexpr int64_t kBytes = 210, kBlocks = 8;
  static constexpr bool kSigned = false;
  static PAGODA_INLINE void decode(const uint8_t* p, int h, Unit* u) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i l0 = load256(p + 64 * h), l1 = load256(p + 64 * h + 32);
    const __m256i qh = load256(p + 128 + 32 * h);
    const __m256i low[4] = {_mm256_and_si256(l0, mask), _mm256_and_si256(l1, mask),
                            _mm256_and_si256(_mm256_srli_epi16(l0, 4), mask),
                            _mm256_and_si256(_mm256_srli_epi16(l1, 4), mask)};
    for (int c = 0; c < 4; ++c) {
      // bits 2c, 2c + 1 of every byte to bits 4, 5 (what crosses a byte lands elsewhere)
      const __m256i top = _mm256_slli_epi16(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), 4);
      u->q[c] = _mm256_or_si256(low[c], _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
    }
    // block c's scales sc[8h + 2c] (first 16 weights) and sc[8h + 2c + 1]
    const __m256i sc = _mm256_permutevar8x32_epi32(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 192 + 8 * h))),
        _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    uint16_t d;
    std::memcpy(&d, p + 208, 2);
    u->scale = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(d)), _mm256_cvtepi32_ps(sc));
    u->min = _mm256_mul_ps(u->scale, _mm256_set1_ps(-32.f));
  }
};

// Unit v of a weight row of `blocks` blocks.
template <typename F>
PAGODA_INLINE void decode_unit(const uint8_t* row, int64_t v, int64_t blocks, Unit* out) {
  if constexpr (F::kBlocks == 1) {
    const uint8_t* p = row + v * kUnit * F::kBytes;
    if (blocks - v * kUnit < kUnit) {
      F::decode(PartUnit<F::kBytes>{p, blocks - v * kUnit}, out);
    } else {
      F::decode(FullUnit<F::kBytes>{p}, out);
    }
  } else {
    F::decode(row + v / 2 * F::kBytes, static_cast<int>(v % 2), out);
  }
}

// The bytes of a row's unit v start at v * kUnitBytes<F> (a K-quant's second half inside its
// super-block: for prefetching only).
template <typename F>
constexpr int64_t kUnitBytes = F::kBlocks == 1 ? kUnit * F::kBytes : F::kBytes / 2;

// The input rows quantized per 32 values, in units laid out as the weights': for row r and
// unit v, 128 codes in order (zero past the row's end), and dx and dx * the sum of the codes
// per lane.
struct QuantizedRows {
  int64_t blocks, units;
  int8_t* codes;  // [rows, units, 128]
  float* scale;   // [rows, units, 8]
  float* sum;     // [rows, units, 8]
};

// Held per calling thread and reused: a small product's time is a few microseconds, which
// three allocations of tensors would add to.
thread_local std::vector<__m256i> quantized_storage;

PAGODA_INLINE float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

PAGODA_INLINE int32_t sum8(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
}

template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t rows = x.size(0), blocks = x.size(1) / kBlock;
  const int64_t units = (blocks + kUnit - 1) / kUnit;
  const int64_t cells = rows * units;  // 32-byte units: 4 of codes, 1 of dx, 1 of sums
  quantized_storage.resize(cells * 6);
  int8_t* codes = reinterpret_cast<int8_t*>(quantized_storage.data());
  float* scale = reinterpret_cast<float*>(codes + cells * kUnitValues);
  float* sum = scale + cells * 8;
  const QuantizedRows q{blocks, units, codes, scale, sum};
  if (blocks % kUnit != 0) {  // the last unit of each row part-filled: zeros past the end
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t last = r * units + units - 1;
      std::memset(codes + last * kUnitValues, 0, kUnitValues);
      std::memset(scale + last * 8, 0, 8 * sizeof(float));
      std::memset(sum + last * 8, 0, 8 * sizeof(float));
    }
  }
  const T* xp = x.data_ptr<T>();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* v = xp + (r * blocks + b) * kBlock;
      __m256 x8[4];
      __m256 m = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        x8[j] = load8(v + 8 * j);
        m = _mm256_max_ps(m, _mm256_and_ps(x8[j], abs_mask));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      // 127 / amax by a division instruction (-ffast-math may not turn it into a product
      // with a reciprocal): the twin's value exactly, so ties such as x = amax / 2 round alike.
      const float id = amax > 0.f ? _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(127.f), _mm_set_ss(amax)))
                                  : 0.f;
      const float d = amax / 127.f;
      __m256i c[4];
      for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(x8[j], _mm256_set1_ps(id)));
      // packs interleave the 128-bit halves: [c0 lo, c1 lo, c2 lo, c3 lo | c0 hi, ...] by 4
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                                _mm256_packs_epi32(c[2], c[3]));
      const __m256i ordered =
          _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      const int64_t cell = r * units + b / kUnit, i = b % kUnit;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + cell * kUnitValues + kBlock * i),
                          ordered);
      scale[cell * 8 + i] = d;
      scale[cell * 8 + 4 + i] = d;
      sum[cell * 8 + i] = d * static_cast<float>(sum8(_mm256_add_epi32(c[0], c[1])));
      sum[cell * 8 + 4 + i] = d * static_cast<float>(sum8(_mm256_add_epi32(c[2], c[3])));
    }
  }
  return q;
}

// A block's codes q against 32 input codes x: 8 dwords, 0-3 from weights 0-15, 4-7 from
// 16-31.
template <bool kSigned>
PAGODA_INLINE __m256i block_dot(__m256i q, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (kSigned) {
    return _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)), ones);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
  }
}

// Input rows r0 .. r0 + R - 1 against weight row w over units [v0, v1), added to acc[r];
// the same units of the row at `ahead` are prefetched for a later call.
template <typename F, int R>
PAGODA_INLINE void dot_rows(const uint8_t* w, const uint8_t* ahead, const QuantizedRows& x,
                            int64_t r0, int64_t v0, int64_t v1, __m256* acc) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = acc[r];
  for (int64_t v = v0; v < v1; ++v) {
    for (int64_t line = 0; line < kUnitBytes<F>; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + v * kUnitBytes<F> + line), _MM_HINT_T0);
    }
    Unit unit;
    decode_unit<F>(w, v, x.blocks, &unit);
    for (int r = 0; r < R; ++r) {
      const int64_t rv = (r0 + r) * x.units + v;
      const uint8_t* xv = reinterpret_cast<const uint8_t*>(x.codes + rv * kUnitValues);
      const __m256i p0 = block_dot<F::kSigned>(unit.q[0], load256(xv));
      const __m256i p1 = block_dot<F::kSigned>(unit.q[1], load256(xv + 32));
      const __m256i p2 = block_dot<F::kSigned>(unit.q[2], load256(xv + 64));
      const __m256i p3 = block_dot<F::kSigned>(unit.q[3], load256(xv + 96));
      const __m256i dot = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
      const __m256 dx = _mm256_loadu_ps(x.scale + rv * 8);
      a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(unit.scale, dx), a[r]);
      if constexpr (!F::kSigned) {
        a[r] = _mm256_fmadd_ps(unit.min, _mm256_loadu_ps(x.sum + rv * 8), a[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

// What gguf_linear's order of work (quantized_linear.cpp) takes from this kernel: dot_rows
// runs over units (steps of 4 blocks), up to 4 input rows a pass, each row's sums in a
// vector of 8 floats.
constexpr int64_t kStepBlocks = kUnit;
PAGODA_INLINE int64_t steps_of(const QuantizedRows& x) { return x.units; }
using Sums = __m256;
PAGODA_INLINE Sums zero_sums() { return _mm256_setzero_ps(); }
PAGODA_INLINE float total(Sums v) { return sum8(v); }

// The dequantizer: a row's units decoded with the product's decoders, each weight written
// as scale * q + min in float32 (exact: quantized_linear.cpp says why), rounded once to the
// output type.
template <typename F>
PAGODA_INLINE void store_unit(const Unit& u, int blocks, float* out) {
  for (int i = 0; i < blocks; ++i) {
    const __m128i q0 = _mm256_castsi256_si128(u.q[i]), q1 = _mm256_extracti128_si256(u.q[i], 1);
    const __m128i parts[4] = {q0, _mm_unpackhi_epi64(q0, q0), q1, _mm_unpackhi_epi64(q1, q1)};
    for (int e = 0; e < 4; ++e) {  // weights 8e .. 8e + 7: scale and minimum lane i + 4 (e / 2)
      const __m256i wide =
          F::kSigned ? _mm256_cvtepi8_epi32(parts[e]) : _mm256_cvtepu8_epi32(parts[e]);
      const __m256i lane = _mm256_set1_epi32(i + 4 * (e / 2));
      _mm256_storeu_ps(out + kBlock * i + 8 * e,
                       _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide),
                                       _mm256_permutevar8x32_ps(u.scale, lane),
                                       _mm256_permutevar8x32_ps(u.min, lane)));
    }
  }
}

// Weight rows [begin, end) of w decoded into out's rows 0 .. end - begin - 1 ([*, k] of T).
template <typename F, typename T>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t begin, int64_t end,
                     T* out) {
  const int64_t blocks = k / kBlock, units = (blocks + kUnit - 1) / kUnit;
  at::parallel_for(begin, end, 16, [&](int64_t b, int64_t e) {
    alignas(32) float values[kUnitValues];
    for (int64_t j = b; j < e; ++j) {
      const uint8_t* wj = w + j * row_bytes;
      T* oj = out + (j - begin) * k;
      for (int64_t v = 0; v < units; ++v) {
        Unit unit;
        decode_unit<F>(wj, v, blocks, &unit);
        const int filled = static_cast<int>(std::min<int64_t>(kUnit, blocks - v * kUnit));
        if constexpr (std::is_same_v<T, float>) {
          store_unit<F>(unit, filled, oj + v * kUnitValues);
        } else {
          store_unit<F>(unit, filled, values);
          for (int64_t l = 0; l < filled * kBlock; ++l) oj[v * kUnitValues + l] = T(values[l]);
        }
      }
    }
  });
}

}  // namespace
}  // namespace pagoda
