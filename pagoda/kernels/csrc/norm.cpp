// RMSNorm, alone and after the residual add: torch.ops.pagoda.rms_norm, add_rms_norm, and
// Gemma's form of both, gemma_rms_norm and gemma_add_rms_norm.
// The PyTorch twin that defines what it computes: pagoda/model/ops/norm.py.

#include "simd.h"

namespace pagoda {
namespace {

// out = weight * round(x * rsqrt(mean(x^2) + eps)), rows of x normalised independently;
// Gemma's form (kGemma) scales by 1 + weight in float32 and rounds once:
// out = round((1 + weight) * x * rsqrt(mean(x^2) + eps)).
// With a residual, the residual stream's add comes first in the same pass over the row:
// residual = round(x + residual), and that sum is what is normalised.
// Row r of x starts at (r / inner) * outer_stride + (r % inner) * inner_stride: a [rows, n]
// matrix (inner 1), or the per-head [tokens, heads, n] views that q and k are.
template <typename T, bool kGemma>
void rms_norm_impl(const T* xp, int64_t outer_stride, int64_t inner, int64_t inner_stride,
                   T* residual, const T* wp, int64_t rows, int64_t n, double eps, T* op) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + (r / inner) * outer_stride + (r % inner) * inner_stride;
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
      if constexpr (kGemma) {
        for (int64_t i = 0; i < n; ++i) {
          o[i] = from_f32<T>(to_f32(row[i]) * inv * (1.f + to_f32(wp[i])));
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          o[i] = from_f32<T>(to_f32(wp[i]) * round_to<T>(to_f32(row[i]) * inv));
        }
      }
    }
  });
}

// x: [rows, n], or [tokens, heads, n], with contiguous rows.
void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(x, "x");
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1,
              "x must be [rows, n] or [tokens, heads, n] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(-1), "weight must be [n]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
}

template <bool kGemma>
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t inner = x.dim() == 3 ? x.size(1) : 1;
  const int64_t inner_stride = x.dim() == 3 ? x.stride(1) : 0;
  dispatch_float_types(x, "rms_norm", [&](auto t) {
    using T = decltype(t);
    rms_norm_impl<T, kGemma>(x.data_ptr<T>(), x.stride(0), inner, inner_stride, nullptr,
                             weight.data_ptr<T>(), rows, n, eps, out.data_ptr<T>());
  });
  return out;
}

// residual += x (rounded), then x = rms_norm(residual), both in place.
template <bool kGemma>
void add_rms_norm_op(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() &&
                  residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "x and residual must be contiguous [rows, n], of one shape and dtype");
  dispatch_float_types(x, "add_rms_norm", [&](auto t) {
    using T = decltype(t);
    rms_norm_impl<T, kGemma>(x.data_ptr<T>(), x.size(1), 1, 0, residual.data_ptr<T>(),
                             weight.data_ptr<T>(), x.size(0), x.size(1), eps, x.data_ptr<T>());
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_op<false>(x, weight, eps);
}

void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  add_rms_norm_op<false>(x, residual, weight, eps);
}

at::Tensor gemma_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_op<true>(x, weight, eps);
}

void gemma_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight,
                        double eps) {
  add_rms_norm_op<true>(x, residual, weight, eps);
}

}  // namespace pagoda
