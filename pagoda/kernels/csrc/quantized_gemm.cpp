// Matrix products of many rows with a weight kept in its GGUF K-quant blocks:
// torch.ops.pagoda.gguf_gemm. The PyTorch twin that defines what it computes:
// pagoda/model/ops/quantized_gemm.py.
//
// A step of many rows (a prompt, a decode step of many sequences) is compute-bound. A
// bfloat16 GEMM does 32 products an instruction (vdpbf16ps); vpdpbusd does 64 int8 ones, so,
// as llama.cpp does, the input rows are quantized to int8 per 256 values (one float scale
// dx per 256, and sums of their codes) and multiplied by the weights' integer codes.
// A K-quant super-block of 256 weights is w = d * sc_j * q + dm * mn_j for sub-blocks j of
// 16 or 32 weights (Q4_K: dm = -dmin, mn_j its 6-bit minimum; Q6_K: q - 32 with dm = d,
// mn_j = -32 sc_j), so its dot product with an input super-block is
//
//   dx * (d * sum_j sc_j * sum_{l in j} q_l x_l + dm * sum_j mn_j * sum_{l in j} x_l)
//
// with both sums over j in integers: one conversion to float per super-block, row and
// column. The weight is decoded a tile (kTileVectors x 16 columns, kTileSupers super-blocks)
// at a time into a small reused buffer laid out for the microkernel (16 columns in the
// dword lanes, 4 consecutive codes a lane), and no other copy of it is kept.
//
// gguf_repack lays a weight out once, at load, in a compact form of that layout (about the
// file's bytes), and gguf_gemm_repacked computes from it what gguf_gemm computes from the
// blocks, bit for bit, with no tile decoded a call: at every row count, one included.
// gguf_repacked_rows reads rows back from that form as the file's decoding gives them, for
// a tied embedding, whose table is the repacked output layer.
//
// On a CPU with AVX2 (+ FMA, F16C) but no AVX-512 the same tiles run an AVX2 microkernel
// (maddubs: u8 x s8 pairs into int16, then madd with the scales), 8 columns a vector, to
// the same integer totals and float operations, and gguf_gemm_repacked unpacks the repacked
// form in registers as the AVX-512 one does.
//
// The shared layout is in quantized_gemm.h, the microkernels in one header per instruction
// set (quantized_gemm_avx512.h, quantized_gemm_avx2.h); this file holds the order of work
// (tiles, blocks of rows, threads), the repacking and the ops.

#include "quantized_gemm.h"
#ifdef PAGODA_GGUF_GEMM_AVX512
#include "quantized_gemm_avx512.h"
#elif defined(PAGODA_GGUF_GEMM)
#include "quantized_gemm_avx2.h"
#endif

#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pagoda {

#ifdef PAGODA_GGUF_GEMM
namespace {

// P: Packed (a tile decoded or expanded) or the repacked form, read as it is; rows at most
// block_rows<P>().
template <typename F, int NC, typename P>
void run_rows(const P* p, int64_t stride, int64_t supers, const InputRows& x, int64_t r0,
              int rows, int64_t s0, int64_t v0, int64_t n, bool add, float* out) {
  static_assert(block_rows<P>() == 3 || block_rows<P>() == 4);
  switch (rows) {
    case 1: run_block<F, NC, 1>(p, stride, supers, x, r0, s0, v0, n, add, out); break;
    case 2: run_block<F, NC, 2>(p, stride, supers, x, r0, s0, v0, n, add, out); break;
    case 3: run_block<F, NC, 3>(p, stride, supers, x, r0, s0, v0, n, add, out); break;
    default:
      if constexpr (block_rows<P>() == 4) {
        run_block<F, NC, 4>(p, stride, supers, x, r0, s0, v0, n, add, out);
      }
      break;
  }
}

template <typename F>
void gemm_impl(const InputRows& x, int64_t rows, const at::Tensor& w, at::Tensor& out) {
  using P = Packed<F::kSubs>;
  constexpr int kBlock = block_rows<P>();
  const int64_t n = w.size(0), row_bytes = w.size(1), supers = x.supers;
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  const int64_t tiles = (vectors + kTileVectors - 1) / kTileVectors;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<P> buffer;
    buffer.resize(kTileVectors * kTileSupers);
    alignas(64) uint8_t codes[kLanes][kSuper];  // a super-block of 16 columns in weight order
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t v0 = tile * kTileVectors, v1 = std::min(vectors, v0 + kTileVectors);
      for (int64_t s0 = 0; s0 < supers; s0 += kTileSupers) {
        const int64_t s1 = std::min(supers, s0 + kTileSupers), span = s1 - s0;
        for (int64_t v = v0; v < v1; ++v) {
          for (int64_t s = s0; s < s1; ++s) {
            P* p = &buffer[(v - v0) * span + (s - s0)];
            for (int lane = 0; lane < kLanes; ++lane) {
              const int64_t j = v * kLanes + lane;
              if (j < n) {
                F::decode(wp + j * row_bytes + s * F::kBytes, codes[lane], p, lane);
              } else {
                std::memset(codes[lane], 0, kSuper);
                clear_lane(p, lane);
              }
            }
            put_codes(codes, p);
          }
        }
        const bool add = s0 > 0;
        for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
          const int r = static_cast<int>(std::min<int64_t>(kBlock, rows - r0));
          int64_t v = v0;
          for (; v + kColumnVectors <= v1; v += kColumnVectors) {
            run_rows<F, kColumnVectors>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v,
                                        n, add, op);
          }
          for (; v < v1; ++v) {
            run_rows<F, 1>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v, n, add, op);
          }
        }
      }
    }
  });
}

inline uint16_t to_f16(float v) {
  return static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), 0), 0));
}

// One super-block of 16 columns, decoded as gguf_gemm decodes it (p), into its repacked form.
template <typename F>
void compress(const Packed<F::kSubs>& p, typename RepackedOf<F>::T* out) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  std::memset(out, 0, sizeof(*out));  // the padding too: the bytes are the twin's
  for (int j = 0; j < F::kSubs; ++j) {
    for (int u = 0; u < kHalfQuads; ++u) {
      const uint8_t* low = p.q[2 * j * kHalfQuads + u];
      const uint8_t* high = p.q[(2 * j + 1) * kHalfQuads + u];
      for (int b = 0; b < 64; ++b) {
        out->q[j * kHalfQuads + u][b] =
            static_cast<uint8_t>((low[b] & 0x0F) | (high[b] & 0x0F) << 4);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      out->scale[j][lane] = static_cast<std::remove_reference_t<decltype(out->scale[0][0])>>(
          p.scale[j][lane] & 0xFF);
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) out->d[lane] = to_f16(p.d[lane]);
  if constexpr (F::kMins) {
    for (int q = 0; q < 4; ++q) {
      for (int lane = 0; lane < kLanes; ++lane) {
        out->mins[q][2 * lane] = static_cast<uint8_t>(p.mins[q][lane] & 0xFF);
        out->mins[q][2 * lane + 1] = static_cast<uint8_t>(p.mins[q][lane] >> 16);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) out->dm[lane] = to_f16(p.dm[lane]);
  } else {
    for (int j = 0; j < F::kSubs; ++j) {
      for (int b = 0; b < 64; ++b) {
        uint8_t bits = 0;
        for (int e = 0; e < 4; ++e) bits |= ((p.q[4 * j + e][b] >> 4) & 3) << (2 * e);
        out->high[j][b] = bits;
      }
    }
  }
}

template <typename F>
void repack_impl(const at::Tensor& w, at::Tensor& out) {
  using T = typename RepackedOf<F>::T;
  const int64_t n = w.size(0), row_bytes = w.size(1), supers = row_bytes / F::kBytes;
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  T* op = reinterpret_cast<T*>(out.data_ptr<uint8_t>());
  at::parallel_for(0, vectors, 1, [&](int64_t begin, int64_t end) {
    Packed<F::kSubs> p;
    alignas(64) uint8_t codes[kLanes][kSuper];
    for (int64_t v = begin; v < end; ++v) {
      for (int64_t s = 0; s < supers; ++s) {
        std::memset(&p, 0, sizeof(p));
        for (int lane = 0; lane < kLanes; ++lane) {
          const int64_t j = v * kLanes + lane;
          if (j < n) {
            F::decode(wp + j * row_bytes + s * F::kBytes, codes[lane], &p, lane);
          } else {
            std::memset(codes[lane], 0, kSuper);
            clear_lane(&p, lane);
          }
        }
        put_codes(codes, &p);
        compress<F>(p, op + v * supers + s);
      }
    }
  });
}

// Row `lane` of a repacked super-block of 16 rows: its 256 values as the file's decoding
// computes them, (d sc_j) q + dm mn_j in float32 (both products exact, so one rounding),
// Q6_K's (d sc_j) (q - 32), rounded once to T. A tied embedding gathers its rows so, with no
// other copy kept.
template <typename F, typename T>
void unpack_row(const typename RepackedOf<F>::T& r, int lane, T* out) {
  constexpr int kHalfQuads = F::kSubValues / 8;
  const float d = f16(reinterpret_cast<const uint8_t*>(r.d + lane));
  for (int j = 0; j < F::kSubs; ++j) {
    const float scale = d * static_cast<float>(r.scale[j][lane]);
    float min = 0.f;
    if constexpr (F::kMins) {
      min = f16(reinterpret_cast<const uint8_t*>(r.dm + lane)) *
            static_cast<float>(r.mins[j / 2][2 * lane + j % 2]);
    }
    for (int s = 0; s < 2; ++s) {  // the sub-block's halves: low and high nibbles
      for (int u = 0; u < kHalfQuads; ++u) {
        for (int b = 0; b < 4; ++b) {
          const uint8_t byte = r.q[j * kHalfQuads + u][4 * lane + b];
          const int code = s == 0 ? byte & 0x0F : byte >> 4;
          T* v = out + j * F::kSubValues + 4 * (s * kHalfQuads + u) + b;
          if constexpr (F::kMins) {
            *v = from_f32<T>(scale * static_cast<float>(code) + min);
          } else {  // quad e = 2 s + u of the sub-block: its top bits at 2e, 2e + 1
            const int top = (r.high[j][4 * lane + b] >> (2 * (2 * s + u))) & 3;
            *v = from_f32<T>(scale * static_cast<float>((code | top << 4) - 32));
          }
        }
      }
    }
  }
}

template <typename F>
void repacked_rows_impl(const at::Tensor& w, const at::Tensor& ids, at::Tensor& out) {
  using R = typename RepackedOf<F>::T;
  const int64_t supers = w.size(1), k = supers * kSuper;
  const R* wp = reinterpret_cast<const R*>(w.data_ptr<uint8_t>());
  const int64_t* ip = ids.data_ptr<int64_t>();
  dispatch_float_types(out, "gguf_repacked_rows", [&](auto t) {
    using T = decltype(t);
    T* op = out.data_ptr<T>();
    at::parallel_for(0, ids.numel(), 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const R* vector = wp + ip[i] / kLanes * supers;
        const int lane = static_cast<int>(ip[i] % kLanes);
        for (int64_t s = 0; s < supers; ++s) {
          unpack_row<F>(vector[s], lane, op + i * k + s * kSuper);
        }
      }
    });
  });
}

// gemm_impl's order of work without the decoding: a tile of kTileVectors column vectors, its
// super-blocks kTileSupers at a time (summed in registers, then added to the output: the
// same float operations as gguf_gemm's), every block of rows (block_rows of the form read)
// through them. Up to kRows rows each column vector runs through all its super-blocks before
// the next (two vectors at a time, two streams a thread, read about 10 % slower at one row).
template <typename F>
void repacked_gemm_impl(const InputRows& x, int64_t rows, const at::Tensor& w, int64_t n,
                        at::Tensor& out) {
  using T = typename RepackedOf<F>::T;
  using P = Packed<F::kSubs>;
  const int64_t supers = x.supers;
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  const int64_t tiles = (vectors + kTileVectors - 1) / kTileVectors;
  const T* wp = reinterpret_cast<const T*>(w.data_ptr<uint8_t>());
  float* op = out.data_ptr<float>();
  const bool expanded = rows > expand_rows<F>();
  const int block = expanded ? block_rows<P>() : block_rows<T>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<P> buffer;
    if (expanded) buffer.resize(kTileVectors * kTileSupers);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t v0 = tile * kTileVectors, v1 = std::min(vectors, v0 + kTileVectors);
      if (rows <= kRows) {
        // one column vector at a time: one stream of the weight a thread, read once
        const int r = static_cast<int>(rows);
        for (int64_t v = v0; v < v1; ++v) {
          for (int64_t s0 = 0; s0 < supers; s0 += kTileSupers) {
            const int64_t span = std::min(supers, s0 + kTileSupers) - s0;
            run_rows<F, 1>(wp + v * supers + s0, supers, span, x, 0, r, s0, v, n, s0 > 0, op);
          }
        }
        continue;
      }
      for (int64_t s0 = 0; s0 < supers; s0 += kTileSupers) {
        const int64_t span = std::min(supers, s0 + kTileSupers) - s0;
        const bool add = s0 > 0;
        if (expanded) {
          for (int64_t v = v0; v < v1; ++v) {
            for (int64_t s = s0; s < s0 + span; ++s) {
              expand<F>(wp[v * supers + s], &buffer[(v - v0) * span + (s - s0)]);
            }
          }
        }
        for (int64_t r0 = 0; r0 < rows; r0 += block) {
          const int r = static_cast<int>(std::min<int64_t>(block, rows - r0));
          int64_t v = v0;
          for (; v + kColumnVectors <= v1; v += kColumnVectors) {
            if (expanded) {
              run_rows<F, kColumnVectors>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v,
                                          n, add, op);
            } else {
              run_rows<F, kColumnVectors>(wp + v * supers + s0, supers, span, x, r0, r, s0, v,
                                          n, add, op);
            }
          }
          for (; v < v1; ++v) {
            if (expanded) {
              run_rows<F, 1>(&buffer[(v - v0) * span], span, span, x, r0, r, s0, v, n, add, op);
            } else {
              run_rows<F, 1>(wp + v * supers + s0, supers, span, x, r0, r, s0, v, n, add, op);
            }
          }
        }
      }
    }
  });
}

// A tensor for a repacked weight, on 2 MiB pages where the kernel has transparent huge pages:
// the weight streams through the caches at every step, and on 4 KiB pages each 4 KiB of it
// cost a TLB miss (on a Zen 3, a one-sequence step of the 1B file took 3-8 % longer); at load,
// it also faults in 512 times fewer pages. The mapping starts on a 2 MiB boundary and ends
// at the tensor's last 4 KiB page, so a part-filled last 2 MiB stays in 4 KiB pages and no
// memory is added. Below 2 MiB, or where mmap fails, at::empty.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kHuge = size_t(2) << 20, kPage = 4096;
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  const size_t span = (bytes + kPage - 1) / kPage * kPage;
  if (span >= kHuge) {
    void* raw = mmap(nullptr, span + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t start = (base + kHuge - 1) / kHuge * kHuge;
      if (start > base) munmap(raw, start - base);
      munmap(reinterpret_cast<void*>(start + span), base + kHuge - start);
      void* data = reinterpret_cast<void*>(start);
      madvise(data, span, MADV_HUGEPAGE);  // a hint: without it, 4 KiB pages
      return at::from_blob(data, sizes, [span](void* p) { munmap(p, span); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

struct RepackFormat {
  const char* name;
  int64_t bytes;     // the file's bytes a super-block of a row
  int64_t repacked;  // bytes a super-block of 16 columns, repacked
  void (*repack)(const at::Tensor&, at::Tensor&);
  void (*rows)(const at::Tensor&, const at::Tensor&, at::Tensor&);
  void (*run)(const InputRows&, int64_t, const at::Tensor&, int64_t, at::Tensor&);
};

const RepackFormat kRepackFormats[] = {
    {"Q4_K", Q4_K::kBytes, sizeof(RepackedQ4_K), &repack_impl<Q4_K>, &repacked_rows_impl<Q4_K>,
     &repacked_gemm_impl<Q4_K>},
    {"Q6_K", Q6_K::kBytes, sizeof(RepackedQ6_K), &repack_impl<Q6_K>, &repacked_rows_impl<Q6_K>,
     &repacked_gemm_impl<Q6_K>},
};

const RepackFormat& repack_format(const std::string& format) {
  for (const RepackFormat& e : kRepackFormats) {
    if (format == e.name) return e;
  }
  TORCH_CHECK(false, "gguf_repack has no layout for format ", format);
}

struct GemmFormat {
  const char* name;
  int64_t bytes;
  void (*run)(const InputRows&, int64_t, const at::Tensor&, at::Tensor&);
};

const GemmFormat kGemmFormats[] = {
    {"Q4_K", Q4_K::kBytes, &gemm_impl<Q4_K>},
    {"Q6_K", Q6_K::kBytes, &gemm_impl<Q6_K>},
};

}  // namespace
#endif

std::vector<std::string> gguf_gemm_formats() {
  std::vector<std::string> names;
#ifdef PAGODA_GGUF_GEMM
  for (const GemmFormat& f : kGemmFormats) names.emplace_back(f.name);
#endif
  return names;
}

at::Tensor gguf_gemm(const at::Tensor& x, const at::Tensor& w, const std::string& format) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(x, "x");
  check_cpu(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kSuper == 0,
              "x must be contiguous [rows, k] with k a multiple of 256");
  const GemmFormat* f = nullptr;
  for (const GemmFormat& e : kGemmFormats) {
    if (format == e.name) f = &e;
  }
  TORCH_CHECK(f != nullptr, "gguf_gemm has no kernel for format ", format);
  const int64_t k = x.size(1);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == k / kSuper * f->bytes,
              "w must be contiguous uint8 [n, ", k / kSuper * f->bytes, "] of ", format,
              " blocks");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || w.size(0) == 0) return out;
  static thread_local InputStorage storage;
  dispatch_float_types(x, "gguf_gemm", [&](auto t) {
    f->run(quantize_inputs<decltype(t)>(x, storage), x.size(0), w, out);
  });
  return out;
#else
  TORCH_CHECK(false, "gguf_gemm needs a build with AVX-512 VNNI or AVX2");
#endif
}

at::Tensor gguf_repack(const at::Tensor& w, const std::string& format) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(w, "w");
  const RepackFormat& f = repack_format(format);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) % f.bytes == 0,
              "w must be contiguous uint8 [n, supers * ", f.bytes, "] of ", format, " blocks");
  const int64_t vectors = (w.size(0) + kLanes - 1) / kLanes, supers = w.size(1) / f.bytes;
  at::Tensor out = empty_on_huge_pages({vectors, supers, f.repacked}, w.options());
  if (out.numel() > 0) f.repack(w, out);
  return out;
#else
  TORCH_CHECK(false, "gguf_repack needs a build with AVX-512 VNNI or AVX2");
#endif
}

at::Tensor gguf_gemm_repacked(const at::Tensor& x, const at::Tensor& w, const std::string& format,
                              int64_t n) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(x, "x");
  check_cpu(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % kSuper == 0,
              "x must be contiguous [rows, k] with k a multiple of 256");
  const RepackFormat& f = repack_format(format);
  const int64_t supers = x.size(1) / kSuper;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() &&
                  w.size(0) == (n + kLanes - 1) / kLanes && w.size(1) == supers &&
                  w.size(2) == f.repacked,
              "w must be a repacked ", format, " weight of ", n, " rows and ", x.size(1),
              " columns");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0, "w must be 64-byte aligned");
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || n == 0) return out;
  static thread_local InputStorage storage;
  dispatch_float_types(x, "gguf_gemm_repacked", [&](auto t) {
    f.run(quantize_inputs<decltype(t)>(x, storage), x.size(0), w, n, out);
  });
  return out;
#else
  TORCH_CHECK(false, "gguf_gemm_repacked needs a build with AVX-512 VNNI or AVX2");
#endif
}

at::Tensor gguf_repacked_rows(const at::Tensor& w, const std::string& format, int64_t n,
                              const at::Tensor& ids, at::ScalarType dtype) {
#ifdef PAGODA_GGUF_GEMM
  check_cpu(w, "w");
  check_cpu(ids, "ids");
  const RepackFormat& f = repack_format(format);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() &&
                  w.size(0) == (n + kLanes - 1) / kLanes && w.size(2) == f.repacked,
              "w must be a repacked ", format, " weight of ", n, " rows");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids must be int64 [count]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "gguf_repacked_rows writes float32 or bfloat16");
  const at::Tensor rows = ids.contiguous();
  const int64_t* ip = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "ids must be in [0, ", n, "), got ", ip[i]);
  }
  at::Tensor out = at::empty({rows.numel(), w.size(1) * kSuper}, w.options().dtype(dtype));
  if (out.numel() > 0) f.rows(w, rows, out);
  return out;
#else
  TORCH_CHECK(false, "gguf_repacked_rows needs a build with AVX-512 VNNI or AVX2");
#endif
}

}  // namespace pagoda
