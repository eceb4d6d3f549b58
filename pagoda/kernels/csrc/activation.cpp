// The gated MLP's activation: torch.ops.pagoda.silu_mul (SwiGLU), gelu_tanh_mul (GeGLU).
// The PyTorch twin that defines what it computes: pagoda/model/ops/activation.py.

#include "simd.h"

namespace pagoda {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;

// x = [gate | up] along the last dimension; out = round(act(gate)) * up, where act is
// silu(g) = g * sigmoid(g), or (kGelu) gelu's tanh approximation,
// 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2 / pi) (g + 0.044715 g^3).
template <typename T, bool kGelu>
void act_mul_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1) / 2, stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = xp + r * stride;
      const T* up = gate + n;
      T* o = op + r * n;
      int64_t i = 0;
#ifdef PAGODA_VEC
      for (; i + vec::kLanes <= n; i += vec::kLanes) {
        // sigmoid(g) from e = e^-|g| <= 1, the range vec::exp covers: 1 / (1 + e) for
        // g >= 0, e / (1 + e) below.
        const vec::F32 g = vec::load(gate + i);
        vec::F32 s = g;  // sigmoid's argument
        if constexpr (kGelu) {
          const vec::F32 g3 = vec::mul(vec::mul(g, g), g);
          s = vec::mul(vec::set1(2.f * kSqrt2OverPi), vec::fmadd(g3, vec::set1(0.044715f), g));
        }
        const vec::F32 e = vec::exp(vec::sub(vec::zero(), vec::abs(s)));
        const vec::F32 inv = vec::div(vec::set1(1.f), vec::add(vec::set1(1.f), e));
        const vec::F32 sigmoid = vec::mul(inv, vec::if_negative(s, e, vec::set1(1.f)));
        T act[vec::kLanes];  // rounded to T before the product, as the twin's activation is
        vec::store(act, vec::mul(g, sigmoid));
        vec::store(o + i, vec::mul(vec::load(act), vec::load(up + i)));
      }
#endif
      for (; i < n; ++i) {
        // as above, from e = e^-|s|: no infinity, which -ffast-math's division turns into
        // NaN (g / (1 + e^-s) for g = -30 gave NaN on a CPU without AVX-512)
        const float g = to_f32(gate[i]);
        const float s = kGelu ? 2.f * kSqrt2OverPi * (g + 0.044715f * g * g * g) : g;
        const float e = std::exp(-std::fabs(s));
        const float sigmoid = (s < 0.f ? e : 1.f) / (1.f + e);
        o[i] = from_f32<T>(round_to<T>(g * sigmoid) * to_f32(up[i]));
      }
    }
  });
}

template <bool kGelu>
at::Tensor act_mul(const at::Tensor& x, const char* op) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "x must be [rows, 2 * n] with contiguous rows");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  dispatch_float_types(x, op, [&](auto t) { act_mul_impl<decltype(t), kGelu>(x, out); });
  return out;
}

}  // namespace

at::Tensor silu_mul(const at::Tensor& x) { return act_mul<false>(x, "silu_mul"); }

at::Tensor gelu_tanh_mul(const at::Tensor& x) { return act_mul<true>(x, "gelu_tanh_mul"); }

}  // namespace pagoda
