// AVX-512 on a CPU without it, at the source level: force-included (-include) before every native CPU source
// by tools/avx512_emulation_cxx.py when tools/check_avx512.py --run builds the kernels for AVX-512
// (-DCPU_CAPABILITY_AVX512) on an AVX2 host. Never part of a real build.
//
// How: GCC's <immintrin.h> declares every _mm512_* intrinsic on any x86 target (each an always_inline function
// that only compiles inside AVX-512 code), so after it this header makes each name a macro for a portable
// version: SIMDe's (SIMD Everywhere, Debian's libsimde-dev; its "native aliases") where SIMDe has one, else
// one of the plain loops below, written from Intel's description of the instruction. __m512, __m512i and
// __m512d stay GCC's own 64-byte vector types, which compile to pairs of 256-bit instructions here.
// The AVX-512 Sleef functions ATen's vec512 code calls (libtorch_cpu's own would execute AVX-512 instructions)
// are renamed to versions that call the AVX2 Sleef functions on each half (the same u10 accuracy bound).
// So ATen's Vectorized<float> has 16 lanes and Vectorized<double> 8, every template of kernels.h that asks
// Vectorized<T>::size() is instantiated for AVX-512, and kernels.h's AVX-512 branches compile and run.
//
// What it cannot show: speed, and the last bit where an instruction's result is an estimate (rcp14 below).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// The instructions the build uses (ATen's vec512 headers or kernels.h) that SIMDe 0.7.4 lacks, and only
// those: one that a later change needs stops the compile with "inlining failed in call to 'always_inline'
// '_mm512_...': target specific option mismatch", naming it, and is added here. Each works on the vector as
// an array of lanes (memcpy in and out, which the compiler keeps in registers), lane 0 first.
template <typename Lane, typename V> inline void tbn_lanes(Lane* out, const V& v) { memcpy(out, &v, sizeof(V)); }
template <typename V, typename Lane> inline V tbn_vector(const Lane* in) {
  V v;
  memcpy(&v, in, sizeof(V));
  return v;
}
// one half of a vector (which: 0 the low lanes, 1 the high), and a vector from two halves
template <typename Half, typename V> inline Half tbn_half_of(V a, int which) {
  static_assert(sizeof(V) == 2 * sizeof(Half), "a half");
  Half half;
  memcpy(&half, reinterpret_cast<const char*>(&a) + which * sizeof(Half), sizeof(Half));
  return half;
}
template <typename V, typename Half> inline V tbn_join(Half low, Half high) {
  static_assert(sizeof(V) == 2 * sizeof(Half), "two halves");
  V v;
  memcpy(&v, &low, sizeof(Half));
  memcpy(reinterpret_cast<char*>(&v) + sizeof(Half), &high, sizeof(Half));
  return v;
}

// compares of 32-bit lanes under one of the eight _MM_CMPINT predicates, one mask bit per lane
inline __mmask16 tbn_cmp_epi32_mask(__m512i a, __m512i b, int predicate) {
  int32_t x[16], y[16];
  tbn_lanes(x, a);
  tbn_lanes(y, b);
  __mmask16 mask = 0;
  for (int i = 0; i < 16; ++i) {
    bool bit;
    switch (predicate & 7) {
      case _MM_CMPINT_EQ: bit = x[i] == y[i]; break;
      case _MM_CMPINT_LT: bit = x[i] < y[i]; break;
      case _MM_CMPINT_LE: bit = x[i] <= y[i]; break;
      case _MM_CMPINT_NE: bit = x[i] != y[i]; break;
      case _MM_CMPINT_NLT: bit = x[i] >= y[i]; break;
      case _MM_CMPINT_NLE: bit = x[i] > y[i]; break;
      case 3: bit = false; break;  // _MM_CMPINT_FALSE
      default: bit = true;         // _MM_CMPINT_TRUE
    }
    mask |= static_cast<__mmask16>(bit) << i;
  }
  return mask;
}
#define _mm512_cmp_epi32_mask tbn_cmp_epi32_mask

inline __m512i tbn_cvtepu16_epi32(__m256i a) {
  uint16_t x[16];
  int32_t y[16];
  tbn_lanes(x, a);
  for (int i = 0; i < 16; ++i) y[i] = x[i];
  return tbn_vector<__m512i>(y);
}
#define _mm512_cvtepu16_epi32 tbn_cvtepu16_epi32

// half <-> float: F16C's 8-lane instructions (this host has them) on each half, so the same rounding per lane
#define _mm512_cvtps_ph(a, rounding)                                                 \
  tbn_join<__m256i>(_mm256_cvtps_ph(tbn_half_of<__m256>(a, 0), rounding), \
                    _mm256_cvtps_ph(tbn_half_of<__m256>(a, 1), rounding))
#define _mm512_cvtph_ps(a) \
  tbn_join<__m512>(_mm256_cvtph_ps(tbn_half_of<__m128i>(a, 0)), _mm256_cvtph_ps(tbn_half_of<__m128i>(a, 1)))
#define _mm512_extracti32x8_epi32(a, which) tbn_half_of<__m256i>(a, (which)&1)

inline float tbn_cvtss_f32(__m512 a) {
  float x[16];
  tbn_lanes(x, a);
  return x[0];
}
#define _mm512_cvtss_f32 tbn_cvtss_f32

// Masked loads read only the lanes the mask names (a lane past the end of an array is never touched, as the
// instruction does not fault there); the other lanes are zero.
template <typename V, typename Lane, int N, typename M> inline V tbn_maskz_loadu(M mask, const void* p) {
  Lane x[N] = {};
  for (int i = 0; i < N; ++i)
    if ((mask >> i) & 1) memcpy(x + i, static_cast<const Lane*>(p) + i, sizeof(Lane));
  return tbn_vector<V>(x);
}
// masked stores write only the lanes the mask names
template <typename Lane, int N, typename M, typename V> inline void tbn_mask_storeu(void* p, M mask, V v) {
  Lane x[N];
  tbn_lanes(x, v);
  for (int i = 0; i < N; ++i)
    if ((mask >> i) & 1) memcpy(static_cast<Lane*>(p) + i, x + i, sizeof(Lane));
}
#define _mm512_maskz_loadu_ps(mask, p) tbn_maskz_loadu<__m512, float, 16>(mask, p)
#define _mm512_maskz_loadu_pd(mask, p) tbn_maskz_loadu<__m512d, double, 8>(mask, p)
#define _mm512_maskz_loadu_epi16(mask, p) tbn_maskz_loadu<__m512i, uint16_t, 32>(mask, p)
#define _mm512_mask_storeu_ps(p, mask, v) tbn_mask_storeu<float, 16>(p, mask, v)
#define _mm512_mask_storeu_pd(p, mask, v) tbn_mask_storeu<double, 8>(p, mask, v)
#define _mm512_mask_storeu_epi16(p, mask, v) tbn_mask_storeu<uint16_t, 32>(p, mask, v)

// rcp14: the hardware's estimate is within 2^-14 of 1/x, relative. This one is 1/x with its fraction cut to
// 14 of 23 bits, an error of that size, so code that refines the estimate has to refine it to pass.
inline __m512 tbn_rcp14_ps(__m512 a) {
  float x[16];
  tbn_lanes(x, a);
  for (int i = 0; i < 16; ++i) {
    const float reciprocal = 1.0f / x[i];
    uint32_t bits;
    memcpy(&bits, &reciprocal, 4);
    if ((bits & 0x7F800000u) != 0x7F800000u) bits &= ~0x1FFu;  // finite: 9 fraction bits dropped
    memcpy(x + i, &bits, 4);
  }
  return tbn_vector<__m512>(x);
}
#define _mm512_rcp14_ps tbn_rcp14_ps

inline __m512 tbn_cvtepi32_ps(__m512i a) {
  int32_t x[16];
  float y[16];
  tbn_lanes(x, a);
  for (int i = 0; i < 16; ++i) y[i] = static_cast<float>(x[i]);
  return tbn_vector<__m512>(y);
}
#define _mm512_cvtepi32_ps tbn_cvtepi32_ps

// float -> int32 under a rounding mode (_MM_FROUND_*: nearest even, down, up, toward zero, or the current
// one); NaN and what does not fit give INT32_MIN, the instruction's "integer indefinite"
inline __m512i tbn_cvt_roundps_epi32(__m512 a, int rounding) {
  float x[16];
  int32_t y[16];
  tbn_lanes(x, a);
  for (int i = 0; i < 16; ++i) {
    const float r = (rounding & _MM_FROUND_CUR_DIRECTION) ? __builtin_nearbyintf(x[i])
                    : (rounding & 3) == _MM_FROUND_TO_NEAREST_INT ? __builtin_roundevenf(x[i])
                    : (rounding & 3) == _MM_FROUND_TO_NEG_INF     ? __builtin_floorf(x[i])
                    : (rounding & 3) == _MM_FROUND_TO_POS_INF     ? __builtin_ceilf(x[i])
                                                                  : __builtin_truncf(x[i]);
    y[i] = (r >= 2147483648.0f || r < -2147483648.0f || r != r) ? INT32_MIN : static_cast<int32_t>(r);
  }
  return tbn_vector<__m512i>(y);
}
#define _mm512_cvt_roundps_epi32 tbn_cvt_roundps_epi32
#define _mm512_cvtps_epi32(a) tbn_cvt_roundps_epi32(a, _MM_FROUND_CUR_DIRECTION)

// What ATen's headers and kernels.h test for before their AVX-512 code (GCC's own headers are already read,
// so they are not affected).
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1

// The AVX-512 Sleef functions the kernels call, renamed before <sleef.h> declares them and defined on the AVX2
// ones (tools/check_avx512.py --run refuses a library that still calls an AVX-512 one)
#define TBN_SLEEF_BY_HALVES(wide, narrow, V, Half) \
  inline V tbn_##wide(V a) { return tbn_join<V>(narrow(tbn_half_of<Half>(a, 0)), narrow(tbn_half_of<Half>(a, 1))); }
#define Sleef_tanhf16_u10 tbn_Sleef_tanhf16_u10
#define Sleef_expd8_u10 tbn_Sleef_expd8_u10
#define Sleef_tanhd8_u10 tbn_Sleef_tanhd8_u10
#define Sleef_erfd8_u10 tbn_Sleef_erfd8_u10
#include <sleef.h>
TBN_SLEEF_BY_HALVES(Sleef_tanhf16_u10, Sleef_tanhf8_u10, __m512, __m256)
TBN_SLEEF_BY_HALVES(Sleef_expd8_u10, Sleef_expd4_u10, __m512d, __m256d)
TBN_SLEEF_BY_HALVES(Sleef_tanhd8_u10, Sleef_tanhd4_u10, __m512d, __m256d)
TBN_SLEEF_BY_HALVES(Sleef_erfd8_u10, Sleef_erfd4_u10, __m512d, __m256d)
