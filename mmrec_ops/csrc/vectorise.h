// What the CPU kernels share to vectorise their inner loops: a head's channels
// padded to whole blocks of lanes, an exp the compiler vectorises, strided
// loads into float buffers, and the run-time choice between a baseline x86-64
// build of a loop and an AVX2 + FMA one (the library itself targets baseline
// x86-64 so that the wheel runs anywhere).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#define MMREC_X86_DISPATCH 1
#endif

// Loop bodies are always inlined into the per-ISA task loops that call them,
// so that each instantiation compiles them with its own target.
#define MMREC_INLINE inline __attribute__((always_inline))

namespace mmrec {

// Head width padded so that the loops work on whole blocks of 16 lanes.
constexpr int64_t kLanes = 16;
inline int64_t padded(int64_t d) {
  return (d + kLanes - 1) / kLanes * kLanes;
}

// exp(x) in float32 that the compiler vectorises (std::exp does not, short of
// -ffast-math): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, Cephes'
// degree-6 polynomial for exp(r) (relative error below 2 ulp), and 2^n put
// into the exponent bits. The clamp keeps 2^n a normal float: below -87 the
// result is exp(-87), 1.6e-38, not 0.
MMREC_INLINE float exp_vectorisable(float x) {
  // Comparisons, not std::fmin/fmax: those are library calls that stop the
  // loop from vectorising (their NaN rules differ from minps/maxps).
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without
  // a call to nearbyint (not vectorised on baseline x86-64).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// dst[i] = src[i * stride] for i < d, converted to the accumulation type.
template <typename scalar_t, typename acc_t>
MMREC_INLINE void load(const scalar_t* src, int64_t stride, int64_t d, acc_t* dst) {
  for (int64_t i = 0; i < d; ++i) {
    dst[i] = static_cast<acc_t>(src[i * stride]);
  }
}

inline bool has_avx2_fma() {
#if MMREC_X86_DISPATCH
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

}  // namespace mmrec
