// Matrix products with a weight kept in its GGUF block form: torch.ops.pagoda.gguf_linear.
// The PyTorch twin that defines what it computes: pagoda/model/ops/quantized_linear.py.
//
// As llama.cpp does, the input rows are quantized to int8 per 32 values (scale dx = max|x| /
// 127) and the weights' codes are dotted with them by integer product instructions, the
// weight read once for up to 8 input rows; its bytes are what the GGUF file holds (0.56
// bytes a weight for Q4_K, 0.82 for Q6_K, 1.06 for Q8_0), so a decode step, whose time is
// reading the weights, reads no more than the file's size. Each format's blocks decode to
// unsigned codes q with a scale and a minimum per 16 or 32 weights: w = scale * q + min (a
// signed format's offset is its minimum). The kernels, one header per instruction set:
// quantized_linear_avx512.h (VNNI's dpbusd) and quantized_linear_avx2.h (maddubs).

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define PAGODA_GGUF_KERNELS 1
#include "quantized_linear_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGODA_GGUF_KERNELS 1
#include "quantized_linear_avx2.h"
#endif

#include "simd.h"

#include <optional>
#include <string>
#include <vector>

namespace pagoda {

#ifdef PAGODA_GGUF_KERNELS
namespace {

// The weight is read in chunks of kChunkRows rows; for more than one input row, each chunk
// in slices of kSliceBlocks blocks, and every slice in passes of up to kMaxRowsPerPass input
// rows, so that a pass's inputs (8 rows of 2048 values: 22 KB) stay in the L1 cache while
// the chunk's rows go by, and its weight bytes in L2 for the next pass. Each weight group
// is decoded once a pass: passes of 8 rows measured faster than decoding a chunk once into
// a buffer that every pass reads (AVX-512).
constexpr int64_t kChunkRows = 16;
constexpr int64_t kSliceBlocks = 64;
// The weight streams from memory (a decode step reads every byte of it once): the hardware's
// prefetcher alone left the loop waiting on it, at about 24 GB/s for Q4_K where the copy
// bandwidth is 33; requesting each step's cache lines this many bytes (rounded up to whole
// weight rows) before they are used brings it to about 30 (AVX-512).
constexpr int64_t kPrefetchBytes = 2048;

// The kernel's dot_rows<F, R> for a pass of `rows` input rows (1 .. kMaxRowsPerPass).
template <typename F, int R = 1>
PAGODA_INLINE void dot_pass(int64_t rows, const uint8_t* w, const uint8_t* ahead,
                            const QuantizedRows& x, int64_t r0, int64_t s0, int64_t s1,
                            Sums* acc) {
  if constexpr (R < kMaxRowsPerPass) {
    if (rows > R) return dot_pass<F, R + 1>(rows, w, ahead, x, r0, s0, s1, acc);
  }
  dot_rows<F, R>(w, ahead, x, r0, s0, s1, acc);
}

template <typename F>
void gguf_linear_impl(const QuantizedRows& x, int64_t rows, const at::Tensor& w,
                      at::Tensor& out) {
  const int64_t n = w.size(0), row_bytes = w.size(1), steps = steps_of(x);
  const int64_t slice = rows == 1 ? steps : kSliceBlocks / kStepBlocks;
  // dot_rows prefetches the same steps of the weight row at least kPrefetchBytes below
  const int64_t ahead =
      row_bytes * std::max<int64_t>(1, (kPrefetchBytes + row_bytes - 1) / row_bytes);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // float32, or bfloat16 rounded from the same float32 sum (a decode step's projections
  // then need no conversion of their own)
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  at::BFloat16* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<Sums> acc(kChunkRows * rows);  // [weight row of the chunk, input row]
    for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
      const int64_t c1 = std::min(end, c0 + kChunkRows);
      std::fill(acc.begin(), acc.end(), zero_sums());
      for (int64_t s0 = 0; s0 < steps; s0 += slice) {
        const int64_t s1 = std::min(steps, s0 + slice);
        for (int64_t r0 = 0; r0 < rows; r0 += kMaxRowsPerPass) {
          const int64_t pass = std::min<int64_t>(rows - r0, kMaxRowsPerPass);
          for (int64_t j = c0; j < c1; ++j) {
            const uint8_t* wj = wp + j * row_bytes;
            dot_pass<F>(pass, wj, wj + ahead, x, r0, s0, s1, &acc[(j - c0) * rows + r0]);
          }
        }
      }
      for (int64_t j = c0; j < c1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
          const float sum = total(acc[(j - c0) * rows + r]);
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

// ---------------------------------------------------------------------------------------
// Dequantization: torch.ops.pagoda.gguf_dequantize and gguf_matmul, for steps too big for
// gguf_linear. The PyTorch twin is pagoda/model/quants.py's dequantize (then a product).
//
// A step of many rows is compute-bound, where a bfloat16 GEMM beats the integer kernel; so
// the weight is decoded a tile of rows at a time into a small buffer that stays in cache
// and multiplied from there, and no full-precision copy of it is kept.
//
// Each weight is written as scale * q + min in float32, rounded once to the output type. The
// twin computes d * (q - offset) (signed formats) or scale * q + min; both products are
// exact in float32 (a float16 or float16 x 6-bit scale times a code of at most 8 bits), and
// so is the sum scale * q + (-offset * scale), so the values are the twin's to the bit (up
// to the sign of a zero).

#ifdef PAGODA_GGUF_KERNELS
namespace {

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
