// Rotary embedding of q and k, and the write of k and v into the paged cache:
// torch.ops.pagoda.rope_and_cache.
// The PyTorch twin that defines what it computes: pagoda/model/ops/rope_and_cache.py.

#include "kv_cache.h"

namespace pagoda {
namespace {

// Rotates q and k (rotate-half form) in place by each token's position, then
// writes k and v into their cache slots. q: [T, H, D], k, v: [T, KVH, D], with
// any row stride and contiguous heads; cos_sin: [max_pos, D] float32 (cos | sin).
template <typename T>
void rotate_row(T* x, const float* cos, const float* sin, int64_t half) {
  int64_t i = 0;
#ifdef PAGODA_VEC
  for (; i + vec::kLanes <= half; i += vec::kLanes) {
    const vec::F32 x1 = vec::load(x + i), x2 = vec::load(x + i + half);
    const vec::F32 c = vec::load(cos + i), s = vec::load(sin + i);
    vec::store(x + i, vec::sub(vec::mul(x1, c), vec::mul(x2, s)));
    vec::store(x + i + half, vec::add(vec::mul(x2, c), vec::mul(x1, s)));
  }
#endif
  for (; i < half; ++i) {
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    x[i] = from_f32<T>(x1 * cos[i] - x2 * sin[i]);
    x[i + half] = from_f32<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

// C: the caches' element type (T's, or bfloat16 under float32), each k and v rounded to it once.
template <typename T, typename C>
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
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
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

}  // namespace

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
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share a dtype");
  check_cache_dtype(q, k_cache, v_cache);
  dispatch_cache_types(q, k_cache, "rope_and_cache", [&](auto t, auto c) {
    rope_and_cache_impl<decltype(t), decltype(c)>(q, k, v, positions, cos_sin, k_cache, v_cache,
                                                  slot_mapping);
  });
}

}  // namespace pagoda
