/* Vectorizable fp32 math for the CPU kernels (inline, so `omp simd` loops vectorize it). */
#ifndef MUXTUNE_CPU_MATH_H
#define MUXTUNE_CPU_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) within ~1 ulp (Cephes' range reduction and polynomial); exactly 0 below -87.3 (-inf
 * included), +inf above 88.37 (+inf included), NaN for NaN. */
static inline float exp_f32(float x) {
  const float lo = -87.3365447504f, hi = 88.3762626647f;
  float clamped = x < lo ? lo : (x > hi ? hi : x);
  float n = floorf(fmaf(clamped, 1.44269504088896341f, 0.5f));
  float r = fmaf(n, -0.693359375f, clamped);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r) + 1.0f;
  int32_t exponent = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &exponent, sizeof scale);
  float result = x < lo ? 0.0f : (x > hi ? INFINITY : p * scale);
  return x != x ? x : result;
}

#endif
