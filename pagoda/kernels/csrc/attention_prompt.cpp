// Attention over the paged cache for prompt chunks, and the softmax of the matmul path:
// torch.ops.pagoda.prompt_attention, causal_softmax.
// The PyTorch twin that defines what it computes: pagoda/model/ops/attention.py.

#include "kv_cache.h"
#include <vector>

namespace pagoda {
namespace {

#ifdef __AVX512BF16__
// The queries of prompt chunks (runs of consecutive tokens of a sequence), bfloat16
// only, flash-style: a tile of up to 16 consecutive tokens with the query heads that
// share KV head g reads each cached key and value row once, and only the keys up to
// its last token's position, so the causal half of the square is skipped (and with a
// sliding window, only from its first token's first key on: the blocks before it are
// not read, so a long context costs no more than the window). Scores
// are float32 with token t in lane t of a vector: the softmax runs over the keys
// 16 at a time with vertical operations, rescaling what it has summed when the
// running maximum grows. Products take bfloat16 pairs (vdpbf16ps) into float32
// sums; the probabilities are rounded to bfloat16 for the product with the values,
// as the two-matmul path rounds them.

constexpr int kTile = 16;  // tokens per tile: the lanes of a vector
constexpr int kKeys = 16;  // keys per step of the softmax
// A window wider than any position (which the tiles hold as int32): no window.
constexpr int64_t kNoWindow = std::numeric_limits<int32_t>::max();

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
// pos0..pos0+n-1 of the sequence with block table `blocks`; the G * LH query heads
// that share KV head g, each of DP bfloat16 pairs (head_dim 2 DP); output rows
// out_stride apart. Token t sees keys pos0+t-window < p <= pos0+t (a window of
// kNoWindow: keys 0..pos0+t), and the tile reads only from its first token's first
// key on.
//
// A lane is a (token, head) pair: lane l of register group h holds token l / LH and
// head h * LH + l % LH. A prompt tile has LH = 1 (16 tokens, each head a group); a
// short run (the token and drafts of a speculating request: n * heads <= 16) has all
// its heads in the lanes of one group (G = 1), so that each key's products, scores
// and softmax run once for all its rows instead of once a head with most lanes idle:
//
//     LH = 1, G = 3, n = 5:  group h: | t0 t1 t2 t3 t4 -- -- ... -- |  x 3
//     LH = 3, G = 1, n = 5:  group 0: | t0h0 t0h1 t0h2 t1h0 ... t4h2 -- |
template <int G, int DP>
void prompt_tile(const at::BFloat16* q, int64_t q_stride, int64_t n, int64_t lane_heads,
                 int64_t pos0, const int64_t* blocks, const at::BFloat16* kc,
                 const at::BFloat16* vc, int64_t block_size, int64_t kv_heads, int64_t g,
                 float scale, int64_t window, at::BFloat16* out, int64_t out_stride) {
  // Scores of KC keys at a time: G x KC accumulators, held in registers.
  constexpr int D = 2 * DP, KC = G <= 3 ? 8 : 4;
  const int64_t heads = G * lane_heads, lanes = n * lane_heads;  // heads per KV head, lanes used
  // Queries as bfloat16 pairs; lanes past the last repeat it (a valid query whose
  // result is not stored).
  alignas(64) int32_t qp[G][DP][kTile];
  alignas(64) int32_t lane_pos[kTile];
  for (int l = 0; l < kTile; ++l) {
    const int64_t u = std::min<int64_t>(l, lanes - 1), t = u / lane_heads;
    const auto* row = reinterpret_cast<const int32_t*>(q + t * q_stride);
    for (int h = 0; h < G; ++h) {
      const int64_t head = g * heads + h * lane_heads + u % lane_heads;
      for (int i = 0; i < DP; ++i) qp[h][i][l] = row[head * DP + i];
    }
    lane_pos[l] = int32_t(pos0 + t);
  }
  const __m512i pos = _mm512_load_si512(lane_pos);
  // Lane l sees key p when lo[l] < p <= pos[l].
  const __m512i lo = _mm512_sub_epi32(pos, _mm512_set1_epi32(int32_t(window)));
  const int64_t first = std::max<int64_t>(0, pos0 - window + 1), len = pos0 + n;  // keys read
  __m512 top[G], sum[G];
  for (int h = 0; h < G; ++h) {
    top[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    sum[h] = _mm512_setzero_ps();
  }
  alignas(64) float acc[G][kTile][D];        // lane l's output in group h, unnormalised
  alignas(64) float s[G][kKeys][kTile];      // scores, then probabilities, of 16 keys
  alignas(64) int32_t p2[G][kKeys / 2][kTile];  // probabilities as pairs of keys
  alignas(64) int32_t v2[kKeys / 2][D];      // values as pairs of keys
  alignas(64) float corr[kTile];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t k0 = first; k0 < len; k0 += kKeys) {
    const int64_t nk = std::min<int64_t>(kKeys, len - k0);
    const at::BFloat16* krow[kKeys];
    const at::BFloat16* vrow[kKeys];
    for (int j = 0; j < kKeys; ++j) {  // keys past nk repeat the last one; masked below
      const int64_t p = k0 + std::min<int64_t>(j, nk - 1);
      const int64_t block = blocks[p / block_size], offset = p % block_size;
      krow[j] = cache_row(kc, block, g, offset, kv_heads, block_size, D);
      vrow[j] = cache_row(vc, block, g, offset, kv_heads, block_size, D);
    }
    // The next 16 keys' rows, asked for now: a sequence's blocks lie scattered over the
    // cache, where the hardware prefetcher cannot follow (as in attention_decode.cpp).
    for (int64_t p = k0 + kKeys; p < std::min<int64_t>(k0 + 2 * kKeys, len); ++p) {
      const int64_t block = blocks[p / block_size], offset = p % block_size;
      const auto* k = reinterpret_cast<const char*>(
          cache_row(kc, block, g, offset, kv_heads, block_size, D));
      const auto* v = reinterpret_cast<const char*>(
          cache_row(vc, block, g, offset, kv_heads, block_size, D));
      for (int b = 0; b < D * 2; b += 64) {
        _mm_prefetch(k + b, _MM_HINT_T0);
        _mm_prefetch(v + b, _MM_HINT_T0);
      }
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
      const __m512i key = _mm512_set1_epi32(int32_t(k0 + j));
      keep[j] = j < nk ? _mm512_mask_cmp_epi32_mask(
                             _mm512_cmp_epi32_mask(key, pos, _MM_CMPINT_LE), key, lo, _MM_CMPINT_NLE)
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
        if (k0 > first) {
          for (int64_t l = 0; l < lanes; ++l) {
            const __m512 cl = _mm512_set1_ps(corr[l]);
            for (int d = 0; d < D; d += 16) {
              _mm512_store_ps(acc[h][l] + d, _mm512_mul_ps(_mm512_load_ps(acc[h][l] + d), cl));
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
      for (int64_t l = 0; l < lanes; ++l) {
        for (int d = 0; d < D; d += 16) {
          __m512 a = _mm512_load_ps(acc[h][l] + d);
          for (int j = 0; j < kKeys / 2; ++j) {
            a = dot_pairs(a, _mm512_load_si512(v2[j] + d), _mm512_set1_epi32(p2[h][j][l]));
          }
          _mm512_store_ps(acc[h][l] + d, a);
        }
      }
    }
  }
  for (int h = 0; h < G; ++h) {
    alignas(64) float total[kTile];
    _mm512_store_ps(total, sum[h]);
    for (int64_t l = 0; l < lanes; ++l) {
      const __m512 inv = _mm512_set1_ps(1.f / total[l]);
      const int64_t head = g * heads + h * lane_heads + l % lane_heads;
      at::BFloat16* o = out + (l / lane_heads) * out_stride + head * D;
      for (int d = 0; d < D; d += 16) {
        store16(o + d, _mm512_mul_ps(_mm512_load_ps(acc[h][l] + d), inv));
      }
    }
  }
}

using PromptTile = void (*)(const at::BFloat16*, int64_t, int64_t, int64_t, int64_t,
                            const int64_t*, const at::BFloat16*, const at::BFloat16*, int64_t,
                            int64_t, int64_t, float, int64_t, at::BFloat16*, int64_t);

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
#endif  // __AVX512BF16__


// The softmax of prompt attention: row (s, ..., j) of scores [S, ..., Q, L] keeps
// keys 0..query_pos[s, j] (with a sliding window, only the last `window` of them)
// and gives the rest probability 0. In float32, rounded to T once at the end: one
// pass instead of a float copy, a bias add, a softmax and a copy back.
template <typename T>
void causal_softmax_impl(const at::Tensor& scores, const at::Tensor& query_pos,
                         const std::optional<int64_t>& window, at::Tensor& out) {
  const int64_t seqs = scores.size(0), q_len = scores.size(-2), keys = scores.size(-1);
  const int64_t rows = scores.numel() / keys, per_seq = rows / seqs;
  const T* sp = scores.data_ptr<T>();
  const int64_t* qp = query_pos.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(keys);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t query = qp[(r / per_seq) * q_len + r % q_len];
      TORCH_CHECK(query >= 0, "query positions must be >= 0");
      const int64_t len = std::min(query + 1, keys);
      const int64_t first = std::min(window_start(query, window), len - 1), n = len - first;
      const T* row = sp + r * keys + first;
      T* o = op + r * keys;
      std::fill(o, o + first, from_f32<T>(0.f));
      o += first;
      int64_t p = 0;
#ifdef PAGODA_VEC
      for (; p + vec::kLanes <= n; p += vec::kLanes) {
        vec::store(buf.data() + p, vec::load(row + p));
      }
#endif
      for (; p < n; ++p) buf[p] = to_f32(row[p]);
      const float inv = 1.f / exp_shifted(buf.data(), n);
      p = 0;
#ifdef PAGODA_VEC
      for (; p + vec::kLanes <= n; p += vec::kLanes) {
        vec::store(o + p, vec::mul(vec::load(buf.data() + p), vec::set1(inv)));
      }
#endif
      for (; p < n; ++p) o[p] = from_f32<T>(buf[p] * inv);
      std::fill(o + n, op + (r + 1) * keys, from_f32<T>(0.f));
    }
  });
}

}  // namespace

namespace {

// Whether prompt_attention takes these shapes with the tiles above.
bool tiles_take(at::ScalarType dtype, int64_t head_dim, int64_t heads_per_kv) {
#ifdef __AVX512BF16__
  return dtype == at::kBFloat16 && prompt_tile_for(head_dim, heads_per_kv) != nullptr;
#else
  (void)dtype, (void)head_dim, (void)heads_per_kv;
  return false;
#endif
}

// Without AVX-512, runs of tokens with head_dim 64 go to the decode kernel's register-
// blocked loop one token at a time: each token reads its own keys, which the run's tokens
// share in cache, and none past its position. On AVX2 (Zen 3, float32 queries, 32 query
// and 8 KV heads) that took half the time of the two matmuls, which compute the causal
// half too and copy the keys out first: 13 against 25 ms for two 256-token prompts, 134
// against 253 ms for 512 tokens after 1536. At head_dim 128 (16 vectors a head, more than
// AVX2's registers hold) it was level, and the general loop at Gemma 3's 256 took twice
// the matmuls' time.
bool per_token_takes(int64_t head_dim, int64_t heads_per_kv) {
#ifdef __AVX512F__
  (void)head_dim, (void)heads_per_kv;
  return false;  // not measured against AVX-512's matmuls
#else
  return head_dim == 64 && paged_attention_blocked(head_dim, heads_per_kv);
#endif
}

}  // namespace

// The shapes prompt_attention takes, stated here once (Python asks this). In a build for a
// CPU with AVX512-BF16: bfloat16, head_dim 64 or 128, 1 to 6 query heads per KV head (the
// register-blocked tiles above). In a build with AVX2 and no AVX-512: either dtype,
// head_dim 64, 1 to 6 query heads per KV head (the decode kernel, token by token). Any
// block size.
bool prompt_attention_supports(at::ScalarType dtype, int64_t head_dim, int64_t heads_per_kv) {
  return tiles_take(dtype, head_dim, heads_per_kv) || per_token_takes(head_dim, heads_per_kv);
}

// Attention of tokens to their sequences' cached keys, as paged_attention, for runs
// of consecutive tokens (prompt chunks), in the shapes prompt_attention_supports names.
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& token_seq, const at::Tensor& positions,
                            double scale, std::optional<int64_t> window) {
  check_attention_args(q, k_cache, v_cache, block_tables, token_seq, positions);
  check_window(window);
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(prompt_attention_supports(q.scalar_type(), dim, heads / kv_heads),
              "prompt_attention does not take ", q.scalar_type(), " with head_dim ", dim, " and ",
              heads / kv_heads, " query heads per KV head in this build");
  if (!tiles_take(q.scalar_type(), dim, heads / kv_heads)) {
    return paged_attention(q, k_cache, v_cache, block_tables, token_seq, positions, scale,
                           window);
  }
#ifdef __AVX512BF16__
  const int64_t num_blocks = k_cache.size(0), table_stride = block_tables.stride(0);
  const int64_t group = heads / kv_heads;
  // A tile of 16 tokens takes each head as a group of lanes; a tile whose tokens times
  // heads fit the lanes takes them all in one (prompt_tile).
  const PromptTile tile = prompt_tile_for(dim, group), packed = prompt_tile_for(dim, 1);
  const int64_t* seq = token_seq.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  check_token_rows(block_tables, seq, pos, tokens, block_size);
  // Tiles: up to kTile consecutive tokens of one sequence at consecutive positions.
  std::vector<int64_t> starts;
  for (int64_t t = 0; t < tokens; ++t) {
    if (t == 0 || seq[t] != seq[t - 1] || pos[t] != pos[t - 1] + 1 ||
        t - starts.back() == kTile) {
      starts.push_back(t);
    }
  }
  const int64_t num_tiles = starts.size();
  starts.push_back(tokens);
  for (int64_t i = 0; i < num_tiles; ++i) {  // every block a tile will read
    const int64_t last = starts[i + 1] - 1;
    check_blocks(tables + seq[last] * table_stride, window_start(pos[starts[i]], window),
                 pos[last] + 1, block_size, num_blocks);
  }
  at::Tensor out = at::empty({tokens, heads * dim}, q.options());
  const auto* qp = q.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const auto* kc = k_cache.data_ptr<at::BFloat16>();
  const auto* vc = v_cache.data_ptr<at::BFloat16>();
  const float s = static_cast<float>(scale);
  const int64_t w = window ? std::min(*window, kNoWindow) : kNoWindow;
  // Later tiles read more keys: hand the items out longest first.
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t item = num_tiles * kv_heads - 1; item >= 0; --item) {
    const int64_t i = item / kv_heads, g = item % kv_heads, first = starts[i];
    const int64_t n = starts[i + 1] - first;
    const bool pack = n * group <= kTile;
    (pack ? packed : tile)(qp + first * q.stride(0), q.stride(0), n, pack ? group : 1, pos[first],
                           tables + seq[first] * table_stride, kc, vc, block_size, kv_heads, g,
                           s, w, op + first * heads * dim, heads * dim);
  }
  return out;
#else
  (void)tokens, (void)block_size;
  return {};  // not reached: no tiles without AVX512-BF16
#endif
}

at::Tensor causal_softmax(const at::Tensor& scores, const at::Tensor& query_pos,
                          std::optional<int64_t> window) {
  check_cpu(scores, "scores");
  check_window(window);
  TORCH_CHECK(scores.dim() >= 3 && scores.is_contiguous(), "scores must be contiguous [S, ..., Q, L]");
  TORCH_CHECK(query_pos.scalar_type() == at::kLong && query_pos.is_contiguous() &&
                  query_pos.dim() == 2 && query_pos.size(0) == scores.size(0) &&
                  query_pos.size(1) == scores.size(-2),
              "query_pos must be contiguous int64 [S, Q]");
  at::Tensor out = at::empty_like(scores);
  dispatch_float_types(scores, "causal_softmax", [&](auto t) {
    causal_softmax_impl<decltype(t)>(scores, query_pos, window, out);
  });
  return out;
}

}  // namespace pagoda
