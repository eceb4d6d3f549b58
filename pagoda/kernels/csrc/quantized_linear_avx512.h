// gguf_linear's kernel and the dequantizer's decoding with AVX-512 (VNNI, BW, VL, DQ), for
// quantized_linear.cpp, which includes this header where the CPU has them. The weights'
// codes are dotted with the int8 inputs by VNNI instructions (dpbusd: 64 byte products
// summed in fours), the weight read once for up to 8 input rows.
//
// Every format comes down to groups of 8 blocks of 32 weights (a K-quant super-block, or 8
// consecutive legacy blocks) with unsigned codes q, a scale and a minimum per 16 or 32
// weights: w = scale * q + min (a signed format's offset is its minimum: Q8_0's codes are
// stored + 128, min = -128 d). A group is decoded into four 512-bit registers laid out
// across its blocks, the input rows are quantized into the same layout:
//
//   register t (0..3), dword lane i (0..7):  weights 4t .. 4t+3       of block i
//                      dword lane 8 + i:     weights 4t+16 .. 4t+19   of block i
//
// so four dpbusd leave in lane i the integer dot product of block i's first 16 weights and
// in lane 8 + i of its last 16, and one float product per group and input row scales them
// all: acc += float(dot) * (scale * dx) + min * (dx * sum of the input codes). Per block and
// input row that is half a dpbusd and half a float instruction, where one 256-bit dpbusd per
// block needed a float conversion, product and sum of its own.

#pragma once

#include "simd.h"

#include <type_traits>
#include <vector>

namespace pagoda {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroup = 8;  // blocks a group
constexpr int64_t kGroupValues = kGroup * kBlock;
constexpr int kMaxRowsPerPass = 8;

// One group of 8 blocks: w = scale * q + min, in the layout above (scale and min per lane:
// lane i for block i's first 16 weights, 8 + i for its last 16).
struct Group {
  __m512i q[4];
  __m512 scale, min;
};

// 16 dword lanes, lane L = f(L); constant-folded where f is.
template <typename Fn>
PAGODA_INLINE __m512i lanes(Fn f) {
  alignas(64) int32_t v[16];
  for (int lane = 0; lane < 16; ++lane) v[lane] = f(lane);
  return _mm512_load_si512(v);
}

inline __m512i load512(const uint8_t* p) { return _mm512_loadu_si512(p); }

// The 8 lanes of v in lanes 0-7 and again in 8-15.
PAGODA_INLINE __m512 twice(__m256 v) { return _mm512_insertf32x8(_mm512_castps256_ps512(v), v, 1); }

// The legacy formats' groups: at(i) is block i (i = 0..7); the last group of a row may hold
// fewer than 8 blocks, the others read as a block of zeros (scale 0: no NaN from bytes past
// the row; their inputs are zero too).
template <int64_t kBytes>
struct FullGroup {
  const uint8_t* p;
  PAGODA_INLINE const uint8_t* operator()(int i) const { return p + i * kBytes; }
};
alignas(64) constexpr uint8_t kZeroBlock[64] = {};
template <int64_t kBytes>
struct PartGroup {
  const uint8_t* p;
  int64_t blocks;
  PAGODA_INLINE const uint8_t* operator()(int i) const {
    return i < blocks ? p + i * kBytes : kZeroBlock;
  }
};

// The float16 at(i) + offset for blocks i = 0..7, as float32.
template <typename At>
PAGODA_INLINE __m256 f16x8(At at, int offset) {
  uint16_t h[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&h[i], at(i) + offset, 2);
  return _mm256_cvtph_ps(_mm_setr_epi16(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]));
}

// Legacy formats: the nibble bytes of 8 blocks (16, at offset) in the layout: weights 4t..
// of block i are the low nibbles of its nibble dword t, weights 4t+16.. the high ones.
template <int offset, typename At>
PAGODA_INLINE void legacy_nibbles(At at, Group* g) {
  auto load = [&](int i) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at(i) + offset));
  };
  __m512i z0 = _mm512_castsi128_si512(load(0)), z1 = _mm512_castsi128_si512(load(4));
  z0 = _mm512_inserti32x4(z0, load(1), 1);
  z1 = _mm512_inserti32x4(z1, load(5), 1);
  z0 = _mm512_inserti32x4(z0, load(2), 2);
  z1 = _mm512_inserti32x4(z1, load(6), 2);
  z0 = _mm512_inserti32x4(z0, load(3), 3);
  z1 = _mm512_inserti32x4(z1, load(7), 3);
  // z0, z1: dword 4i + t of blocks 0-3, 4-7
  const __m512i shift = lanes([](int lane) { return lane < 8 ? 0 : 4; });
  for (int t = 0; t < 4; ++t) {
    const __m512i idx = lanes([t](int lane) { return 4 * (lane % 8) + t; });
    const __m512i v = _mm512_permutex2var_epi32(z0, idx, z1);
    g->q[t] = _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi8(0x0F));
  }
}

// Legacy Q5_*: the fifth bit (bit l of the block's 32-bit qh at qh_offset is weight l's) as 16.
template <int qh_offset, typename At>
PAGODA_INLINE void legacy_fifth_bits(At at, Group* g) {
  uint32_t h[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&h[i], at(i) + qh_offset, 4);
  const __m256i h8 = _mm256_setr_epi32(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
  const __m512i qh = _mm512_inserti32x8(_mm512_castsi256_si512(h8), h8, 1);
  for (int t = 0; t < 4; ++t) {
    // lane 8e + i, byte b: weight 4 (t + 4e) + b's bit, in byte (t + 4e) / 2 of qh_i, bit
    // 4 (t % 2) + b: that byte copied to every byte of the lane, then tested
    const __m512i pick = lanes([t](int lane) {
      const int src = 4 * (lane % 4) + (t + 4 * (lane / 8)) / 2;
      return src * 0x01010101;
    });
    const __m512i bit = _mm512_set1_epi32(t % 2 == 0 ? 0x08040201 : int32_t(0x80402010));
    const __mmask64 set = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, pick), bit);
    g->q[t] = _mm512_mask_add_epi8(g->q[t], set, g->q[t], _mm512_set1_epi8(16));
  }
}

// Legacy formats: one per 32-weight block, decoded 8 blocks (a group) at a time.
struct Q8_0 {
  static constexpr int64_t kBytes = 34, kBlocks = 1;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Group* g) {
    // z[m]: blocks 2m and 2m + 1 (8 dwords each), then two rounds of two-source permutes
    auto load = [&](int i) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at(i) + 2));
    };
    __m512i z[4];
    for (int m = 0; m < 4; ++m) {
      z[m] = _mm512_inserti64x4(_mm512_castsi256_si512(load(2 * m)), load(2 * m + 1), 1);
    }
    // a[s][4 u + b]: dword {0, 4, 1, 5}[u] (s = 0) or {2, 6, 3, 7}[u] (s = 1) of block b of 4
    const __m512i pick_lo = _mm512_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28, 1, 9, 17, 25, 5, 13,
                                              21, 29);
    const __m512i pick_hi = _mm512_setr_epi32(2, 10, 18, 26, 6, 14, 22, 30, 3, 11, 19, 27, 7,
                                              15, 23, 31);
    const __m512i a0 = _mm512_permutex2var_epi32(z[0], pick_lo, z[1]);
    const __m512i a1 = _mm512_permutex2var_epi32(z[0], pick_hi, z[1]);
    const __m512i b0 = _mm512_permutex2var_epi32(z[2], pick_lo, z[3]);
    const __m512i b1 = _mm512_permutex2var_epi32(z[2], pick_hi, z[3]);
    const __m512i even = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i odd = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29,
                                          30, 31);
    const __m512i sign = _mm512_set1_epi8(char(0x80));  // int8 + 128 as uint8
    g->q[0] = _mm512_xor_si512(_mm512_permutex2var_epi32(a0, even, b0), sign);
    g->q[1] = _mm512_xor_si512(_mm512_permutex2var_epi32(a0, odd, b0), sign);
    g->q[2] = _mm512_xor_si512(_mm512_permutex2var_epi32(a1, even, b1), sign);
    g->q[3] = _mm512_xor_si512(_mm512_permutex2var_epi32(a1, odd, b1), sign);
    g->scale = twice(f16x8(at, 0));
    g->min = _mm512_mul_ps(g->scale, _mm512_set1_ps(-128.f));
  }
};

struct Q4_0 {
  static constexpr int64_t kBytes = 18, kBlocks = 1;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Group* g) {
    legacy_nibbles<2>(at, g);
    g->scale = twice(f16x8(at, 0));
    g->min = _mm512_mul_ps(g->scale, _mm512_set1_ps(-8.f));
  }
};

struct Q5_0 {
  static constexpr int64_t kBytes = 22, kBlocks = 1;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Group* g) {
    legacy_nibbles<6>(at, g);
    legacy_fifth_bits<2>(at, g);
    g->scale = twice(f16x8(at, 0));
    g->min = _mm512_mul_ps(g->scale, _mm512_set1_ps(-16.f));
  }
};

struct Q4_1 {
  static constexpr int64_t kBytes = 20, kBlocks = 1;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Group* g) {
    legacy_nibbles<4>(at, g);
    g->scale = twice(f16x8(at, 0));
    g->min = twice(f16x8(at, 2));
  }
};

struct Q5_1 {
  static constexpr int64_t kBytes = 24, kBlocks = 1;
  template <typename At>
  static PAGODA_INLINE void decode(At at, Group* g) {
    legacy_nibbles<8>(at, g);
    legacy_fifth_bits<4>(at, g);
    g->scale = twice(f16x8(at, 0));
    g->min = twice(f16x8(at, 2));
  }
};

// Q4_K and Q5_K: d, dmin and the 6-bit scales and minimums of the 8 sub-blocks.
PAGODA_INLINE void k4_scales(const uint8_t* p, Group* g) {
  // The 12 bytes at p + 4: bytes 0-3 hold scales 0-3 in their low 6 bits, 4-7 minimums 0-3;
  // scales and minimums 4-7 take their low 4 bits from the low and high nibbles of bytes
  // 8-11 and their top 2 bits from the top of bytes 0-3 and 4-7. Rearranged in one register
  // (as llama.cpp does with three words, here without leaving the vector unit) into 8 scale
  // bytes and 8 minimum bytes.
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4));
  // [s0-3, s8-11, s4-7, s8-11]: the low bits' sources; [-, s0-3, -, s4-7]: the top bits'
  const __m128i low = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7,
                                                        8, 9, 10, 11));
  const __m128i top = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1,
                                                        -1, 4, 5, 6, 7));
  // bytes 0-3 and 8-11: their low 6 bits; 4-7: the low nibble, 12-15: the high nibble
  const __m128i six = _mm_and_si128(low, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0));
  const __m128i high = _mm_and_si128(_mm_srli_epi16(low, 4), _mm_setr_epi32(0, 0, 0, 0x0f0f0f0f));
  const __m128i bits = _mm_and_si128(_mm_srli_epi16(top, 2), _mm_set1_epi8(0x30));
  const __m128i bytes = _mm_or_si128(_mm_or_si128(six, high), bits);  // scales 0-7, mins 0-7
  const __m512 v32 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
  // d and dmin, both float16, converted together
  uint32_t dd;
  std::memcpy(&dd, p, 4);
  const __m128 d = _mm_xor_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(int(dd))),
                              _mm_setr_ps(0.f, -0.f, 0.f, 0.f));  // d, -dmin
  // [d sc_0 .. d sc_7, -dmin mn_0 .. -dmin mn_7] by one product, each half then twice
  const __m512 both = _mm512_mul_ps(
      v32, _mm512_permutexvar_ps(lanes([](int lane) { return lane / 8; }),
                                 _mm512_castps128_ps512(d)));
  g->scale = _mm512_shuffle_f32x4(both, both, 0x44);
  g->min = _mm512_shuffle_f32x4(both, both, 0xEE);
}

// Q4_K's 128 nibble bytes at p: sub-block 2m + s is the low (s = 0) or high nibbles of bytes
// 32 m .. 32 m + 31.
PAGODA_INLINE void k4_nibbles(const uint8_t* p, Group* g) {
  const __m512i z0 = load512(p), z1 = load512(p + 64);
  const __m512i shift = lanes([](int lane) { return 4 * (lane % 2); });
  for (int t = 0; t < 4; ++t) {
    const __m512i idx = lanes([t](int lane) { return 8 * (lane % 8 / 2) + t + 4 * (lane / 8); });
    const __m512i v = _mm512_permutex2var_epi32(z0, idx, z1);
    g->q[t] = _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi8(0x0F));
  }
}

// Q4_K: [d][dmin][12 B scales][128 B nibbles]; w = d sc q - dmin mn.
struct Q4_K {
  static constexpr int64_t kBytes = 144, kBlocks = 8;
  static PAGODA_INLINE void decode(const uint8_t* p, Group* g) {
    k4_scales(p, g);
    k4_nibbles(p + 16, g);
  }
};

// Q5_K: [d][dmin][12 B scales][32 B fifth bits][128 B nibbles], the nibbles as Q4_K's; bit
// j of fifth-bit byte l is the fifth bit of weight l of sub-block j.
struct Q5_K {
  static constexpr int64_t kBytes = 176, kBlocks = 8;
  static PAGODA_INLINE void decode(const uint8_t* p, Group* g) {
    k4_scales(p, g);
    k4_nibbles(p + 48, g);
    const __m512i qh = _mm512_castsi256_si512(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
    // lane 8e + i: bytes 4 (t + 4e) .. + 3 of qh, their bit i rotated to bit 4
    const __m512i rotate = lanes([](int lane) { return (4 - lane % 8) & 31; });
    for (int t = 0; t < 4; ++t) {
      const __m512i idx = lanes([t](int lane) { return t + 4 * (lane / 8); });
      const __m512i bits = _mm512_rolv_epi32(_mm512_permutexvar_epi32(idx, qh), rotate);
      // q | (bits & 0x10)
      g->q[t] = _mm512_ternarylogic_epi32(g->q[t], bits, _mm512_set1_epi8(0x10), 0xF8);
    }
  }
};

// Q6_K: [128 B low nibbles][64 B top 2 bits][16 x int8 scales][d]. Weight l of block 4h + c
// (h: half, 128 weights; c: quarter): nibble (c < 2 ? low : high) of ql[64 h + 32 (c & 1) + l],
// bits 2c, 2c + 1 of qh[32 h + l], scale sc[8 h + 2 c + l / 16]; w = d sc (q - 32).
struct Q6_K {
  static constexpr int64_t kBytes = 210, kBlocks = 8;
  static PAGODA_INLINE void decode(const uint8_t* p, Group* g) {
    const __m512i l0 = load512(p), l1 = load512(p + 64), qh = load512(p + 128);
    const __m512i low_shift = lanes([](int lane) { return 4 * (lane % 4 / 2); });
    const __m512i high_rotate = lanes([](int lane) { return (4 - 2 * (lane % 4)) & 31; });
    for (int t = 0; t < 4; ++t) {
      const __m512i low_idx = lanes([t](int lane) {
        const int i = lane % 8, tt = t + 4 * (lane / 8);
        return 16 * (i / 4) + 8 * (i % 2) + tt;
      });
      const __m512i high_idx = lanes([t](int lane) {
        return 8 * (lane % 8 / 4) + t + 4 * (lane / 8);
      });
      const __m512i low = _mm512_and_si512(
          _mm512_srlv_epi32(_mm512_permutex2var_epi32(l0, low_idx, l1), low_shift),
          _mm512_set1_epi8(0x0F));
      const __m512i high = _mm512_rolv_epi32(_mm512_permutexvar_epi32(high_idx, qh), high_rotate);
      g->q[t] = _mm512_ternarylogic_epi32(low, high, _mm512_set1_epi8(0x30), 0xF8);
    }
    // block i's scales sc[2i] (first 16 weights) and sc[2i + 1]
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)));
    const __m512i order = lanes([](int lane) { return 2 * (lane % 8) + lane / 8; });
    g->scale = _mm512_mul_ps(_mm512_set1_ps(f16(p + 208)),
                             _mm512_cvtepi32_ps(_mm512_permutexvar_epi32(order, sc)));
    g->min = _mm512_mul_ps(g->scale, _mm512_set1_ps(-32.f));
  }
};

// Group g of a weight row of `blocks` blocks.
template <typename F>
PAGODA_INLINE void decode_group(const uint8_t* row, int64_t g, int64_t blocks, Group* out) {
  if constexpr (F::kBlocks == 1) {
    const uint8_t* p = row + g * kGroup * F::kBytes;
    if (blocks - g * kGroup < kGroup) {
      F::decode(PartGroup<F::kBytes>{p, blocks - g * kGroup}, out);
    } else {
      F::decode(FullGroup<F::kBytes>{p}, out);
    }
  } else {
    F::decode(row + g * F::kBytes, out);
  }
}

// The input rows quantized per 32 values in groups laid out as the weights': for row r and
// group g, 256 codes (zero past the row's end), dx per block and dx * the sum of the codes
// per lane.
struct QuantizedRows {
  int64_t blocks, groups;
  int8_t* codes;  // [rows, groups, 256]
  float* scale;   // [rows, groups, 8]
  float* sum;     // [rows, groups, 16]
};

// Held per calling thread and reused: a small product's time is a few microseconds, which
// three allocations of tensors would add to.
thread_local std::vector<__m512i> quantized_storage;

template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t rows = x.size(0), blocks = x.size(1) / kBlock;
  const int64_t groups = (blocks + kGroup - 1) / kGroup;
  const int64_t cells = rows * groups;  // 64-byte units: 4 of codes, 1/2 of dx, 1 of sums
  quantized_storage.resize(cells * 4 + (cells + 1) / 2 + cells);
  int8_t* codes = reinterpret_cast<int8_t*>(quantized_storage.data());
  float* sum = reinterpret_cast<float*>(codes + cells * kGroupValues);
  float* scale = sum + cells * 16;
  const QuantizedRows q{blocks, groups, codes, scale, sum};
  if (blocks % kGroup != 0) {  // the last group of each row part-filled: zeros past the end
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t last = r * groups + groups - 1;
      std::memset(codes + last * kGroupValues, 0, kGroupValues);
      std::memset(scale + last * 8, 0, 8 * sizeof(float));
      std::memset(sum + last * 16, 0, 16 * sizeof(float));
    }
  }
  const T* xp = x.data_ptr<T>();
  // dword t of a block's first (second) 16 codes goes to register t, lane i (8 + i)
  const __m128i to_lanes = _mm_setr_epi32(0, 64, 128, 192);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* v = xp + (r * blocks + b) * kBlock;
      const __m512 v0 = load16(v), v1 = load16(v + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      // 127 / amax by a division instruction (-ffast-math may not turn it into a product
      // with a reciprocal): the twin's value exactly, so ties such as x = amax / 2 round alike.
      const float id = amax > 0.f ? _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(127.f), _mm_set_ss(amax)))
                                  : 0.f;
      const float d = amax / 127.f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
      const int64_t g = r * groups + b / kGroup, i = b % kGroup;
      int8_t* c = codes + g * kGroupValues + 4 * i;
      _mm_i32scatter_epi32(c, to_lanes, _mm512_cvtsepi32_epi8(q0), 1);
      _mm_i32scatter_epi32(c + 32, to_lanes, _mm512_cvtsepi32_epi8(q1), 1);
      scale[g * 8 + i] = d;
      sum[g * 16 + i] = d * static_cast<float>(_mm512_reduce_add_epi32(q0));
      sum[g * 16 + 8 + i] = d * static_cast<float>(_mm512_reduce_add_epi32(q1));
    }
  }
  return q;
}

// Input rows r0 .. r0 + R - 1 against weight row w over groups [g0, g1), added to acc[r];
// the same groups of the row at `ahead` are prefetched for a later call.
template <typename F, int R>
PAGODA_INLINE void dot_rows(const uint8_t* w, const uint8_t* ahead, const QuantizedRows& x,
                            int64_t r0, int64_t g0, int64_t g1, __m512* acc) {
  constexpr int64_t kGroupBytes = F::kBlocks == 1 ? kGroup * F::kBytes : F::kBytes;
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = acc[r];
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t line = 0; line < kGroupBytes; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + g * kGroupBytes + line), _MM_HINT_T0);
    }
    Group grp;
    decode_group<F>(w, g, x.blocks, &grp);
    for (int r = 0; r < R; ++r) {
      const int64_t rg = (r0 + r) * x.groups + g;
      const int8_t* xg = x.codes + rg * kGroupValues;
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), grp.q[0], _mm512_loadu_si512(xg));
      dot = _mm512_dpbusd_epi32(dot, grp.q[1], _mm512_loadu_si512(xg + 64));
      dot = _mm512_dpbusd_epi32(dot, grp.q[2], _mm512_loadu_si512(xg + 128));
      dot = _mm512_dpbusd_epi32(dot, grp.q[3], _mm512_loadu_si512(xg + 192));
      const __m512 dx = _mm512_broadcast_f32x8(_mm256_loadu_ps(x.scale + rg * 8));
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(grp.scale, dx), a[r]);
      a[r] = _mm512_fmadd_ps(grp.min, _mm512_loadu_ps(x.sum + rg * 16), a[r]);
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

// What gguf_linear's order of work (quantized_linear.cpp) takes from this kernel: dot_rows
// runs over groups (steps of 8 blocks), up to 8 input rows a pass, each row's sums in a
// vector of 16 floats.
constexpr int64_t kStepBlocks = kGroup;
PAGODA_INLINE int64_t steps_of(const QuantizedRows& x) { return x.groups; }
using Sums = __m512;
PAGODA_INLINE Sums zero_sums() { return _mm512_setzero_ps(); }
PAGODA_INLINE float total(Sums v) { return _mm512_reduce_add_ps(v); }

// The dequantizer decodes a group of 8 blocks at a time with gguf_linear's decoders
// (decode_group) and writes each weight as scale * q + min in float32, rounded once to the
// output type (exact: quantized_linear.cpp says why).

// Distinct codes of a format: the bfloat16 output of formats with at most 32 takes each
// block's values from a table of its 16 or 32 possible weights instead of converting every
// weight (one permute per 32 weights).
template <typename F> constexpr int kCodes = 0;
template <> constexpr int kCodes<Q8_0> = 256;
template <> constexpr int kCodes<Q4_0> = 16;
template <> constexpr int kCodes<Q4_1> = 16;
template <> constexpr int kCodes<Q5_0> = 32;
template <> constexpr int kCodes<Q5_1> = 32;
template <> constexpr int kCodes<Q4_K> = 16;
template <> constexpr int kCodes<Q5_K> = 32;
template <> constexpr int kCodes<Q6_K> = 64;

// A group's codes in weight order: register o holds blocks 2o and 2o + 1 (32 bytes each).
// Dword m of block i is in register m % 4 of the group, lane i + 8 (m / 4).
PAGODA_INLINE void in_order(const Group& g, __m512i* out) {
  for (int o = 0; o < 4; ++o) {
    // dword 8b + m of the output: from q[m % 4], lane 2o + b + 8 (m / 4); the first permute
    // fills the dwords with m % 4 < 2 (from q0, q1), the second those with m % 4 >= 2
    const __m512i idx = lanes([o](int p) {
      const int b = p / 8, m = p % 8;
      return 16 * (m % 2) + 2 * o + b + 8 * (m / 4);
    });
    const __m512i low = _mm512_permutex2var_epi32(g.q[0], idx, g.q[1]);
    const __m512i high = _mm512_permutex2var_epi32(g.q[2], idx, g.q[3]);
    out[o] = _mm512_mask_blend_epi32(0xCCCC, low, high);
  }
}

PAGODA_INLINE __m512 lane_of(__m512 v, int lane) {
  return _mm512_permutexvar_ps(_mm512_set1_epi32(lane), v);
}

// The group's first `blocks` blocks (8 but in a row's last legacy group), block i's 32
// weights to out + 32 i.
template <typename F, typename T>
PAGODA_INLINE void store_group(const Group& g, int blocks, T* out) {
  alignas(64) uint8_t codes[kGroupValues];
  {
    __m512i ordered[4];
    in_order(g, ordered);
    for (int o = 0; o < 4; ++o) _mm512_store_si512(codes + 64 * o, ordered[o]);
  }
  for (int i = 0; i < blocks; ++i) {
    const uint8_t* q = codes + kBlock * i;
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<T, at::BFloat16> && kCodes<F> <= 32) {
      // the block's possible weights as a bfloat16 table (one scale and minimum a block)
      const __m512 scale = lane_of(g.scale, i), min = lane_of(g.min, i);
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512 low = _mm512_fmadd_ps(iota, scale, min);
      const __m512 high =
          kCodes<F> > 16
              ? _mm512_fmadd_ps(_mm512_add_ps(iota, _mm512_set1_ps(16.f)), scale, min)
              : low;
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(high, low);
      const __m512i index =
          _mm512_cvtepu8_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(q)));
      _mm512_storeu_si512(out + kBlock * i, _mm512_permutexvar_epi16(index, table));
      continue;
    }
#endif
    for (int h = 0; h < 2; ++h) {  // weights 16h .. 16h + 15: scale and minimum lane i + 8h
      const __m512 v = _mm512_cvtepi32_ps(
          _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * h))));
      store16(out + kBlock * i + 16 * h,
              _mm512_fmadd_ps(v, lane_of(g.scale, i + 8 * h), lane_of(g.min, i + 8 * h)));
    }
  }
}

// Weight rows [begin, end) of w decoded into out's rows 0 .. end - begin - 1 ([*, k] of T).
template <typename F, typename T>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t begin, int64_t end,
                     T* out) {
  const int64_t blocks = k / kBlock, groups = (blocks + kGroup - 1) / kGroup;
  at::parallel_for(begin, end, 16, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const uint8_t* wj = w + j * row_bytes;
      T* oj = out + (j - begin) * k;
      for (int64_t g = 0; g < groups; ++g) {
        Group grp;
        decode_group<F>(wj, g, blocks, &grp);
        store_group<F>(grp, static_cast<int>(std::min<int64_t>(kGroup, blocks - g * kGroup)),
                       oj + g * kGroupValues);
      }
    }
  });
}

}  // namespace
}  // namespace pagoda
