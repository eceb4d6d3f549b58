// Matrix products with a weight kept in its GGUF block form: torch.ops.pagoda.gguf_linear.
// The PyTorch twin that defines what it computes: pagoda/model/ops/quantized_linear.py.
//
// As llama.cpp does, the input rows are quantized to int8 per 32 values (scale dx = max|x| /
// 127) and each weight block is decoded to 32 int8 codes in one 256-bit register, so a
// block's dot product is one VNNI instruction (dpbusd: 32 byte products summed in fours).
// The weight is read once for up to 8 input rows; its bytes are what the GGUF file holds
// (0.56 bytes a weight for Q4_K, 0.82 for Q6_K, 1.06 for Q8_0), so a decode step, whose
// time is reading the weights, reads no more than the file's size.
//
// Every format comes down to 32-weight blocks with codes q, a scale per 16 or 32 weights
// and, for some, a minimum: w = scale * q (+ min). Signed codes (Q8_0, Q4_0, Q5_0, Q6_K)
// go through dpbusd as |q| times x with q's sign; unsigned ones (Q4_1, Q5_1, Q4_K, Q5_K)
// directly, their minimum added as min * dx * sum(x codes) per block.

#include "simd.h"

#include <string>
#include <vector>

namespace pagoda {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAGODA_GGUF_KERNELS 1

namespace {

constexpr int64_t kBlock = 32;
constexpr int kMaxRowsPerPass = 8;

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// One decoded 32-weight block: w[i] = scale[i / 4] * codes[i] (+ min), the scale given per
// dpbusd lane (4 weights), so 16-weight scales (Q6_K) fit as well as 32-weight ones.
struct Block {
  __m256i codes;
  __m256 scale;
  float min;
};

// Low and high nibbles of 16 bytes as 32 values 0..15: weights 0-15, then 16-31.
inline __m256i nibbles(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
  return _mm256_set_m128i(hi, lo);
}

// 16 at each weight whose bit is set in a little-endian 32-bit mask (the fifth bit of Q5_*).
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm256_maskz_set1_epi8(_cvtu32_mask32(bits), 16);
}

// Each format: bytes and 32-weight blocks per (super-)block, whether its codes are signed,
// and decode(bytes, blocks) filling those blocks.
struct Q8_0 {
  static constexpr int64_t kBytes = 34, kBlocks = 1;
  static constexpr bool kSigned = true;
  static void decode(const uint8_t* p, Block* b) {
    b->codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    b->scale = _mm256_set1_ps(f16(p));
  }
};

struct Q4_0 {
  static constexpr int64_t kBytes = 18, kBlocks = 1;
  static constexpr bool kSigned = true;
  static void decode(const uint8_t* p, Block* b) {
    b->codes = _mm256_sub_epi8(nibbles(p + 2), _mm256_set1_epi8(8));
    b->scale = _mm256_set1_ps(f16(p));
  }
};

struct Q5_0 {
  static constexpr int64_t kBytes = 22, kBlocks = 1;
  static constexpr bool kSigned = true;
  static void decode(const uint8_t* p, Block* b) {
    const __m256i q = _mm256_or_si256(nibbles(p + 6), fifth_bits(p + 2));
    b->codes = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
    b->scale = _mm256_set1_ps(f16(p));
  }
};

struct Q4_1 {
  static constexpr int64_t kBytes = 20, kBlocks = 1;
  static constexpr bool kSigned = false;
  static void decode(const uint8_t* p, Block* b) {
    b->codes = nibbles(p + 4);
    b->scale = _mm256_set1_ps(f16(p));
    b->min = f16(p + 2);
  }
};

struct Q5_1 {
  static constexpr int64_t kBytes = 24, kBlocks = 1;
  static constexpr bool kSigned = false;
  static void decode(const uint8_t* p, Block* b) {
    b->codes = _mm256_or_si256(nibbles(p + 8), fifth_bits(p + 4));
    b->scale = _mm256_set1_ps(f16(p));
    b->min = f16(p + 2);
  }
};

// Q4_K and Q5_K: d, dmin and the 6-bit scales and minimums of the 8 sub-blocks.
inline void k4_scales(const uint8_t* p, Block* b) {
  // The 12 bytes as three words: bytes 0-3 hold scales 0-3 in their low 6 bits, 4-7
  // minimums 0-3; scales and minimums 4-7 take their low 4 bits from bytes 8-11 and their
  // top 2 bits from the top of bytes 0-3 and 4-7. Rearranged (as llama.cpp does) into 8
  // scale bytes and 8 minimum bytes.
  uint32_t w[3];
  std::memcpy(w, p + 4, 12);
  constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  const uint32_t sc[2] = {w[0] & low6, (w[2] & low4) | (((w[0] >> 6) & low2) << 4)};
  const uint32_t mn[2] = {w[1] & low6, ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4)};
  const __m256 d = _mm256_set1_ps(f16(p)), dmin = _mm256_set1_ps(-f16(p + 2));
  alignas(32) float scale[8], minimum[8];
  _mm256_store_ps(scale, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))))));
  _mm256_store_ps(minimum, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                   _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn))))));
  for (int j = 0; j < 8; ++j) {
    b[j].scale = _mm256_set1_ps(scale[j]);
    b[j].min = minimum[j];
  }
}

// Q4_K: [d][dmin][12 B scales][128 B nibbles]; sub-block j is the low (even j) or high
// (odd j) nibbles of bytes 32 (j / 2) .. 32 (j / 2) + 31; w = d sc q - dmin mn.
struct Q4_K {
  static constexpr int64_t kBytes = 144, kBlocks = 8;
  static constexpr bool kSigned = false;
  static void decode(const uint8_t* p, Block* b) {
    k4_scales(p, b);
    for (int j = 0; j < 8; j += 2) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 16 * j));
      b[j].codes = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
      b[j + 1].codes = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
    }
  }
};

// Q5_K: [d][dmin][12 B scales][32 B fifth bits][128 B nibbles], the nibbles as Q4_K's; bit
// j of fifth-bit byte i is the fifth bit of weight i of sub-block j.
struct Q5_K {
  static constexpr int64_t kBytes = 176, kBlocks = 8;
  static constexpr bool kSigned = false;
  static void decode(const uint8_t* p, Block* b) {
    k4_scales(p, b);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    for (int j = 0; j < 8; j += 2) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 48 + 16 * j));
      const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
      const __mmask32 m0 = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(char(1 << j)));
      const __mmask32 m1 = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(char(2 << j)));
      b[j].codes = _mm256_mask_add_epi8(lo, m0, lo, _mm256_set1_epi8(16));
      b[j + 1].codes = _mm256_mask_add_epi8(hi, m1, hi, _mm256_set1_epi8(16));
    }
  }
};

// Q6_K: [128 B low nibbles][64 B top 2 bits][16 x int8 scales][d]. Weight i of half h
// (128 weights), quarter c (32), position l: nibble (c < 2 ? low : high) of ql[64 h + 32 (c & 1)
// + l], bits 2c, 2c + 1 of qh[32 h + l], scale sc[8 h + 2 c + l / 16]; w = d sc (q - 32).
struct Q6_K {
  static constexpr int64_t kBytes = 210, kBlocks = 8;
  static constexpr bool kSigned = true;
  static void decode(const uint8_t* p, Block* b) {
    const float d = f16(p + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = p + 64 * h;
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i lows[4] = {_mm256_and_si256(l0, low4), _mm256_and_si256(l1, low4),
                               _mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                               _mm256_and_si256(_mm256_srli_epi16(l1, 4), low4)};
      for (int c = 0; c < 4; ++c) {
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), low2);
        const __m256i q = _mm256_or_si256(lows[c], _mm256_slli_epi16(high, 4));
        Block& out = b[4 * h + c];
        out.codes = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
        const float s0 = d * sc[8 * h + 2 * c], s1 = d * sc[8 * h + 2 * c + 1];
        out.scale = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1);
      }
    }
  }
};

// The input rows quantized per 32 values: codes, dx (the scale) and dx * sum(codes).
struct QuantizedRows {
  std::vector<int8_t> codes;
  std::vector<float> scale, sum;
};

template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t rows = x.size(0), k = x.size(1), blocks = rows * k / kBlock;
  QuantizedRows q{std::vector<int8_t>(rows * k), std::vector<float>(blocks),
                  std::vector<float>(blocks)};
  const T* xp = x.data_ptr<T>();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 v0 = load16(xp + b * kBlock), v1 = load16(xp + b * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    // 127 / amax by a division instruction (-ffast-math may not turn it into a product
    // with a reciprocal): the twin's value exactly, so ties such as x = amax / 2 round alike.
    const float id = amax > 0.f ? _mm_cvtss_f32(_mm_div_ss(_mm_set_ss(127.f), _mm_set_ss(amax)))
                                : 0.f;
    const float d = amax / 127.f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.codes[b * kBlock]), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(&q.codes[b * kBlock + 16]),
                     _mm512_cvtsepi32_epi8(q1));
    q.scale[b] = d;
    q.sum[b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  }
  return q;
}

// out[r, j] for rows r0 .. r0 + R - 1 and weight rows [begin, end).
template <typename F, int R>
void dot_rows(const uint8_t* w, int64_t row_bytes, int64_t k, const QuantizedRows& x,
              int64_t r0, int64_t begin, int64_t end, int64_t n, float* out) {
  const int64_t blocks = k / kBlock;
  const int8_t* xq = x.codes.data() + r0 * k;
  const float* dx = x.scale.data() + r0 * blocks;
  const float* sx = x.sum.data() + r0 * blocks;
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* wj = w + j * row_bytes;
    __m256 acc[R];
    float mins[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_ps();
      mins[r] = 0.f;
    }
    for (int64_t s = 0; s < blocks / F::kBlocks; ++s) {
      Block blk[F::kBlocks];
      F::decode(wj + s * F::kBytes, blk);
      for (int i = 0; i < F::kBlocks; ++i) {
        const int64_t b = s * F::kBlocks + i;
        const __m256i codes = F::kSigned ? _mm256_sign_epi8(blk[i].codes, blk[i].codes)
                                         : blk[i].codes;
        for (int r = 0; r < R; ++r) {
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + b * kBlock));
          if (F::kSigned) xv = _mm256_sign_epi8(xv, blk[i].codes);
          const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xv);
          const __m256 scale = _mm256_mul_ps(blk[i].scale, _mm256_set1_ps(dx[r * blocks + b]));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
          if (!F::kSigned) mins[r] += blk[i].min * sx[r * blocks + b];
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      out[(r0 + r) * n + j] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2))) + mins[r];
    }
  }
}

template <typename F>
void gguf_linear_impl(const QuantizedRows& x, int64_t rows, int64_t k, const at::Tensor& w,
                      at::Tensor& out) {
  const int64_t n = w.size(0), row_bytes = w.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRowsPerPass) {
      switch (std::min<int64_t>(rows - r0, kMaxRowsPerPass)) {
#define PAGODA_ROWS(R) \
  case R:              \
    dot_rows<F, R>(wp, row_bytes, k, x, r0, begin, end, n, op); \
    break;
        PAGODA_ROWS(1) PAGODA_ROWS(2) PAGODA_ROWS(3) PAGODA_ROWS(4)
        PAGODA_ROWS(5) PAGODA_ROWS(6) PAGODA_ROWS(7) PAGODA_ROWS(8)
#undef PAGODA_ROWS
      }
    }
  });
}

// Format name -> (bytes per block, weights per block, the product).
struct FormatEntry {
  const char* name;
  int64_t bytes, weights;
  void (*run)(const QuantizedRows&, int64_t, int64_t, const at::Tensor&, at::Tensor&);
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
#endif

std::vector<std::string> gguf_linear_formats() {
  std::vector<std::string> names;
#ifdef PAGODA_GGUF_KERNELS
  for (const FormatEntry& f : kFormats) names.emplace_back(f.name);
#endif
  return names;
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, const std::string& format) {
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
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return out;
  dispatch_float_types(x, "gguf_linear", [&](auto t) {
    f->run(quantize_rows<decltype(t)>(x), x.size(0), k, w, out);
  });
  return out;
#else
  TORCH_CHECK(false, "gguf_linear needs a build with AVX-512 VNNI");
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

// Keeps the compiler from fusing a product and the sum after it into one FMA
// (-ffast-math allows it): the twin rounds the product first.
inline __m512 unfused(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}

// One block's 32 weights scale * q (+ min), in float32 (the twin's order), stored as T.
template <typename F, typename T>
inline void store_block(const Block& b, T* out) {
  const __m512 scale = _mm512_castps256_ps512(b.scale);
  const __m512i lo_lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i hi_lanes = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b.codes)));
  const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b.codes, 1)));
  __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(lo_lanes, scale), q0);
  __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(hi_lanes, scale), q1);
  if (!F::kSigned) {  // signed formats have no minimum (adding 0 would turn -0 into +0)
    w0 = _mm512_add_ps(unfused(w0), _mm512_set1_ps(b.min));
    w1 = _mm512_add_ps(unfused(w1), _mm512_set1_ps(b.min));
  }
  store16(out, w0);
  store16(out + 16, w1);
}

// Weight rows [begin, end) of w decoded into out's rows 0 .. end - begin - 1 ([*, k] of T).
template <typename F, typename T>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t begin, int64_t end,
                     T* out) {
  at::parallel_for(begin, end, 16, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const uint8_t* wj = w + j * row_bytes;
      T* oj = out + (j - begin) * k;
      for (int64_t s = 0; s < k / (F::kBlocks * kBlock); ++s) {
        Block blk[F::kBlocks];
        F::decode(wj + s * F::kBytes, blk);
        for (int i = 0; i < F::kBlocks; ++i) {
          store_block<F>(blk[i], oj + (s * F::kBlocks + i) * kBlock);
        }
      }
    }
  });
}

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
  TORCH_CHECK(false, "gguf_dequantize needs a build with AVX-512 VNNI");
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
  TORCH_CHECK(false, "gguf_matmul needs a build with AVX-512 VNNI");
#endif
}

}  // namespace pagoda
