// The gated MLP's activation: torch.ops.pagoda.silu_mul.
// The PyTorch twin that defines what it computes: pagoda/model/ops/activation.py.

#include "simd.h"

namespace pagoda {
namespace {

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

}  // namespace

at::Tensor silu_mul(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "x must be [rows, 2 * n] with contiguous rows");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  dispatch_float_types(x, "silu_mul", [&](auto t) { silu_mul_impl<decltype(t)>(x, out); });
  return out;
}

}  // namespace pagoda
