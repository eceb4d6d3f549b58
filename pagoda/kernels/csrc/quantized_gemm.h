// The int8 GEMM's shared layout (quantized_gemm.cpp): the decoded tile a microkernel reads
// (Packed), the K-quant formats' decoding into it, and the repacked form a weight can take
// once, at load. The microkernels are in one header per instruction set,
// quantized_gemm_avx512.h and quantized_gemm_avx2.h, each including this one.

#pragma once

#include "quantized_input.h"
#include "simd.h"

#include <type_traits>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define PAGODA_GGUF_GEMM 1
#define PAGODA_GGUF_GEMM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGODA_GGUF_GEMM 1
#endif

#ifdef PAGODA_GGUF_GEMM
namespace pagoda {
namespace {

constexpr int kLanes = 16;  // output columns a vector

// One super-block of 16 weight rows (output columns), as the microkernel reads it.
template <int kSubs>
struct alignas(64) Packed {
  uint8_t q[64][64];         // [quad t][4 lane + b]: code 4t + b of column `lane`
  int32_t scale[kSubs][16];  // sub-block scales sc_j, twice as int16: sc_j | sc_j << 16
  int32_t mins[4][16];       // Q4_K: minimums mn_{2p} | mn_{2p + 1} << 16 (int16 pairs)
  float d[16], dm[16];
};

// A lane past the matrix's last row: zero scales (its codes are zeroed by the caller).
template <int kSubs>
void clear_lane(Packed<kSubs>* p, int lane) {
  for (int j = 0; j < kSubs; ++j) p->scale[j][lane] = 0;
  for (int j = 0; j < 4; ++j) p->mins[j][lane] = 0;
  p->d[lane] = p->dm[lane] = 0.f;
}

// Q4_K: [d][dmin][12 B scales and minimums][128 B nibbles]; sub-block 2m + s is the low
// (s = 0) or high nibbles of bytes 32m .. 32m + 31. w = d sc q - dmin mn.
struct Q4_K {
  static constexpr int64_t kBytes = 144;
  static constexpr int kSubs = 8, kSubValues = 32;
  static constexpr bool kMins = true;
  static void decode(const uint8_t* b, uint8_t* codes, Packed<kSubs>* p, int lane) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int m = 0; m < 4; ++m) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * m));
      _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 64 * m), _mm256_and_si256(v, mask));
      _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 64 * m + 32),
                         _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
    }
    const uint8_t* s = b + 4;
    int mn[8];
    for (int j = 0; j < 8; ++j) {
      int sc;
      if (j < 4) {
        sc = s[j] & 63;
        mn[j] = s[j + 4] & 63;
      } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      }
      p->scale[j][lane] = sc * 0x10001;
    }
    for (int j = 0; j < 4; ++j) p->mins[j][lane] = mn[2 * j] | (mn[2 * j + 1] << 16);
    p->d[lane] = f16(b);
    p->dm[lane] = -f16(b + 2);
  }
};

// Q6_K: [128 B low nibbles][64 B top 2 bits][16 x int8 scales][d]. Weight l of quarter c
// of half h (weight 128 h + 32 c + l): nibble (c < 2 ? low : high) of ql[64 h + 32 (c & 1)
// + l], bits 2c, 2c + 1 of qh[32 h + l]; w = d sc_j (q - 32) for sub-blocks j of 16.
struct Q6_K {
  static constexpr int64_t kBytes = 210;
  static constexpr int kSubs = 16, kSubValues = 16;
  static constexpr bool kMins = false;
  static void decode(const uint8_t* b, uint8_t* codes, Packed<kSubs>* p, int lane) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F), high_mask = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
      for (int c = 0; c < 4; ++c) {
        const __m256i ql =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (c & 1)));
        const __m256i low = _mm256_and_si256(
            c < 2 ? ql : _mm256_srli_epi16(ql, 4), low_mask);
        // bits 2c, 2c + 1 of qh to bits 4, 5
        const __m256i high = _mm256_and_si256(
            2 * c <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * c) : _mm256_srli_epi16(qh, 2 * c - 4),
            high_mask);
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 128 * h + 32 * c),
                           _mm256_or_si256(low, high));
      }
    }
    for (int j = 0; j < 16; ++j) {
      const uint16_t sc = static_cast<uint16_t>(static_cast<int8_t>(b[192 + j]));
      p->scale[j][lane] = static_cast<int32_t>(sc | static_cast<uint32_t>(sc) << 16);
    }
    p->d[lane] = f16(b + 208);
    p->dm[lane] = 0.f;
  }
};

// The weight is decoded kTileVectors x 16 columns by kTileSupers super-blocks at a time
// (8 x 16 x 2048 weights: 320 KB for Q4_K, 350 KB for Q6_K, kept in L2); every block of input
// rows run through the tile's columns kColumnVectors vectors at a time.
constexpr int64_t kTileVectors = 8;
constexpr int64_t kTileSupers = 8;
constexpr int kColumnVectors = 2;
constexpr int kRows = 4;

template <typename P>
struct IsPacked : std::false_type {};
template <int kSubs>
struct IsPacked<Packed<kSubs>> : std::true_type {};

// ---- The weight repacked once, at load, in a layout the microkernel reads as it is ----
//
// A repacked weight is [vectors][supers] of one struct per 16 columns and super-block, each
// vector's super-blocks consecutive; it takes about the file's bytes (Q4_K 2368 for the
// file's 2304, Q6_K 3392 for 3360). Its 64-byte code vectors hold the dword lanes Packed::q
// holds (16 columns, 4 consecutive codes a lane), two quads a vector in its low and high
// nibbles: vector kHalfQuads j + u holds, for sub-block j, quad u of the first half (low
// nibbles) and quad u of the second (high nibbles), so that one load, an and and a shift
// give a weight vector of each half. Q6_K keeps its top 2 bits in a vector a sub-block
// (bits 2e, 2e + 1: quad e of the sub-block). Scales and minimums are bytes per lane, d and
// dm float16 per lane (Q4_K's dm = -dmin: the sign flipped). A lane past the matrix's last
// row is zeros.

struct alignas(64) RepackedQ4_K {
  uint8_t q[32][64];
  uint8_t scale[8][16];  // sc_j of each lane
  uint8_t mins[4][32];   // [p][2 lane + i]: mn_{2p + i}
  uint16_t d[16], dm[16];
};
static_assert(sizeof(RepackedQ4_K) == 2368);

struct alignas(64) RepackedQ6_K {
  uint8_t q[32][64];
  uint8_t high[16][64];  // [j][4 lane + b]: bits 2e, 2e + 1 the top 2 bits of quad 4j + e's
  int8_t scale[16][16];
  uint16_t d[16];
};
static_assert(sizeof(RepackedQ6_K) == 3392);

template <typename F>
struct RepackedOf;
template <>
struct RepackedOf<Q4_K> {
  using T = RepackedQ4_K;
};
template <>
struct RepackedOf<Q6_K> {
  using T = RepackedQ6_K;
};

}  // namespace
}  // namespace pagoda
#endif
