// Matrix products with a weight kept in its GGUF block form: torch.ops.pagoda.gguf_linear.
// The PyTorch twin that defines what it computes: pagoda/model/ops/quantized_linear.py.
//
// As llama.cpp does, the input rows are quantized to int8 per 32 values (scale dx = max|x| /
// 127) and the weights' codes are dotted with them by VNNI instructions (dpbusd: 64 byte
// products summed in fours). The weight is read once for up to 8 input rows; its bytes are
// what the GGUF file holds (0.56 bytes a weight for Q4_K, 0.82 for Q6_K, 1.06 for Q8_0), so
// a decode step, whose time is reading the weights, reads no more than the file's size.
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

#include "simd.h"

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace pagoda {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define PAGODA_GGUF_KERNELS 1

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

// The weight is read in chunks of kChunkRows rows; for more than one input row, each chunk
// in slices of kChunkGroups groups, and every slice in passes of up to kMaxRowsPerPass input
// rows, so that a pass's inputs (8 rows of 2048 values: 22 KB) stay in the L1 cache while
// the chunk's rows go by, and its weight bytes in L2 for the next pass. Each weight group
// is decoded once a pass: passes of 8 rows measured faster than decoding a chunk once into
// a buffer that every pass reads.
constexpr int64_t kChunkRows = 16;
constexpr int64_t kChunkGroups = 8;
// The weight streams from memory (a decode step reads every byte of it once): the hardware's
// prefetcher alone left the loop waiting on it, at about 24 GB/s for Q4_K where the copy
// bandwidth is 33; requesting each group's cache lines this many bytes (rounded up to whole
// weight rows) before they are used brings it to about 30.
constexpr int64_t kPrefetchBytes = 2048;

template <typename F>
void gguf_linear_impl(const QuantizedRows& x, int64_t rows, const at::Tensor& w,
                      at::Tensor& out) {
  const int64_t n = w.size(0), row_bytes = w.size(1), groups = x.groups;
  const int64_t slice = rows == 1 ? groups : kChunkGroups;
  // dot_rows prefetches the same groups of the weight row at least kPrefetchBytes below
  const int64_t ahead =
      row_bytes * std::max<int64_t>(1, (kPrefetchBytes + row_bytes - 1) / row_bytes);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // float32, or bfloat16 rounded from the same float32 sum (a decode step's projections
  // then need no conversion of their own)
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  at::BFloat16* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(kChunkRows * rows);  // [weight row of the chunk, input row]
    for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
      const int64_t c1 = std::min(end, c0 + kChunkRows);
      std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
      for (int64_t g0 = 0; g0 < groups; g0 += slice) {
        const int64_t g1 = std::min(groups, g0 + slice);
        for (int64_t r0 = 0; r0 < rows; r0 += kMaxRowsPerPass) {
          const int64_t pass = std::min<int64_t>(rows - r0, kMaxRowsPerPass);
          for (int64_t j = c0; j < c1; ++j) {
            __m512* a = &acc[(j - c0) * rows + r0];
            const uint8_t* wj = wp + j * row_bytes;
            switch (pass) {
#define PAGODA_ROWS(R) \
  case R:              \
    dot_rows<F, R>(wj, wj + ahead, x, r0, g0, g1, a); \
    break;
              PAGODA_ROWS(1) PAGODA_ROWS(2) PAGODA_ROWS(3) PAGODA_ROWS(4)
              PAGODA_ROWS(5) PAGODA_ROWS(6) PAGODA_ROWS(7) PAGODA_ROWS(8)
#undef PAGODA_ROWS
            }
          }
        }
      }
      for (int64_t j = c0; j < c1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
          const float sum = _mm512_reduce_add_ps(acc[(j - c0) * rows + r]);
          if (bf16) {
            ob[r * n + j] = at::BFloat16(sum);
          } else {
            of[r * n + j] = sum;
          }
        }
      }
    }
  });
}

// Format name -> (bytes per block, weights per block, the product).
struct FormatEntry {
  const char* name;
  int64_t bytes, weights;
  void (*run)(const QuantizedRows&, int64_t, const at::Tensor&, at::Tensor&);
};

template <typename F>
constexpr FormatEntry entry(const char* name) {
  return {name, F::kBytes, F::kBlocks * kBlock, &gguf_linear_impl<F>};
}

const FormatEntry kFormats[] = {
    entry<Q8_0>("Q8_0"), entry<Q4_0>("Q4_0"), entry<Q4_1>("Q4_1"), entry<Q5_0>("Q5_0"),
    entry<Q5_1>("Q5_1"), entry<Q4_K>("Q4_K"), entry<Q5_K>("Q5_K"), entry<Q6_K>("Q6_K"),
};

}  // namespace
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGODA_GGUF_KERNELS 1
#define PAGODA_GGUF_AVX2 1

// Without AVX-512 (an AVX2 + FMA + F16C CPU): the same products in 256-bit registers. A
// unit of 4 blocks of 32 weights (half a K-quant super-block, or 4 consecutive legacy
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

// The weight is read in chunks of kChunkRows rows; for more than one input row, each chunk
// in slices of kChunkUnits units, and every slice in passes of up to kMaxRowsPerPass input
// rows, so that a pass's inputs stay in the L1 cache while the chunk's rows go by, and its
// weight bytes in L2 for the next pass.
constexpr int64_t kChunkRows = 16;
constexpr int64_t kChunkUnits = 16;
// Each unit's cache lines are requested this many bytes (rounded up to whole weight rows)
// before they are used, as the AVX-512 kernel does.
constexpr int64_t kPrefetchBytes = 2048;

template <typename F>
void gguf_linear_impl(const QuantizedRows& x, int64_t rows, const at::Tensor& w,
                      at::Tensor& out) {
  const int64_t n = w.size(0), row_bytes = w.size(1), units = x.units;
  const int64_t slice = rows == 1 ? units : kChunkUnits;
  const int64_t ahead =
      row_bytes * std::max<int64_t>(1, (kPrefetchBytes + row_bytes - 1) / row_bytes);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  at::BFloat16* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<__m256> acc(kChunkRows * rows);  // [weight row of the chunk, input row]
    for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
      const int64_t c1 = std::min(end, c0 + kChunkRows);
      std::fill(acc.begin(), acc.end(), _mm256_setzero_ps());
      for (int64_t v0 = 0; v0 < units; v0 += slice) {
        const int64_t v1 = std::min(units, v0 + slice);
        for (int64_t r0 = 0; r0 < rows; r0 += kMaxRowsPerPass) {
          const int64_t pass = std::min<int64_t>(rows - r0, kMaxRowsPerPass);
          for (int64_t j = c0; j < c1; ++j) {
            __m256* a = &acc[(j - c0) * rows + r0];
            const uint8_t* wj = wp + j * row_bytes;
            switch (pass) {
#define PAGODA_ROWS(R) \
  case R:              \
    dot_rows<F, R>(wj, wj + ahead, x, r0, v0, v1, a); \
    break;
              PAGODA_ROWS(1) PAGODA_ROWS(2) PAGODA_ROWS(3) PAGODA_ROWS(4)
#undef PAGODA_ROWS
            }
          }
        }
      }
      for (int64_t j = c0; j < c1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
          const float sum = sum8(acc[(j - c0) * rows + r]);
          if (bf16) {
            ob[r * n + j] = at::BFloat16(sum);
          } else {
            of[r * n + j] = sum;
          }
        }
      }
    }
  });
}

// Format name -> (bytes per block, weights per block, the product).
struct FormatEntry {
  const char* name;
  int64_t bytes, weights;
  void (*run)(const QuantizedRows&, int64_t, const at::Tensor&, at::Tensor&);
};

template <typename F>
constexpr FormatEntry entry(const char* name) {
  return {name, F::kBytes, F::kBlocks * kBlock, &gguf_linear_impl<F>};
}

const FormatEntry kFormats[] = {
    entry<Q8_0>("Q8_0"), entry<Q4_0>("Q4_0"), entry<Q4_1>("Q4_1"), entry<Q5_0>("Q5_0"),
    entry<Q5_1>("Q5_1"), entry<Q4_K>("Q4_K"), entry<Q5_K>("Q5_K"), entry<Q6_K>("Q6_K"),
};

// The dequantizer (below): a row's units decoded with the product's decoders, each weight
// written as scale * q + min in float32 (exact: see below), rounded once to the output type.
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
#endif

std::vector<std::string> gguf_linear_formats() {
  std::vector<std::string> names;
#ifdef PAGODA_GGUF_KERNELS
  for (const FormatEntry& f : kFormats) names.emplace_back(f.name);
#endif
  return names;
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                       std::optional<at::ScalarType> dtype) {
#ifdef PAGODA_GGUF_KERNELS
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kBlock == 0,
              "x must be contiguous [rows, k] with k a multiple of 32");
  const FormatEntry* f = nullptr;
  for (const FormatEntry& e : kFormats) {
    if (format == e.name) f = &e;
  }
  TORCH_CHECK(f != nullptr, "gguf_linear has no kernel for format ", format);
  const int64_t k = x.size(1);
  TORCH_CHECK(k % f->weights == 0, format, " rows hold a multiple of ", f->weights, " weights");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == k / f->weights * f->bytes,
              "w must be contiguous uint8 [n, ", k / f->weights * f->bytes, "] of ", format,
              " blocks");
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kBFloat16,
              "gguf_linear writes float32 or bfloat16");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(out_type));
  if (x.size(0) == 0) return out;
  dispatch_float_types(x, "gguf_linear", [&](auto t) {
    f->run(quantize_rows<decltype(t)>(x), x.size(0), w, out);
  });
  return out;
#else
  TORCH_CHECK(false, "gguf_linear needs a build with AVX-512 VNNI or AVX2");
#endif
}

}  // namespace pagoda

// ---------------------------------------------------------------------------------------
// Dequantization: torch.ops.pagoda.gguf_dequantize and gguf_matmul, for steps too big for
// gguf_linear. The PyTorch twin is pagoda/model/quants.py's dequantize (then a product).
//
// A step of many rows is compute-bound, where a bfloat16 GEMM beats the integer kernel; so
// the weight is decoded a tile of rows at a time into a small buffer that stays in cache
// and multiplied from there, and no full-precision copy of it is kept.

namespace pagoda {

#ifdef PAGODA_GGUF_KERNELS
namespace {
#ifndef PAGODA_GGUF_AVX2

// The dequantizer decodes a group of 8 blocks at a time with gguf_linear's decoders
// (decode_group) and writes each weight as scale * q + min in float32, rounded once to the
// output type. The twin computes d * (q - offset) (signed formats) or scale * q + min; both
// products are exact in float32 (a float16 or float16 x 6-bit scale times a code of at most
// 8 bits), and so is the sum scale * q + (-offset * scale), so the values are the twin's to
// the bit (up to the sign of a zero).

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

#endif

// Format name -> (bytes per block, weights per block, decoders into float32 and bfloat16).
struct Dequantizer {
  const char* name;
  int64_t bytes, weights;
  void (*to_float)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, float*);
  void (*to_bf16)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, at::BFloat16*);
};

template <typename F>
constexpr Dequantizer dequantizer(const char* name) {
  return {name, F::kBytes, F::kBlocks * kBlock, &dequantize_rows<F, float>,
          &dequantize_rows<F, at::BFloat16>};
}

const Dequantizer kDequantizers[] = {
    dequantizer<Q8_0>("Q8_0"), dequantizer<Q4_0>("Q4_0"), dequantizer<Q4_1>("Q4_1"),
    dequantizer<Q5_0>("Q5_0"), dequantizer<Q5_1>("Q5_1"), dequantizer<Q4_K>("Q4_K"),
    dequantizer<Q5_K>("Q5_K"), dequantizer<Q6_K>("Q6_K"),
};

// The format's entry, having checked that w is [n, k / weights * bytes] uint8 of its blocks.
const Dequantizer& checked_format(const at::Tensor& w, const std::string& format) {
  check_cpu(w, "w");
  const Dequantizer* f = nullptr;
  for (const Dequantizer& e : kDequantizers) {
    if (format == e.name) f = &e;
  }
  TORCH_CHECK(f != nullptr, "gguf_dequantize has no decoder for format ", format);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) % f->bytes == 0,
              "w must be contiguous uint8 [n, a multiple of ", f->bytes, "] of ", format,
              " blocks");
  return *f;
}

// Weight rows [begin, end) into out ([end - begin, k] contiguous, float32 or bfloat16).
void decode_into(const Dequantizer& f, const at::Tensor& w, int64_t begin, int64_t end,
                 at::Tensor& out) {
  const int64_t k = w.size(1) / f.bytes * f.weights;
  if (out.scalar_type() == at::kFloat) {
    f.to_float(w.data_ptr<uint8_t>(), w.size(1), k, begin, end, out.data_ptr<float>());
  } else {
    f.to_bf16(w.data_ptr<uint8_t>(), w.size(1), k, begin, end, out.data_ptr<at::BFloat16>());
  }
}

}  // namespace
#endif

at::Tensor gguf_dequantize(const at::Tensor& w, const std::string& format,
                           at::ScalarType dtype) {
#ifdef PAGODA_GGUF_KERNELS
  const Dequantizer& f = checked_format(w, format);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "gguf_dequantize writes float32 or bfloat16");
  at::Tensor out = at::empty({w.size(0), w.size(1) / f.bytes * f.weights},
                             w.options().dtype(dtype));
  decode_into(f, w, 0, w.size(0), out);
  return out;
#else
  TORCH_CHECK(false, "gguf_dequantize needs a build with AVX-512 VNNI or AVX2");
#endif
}

at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                       int64_t tile_rows) {
#ifdef PAGODA_GGUF_KERNELS
  check_cpu(x, "x");
  const Dequantizer& f = checked_format(w, format);
  const int64_t n = w.size(0), k = w.size(1) / f.bytes * f.weights;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [rows, ", k, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "gguf_matmul takes float32 or bfloat16");
  TORCH_CHECK(tile_rows > 0, "tile_rows must be positive");
  const int64_t tile = std::min(tile_rows, n);
  // One buffer a thread, reused by every call: a tile of tile_rows weight rows.
  static thread_local at::Tensor scratch;
  if (!scratch.defined() || scratch.scalar_type() != x.scalar_type() ||
      scratch.numel() < tile * k) {
    scratch = at::empty({tile * k}, x.options());
  }
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  for (int64_t j0 = 0; j0 < n; j0 += tile) {
    const int64_t t = std::min(tile, n - j0);
    at::Tensor weights = scratch.narrow(0, 0, t * k).view({t, k});
    decode_into(f, w, j0, j0 + t, weights);
    at::Tensor cols = out.narrow(1, j0, t);  // [rows, t], row stride n
    at::mm_out(cols, x, weights.t());
  }
  return out;
#else
  TORCH_CHECK(false, "gguf_matmul needs a build with AVX-512 VNNI or AVX2");
#endif
}

}  // namespace pagoda
