/* Causal attention over packed bf16 sequences on the CPU, forward and backward, in one call per
 * layer: no mask tensor, no fp32 score or weight tensors, and the masked half of every product
 * skipped.
 *
 * Legend: T packed tokens, H query heads, Hkv key/value heads (G = H / Hkv query heads read
 * one), D head dim, L tokens of one sequence. q, out, dout, dq: [T, H, D]; k, v, dk, dv:
 * [T, Hkv, D]; lse: [T, H] fp32; cu: the sequences' cumulative offsets [S + 1].
 *
 * Numerics, as flash attention's: scores s = scale * q.k summed in fp32 (never rounded to
 * bf16), softmax in fp32 with its log-sum-exp kept for the backward, weights rounded to bf16
 * for the product with v, every product summed in fp32 over exact bf16 pairs and rounded to
 * bf16 once. The backward recomputes the weights from lse and follows eager's softmax
 * gradient: ds = p * (dw - sum_j p_j dw_j) with fp32 p, rounded to bf16 for the products.
 *
 * Work is split by unit u = s * Hkv + g (sequence s, key/value head g): a unit computes its
 * G heads' rows of out, lse and dq and its rows of dk and dv, alone and in a fixed order, so
 * callers may split units among threads and get the same bits, and a sequence's results never
 * depend on the other sequences of the buffer.
 *
 * Products run on packed operands: a "panel" holds 32 columns of B as bf16 pairs along the
 * summed index ([pairs][32] uint32), an A operand is rows of bf16 pairs. With AVX512-BF16 one
 * vdpbf16ps does 16 columns x one pair; elsewhere the pairs are widened and multiplied in fp32.
 * Built by cpu_build.py into the kernels' library.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h"
#include "cpu_math.h"
#include "cpu_vector.h"

#define PANEL 32
#define ROWS 4

#if defined(__AVX512BF16__)
#include <immintrin.h>

/* acc + a.lo * b.lo + a.hi * b.hi per lane: a one bf16 pair, b 16 pairs. */
static inline vf dot_pairs(vf acc, uint32_t a, vu b) {
  return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32((int)a), (__m512bh)b);
}
#else
static inline vf dot_pairs(vf acc, uint32_t a, vu b) {
  vu lo_bits = b << 16, hi_bits = b & 0xffff0000u;
  vf lo, hi;
  memcpy(&lo, &lo_bits, sizeof lo);
  memcpy(&hi, &hi_bits, sizeof hi);
  vf a_lo = splat(bf16_load((uint16_t)a)), a_hi = splat(bf16_load((uint16_t)(a >> 16)));
  return acc + lo * a_lo + hi * a_hi;
}
#endif

static inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

/* c[r][0:32] = sum over pairs p in [p_lo, p_hi) of a[r][p] . b[p][0:32], r < ROWS. */
static void block_rows(const uint32_t *a, int64_t lda, const uint32_t *b, int64_t p_lo, int64_t p_hi, float *c,
                       int64_t ldc) {
  vf c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
  for (int64_t p = p_lo; p < p_hi; p++) {
    vu b0 = load_u(b + p * PANEL), b1 = load_u(b + p * PANEL + LANES);
    uint32_t a0 = a[p], a1 = a[lda + p], a2 = a[2 * lda + p], a3 = a[3 * lda + p];
    c00 = dot_pairs(c00, a0, b0);
    c01 = dot_pairs(c01, a0, b1);
    c10 = dot_pairs(c10, a1, b0);
    c11 = dot_pairs(c11, a1, b1);
    c20 = dot_pairs(c20, a2, b0);
    c21 = dot_pairs(c21, a2, b1);
    c30 = dot_pairs(c30, a3, b0);
    c31 = dot_pairs(c31, a3, b1);
  }
  store_f(c, c00);
  store_f(c + LANES, c01);
  store_f(c + ldc, c10);
  store_f(c + ldc + LANES, c11);
  store_f(c + 2 * ldc, c20);
  store_f(c + 2 * ldc + LANES, c21);
  store_f(c + 3 * ldc, c30);
  store_f(c + 3 * ldc + LANES, c31);
}

/* c[0:ROWS][0:32 * panels] for `panels` packed panels of `pairs` pairs each. */
static void product(const uint16_t *a, int64_t a_width, const uint32_t *b, int64_t pairs, int64_t panels,
                    int64_t p_lo, int64_t p_hi, float *c, int64_t ldc) {
  for (int64_t n = 0; n < panels; n++)
    block_rows((const uint32_t *)a, a_width / 2, b + n * pairs * PANEL, p_lo, p_hi, c + n * PANEL, ldc);
}

/* Panels of B[n][k] = src[n * stride_n + k * stride_k] for n < cols, k < depth; zero beyond. */
static void pack_panels(const uint16_t *src, int64_t stride_n, int64_t stride_k, int64_t cols, int64_t depth,
                        uint32_t *dst) {
  int64_t pairs = (depth + 1) / 2, panels = round_up(cols, PANEL) / PANEL;
  for (int64_t panel = 0; panel < panels; panel++)
    for (int64_t p = 0; p < pairs; p++)
      for (int64_t lane = 0; lane < PANEL; lane++) {
        int64_t n = panel * PANEL + lane, k = 2 * p;
        uint32_t lo = n < cols ? src[n * stride_n + k * stride_k] : 0;
        uint32_t hi = n < cols && k + 1 < depth ? src[n * stride_n + (k + 1) * stride_k] : 0;
        dst[(panel * pairs + p) * PANEL + lane] = lo | hi << 16;
      }
}

/* dst[r][0:width] = src row r (rows `stride` apart) for r < rows, zero rows up to padded_rows. */
static void copy_rows(const uint16_t *src, int64_t stride, int64_t rows, int64_t padded_rows, int64_t width,
                      uint16_t *dst) {
  for (int64_t r = 0; r < rows; r++) memcpy(dst + r * width, src + r * stride, width * sizeof *dst);
  memset(dst + rows * width, 0, (padded_rows - rows) * width * sizeof *dst);
}

/* Scratch of one call, carved from the caller's buffer for sequences of at most max_len tokens. */
typedef struct {
  uint32_t *keys_nk, *values_nk, *keys_kn, *values_kn, *queries_kn, *grads_kn;
  uint16_t *queries, *grads, *weights, *probs, *ds_t, *p_t;
  float *scores, *dweights, *cols, *dk_acc, *dv_acc;
} scratch_t;

static int64_t carve(scratch_t *s, char *base, int64_t max_len, int64_t dim) {
  int64_t rows = round_up(max_len, ROWS), even = round_up(max_len, 2), keys = round_up(max_len, PANEL);
  int64_t wide = round_up(max_len + 2, PANEL);
  int64_t dims = round_up(dim, PANEL), nk = keys * dim / 2, kn = dims * even / 2;
  int64_t offset = 0;
#define TAKE(field, type, count)                                     \
  s->field = base ? (type *)(base + offset) : NULL;                  \
  offset += round_up((int64_t)((count) * sizeof(type)), 64)
  TAKE(keys_nk, uint32_t, nk);
  TAKE(values_nk, uint32_t, nk);
  TAKE(keys_kn, uint32_t, kn);
  TAKE(values_kn, uint32_t, kn);
  TAKE(queries_kn, uint32_t, kn);
  TAKE(grads_kn, uint32_t, kn);
  TAKE(queries, uint16_t, rows * dim);  /* rows of pairs: dim even */
  TAKE(grads, uint16_t, rows * dim);
  TAKE(weights, uint16_t, ROWS * wide);
  TAKE(probs, uint16_t, ROWS * wide);
  TAKE(ds_t, uint16_t, rows * rows);
  TAKE(p_t, uint16_t, rows * rows);
  TAKE(scores, float, ROWS * wide);
  TAKE(dweights, float, ROWS * wide);
  TAKE(cols, float, ROWS * dims);
  TAKE(dk_acc, float, max_len * dim);
  TAKE(dv_acc, float, max_len * dim);
#undef TAKE
  return offset;
}

/* Bytes of scratch one thread needs for sequences of at most max_len tokens. */
int64_t attention_scratch_bytes(int64_t max_len, int64_t dim) {
  scratch_t unused;
  return carve(&unused, NULL, max_len, dim);
}

/* Softmax of row scores[first:count] * scale in place (as fp32 weights, zero elsewhere in
 * [0, span)); returns the log-sum-exp. Loops run over whole vectors (span a multiple of LANES)
 * with the hidden keys selected out, so no lane of a vector falls to a scalar tail. */
static float softmax_row(float *scores, int64_t first, int64_t count, int64_t span, float scale) {
  float top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < span; j++)
    top = j >= first && j < count && scores[j] * scale > top ? scores[j] * scale : top;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < span; j++) {
    scores[j] = j >= first && j < count ? exp_f32(scores[j] * scale - top) : 0.0f;
    total += scores[j];
  }
  float inverse = 1.0f / total;
#pragma omp simd
  for (int64_t j = 0; j < span; j++) scores[j] *= inverse;
  return top + logf(total);
}

typedef struct {
  int64_t start, len, heads, kv_heads, dim, group, window, rows, pairs, dim_panels, dims, wide;
} unit_t;

static unit_t unit_at(const int64_t *cu, int64_t u, int64_t heads, int64_t kv_heads, int64_t dim, int64_t window) {
  unit_t t;
  t.start = cu[u / kv_heads];
  t.len = cu[u / kv_heads + 1] - t.start;
  t.heads = heads;
  t.kv_heads = kv_heads;
  t.dim = dim;
  t.group = heads / kv_heads;
  t.window = window;
  t.rows = round_up(t.len, ROWS);
  t.pairs = (t.len + 1) / 2;
  t.dim_panels = round_up(dim, PANEL) / PANEL;
  t.wide = round_up(t.len + 2, PANEL);
  t.dims = t.dim_panels * PANEL;
  return t;
}

/* The first key query i sees: 0, or with a sliding window W the W - 1 keys before i. */
static inline int64_t first_key(const unit_t *t, int64_t i) { return t->window > 0 && i >= t->window ? i - t->window + 1 : 0; }

static void forward_unit(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, float *lse,
                         const unit_t *t, int64_t g, float scale, scratch_t *s) {
  int64_t H = t->heads, D = t->dim, L = t->len, rows = t->rows;
  const uint16_t *k_g = k + (t->start * t->kv_heads + g) * D, *v_g = v + (t->start * t->kv_heads + g) * D;
  pack_panels(k_g, t->kv_heads * D, 1, L, D, s->keys_nk);
  pack_panels(v_g, 1, t->kv_heads * D, D, L, s->values_kn);
  for (int64_t h = g * t->group; h < (g + 1) * t->group; h++) {
    copy_rows(q + (t->start * H + h) * D, H * D, L, rows, D, s->queries);
    for (int64_t i0 = 0; i0 < L; i0 += ROWS) {
      int64_t last = (i0 + ROWS < L ? i0 + ROWS : L) - 1, p_hi = last / 2 + 1, span = round_up(last + 2, LANES);
      product(s->queries + i0 * D, D, s->keys_nk, D / 2, last / PANEL + 1, 0, D / 2, s->scores, t->wide);
      for (int64_t r = 0; r < ROWS; r++) {
        int64_t i = i0 + r;
        uint16_t *w = s->weights + r * t->wide;
        float *row = s->scores + r * t->wide;
        if (i >= L) {
          memset(w, 0, span * sizeof *w);
          continue;
        }
        lse[(t->start + i) * H + h] = softmax_row(row, first_key(t, i), i + 1, span, scale);
#pragma omp simd
        for (int64_t j = 0; j < span; j++) w[j] = bf16_store(row[j]);
      }
      product(s->weights, t->wide, s->values_kn, t->pairs, t->dim_panels, 0, p_hi, s->cols, t->dims);
      for (int64_t i = i0; i <= last; i++) {
        uint16_t *o = out + ((t->start + i) * H + h) * D;
        const float *c = s->cols + (i - i0) * t->dims;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = bf16_store(c[d]);
      }
    }
  }
}

/* dst[j][i0:i0 + ROWS] = rows[0:ROWS][j] for j < count: a block of rows (`width` apart) stored
 * transposed into rows `dst_width` apart. */
static void store_transposed(const uint16_t *rows, int64_t width, int64_t dst_width, int64_t count, int64_t i0,
                             uint16_t *dst) {
  for (int64_t j = 0; j < count; j++) {
    uint64_t four = (uint64_t)rows[j] | (uint64_t)rows[width + j] << 16 | (uint64_t)rows[2 * width + j] << 32 |
                    (uint64_t)rows[3 * width + j] << 48;
    memcpy(dst + j * dst_width + i0, &four, sizeof four);
  }
}

/* One row block of a head's backward: recomputes the weights, forms ds (kept transposed with the
 * weights for dk and dv) and writes the block's rows of dq. */
static void backward_rows(const float *lse, uint16_t *dq, const unit_t *t, int64_t h, int64_t i0, float scale,
                          scratch_t *s) {
  int64_t H = t->heads, D = t->dim, L = t->len;
  int64_t last = (i0 + ROWS < L ? i0 + ROWS : L) - 1, p_hi = last / 2 + 1, panels = last / PANEL + 1;
  int64_t span = round_up(last + 2, LANES);
  product(s->queries + i0 * D, D, s->keys_nk, D / 2, panels, 0, D / 2, s->scores, t->wide);
  product(s->grads + i0 * D, D, s->values_nk, D / 2, panels, 0, D / 2, s->dweights, t->wide);
  for (int64_t r = 0; r < ROWS; r++) {
    int64_t i = i0 + r;
    float *p = s->scores + r * t->wide, *dw = s->dweights + r * t->wide, mean = 0.0f;
    uint16_t *ds = s->weights + r * t->wide, *p_bf16 = s->probs + r * t->wide;
    if (i >= L) {
      memset(ds, 0, span * sizeof *ds);
      memset(p_bf16, 0, span * sizeof *p_bf16);
      continue;
    }
    float shift = lse[(t->start + i) * H + h];
    int64_t first = first_key(t, i);
    /* Whole vectors, hidden keys selected out (columns past i may hold stale values). */
#pragma omp simd reduction(+ : mean)
    for (int64_t j = 0; j < span; j++) {
      p[j] = j >= first && j <= i ? exp_f32(p[j] * scale - shift) : 0.0f;
      mean += j >= first && j <= i ? p[j] * dw[j] : 0.0f;
    }
#pragma omp simd
    for (int64_t j = 0; j < span; j++) {
      ds[j] = j >= first && j <= i ? bf16_store(p[j] * (dw[j] - mean)) : 0;
      p_bf16[j] = bf16_store(p[j]);
    }
  }
  store_transposed(s->weights, t->wide, t->rows, last + 1, i0, s->ds_t);
  store_transposed(s->probs, t->wide, t->rows, last + 1, i0, s->p_t);
  product(s->weights, t->wide, s->keys_kn, t->pairs, t->dim_panels, 0, p_hi, s->cols, t->dims);
  for (int64_t i = i0; i <= last; i++) {
    uint16_t *out = dq + ((t->start + i) * H + h) * D;
    const float *c = s->cols + (i - i0) * t->dims;
#pragma omp simd
    for (int64_t d = 0; d < D; d++) out[d] = bf16_store(c[d] * scale);
  }
}

/* acc[j][0:D] += (a^T b)[j], j in [j0, j0 + ROWS) and < L, from rows of a transposed buffer. */
static void accumulate_rows(const uint16_t *a_t, const uint32_t *b, const unit_t *t, int64_t j0, float *acc,
                            float *cols) {
  int64_t D = t->dim, last = (j0 + ROWS < t->len ? j0 + ROWS : t->len) - 1;
  product(a_t + j0 * t->rows, t->rows, b, t->pairs, t->dim_panels, j0 / 2, t->pairs, cols, t->dims);
  for (int64_t j = j0; j <= last; j++)
    for (int64_t d = 0; d < D; d++) acc[j * D + d] += cols[(j - j0) * t->dims + d];
}

static void backward_unit(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *dout,
                          const float *lse, uint16_t *dq, uint16_t *dk, uint16_t *dv, const unit_t *t, int64_t g,
                          float scale, scratch_t *s) {
  int64_t H = t->heads, Hkv = t->kv_heads, D = t->dim, L = t->len, rows = t->rows;
  const uint16_t *k_g = k + (t->start * Hkv + g) * D, *v_g = v + (t->start * Hkv + g) * D;
  pack_panels(k_g, Hkv * D, 1, L, D, s->keys_nk);
  pack_panels(v_g, Hkv * D, 1, L, D, s->values_nk);
  pack_panels(k_g, 1, Hkv * D, D, L, s->keys_kn);
  memset(s->dk_acc, 0, L * D * sizeof(float));
  memset(s->dv_acc, 0, L * D * sizeof(float));
  for (int64_t h = g * t->group; h < (g + 1) * t->group; h++) {
    const uint16_t *q_h = q + (t->start * H + h) * D, *dout_h = dout + (t->start * H + h) * D;
    copy_rows(q_h, H * D, L, rows, D, s->queries);
    copy_rows(dout_h, H * D, L, rows, D, s->grads);
    pack_panels(q_h, 1, H * D, D, L, s->queries_kn);
    pack_panels(dout_h, 1, H * D, D, L, s->grads_kn);
    memset(s->ds_t, 0, rows * rows * sizeof(uint16_t));
    memset(s->p_t, 0, rows * rows * sizeof(uint16_t));
    for (int64_t i0 = 0; i0 < L; i0 += ROWS) backward_rows(lse, dq, t, h, i0, scale, s);
    for (int64_t j0 = 0; j0 < L; j0 += ROWS) {
      accumulate_rows(s->ds_t, s->queries_kn, t, j0, s->dk_acc, s->cols);
      accumulate_rows(s->p_t, s->grads_kn, t, j0, s->dv_acc, s->cols);
    }
  }
  for (int64_t j = 0; j < L; j++)
    for (int64_t d = 0; d < D; d++) {
      dk[((t->start + j) * Hkv + g) * D + d] = bf16_store(s->dk_acc[j * D + d] * scale);
      dv[((t->start + j) * Hkv + g) * D + d] = bf16_store(s->dv_acc[j * D + d]);
    }
}

/* out and lse of units [unit_begin, unit_end); window W > 0 lets a query see itself and the W - 1
 * keys before it (0: every key before it); scratch of attention_scratch_bytes(max_len, dim). */
void attention_forward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, float *lse,
                            const int64_t *cu, int64_t unit_begin, int64_t unit_end, int64_t heads, int64_t kv_heads,
                            int64_t dim, int64_t window, float scale, char *scratch, int64_t max_len) {
  scratch_t s;
  carve(&s, scratch, max_len, dim);
  for (int64_t u = unit_begin; u < unit_end; u++) {
    unit_t t = unit_at(cu, u, heads, kv_heads, dim, window);
    if (t.len > 0) forward_unit(q, k, v, out, lse, &t, u % kv_heads, scale, &s);
  }
}

/* dq, dk and dv of units [unit_begin, unit_end), from the forward's inputs, lse and dout. */
void attention_backward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *dout,
                             const float *lse, uint16_t *dq, uint16_t *dk, uint16_t *dv, const int64_t *cu,
                             int64_t unit_begin, int64_t unit_end, int64_t heads, int64_t kv_heads, int64_t dim,
                             int64_t window, float scale, char *scratch, int64_t max_len) {
  scratch_t s;
  carve(&s, scratch, max_len, dim);
  for (int64_t u = unit_begin; u < unit_end; u++) {
    unit_t t = unit_at(cu, u, heads, kv_heads, dim, window);
    if (t.len > 0) backward_unit(q, k, v, dout, lse, dq, dk, dv, &t, u % kv_heads, scale, &s);
  }
}
