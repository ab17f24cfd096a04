/* Fused CPU kernels for the backbone's element-wise chains, forward and backward.
 *
 * Each kernel does in one pass over memory what eager torch does in several operators, with
 * the same rounding points: every value eager stores in the tensors' dtype is rounded to that
 * dtype here too (bf16: round to nearest even, as c10::BFloat16), and everything in between is
 * fp32. What may differ from eager is the last bit of an fp32 intermediate (the order of a
 * row's sums, exp's polynomial), never a rounding step.
 *
 * Tensors are contiguous, row-major; every function handles rows [0, rows) of its arguments,
 * so a caller may split the rows among threads (each row's result is independent of the split).
 * Built by muxtune/kernels/cpu_build.py; called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h"
#include "cpu_math.h"

static inline float f32_load(float value) { return value; }
static inline float f32_store(float value) { return value; }

/* result = the sum of expr_i over i in [0, count), vectorized (-fopenmp-simd): the order of the
 * sum depends on the build's vector width only, never on the caller's threads. */
#define SUM(result, count, expr_i)                      \
  do {                                                  \
    float total_ = 0.0f;                                \
    _Pragma("omp simd reduction(+ : total_)")           \
    for (int64_t i = 0; i < (count); ++i) total_ += (expr_i); \
    (result) = total_;                                  \
  } while (0)

#define DEFINE_KERNELS(SUFFIX, T, LOAD, STORE)                                                      \
  static inline float round_##SUFFIX(float value) { return LOAD(STORE(value)); }                    \
                                                                                                    \
  static inline float rms_rstd_##SUFFIX(const T *x, int64_t cols, float eps) {                      \
    float squares;                                                                                  \
    SUM(squares, cols, LOAD(x[i]) * LOAD(x[i]));                                                    \
    return 1.0f / sqrtf(squares / (float)cols + eps);                                               \
  }                                                                                                 \
                                                                                                    \
  /* y = w * T(x * rsqrt(mean(x^2) + eps)), statistics in fp32 (Hugging Face's RMSNorm). */         \
  void rms_norm_forward_##SUFFIX(const T *x, const T *w, T *y, int64_t rows, int64_t cols,          \
                                 float eps) {                                                       \
    for (int64_t r = 0; r < rows; ++r) {                                                            \
      const T *xr = x + r * cols;                                                                   \
      T *yr = y + r * cols;                                                                         \
      float rstd = rms_rstd_##SUFFIX(xr, cols, eps);                                                \
      for (int64_t c = 0; c < cols; ++c)                                                            \
        yr[c] = STORE(LOAD(w[c]) * round_##SUFFIX(LOAD(xr[c]) * rstd));                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* The input's gradient of rms_norm_forward (w frozen), as autograd derives it. */                \
  void rms_norm_backward_##SUFFIX(const T *x, const T *w, const T *gy, T *gx, int64_t rows,         \
                                  int64_t cols, float eps) {                                        \
    for (int64_t r = 0; r < rows; ++r) {                                                            \
      const T *xr = x + r * cols, *gr = gy + r * cols;                                              \
      T *out = gx + r * cols;                                                                       \
      float rstd = rms_rstd_##SUFFIX(xr, cols, eps);                                                \
      float dot;                                                                                    \
      SUM(dot, cols, round_##SUFFIX(LOAD(gr[i]) * LOAD(w[i])) * LOAD(xr[i]));                       \
      float grad_mean = (-0.5f * dot * (rstd * rstd * rstd)) / (float)cols;                         \
      for (int64_t c = 0; c < cols; ++c) {                                                          \
        float x_c = LOAD(xr[c]);                                                                    \
        float grad_h = round_##SUFFIX(LOAD(gr[c]) * LOAD(w[c]));                                    \
        out[c] = STORE(grad_h * rstd + grad_mean * (2.0f * x_c));                                   \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* y = T(silu(gate)) * up, silu(x) = x / (1 + exp(-x)). */                                        \
  void swiglu_forward_##SUFFIX(const T *gate, const T *up, T *y, int64_t rows, int64_t cols) {      \
    for (int64_t i = 0; i < rows * cols; ++i) {                                                           \
      float g = LOAD(gate[i]);                                                                      \
      y[i] = STORE(round_##SUFFIX(g / (1.0f + exp_f32(-g))) * LOAD(up[i]));                         \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  void swiglu_backward_##SUFFIX(const T *gate, const T *up, const T *gy, T *grad_gate,             \
                                T *grad_up, int64_t rows, int64_t cols) {                           \
    for (int64_t i = 0; i < rows * cols; ++i) {                                                           \
      float g = LOAD(gate[i]), dy = LOAD(gy[i]);                                                    \
      float e = exp_f32(-g);                                                                        \
      float sigmoid = 1.0f / (1.0f + e);                                                            \
      grad_up[i] = STORE(dy * round_##SUFFIX(g / (1.0f + e)));                                      \
      float grad_silu = round_##SUFFIX(dy * LOAD(up[i]));                                           \
      grad_gate[i] = STORE(grad_silu * sigmoid * (1.0f + g * (1.0f - sigmoid)));                    \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* y = x * cos + rotate_half(x) * sin for x [tokens, heads, dim], cos/sin [tokens, dim]. */      \
  void rotary_forward_##SUFFIX(const T *x, const T *cos_t, const T *sin_t, T *y, int64_t tokens,   \
                               int64_t heads, int64_t dim) {                                        \
    int64_t half = dim / 2;                                                                         \
    for (int64_t t = 0; t < tokens; ++t) {                                                          \
      const T *c = cos_t + t * dim, *s = sin_t + t * dim;                                           \
      for (int64_t h = 0; h < heads; ++h) {                                                         \
        const T *xr = x + (t * heads + h) * dim;                                                    \
        T *yr = y + (t * heads + h) * dim;                                                          \
        for (int64_t i = 0; i < half; ++i)                                                          \
          yr[i] = STORE(round_##SUFFIX(LOAD(xr[i]) * LOAD(c[i])) +                                  \
                        round_##SUFFIX(-LOAD(xr[i + half]) * LOAD(s[i])));                          \
        for (int64_t i = half; i < dim; ++i)                                                        \
          yr[i] = STORE(round_##SUFFIX(LOAD(xr[i]) * LOAD(c[i])) +                                  \
                        round_##SUFFIX(LOAD(xr[i - half]) * LOAD(s[i])));                           \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  void rotary_backward_##SUFFIX(const T *gy, const T *cos_t, const T *sin_t, T *gx,                 \
                                int64_t tokens, int64_t heads, int64_t dim) {                       \
    int64_t half = dim / 2;                                                                         \
    for (int64_t t = 0; t < tokens; ++t) {                                                          \
      const T *c = cos_t + t * dim, *s = sin_t + t * dim;                                           \
      for (int64_t h = 0; h < heads; ++h) {                                                         \
        const T *gr = gy + (t * heads + h) * dim;                                                   \
        T *out = gx + (t * heads + h) * dim;                                                        \
        for (int64_t i = 0; i < half; ++i)                                                          \
          out[i] = STORE(round_##SUFFIX(LOAD(gr[i]) * LOAD(c[i])) +                                 \
                         round_##SUFFIX(LOAD(gr[i + half]) * LOAD(s[i + half])));                   \
        for (int64_t i = half; i < dim; ++i)                                                        \
          out[i] = STORE(round_##SUFFIX(LOAD(gr[i]) * LOAD(c[i])) -                                 \
                         round_##SUFFIX(LOAD(gr[i - half]) * LOAD(s[i - half])));                   \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
                                                                                                    \
  /* Cross-entropy of rows of logits against their targets, as log_softmax in fp32 and its        \
   * backward compute it: target_logp[r] = (x_t - max) - log(sum(exp(x - max))), and, where grad  \
   * is not NULL, grad[r] = T(picked - exp(logp) * sum(picked)) for picked = -scale at the target  \
   * and 0 elsewhere (the gradient of scale * the summed negative log-likelihood). */              \
  void cross_entropy_##SUFFIX(const T *logits, const int64_t *targets, float *target_logp, T *grad, \
                              float scale, int64_t rows, int64_t cols) {                            \
    for (int64_t r = 0; r < rows; ++r) {                                                            \
      const T *x = logits + r * cols;                                                               \
      int64_t target = targets[r];                                                                  \
      float top = -INFINITY;                                                                        \
      _Pragma("omp simd reduction(max : top)")                                                      \
      for (int64_t c = 0; c < cols; ++c) top = LOAD(x[c]) > top ? LOAD(x[c]) : top;                 \
      float total;                                                                                  \
      SUM(total, cols, exp_f32(LOAD(x[i]) - top));                                                  \
      float log_total = logf(total);                                                                \
      target_logp[r] = (LOAD(x[target]) - top) - log_total;                                         \
      if (grad == NULL) continue;                                                                   \
      T *out = grad + r * cols;                                                                     \
      for (int64_t c = 0; c < cols; ++c)                                                            \
        out[c] = STORE(exp_f32((LOAD(x[c]) - top) - log_total) * scale);                            \
      out[target] = STORE(-scale + exp_f32(target_logp[r]) * scale);                                \
    }                                                                                               \
  }

DEFINE_KERNELS(bf16, uint16_t, bf16_load, bf16_store)
DEFINE_KERNELS(f32, float, f32_load, f32_store)

/* Dropout's keep factor (1 or 0) of element `index` under `seed`: the top 24 bits of splitmix64's
 * output for state seed + (index + 1) * golden, kept where they reach `threshold` (the drop
 * probability times 2^24, rounded up). muxtune/kernels/dropout.py computes the same in torch. */
static inline float keep_factor(uint64_t seed, int64_t index, int64_t threshold) {
  uint64_t z = seed + (uint64_t)(index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (int64_t)(z >> 40) >= threshold ? 1.0f : 0.0f;
}

/* Inverted dropout to fp32 as eager computes it, elements [offset, offset + count) of a flat
 * tensor: out = x * keep / q; backward grad_x = T(grad / q * keep). */
#define DEFINE_DROPOUT(SUFFIX, T, LOAD, STORE)                                                         \
  void dropout_forward_##SUFFIX(const T *x, float *out, int64_t count, int64_t offset, uint64_t seed, \
                                int64_t threshold, float q) {                                          \
    _Pragma("omp simd") for (int64_t i = 0; i < count; i++) out[i] =                                   \
        LOAD(x[i]) * keep_factor(seed, offset + i, threshold) / q;                                     \
  }                                                                                                    \
  void dropout_backward_##SUFFIX(const float *grad, T *grad_x, int64_t count, int64_t offset,          \
                                 uint64_t seed, int64_t threshold, float q) {                          \
    _Pragma("omp simd") for (int64_t i = 0; i < count; i++) grad_x[i] =                                \
        STORE(grad[i] / q * keep_factor(seed, offset + i, threshold));                                 \
  }

DEFINE_DROPOUT(bf16, uint16_t, bf16_load, bf16_store)
DEFINE_DROPOUT(f32, float, f32_load, f32_store)
