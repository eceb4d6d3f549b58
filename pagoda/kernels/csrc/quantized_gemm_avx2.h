// The int8 GEMM's microkernels with AVX2 (+ FMA, F16C), for quantized_gemm.cpp on a CPU
// without AVX-512: the same integer totals and float operations as quantized_gemm_avx512.h,
// 8 columns a vector (maddubs: u8 x s8 pairs into int16, then madd with the scales).

#pragma once

#include "quantized_gemm.h"

namespace pagoda {
namespace {

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

// Input rows a block of the microkernel takes from P: 3 on decoded tiles, whose blocks are a
// whole column vector wide, and kRows on the repacked form read directly.
template <typename P>
constexpr int block_rows() {
  return IsPacked<P>::value ? 3 : kRows;
}

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

// A step of few rows reads the weight from memory once: each super-block requests the cache
// lines of the one kPrefetchSupers after it, into L2, as the AVX-512 kernel does. On a Zen 3
// a step's projections at one row, the weights cold and the variants alternating in one
// process, took 47.8 / 42.9 / 43.4 / 45.0 ms (best of 12) with 4 / 8 / 12 / 16 super-blocks
// ahead (in another such run 49.8 with 4 and 60.4 with no requests).
constexpr int64_t kPrefetchSupers = 8;

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

// Above this many rows a tile is expanded once into gguf_gemm's layout and its microkernel
// runs on it (the unpacking then costs less than redoing it for every 4 rows). On a Zen 3
// (AVX2), in one process, the variants alternating (GMAC/s, medians of 9): Q4_K's 8192 x
// 2048 projection read directly against expanded at 8 / 12 / 24 / 32 rows 76 / 79 / 92 / 94
// against 59 / 72 / 97 / 105, level at 16; Q6_K's 2048 x 8192 (its top bits cost three more
// operations a vector) 44 against 41 at 8 rows, 53 / 53 against 58 / 63 at 12 / 16.
template <typename F>
constexpr int64_t expand_rows() {
  return std::is_same_v<F, Q4_K> ? 16 : 8;
}

}  // namespace
}  // namespace pagoda
