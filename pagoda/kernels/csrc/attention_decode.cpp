// Attention over the paged cache, one query token at a time (decode steps):
// torch.ops.pagoda.paged_attention.
// The PyTorch twin that defines what it computes: pagoda/model/ops/attention.py.

#include "kv_cache.h"
#include <vector>

namespace pagoda {
namespace {

// Each query token t attends to keys 0..positions[t] of its sequence (with a sliding
// window, only the last `window` of them: the blocks before are not read), in place
// from the paged cache through block_tables[token_seq[t]]. The query
// heads that share a KV head are done together, so each key is read once.

// scores[h * stride] = q_h . key for each of the group's heads; q holds them in float32.
template <typename T>
inline void dot_heads(const float* q, const T* key, int64_t group, int64_t dim, float* scores,
                      int64_t stride) {
#ifdef PAGODA_VEC
  if (dim % vec::kLanes == 0) {
    for (int64_t h = 0; h < group; ++h) {
      vec::F32 acc = vec::zero();
      for (int64_t d = 0; d < dim; d += vec::kLanes) {
        acc = vec::fmadd(vec::load(q + h * dim + d), vec::load(key + d), acc);
      }
      scores[h * stride] = vec::sum(acc);
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
#ifdef PAGODA_VEC
  if (dim % vec::kLanes == 0) {
    for (int64_t d = 0; d < dim; d += vec::kLanes) {
      const vec::F32 v = vec::load(value + d);
      for (int64_t h = 0; h < group; ++h) {
        float* a = acc + h * dim + d;
        vec::store(a, vec::fmadd(vec::set1(w[h * stride]), v, vec::load(a)));
      }
    }
    return;
  }
#endif
  for (int64_t h = 0; h < group; ++h) {
    for (int64_t d = 0; d < dim; ++d) acc[h * dim + d] += w[h * stride] * to_f32(value[d]);
  }
}

#ifdef PAGODA_VEC
// Asks for one cache row a block ahead of its use. A sequence's blocks lie scattered over
// the cache, where the hardware prefetcher cannot follow: without this, decoding 32
// sequences read scattered keys and values at 9-11 GB/s, with it at 14-16, measured
// with the cache's earlier layout of all heads' rows interleaved
// (benchmarks/bench_attention.py).
template <typename K>
inline void prefetch_row(const K* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * int64_t(sizeof(K)); b += 64) _mm_prefetch(bytes + b, _MM_HINT_T0);
}

// One token's query heads that share KV head g, for head_dim = C vectors and G heads per
// KV head, with the G x C accumulators held in registers (with AVX-512; AVX2 has half the
// registers of half the width, and keeps some in L1): the keys first..len-1 and their
// values stream through once. scores is scratch of G * (len - first) floats. K: the caches'
// element type, T: the output's.
template <int C, int G, typename T, typename K>
void attend_kv_head(const float* q, const K* kc, const K* vc, const int64_t* blocks,
                    int64_t block_size, int64_t kv_heads, int64_t g, int64_t first, int64_t len,
                    float* scores, T* out) {
  constexpr int64_t dim = C * vec::kLanes;
  const int64_t n = len - first;  // scores[h * n + p - first]: head h, key p
  vec::F32 qv[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = vec::load(q + h * dim + c * vec::kLanes);
  // KV head g's row of position p, which lies in the sequence's block b.
  auto row = [&](const K* cache, int64_t b, int64_t p) {
    return cache_row(cache, blocks[b], g, p % block_size, kv_heads, block_size, dim);
  };
  const int64_t last_block = (len - 1) / block_size;
  for (int64_t p = first; p < len; ++p) {
    const int64_t b = p / block_size;
    if (b < last_block) prefetch_row(row(kc, b + 1, p), dim);
    const K* key = row(kc, b, p);
    vec::F32 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = vec::load(key + c * vec::kLanes);
    for (int h = 0; h < G; ++h) {
      vec::F32 dot = vec::mul(qv[h][0], kv[0]);
      for (int c = 1; c < C; ++c) dot = vec::fmadd(qv[h][c], kv[c], dot);
      scores[h * n + p - first] = vec::sum(dot);
    }
  }
  float inv[G];
  for (int h = 0; h < G; ++h) inv[h] = 1.f / exp_shifted(scores + h * n, n);
  vec::F32 acc[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = vec::zero();
  for (int64_t p = first; p < len; ++p) {
    const int64_t b = p / block_size;
    if (b < last_block) prefetch_row(row(vc, b + 1, p), dim);
    const K* value = row(vc, b, p);
    vec::F32 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = vec::load(value + c * vec::kLanes);
    for (int h = 0; h < G; ++h) {
      const vec::F32 w = vec::set1(scores[h * n + p - first]);
      for (int c = 0; c < C; ++c) acc[h][c] = vec::fmadd(w, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h) {
    for (int c = 0; c < C; ++c) {
      vec::store(out + h * dim + c * vec::kLanes, vec::mul(acc[h][c], vec::set1(inv[h])));
    }
  }
}

template <typename T, typename K>
using AttendKvHead = void (*)(const float*, const K*, const K*, const int64_t*, int64_t, int64_t,
                              int64_t, int64_t, int64_t, float*, T*);

// The register-blocked attend_kv_head for this shape, or nullptr.
template <typename T, typename K>
AttendKvHead<T, K> attend_kv_head_for(int64_t dim, int64_t group) {
  constexpr int C64 = 64 / vec::kLanes, C128 = 128 / vec::kLanes;
  if (dim == 64) {
    switch (group) {
      case 1: return attend_kv_head<C64, 1, T, K>;
      case 2: return attend_kv_head<C64, 2, T, K>;
      case 3: return attend_kv_head<C64, 3, T, K>;
      case 4: return attend_kv_head<C64, 4, T, K>;
      case 5: return attend_kv_head<C64, 5, T, K>;
      case 6: return attend_kv_head<C64, 6, T, K>;
    }
  } else if (dim == 128) {
    switch (group) {
      case 1: return attend_kv_head<C128, 1, T, K>;
      case 2: return attend_kv_head<C128, 2, T, K>;
      case 3: return attend_kv_head<C128, 3, T, K>;
      // Llama 3 8B's shape: more accumulators than registers on either ISA, some kept in L1,
      // still 1.8-3.1x the general loop on AVX2 (BENCHMARKS.md, section 13).
      case 4: return attend_kv_head<C128, 4, T, K>;
    }
  }
  return nullptr;
}
#endif

// T: q's and the output's element type, K: the caches' (T's, or bfloat16 under float32).
template <typename T, typename K>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables,
                          const at::Tensor& token_seq, const at::Tensor& positions, double scale,
                          const std::optional<int64_t>& window, at::Tensor& out) {
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = heads / kv_heads, num_blocks = k_cache.size(0);
  const T* qp = q.data_ptr<T>();
  const K* kc = k_cache.data_ptr<K>();
  const K* vc = v_cache.data_ptr<K>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seq = token_seq.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t qs = q.stride(0), table_stride = block_tables.stride(0);
  const float s = static_cast<float>(scale);
  check_token_rows(block_tables, seq, pos, tokens, block_size);

#ifdef PAGODA_VEC
  if (AttendKvHead<T, K> attend = attend_kv_head_for<T, K>(dim, group)) {
    at::parallel_for(0, tokens * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(group * dim), scores;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / kv_heads, g = item % kv_heads, len = pos[t] + 1;
        const int64_t first = window_start(pos[t], window);
        const int64_t* blocks = tables + seq[t] * table_stride;
        check_blocks(blocks, first, len, block_size, num_blocks);
        const T* row = qp + t * qs + g * group * dim;
        for (int64_t i = 0; i < group * dim; ++i) qf[i] = to_f32(row[i]) * s;
        scores.resize(group * (len - first));
        attend(qf.data(), kc, vc, blocks, block_size, kv_heads, g, first, len, scores.data(),
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
      const int64_t len = pos[t] + 1, first = window_start(pos[t], window), n = len - first;
      const int64_t* blocks = tables + seq[t] * table_stride;
      check_blocks(blocks, first, len, block_size, num_blocks);
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] = to_f32(qp[t * qs + i]) * s;
      scores.resize(heads * n);
      auto row = [&](const K* cache, int64_t g, int64_t p) {
        return cache_row(cache, blocks[p / block_size], g, p % block_size, kv_heads, block_size,
                         dim);
      };
      for (int64_t g = 0; g < kv_heads; ++g) {
        for (int64_t p = first; p < len; ++p) {
          dot_heads(&qf[g * group * dim], row(kc, g, p), group, dim,
                    &scores[g * group * n + p - first], n);
        }
      }
      for (int64_t h = 0; h < heads; ++h) sums[h] = exp_shifted(&scores[h * n], n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < kv_heads; ++g) {
        for (int64_t p = first; p < len; ++p) {
          axpy_heads(&scores[g * group * n + p - first], n, row(vc, g, p), group, dim,
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

}  // namespace

bool paged_attention_blocked(int64_t head_dim, int64_t heads_per_kv) {
#ifdef PAGODA_VEC
  return attend_kv_head_for<float, float>(head_dim, heads_per_kv) != nullptr;
#else
  return false;
#endif
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& token_seq, const at::Tensor& positions,
                           double scale, std::optional<int64_t> window) {
  check_attention_args(q, k_cache, v_cache, block_tables, token_seq, positions);
  check_window(window);
  at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  dispatch_cache_types(q, k_cache, "paged_attention", [&](auto t, auto c) {
    paged_attention_impl<decltype(t), decltype(c)>(q, k_cache, v_cache, block_tables, token_seq,
                                                   positions, scale, window, out);
  });
  return out;
}

}  // namespace pagoda
