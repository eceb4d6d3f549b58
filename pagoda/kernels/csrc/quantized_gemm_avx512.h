// The int8 GEMM's microkernels with AVX-512 (VNNI, BW, VL, DQ), for quantized_gemm.cpp:
// the tile's codes transposed into place, a block of rows against column vectors of decoded
// tiles or of the repacked form, and the expansion of the repacked form into a tile.

#pragma once

#include "quantized_gemm.h"

namespace pagoda {
namespace {

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

// Input rows a block of the microkernel takes, from either form.
template <typename P>
constexpr int block_rows() {
  return kRows;
}

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

// A step of few rows reads the weight from memory once: as gguf_linear does, each super-block
// requests the cache lines of the one kPrefetchSupers after it, into L2 (into L1 the requests
// slowed a row's step down). A row then streams the 1B file's projections about as fast as
// gguf_linear streams the file's blocks (21.5 ms both on a Zen 4, within a noise of 10 %).
constexpr int64_t kPrefetchSupers = 4;

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

// Above this many rows a tile is expanded once into gguf_gemm's layout and its microkernel
// runs on it (the unpacking then costs less than redoing it for every 4 rows).
template <typename F>
constexpr int64_t expand_rows() {
  return 16;
}

}  // namespace
}  // namespace pagoda
