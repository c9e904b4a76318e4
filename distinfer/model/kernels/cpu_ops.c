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

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* softmax of row[0..n) in place; returns 1 / sum of the exponentials (normalization deferred) */
static inline float exp_shifted(float *row, int64_t n) {
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

/* One (request, KV head): `group` query heads q[group][head_dim] -> out[group][head_dim]. */
static inline void attend_one(float *out, const float *q, const float *cache, const int64_t *table,
                              int64_t len, int64_t group, int64_t head_dim, int64_t kv_head,
                              int64_t num_kv_heads, int64_t block_size, float scale, float *scores) {
    const int64_t slot_elems = 2 * num_kv_heads * head_dim, v_offset = num_kv_heads * head_dim;
    for (int64_t t = 0; t < len; t++) {
        const float *k = cache + (table[t / block_size] * block_size + t % block_size) * slot_elems
                         + kv_head * head_dim;
        for (int64_t g = 0; g < group; g++) scores[g * len + t] = dot(q + g * head_dim, k, head_dim) * scale;
    }
    float inv_sum[group];
    for (int64_t g = 0; g < group; g++) inv_sum[g] = exp_shifted(scores + g * len, len);
    memset(out, 0, (size_t)(group * head_dim) * sizeof(float));
    for (int64_t t = 0; t < len; t++) {
        const float *v = cache + (table[t / block_size] * block_size + t % block_size) * slot_elems
                         + v_offset + kv_head * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            float *o = out + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) o[d] += p * v[d];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *o = out + g * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) o[d] *= inv_sum[g];
    }
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
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (batch * num_kv_heads > 1)
    {
        float *scores = malloc((size_t)(group * max_len) * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t h = 0; h < num_kv_heads; h++)
                if (scores)
                    attend_one(out + (b * num_heads + h * group) * head_dim,
                               q + b * q_row_stride + h * group * head_dim, cache, tables + b * table_width,
                               seq_lens[b], group, head_dim, h, num_kv_heads, block_size, scale, scores);
        free(scores);
    }
    return failed ? -1 : 0;
}
