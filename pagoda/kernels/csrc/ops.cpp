// CPU kernels for the model's small, memory-bound steps, registered as torch.ops.pagoda.*.
//
// Each op has a pure-PyTorch twin in pagoda/model/ops.py that defines what it
// computes; these exist because one pass over the data beats the dozen small
// PyTorch ops (and their temporaries) that the twins take. All arithmetic is
// in float32; results are rounded to the tensor's dtype where the twin rounds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>

namespace {

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

// Calls f with a value of x's element type (float or at::BFloat16), the types the
// kernels are written for; any other type is an error naming the op.
template <typename F>
void dispatch_float_types(const at::Tensor& x, const char* op, F&& f) {
  if (x.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, " takes float32 or bfloat16");
    f(at::BFloat16{});
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// KV head g's row `offset` of a block, in a cache laid out [blocks, kv_heads, block_size,
// head_dim]: each KV head's rows of a block lie together.
template <typename T>
inline T* cache_row(T* cache, int64_t block, int64_t g, int64_t offset, int64_t kv_heads,
                    int64_t block_size, int64_t dim) {
  return cache + ((block * kv_heads + g) * block_size + offset) * dim;
}

// That the blocks holding positions 0..len-1 of a sequence lie in the cache.
void check_blocks(const int64_t* blocks, int64_t len, int64_t block_size, int64_t num_blocks) {
  for (int64_t b = 0; b * block_size < len; ++b) {
    TORCH_CHECK(blocks[b] >= 0 && blocks[b] < num_blocks, "block ", blocks[b],
                " is out of the cache");
  }
}

// ---------------------------------------------------------------- RMSNorm
// out = weight * round(x * rsqrt(mean(x^2) + eps)), rows of x normalised independently.
// With a residual, the residual stream's add comes first in the same pass over the row:
// residual = round(x + residual), and that sum is what is normalised.
template <typename T>
void rms_norm_impl(const T* xp, int64_t stride, T* residual, const T* wp, int64_t rows,
                   int64_t n, double eps, T* op) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * stride;
      if (residual) {
        T* sum_row = residual + r * n;
        for (int64_t i = 0; i < n; ++i) {
          sum_row[i] = from_f32<T>(to_f32(row[i]) + to_f32(sum_row[i]));
        }
        row = sum_row;
      }
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_f32(row[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / n + static_cast<float>(eps));
      T* o = op + r * n;
      for (int64_t i = 0; i < n; ++i) {
        o[i] = from_f32<T>(to_f32(wp[i]) * round_to<T>(to_f32(row[i]) * inv));
      }
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, n] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [n]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  dispatch_float_types(x, "rms_norm", [&](auto t) {
    using T = decltype(t);
    rms_norm_impl<T>(x.data_ptr<T>(), x.stride(0), nullptr, weight.data_ptr<T>(), x.size(0),
                     x.size(1), eps, out.data_ptr<T>());
  });
  return out;
}

// residual += x (rounded), then x = rms_norm(residual), both in place.
void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "x and residual must be contiguous, of one shape and dtype");
  dispatch_float_types(x, "add_rms_norm", [&](auto t) {
    using T = decltype(t);
    rms_norm_impl<T>(x.data_ptr<T>(), x.size(1), residual.data_ptr<T>(), weight.data_ptr<T>(),
                     x.size(0), x.size(1), eps, x.data_ptr<T>());
  });
}

// ---------------------------------------------------------------- SiLU and multiply
// x = [gate | up] along the last dimension; out = round(silu(gate)) * up.
template <typename T>
void silu_mul_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1) / 2, stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = xp + r * stride;
      const T* up = gate + n;
      T* o = op + r * n;
      int64_t i = 0;
#ifdef __AVX512F__
      for (; i + 16 <= n; i += 16) {
        // sigmoid(g) from e = e^-|g| <= 1, the range exp16 covers: 1 / (1 + e) for
        // g >= 0, e / (1 + e) below.
        const __m512 g = load16(gate + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
        const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 sigmoid = _mm512_mask_mul_ps(inv, negative, inv, e);
        T silu[16];  // rounded to T before the product, as the twin's silu is
        store16(silu, _mm512_mul_ps(g, sigmoid));
        store16(o + i, _mm512_mul_ps(load16(silu), load16(up + i)));
      }
#endif
      for (; i < n; ++i) {
        const float g = to_f32(gate[i]);
        o[i] = from_f32<T>(round_to<T>(g / (1.f + std::exp(-g))) * to_f32(up[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "x must be [rows, 2 * n] with contiguous rows");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  dispatch_float_types(x, "silu_mul", [&](auto t) { silu_mul_impl<decltype(t)>(x, out); });
  return out;
}

// ---------------------------------------------------------------- RoPE and cache write
// Rotates q and k (rotate-half form) in place by each token's position, then
// writes k and v into their cache slots. q: [T, H, D], k, v: [T, KVH, D], with
// any row stride and contiguous heads; cos_sin: [max_pos, D] float32 (cos | sin).
template <typename T>
void rotate_row(T* x, const float* cos, const float* sin, int64_t half) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load16(x + i), x2 = load16(x + i + half);
    const __m512 c = _mm512_loadu_ps(cos + i), s = _mm512_loadu_ps(sin + i);
    store16(x + i, _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)));
    store16(x + i + half, _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)));
  }
#endif
  for (; i < half; ++i) {
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    x[i] = from_f32<T>(x1 * cos[i] - x2 * sin[i]);
    x[i + half] = from_f32<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename T>
void rope_and_cache_impl(at::Tensor& q, at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& positions, const at::Tensor& cos_sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots) {
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  const int64_t half = dim / 2;
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float* table = cos_sin.data_ptr<float>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t qs = q.stride(0), ks = k.stride(0), vs = v.stride(0);
  const int64_t block_size = k_cache.size(2), num_slots = k_cache.size(0) * block_size;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " is out of the cache");
      const float* cos = table + pos[t] * dim;
      const float* sin = cos + half;
      for (int64_t h = 0; h < heads; ++h) rotate_row(qp + t * qs + h * dim, cos, sin, half);
      for (int64_t h = 0; h < kv_heads; ++h) rotate_row(kp + t * ks + h * dim, cos, sin, half);
      const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::copy_n(kp + t * ks + h * dim, dim,
                    cache_row(kc, block, h, offset, kv_heads, block_size, dim));
        std::copy_n(vp + t * vs + h * dim, dim,
                    cache_row(vc, block, h, offset, kv_heads, block_size, dim));
      }
    }
  });
}

void check_heads(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " must be [tokens, heads, head_dim] with contiguous heads");
}

void rope_and_cache(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos_sin, at::Tensor k_cache, at::Tensor v_cache,
                    const at::Tensor& slot_mapping) {
  check_cpu(q, "q");
  check_heads(q, "q");
  check_heads(k, "k");
  check_heads(v, "v");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.size(1) == k.size(1) && k_cache.size(3) == k.size(2),
              "caches must be contiguous [blocks, kv_heads, block_size, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong,
              "positions and slot_mapping must be int64");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous(),
              "cos_sin must be contiguous float32");
  dispatch_float_types(q, "rope_and_cache", [&](auto t) {
    rope_and_cache_impl<decltype(t)>(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping);
  });
}

// ---------------------------------------------------------------- paged attention
// Each query token t attends to keys 0..positions[t] of its sequence, read in
// place from the paged cache through block_tables[token_seq[t]]. The query
// heads that share a KV head are done together, so each key is read once.

// Softmax numerators of one row in place; returns their sum.
inline float exp_shifted(float* scores, int64_t len) {
  const float top = *std::max_element(scores, scores + len);
  float sum = 0.f;
  int64_t p = 0;
#ifdef __AVX512F__
  __m512 total = _mm512_setzero_ps();
  for (; p + 16 <= len; p += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + p), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + p, e);
    total = _mm512_add_ps(total, e);
  }
  sum = _mm512_reduce_add_ps(total);
#endif
  for (; p < len; ++p) {
    scores[p] = std::exp(scores[p] - top);
    sum += scores[p];
  }
  return sum;
}

// scores[h * stride] = q_h . key for each of the group's heads; q holds them in float32.
template <typename T>
inline void dot_heads(const float* q, const T* key, int64_t group, int64_t dim, float* scores,
                      int64_t stride) {
#ifdef __AVX512F__
  if (dim % 16 == 0) {
    for (int64_t h = 0; h < group; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * dim + d), load16(key + d), acc);
      }
      scores[h * stride] = _mm512_reduce_add_ps(acc);
    }
    return;
  }
#endif
  for (int64_t h = 0; h < group; ++h) {
    float dot = 0.f;
    for (int64_t d = 0; d < dim; ++d) dot += q[h * dim + d] * to_f32(key[d]);
    scores[h * stride] = dot;
  }
}

// acc_h += w[h * stride] * value for each of the group's heads.
template <typename T>
inline void axpy_heads(const float* w, int64_t stride, const T* value, int64_t group, int64_t dim,
                       float* acc) {
#ifdef __AVX512F__
  if (dim % 16 == 0) {
    for (int64_t d = 0; d < dim; d += 16) {
      const __m512 v = load16(value + d);
      for (int64_t h = 0; h < group; ++h) {
        float* a = acc + h * dim + d;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(w[h * stride]), v, _mm512_loadu_ps(a)));
      }
    }
    return;
  }
#endif
  for (int64_t h = 0; h < group; ++h) {
    for (int64_t d = 0; d < dim; ++d) acc[h * dim + d] += w[h * stride] * to_f32(value[d]);
  }
}

#ifdef __AVX512F__
// Asks for one cache row a block ahead of its use. A sequence's blocks lie scattered over
// the cache, where the hardware prefetcher cannot follow: without this, decoding 32
// sequences read scattered keys and values at 9-11 GB/s, with it at 14-16, measured
// with the cache's earlier layout of all heads' rows interleaved
// (benchmarks/bench_attention.py).
template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * int64_t(sizeof(T)); b += 64) _mm_prefetch(bytes + b, _MM_HINT_T0);
}

// One token's query heads that share KV head g, for head_dim = 16 C and G heads per KV
// head, with the G x C accumulators held in registers: the keys and values of the
// sequence stream through once. scores is scratch of G * len floats.
template <int C, int G, typename T>
void attend_kv_head(const float* q, const T* kc, const T* vc, const int64_t* blocks,
                    int64_t block_size, int64_t kv_heads, int64_t g, int64_t len, float* scores,
                    T* out) {
  constexpr int64_t dim = 16 * C;
  __m512 qv[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = _mm512_loadu_ps(q + h * dim + 16 * c);
  // KV head g's row of position p, which lies in the sequence's block b.
  auto row = [&](const T* cache, int64_t b, int64_t p) {
    return cache_row(cache, blocks[b], g, p % block_size, kv_heads, block_size, dim);
  };
  const int64_t last_block = (len - 1) / block_size;
  for (int64_t p = 0; p < len; ++p) {
    const int64_t b = p / block_size;
    if (b < last_block) prefetch_row(row(kc, b + 1, p), dim);
    const T* key = row(kc, b, p);
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = load16(key + 16 * c);
    for (int h = 0; h < G; ++h) {
      __m512 dot = _mm512_mul_ps(qv[h][0], kv[0]);
      for (int c = 1; c < C; ++c) dot = _mm512_fmadd_ps(qv[h][c], kv[c], dot);
      scores[h * len + p] = _mm512_reduce_add_ps(dot);
    }
  }
  float inv[G];
  for (int h = 0; h < G; ++h) inv[h] = 1.f / exp_shifted(scores + h * len, len);
  __m512 acc[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < len; ++p) {
    const int64_t b = p / block_size;
    if (b < last_block) prefetch_row(row(vc, b + 1, p), dim);
    const T* value = row(vc, b, p);
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(value + 16 * c);
    for (int h = 0; h < G; ++h) {
      const __m512 w = _mm512_set1_ps(scores[h * len + p]);
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(w, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h) {
    for (int c = 0; c < C; ++c) {
      store16(out + h * dim + 16 * c, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
    }
  }
}

template <typename T>
using AttendKvHead = void (*)(const float*, const T*, const T*, const int64_t*, int64_t, int64_t,
                              int64_t, int64_t, float*, T*);

// The register-blocked attend_kv_head for this shape, or nullptr.
template <typename T>
AttendKvHead<T> attend_kv_head_for(int64_t dim, int64_t group) {
  if (dim == 64) {
    switch (group) {
      case 1: return attend_kv_head<4, 1, T>;
      case 2: return attend_kv_head<4, 2, T>;
      case 3: return attend_kv_head<4, 3, T>;
      case 4: return attend_kv_head<4, 4, T>;
      case 5: return attend_kv_head<4, 5, T>;
      case 6: return attend_kv_head<4, 6, T>;
    }
  } else if (dim == 128) {
    switch (group) {
      case 1: return attend_kv_head<8, 1, T>;
      case 2: return attend_kv_head<8, 2, T>;
      case 3: return attend_kv_head<8, 3, T>;
    }
  }
  return nullptr;
}
#endif

template <typename T>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables,
                          const at::Tensor& token_seq, const at::Tensor& positions, double scale,
                          at::Tensor& out) {
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = heads / kv_heads, num_blocks = k_cache.size(0);
  const T* qp = q.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seq = token_seq.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t qs = q.stride(0), table_stride = block_tables.stride(0);
  const float s = static_cast<float>(scale);

#ifdef __AVX512F__
  if (AttendKvHead<T> attend = attend_kv_head_for<T>(dim, group)) {
    at::parallel_for(0, tokens * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(group * dim), scores;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / kv_heads, g = item % kv_heads, len = pos[t] + 1;
        const int64_t* blocks = tables + seq[t] * table_stride;
        check_blocks(blocks, len, block_size, num_blocks);
        const T* row = qp + t * qs + g * group * dim;
        for (int64_t i = 0; i < group * dim; ++i) qf[i] = to_f32(row[i]) * s;
        scores.resize(group * len);
        attend(qf.data(), kc, vc, blocks, block_size, kv_heads, g, len, scores.data(),
               op + (t * heads + g * group) * dim);
      }
    });
    return;
  }
#endif
  // One token at a time, all its heads together, its keys read head by head (a block
  // holds each KV head's rows together).
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * dim), acc(heads * dim), scores, sums(heads);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t len = pos[t] + 1;
      const int64_t* blocks = tables + seq[t] * table_stride;
      check_blocks(blocks, len, block_size, num_blocks);
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] = to_f32(qp[t * qs + i]) * s;
      scores.resize(heads * len);
      auto row = [&](const T* cache, int64_t g, int64_t p) {
        return cache_row(cache, blocks[p / block_size], g, p % block_size, kv_heads, block_size,
                         dim);
      };
      for (int64_t g = 0; g < kv_heads; ++g) {
        for (int64_t p = 0; p < len; ++p) {
          dot_heads(&qf[g * group * dim], row(kc, g, p), group, dim, &scores[g * group * len + p],
                    len);
        }
      }
      for (int64_t h = 0; h < heads; ++h) sums[h] = exp_shifted(&scores[h * len], len);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < kv_heads; ++g) {
        for (int64_t p = 0; p < len; ++p) {
          axpy_heads(&scores[g * group * len + p], len, row(vc, g, p), group, dim,
                     &acc[g * group * dim]);
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* o = op + (t * heads + h) * dim;
        const float inv = 1.f / sums[h];
        for (int64_t d = 0; d < dim; ++d) o[d] = from_f32<T>(acc[h * dim + d] * inv);
      }
    }
  });
}

// The arguments of paged_attention and prompt_attention.
void check_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables,
                          const at::Tensor& token_seq, const at::Tensor& positions) {
  check_cpu(q, "q");
  check_heads(q, "q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "caches must be contiguous [blocks, kv_heads, block_size, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.stride(1) == 1,
              "block_tables must be int64 with contiguous rows");
  TORCH_CHECK(token_seq.is_contiguous() && positions.is_contiguous(),
              "token_seq and positions must be contiguous");
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& token_seq, const at::Tensor& positions,
                           double scale) {
  check_attention_args(q, k_cache, v_cache, block_tables, token_seq, positions);
  at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  dispatch_float_types(q, "paged_attention", [&](auto t) {
    paged_attention_impl<decltype(t)>(q, k_cache, v_cache, block_tables, token_seq, positions,
                                      scale, out);
  });
  return out;
}

#ifdef __AVX512BF16__
// ---------------------------------------------------------------- prompt attention
// The queries of prompt chunks (runs of consecutive tokens of a sequence), bfloat16
// only, flash-style: a tile of up to 16 consecutive tokens with the query heads that
// share KV head g reads each cached key and value row once, and only the keys up to
// its last token's position, so the causal half of the square is skipped. Scores
// are float32 with token t in lane t of a vector: the softmax runs over the keys
// 16 at a time with vertical operations, rescaling what it has summed when the
// running maximum grows. Products take bfloat16 pairs (vdpbf16ps) into float32
// sums; the probabilities are rounded to bfloat16 for the product with the values,
// as the two-matmul path rounds them.

constexpr int kTile = 16;  // tokens per tile: the lanes of a vector
constexpr int kKeys = 16;  // keys per step of the softmax

// Lane t holds the bfloat16 pair (lo[t], hi[t]).
inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i b = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
}

// Lane i holds the bfloat16 pair (a[i], b[i]) of two rows.
inline __m512i bf16_pairs(const at::BFloat16* a, const at::BFloat16* b) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// One tile: the n tokens whose rows start at q, q_stride apart, at positions
// pos0..pos0+n-1 of the sequence with block table `blocks`; query heads g*G..g*G+G-1,
// each of DP bfloat16 pairs (head_dim 2 DP); output rows out_stride apart.
template <int G, int DP>
void prompt_tile(const at::BFloat16* q, int64_t q_stride, int64_t n, int64_t pos0,
                 const int64_t* blocks, const at::BFloat16* kc, const at::BFloat16* vc,
                 int64_t block_size, int64_t kv_heads, int64_t g, float scale, at::BFloat16* out,
                 int64_t out_stride) {
  // Scores of KC keys at a time: G x KC accumulators, held in registers.
  constexpr int D = 2 * DP, KC = G <= 3 ? 8 : 4;
  // Queries as bfloat16 pairs, token t in lane t; lanes past n repeat the last token
  // (a valid query whose result is not stored).
  alignas(64) int32_t qp[G][DP][kTile];
  for (int t = 0; t < kTile; ++t) {
    const auto* row = reinterpret_cast<const int32_t*>(q + std::min<int64_t>(t, n - 1) * q_stride);
    for (int h = 0; h < G; ++h)
      for (int i = 0; i < DP; ++i) qp[h][i][t] = row[(g * G + h) * DP + i];
  }
  const __m512i pos = _mm512_min_epi32(
      _mm512_add_epi32(_mm512_set1_epi32(int32_t(pos0)),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
      _mm512_set1_epi32(int32_t(pos0 + n - 1)));
  const int64_t len = pos0 + n;  // keys 0..len-1
  __m512 top[G], sum[G];
  for (int h = 0; h < G; ++h) {
    top[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    sum[h] = _mm512_setzero_ps();
  }
  alignas(64) float acc[G][kTile][D];        // token t's output of head h, unnormalised
  alignas(64) float s[G][kKeys][kTile];      // scores, then probabilities, of 16 keys
  alignas(64) int32_t p2[G][kKeys / 2][kTile];  // probabilities as pairs of keys
  alignas(64) int32_t v2[kKeys / 2][D];      // values as pairs of keys
  alignas(64) float corr[kTile];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t k0 = 0; k0 < len; k0 += kKeys) {
    const int64_t nk = std::min<int64_t>(kKeys, len - k0);
    const at::BFloat16* krow[kKeys];
    const at::BFloat16* vrow[kKeys];
    for (int j = 0; j < kKeys; ++j) {  // keys past nk repeat the last one; masked below
      const int64_t p = k0 + std::min<int64_t>(j, nk - 1);
      const int64_t block = blocks[p / block_size], offset = p % block_size;
      krow[j] = cache_row(kc, block, g, offset, kv_heads, block_size, D);
      vrow[j] = cache_row(vc, block, g, offset, kv_heads, block_size, D);
    }
    for (int c = 0; c < kKeys; c += KC) {
      __m512 sc[G][KC];
      for (int h = 0; h < G; ++h)
        for (int j = 0; j < KC; ++j) sc[h][j] = _mm512_setzero_ps();
      for (int i = 0; i < DP; ++i) {
        __m512i qv[G];
        for (int h = 0; h < G; ++h) qv[h] = _mm512_load_si512(qp[h][i]);
        for (int j = 0; j < KC; ++j) {
          const __m512i kb =
              _mm512_set1_epi32(reinterpret_cast<const int32_t*>(krow[c + j])[i]);
          for (int h = 0; h < G; ++h) sc[h][j] = dot_pairs(sc[h][j], qv[h], kb);
        }
      }
      for (int h = 0; h < G; ++h)
        for (int j = 0; j < KC; ++j) _mm512_store_ps(s[h][c + j], sc[h][j]);
    }
    __mmask16 keep[kKeys];  // lanes whose token may see key k0 + j
    for (int j = 0; j < kKeys; ++j) {
      keep[j] = j < nk ? _mm512_cmp_epi32_mask(_mm512_set1_epi32(int32_t(k0 + j)), pos,
                                               _MM_CMPINT_LE)
                       : __mmask16(0);
    }
    for (int h = 0; h < G; ++h) {
      __m512 m = top[h];
      for (int j = 0; j < kKeys; ++j) {  // scaled here in float32, not the bfloat16 queries
        const __m512 x = _mm512_mul_ps(_mm512_load_ps(s[h][j]), _mm512_set1_ps(scale));
        _mm512_store_ps(s[h][j], x);
        m = _mm512_mask_max_ps(m, keep[j], m, x);
      }
      if (_mm512_cmp_ps_mask(m, top[h], _CMP_NEQ_UQ)) {  // rescale what was summed
        const __m512 c = exp16(_mm512_sub_ps(top[h], m));
        sum[h] = _mm512_mul_ps(sum[h], c);
        _mm512_store_ps(corr, c);
        if (k0 > 0) {
          for (int t = 0; t < n; ++t) {
            const __m512 ct = _mm512_set1_ps(corr[t]);
            for (int d = 0; d < D; d += 16) {
              _mm512_store_ps(acc[h][t] + d, _mm512_mul_ps(_mm512_load_ps(acc[h][t] + d), ct));
            }
          }
        }
        top[h] = m;
      }
      for (int j = 0; j < kKeys; ++j) {
        const __m512 e = _mm512_maskz_mov_ps(keep[j], exp16(_mm512_sub_ps(_mm512_load_ps(s[h][j]), m)));
        sum[h] = _mm512_add_ps(sum[h], e);
        _mm512_store_ps(s[h][j], e);
      }
      for (int j = 0; j < kKeys / 2; ++j) {
        _mm512_store_si512(p2[h][j], bf16_pairs(_mm512_load_ps(s[h][2 * j]),
                                                _mm512_load_ps(s[h][2 * j + 1])));
      }
    }
    for (int j = 0; j < kKeys / 2; ++j) {
      for (int d = 0; d < D; d += 16) {
        _mm512_store_si512(v2[j] + d, bf16_pairs(vrow[2 * j] + d, vrow[2 * j + 1] + d));
      }
    }
    for (int h = 0; h < G; ++h) {
      for (int t = 0; t < n; ++t) {
        for (int d = 0; d < D; d += 16) {
          __m512 a = _mm512_load_ps(acc[h][t] + d);
          for (int j = 0; j < kKeys / 2; ++j) {
            a = dot_pairs(a, _mm512_load_si512(v2[j] + d), _mm512_set1_epi32(p2[h][j][t]));
          }
          _mm512_store_ps(acc[h][t] + d, a);
        }
      }
    }
  }
  for (int h = 0; h < G; ++h) {
    alignas(64) float total[kTile];
    _mm512_store_ps(total, sum[h]);
    for (int t = 0; t < n; ++t) {
      const __m512 inv = _mm512_set1_ps(1.f / total[t]);
      at::BFloat16* o = out + t * out_stride + (g * G + h) * D;
      for (int d = 0; d < D; d += 16) store16(o + d, _mm512_mul_ps(_mm512_load_ps(acc[h][t] + d), inv));
    }
  }
}

using PromptTile = void (*)(const at::BFloat16*, int64_t, int64_t, int64_t, const int64_t*,
                            const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, int64_t,
                            float, at::BFloat16*, int64_t);

template <int DP>
PromptTile prompt_tile_for_group(int64_t group) {
  switch (group) {
    case 1: return prompt_tile<1, DP>;
    case 2: return prompt_tile<2, DP>;
    case 3: return prompt_tile<3, DP>;
    case 4: return prompt_tile<4, DP>;
    case 5: return prompt_tile<5, DP>;
    case 6: return prompt_tile<6, DP>;
  }
  return nullptr;
}

PromptTile prompt_tile_for(int64_t dim, int64_t group) {
  if (dim == 64) return prompt_tile_for_group<32>(group);
  if (dim == 128) return prompt_tile_for_group<64>(group);
  return nullptr;
}

// Attention of tokens to their sequences' cached keys, as paged_attention, for runs
// of consecutive tokens (prompt chunks); bfloat16, head_dim 64 or 128, 1-6 query
// heads per KV head.
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& token_seq, const at::Tensor& positions,
                            double scale) {
  check_attention_args(q, k_cache, v_cache, block_tables, token_seq, positions);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "prompt_attention takes bfloat16");
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t num_blocks = k_cache.size(0), table_stride = block_tables.stride(0);
  const PromptTile tile = prompt_tile_for(dim, heads / kv_heads);
  TORCH_CHECK(tile != nullptr, "prompt_attention: unsupported head shape");
  const int64_t* seq = token_seq.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  // Tiles: up to kTile consecutive tokens of one sequence at consecutive positions.
  std::vector<int64_t> starts;
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(seq[t] >= 0 && seq[t] < block_tables.size(0) && pos[t] >= 0,
                "token_seq and positions must index block_tables");
    if (t == 0 || seq[t] != seq[t - 1] || pos[t] != pos[t - 1] + 1 ||
        t - starts.back() == kTile) {
      starts.push_back(t);
    }
  }
  const int64_t num_tiles = starts.size();
  starts.push_back(tokens);
  for (int64_t i = 0; i < num_tiles; ++i) {  // every block a tile will read
    const int64_t last = starts[i + 1] - 1, used = pos[last] / block_size + 1;
    TORCH_CHECK(used <= block_tables.size(1), "block_tables is too short for position ",
                pos[last]);
    check_blocks(tables + seq[last] * table_stride, pos[last] + 1, block_size, num_blocks);
  }
  at::Tensor out = at::empty({tokens, heads * dim}, q.options());
  const auto* qp = q.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const auto* kc = k_cache.data_ptr<at::BFloat16>();
  const auto* vc = v_cache.data_ptr<at::BFloat16>();
  const float s = static_cast<float>(scale);
  // Later tiles read more keys: hand the items out longest first.
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t item = num_tiles * kv_heads - 1; item >= 0; --item) {
    const int64_t i = item / kv_heads, g = item % kv_heads, first = starts[i];
    tile(qp + first * q.stride(0), q.stride(0), starts[i + 1] - first, pos[first],
         tables + seq[first] * table_stride, kc, vc, block_size, kv_heads, g, s,
         op + first * heads * dim, heads * dim);
  }
  return out;
}
#endif  // __AVX512BF16__

// ---------------------------------------------------------------- causal softmax
// The softmax of prompt attention: row (s, ..., j) of scores [S, ..., Q, L] keeps
// keys 0..query_pos[s, j] and gives the rest probability 0. In float32, rounded to
// T once at the end: one pass instead of a float copy, a bias add, a softmax and
// a copy back.
template <typename T>
void causal_softmax_impl(const at::Tensor& scores, const at::Tensor& query_pos, at::Tensor& out) {
  const int64_t seqs = scores.size(0), q_len = scores.size(-2), keys = scores.size(-1);
  const int64_t rows = scores.numel() / keys, per_seq = rows / seqs;
  const T* sp = scores.data_ptr<T>();
  const int64_t* qp = query_pos.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(keys);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t len = std::min(qp[(r / per_seq) * q_len + r % q_len] + 1, keys);
      TORCH_CHECK(len > 0, "query positions must be >= 0");
      const T* row = sp + r * keys;
      T* o = op + r * keys;
      int64_t p = 0;
#ifdef __AVX512F__
      for (; p + 16 <= len; p += 16) _mm512_storeu_ps(buf.data() + p, load16(row + p));
#endif
      for (; p < len; ++p) buf[p] = to_f32(row[p]);
      const float inv = 1.f / exp_shifted(buf.data(), len);
      p = 0;
#ifdef __AVX512F__
      for (; p + 16 <= len; p += 16) {
        store16(o + p, _mm512_mul_ps(_mm512_loadu_ps(buf.data() + p), _mm512_set1_ps(inv)));
      }
#endif
      for (; p < len; ++p) o[p] = from_f32<T>(buf[p] * inv);
      std::fill(o + len, o + keys, from_f32<T>(0.f));
    }
  });
}

at::Tensor causal_softmax(const at::Tensor& scores, const at::Tensor& query_pos) {
  check_cpu(scores, "scores");
  TORCH_CHECK(scores.dim() >= 3 && scores.is_contiguous(), "scores must be contiguous [S, ..., Q, L]");
  TORCH_CHECK(query_pos.scalar_type() == at::kLong && query_pos.is_contiguous() &&
                  query_pos.dim() == 2 && query_pos.size(0) == scores.size(0) &&
                  query_pos.size(1) == scores.size(-2),
              "query_pos must be contiguous int64 [S, Q]");
  at::Tensor out = at::empty_like(scores);
  dispatch_float_types(scores, "causal_softmax", [&](auto t) {
    causal_softmax_impl<decltype(t)>(scores, query_pos, out);
  });
  return out;
}

// ---------------------------------------------------------------- Q8_0 matrix product
// out = x @ W.T in float32 for a weight stored as GGUF's Q8_0 blocks: row n, block b
// is scales[n, b] * codes[n, 32 b : 32 b + 32]. For a few rows of x, where reading
// the weight is the whole cost and 1 byte per weight beats bfloat16's 2.
template <typename T>
void q8_0_linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1), n = codes.size(0), blocks = k / 32;
  std::vector<float> xf(rows * k);
  for (int64_t i = 0; i < rows * k; ++i) xf[i] = to_f32(x.data_ptr<T>()[i]);
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int8_t* c = cp + j * k;
      const float* d = sp + j * blocks;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xf.data() + r * k;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; ++b) {
          const int8_t* cb = c + b * 32;
          const __m512 lo = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb))));
          const __m512 hi = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + 16))));
          const __m512 dot = _mm512_fmadd_ps(
              hi, _mm512_loadu_ps(xr + b * 32 + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xr + b * 32)));
          acc = _mm512_fmadd_ps(_mm512_set1_ps(d[b]), dot, acc);
        }
        op[r * n + j] = _mm512_reduce_add_ps(acc);
#else
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          float dot = 0.f;
          for (int64_t i = 0; i < 32; ++i) dot += c[b * 32 + i] * xr[b * 32 + i];
          acc += d[b] * dot;
        }
        op[r * n + j] = acc;
#endif
      }
    }
  });
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 32 == 0,
              "x must be contiguous [rows, k] with k a multiple of 32");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() &&
                  codes.dim() == 2 && codes.size(1) == x.size(1),
              "codes must be contiguous int8 [n, k]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == codes.size(0) && scales.size(1) == x.size(1) / 32,
              "scales must be contiguous float32 [n, k / 32]");
  at::Tensor out = at::empty({x.size(0), codes.size(0)}, x.options().dtype(at::kFloat));
  dispatch_float_types(x, "q8_0_linear", [&](auto t) {
    q8_0_linear_impl<decltype(t)>(x, codes, scales, out);
  });
  return out;
}

// ---------------------------------------------------------------- greedy sampling
// The index of each row's largest value, the first where several tie, as torch.argmax
// gives it (a NaN counts as the largest). ATen's argmax over the last dimension runs
// one scalar loop a row: 1.2 ms for 32 rows of 49152 logits here, against a find of
// the maximum (vectorized) and then of its first place.

// A NaN test that -ffast-math cannot assume away.
inline bool is_nan(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7fffffffu) > 0x7f800000u;
}

int64_t argmax_row(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 best = _mm512_set1_ps(top);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
    if (_mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f800000))) break;  // NaN: below
    best = _mm512_max_ps(best, v);
  }
  top = _mm512_reduce_max_ps(best);
#endif
  for (; i < n; ++i) {
    if (is_nan(x[i])) return i;
    top = std::max(top, x[i]);
  }
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= n; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), _mm512_set1_ps(top), _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < n; ++j) {
    if (x[j] == top) return j;
  }
  return 0;  // only for a row of -inf and NaN-free: torch.argmax also gives 0
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be contiguous float32 [rows, n]");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(1);
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * n, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pagoda, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def(
      "rope_and_cache(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, Tensor cos_sin, "
      "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor token_seq, Tensor positions, float scale) -> Tensor");
  m.def("causal_softmax(Tensor scores, Tensor query_pos) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
#ifdef __AVX512BF16__
  m.def(
      "prompt_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor token_seq, Tensor positions, float scale) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(pagoda, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("paged_attention", &paged_attention);
  m.impl("causal_softmax", &causal_softmax);
  m.impl("q8_0_linear", &q8_0_linear);
  m.impl("argmax_rows", &argmax_rows);
#ifdef __AVX512BF16__
  m.impl("prompt_attention", &prompt_attention);
#endif
}
