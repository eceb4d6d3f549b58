// The paged KV cache as the attention kernels and the cache write address it, and the
// checks of the arguments that describe it.

#pragma once

#include <optional>

#include "simd.h"

namespace pagoda {

// KV head g's row `offset` of a block, in a cache laid out [blocks, kv_heads, block_size,
// head_dim]: each KV head's rows of a block lie together.
template <typename T>
inline T* cache_row(T* cache, int64_t block, int64_t g, int64_t offset, int64_t kv_heads,
                    int64_t block_size, int64_t dim) {
  return cache + ((block * kv_heads + g) * block_size + offset) * dim;
}

// That the blocks holding positions first..len-1 of a sequence lie in the cache.
inline void check_blocks(const int64_t* blocks, int64_t first, int64_t len, int64_t block_size,
                         int64_t num_blocks) {
  for (int64_t b = first / block_size; b * block_size < len; ++b) {
    TORCH_CHECK(blocks[b] >= 0 && blocks[b] < num_blocks, "block ", blocks[b],
                " is out of the cache");
  }
}

// That each token's sequence has a row of block_tables, long enough for its position.
inline void check_token_rows(const at::Tensor& block_tables, const int64_t* seq,
                             const int64_t* pos, int64_t tokens, int64_t block_size) {
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(seq[t] >= 0 && seq[t] < block_tables.size(0) && pos[t] >= 0,
                "token_seq and positions must index block_tables");
    TORCH_CHECK(pos[t] / block_size < block_tables.size(1),
                "block_tables is too short for position ", pos[t]);
  }
}

// The first key a query at position pos sees: with a sliding window of W positions it
// sees keys pos - W < p <= pos (a layer of local attention), without one keys 0..pos.
inline int64_t window_start(int64_t pos, const std::optional<int64_t>& window) {
  return window ? std::max<int64_t>(0, pos - *window + 1) : 0;
}

inline void check_window(const std::optional<int64_t>& window) {
  TORCH_CHECK(!window || *window >= 1, "window must be at least 1 position, got ", *window);
}

inline void check_heads(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " must be [tokens, heads, head_dim] with contiguous heads");
}

// The caches hold q's dtype, or bfloat16 under a float32 q (--kv-cache-dtype bfloat16).
inline void check_cache_dtype(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache) {
  const auto cache = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == cache &&
                  (cache == q.scalar_type() ||
                   (q.scalar_type() == at::kFloat && cache == at::kBFloat16)),
              "the caches must hold q's dtype, or bfloat16 under a float32 q; got q ",
              q.scalar_type(), " and caches ", cache, " and ", v_cache.scalar_type());
}

// f(T{}, C{}) for q's element type T and the caches' C (checked by check_cache_dtype).
template <typename F>
inline void dispatch_cache_types(const at::Tensor& q, const at::Tensor& cache, const char* op,
                                 F&& f) {
  if (q.scalar_type() == at::kFloat && cache.scalar_type() == at::kBFloat16) {
    f(float{}, at::BFloat16{});
  } else {
    dispatch_float_types(q, op, [&](auto t) { f(t, t); });
  }
}

// The arguments of paged_attention and prompt_attention.
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables,
                          const at::Tensor& token_seq, const at::Tensor& positions) {
  check_cpu(q, "q");
  check_heads(q, "q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "caches must be contiguous [blocks, kv_heads, block_size, head_dim]");
  check_cache_dtype(q, k_cache, v_cache);
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.stride(1) == 1,
              "block_tables must be int64 with contiguous rows");
  TORCH_CHECK(token_seq.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  token_seq.is_contiguous() && positions.is_contiguous() &&
                  token_seq.numel() == q.size(0) && positions.numel() == q.size(0),
              "token_seq and positions must be contiguous int64, one per token of q");
}

// In attention_decode.cpp: the decode kernel (torch.ops.pagoda.paged_attention), and
// whether its register-blocked loop takes this shape in this build.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& token_seq, const at::Tensor& positions,
                           double scale, std::optional<int64_t> window);
bool paged_attention_blocked(int64_t head_dim, int64_t heads_per_kv);

}  // namespace pagoda
