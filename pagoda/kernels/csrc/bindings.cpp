// Registers the kernels as torch.ops.pagoda.*: one schema and one CPU implementation each,
// defined in the op family's file (norm.cpp, activation.cpp, rope_and_cache.cpp,
// attention_decode.cpp, attention_prompt.cpp, quantized_linear.cpp, quantized_gemm.cpp,
// argmax.cpp).
//
// Each op has a pure-PyTorch twin in pagoda/model/ops/<family>.py that defines what it
// computes; these exist because one pass over the data beats the dozen small PyTorch
// ops (and their temporaries) that the twins take. All arithmetic is in float32;
// results are rounded to the tensor's dtype where the twin rounds.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "kv_cache.h"  // paged_attention

namespace pagoda {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
at::Tensor gemma_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void gemma_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight,
                        double eps);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor gelu_tanh_mul(const at::Tensor& x);
void rope_and_cache(at::Tensor q, at::Tensor k, const at::Tensor& v, const at::Tensor& positions,
                    const at::Tensor& cos_sin, at::Tensor k_cache, at::Tensor v_cache,
                    const at::Tensor& slot_mapping);
bool prompt_attention_supports(at::ScalarType dtype, int64_t head_dim, int64_t heads_per_kv);
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& token_seq, const at::Tensor& positions,
                            double scale, std::optional<int64_t> window);
at::Tensor causal_softmax(const at::Tensor& scores, const at::Tensor& query_pos,
                          std::optional<int64_t> window);
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                       std::optional<at::ScalarType> dtype);
std::vector<std::string> gguf_linear_formats();
at::Tensor gguf_dequantize(const at::Tensor& w, const std::string& format, at::ScalarType dtype);
at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                       int64_t tile_rows);
at::Tensor gguf_gemm(const at::Tensor& x, const at::Tensor& w, const std::string& format);
std::vector<std::string> gguf_gemm_formats();
at::Tensor gguf_repack(const at::Tensor& w, const std::string& format);
at::Tensor gguf_gemm_repacked(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                              int64_t n);
at::Tensor gguf_repacked_rows(const at::Tensor& w, const std::string& format, int64_t n,
                              const at::Tensor& ids, at::ScalarType dtype);
at::Tensor argmax_rows(const at::Tensor& x);

}  // namespace pagoda

using namespace pagoda;

TORCH_LIBRARY(pagoda, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("gemma_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("gemma_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("gelu_tanh_mul(Tensor x) -> Tensor");
  m.def(
      "rope_and_cache(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, Tensor cos_sin, "
      "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor token_seq, Tensor positions, float scale, int? window=None) -> Tensor");
  m.def("causal_softmax(Tensor scores, Tensor query_pos, int? window=None) -> Tensor");
  m.def("gguf_linear(Tensor x, Tensor w, str format, ScalarType? dtype=None) -> Tensor");
  m.def("gguf_dequantize(Tensor w, str format, ScalarType dtype) -> Tensor");
  m.def("gguf_matmul(Tensor x, Tensor w, str format, int tile_rows) -> Tensor");
  m.def("gguf_gemm(Tensor x, Tensor w, str format) -> Tensor");
  m.def("gguf_repack(Tensor w, str format) -> Tensor");
  m.def("gguf_gemm_repacked(Tensor x, Tensor w, str format, int n) -> Tensor");
  m.def("gguf_repacked_rows(Tensor w, str format, int n, Tensor ids, ScalarType dtype) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def(
      "prompt_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor token_seq, Tensor positions, float scale, int? window=None) -> Tensor");
  // No tensor to dispatch on: one implementation for every device.
  m.def("prompt_attention_supports(ScalarType dtype, int head_dim, int heads_per_kv) -> bool",
        &prompt_attention_supports);
  m.def("gguf_linear_formats() -> str[]", &gguf_linear_formats);
  m.def("gguf_gemm_formats() -> str[]", &gguf_gemm_formats);
}

TORCH_LIBRARY_IMPL(pagoda, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("gemma_rms_norm", &gemma_rms_norm);
  m.impl("gemma_add_rms_norm", &gemma_add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("gelu_tanh_mul", &gelu_tanh_mul);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("paged_attention", &paged_attention);
  m.impl("causal_softmax", &causal_softmax);
  m.impl("gguf_linear", &gguf_linear);
  m.impl("gguf_dequantize", &gguf_dequantize);
  m.impl("gguf_matmul", &gguf_matmul);
  m.impl("gguf_gemm", &gguf_gemm);
  m.impl("gguf_repack", &gguf_repack);
  m.impl("gguf_gemm_repacked", &gguf_gemm_repacked);
  m.impl("gguf_repacked_rows", &gguf_repacked_rows);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("prompt_attention", &prompt_attention);
}
