// Matrix products of many rows with a weight kept in its GGUF K-quant blocks:
// torch.ops.pagoda.gguf_gemm. The PyTorch twin that defines what it computes:
// pagoda/model/ops/quantized_gemm.py.
//
// A step of many rows (a prompt, a decode step of many sequences) is compute-bound. A
// bfloat16 GEMM does 32 products an instruction (vdpbf16ps); vpdpbusd does 64 int8 ones, so,
// as llama.cpp does, the input rows are quantized to int8 per 256 values (one float scale
// dx per 256, and sums of their codes) and multiplied by the weights' integer codes.
// A K-quant super-block of 256 weights is w = d * sc_j * q + dm * mn_j for sub-blocks j of
// 16 or 32 weights (Q4_K: dm = -dmin, mn_j its 6-bit minimum; Q6_K: q - 32 with dm = d,
// mn_j = -32 sc_j), so its dot product with an input super-block is
//
//   dx * (d * sum_j sc_j * sum_{l in j} q_l x_l + dm * sum_j mn_j * sum_{l in j} x_l)
//
// with both sums over j in integers: one conversion to float per super-block, row and
// column. The weight is decoded a tile (kTileVectors x 16 columns, kTileSupers super-blocks)
// at a time into a small reused buffer laid out for the microkernel (16 columns in the
// dword lanes, 4 consecutive codes a lane), and no other copy of it is kept.
//
// gguf_repack lays a weight out once, at load, in a compact form of that layout (about the
// file's bytes), and gguf_gemm_repacked computes from it what gguf_gemm computes from the
// blocks, bit for bit, with no tile decoded a call: at every row count, one included.
// gguf_repacked_rows reads rows back from that form as the file's decoding gives them, for
// a tied embedding, whose table is the repacked output layer.
//
// On a CPU with AVX2 (+ FMA, F16C) but no AVX-512 the same tiles run an AVX2 microkernel
// (maddubs: u8 x s8 pairs into int16, then madd with the scales), 8 columns a vector, to
// the same integer totals and float operations, and gguf_gemm_repacked unpacks the repacked
// form in registers as the AVX-512 one does.

#include "quantized_input.h"
#include "simd.h"

#include <string>
#include <type_traits>
#include <vector>

namespace pagoda {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define PAGODA_GGUF_GEMM 1
#define PAGODA_GGUF_GEMM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGODA_GGUF_GEMM 1
#endif

#ifdef PAGODA_GGUF_GEMM
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

#ifdef PAGODA_GGUF_GEMM_AVX512
// codes[lane] (256 codes of column `lane` in weight order) into p->q: 4 transposes of 16 x 16
// dwords (rows: the columns, dwords: the quads), in 4 rounds of 16 shuffles each.
template <int kSubs>
PAGODA_INLINE void put_codes(const uint8_t (*codes)[kSuper], Packed<kSubs>* p) {
  for (int m = 0; m < 4; ++m) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(codes[i] + 64 * m);
    // t[2k], t[2k + 1], 128-bit lane L: rows 2k, 2k + 1 at dwords 4L, 4L + 1 / 4L + 2, 4L + 3
    for (int k = 0; k < 8; ++k) {
      t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    // r[4g + e], lane L: rows 4g .. 4g + 3 at dword 4L + e
    for (int g = 0; g < 4; ++g) {
      r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
      r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
      r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
      r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    // dword 4L + e of every row: lane L of r[e], r[4 + e], r[8 + e], r[12 + e]
    for (int e = 0; e < 4; ++e) {
      const __m512i d0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44);
      const __m512i d1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xEE);
      const __m512i d2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44);
      const __m512i d3 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xEE);
      uint8_t(*q)[64] = p->q + 16 * m;
      _mm512_store_si512(q[e], _mm512_shuffle_i32x4(d0, d2, 0x88));
      _mm512_store_si512(q[4 + e], _mm512_shuffle_i32x4(d0, d2, 0xDD));
      _mm512_store_si512(q[8 + e], _mm512_shuffle_i32x4(d1, d3, 0x88));
      _mm512_store_si512(q[12 + e], _mm512_shuffle_i32x4(d1, d3, 0xDD));
    }
  }
}
#else
// codes[lane] (256 codes of column `lane` in weight order) into p->q: 8 x 8 transposes of
// dwords (rows: 8 of the columns, dwords: 8 of the quads).
template <int kSubs>
PAGODA_INLINE void put_codes(const uint8_t (*codes)[kSuper], Packed<kSubs>* p) {
  for (int g = 0; g < 2; ++g) {
    for (int m = 0; m < 8; ++m) {
      __m256i r[8], t[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes[8 * g + i] + 32 * m));
      }
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
      // quad 8m + e of rows 0 .. 3 in r[e]'s low 128 bits (4 .. 7: quad 8m + 4 + e), rows
      // 4 .. 7 in r[4 + e]'s
      for (int e = 0; e < 4; ++e) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(p->q[8 * m + e] + 32 * g),
                           _mm256_permute2x128_si256(r[e], r[4 + e], 0x20));
        _mm256_store_si256(reinterpret_cast<__m256i*>(p->q[8 * m + 4 + e] + 32 * g),
                           _mm256_permute2x128_si256(r[e], r[4 + e], 0x31));
      }
    }
  }
}
#endif

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

#ifdef PAGODA_GGUF_GEMM_AVX512
// Rows r0 .. r0 + R - 1 of the input against column vectors p[0 .. NC - 1] (each at super-
// blocks s0 .. s0 + supers - 1, `stride` packed super-blocks apart) into acc[c][r].
//
// vpmulld takes three cycles of the pipe vpdpbusd runs in (measured on Zen 4), so a sub-block's
// scale is not applied by one: each half of a sub-block is summed into its own int32 lanes,
// which hold it exactly as int16 (Q4_K: 16 x 15 x 127 = 30480; Q6_K's halves of 8 start at
// their offset, -32 x the codes' sum, and stay within 8 x 32 x 127 = 32512), the two halves go
// into one dword's 16-bit halves (a shift and a blend, in other pipes) and one vpdpwssd with
// the scale pair adds sc_j times both to the total.
template <typename F, int NC, int R>
PAGODA_INLINE void microkernel(const Packed<F::kSubs>* p, int64_t stride, int64_t supers,
                               const InputRows& x, int64_t r0, int64_t s0, __m512* acc) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  for (int i = 0; i < NC * R; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t k = x.supers * kSuper;
  for (int64_t s = 0; s < supers; ++s) {
    const int64_t sb = s0 + s;
    const int8_t* xc[R];
    const int32_t* off[R];
    for (int r = 0; r < R; ++r) {
      xc[r] = x.codes + (r0 + r) * k + sb * kSuper;
      off[r] = x.off8 + (r0 + r) * x.supers * 32 + sb * 32;
    }
    __m512i total[NC][R];
    for (int c = 0; c < NC; ++c)
      for (int r = 0; r < R; ++r) total[c][r] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int j = 0; j < F::kSubs; ++j) {
      __m512i half[2][NC][R];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int g = 2 * j + h;  // the half's group of F::kSubValues / 2 values
        for (int r = 0; r < R; ++r) {
          const __m512i start =
              F::kMins ? _mm512_setzero_si512() : _mm512_set1_epi32(off[r][g]);
          for (int c = 0; c < NC; ++c) half[h][c][r] = start;
        }
#pragma GCC unroll 8
        for (int u = 0; u < kHalfQuads; ++u) {
          const int t = g * kHalfQuads + u;
          __m512i w[NC];
          for (int c = 0; c < NC; ++c) w[c] = _mm512_load_si512(p[c * stride + s].q[t]);
          for (int r = 0; r < R; ++r) {
            int32_t four;
            std::memcpy(&four, xc[r] + 4 * t, 4);
            const __m512i xb = _mm512_set1_epi32(four);
            for (int c = 0; c < NC; ++c) {
              half[h][c][r] = _mm512_dpbusd_epi32(half[h][c][r], w[c], xb);
            }
          }
        }
      }
      for (int c = 0; c < NC; ++c) {
        const __m512i sc = _mm512_load_si512(p[c * stride + s].scale[j]);
        for (int r = 0; r < R; ++r) {
          const __m512i both = _mm512_mask_blend_epi16(
              0xAAAAAAAA, half[0][c][r], _mm512_slli_epi32(half[1][c][r], 16));
          total[c][r] = _mm512_dpwssd_epi32(total[c][r], both, sc);
        }
      }
    }
    for (int c = 0; c < NC; ++c) {
      const Packed<F::kSubs>& pc = p[c * stride + s];
      const __m512 d = _mm512_load_ps(pc.d);
      for (int r = 0; r < R; ++r) {
        const __m512 dx = _mm512_set1_ps(x.scale[(r0 + r) * x.supers + sb]);
        __m512 v = _mm512_mul_ps(d, _mm512_cvtepi32_ps(total[c][r]));
        if constexpr (F::kMins) {
          const int16_t* s32 = x.sum32 + (r0 + r) * x.supers * 8 + sb * 8;
          __m512i m = _mm512_setzero_si512();
          for (int q = 0; q < 4; ++q) {
            int32_t pair;
            std::memcpy(&pair, s32 + 2 * q, 4);
            m = _mm512_dpwssd_epi32(m, _mm512_load_si512(pc.mins[q]), _mm512_set1_epi32(pair));
          }
          v = _mm512_fmadd_ps(_mm512_load_ps(pc.dm), _mm512_cvtepi32_ps(m), v);
        }
        acc[c * R + r] = _mm512_fmadd_ps(v, dx, acc[c * R + r]);
      }
    }
  }
}

#else
// A super-block's integer totals of R rows (8 columns) added to acc[r] as floats: dx (d
// total + dm sum_q mins_q . the inputs' sub-block sums), the operations of every kernel, in
// their order. mins and dm are Q4_K's (mins: the minimums' int16 pairs of 4 sub-block pairs).
template <typename F, int R>
PAGODA_INLINE void add_super_block(const __m256i* total, __m256 d, __m256 dm, const __m256i* mins,
                                   const InputRows& x, int64_t r0, int64_t sb, __m256* acc) {
  for (int r = 0; r < R; ++r) {
    const __m256 dx = _mm256_set1_ps(x.scale[(r0 + r) * x.supers + sb]);
    __m256 v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(total[r]));
    if constexpr (F::kMins) {
      const int16_t* s32 = x.sum32 + (r0 + r) * x.supers * 8 + sb * 8;
      __m256i m = _mm256_setzero_si256();
      for (int q = 0; q < 4; ++q) {
        int32_t pair;
        std::memcpy(&pair, s32 + 2 * q, 4);
        m = _mm256_add_epi32(m, _mm256_madd_epi16(mins[q], _mm256_set1_epi32(pair)));
      }
      v = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(m), v);
    }
    acc[r] = _mm256_fmadd_ps(v, dx, acc[r]);
  }
}

// Rows r0 .. r0 + R - 1 of the input against a column vector's super-blocks p[0 .. supers - 1]
// (s0 .. s0 + supers - 1) into acc[h R + r]: h = 0 its columns 0 .. 7, h = 1 columns 8 .. 15.
//
// maddubs multiplies the u8 codes by the s8 inputs and adds each two products into int16
// (|2 x 63 x 127| = 16002: no saturation), and a sub-block's such pairs are summed in int16
// before one madd with the scale pair (sc_j, sc_j) adds sc_j times them into the int32 total.
// Q4_K: 16 products a half-dword, |.| <= 16 x 15 x 127 = 30480. Q6_K: the pair starts at the
// offset -32 times the inputs' sum (InputRows::off16) and ends at sum (q - 32) x of 8
// products, |.| <= 8 x 32 x 127 = 32512; the int16 adds wrap on the way there, which leaves
// the end exact. The integer totals are the AVX-512 kernel's, and so are the float operations
// on them, lane for lane.
//
// Both halves of a quad's 64 bytes against up to 3 rows: 6 maddubs for 2 weight loads and 3
// input broadcasts, where one half against 4 rows took 1 + 4 loads for 4: the loads, not the
// products, bound this loop on a Zen 3. The sub-block loop is not unrolled, so that the 6
// sums, the 2 weight vectors and the broadcast stay in registers through the products (the
// 16 registers then leave none for the totals: GCC keeps them, and the sums for their
// madd, on the stack, a load and a store each a sub-block). In the op, the two kernels
// alternating in one process at 512 rows (GMAC/s, medians of 5): Q4_K 8192 x 2048 72 -> 89,
// Q6_K 2048 x 8192 58 -> 83.
template <typename F, int R>
PAGODA_INLINE void microkernel(const Packed<F::kSubs>* p, int64_t supers, const InputRows& x,
                               int64_t r0, int64_t s0, __m256* acc) {
  static_assert(R <= 3, "6 sums and 6 totals fill the registers the loop leaves");
  constexpr int kQuads = F::kSubValues / 4;  // quads of 4 codes a sub-block
  for (int i = 0; i < 2 * R; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t k = x.supers * kSuper;
  for (int64_t s = 0; s < supers; ++s) {
    const int64_t sb = s0 + s;
    const Packed<F::kSubs>& pc = p[s];
    const int8_t* xc[R];
    const int32_t* off[R];
    for (int r = 0; r < R; ++r) {
      xc[r] = x.codes + (r0 + r) * k + sb * kSuper;
      off[r] = x.off16 + (r0 + r) * x.supers * 16 + sb * 16;
    }
    __m256i total[2][R];
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < R; ++r) total[h][r] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int j = 0; j < F::kSubs; ++j) {
      __m256i sum[2][R];
      if constexpr (!F::kMins) {
        for (int r = 0; r < R; ++r) sum[0][r] = sum[1][r] = _mm256_set1_epi32(off[r][j]);
      }
#pragma GCC unroll 8
      for (int u = 0; u < kQuads; ++u) {
        const int t = j * kQuads + u;
        __m256i w[2] = {_mm256_load_si256(reinterpret_cast<const __m256i*>(pc.q[t])),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(pc.q[t] + 32))};
        asm("" : "+x"(w[0]), "+x"(w[1]));  // loaded once, not again for every row
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, xc[r] + 4 * t, 4);
          const __m256i xb = _mm256_set1_epi32(four);
          for (int h = 0; h < 2; ++h) {
            const __m256i product = _mm256_maddubs_epi16(w[h], xb);
            // Q4_K's sums start at the first product (no register held at zero)
            sum[h][r] = F::kMins && u == 0 ? product : _mm256_add_epi16(sum[h][r], product);
            // An empty asm keeps each running sum in its register: the int16 adds are
            // associative, and GCC otherwise reordered the unrolled sub-blocks into products
            // first, spilled to the stack (~440 stack accesses a super-block), which made the
            // Q4_K GEMM 1.4-1.5x slower on a Zen 3 at 256 rows.
            asm("" : "+x"(sum[h][r]));
          }
        }
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i sc = _mm256_load_si256(reinterpret_cast<const __m256i*>(pc.scale[j] + 8 * h));
        for (int r = 0; r < R; ++r) {
          total[h][r] = _mm256_add_epi32(total[h][r], _mm256_madd_epi16(sum[h][r], sc));
          asm("" : "+x"(total[h][r]));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256i mins[4] = {};
      __m256 dm = _mm256_setzero_ps();
      if constexpr (F::kMins) {
        for (int q = 0; q < 4; ++q) {
          mins[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pc.mins[q] + 8 * h));
        }
        dm = _mm256_load_ps(pc.dm + 8 * h);
      }
      add_super_block<F, R>(total[h], _mm256_load_ps(pc.d + 8 * h), dm, mins, x, r0, sb,
                            acc + h * R);
    }
  }
}
#endif

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

// Input rows a block of the microkernel takes from P: kRows, but 3 for the AVX2 kernel on
// decoded tiles, whose blocks are a whole column vector wide.
template <typename P>
constexpr int block_rows() {
#ifdef PAGODA_GGUF_GEMM_AVX512
  return kRows;
#else
  return IsPacked<P>::value ? 3 : kRows;
#endif
}

#ifdef PAGODA_GGUF_GEMM_AVX512
template <typename F, int NC, int R, typename P>
void run_block(const P* p, int64_t stride, int64_t supers, const InputRows& x, int64_t r0,
               int64_t s0, int64_t v0, int64_t n, bool add, float* out) {
  __m512 acc[NC * R];
  microkernel<F, NC, R>(p, stride, supers, x, r0, s0, acc);
  for (int c = 0; c < NC; ++c) {
    const int64_t col = (v0 + c) * kLanes;
    const __mmask16 mask =
        n - col >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (n - col)) - 1);
    for (int r = 0; r < R; ++r) {
      float* o = out + (r0 + r) * n + col;
      __m512 v = acc[c * R + r];
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, o));
      _mm512_mask_storeu_ps(o, mask, v);
    }
  }
}
#else
// acc[r] into (or, with add, added to) the output row r0 + r at columns col .. col + 7 (those
// below n).
template <int R>
PAGODA_INLINE void store_columns(const __m256* acc, int64_t r0, int64_t col, int64_t n, bool add,
                                 float* out) {
  const int64_t count = std::min<int64_t>(8, n - col);
  if (count == 8) {
    for (int r = 0; r < R; ++r) {
      float* o = out + (r0 + r) * n + col;
      _mm256_storeu_ps(o, add ? _mm256_add_ps(acc[r], _mm256_loadu_ps(o)) : acc[r]);
    }
    return;
  }
  const __m256i mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int r = 0; r < R; ++r) {
    float* o = out + (r0 + r) * n + col;
    __m256 v = acc[r];
    if (add) v = _mm256_add_ps(v, _mm256_maskload_ps(o, mask));
    _mm256_maskstore_ps(o, mask, v);
  }
}

template <typename F, int NC, int R, typename P>
void run_block(const P* p, int64_t stride, int64_t supers, const InputRows& x, int64_t r0,
               int64_t s0, int64_t v0, int64_t n, bool add, float* out) {
  for (int c = 0; c < NC; ++c) {
    const int64_t col = (v0 + c) * kLanes;
    if constexpr (IsPacked<P>::value) {
      __m256 acc[2 * R];
      microkernel<F, R>(p + c * stride, supers, x, r0, s0, acc);
      store_columns<R>(acc, r0, col, n, add, out);
      if (col + 8 < n) store_columns<R>(acc + R, r0, col + 8, n, add, out);
    } else {
      for (int half = 0; half < 2 && col + 8 * half < n; ++half) {
        __m256 acc[R];
        microkernel<F, R>(p + c * stride, supers, x, r0, s0, half, acc);
        store_columns<R>(acc, r0, col + 8 * half, n, add, out);
      }
    }
  }
}
#endif

// P: Packed (a tile decoded or expanded) or the repacked form, read as it is; rows at most
// block_rows<P>().
template <typename F, int NC, typename P>
void run_rows(const P* p, int64_t stride, int64_t supers, const InputRows& x, int64_t r0,
              int rows, int64_t s0, int64_t v0, int64_t n, bool add, float* out) {
  static_assert(block_rows<P>() == 3 || block_rows<P>() == 4);
  switch (rows) {
    case 1: run_block<F, NC, 1>(p, stride, supers, x, r0, s0, v0, n, add, out); break;
    case 2: run_block<F, NC, 2>(p, stride, supers, x, r0, s0, v0, n, add, out); break;
    case 3: run_block<F, NC, 3>(p, stride, supers, x, r0, s0, v0, n, add, out); break;
    default:
      if constexpr (block_rows<P>() == 4) {
        run_block<F, NC, 4>(p, stride, supers, x, r0, s0, v0, n, add, out);
      }
      break;
  }
}

template <typename F>
void gemm_impl(const InputRows& x, int64_t rows, const at::Tensor& w, at::Tensor& out) {
  using P = Packed<F::kSubs>;
  constexpr int kBlock = block_rows<P>();
  const int64_t n = w.size(0), row_bytes = w.size(1), supers = x.supers;
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  const int64_t tiles = (vectors + kTileVectors - 1) / kTileVectors;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<P> buffer;
    buffer.resize(kTileVectors * kTileSupers);
    alignas(64) uint8_t codes[kLanes][kSuper];  // a super-block of 16 columns in weight order
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t v0 = tile * kTileVectors, v1 = std::min(vectors, v0 + kTileVectors);
      for (int64_t s0 = 0; s0 < supers; s0 += kTileSupers) {
        const int64_t s1 = std::min(supers, s0 + kTileSupers), span = s1 - s0;
        for (int64_t v = v0; v < v1; ++v) {
          for (int64_t s = s0; s < s1; ++s) {
            P* p = &buffer[(v - v0) * span + (s - s0)];
            for (int lane = 0; lane < kLanes; ++lane) {
              const int64_t j = v * kLanes + lane;
              if (j < n) {
                F::decode(wp + j * row_bytes + s * F::kBytes, codes[lane], p, lane);
              } else {
                std::memset(codes[lane], 0, kSuper);
                clear_lane(p, lane);
              }
            }
            put_codes(codes, p);
          }
        }
        const bool add = s0 > 0;
        for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
          const int r = static_cast<int>(std::min<int64_t>(kBlock, rows - r0));
          int64_t v = v0;
          for (; v + kColumnVectors <= v1; v += kColumnVectors) {
            run_rows<F, kColumnVectors>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v,
                                        n, add, op);
          }
          for (; v < v1; ++v) {
            run_rows<F, 1>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v, n, add, op);
          }
        }
      }
    }
  });
}

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

inline uint16_t to_f16(float v) {
  return static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), 0), 0));
}

// One super-block of 16 columns, decoded as gguf_gemm decodes it (p), into its repacked form.
template <typename F>
void compress(const Packed<F::kSubs>& p, typename RepackedOf<F>::T* out) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  std::memset(out, 0, sizeof(*out));  // the padding too: the bytes are the twin's
  for (int j = 0; j < F::kSubs; ++j) {
    for (int u = 0; u < kHalfQuads; ++u) {
      const uint8_t* low = p.q[2 * j * kHalfQuads + u];
      const uint8_t* high = p.q[(2 * j + 1) * kHalfQuads + u];
      for (int b = 0; b < 64; ++b) {
        out->q[j * kHalfQuads + u][b] =
            static_cast<uint8_t>((low[b] & 0x0F) | (high[b] & 0x0F) << 4);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      out->scale[j][lane] = static_cast<std::remove_reference_t<decltype(out->scale[0][0])>>(
          p.scale[j][lane] & 0xFF);
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) out->d[lane] = to_f16(p.d[lane]);
  if constexpr (F::kMins) {
    for (int q = 0; q < 4; ++q) {
      for (int lane = 0; lane < kLanes; ++lane) {
        out->mins[q][2 * lane] = static_cast<uint8_t>(p.mins[q][lane] & 0xFF);
        out->mins[q][2 * lane + 1] = static_cast<uint8_t>(p.mins[q][lane] >> 16);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) out->dm[lane] = to_f16(p.dm[lane]);
  } else {
    for (int j = 0; j < F::kSubs; ++j) {
      for (int b = 0; b < 64; ++b) {
        uint8_t bits = 0;
        for (int e = 0; e < 4; ++e) bits |= ((p.q[4 * j + e][b] >> 4) & 3) << (2 * e);
        out->high[j][b] = bits;
      }
    }
  }
}

template <typename F>
void repack_impl(const at::Tensor& w, at::Tensor& out) {
  using T = typename RepackedOf<F>::T;
  const int64_t n = w.size(0), row_bytes = w.size(1), supers = row_bytes / F::kBytes;
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  T* op = reinterpret_cast<T*>(out.data_ptr<uint8_t>());
  at::parallel_for(0, vectors, 1, [&](int64_t begin, int64_t end) {
    Packed<F::kSubs> p;
    alignas(64) uint8_t codes[kLanes][kSuper];
    for (int64_t v = begin; v < end; ++v) {
      for (int64_t s = 0; s < supers; ++s) {
        std::memset(&p, 0, sizeof(p));
        for (int lane = 0; lane < kLanes; ++lane) {
          const int64_t j = v * kLanes + lane;
          if (j < n) {
            F::decode(wp + j * row_bytes + s * F::kBytes, codes[lane], &p, lane);
          } else {
            std::memset(codes[lane], 0, kSuper);
            clear_lane(&p, lane);
          }
        }
        put_codes(codes, &p);
        compress<F>(p, op + v * supers + s);
      }
    }
  });
}

// Row `lane` of a repacked super-block of 16 rows: its 256 values as the file's decoding
// computes them, (d sc_j) q + dm mn_j in float32 (both products exact, so one rounding),
// Q6_K's (d sc_j) (q - 32), rounded once to T. A tied embedding gathers its rows so, with no
// other copy kept.
template <typename F, typename T>
void unpack_row(const typename RepackedOf<F>::T& r, int lane, T* out) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  const float d = f16(reinterpret_cast<const uint8_t*>(r.d + lane));
  for (int j = 0; j < F::kSubs; ++j) {
    const float scale = d * static_cast<float>(r.scale[j][lane]);
    float min = 0.f;
    if constexpr (F::kMins) {
      min = f16(reinterpret_cast<const uint8_t*>(r.dm + lane)) *
            static_cast<float>(r.mins[j / 2][2 * lane + j % 2]);
    }
    for (int s = 0; s < 2; ++s) {  // the sub-block's halves: low and high nibbles
      for (int u = 0; u < kHalfQuads; ++u) {
        for (int b = 0; b < 4; ++b) {
          const uint8_t byte = r.q[j * kHalfQuads + u][4 * lane + b];
          const int code = s == 0 ? byte & 0x0F : byte >> 4;
          T* v = out + j * F::kSubValues + 4 * (s * kHalfQuads + u) + b;
          if constexpr (F::kMins) {
            *v = from_f32<T>(scale * static_cast<float>(code) + min);
          } else {  // quad e = 2 s + u of the sub-block: its top bits at 2e, 2e + 1
            const int top = (r.high[j][4 * lane + b] >> (2 * (2 * s + u))) & 3;
            *v = from_f32<T>(scale * static_cast<float>((code | top << 4) - 32));
          }
        }
      }
    }
  }
}

template <typename F>
void repacked_rows_impl(const at::Tensor& w, const at::Tensor& ids, at::Tensor& out) {
  using R = typename RepackedOf<F>::T;
  const int64_t supers = w.size(1), k = supers * kSuper;
  const R* wp = reinterpret_cast<const R*>(w.data_ptr<uint8_t>());
  const int64_t* ip = ids.data_ptr<int64_t>();
  dispatch_float_types(out, "gguf_repacked_rows", [&](auto t) {
    using T = decltype(t);
    T* op = out.data_ptr<T>();
    at::parallel_for(0, ids.numel(), 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const R* vector = wp + ip[i] / kLanes * supers;
        const int lane = static_cast<int>(ip[i] % kLanes);
        for (int64_t s = 0; s < supers; ++s) {
          unpack_row<F>(vector[s], lane, op + i * k + s * kSuper);
        }
      }
    });
  });
}

// A step of few rows reads the weight from memory once: as gguf_linear does, each super-block
// requests the cache lines of the one kPrefetchSupers after it, into L2 (into L1 the requests
// slowed a row's step down). A row then streams the 1B file's projections about as fast as
// gguf_linear streams the file's blocks (21.5 ms both on a Zen 4, within a noise of 10 %).
// On a Zen 3 (AVX2) a step's projections at one row, the weights cold and the variants
// alternating in one process, took 47.8 / 42.9 / 43.4 / 45.0 ms (best of 12) with 4 / 8 /
// 12 / 16 super-blocks ahead (in another such run 49.8 with 4 and 60.4 with no requests).
#ifdef PAGODA_GGUF_GEMM_AVX512
constexpr int64_t kPrefetchSupers = 4;
#else
constexpr int64_t kPrefetchSupers = 8;
#endif

#ifdef PAGODA_GGUF_GEMM_AVX512
// The scale pairs sc_j | sc_j << 16 (int16) of a repacked sub-block's 16 lanes.
PAGODA_INLINE __m512i scale_pairs(const uint8_t* sc) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(sc)));
  return _mm512_or_si512(v, _mm512_slli_epi32(v, 16));
}
PAGODA_INLINE __m512i scale_pairs(const int8_t* sc) {
  const __m512i v = _mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(sc)));
  return _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF)),
                         _mm512_slli_epi32(v, 16));
}

// As microkernel (the same integer sums, the same float operations in the same order), on
// repacked super-blocks.
template <typename F, int NC, int R>
PAGODA_INLINE void microkernel(const typename RepackedOf<F>::T* p, int64_t stride,
                               int64_t supers, const InputRows& x, int64_t r0, int64_t s0,
                               __m512* acc) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  const __m512i low_mask = _mm512_set1_epi8(0x0F), high_mask = _mm512_set1_epi8(0x30);
  for (int i = 0; i < NC * R; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t k = x.supers * kSuper;
  for (int64_t s = 0; s < supers; ++s) {
    const int64_t sb = s0 + s;
    for (int c = 0; c < NC; ++c) {
      const char* ahead = reinterpret_cast<const char*>(&p[c * stride + s + kPrefetchSupers]);
      for (size_t line = 0; line < sizeof(p[0]); line += 64) {
        _mm_prefetch(ahead + line, _MM_HINT_T1);
      }
    }
    const int8_t* xc[R];
    const int32_t* off[R];
    for (int r = 0; r < R; ++r) {
      xc[r] = x.codes + (r0 + r) * k + sb * kSuper;
      off[r] = x.off8 + (r0 + r) * x.supers * 32 + sb * 32;
    }
    __m512i total[NC][R];
    for (int c = 0; c < NC; ++c)
      for (int r = 0; r < R; ++r) total[c][r] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int j = 0; j < F::kSubs; ++j) {
      __m512i half[2][NC][R];
      for (int r = 0; r < R; ++r) {
        for (int h = 0; h < 2; ++h) {
          const __m512i start =
              F::kMins ? _mm512_setzero_si512() : _mm512_set1_epi32(off[r][2 * j + h]);
          for (int c = 0; c < NC; ++c) half[h][c][r] = start;
        }
      }
      __m512i top[NC];
      if constexpr (!F::kMins) {
        for (int c = 0; c < NC; ++c) top[c] = _mm512_load_si512(p[c * stride + s].high[j]);
      }
#pragma GCC unroll 4
      for (int u = 0; u < kHalfQuads; ++u) {
        __m512i w[2][NC];
        for (int c = 0; c < NC; ++c) {
          const __m512i v = _mm512_load_si512(p[c * stride + s].q[j * kHalfQuads + u]);
          w[0][c] = _mm512_and_si512(v, low_mask);
          w[1][c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_mask);
          if constexpr (!F::kMins) {
            // quad u of the sub-block: bits 2u, 2u + 1 of top to 4, 5; quad 2 + u: 4 + 2u
            const __m512i t0 = u == 0 ? _mm512_slli_epi16(top[c], 4) : _mm512_slli_epi16(top[c], 2);
            const __m512i t1 = u == 0 ? top[c] : _mm512_srli_epi16(top[c], 2);
            w[0][c] = _mm512_or_si512(w[0][c], _mm512_and_si512(t0, high_mask));
            w[1][c] = _mm512_or_si512(w[1][c], _mm512_and_si512(t1, high_mask));
          }
        }
        for (int r = 0; r < R; ++r) {
          for (int h = 0; h < 2; ++h) {
            const int t = (2 * j + h) * kHalfQuads + u;
            int32_t four;
            std::memcpy(&four, xc[r] + 4 * t, 4);
            const __m512i xb = _mm512_set1_epi32(four);
            for (int c = 0; c < NC; ++c) {
              half[h][c][r] = _mm512_dpbusd_epi32(half[h][c][r], w[h][c], xb);
            }
          }
        }
      }
      for (int c = 0; c < NC; ++c) {
        const __m512i sc = scale_pairs(p[c * stride + s].scale[j]);
        for (int r = 0; r < R; ++r) {
          const __m512i both = _mm512_mask_blend_epi16(
              0xAAAAAAAA, half[0][c][r], _mm512_slli_epi32(half[1][c][r], 16));
          total[c][r] = _mm512_dpwssd_epi32(total[c][r], both, sc);
        }
      }
    }
    for (int c = 0; c < NC; ++c) {
      const auto& pc = p[c * stride + s];
      const __m512 d =
          _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(pc.d)));
      __m512i mins[4];
      __m512 dm = _mm512_setzero_ps();
      if constexpr (F::kMins) {
        for (int q = 0; q < 4; ++q) {
          mins[q] = _mm512_cvtepu8_epi16(
              _mm256_load_si256(reinterpret_cast<const __m256i*>(pc.mins[q])));
        }
        dm = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(pc.dm)));
      }
      for (int r = 0; r < R; ++r) {
        const __m512 dx = _mm512_set1_ps(x.scale[(r0 + r) * x.supers + sb]);
        __m512 v = _mm512_mul_ps(d, _mm512_cvtepi32_ps(total[c][r]));
        if constexpr (F::kMins) {
          const int16_t* s32 = x.sum32 + (r0 + r) * x.supers * 8 + sb * 8;
          __m512i m = _mm512_setzero_si512();
          for (int q = 0; q < 4; ++q) {
            int32_t pair;
            std::memcpy(&pair, s32 + 2 * q, 4);
            m = _mm512_dpwssd_epi32(m, mins[q], _mm512_set1_epi32(pair));
          }
          v = _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(m), v);
        }
        acc[c * R + r] = _mm512_fmadd_ps(v, dx, acc[c * R + r]);
      }
    }
  }
}

// A repacked super-block of 16 columns as gguf_gemm's tiles hold it (the same bytes its
// decoding gives): a few vector operations, no transposes.
template <typename F>
PAGODA_INLINE void expand(const typename RepackedOf<F>::T& r, Packed<F::kSubs>* p) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  const __m512i low_mask = _mm512_set1_epi8(0x0F), high_mask = _mm512_set1_epi8(0x30);
  for (int j = 0; j < F::kSubs; ++j) {
    __m512i top = _mm512_setzero_si512();
    if constexpr (!F::kMins) top = _mm512_load_si512(r.high[j]);
    for (int u = 0; u < kHalfQuads; ++u) {
      const __m512i v = _mm512_load_si512(r.q[j * kHalfQuads + u]);
      __m512i w0 = _mm512_and_si512(v, low_mask);
      __m512i w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_mask);
      if constexpr (!F::kMins) {
        const __m512i t0 = u == 0 ? _mm512_slli_epi16(top, 4) : _mm512_slli_epi16(top, 2);
        const __m512i t1 = u == 0 ? top : _mm512_srli_epi16(top, 2);
        w0 = _mm512_or_si512(w0, _mm512_and_si512(t0, high_mask));
        w1 = _mm512_or_si512(w1, _mm512_and_si512(t1, high_mask));
      }
      _mm512_store_si512(p->q[2 * j * kHalfQuads + u], w0);
      _mm512_store_si512(p->q[(2 * j + 1) * kHalfQuads + u], w1);
    }
    _mm512_store_si512(p->scale[j], scale_pairs(r.scale[j]));
  }
  _mm512_store_ps(p->d, _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(r.d))));
  if constexpr (F::kMins) {
    for (int q = 0; q < 4; ++q) {
      _mm512_store_si512(p->mins[q], _mm512_cvtepu8_epi16(_mm256_load_si256(
                                         reinterpret_cast<const __m256i*>(r.mins[q]))));
    }
    _mm512_store_ps(p->dm,
                    _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(r.dm))));
  } else {
    for (int q = 0; q < 4; ++q) _mm512_store_si512(p->mins[q], _mm512_setzero_si512());
    _mm512_store_ps(p->dm, _mm512_setzero_ps());
  }
}

#else
// The scale pairs sc_j | sc_j << 16 (int16) of 8 lanes of a repacked sub-block.
PAGODA_INLINE __m256i scale_pairs(const uint8_t* sc) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc)));
  return _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
}
PAGODA_INLINE __m256i scale_pairs(const int8_t* sc) {
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc)));
  return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)),
                         _mm256_slli_epi32(v, 16));
}

// A repacked super-block of 16 columns as gguf_gemm's tiles hold it (the same bytes its
// decoding gives), 32 bytes at a time.
template <typename F>
PAGODA_INLINE void expand(const typename RepackedOf<F>::T& r, Packed<F::kSubs>* p) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  const __m256i low_mask = _mm256_set1_epi8(0x0F), high_mask = _mm256_set1_epi8(0x30);
  for (int j = 0; j < F::kSubs; ++j) {
    for (int g = 0; g < 2; ++g) {
      __m256i top = _mm256_setzero_si256();
      if constexpr (!F::kMins) {
        top = _mm256_load_si256(reinterpret_cast<const __m256i*>(r.high[j] + 32 * g));
      }
      for (int u = 0; u < kHalfQuads; ++u) {
        const __m256i v =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(r.q[j * kHalfQuads + u] + 32 * g));
        __m256i w0 = _mm256_and_si256(v, low_mask);
        __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_mask);
        if constexpr (!F::kMins) {
          const __m256i t0 = u == 0 ? _mm256_slli_epi16(top, 4) : _mm256_slli_epi16(top, 2);
          const __m256i t1 = u == 0 ? top : _mm256_srli_epi16(top, 2);
          w0 = _mm256_or_si256(w0, _mm256_and_si256(t0, high_mask));
          w1 = _mm256_or_si256(w1, _mm256_and_si256(t1, high_mask));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(p->q[2 * j * kHalfQuads + u] + 32 * g), w0);
        _mm256_store_si256(
            reinterpret_cast<__m256i*>(p->q[(2 * j + 1) * kHalfQuads + u] + 32 * g), w1);
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(p->scale[j] + 8 * g),
                         scale_pairs(r.scale[j] + 8 * g));
    }
  }
  for (int g = 0; g < 2; ++g) {
    _mm256_store_ps(p->d + 8 * g,
                    _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.d + 8 * g))));
    if constexpr (F::kMins) {
      for (int q = 0; q < 4; ++q) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(p->mins[q] + 8 * g),
                           _mm256_cvtepu8_epi16(_mm_loadu_si128(
                               reinterpret_cast<const __m128i*>(r.mins[q] + 16 * g))));
      }
      _mm256_store_ps(p->dm + 8 * g, _mm256_cvtph_ps(_mm_loadu_si128(
                                         reinterpret_cast<const __m128i*>(r.dm + 8 * g))));
    } else {
      for (int q = 0; q < 4; ++q) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(p->mins[q] + 8 * g),
                           _mm256_setzero_si256());
      }
      _mm256_store_ps(p->dm + 8 * g, _mm256_setzero_ps());
    }
  }
}

// As microkernel (the same integer totals, the same float operations in the same order), on
// half `half` of repacked super-blocks, each code vector unpacked in registers as it is read:
// for a few rows, expanding the tile into memory first cost more than the products.
template <typename F, int R>
PAGODA_INLINE void microkernel(const typename RepackedOf<F>::T* p, int64_t supers,
                               const InputRows& x, int64_t r0, int64_t s0, int half,
                               __m256* acc) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  constexpr int kQuads = F::kSubValues / 4;
  const int lane0 = 8 * half;
  const __m256i low_mask = _mm256_set1_epi8(0x0F), high_mask = _mm256_set1_epi8(0x30);
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t k = x.supers * kSuper;
  for (int64_t s = 0; s < supers; ++s) {
    const int64_t sb = s0 + s;
    const auto& pc = p[s];
    const char* ahead = reinterpret_cast<const char*>(&p[s + kPrefetchSupers]) + 32 * half;
    for (size_t line = 0; line < sizeof(p[0]); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T1);
    const int8_t* xc[R];
    const int32_t* off[R];
    for (int r = 0; r < R; ++r) {
      xc[r] = x.codes + (r0 + r) * k + sb * kSuper;
      off[r] = x.off16 + (r0 + r) * x.supers * 16 + sb * 16;
    }
    __m256i total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_si256();
    for (int j = 0; j < F::kSubs; ++j) {
      __m256i sum[R];
      for (int r = 0; r < R; ++r) {
        sum[r] = F::kMins ? _mm256_setzero_si256() : _mm256_set1_epi32(off[r][j]);
      }
      __m256i top = _mm256_setzero_si256();
      if constexpr (!F::kMins) {
        top = _mm256_load_si256(reinterpret_cast<const __m256i*>(pc.high[j] + 32 * half));
      }
#pragma GCC unroll 4
      for (int u = 0; u < kHalfQuads; ++u) {
        const __m256i v = _mm256_load_si256(
            reinterpret_cast<const __m256i*>(pc.q[j * kHalfQuads + u] + 32 * half));
        __m256i w[2] = {_mm256_and_si256(v, low_mask),
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), low_mask)};
        if constexpr (!F::kMins) {
          const __m256i t0 = u == 0 ? _mm256_slli_epi16(top, 4) : _mm256_slli_epi16(top, 2);
          const __m256i t1 = u == 0 ? top : _mm256_srli_epi16(top, 2);
          w[0] = _mm256_or_si256(w[0], _mm256_and_si256(t0, high_mask));
          w[1] = _mm256_or_si256(w[1], _mm256_and_si256(t1, high_mask));
        }
        for (int h = 0; h < 2; ++h) {
          const int t = j * kQuads + h * kHalfQuads + u;
          for (int r = 0; r < R; ++r) {
            int32_t four;
            std::memcpy(&four, xc[r] + 4 * t, 4);
            // int16 sums wrap, so their order does not change the exact end value
            sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(w[h], _mm256_set1_epi32(four)));
            asm("" : "+x"(sum[r]));  // in its register, as in microkernel
          }
        }
      }
      const __m256i sc = scale_pairs(pc.scale[j] + lane0);
      for (int r = 0; r < R; ++r) {
        total[r] = _mm256_add_epi32(total[r], _mm256_madd_epi16(sum[r], sc));
        asm("" : "+x"(total[r]));
      }
    }
    __m256i mins[4] = {};
    __m256 dm = _mm256_setzero_ps();
    if constexpr (F::kMins) {
      for (int q = 0; q < 4; ++q) {
        mins[q] = _mm256_cvtepu8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(pc.mins[q] + 16 * half)));
      }
      dm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pc.dm + lane0)));
    }
    const __m256 d =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pc.d + lane0)));
    add_super_block<F, R>(total, d, dm, mins, x, r0, sb, acc);
  }
}

#endif

// Above this many rows a tile is expanded once into gguf_gemm's layout and its microkernel
// runs on it (the unpacking then costs less than redoing it for every 4 rows). On a Zen 3
// (AVX2), in one process, the variants alternating (GMAC/s, medians of 9): Q4_K's 8192 x
// 2048 projection read directly against expanded at 8 / 12 / 24 / 32 rows 76 / 79 / 92 / 94
// against 59 / 72 / 97 / 105, level at 16; Q6_K's 2048 x 8192 (its top bits cost three more
// operations a vector) 44 against 41 at 8 rows, 53 / 53 against 58 / 63 at 12 / 16.
template <typename F>
constexpr int64_t expand_rows() {
#ifdef PAGODA_GGUF_GEMM_AVX512
  return 16;
#else
  return std::is_same_v<F, Q4_K> ? 16 : 8;
#endif
}

// gemm_impl's order of work without the decoding: a tile of kTileVectors column vectors, its
// super-blocks kTileSupers at a time (summed in registers, then added to the output: the
// same float operations as gguf_gemm's), every block of rows (block_rows of the form read)
// through them. Up to kRows rows each column vector runs through all its super-blocks before
// the next (two vectors at a time, two streams a thread, read about 10 % slower at one row).
template <typename F>
void repacked_gemm_impl(const InputRows& x, int64_t rows, const at::Tensor& w, int64_t n,
                        at::Tensor& out) {
  using T = typename RepackedOf<F>::T;
  using P = Packed<F::kSubs>;
  const int64_t supers = x.supers;
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  const int64_t tiles = (vectors + kTileVectors - 1) / kTileVectors;
  const T* wp = reinterpret_cast<const T*>(w.data_ptr<uint8_t>());
  float* op = out.data_ptr<float>();
  const bool expanded = rows > expand_rows<F>();
  const int block = expanded ? block_rows<P>() : block_rows<T>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<P> buffer;
    if (expanded) buffer.resize(kTileVectors * kTileSupers);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t v0 = tile * kTileVectors, v1 = std::min(vectors, v0 + kTileVectors);
      if (rows <= kRows) {
        // one column vector at a time: one stream of the weight a thread, read once
        const int r = static_cast<int>(rows);
        for (int64_t v = v0; v < v1; ++v) {
          for (int64_t s0 = 0; s0 < supers; s0 += kTileSupers) {
            const int64_t span = std::min(supers, s0 + kTileSupers) - s0;
            run_rows<F, 1>(wp + v * supers + s0, supers, span, x, 0, r, s0, v, n, s0 > 0, op);
          }
        }
        continue;
      }
      for (int64_t s0 = 0; s0 < supers; s0 += kTileSupers) {
        const int64_t span = std::min(supers, s0 + kTileSupers) - s0;
        const bool add = s0 > 0;
        if (expanded) {
          for (int64_t v = v0; v < v1; ++v) {
            for (int64_t s = s0; s < s0 + span; ++s) {
              expand<F>(wp[v * supers + s], &buffer[(v - v0) * span + (s - s0)]);
            }
          }
        }
        for (int64_t r0 = 0; r0 < rows; r0 += block) {
          const int r = static_cast<int>(std::min<int64_t>(block, rows - r0));
          int64_t v = v0;
          for (; v + kColumnVectors <= v1; v += kColumnVectors) {
            if (expanded) {
              run_rows<F, kColumnVectors>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v,
                                          n, add, op);
            } else {
              run_rows<F, kColumnVectors>(wp + v * supers + s0, supers, span, x, r0, r, s0, v,
                                          n, add, op);
            }
          }
          for (; v < v1; ++v) {
            if (expanded) {
              run_rows<F, 1>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v, n, add, op);
            } else {
              run_rows<F, 1>(wp + v * supers + s0, supers, span, x, r0, r, s0, v, n, add, op);
            }
          }
        }
      }
    }
  });
}

struct RepackFormat {
  const char* name;
  int64_t bytes;     // the file's bytes a super-block of a row
  int64_t repacked;  // bytes a super-block of 16 columns, repacked
  void (*repack)(const at::Tensor&, at::Tensor&);
  void (*rows)(const at::Tensor&, const at::Tensor&, at::Tensor&);
  void (*run)(const InputRows&, int64_t, const at::Tensor&, int64_t, at::Tensor&);
};

const RepackFormat kRepackFormats[] = {
    {"Q4_K", Q4_K::kBytes, sizeof(RepackedQ4_K), &repack_impl<Q4_K>, &repacked_rows_impl<Q4_K>,
     &repacked_gemm_impl<Q4_K>},
    {"Q6_K", Q6_K::kBytes, sizeof(RepackedQ6_K), &repack_impl<Q6_K>, &repacked_rows_impl<Q6_K>,
     &repacked_gemm_impl<Q6_K>},
};

const RepackFormat& repack_format(const std::string& format) {
  for (const RepackFormat& e : kRepackFormats) {
    if (format == e.name) return e;
  }
  TORCH_CHECK(false, "gguf_repack has no layout for format ", format);
}

struct GemmFormat {
  const char* name;
  int64_t bytes;
  void (*run)(const InputRows&, int64_t, const at::Tensor&, at::Tensor&);
};

const GemmFormat kGemmFormats[] = {
    {"Q4_K", Q4_K::kBytes, &gemm_impl<Q4_K>},
    {"Q6_K", Q6_K::kBytes, &gemm_impl<Q6_K>},
};

}  // namespace
#endif

std::vector<std::string> gguf_gemm_formats() {
  std::vector<std::string> names;
#ifdef PAGODA_GGUF_GEMM
  for (const GemmFormat& f : kGemmFormats) names.emplace_back(f.name);
#endif
  return names;
}

at::Tensor gguf_gemm(const at::Tensor& x, const at::Tensor& w, const std::string& format) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(x, "x");
  check_cpu(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kSuper == 0,
              "x must be contiguous [rows, k] with k a multiple of 256");
  const GemmFormat* f = nullptr;
  for (const GemmFormat& e : kGemmFormats) {
    if (format == e.name) f = &e;
  }
  TORCH_CHECK(f != nullptr, "gguf_gemm has no kernel for format ", format);
  const int64_t k = x.size(1);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == k / kSuper * f->bytes,
              "w must be contiguous uint8 [n, ", k / kSuper * f->bytes, "] of ", format,
              " blocks");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || w.size(0) == 0) return out;
  static thread_local InputStorage storage;
  dispatch_float_types(x, "gguf_gemm", [&](auto t) {
    f->run(quantize_inputs<decltype(t)>(x, storage), x.size(0), w, out);
  });
  return out;
#else
  TORCH_CHECK(false, "gguf_gemm needs a build with AVX-512 VNNI or AVX2");
#endif
}

at::Tensor gguf_repack(const at::Tensor& w, const std::string& format) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(w, "w");
  const RepackFormat& f = repack_format(format);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) % f.bytes == 0,
              "w must be contiguous uint8 [n, supers * ", f.bytes, "] of ", format, " blocks");
  const int64_t vectors = (w.size(0) + kLanes - 1) / kLanes, supers = w.size(1) / f.bytes;
  at::Tensor out = at::empty({vectors, supers, f.repacked}, w.options());
  if (out.numel() > 0) f.repack(w, out);
  return out;
#else
  TORCH_CHECK(false, "gguf_repack needs a build with AVX-512 VNNI or AVX2");
#endif
}

at::Tensor gguf_gemm_repacked(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                              int64_t n) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(x, "x");
  check_cpu(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kSuper == 0,
              "x must be contiguous [rows, k] with k a multiple of 256");
  const RepackFormat& f = repack_format(format);
  const int64_t supers = x.size(1) / kSuper;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() &&
                  w.size(0) == (n + kLanes - 1) / kLanes && w.size(1) == supers &&
                  w.size(2) == f.repacked,
              "w must be a repacked ", format, " weight of ", n, " rows and ", x.size(1),
              " columns");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0, "w must be 64-byte aligned");
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || n == 0) return out;
  static thread_local InputStorage storage;
  dispatch_float_types(x, "gguf_gemm_repacked", [&](auto t) {
    f.run(quantize_inputs<decltype(t)>(x, storage), x.size(0), w, n, out);
  });
  return out;
#else
  TORCH_CHECK(false, "gguf_gemm_repacked needs a build with AVX-512 VNNI or AVX2");
#endif
}

at::Tensor gguf_repacked_rows(const at::Tensor& w, const std::string& format, int64_t n,
                              const at::Tensor& ids, at::ScalarType dtype) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(w, "w");
  check_cpu(ids, "ids");
  const RepackFormat& f = repack_format(format);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() &&
                  w.size(0) == (n + kLanes - 1) / kLanes && w.size(2) == f.repacked,
              "w must be a repacked ", format, " weight of ", n, " rows");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids must be int64 [count]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "gguf_repacked_rows writes float32 or bfloat16");
  const at::Tensor rows = ids.contiguous();
  const int64_t* ip = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "ids must be in [0, ", n, "), got ", ip[i]);
  }
  at::Tensor out = at::empty({rows.numel(), w.size(1) * kSuper}, w.options().dtype(dtype));
  if (out.numel() > 0) f.rows(w, rows, out);
  return out;
#else
  TORCH_CHECK(false, "gguf_repacked_rows needs a build with AVX-512 VNNI or AVX2");
#endif
}

}  // namespace pagoda
