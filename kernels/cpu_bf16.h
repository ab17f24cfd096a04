/* bf16 <-> fp32 for the CPU kernels: widening is exact; narrowing rounds to nearest even, as
 * c10::BFloat16 does, and maps every NaN to one quiet NaN. */
#ifndef MUXTUNE_CPU_BF16_H
#define MUXTUNE_CPU_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_load(uint16_t value) {
  uint32_t bits = (uint32_t)value << 16;
  float out;
  memcpy(&out, &bits, sizeof out);
  return out;
}

/* Branch-free, so that loops calling it vectorize. */
static inline uint16_t bf16_store(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  uint16_t rounded = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  return (bits & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;
}

#endif
