// The kernels' templates: loads and stores in the compute type, the 16-bit packs, the activations (scalar
// and in vector registers), the reductions and the line walks, statistics, normalize and the backward.
// Included only by the kernels_<dtype>_<pass>.cpp files, each of which instantiates entry points (common.h)
// for one dtype; the helpers live in an anonymous namespace, a copy per file.
#pragma once

#include "activation_ids.h"
#include "common.h"

#include <ATen/Parallel.h>
// at::vec::Vectorized, for the ISA of the CPU_CAPABILITY macros the build passes (native_cpu.py: vector_isa)
#if defined(CPU_CAPABILITY_AVX512) && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
                                        defined(__AVX512DQ__) && defined(__FMA__))
#error "CPU_CAPABILITY_AVX512 without the AVX-512 instructions ATen's vector code needs (F, BW, VL, DQ, FMA)"
#endif
#if defined(CPU_CAPABILITY_AVX2) && !(defined(__AVX2__) && defined(__FMA__))
#error "CPU_CAPABILITY_AVX2 without AVX2 and FMA"
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

// Our own vector code (the 16-bit float types' identity and ReLU loops and the fp16 buffers) needs AVX2 and
// FMA, and F16C for fp16's conversions: what -march=native gives on x86 CPUs of the last decade. Without
// them fp16 takes c10::Half's scalar conversion and bf16 the compiler's vectorization of its scalar code.
// (The transcendental activations use ATen's vectors, for whatever ISA the build names: below.)
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#define TRITON_BN_VECTORS 1
#include <immintrin.h>
#else
#define TRITON_BN_VECTORS 0
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

namespace triton_bn_cpu {
namespace {

constexpr int64_t kBlockRows = 128;  // rows summed in the compute type before the sums go to double
constexpr int64_t kMaxChunks = 64;   // row chunks of a reduction (a function of R alone: see common.h)


// Element i of p in the compute type, and v stored as T (rounded to nearest even). bf16 is converted by
// bit arithmetic that vectorizes (c10::BFloat16's own conversion has a branch for NaN that keeps the
// compiler from it); fp16 takes c10::Half's conversion (where the build has F16C, fp16 is converted 8
// values at a time instead, in registers or through fp32 buffers: below).
template <typename T> inline acc_t<T> load(const T* p, int64_t i) { return static_cast<acc_t<T>>(p[i]); }
template <> inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

template <typename T> inline void store(T* p, int64_t i, acc_t<T> v) { p[i] = T(v); }
template <> inline void store<c10::BFloat16>(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  p[i].x = static_cast<uint16_t>(nan ? 0xFFFFu : rounded);  // PyTorch's vectorized kernels' NaN (ATen's convert)
}

// -- fp16 through fp32 buffers ---------------------------------------------------------------------------
// fp16 has no fast scalar conversion: c10::Half's is a software routine, one value at a time, and GCC 12
// does not vectorize _Float16 conversions (perf/NOTES.md: our fp16 loops ran at 0.27-0.50x of PyTorch's).
// Where the build has F16C (TRITON_BN_VECTORS), fp16 is converted 8 values per instruction (rounded to
// nearest even, as c10::Half does): in registers by the loops written for identity and ReLU (the
// normalization and the plane statistics over packs, shared with bf16: normalize_packed_line,
// packed_shifted_sums; the row statistics and the backward: statistics_block_sums, half_backward_*), and for
// every other activation through fp32 buffers holding the span a loop works on, which then runs its fp32
// code (three passes over an L1-resident buffer instead of one). Every other dtype is read and written in
// place: staged_t<T> is T itself.
template <typename T> constexpr bool kStaged = TRITON_BN_VECTORS && std::is_same_v<T, c10::Half>;
template <typename T> using staged_t = std::conditional_t<kStaged<T>, float, T>;
// Whether a loop of T and activation ACT converts in registers (fp16 with identity or ReLU; the statistics
// ask with ACT 0) rather than through the buffers.
template <typename T, int ACT> constexpr bool kHalfLoops = kStaged<T> && (ACT == kIdentity || ACT == kRelu);
// Whether the normalization of T with activation ACT and the statistics of T's planes (ACT 0) run the
// loops over packs of 16 values below (fp16 and bf16, identity or ReLU).
template <typename T, int ACT> constexpr bool kPackLoops =
    TRITON_BN_VECTORS && (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) &&
    (ACT == kIdentity || ACT == kRelu);

#if TRITON_BN_VECTORS
// 8 fp16 values as fp32, and 8 fp32 values stored as fp16 (rounded to nearest even).
inline __m256 load_half8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// 8 values of a 16-bit float type as fp32, in order (bf16: the value as the high half of an fp32); and of fp32,
// for the loops that serve fp32 rows too (statistics_block_sums)
inline __m256 load8(const c10::Half* p) { return load_half8(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline void store_half8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

void half_to_float(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load_half8(in + i));
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

void float_to_half(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store_half8(out + i, _mm256_loadu_ps(in + i));
  for (; i < n; ++i) out[i] = c10::Half(in[i]);
}

// -- packs: 16 values of a 16-bit float type as two vectors of 8 fp32 ------------------------------------
// fp16: values 0-7 and 8-15. bf16: the even values and the odd ones. A bf16 value is the high half of an
// fp32, and a 32-bit lane of memory holds values 2k (low half) and 2k + 1 (high half): shifting the lane
// up gives value 2k as an fp32, masking its low half gives value 2k + 1, and rounding both and blending
// them back is the store. That is two instructions to widen 16 values and two to narrow them, where
// keeping the order costs a widening move and a shift per 8 values, and a cross-lane pack and permute to
// narrow (perf/NOTES.md: bf16's normalization ran ~1.7x faster this way). Elementwise loops do not mind
// the order; per-channel values along a row are put in the same order first (in_bf16_pack_order).
struct Pack {
  __m256 first, second;
};

inline Pack load_pack(const c10::Half* p) { return {load_half8(p), load_half8(p + 8)}; }
inline void store_pack(c10::Half* p, const Pack& v) {
  store_half8(p, v.first);
  store_half8(p + 8, v.second);
}

inline Pack load_pack(const c10::BFloat16* p) {
  const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
// v rounded to bf16 as store<c10::BFloat16> rounds it (nearest even; every NaN as 0xFFFF, as ATen's vector
// conversion and so PyTorch's own kernels write it), in the high half of each lane.
inline __m256i bf16_in_high_halves(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lowest_kept);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)), _mm256_castps_si256(nan));
}
inline void store_pack(c10::BFloat16* p, const Pack& v) {
  const __m256i even = _mm256_srli_epi32(bf16_in_high_halves(v.first), 16);  // to the low halves
  const __m256i lanes = _mm256_blend_epi16(even, bf16_in_high_halves(v.second), 0xAA);  // odd: high halves
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), lanes);
}
#endif

// Per-channel values of a bf16 row (values[c] for channel c) in the order of its packs: each whole block of
// 16 channels permuted as load_pack permutes values (even channels, then odd ones); the last C % 16, which
// the loops take one by one, as they are. (fp16's packs keep the order.)
std::vector<float> in_bf16_pack_order(const std::vector<float>& values) {
  std::vector<float> ordered(values);
  for (size_t block = 0; block + 16 <= values.size(); block += 16) {
    for (size_t k = 0; k < 8; ++k) {
      ordered[block + k] = values[block + 2 * k];
      ordered[block + 8 + k] = values[block + 2 * k + 1];
    }
  }
  return ordered;
}

// A thread's fp32 buffer of n values for slot 0-4 (one per array staged at once), all five in one
// allocation reused from call to call. The slots are kStageSkew floats more than n apart, never a multiple
// of 4 KiB: at such a distance every load from one buffer would look to the CPU as if it depended on the
// store at the same index of another (4K aliasing), stalling the loops that read one and write another.
constexpr int64_t kStageSkew = 48;
inline float* stage_buffer(int slot, int64_t n) {
  thread_local std::vector<float> buffer;
  const int64_t stride = (n + 15) / 16 * 16 + kStageSkew;
  if (static_cast<int64_t>(buffer.size()) < 5 * stride) buffer.resize(5 * stride);
  return buffer.data() + slot * stride;
}

// [p, p + n) as the loops read it: p itself, or (fp16) its values converted into a buffer of the slot.
template <typename T> inline const staged_t<T>* read_staged(const T* p, int64_t n, int slot) {
  if constexpr (kStaged<T>) {
    if (p == nullptr) return nullptr;
    float* buffer = stage_buffer(slot, n);
    half_to_float(p, buffer, n);
    return buffer;
  } else {
    return p;
  }
}

// Where the loops write [p, p + n): p itself, or (fp16) a buffer of the slot that write_back converts into p.
template <typename T> inline staged_t<T>* write_target(T* p, int64_t n, int slot) {
  if constexpr (kStaged<T>) {
    return p == nullptr ? nullptr : stage_buffer(slot, n);
  } else {
    return p;
  }
}

template <typename T> inline void write_back(T* p, int64_t n, int slot) {
  if constexpr (kStaged<T>) {
    if (p != nullptr) float_to_half(stage_buffer(slot, n), p, n);
  }
}

// -- activations: id -> act(z) and dL/dz = dL/dy * act'(z), as PyTorch's CPU kernels compute them --------
// (double constants, rounded to the compute type where used: each rounds to the same fp32 value as
// its fp32 literal, checked below, so the fp32 arithmetic is PyTorch's)
constexpr double kSqrt1_2 = 0.70710678118654752440;
constexpr double kTanhBeta = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kTanhKappa = 0.044715;
constexpr double kGeluPdf = 0.39894228040143267794;   // 1 / sqrt(2 pi)
static_assert(static_cast<float>(kSqrt1_2) == 0.70710678118654752440f && static_cast<float>(kTanhBeta) ==
              0.79788456080286535588f && static_cast<float>(kTanhKappa) == 0.044715f &&
              static_cast<float>(kGeluPdf) == 0.39894228040143267794f, "constants round as their fp32 literals");

template <int ACT, typename A> inline A activate(A z, A slope) {
  constexpr A zero = 0, one = 1, half = 0.5, three = 3, six = 6;
  if constexpr (ACT == kIdentity) return z;
  if constexpr (ACT == kRelu) return z < zero ? zero : z;                               // relu (NaN stays NaN)
  if constexpr (ACT == kLeakyRelu) return z > zero ? z : z * slope;                          // leaky_relu
  if constexpr (ACT == kRelu6) return z < zero ? zero : (z > six ? six : z);             // relu6 = hardtanh(0, 6)
  if constexpr (ACT == kSilu) return z / (one + std::exp(-z));                          // silu
  if constexpr (ACT == kGelu) return half * z * (one + std::erf(z * A(kSqrt1_2)));      // gelu
  if constexpr (ACT == kGeluTanh) return half * z * (one + std::tanh(A(kTanhBeta) * (z + A(kTanhKappa) * z * z * z)));
  if constexpr (ACT == kHardswish) return z * std::min(std::max(z + three, zero), six) / six;  // hardswish
  if constexpr (ACT == kSigmoid) return one / (one + std::exp(-z));                        // sigmoid
  return z;
}

template <int ACT, typename A> inline A activation_backward(A g, A z, A slope) {
  constexpr A zero = 0, one = 1, half = 0.5, three = 3, six = 6;
  if constexpr (ACT == kIdentity) return g;
  if constexpr (ACT == kRelu) return z <= zero ? zero : g;                              // threshold_backward
  if constexpr (ACT == kLeakyRelu) return z > zero ? g : g * slope;                          // leaky_relu_backward
  if constexpr (ACT == kRelu6) return (z <= zero || z >= six) ? zero : g;                // hardtanh_backward
  if constexpr (ACT == kSilu) {                                                         // silu_backward
    const A s = one / (one + std::exp(-z));
    return g * s * (one + z * (one - s));
  }
  if constexpr (ACT == kGelu) {                                                         // gelu_backward
    const A cdf = half * (one + std::erf(z * A(kSqrt1_2)));
    return g * (cdf + z * A(kGeluPdf) * std::exp(-half * z * z));
  }
  if constexpr (ACT == kGeluTanh) {                                                         // gelu_backward, tanh
    const A inner = A(kTanhBeta) * (z + A(kTanhKappa) * z * z * z);
    const A t = std::tanh(inner);
    const A left = half * z, right = one + t;
    return g * (half * right + left * (one - t * t) * A(kTanhBeta) * (one + three * A(kTanhKappa) * z * z));
  }
  if constexpr (ACT == kHardswish) return z <= -three ? zero : (z < three ? g * (z / three + half) : g);  // hardswish_backward
  if constexpr (ACT == kSigmoid) {                                                         // sigmoid_backward
    const A s = one / (one + std::exp(-z));
    return g * (one - s) * s;
  }
  return g;
}

// -- the transcendental activations in vector registers: ATen's vector library ---------------------------
// GCC vectorizes no call to std::exp, std::erf or std::tanh (only -ffast-math would let it call glibc's
// vector versions, and it would also drop the NaN semantics the loops keep), so a loop calling them runs
// one value at a time: 3-6x slower than PyTorch's BN followed by its vectorized activation
// (perf/NOTES.md). SiLU, GELU, GELU-tanh and sigmoid therefore run on at::vec::Vectorized<A>, the vector
// type PyTorch's own CPU kernels use, built for the ISA the build names (native_cpu.py: the CPU_CAPABILITY
// macros, AVX-512 or AVX2 on x86, as PyTorch itself dispatches on this CPU): 16 fp32 / 8 double lanes
// under AVX-512, 8 / 4 under AVX2, NEON's 4 / 2 on Arm, and ATen's scalar loops where no vector ISA is
// known. Its tanh is Sleef's (1 ulp; the symbols come from libtorch_cpu, which the library links), and so are
// double's exp and erf: the functions, to the ulp, that PyTorch's float64 kernels call. fp32 arithmetic takes
// ATen's faster inlined exp_u20 for SiLU's and sigmoid's logistic (exp_vec below) and for GELU (gelu_terms,
// with ATen's erf polynomial, since PyTorch's own fp32/bf16 GELU runs oneDNN's code, faster than ATen's erf):
// Sleef's exp is a library call. The formulas are activate<ACT>'s.
template <typename A> using Vec = at::vec::Vectorized<A>;
template <typename A> inline Vec<A> splat(double value) { return Vec<A>(static_cast<A>(value)); }  // every lane

// Whether the activation ACT of a T line runs in vector registers (the vector lines below; activation_ids.h's
// computed_in_vectors, the table's vector_math: SiLU, GELU, GELU-tanh and sigmoid), for every dtype (in its compute type A: fp32, or double
// for float64).
template <typename T, int ACT> constexpr bool kVectorMath = computed_in_vectors(ACT);

// e^x in the vector lines (SiLU's and sigmoid's logistic, GELU's Gaussian). In fp32 (the compute type of fp32,
// bf16 and fp16 lines) ATen's exp_u20, inlined: Sleef's 1-ulp exp, which PyTorch's own silu and sigmoid call, is
// a library call, across which every vector register is caller-saved, and costs twice exp_u20's arithmetic
// besides. Measured on an AVX2 host (perf/NOTES.md), it held the fp32 SiLU cells at 1.0-1.2x of PyTorch's;
// exp_u20 took them to 1.3-1.9x. The cost in accuracy (perf/logistic_accuracy.py, every 16th fp32 value with
// |z| <= 20): SiLU within 4.2 ulp of the exact value and sigmoid within 4.0 (PyTorch's: 2.3), one value in 50
// differing from PyTorch's, far inside the suite's fp32 bound. exp_u20 turns a NaN into inf and flushes results
// below fp32's smallest normal to 0 (where e^-z adds nothing to 1 + e^-z). double keeps Sleef's exp: PyTorch's
// float64 values to the ulp.
template <typename A> inline Vec<A> exp_vec(const Vec<A>& x) {
  if constexpr (std::is_same_v<A, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// The logistic 1 / (1 + e^-z), NaN kept: exp_vec's fp32 e^NaN is inf, whose logistic would be 0 (Sleef's double
// exp keeps NaN itself).
template <typename A> inline Vec<A> logistic_vec(const Vec<A>& z) {
  const Vec<A> one = splat<A>(1), s = one / (one + exp_vec(z.neg()));
  if constexpr (std::is_same_v<A, float>) {
    return Vec<A>::blendv(s, z, z != z);
  } else {
    return s;
  }
}

// GELU's normal CDF Phi(z) = (1 + erf(z / sqrt 2)) / 2 and its Gaussian exp(-z^2 / 2), which the backward's
// density shares. For fp32 (the compute type of fp32, bf16 and fp16 lines): erf by Abramowitz and Stegun 7.1.26
// (|error| <= 1.5e-7, the approximation ATen's own Vectorized<float>::erf takes) with exp_vec's exp_u20 for the
// exp(-x^2) inside it, in place of Sleef's 1-ulp exp behind a library call: measured, ATen's erf made our fused
// BN + GELU pass cost 2 ms of arithmetic on a 32x64x56x56 bf16 tensor where PyTorch's whole GELU (oneDNN's)
// took 1.6 ms (perf/NOTES.md). The same exp is the backward's Gaussian. double keeps ATen's erf and exp (Sleef's,
// 1 ulp).
template <typename A> struct GeluTerms { Vec<A> cdf, gauss; };
template <typename A> inline GeluTerms<A> gelu_terms(const Vec<A>& z) {
  const Vec<A> half = splat<A>(0.5), one = splat<A>(1);
  if constexpr (std::is_same_v<A, float>) {
    // 1 + p |x|, x = z / sqrt 2; |z| capped at 1e18 (NaN kept), where t is 0 to fp32's precision anyway, so that
    // an infinite z gives a finite d and the Newton step below no inf * 0
    const Vec<A> d = at::vec::fmadd(splat<A>(0.3275911 * kSqrt1_2), at::vec::minimum(z.abs(), splat<A>(1e18)), one);
#if defined(CPU_CAPABILITY_AVX512)
    // 1 / d: the 14-bit reciprocal estimate and one Newton step (~28 bits), a quarter of a division's cost
    const Vec<A> estimate = Vec<A>(_mm512_rcp14_ps(d));
    const Vec<A> t = estimate * at::vec::fnmadd(d, estimate, splat<A>(2));
#else
    const Vec<A> t = one / d;
#endif
    Vec<A> poly = at::vec::fmadd(splat<A>(1.061405429), t, splat<A>(-1.453152027));
    poly = at::vec::fmadd(poly, t, splat<A>(1.421413741));
    poly = at::vec::fmadd(poly, t, splat<A>(-0.284496736));
    poly = at::vec::fmadd(poly, t, splat<A>(0.254829592)) * t;
    const Vec<A> gauss = exp_vec(splat<A>(-0.5) * z * z);  // exp(-x^2)
    const Vec<A> tail = half * poly * gauss;                   // (1 - erf(|x|)) / 2
    return {Vec<A>::blendv(one - tail, tail, z < Vec<A>(0)), gauss};
  } else {
    return {half * (one + (z * splat<A>(kSqrt1_2)).erf()), exp_vec(splat<A>(-0.5) * z * z)};
  }
}

// act(z) for Vec<A>::size() values (SiLU z / (1 + e^-z), as PyTorch writes it: a NaN z gives NaN / inf).
template <int ACT, typename A> inline Vec<A> activate_vec(const Vec<A>& z) {
  const Vec<A> half = splat<A>(0.5), one = splat<A>(1);
  if constexpr (ACT == kSilu) return z / (one + exp_vec(z.neg()));
  if constexpr (ACT == kGelu) return z * gelu_terms(z).cdf;
  if constexpr (ACT == kGeluTanh) {
    const Vec<A> inner = splat<A>(kTanhBeta) * at::vec::fmadd(splat<A>(kTanhKappa), z * z * z, z);
    return half * z * (one + inner.tanh());
  }
  if constexpr (ACT == kSigmoid) return logistic_vec(z);
  return z;
}

// dL/dz = g * act'(z) for Vec<A>::size() values, the formulas of activation_backward<ACT>.
template <int ACT, typename A>
inline Vec<A> activation_backward_vec(const Vec<A>& g, const Vec<A>& z) {
  const Vec<A> half = splat<A>(0.5), one = splat<A>(1);
  if constexpr (ACT == kSilu) {
    const Vec<A> s = logistic_vec(z);
    return g * s * at::vec::fmadd(z, one - s, one);
  }
  if constexpr (ACT == kGelu) {
    const GeluTerms<A> terms = gelu_terms(z);
    return g * at::vec::fmadd(z * splat<A>(kGeluPdf), terms.gauss, terms.cdf);
  }
  if constexpr (ACT == kGeluTanh) {
    const Vec<A> beta = splat<A>(kTanhBeta), kappa = splat<A>(kTanhKappa), square = z * z;
    const Vec<A> t = (beta * at::vec::fmadd(kappa, square * z, z)).tanh();
    const Vec<A> inner_slope = beta * at::vec::fmadd(splat<A>(3) * kappa, square, one);
    const Vec<A> slope = half * z * (one - t * t) * inner_slope;
    return g * at::vec::fmadd(half, one + t, slope);
  }
  if constexpr (ACT == kSigmoid) {
    const Vec<A> s = logistic_vec(z);
    return g * (one - s) * s;
  }
  return g;
}

// -- lines of T as vectors of the compute type -----------------------------------------------------------
// A vector of T (Vec<T>::size() values) is kParts vectors of its compute type A: one for fp32 and double, two
// fp32 vectors for bf16 and fp16 (ATen's convert_to_float widens them in order, convert_from_float rounds
// to nearest even and keeps NaN). The vector lines of the forward and the backward (transcendental
// activations) read and write T through these, the last values of a line by partial loads and stores.
template <typename T> constexpr int kParts = std::is_same_v<T, acc_t<T>> ? 1 : 2;
template <typename T> using Parts = std::array<Vec<acc_t<T>>, kParts<T>>;

template <typename T> inline Parts<T> load_parts(const T* p, int64_t count) {
  static_assert(Vec<T>::size() == kParts<T> * Vec<acc_t<T>>::size(), "a vector of T is kParts vectors of A");
  const Vec<T> v = count == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, count);
  if constexpr (kParts<T> == 1) {
    return {v};
  } else {
    auto [first, second] = at::vec::convert_to_float<T>(v);
    return {first, second};
  }
}

template <typename T> inline void store_parts(T* p, const Parts<T>& parts, int64_t count) {
  Vec<T> v;
  if constexpr (kParts<T> == 1) v = parts[0]; else v = at::vec::convert_from_float<T>(parts[0], parts[1]);
  if (count == Vec<T>::size()) v.store(p); else v.store(p, count);
}

// Calls body(p, at, part) for the parts of the vector of T holding the count values at i of a line: part p
// holds the values [at, at + part) (a partial vector's later parts hold none and are skipped).
template <typename T, typename Body> inline void for_each_part(int64_t i, int64_t count, const Body& body) {
  constexpr int64_t kLanes = Vec<acc_t<T>>::size();
  for (int p = 0; p < kParts<T>; ++p) {
    const int64_t part = std::min(count - p * kLanes, kLanes);
    if (part <= 0) break;
    body(p, i + p * kLanes, part);
  }
}

// Per-channel values for the count values at i of a line: rows read them at the column, planes (one
// channel) repeat values[0].
template <bool PLANES, typename A> inline Vec<A> per_channel_vector(const A* values, int64_t i, int64_t count) {
  if constexpr (PLANES) return Vec<A>(values[0]);
  return count == Vec<A>::size() ? Vec<A>::loadu(values + i) : Vec<A>::loadu(values + i, count);
}

// x * scale + shift for the part values at `at` of a line (the per-channel values as per_channel_vector reads
// them): the z of every vector line, forward and backward.
template <bool PLANES, typename A>
inline Vec<A> affine_vec(const Vec<A>& x, const A* scale, const A* shift, int64_t at, int64_t part) {
  return at::vec::fmadd(x, per_channel_vector<PLANES>(scale, at, part), per_channel_vector<PLANES>(shift, at, part));
}

// Calls body(i, count) for the vectors of T of a line of n values: whole ones, then one partial vector.
template <typename T, typename Body> inline void for_each_vector(int64_t n, const Body& body) {
  constexpr int64_t kWide = Vec<T>::size();
  int64_t i = 0;
  for (; i + kWide <= n; i += kWide) body(i, kWide);
  if (i < n) body(i, n - i);
}

// Calls body(std::integral_constant<int, ACT>{}) with the activation id as a compile-time constant, so
// that every inner loop is specialized (and vectorized) for one activation.
template <typename Body> void dispatch_activation(int64_t activation, Body&& body) {
  static_assert(kActivationCount == 9, "a new activation needs its case here and its branches in activate() and "
                "activation_backward() (docs/adding-an-activation.md)");
  switch (activation) {
    case kIdentity: body(std::integral_constant<int, kIdentity>{}); break;
    case kRelu: body(std::integral_constant<int, kRelu>{}); break;
    case kLeakyRelu: body(std::integral_constant<int, kLeakyRelu>{}); break;
    case kRelu6: body(std::integral_constant<int, kRelu6>{}); break;
    case kSilu: body(std::integral_constant<int, kSilu>{}); break;
    case kGelu: body(std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: body(std::integral_constant<int, kGeluTanh>{}); break;
    case kHardswish: body(std::integral_constant<int, kHardswish>{}); break;
    case kSigmoid: body(std::integral_constant<int, kSigmoid>{}); break;
    default: TORCH_CHECK(false, "triton_bn_cpu: unknown activation id ", activation);
  }
}

struct Chunks {
  int64_t count, rows;
  explicit Chunks(int64_t R) {
    count = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (R + kBlockRows - 1) / kBlockRows));
    rows = (R + count - 1) / count;
  }
};

// Two per-channel sums over the rows: sum_r a(r, c) and sum_r b(r, c). The work is cut into tasks of
// (row chunk, block of channels). Where the row chunks alone give every thread several tasks, a block is a
// whole row (up to kWideChannelBlock channels), so that a task reads its rows end to end; otherwise blocks
// of kChannelBlock channels, so that a short, wide input (a 7x7 map with 2048 channels: a hundred rows)
// still spreads over the threads. (Measured: [2048, 1024] fp32 read in four 256-channel strips per row chunk
// took its training forward to 0.82x of PyTorch's on an AVX2 host; perf/NOTES.md.) Within a task, blocks of
// kBlockRows rows are summed in compute type A by row_sums(r0, r1, c0, n, a, b) (rows [r0, r1), channels
// [c0, c0 + n), into a[0, n) and b[0, n)), and the block sums added in double; the chunks are then added in
// order. A channel's sums are added in the same order whatever the blocks, so the results do not depend on
// the thread count.
constexpr int64_t kChannelBlock = 256;
constexpr int64_t kWideChannelBlock = 4096;  // two sums of A: 32 KB in fp32

inline int64_t channel_block(const Chunks& chunks, int64_t C) {
  return chunks.count >= 4 * at::get_num_threads() ? std::min(C, kWideChannelBlock) : kChannelBlock;
}

template <typename A, typename RowSums>
void reduce_rows(int64_t R, int64_t C, std::vector<double>& total_a, std::vector<double>& total_b,
                 const RowSums& row_sums) {
  const Chunks chunks(R);
  const int64_t block = channel_block(chunks, C), channel_blocks = (C + block - 1) / block;
  std::vector<double> partial_a(chunks.count * C, 0.0), partial_b(chunks.count * C, 0.0);
  at::parallel_for(0, chunks.count * channel_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> a(block), b(block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / channel_blocks, c0 = (task % channel_blocks) * block;
      const int64_t n = std::min(block, C - c0);
      const int64_t r_end = std::min(R, (k + 1) * chunks.rows);
      double* pa = partial_a.data() + k * C + c0;
      double* pb = partial_b.data() + k * C + c0;
      for (int64_t r0 = k * chunks.rows; r0 < r_end; r0 += kBlockRows) {
        std::fill(a.begin(), a.begin() + n, A(0));
        std::fill(b.begin(), b.begin() + n, A(0));
        row_sums(r0, std::min(r_end, r0 + kBlockRows), c0, n, a.data(), b.data());
        for (int64_t c = 0; c < n; ++c) {
          pa[c] += a[c];
          pb[c] += b[c];
        }
      }
    }
  });
  total_a.assign(C, 0.0);
  total_b.assign(C, 0.0);
  for (int64_t k = 0; k < chunks.count; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      total_a[c] += partial_a[k * C + c];
      total_b[c] += partial_b[k * C + c];
    }
  }
}

// The same two sums over planes ([N, C, S], S contiguous values per (sample, channel)). Along a plane
// the values are summed in compute type A, in vector lanes (sum_span: kSumLanes running sums, added in a
// fixed order), span_sums(c, offset, count) returning the two sums over the
// values [offset, offset + count) of channel c; spans of at most kSpan values go to double. Tasks:
// (channel, chunk of planes), chunks of about kChunkValues values, fixed by the shape; the chunks are
// added in order.
constexpr int64_t kSpan = 2048;
constexpr int64_t kChunkValues = 32768;

// (sum of f(i).first, sum of f(i).second) for i in [0, count), in kSumLanes running sums of each: a plain
// running sum is one serial chain of additions, one add latency per value (the compiler may not reorder
// floating-point sums by itself, and did not vectorize an `omp simd reduction` over this lambda: the plane
// statistics ran 30x slower than a sum, perf/NOTES.md). Lane k takes the values i = k mod kSumLanes; the
// lanes are added in a fixed order at the end, so the result depends on neither the build nor the threads.
template <typename A> constexpr int kSumLanes = 64 / static_cast<int>(sizeof(A));  // two 256-bit registers of A
template <typename A, typename F> inline std::pair<A, A> sum_span(int64_t count, const F& f) {
  constexpr int L = kSumLanes<A>;
  A lane_a[L] = {}, lane_b[L] = {};
  int64_t i = 0;
  for (; i + L <= count; i += L) {
#pragma omp simd
    for (int k = 0; k < L; ++k) {
      const std::pair<A, A> value = f(i + k);
      lane_a[k] += value.first;
      lane_b[k] += value.second;
    }
  }
  A sum_a = 0, sum_b = 0;
  for (int k = 0; k < L; ++k) {
    sum_a += lane_a[k];
    sum_b += lane_b[k];
  }
  for (; i < count; ++i) {
    const std::pair<A, A> value = f(i);
    sum_a += value.first;
    sum_b += value.second;
  }
  return {sum_a, sum_b};
}

template <typename SpanSums>
void reduce_planes(const Geometry& g, std::vector<double>& total_a, std::vector<double>& total_b,
                   const SpanSums& span_sums) {
  const int64_t planes_per_chunk = std::max<int64_t>(1, kChunkValues / std::max<int64_t>(g.S, 1));
  const int64_t chunks = (g.N + planes_per_chunk - 1) / planes_per_chunk;
  std::vector<double> partial_a(g.C * chunks, 0.0), partial_b(g.C * chunks, 0.0);
  at::parallel_for(0, g.C * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / chunks, k = task % chunks;
      const int64_t n_end = std::min(g.N, (k + 1) * planes_per_chunk);
      double sum_a = 0.0, sum_b = 0.0;
      for (int64_t n = k * planes_per_chunk; n < n_end; ++n) {
        for (int64_t s0 = 0; s0 < g.S; s0 += kSpan) {
          const auto sums = span_sums(c, (n * g.C + c) * g.S + s0, std::min(kSpan, g.S - s0));
          sum_a += sums.first;
          sum_b += sums.second;
        }
      }
      partial_a[task] = sum_a;
      partial_b[task] = sum_b;
    }
  });
  total_a.assign(g.C, 0.0);
  total_b.assign(g.C, 0.0);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t k = 0; k < chunks; ++k) {
      total_a[c] += partial_a[c * chunks + k];
      total_b[c] += partial_b[c * chunks + k];
    }
  }
}

// The elementwise passes' walk: body(offset, c, length) for every line of x, the values
// [offset, offset + length). Rows: every row, c = 0 and length = C (per-channel arrays indexed by the
// column). Planes: every plane, c = its channel and length = S (the per-channel values constant).
template <typename Body> void for_each_line(const Geometry& g, int64_t values_per_task, const Body& body) {
  const int64_t lines = g.planes ? g.N * g.C : g.R, length = g.planes ? g.S : g.C;
  const int64_t grain = std::max<int64_t>(1, values_per_task / std::max<int64_t>(length, 1));
  at::parallel_for(0, lines, grain, [&](int64_t begin, int64_t end) {
    // a plane's channel counted along, not line % C: a division per line shows on small planes (7x7)
    int64_t c = g.planes ? begin % g.C : 0;
    for (int64_t line = begin; line < end; ++line) {
      body(line * length, c, length);
      if (g.planes && ++c == g.C) c = 0;
    }
  });
}

// Along a line, the index of value i's per-channel values: i itself in a row, 0 in a plane (one channel).
template <bool PLANES> constexpr int64_t column(int64_t i) { return PLANES ? 0 : i; }

// -- forward ---------------------------------------------------------------------------------------------
#if TRITON_BN_VECTORS
// One fp16 or bf16 line of y = act(x * scale + shift [+ residual]), ACT identity or ReLU, with the
// conversions in registers, a pack of 16 values per step (then, for fp16, 8): one pass over memory, as
// PyTorch's own kernels make, where fp16's fp32 buffers take three (perf/NOTES.md). The same arithmetic as
// the fp32 loops (x * scale + shift fused, the residual added, then ReLU as `z < 0 ? 0 : z`: max(0, z)
// returns z itself for a NaN and for -0); the last values take the scalar conversion. Along a row, sc and
// sh are in pack order (in_bf16_pack_order).
template <int ACT> inline __m256 normalize8(__m256 x, __m256 scale, __m256 shift, const __m256* residual) {
  __m256 z = _mm256_fmadd_ps(x, scale, shift);
  if (residual != nullptr) z = _mm256_add_ps(z, *residual);
  if constexpr (ACT == kRelu) z = _mm256_max_ps(_mm256_setzero_ps(), z);
  return z;
}

template <typename T, int ACT, bool PLANES>
void normalize_packed_line(const T* in, const T* res, T* out, int64_t n, const float* sc, const float* sh) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const Pack scale = PLANES ? Pack{_mm256_set1_ps(sc[0]), _mm256_set1_ps(sc[0])}
                              : Pack{_mm256_loadu_ps(sc + i), _mm256_loadu_ps(sc + i + 8)};
    const Pack shift = PLANES ? Pack{_mm256_set1_ps(sh[0]), _mm256_set1_ps(sh[0])}
                              : Pack{_mm256_loadu_ps(sh + i), _mm256_loadu_ps(sh + i + 8)};
    const Pack x = load_pack(in + i);
    const Pack r = res != nullptr ? load_pack(res + i) : Pack{};
    store_pack(out + i, Pack{normalize8<ACT>(x.first, scale.first, shift.first, res != nullptr ? &r.first : nullptr),
                             normalize8<ACT>(x.second, scale.second, shift.second,
                                             res != nullptr ? &r.second : nullptr)});
  }
  if constexpr (std::is_same_v<T, c10::Half>) {  // a half pack: values in order, as the scalar tail indexes them
    for (; i + 8 <= n; i += 8) {
      const __m256 r = res != nullptr ? load_half8(res + i) : __m256{};
      store_half8(out + i, normalize8<ACT>(load_half8(in + i), PLANES ? _mm256_set1_ps(sc[0]) : _mm256_loadu_ps(sc + i),
                                           PLANES ? _mm256_set1_ps(sh[0]) : _mm256_loadu_ps(sh + i),
                                           res != nullptr ? &r : nullptr));
    }
  }
  for (; i < n; ++i) {
    float z = load(in, i) * sc[column<PLANES>(i)] + sh[column<PLANES>(i)];
    if (res != nullptr) z += load(res, i);
    store(out, i, activate<ACT>(z, 0.f));
  }
}
// Statistics of fp16 or bf16 values with the conversions in registers: (sum of d, sum of d * d),
// d = x - shift, over count values of a plane, a pack per step into two sets of 8 fp32 lanes added in a
// fixed order at the end.
template <typename T> inline std::pair<float, float> packed_shifted_sums(const T* p, int64_t count, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const Pack x = load_pack(p + i);
    const __m256 d0 = _mm256_sub_ps(x.first, sh), d1 = _mm256_sub_ps(x.second, sh);
    a0 = _mm256_add_ps(a0, d0);
    a1 = _mm256_add_ps(a1, d1);
    b0 = _mm256_fmadd_ps(d0, d0, b0);
    b1 = _mm256_fmadd_ps(d1, d1, b1);
  }
  float lanes_a[8], lanes_b[8];
  _mm256_storeu_ps(lanes_a, _mm256_add_ps(a0, a1));
  _mm256_storeu_ps(lanes_b, _mm256_add_ps(b0, b1));
  float sum_a = 0.f, sum_b = 0.f;
  for (int k = 0; k < 8; ++k) {
    sum_a += lanes_a[k];
    sum_b += lanes_b[k];
  }
  for (; i < count; ++i) {
    const float d = load(p, i) - shift;
    sum_a += d;
    sum_b += d * d;
  }
  return {sum_a, sum_b};
}

// The same along a row of fp16, bf16 or fp32 values (load8): a[c] += d, b[c] += d * d for the n channels of
// one row, d = x - shift[c].
template <typename T> inline void statistics_row_sums(const T* row, const float* shift, int64_t n, float* a, float* b) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 d = _mm256_sub_ps(load8(row + c), _mm256_loadu_ps(shift + c));
    _mm256_storeu_ps(a + c, _mm256_add_ps(_mm256_loadu_ps(a + c), d));
    _mm256_storeu_ps(b + c, _mm256_fmadd_ps(d, d, _mm256_loadu_ps(b + c)));
  }
  for (; c < n; ++c) {
    const float d = load(row, c) - shift[c];
    a[c] += d;
    b[c] += d * d;
  }
}

// The same over the rows [r0, r1) of a block (x at the block's first channel, rows C apart): each group of 8
// channels summed down the rows in registers, four groups at a time, every channel's values added in row order
// as a row-at-a-time loop adds them (so the same sums: bitwise, perf/kernel_ab.py checks), without that loop's
// set-up per row and its load and store of the sums for every row, which on rows of 64 channels cost about what
// the values did (perf/NOTES.md). Which rows take it: kBlockStatisticsBelow, below.
template <typename T>
inline void statistics_block_sums(const T* x, int64_t C, int64_t r0, int64_t r1, const float* shift, int64_t n,
                                  float* a, float* b) {
  constexpr int kGroups = 4;
  int64_t c = 0;
  for (; c + 8 * kGroups <= n; c += 8 * kGroups) {
    __m256 sh[kGroups], sum_a[kGroups], sum_b[kGroups];
    for (int k = 0; k < kGroups; ++k) {
      sh[k] = _mm256_loadu_ps(shift + c + 8 * k);
      sum_a[k] = _mm256_loadu_ps(a + c + 8 * k);
      sum_b[k] = _mm256_loadu_ps(b + c + 8 * k);
    }
    for (int64_t r = r0; r < r1; ++r) {
      for (int k = 0; k < kGroups; ++k) {
        const __m256 d = _mm256_sub_ps(load8(x + r * C + c + 8 * k), sh[k]);
        sum_a[k] = _mm256_add_ps(sum_a[k], d);
        sum_b[k] = _mm256_fmadd_ps(d, d, sum_b[k]);
      }
    }
    for (int k = 0; k < kGroups; ++k) {
      _mm256_storeu_ps(a + c + 8 * k, sum_a[k]);
      _mm256_storeu_ps(b + c + 8 * k, sum_b[k]);
    }
  }
  if (c < n) {  // the last channels (fewer than 32): row by row, as before
    for (int64_t r = r0; r < r1; ++r) statistics_row_sums(x + r * C + c, shift + c, n - c, a + c, b + c);
  }
}
#else
template <typename T, int ACT, bool PLANES>
void normalize_packed_line(const T*, const T*, T*, int64_t, const float*, const float*) {}
template <typename T> inline std::pair<float, float> packed_shifted_sums(const T*, int64_t, float) {
  return {0.f, 0.f};
}
template <typename T>
inline void statistics_block_sums(const T*, int64_t, int64_t, int64_t, const float*, int64_t, float*, float*) {}
#endif

// The rows (fewer channels than this) whose statistics statistics_block_sums takes, per element type; 0: none.
// fp16 and bf16 at any width (fp16: 1.22 -> 1.52x of PyTorch's training forward; bf16: the pass 1.16-1.88x
// faster); fp32 below 128 channels, where the compiler's vectorized row loop serves wider rows as well (16-96
// channels 1.06-1.53x faster this way, 128-512 channels 0.92-1.02x; float64's own version of the loop read
// 0.92-1.20x with no pattern: perf/results/cpu-amd-epyc-2026-12-07-block-statistics/).
template <typename T>
constexpr int64_t kBlockStatisticsBelow = !TRITON_BN_VECTORS            ? 0
                                          : kPackLoops<T, kIdentity>    ? INT64_MAX
                                          : std::is_same_v<T, float>    ? 128
                                                                        : 0;

// (mean, biased variance) per channel, in the compute type: one read of x. The shift is each channel's
// first value (0 where that is not finite).
}  // namespace

template <typename T>
void statistics(const T* x, const Geometry& g, acc_t<T>* mean, acc_t<T>* var) {
  using A = acc_t<T>;
  const int64_t R = g.R, C = g.C;
  std::vector<A> shift(C);
  for (int64_t c = 0; c < C; ++c) {
    // a finite shift: an infinite one would make every finite value inf - inf = NaN, where PyTorch's mean of
    // a channel holding +inf (and no -inf or NaN) is +inf
    const A first = load(x, g.planes ? c * g.S : c);
    shift[c] = std::isfinite(first) ? first : A(0);
  }
  std::vector<double> s1, s2;
  if (g.planes) {
    reduce_planes(g, s1, s2, [&](int64_t c, int64_t offset, int64_t count) {
      if constexpr (kPackLoops<T, kIdentity>) {
        return packed_shifted_sums(x + offset, count, shift[c]);
      } else {
        const staged_t<T>* __restrict__ p = read_staged(x + offset, count, 0);
        const A sh = shift[c];
        return sum_span<A>(count, [&](int64_t i) {
          const A d = load(p, i) - sh;
          return std::pair<A, A>(d, d * d);
        });
      }
    });
  } else {
    reduce_rows<A>(R, C, s1, s2, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n, A* __restrict__ a,
                                     A* __restrict__ b) {
      const A* __restrict__ sh = shift.data() + c0;
      if constexpr (kBlockStatisticsBelow<T> > 0) {
        if (C < kBlockStatisticsBelow<T>) {
          statistics_block_sums(x + c0, C, r0, r1, sh, n, a, b);
          return;
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const staged_t<T>* __restrict__ row = read_staged(x + r * C + c0, n, 0);
        for (int64_t c = 0; c < n; ++c) {
          const A d = load(row, c) - sh[c];
          a[c] += d;
          b[c] += d * d;
        }
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    const double m = s1[c] / R;
    mean[c] = static_cast<A>(shift[c] + m);
    const double v = s2[c] / R - m * m;  // rounding can leave it a hair below 0; a NaN or inf sum stays NaN
    var[c] = static_cast<A>(v < 0.0 ? 0.0 : v);
  }
}


namespace {

// One line of the normalization with a transcendental activation (kVectorMath), in one pass of vectors:
// x (and the residual) widened to the compute type (load_parts), z = x * scale + shift [+ residual],
// act(z) (activate_vec), rounded once to T and stored (store_parts).
template <typename T, int ACT, bool PLANES>
void normalize_vector_line(const T* x, const T* residual, T* y, int64_t n, const acc_t<T>* scale,
                           const acc_t<T>* shift) {
  using A = acc_t<T>;
  for_each_vector<T>(n, [&](int64_t i, int64_t count) {
    Parts<T> z = load_parts(x + i, count);
    const Parts<T> r = residual != nullptr ? load_parts(residual + i, count) : Parts<T>{};
    for_each_part<T>(i, count, [&](int k, int64_t at, int64_t part) {
      z[k] = affine_vec<PLANES>(z[k], scale, shift, at, part);
      if (residual != nullptr) z[k] = z[k] + r[k];
      z[k] = activate_vec<ACT, A>(z[k]);
    });
    store_parts(y + i, z, count);
  });
}

// Planes too short for whole vectors (7x7 = 49 values: three vectors of 16 bf16 values and a partial one, whose
// transcendental arithmetic runs on 16 lanes for 1 value), with a transcendental activation: consecutive planes
// are taken as one line of up to kShortPlanesChunk values, their per-channel values spread over per-value
// buffers, and normalize_vector_line runs it as a row (the same fmadd per value, so the same results) in whole
// vectors but for one partial vector per chunk. Taken where a plane's partial vector adds more than a 16th to
// its arithmetic (7x7: bf16, fp16 and fp32 on AVX2 and AVX-512, float64 on AVX-512; 14x14 nowhere). Measured
// on 2x2048x7x7 (perf/NOTES.md).
constexpr int64_t kShortPlanesChunk = 1024;
template <typename T> constexpr bool short_planes(int64_t S) {
  constexpr int64_t kWide = Vec<T>::size();
  return S % kWide != 0 && (kWide - S % kWide) * 16 > S;  // so S < 16 * kWide <= kShortPlanesChunk
}

template <typename T, int ACT>
void normalize_short_planes(const T* x, const T* residual, T* y, const Geometry& g, const acc_t<T>* scale,
                            const acc_t<T>* shift) {
  using A = acc_t<T>;
  const int64_t S = g.S, planes = g.N * g.C, per_chunk = kShortPlanesChunk / S;  // S < kShortPlanesChunk
  const int64_t chunks = (planes + per_chunk - 1) / per_chunk;
  at::parallel_for(0, chunks, std::max<int64_t>(1, 32768 / kShortPlanesChunk), [&](int64_t begin, int64_t end) {
    A sc[kShortPlanesChunk], sh[kShortPlanesChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t p0 = chunk * per_chunk, p1 = std::min(planes, p0 + per_chunk);
      int64_t c = p0 % g.C;
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(sc + (p - p0) * S, sc + (p - p0 + 1) * S, scale[c]);
        std::fill(sh + (p - p0) * S, sh + (p - p0 + 1) * S, shift[c]);
        if (++c == g.C) c = 0;
      }
      const int64_t offset = p0 * S;
      normalize_vector_line<T, ACT, false>(x + offset, residual == nullptr ? nullptr : residual + offset, y + offset,
                                           (p1 - p0) * S, sc, sh);
    }
  });
}

// Rows of few channels with the 16-bit packs (fp16 and bf16, identity or ReLU): a row of 64 channels is four
// packs, and each row's call and loop set-up cost about what its values do (the fp16 eval of 16x64x28x28
// channels_last took 101 us where the same tensor as NCHW planes took 60; perf/NOTES.md). Consecutive rows are
// taken as one line of up to kShortRowsChunk values, the per-channel values repeated once per row, and
// normalize_packed_line runs it: the same fmadd per value, so the same results. Only where C is a multiple of
// 16, so that each pack lies within one row and bf16's pack order (in_bf16_pack_order, per block of 16
// channels) is the same in the repeated arrays.
constexpr int64_t kShortRowsChunk = 1024;
constexpr bool short_rows(int64_t C) { return C < 256 && C % 16 == 0; }  // so 4 <= rows per chunk <= 64

template <typename T, int ACT>
void normalize_short_rows(const T* x, const T* residual, T* y, const Geometry& g, const float* scale,
                          const float* shift) {
  const int64_t C = g.C, rows_per_chunk = kShortRowsChunk / C;
  const int64_t chunks = (g.R + rows_per_chunk - 1) / rows_per_chunk;
  at::parallel_for(0, chunks, std::max<int64_t>(1, 32768 / kShortRowsChunk), [&](int64_t begin, int64_t end) {
    float sc[kShortRowsChunk], sh[kShortRowsChunk];  // every chunk starts at a row: one repetition serves them all
    for (int64_t r = 0; r < rows_per_chunk; ++r) {
      std::copy(scale, scale + C, sc + r * C);
      std::copy(shift, shift + C, sh + r * C);
    }
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * rows_per_chunk, offset = r0 * C;
      normalize_packed_line<T, ACT, false>(x + offset, residual == nullptr ? nullptr : residual + offset, y + offset,
                                           std::min(rows_per_chunk, g.R - r0) * C, sc, sh);
    }
  });
}

// y = act(x * scale + shift [+ residual]) line by line (for_each_line), rounded once to T.
template <typename T, int ACT, bool PLANES>
void normalize_lines(const T* x, const T* residual, T* y, const Geometry& g, const acc_t<T>* scale,
                     const acc_t<T>* shift, acc_t<T> slope) {
  if constexpr (kPackLoops<T, ACT>) {
    if (!PLANES && short_rows(g.C)) return normalize_short_rows<T, ACT>(x, residual, y, g, scale, shift);
    for_each_line(g, 32768, [&](int64_t offset, int64_t c, int64_t n) {
      normalize_packed_line<T, ACT, PLANES>(x + offset, residual == nullptr ? nullptr : residual + offset, y + offset,
                                            n, scale + c, shift + c);
    });
    return;
  }
  if constexpr (kVectorMath<T, ACT>) {
    if (PLANES && short_planes<T>(g.S)) return normalize_short_planes<T, ACT>(x, residual, y, g, scale, shift);
    for_each_line(g, 32768, [&](int64_t offset, int64_t c, int64_t n) {
      normalize_vector_line<T, ACT, PLANES>(x + offset, residual == nullptr ? nullptr : residual + offset, y + offset,
                                            n, scale + c, shift + c);
    });
    return;
  }
  for_each_line(g, 32768, [&](int64_t offset, int64_t c, int64_t n) {
    const staged_t<T>* __restrict__ in = read_staged(x + offset, n, 0);
    staged_t<T>* __restrict__ out = write_target(y + offset, n, 1);
    // rows: per-channel arrays indexed by the column; planes: one channel's value for the whole line
    const acc_t<T>* __restrict__ sc = scale + c;
    const acc_t<T>* __restrict__ sh = shift + c;
    if (residual != nullptr) {
      const staged_t<T>* __restrict__ res = read_staged(residual + offset, n, 2);
      for (int64_t i = 0; i < n; ++i) {
        store(out, i, activate<ACT>(load(in, i) * sc[column<PLANES>(i)] + sh[column<PLANES>(i)] + load(res, i), slope));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        store(out, i, activate<ACT>(load(in, i) * sc[column<PLANES>(i)] + sh[column<PLANES>(i)], slope));
      }
    }
    write_back(y + offset, n, 1);
  });
}

}  // namespace

template <typename T>
void normalize(const T* x, const T* residual, T* y, const Geometry& g, const std::vector<acc_t<T>>& scale,
               const std::vector<acc_t<T>>& shift, int64_t activation, acc_t<T> slope) {
  dispatch_activation(activation, [&](auto act) {
    constexpr int ACT = decltype(act)::value;
    if (g.planes) {
      normalize_lines<T, ACT, true>(x, residual, y, g, scale.data(), shift.data(), slope);
    } else if constexpr (kPackLoops<T, ACT> && std::is_same_v<T, c10::BFloat16>) {  // rows read them as packs
      const std::vector<float> ordered_scale = in_bf16_pack_order(scale), ordered_shift = in_bf16_pack_order(shift);
      normalize_lines<T, ACT, false>(x, residual, y, g, ordered_scale.data(), ordered_shift.data(), slope);
    } else {
      normalize_lines<T, ACT, false>(x, residual, y, g, scale.data(), shift.data(), slope);
    }
  });
}

namespace {

// -- backward --------------------------------------------------------------------------------------------
// dz = dy * act'(z), z = x * scale + shift [+ residual] recomputed (only x is saved); with an activation
// the residual enters z. Pass 1 (when dweight, dbias or a batch-statistics dx needs them): per channel
// sum dz and sum dz * xhat, xhat = (x - mean) * invstd. Pass 2: dx = (dz - sum_dz / n - xhat *
// sum_dz_xhat / n) * invstd * weight with batch statistics, dz * invstd * weight with running ones; d
// residual = dz. Every choice (activation, residual, which outputs) is a template parameter, so that the
// inner loops over channels have no branch and vectorize.

// dz at element i of a line; the per-channel values at sc[i] (rows) or sc[0] (PLANES: one channel)
template <typename T, int ACT, bool HAS_RES, bool PLANES>
inline acc_t<T> grad_pre_activation(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ res,
                                    int64_t i, const acc_t<T>* __restrict__ sc, const acc_t<T>* __restrict__ sh,
                                    acc_t<T> slope) {
  if constexpr (ACT == kIdentity) {
    return load(dy, i);
  } else {
    const int64_t c = column<PLANES>(i);
    acc_t<T> z = load(x, i) * sc[c] + sh[c];
    if constexpr (HAS_RES) z += load(res, i);
    return activation_backward<ACT>(load(dy, i), z, slope);
  }
}

// Pass 1's terms for the m values (m <= kDzChunk) at [i0, i0 + m) of a line, with a transcendental activation
// (kVectorMath), in vectors: dz = dy * act'(z) into dz[0, m) and dz * xhat, xhat = (x - mean) * invstd, into
// dz_xhat[0, m), in the compute type A (the sums then add them in a fixed order: sum_span, reduce_rows).
// Per-channel values as in the lines (rows at the column, planes [0]). ``saved``, where not null, also gets
// dz at the line's positions (saved[i0 + j]), rounded to T as PyTorch's activation backward rounds the dz it
// hands its BN backward: pass 2 then reads it instead of computing act'(z) again.
constexpr int64_t kDzChunk = 256;
template <typename T, int ACT, bool HAS_RES, bool PLANES>
void grad_terms_chunk(const T* x, const T* dy, const T* res, int64_t i0, int64_t m, const acc_t<T>* sc,
                      const acc_t<T>* sh, const acc_t<T>* mu, const acc_t<T>* is, acc_t<T>* dz, acc_t<T>* dz_xhat,
                      T* saved) {
  using A = acc_t<T>;
  for_each_vector<T>(m, [&](int64_t j, int64_t count) {
    const int64_t i = i0 + j;
    const Parts<T> xv = load_parts(x + i, count), g = load_parts(dy + i, count);
    const Parts<T> r = HAS_RES ? load_parts(res + i, count) : Parts<T>{};
    Parts<T> kept{};
    for_each_part<T>(i, count, [&](int p, int64_t at, int64_t part) {
      Vec<A> z = affine_vec<PLANES>(xv[p], sc, sh, at, part);
      if constexpr (HAS_RES) z = z + r[p];
      const Vec<A> d = activation_backward_vec<ACT, A>(g[p], z);
      const Vec<A> xhat = (xv[p] - per_channel_vector<PLANES>(mu, at, part)) * per_channel_vector<PLANES>(is, at, part);
      d.store(dz + (at - i0), part);
      (d * xhat).store(dz_xhat + (at - i0), part);
      kept[p] = d;
    });
    if (saved != nullptr) store_parts(saved + i, kept, count);
  });
}

#if TRITON_BN_VECTORS
// The backward of fp16 with the conversions in registers (ACT identity or ReLU; other activations take the
// fp32 buffers), the same arithmetic as grad_pre_activation and the fp32 loops. dz for 8 values (fp16, or bf16
// and fp32 for the block sums below): dy, or 0 where z = x * scale + shift [+ residual] <= 0
// (threshold_backward's rule; a NaN z passes dy).
template <int ACT, bool HAS_RES, typename T>
inline __m256 grad8(__m256 x, const T* dy, const T* res, __m256 scale, __m256 shift) {
  const __m256 g = load8(dy);
  if constexpr (ACT == kIdentity) {
    return g;
  } else {
    __m256 z = _mm256_fmadd_ps(x, scale, shift);
    if constexpr (HAS_RES) z = _mm256_add_ps(z, load8(res));
    return _mm256_andnot_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LE_OQ), g);
  }
}

// Pass 1 over count values of one plane: (sum dz, sum dz * (x - mean) * invstd), 8 lanes added in a fixed
// order at the end.
template <int ACT, bool HAS_RES>
std::pair<float, float> half_backward_plane_sums(const c10::Half* x, const c10::Half* dy, const c10::Half* res,
                                                 int64_t count, float sc, float sh, float mu, float is, float slope) {
  const __m256 scale = _mm256_set1_ps(sc), shift = _mm256_set1_ps(sh), mean = _mm256_set1_ps(mu);
  const __m256 invstd = _mm256_set1_ps(is);
  __m256 a = _mm256_setzero_ps(), b = a;
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 xv = load_half8(x + i);
    const __m256 dz = grad8<ACT, HAS_RES>(xv, dy + i, HAS_RES ? res + i : nullptr, scale, shift);
    a = _mm256_add_ps(a, dz);
    b = _mm256_fmadd_ps(dz, _mm256_mul_ps(_mm256_sub_ps(xv, mean), invstd), b);
  }
  float lanes_a[8], lanes_b[8];
  _mm256_storeu_ps(lanes_a, a);
  _mm256_storeu_ps(lanes_b, b);
  float sum_a = 0.f, sum_b = 0.f;
  for (int k = 0; k < 8; ++k) {
    sum_a += lanes_a[k];
    sum_b += lanes_b[k];
  }
  for (; i < count; ++i) {
    const float dz = grad_pre_activation<c10::Half, ACT, HAS_RES, true>(dy, x, res, i, &sc, &sh, slope);
    sum_a += dz;
    sum_b += dz * ((load(x, i) - mu) * is);
  }
  return {sum_a, sum_b};
}

// Pass 1 along one row segment of n channels: a[c] += dz, b[c] += dz * (x - mean[c]) * invstd[c].
template <int ACT, bool HAS_RES>
void half_backward_row_sums(const c10::Half* x, const c10::Half* dy, const c10::Half* res, int64_t n,
                            const float* sc, const float* sh, const float* mu, const float* is, float* a, float* b,
                            float slope) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 xv = load_half8(x + c);
    const __m256 dz = grad8<ACT, HAS_RES>(xv, dy + c, HAS_RES ? res + c : nullptr, _mm256_loadu_ps(sc + c),
                                               _mm256_loadu_ps(sh + c));
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(xv, _mm256_loadu_ps(mu + c)), _mm256_loadu_ps(is + c));
    _mm256_storeu_ps(a + c, _mm256_add_ps(_mm256_loadu_ps(a + c), dz));
    _mm256_storeu_ps(b + c, _mm256_fmadd_ps(dz, xhat, _mm256_loadu_ps(b + c)));
  }
  for (; c < n; ++c) {
    const float dz = grad_pre_activation<c10::Half, ACT, HAS_RES, false>(dy, x, res, c, sc, sh, slope);
    a[c] += dz;
    b[c] += dz * ((load(x, c) - mu[c]) * is[c]);
  }
}

// The same over the rows [r0, r1) of a block (x, dy and res at the block's first channel, rows C apart): G groups
// of 8 channels summed down the rows in registers (the per-channel values read from L1 each row), every
// channel's terms added in row order as half_backward_row_sums adds them (so the same sums), without its
// per-row call and its load and store of the sums for every row, on which each row waited for the last:
// half_block_sums' reason, in the backward. Channels [c, c + 8 G) of every row, for c from c0 in steps of 8 G
// while they fit; returns where it stopped.
template <int G, int ACT, bool HAS_RES, typename T>
int64_t backward_groups(const T* x, const T* dy, const T* res, int64_t C, int64_t r0, int64_t r1, int64_t c0,
                        int64_t n, const float* sc, const float* sh, const float* mu, const float* is, float* a,
                        float* b) {
  int64_t c = c0;
  for (; c + 8 * G <= n; c += 8 * G) {
    __m256 sum_a[G], sum_b[G];
    for (int k = 0; k < G; ++k) {
      sum_a[k] = _mm256_loadu_ps(a + c + 8 * k);
      sum_b[k] = _mm256_loadu_ps(b + c + 8 * k);
    }
    for (int64_t r = r0; r < r1; ++r) {
      if (c == c0 && G > 1) {  // the first pass fetches the rest of each row for the passes after it (see below)
        for (int64_t later = c + 8 * G; later < n; later += 8 * G) {
          _mm_prefetch(reinterpret_cast<const char*>(x + r * C + later), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(dy + r * C + later), _MM_HINT_T1);
          if constexpr (HAS_RES) _mm_prefetch(reinterpret_cast<const char*>(res + r * C + later), _MM_HINT_T1);
        }
      }
      for (int k = 0; k < G; ++k) {
        const int64_t at = r * C + c + 8 * k, channel = c + 8 * k;
        const __m256 xv = load8(x + at);
        const __m256 dz = grad8<ACT, HAS_RES>(xv, dy + at, HAS_RES ? res + at : nullptr,
                                                   _mm256_loadu_ps(sc + channel), _mm256_loadu_ps(sh + channel));
        const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(xv, _mm256_loadu_ps(mu + channel)),
                                          _mm256_loadu_ps(is + channel));
        sum_a[k] = _mm256_add_ps(sum_a[k], dz);
        sum_b[k] = _mm256_fmadd_ps(dz, xhat, sum_b[k]);
      }
    }
    for (int k = 0; k < G; ++k) {
      _mm256_storeu_ps(a + c + 8 * k, sum_a[k]);
      _mm256_storeu_ps(b + c + 8 * k, sum_b[k]);
    }
  }
  return c;
}

// The backward's sums over a block of rows of n channels, fp16, bf16 or fp32 (identity or ReLU): 32 channels at a
// time (a cache line of each 16-bit row per pass, two of fp32; the first pass prefetches the rest of each row into
// L2, without which the later passes read a tensor from memory a line in every row at a time and the sums of
// 32x64x56x56 ran slower than the row walk's, perf/NOTES.md), then 8 at a time, the last fewer than 8 row by row.
// bf16's values are widened in order (load8), not in pack order: the sums are the row walk's, channel by channel.
template <typename T, int ACT, bool HAS_RES>
void backward_block_sums(const T* x, const T* dy, const T* res, int64_t C, int64_t r0, int64_t r1, int64_t n,
                         const float* sc, const float* sh, const float* mu, const float* is, float* a, float* b,
                         float slope) {
  int64_t c = backward_groups<4, ACT, HAS_RES>(x, dy, res, C, r0, r1, 0, n, sc, sh, mu, is, a, b);
  c = backward_groups<1, ACT, HAS_RES>(x, dy, res, C, r0, r1, c, n, sc, sh, mu, is, a, b);
  for (int64_t r = r0; r < r1 && c < n; ++r) {
    const T* row = x + r * C;
    for (int64_t k = c; k < n; ++k) {
      const float dz = grad_pre_activation<T, ACT, HAS_RES, false>(dy + r * C, row, HAS_RES ? res + r * C : nullptr, k,
                                                                   sc, sh, slope);
      a[k] += dz;
      b[k] += dz * ((load(row, k) - mu[k]) * is[k]);
    }
  }
}

// Pass 2 along one line: dx = dz * k1 - (x - mean) * k2 - k3 and d residual = dz, as wanted.
template <int ACT, bool HAS_RES, bool DX, bool DRES, bool PLANES>
void half_backward_line(const c10::Half* x, const c10::Half* dy, const c10::Half* res, c10::Half* grad_x,
                        c10::Half* grad_res, int64_t n, const float* sc, const float* sh, const float* mu,
                        const float* k1, const float* k2, const float* k3, float slope) {
  const auto per_channel = [](const float* p, int64_t i) {
    return PLANES ? _mm256_set1_ps(p[0]) : _mm256_loadu_ps(p + i);
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = load_half8(x + i);
    const __m256 dz = grad8<ACT, HAS_RES>(xv, dy + i, HAS_RES ? res + i : nullptr, per_channel(sc, i),
                                               per_channel(sh, i));
    if constexpr (DX) {
      const __m256 centered = _mm256_mul_ps(_mm256_sub_ps(xv, per_channel(mu, i)), per_channel(k2, i));
      store_half8(grad_x + i, _mm256_sub_ps(_mm256_fmsub_ps(dz, per_channel(k1, i), centered), per_channel(k3, i)));
    }
    if constexpr (DRES) store_half8(grad_res + i, dz);
  }
  for (; i < n; ++i) {
    const int64_t c = column<PLANES>(i);
    const float dz = grad_pre_activation<c10::Half, ACT, HAS_RES, PLANES>(dy, x, res, i, sc, sh, slope);
    if constexpr (DX) store(grad_x, i, dz * k1[c] - (load(x, i) - mu[c]) * k2[c] - k3[c]);
    if constexpr (DRES) store(grad_res, i, dz);
  }
}
#else
template <int ACT, bool HAS_RES>
std::pair<float, float> half_backward_plane_sums(const c10::Half*, const c10::Half*, const c10::Half*, int64_t, float,
                                                 float, float, float, float) {
  return {0.f, 0.f};
}
template <int ACT, bool HAS_RES>
void half_backward_row_sums(const c10::Half*, const c10::Half*, const c10::Half*, int64_t, const float*, const float*,
                            const float*, const float*, float*, float*, float) {}
template <typename T, int ACT, bool HAS_RES>
void backward_block_sums(const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                         const float*, const float*, float*, float*, float) {}
template <int ACT, bool HAS_RES, bool DX, bool DRES, bool PLANES>
void half_backward_line(const c10::Half*, const c10::Half*, const c10::Half*, c10::Half*, c10::Half*, int64_t,
                        const float*, const float*, const float*, const float*, const float*, const float*, float) {}
#endif

// Pass 1: sum dz and sum dz * xhat per channel. With a transcendental activation, dz_saved (where not null:
// grad_x, of x's size and type) also gets every dz, rounded to T (grad_terms_chunk). Rows of few channels with
// identity or ReLU are summed a block of rows at a time (backward_block_sums), bitwise the same sums as the row
// walk's, on rows of fewer than kBlockSumsBelow channels: fp16 and bf16 below 256 (the sums pass alone 1.3-1.75x
// faster on 64-channel rows, both threads, 32x64x56x56 from memory included; in a loop of the sums, one thread, in
// cache, 1.4-2.0x on 48-240 channels, 1.0-1.4x on 256, where the row walk stays: perf/NOTES.md), fp32 below 96
// (the whole backward 1.03-1.25x faster on 32-64 channels, kernel against kernel, 0.92-1.09x on 96-192, where the
// row walk stays: perf/results/cpu-amd-epyc-2026-12-07-block-statistics/); 0: none.
template <typename T, int ACT>
constexpr int64_t kBlockSumsBelow =
    !TRITON_BN_VECTORS || (ACT != kIdentity && ACT != kRelu) ? 0
    : kPackLoops<T, ACT>                                     ? 256
    : std::is_same_v<T, float>                               ? 96
                                                             : 0;
template <typename T, int ACT, bool HAS_RES>
void backward_sums(const T* dy, const T* x, const T* res, const Geometry& geometry,
                   const BackwardCoefficients<acc_t<T>>& k, acc_t<T> slope, std::vector<double>& sum_dz,
                   std::vector<double>& sum_dz_xhat, T* dz_saved) {
  using A = acc_t<T>;
  using U = staged_t<T>;  // what the loops read (fp16: fp32 buffers)
  if (geometry.planes) {
    reduce_planes(geometry, sum_dz, sum_dz_xhat, [&](int64_t c, int64_t offset, int64_t count) {
      if constexpr (kVectorMath<T, ACT>) {  // the terms a chunk at a time, the chunks' sums added in order
        A sum_a = 0, sum_b = 0, dz[kDzChunk], dz_xhat[kDzChunk];
        for (int64_t i0 = 0; i0 < count; i0 += kDzChunk) {
          const int64_t m = std::min(kDzChunk, count - i0);
          grad_terms_chunk<T, ACT, HAS_RES, true>(x + offset, dy + offset, HAS_RES ? res + offset : nullptr, i0, m,
                                                  k.scale.data() + c, k.shift.data() + c, k.mean.data() + c,
                                                  k.invstd.data() + c, dz, dz_xhat,
                                                  dz_saved == nullptr ? nullptr : dz_saved + offset);
          const auto sums = sum_span<A>(m, [&](int64_t j) { return std::pair<A, A>(dz[j], dz_xhat[j]); });
          sum_a += sums.first;
          sum_b += sums.second;
        }
        return std::pair<A, A>(sum_a, sum_b);
      }
      if constexpr (kHalfLoops<T, ACT>) {
        return half_backward_plane_sums<ACT, HAS_RES>(x + offset, dy + offset, HAS_RES ? res + offset : nullptr,
                                                       count, k.scale[c], k.shift[c], k.mean[c], k.invstd[c], slope);
      }
      const U* __restrict__ xp = read_staged(x + offset, count, 0);
      const U* __restrict__ g = read_staged(dy + offset, count, 1);
      const U* __restrict__ rr = HAS_RES ? read_staged(res + offset, count, 2) : nullptr;
      const A *__restrict__ sc = k.scale.data() + c, *__restrict__ sh = k.shift.data() + c;
      const A mu = k.mean[c], is = k.invstd[c];
      return sum_span<A>(count, [&](int64_t i) {
        const A dz = grad_pre_activation<U, ACT, HAS_RES, true>(g, xp, rr, i, sc, sh, slope);
        return std::pair<A, A>(dz, dz * ((load(xp, i) - mu) * is));
      });
    });
    return;
  }
  const int64_t R = geometry.R, C = geometry.C;
  reduce_rows<A>(R, C, sum_dz, sum_dz_xhat, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n, A* __restrict__ a,
                                                 A* __restrict__ b) {
    const A *__restrict__ sc = k.scale.data() + c0, *__restrict__ sh = k.shift.data() + c0;
    const A *__restrict__ mu = k.mean.data() + c0, *__restrict__ is = k.invstd.data() + c0;
    if constexpr (kBlockSumsBelow<T, ACT> > 0) {
      if (C < kBlockSumsBelow<T, ACT>) {  // rows of few channels: the block's rows at once (the same sums)
        backward_block_sums<T, ACT, HAS_RES>(x + c0, dy + c0, HAS_RES ? res + c0 : nullptr, C, r0, r1, n, sc, sh, mu,
                                             is, a, b, slope);
        return;
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (kVectorMath<T, ACT>) {
        A dz[kDzChunk], dz_xhat[kDzChunk];
        for (int64_t j0 = 0; j0 < n; j0 += kDzChunk) {
          const int64_t m = std::min(kDzChunk, n - j0);
          grad_terms_chunk<T, ACT, HAS_RES, false>(x + r * C + c0, dy + r * C + c0, HAS_RES ? res + r * C + c0 : nullptr,
                                                   j0, m, sc, sh, mu, is, dz, dz_xhat,
                                                   dz_saved == nullptr ? nullptr : dz_saved + r * C + c0);
          for (int64_t j = 0; j < m; ++j) {
            a[j0 + j] += dz[j];
            b[j0 + j] += dz_xhat[j];
          }
        }
        continue;
      }
      if constexpr (kHalfLoops<T, ACT>) {
        half_backward_row_sums<ACT, HAS_RES>(x + r * C + c0, dy + r * C + c0, HAS_RES ? res + r * C + c0 : nullptr, n,
                                             sc, sh, mu, is, a, b, slope);
        continue;
      }
      const U* __restrict__ row = read_staged(x + r * C + c0, n, 0);
      const U* __restrict__ g = read_staged(dy + r * C + c0, n, 1);
      const U* __restrict__ rr = HAS_RES ? read_staged(res + r * C + c0, n, 2) : nullptr;
      for (int64_t c = 0; c < n; ++c) {
        const A dz = grad_pre_activation<U, ACT, HAS_RES, false>(g, row, rr, c, sc, sh, slope);
        a[c] += dz;
        b[c] += dz * ((load(row, c) - mu[c]) * is[c]);
      }
    }
  });
}

// dx = dz * k1 - (x - mean) * k2 - k3 for the part values at `at` of the line whose per-channel values start at
// channel c0: pass 2's formula, the same arithmetic as the scalar loops' grad_x_at.
template <bool PLANES, typename A>
inline Vec<A> grad_x_vec(const Vec<A>& dz, const Vec<A>& x, const BackwardCoefficients<A>& k, int64_t c0, int64_t at,
                         int64_t part) {
  const Vec<A> centered = (x - per_channel_vector<PLANES>(k.mean.data() + c0, at, part)) *
                          per_channel_vector<PLANES>(k.k2.data() + c0, at, part);
  return at::vec::fmsub(dz, per_channel_vector<PLANES>(k.k1.data() + c0, at, part), centered) -
         per_channel_vector<PLANES>(k.k3.data() + c0, at, part);
}

// Pass 2 along one line from the dz pass 1 saved (dz_saved: grad_x itself, overwritten in place, dz in T):
// dx = dz * k1 - (x - mean) * k2 - k3 and d residual = dz, rounded once to T. For fp32 and double the same
// values as backward_vector_line computes, without evaluating act'(z) a second time; for 16-bit types from dz
// rounded to T, as PyTorch's unfused backward computes them.
template <typename T, bool DRES, bool PLANES>
void backward_saved_line(const T* dz_saved, const T* x, T* grad_x, T* grad_res, int64_t n,
                         const BackwardCoefficients<acc_t<T>>& k, int64_t c0) {
  for_each_vector<T>(n, [&](int64_t i, int64_t count) {
    const Parts<T> xv = load_parts(x + i, count), dz = load_parts(dz_saved + i, count);
    Parts<T> dx{};
    for_each_part<T>(i, count, [&](int p, int64_t at, int64_t part) {
      dx[p] = grad_x_vec<PLANES>(dz[p], xv[p], k, c0, at, part);
    });
    if constexpr (DRES) store_parts(grad_res + i, dz, count);  // before dx overwrites a dz_saved that is grad_x
    store_parts(grad_x + i, dx, count);
  });
}

// Pass 2 along one line with a transcendental activation (kVectorMath), in one pass of vectors: x, dy and the
// residual widened (load_parts), z recomputed, dz = dy * act'(z) (activation_backward_vec), dx = dz * k1 -
// (x - mean) * k2 - k3 and d residual = dz rounded once to T and stored (store_parts). No staging buffers
// and no dz chunk: every value is read once and written once.
template <typename T, int ACT, bool HAS_RES, bool DX, bool DRES, bool PLANES>
void backward_vector_line(const T* x, const T* dy, const T* res, T* grad_x, T* grad_res, int64_t n,
                          const BackwardCoefficients<acc_t<T>>& k, int64_t c0) {
  using A = acc_t<T>;
  const A *sc = k.scale.data() + c0, *sh = k.shift.data() + c0;
  for_each_vector<T>(n, [&](int64_t i, int64_t count) {
    const Parts<T> xv = load_parts(x + i, count), g = load_parts(dy + i, count);
    const Parts<T> r = HAS_RES ? load_parts(res + i, count) : Parts<T>{};
    Parts<T> dx{}, dz{};
    for_each_part<T>(i, count, [&](int p, int64_t at, int64_t part) {
      Vec<A> z = affine_vec<PLANES>(xv[p], sc, sh, at, part);
      if constexpr (HAS_RES) z = z + r[p];
      dz[p] = activation_backward_vec<ACT, A>(g[p], z);
      if constexpr (DX) dx[p] = grad_x_vec<PLANES>(dz[p], xv[p], k, c0, at, part);
    });
    if constexpr (DX) store_parts(grad_x + i, dx, count);
    if constexpr (DRES) store_parts(grad_res + i, dz, count);
  });
}

template <typename T, int ACT, bool HAS_RES, bool DX, bool DRES, bool PLANES>
void backward_lines(const T* dy, const T* x, const T* res, T* grad_x, T* grad_res, const Geometry& geometry,
                    const BackwardCoefficients<acc_t<T>>& k, acc_t<T> slope) {
  using A = acc_t<T>;
  using U = staged_t<T>;  // what the loops read and write (fp16: fp32 buffers)
  if constexpr (kVectorMath<T, ACT>) {
    for_each_line(geometry, 16384, [&](int64_t offset, int64_t c0, int64_t n) {
      backward_vector_line<T, ACT, HAS_RES, DX, DRES, PLANES>(x + offset, dy + offset, HAS_RES ? res + offset : nullptr,
                                                              DX ? grad_x + offset : nullptr,
                                                              DRES ? grad_res + offset : nullptr, n, k, c0);
    });
    return;
  }
  if constexpr (kHalfLoops<T, ACT>) {
    for_each_line(geometry, 16384, [&](int64_t offset, int64_t c0, int64_t n) {
      half_backward_line<ACT, HAS_RES, DX, DRES, PLANES>(
          x + offset, dy + offset, HAS_RES ? res + offset : nullptr, DX ? grad_x + offset : nullptr,
          DRES ? grad_res + offset : nullptr, n, k.scale.data() + c0, k.shift.data() + c0, k.mean.data() + c0,
          k.k1.data() + c0, k.k2.data() + c0, k.k3.data() + c0, slope);
    });
    return;
  }
  for_each_line(geometry, 16384, [&](int64_t offset, int64_t c0, int64_t n) {
    // rows: per-channel arrays indexed by the column; planes: one channel's value for the whole line
    const A *__restrict__ sc = k.scale.data() + c0, *__restrict__ sh = k.shift.data() + c0;
    const A *__restrict__ mu = k.mean.data() + c0;
    const A *__restrict__ a1 = k.k1.data() + c0, *__restrict__ a2 = k.k2.data() + c0;
    const A *__restrict__ a3 = k.k3.data() + c0;
    const U* __restrict__ row = read_staged(x + offset, n, 0);
    const U* __restrict__ g = read_staged(dy + offset, n, 1);
    const U* __restrict__ rr = HAS_RES ? read_staged(res + offset, n, 2) : nullptr;
    U* __restrict__ ox = DX ? write_target(grad_x + offset, n, 3) : nullptr;
    U* __restrict__ orr = DRES ? write_target(grad_res + offset, n, 4) : nullptr;
    const auto grad_x_at = [&](int64_t i, A dz) {
      const int64_t c = column<PLANES>(i);
      return dz * a1[c] - (load(row, i) - mu[c]) * a2[c] - a3[c];
    };
    if constexpr (DX && DRES) {
      // dz a chunk at a time into a buffer, then each output written by a loop of its own: with both outputs
      // one loop storing to both ran ~10x slower in fp32, both layouts (2.8 ms against 0.25 ms for either
      // output alone on 2x1024x14x14; why was not pinned down; this form takes 0.30 ms).
      A dz[kDzChunk];
      for (int64_t i0 = 0; i0 < n; i0 += kDzChunk) {
        const int64_t m = std::min(kDzChunk, n - i0);
        for (int64_t j = 0; j < m; ++j) {
          dz[j] = grad_pre_activation<U, ACT, HAS_RES, PLANES>(g, row, rr, i0 + j, sc, sh, slope);
        }
        if constexpr (DX) {
          for (int64_t j = 0; j < m; ++j) store(ox, i0 + j, grad_x_at(i0 + j, dz[j]));
        }
        if constexpr (DRES) {
          for (int64_t j = 0; j < m; ++j) store(orr, i0 + j, dz[j]);
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const A dz = grad_pre_activation<U, ACT, HAS_RES, PLANES>(g, row, rr, i, sc, sh, slope);
        if constexpr (DX) store(ox, i, grad_x_at(i, dz));
        if constexpr (DRES) store(orr, i, dz);
      }
    }
    if constexpr (DX) write_back(grad_x + offset, n, 3);
    if constexpr (DRES) write_back(grad_res + offset, n, 4);
  });
}

template <typename T, int ACT, bool HAS_RES, bool DX, bool DRES>
void backward_elementwise(const T* dy, const T* x, const T* res, T* grad_x, T* grad_res, const Geometry& geometry,
                          const BackwardCoefficients<acc_t<T>>& k, acc_t<T> slope) {
  if (geometry.planes) {
    backward_lines<T, ACT, HAS_RES, DX, DRES, true>(dy, x, res, grad_x, grad_res, geometry, k, slope);
  } else {
    backward_lines<T, ACT, HAS_RES, DX, DRES, false>(dy, x, res, grad_x, grad_res, geometry, k, slope);
  }
}

template <typename Body> void dispatch_bool(bool flag, Body&& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

}  // namespace

template <typename T>
void backward(const T* dy, const T* xp, const T* res, T* gx, T* gr, acc_t<T>* gw, acc_t<T>* gb,
              const Geometry& geometry, BackwardCoefficients<acc_t<T>>& k, const std::vector<acc_t<T>>& w,
              bool batch_stats, bool need_sums, int64_t activation, acc_t<T> aslope) {
  using A = acc_t<T>;
  const int64_t R = geometry.R, C = geometry.C;
  const bool has_residual = res != nullptr, want_dx = gx != nullptr, want_dresidual = gr != nullptr;
  dispatch_activation(activation, [&](auto act) {
    constexpr int ACT = decltype(act)::value;
    // the residual enters only through z, which only an activation needs: no such variant for ACT 0
    dispatch_bool(ACT != kIdentity && has_residual, [&](auto with_residual) {
      constexpr bool HAS_RES = ACT != kIdentity && decltype(with_residual)::value;
      std::vector<double> sum_dz(C, 0.0), sum_dz_xhat(C, 0.0);
      // With a transcendental activation pass 1 saves dz for pass 2's dx: evaluating act'(z) (GELU: erf and
      // exp) costs more than writing dz and reading it back (perf/NOTES.md). It is kept in grad_x itself (dx is
      // then computed over it, value by value), in T: 16-bit types round dz once there, as PyTorch's
      // activation backward does before its BN backward reads it (an fp32 buffer of x's size cost more).
      T* dz_saved = nullptr;
      if constexpr (kVectorMath<T, ACT>) {
        if (need_sums && want_dx) dz_saved = gx;
      }
      if (need_sums) {
        backward_sums<T, ACT, HAS_RES>(dy, xp, res, geometry, k, aslope, sum_dz, sum_dz_xhat, dz_saved);
        for (int64_t c = 0; c < C; ++c) {
          if (gw != nullptr) gw[c] = static_cast<A>(sum_dz_xhat[c]);
          if (gb != nullptr) gb[c] = static_cast<A>(sum_dz[c]);
        }
      }
      k.k1.resize(C);
      k.k2.assign(C, A(0));
      k.k3.assign(C, A(0));
      for (int64_t c = 0; c < C; ++c) {
        k.k1[c] = k.invstd[c] * w[c];
        if (batch_stats && want_dx) {
          k.k2[c] = static_cast<A>(sum_dz_xhat[c] / R * k.invstd[c] * k.invstd[c] * w[c]);
          k.k3[c] = static_cast<A>(sum_dz[c] / R * k.invstd[c] * w[c]);
        }
      }
      if (dz_saved != nullptr) {
        dispatch_bool(geometry.planes, [&](auto planes) {
          constexpr bool PLANES = decltype(planes)::value;
          for_each_line(geometry, 16384, [&](int64_t offset, int64_t c0, int64_t n) {
            if (want_dresidual) {
              backward_saved_line<T, true, PLANES>(dz_saved + offset, xp + offset, gx + offset, gr + offset, n, k, c0);
            } else {
              backward_saved_line<T, false, PLANES>(dz_saved + offset, xp + offset, gx + offset, nullptr, n, k, c0);
            }
          });
        });
        return;
      }
      // Which outputs, as template parameters: the backward's instantiations are most of the build time,
      // so only the common cases have their own. Without an activation (d residual = dy): any of the three.
      // With one and no residual: dx alone (there is no d residual). With one and a residual: both at once,
      // the one not wanted (a detached residual, a frozen input) written to a scratch buffer.
      if constexpr (ACT == kIdentity) {
        if (want_dx && want_dresidual) {
          backward_elementwise<T, ACT, HAS_RES, true, true>(dy, xp, res, gx, gr, geometry, k, aslope);
        } else if (want_dx) {
          backward_elementwise<T, ACT, HAS_RES, true, false>(dy, xp, res, gx, gr, geometry, k, aslope);
        } else if (want_dresidual) {
          backward_elementwise<T, ACT, HAS_RES, false, true>(dy, xp, res, gx, gr, geometry, k, aslope);
        }
      } else if constexpr (!HAS_RES) {
        TORCH_CHECK(!want_dresidual, "triton_bn_cpu: a residual gradient without a residual");
        if (want_dx) backward_elementwise<T, ACT, false, true, false>(dy, xp, res, gx, gr, geometry, k, aslope);
      } else if (want_dx || want_dresidual) {
        std::vector<T> scratch(want_dx && want_dresidual ? 0 : static_cast<size_t>(R * C));
        backward_elementwise<T, ACT, true, true, true>(dy, xp, res, want_dx ? gx : scratch.data(),
                                                       want_dresidual ? gr : scratch.data(), geometry, k, aslope);
      }
    });
  });
}

}  // namespace triton_bn_cpu
