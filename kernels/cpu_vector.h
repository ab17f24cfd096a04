/* 16-lane fp32 / uint32 vectors (one AVX-512 register, two AVX2 ones) for the CPU kernels, with
 * GCC/Clang vector extensions; loads and stores go through memcpy, so any alignment works. */
#ifndef MUXTUNE_CPU_VECTOR_H
#define MUXTUNE_CPU_VECTOR_H

#include <stdint.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));

static inline vf load_f(const float *p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline vu load_u(const uint32_t *p) {
  vu v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float s) { return (vf){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

#endif
