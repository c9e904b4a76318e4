/* distinfer CPU kernels (float32), loaded through ctypes by distinfer/model/kernels/cpu.py.
 *
 * Each replaces a chain of small torch ops with one pass over the data:
 *   di_rms_norm       residual add + RMSNorm (transformers' LlamaRMSNorm order of operations)
 *   di_rope           neox RoPE in place on q and k heads (x*cos + rotate_half(x)*sin)
 *   di_write_kv       a step's K/V rows into their paged-cache slots
 *   di_silu_mul       silu(gate) * up for the fused gate_up projection
 *   di_paged_decode_attention
 *                     one query token per request against its paged KV, read in place from the
 *                     blocks (no gather copy); the query heads of a KV head share each K/V read.
 *
 * Built with -ffp-contract=off so element-wise products and sums round like the torch ops they
 * replace; reductions (sums of squares, dot products) use OpenMP SIMD reductions, whose order
 * differs from torch's only in the last bits, as torch's own kernels differ between batch shapes.
 * Cache layout: [num_blocks, block_size, 2, num_kv_heads, head_dim] (K then V per slot).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* vectorized expf from glibc's libmvec */
#pragma omp declare simd notinbranch
extern float expf(float);

#define SMALL_WORK 4 /* rows below which a parallel region costs more than it saves */

void di_rms_norm(float *out, const float *x, float *residual, const float *weight, int64_t rows,
                 int64_t hidden, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > SMALL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float *h = x + r * hidden;
        float *o = out + r * hidden;
        if (residual) { /* residual <- x + residual, then normalize the sum */
            float *res = residual + r * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; i++) res[i] = h[i] + res[i];
            h = res;
        }
        float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
        for (int64_t i = 0; i < hidden; i++) sum_sq += h[i] * h[i];
        const float inv = 1.0f / sqrtf(sum_sq / (float)hidden + eps);
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) o[i] = weight[i] * (h[i] * inv);
    }
}

/* x: [tokens, heads, head_dim] rows `row_stride` floats apart; cos, sin: [tokens, head_dim] with
 * sin sign-folded ([-sin, sin] halves), so x' = x*cos + swap_halves(x)*sin. */
void di_rope(float *x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t row_stride,
             const float *cos, const float *sin, int nthreads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(nthreads) if (tokens > SMALL_WORK)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * row_stride + h * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* kv: [tokens] rows of slot_elems floats (K heads then V heads), rows `row_stride` apart. */
void di_write_kv(float *cache, const float *kv, int64_t tokens, int64_t row_stride, int64_t slot_elems,
                 const int64_t *slots) {
    for (int64_t t = 0; t < tokens; t++)
        memcpy(cache + slots[t] * slot_elems, kv + t * row_stride, (size_t)slot_elems * sizeof(float));
}

/* x: [rows, 2 * inter] (gate then up); out: [rows, inter]. silu(g) = g / (1 + exp(-g)). */
void di_silu_mul(float *out, const float *x, int64_t rows, int64_t inter, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > SMALL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = x + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* softmax of row[0..n) in place; returns 1 / sum of the exponentials (normalization deferred) */
static inline float exp_shifted(float *restrict row, int64_t n) {
    float m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; i++) m = row[i] > m ? row[i] : m;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) {
        row[i] = expf(row[i] - m);
        sum += row[i];
    }
    return 1.0f / sum;
}

/* KV heads [h0, h1) of one request, their query heads' rows r = (h - h0) * group + g.
 * Streams the request's slots in order (each slot's K and V of all heads are contiguous), so the
 * blocks are read sequentially: scores [rows][len], softmax per row, then acc [rows][head_dim] +=
 * p * V. Inlined with a constant head_dim for the common sizes so the inner loops unroll. */
static inline __attribute__((always_inline)) void attend_heads(
    float *restrict out, const float *restrict q, const float *restrict cache, const int64_t *restrict table,
    int64_t len, int64_t group, int64_t head_dim, int64_t h0, int64_t h1, int64_t num_kv_heads,
    int64_t block_size, float scale, float *restrict scores, float *restrict acc) {
    const int64_t slot_elems = 2 * num_kv_heads * head_dim, v_offset = num_kv_heads * head_dim;
    const int64_t rows = (h1 - h0) * group;
    for (int64_t t = 0; t < len; t++) {
        const float *slot = cache + (table[t / block_size] * block_size + t % block_size) * slot_elems;
        for (int64_t h = h0; h < h1; h++)
            for (int64_t g = 0; g < group; g++) {
                const int64_t r = (h - h0) * group + g;
                scores[r * len + t] = dot(q + r * head_dim, slot + h * head_dim, head_dim) * scale;
            }
    }
    float inv_sum[rows];
    for (int64_t r = 0; r < rows; r++) inv_sum[r] = exp_shifted(scores + r * len, len);
    memset(acc, 0, (size_t)(rows * head_dim) * sizeof(float));
    for (int64_t t = 0; t < len; t++) {
        const float *slot = cache + (table[t / block_size] * block_size + t % block_size) * slot_elems + v_offset;
        for (int64_t h = h0; h < h1; h++) {
            const float *restrict v = slot + h * head_dim;
            for (int64_t g = 0; g < group; g++) {
                const int64_t r = (h - h0) * group + g;
                const float p = scores[r * len + t];
                float *restrict a = acc + r * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) a[d] += p * v[d];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++)
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) out[r * head_dim + d] = acc[r * head_dim + d] * inv_sum[r];
}

/* q: [batch] rows (q_row_stride floats apart) of [num_heads, head_dim]; out: [batch, num_heads,
 * head_dim] contiguous; tables: [batch, table_width] block ids; seq_lens: [batch] keys per row.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int di_paged_decode_attention(float *out, const float *q, int64_t q_row_stride, const float *cache,
                              const int64_t *tables, int64_t table_width, const int64_t *seq_lens,
                              int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int nthreads) {
    const int64_t group = num_heads / num_kv_heads;
    int64_t max_len = 0;
    for (int64_t b = 0; b < batch; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    /* one work item = a request's heads, or one KV head when there are too few requests to share */
    const int64_t split = batch >= 2 * nthreads ? 1 : num_kv_heads;
    const int64_t heads_per_item = num_kv_heads / split;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (batch * split > 1)
    {
        float *scores = malloc((size_t)(heads_per_item * group * max_len) * sizeof(float));
        float *acc = malloc((size_t)(heads_per_item * group * head_dim) * sizeof(float));
        if (!scores || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t item = 0; item < split; item++) {
                if (!scores || !acc) continue;
                const int64_t h0 = item * heads_per_item, h1 = h0 + heads_per_item;
                float *o = out + (b * num_heads + h0 * group) * head_dim;
                const float *qb = q + b * q_row_stride + h0 * group * head_dim;
                const int64_t *tb = tables + b * table_width;
                if (head_dim == 64)
                    attend_heads(o, qb, cache, tb, seq_lens[b], group, 64, h0, h1, num_kv_heads, block_size, scale, scores, acc);
                else if (head_dim == 128)
                    attend_heads(o, qb, cache, tb, seq_lens[b], group, 128, h0, h1, num_kv_heads, block_size, scale, scores, acc);
                else
                    attend_heads(o, qb, cache, tb, seq_lens[b], group, head_dim, h0, h1, num_kv_heads, block_size, scale, scores, acc);
            }
        free(scores);
        free(acc);
    }
    return failed ? -1 : 0;
}
