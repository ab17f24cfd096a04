/* LoRA's products for a bf16 backbone with fp32 adapters, reading and writing the bf16
 * activations directly: no fp32 copies of the input, the host's output, the output's gradient
 * or the input's gradient, and the host's output added in the same pass as the expansion.
 *
 * Three kernels, every one fp32 arithmetic on exact bf16 -> fp32 widenings:
 *   lora_rows_dot_bf16:  out[t, j] = scale * sum_k x[t, k] * w[j, k]        (x @ w^T)
 *   lora_expand_bf16:    out[t, c] = bf16(base[t, c] + scale * sum_j h[t, j] * w[j, c])
 *                        (base optional: bf16(scale * sum))                  (h @ w)
 *   lora_outer_bf16:     out[j, c] = scale * sum_t h[t, j] * x[t, c]         (h^T @ x)
 * Sums run in a fixed order that depends only on the shapes: a row's results never depend on
 * other rows, so callers may split rows (the first two) or columns (the third) among threads
 * and get the same bits. Rounding to bf16 is to nearest even, as c10::BFloat16.
 *
 * Register blocking is written with GCC/Clang vector extensions (16 fp32 lanes: one AVX-512
 * register, two AVX2 ones); tails fall back to scalar loops. Built by cpu_build.py with
 * cpu_fused.c into one library.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h"
#include "cpu_vector.h"

#if defined(__AVX512F__)
#include <immintrin.h>

static inline vf load_h(const uint16_t *p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline void store_h(uint16_t *p, vf v) {
  __m512i bits = _mm512_castps_si512((__m512)v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 is_nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(rounded));
}

static inline float lane_sum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#else
static inline vf load_h(const uint16_t *p) {
  vh half;
  memcpy(&half, p, sizeof half);
  vu bits = __builtin_convertvector(half, vu) << 16;
  vf out;
  memcpy(&out, &bits, sizeof out);
  return out;
}

static inline void store_h(uint16_t *p, vf v) {
  vu bits;
  memcpy(&bits, &v, sizeof bits);
  vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  vu is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  rounded = (rounded & ~is_nan) | (0x7fc0u & is_nan);
  vh half = __builtin_convertvector(rounded, vh);
  memcpy(p, &half, sizeof half);
}

static inline float lane_sum(vf v) {
  float lanes[LANES];
  memcpy(lanes, &v, sizeof lanes);
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
  return lanes[0];
}
#endif

/* Rows [t, t + rows_here) (1..2) dotted with w's rows [j, j + count) (1..4): vector partial
 * sums, their lane sum, then the scalar tail. */
static inline __attribute__((always_inline)) void dot_block(const uint16_t *x, const float *w, int64_t k,
                                                            int rows_here, int count, float scale, float *out,
                                                            int64_t out_stride) {
  vf acc[2][4];
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 4; j++) acc[i][j] = splat(0.0f);
  int64_t c = 0;
  for (; c + LANES <= k; c += LANES) {
    vf xv[2];
    for (int i = 0; i < rows_here; i++) xv[i] = load_h(x + i * k + c);
    for (int j = 0; j < count; j++) {
      vf wv = load_f(w + j * k + c);
      for (int i = 0; i < rows_here; i++) acc[i][j] += xv[i] * wv;
    }
  }
  for (int i = 0; i < rows_here; i++)
    for (int j = 0; j < count; j++) {
      float sum = lane_sum(acc[i][j]);
      for (int64_t e = c; e < k; e++) sum += bf16_load(x[i * k + e]) * w[j * k + e];
      out[i * out_stride + j] = sum * scale;
    }
}

static __attribute__((noinline)) void dot_two_rows(const uint16_t *x, const float *w, int64_t k, float scale,
                                                   float *out, int64_t out_stride) {
  dot_block(x, w, k, 2, 4, scale, out, out_stride);
}

static __attribute__((noinline)) void dot_one(const uint16_t *x, const float *w, int64_t k, float scale, float *out) {
  dot_block(x, w, k, 1, 1, scale, out, 1);
}

void lora_rows_dot_bf16(const uint16_t *x, const float *w, float *out, int64_t rows, int64_t k, int64_t r,
                        float scale) {
  int64_t blocked = r - r % 4;
  int64_t t = 0;
  for (; t + 2 <= rows; t += 2)
    for (int64_t j = 0; j < blocked; j += 4) dot_two_rows(x + t * k, w + j * k, k, scale, out + t * r + j, r);
  for (int64_t row = 0; row < rows; row++)
    for (int64_t j = row < t ? blocked : 0; j < r; j++) dot_one(x + row * k, w + j * k, k, scale, out + row * r + j);
}

static inline float finish(float acc, float scale, const uint16_t *base, int64_t at) {
  float scaled = acc * scale;
  return base ? bf16_load(base[at]) + scaled : scaled;
}

/* Rows [t, t + count) (count 1..4), columns [c, c + 2 * LANES). */
static inline __attribute__((always_inline)) void expand_block(const float *h, const float *w, const uint16_t *base, uint16_t *out, int64_t t, int count,
                         int64_t c, int64_t n, int64_t r, float scale) {
  vf acc[4][2];
  for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = splat(0.0f);
  for (int64_t j = 0; j < r; j++) {
    vf w0 = load_f(w + j * n + c), w1 = load_f(w + j * n + c + LANES);
    for (int i = 0; i < count; i++) {
      vf hv = splat(h[(t + i) * r + j]);
      acc[i][0] += hv * w0;
      acc[i][1] += hv * w1;
    }
  }
  for (int i = 0; i < count; i++)
    for (int half = 0; half < 2; half++) {
      int64_t at = (t + i) * n + c + half * LANES;
      vf value = acc[i][half] * scale;
      if (base) value += load_h(base + at);
      store_h(out + at, value);
    }
}

static __attribute__((noinline)) void expand_four_rows(const float *h, const float *w, const uint16_t *base,
                                                       uint16_t *out, int64_t t, int64_t c, int64_t n, int64_t r,
                                                       float scale) {
  expand_block(h, w, base, out, t, 4, c, n, r, scale);
}

static __attribute__((noinline)) void expand_one_row(const float *h, const float *w, const uint16_t *base,
                                                     uint16_t *out, int64_t t, int64_t c, int64_t n, int64_t r,
                                                     float scale) {
  expand_block(h, w, base, out, t, 1, c, n, r, scale);
}

void lora_expand_bf16(const float *h, const float *w, const uint16_t *base, uint16_t *out, int64_t rows, int64_t n,
                      int64_t r, float scale) {
  int64_t vector_end = n - n % (2 * LANES);
  for (int64_t t = 0; t < rows; t += 4) {
    int count = rows - t < 4 ? (int)(rows - t) : 4;
    for (int64_t c = 0; c < vector_end; c += 2 * LANES) {
      if (count == 4)
        expand_four_rows(h, w, base, out, t, c, n, r, scale);
      else
        for (int i = 0; i < count; i++) expand_one_row(h, w, base, out, t + i, c, n, r, scale);
    }
    for (int i = 0; i < count; i++)
      for (int64_t c = vector_end; c < n; c++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < r; j++) acc += h[(t + i) * r + j] * w[j * n + c];
        out[(t + i) * n + c] = bf16_store(finish(acc, scale, base, (t + i) * n + c));
      }
  }
}

/* out rows [j, j + count) (count 1..8), columns [c, c + 2 * LANES), summed over every t in order. */
static inline __attribute__((always_inline)) void outer_block(const uint16_t *x, const float *h, float *out,
                                                              int64_t rows, int64_t n, int64_t r, int64_t j,
                                                              int count, int64_t c, float scale) {
  vf acc[8][2];
  for (int i = 0; i < 8; i++) acc[i][0] = acc[i][1] = splat(0.0f);
  for (int64_t t = 0; t < rows; t++) {
    vf x0 = load_h(x + t * n + c), x1 = load_h(x + t * n + c + LANES);
    const float *ht = h + t * r + j;
    for (int i = 0; i < count; i++) {
      vf hv = splat(ht[i]);
      acc[i][0] += hv * x0;
      acc[i][1] += hv * x1;
    }
  }
  for (int i = 0; i < count; i++) {
    store_f(out + (j + i) * n + c, acc[i][0] * scale);
    store_f(out + (j + i) * n + c + LANES, acc[i][1] * scale);
  }
}

static __attribute__((noinline)) void outer_eight(const uint16_t *x, const float *h, float *out, int64_t rows,
                                                  int64_t n, int64_t r, int64_t j, int64_t c, float scale) {
  outer_block(x, h, out, rows, n, r, j, 8, c, scale);
}

static __attribute__((noinline)) void outer_one(const uint16_t *x, const float *h, float *out, int64_t rows, int64_t n,
                                                int64_t r, int64_t j, int64_t c, float scale) {
  outer_block(x, h, out, rows, n, r, j, 1, c, scale);
}

static float outer_scalar(const uint16_t *x, const float *h, int64_t rows, int64_t n, int64_t r, int64_t j, int64_t c,
                          float scale) {
  float acc = 0.0f;
  for (int64_t t = 0; t < rows; t++) acc += h[t * r + j] * bf16_load(x[t * n + c]);
  return acc * scale;
}

void lora_outer_bf16(const uint16_t *x, const float *h, float *out, int64_t rows, int64_t n, int64_t r, float scale,
                     int64_t col_begin, int64_t col_end) {
  int64_t span = col_end - col_begin;
  int64_t vector_end = col_begin + span - span % (2 * LANES);
  for (int64_t j = 0; j < r; j += 8) {
    int count = r - j < 8 ? (int)(r - j) : 8;
    for (int64_t c = col_begin; c < vector_end; c += 2 * LANES) {
      if (count == 8)
        outer_eight(x, h, out, rows, n, r, j, c, scale);
      else
        for (int i = 0; i < count; i++) outer_one(x, h, out, rows, n, r, j + i, c, scale);
    }
    for (int i = 0; i < count; i++)
      for (int64_t c = vector_end; c < col_end; c++) out[(j + i) * n + c] = outer_scalar(x, h, rows, n, r, j + i, c, scale);
  }
}
