// RMSNorm, alone and after the residual add: torch.ops.pagoda.rms_norm, add_rms_norm.
// The PyTorch twin that defines what it computes: pagoda/model/ops/norm.py.

#include "simd.h"

namespace pagoda {
namespace {

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

}  // namespace

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

}  // namespace pagoda
