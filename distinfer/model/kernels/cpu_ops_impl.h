/* Kernel bodies for one element type, included by cpu_ops.c once per type with
 *   T          the storage type (float, or uint16_t holding bfloat16 bits)
 *   NAME(f)    f's exported name for this type (f##_f32, f##_bf16)
 *   LOAD(x)    T -> float;  STORE(x) float -> T (round to nearest even)
 * Arithmetic is float32. ROUND(x) = LOAD(STORE(x)) marks where the torch ops being replaced round an
 * intermediate to the tensor dtype, so bfloat16 results match transformers' op by op (a no-op for float).
 */
#define ROUND(x) LOAD(STORE(x))

void NAME(di_rms_norm)(T *out, const T *x, T *residual, const T *weight, int64_t rows, int64_t hidden,
                       float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > SMALL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const T *h = x + r * hidden;
        T *o = out + r * hidden;
        if (residual) { /* residual <- x + residual, then normalize the sum */
            T *res = residual + r * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; i++) res[i] = STORE(LOAD(h[i]) + LOAD(res[i]));
            h = res;
        }
        float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
        for (int64_t i = 0; i < hidden; i++) sum_sq += LOAD(h[i]) * LOAD(h[i]);
        const float inv = 1.0f / sqrtf(sum_sq / (float)hidden + eps);
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) o[i] = STORE(LOAD(weight[i]) * ROUND(LOAD(h[i]) * inv));
    }
}

/* x: [tokens, heads, head_dim] rows `row_stride` elements apart; cos, sin: [tokens, head_dim] with
 * sin sign-folded ([-sin, sin] halves), so x' = x*cos + swap_halves(x)*sin. */
void NAME(di_rope)(T *x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t row_stride, const T *cos,
                   const T *sin, int nthreads) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(nthreads) if (tokens > SMALL_WORK)
    for (int64_t t = 0; t < tokens; t++) {
        const T *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            T *v = x + t * row_stride + h * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = LOAD(v[i]), b = LOAD(v[i + half]);
                v[i] = STORE(ROUND(a * LOAD(c[i])) + ROUND(b * LOAD(s[i])));
                v[i + half] = STORE(ROUND(b * LOAD(c[i + half])) + ROUND(a * LOAD(s[i + half])));
            }
        }
    }
}

/* kv: [tokens] rows of slot_elems elements (K heads then V heads), rows `row_stride` apart.
 * Returns -1 (and writes nothing) when a slot is outside [0, num_slots). */
int NAME(di_write_kv)(T *cache, const T *kv, int64_t tokens, int64_t row_stride, int64_t slot_elems,
                      const int64_t *slots, int64_t num_slots) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < tokens; t++)
        memcpy(cache + slots[t] * slot_elems, kv + t * row_stride, (size_t)slot_elems * sizeof(T));
    return 0;
}

/* x: [rows, 2 * inter] (gate then up); out: [rows, inter]. silu(g) = g / (1 + exp(-g)). */
void NAME(di_silu_mul)(T *out, const T *x, int64_t rows, int64_t inter, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows > SMALL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const T *g = x + r * 2 * inter, *u = g + inter;
        T *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) {
            const float gi = LOAD(g[i]);
            o[i] = STORE(ROUND(gi / (1.0f + expf(-gi))) * LOAD(u[i]));
        }
    }
}

static inline float NAME(dot)(const float *restrict a, const T *restrict b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * LOAD(b[i]);
    return acc;
}

/* KV heads [h0, h1) of one request, their query heads' rows r = (h - h0) * group + g (q in float).
 * Streams the request's slots in order (each slot's K and V of all heads are contiguous), so the
 * blocks are read sequentially: scores [rows][len], softmax per row, then acc [rows][head_dim] +=
 * p * V. Inlined with a constant head_dim for the common sizes so the inner loops unroll.
 * len >= 1. Writes out (T) when out_f32 is NULL, else out_f32 (float32) and lse[rows]. */
static inline __attribute__((always_inline)) void NAME(attend_heads)(
    T *restrict out, float *restrict out_f32, float *restrict lse, const float *restrict q,
    const T *restrict cache, const int64_t *restrict table, int64_t len, int64_t group, int64_t head_dim,
    int64_t h0, int64_t h1, int64_t num_kv_heads, int64_t block_size, float scale, float *restrict scores,
    float *restrict acc) {
    const int64_t slot_elems = 2 * num_kv_heads * head_dim, v_offset = num_kv_heads * head_dim;
    const int64_t rows = (h1 - h0) * group;
    for (int64_t t = 0; t < len; t++) {
        const T *slot = cache + (table[t / block_size] * block_size + t % block_size) * slot_elems;
        for (int64_t h = h0; h < h1; h++)
            for (int64_t g = 0; g < group; g++) {
                const int64_t r = (h - h0) * group + g;
                scores[r * len + t] = NAME(dot)(q + r * head_dim, slot + h * head_dim, head_dim) * scale;
            }
    }
    float inv_sum[rows];
    for (int64_t r = 0; r < rows; r++) inv_sum[r] = exp_shifted(scores + r * len, len, out_f32 ? lse + r : NULL);
    memset(acc, 0, (size_t)(rows * head_dim) * sizeof(float));
    for (int64_t t = 0; t < len; t++) {
        const T *slot = cache + (table[t / block_size] * block_size + t % block_size) * slot_elems + v_offset;
        for (int64_t h = h0; h < h1; h++) {
            const T *restrict v = slot + h * head_dim;
            for (int64_t g = 0; g < group; g++) {
                const int64_t r = (h - h0) * group + g;
                const float p = scores[r * len + t];
                float *restrict a = acc + r * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) a[d] += p * LOAD(v[d]);
            }
        }
    }
    if (out_f32) {
        for (int64_t r = 0; r < rows; r++)
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) out_f32[r * head_dim + d] = acc[r * head_dim + d] * inv_sum[r];
        return;
    }
    for (int64_t r = 0; r < rows; r++)
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) out[r * head_dim + d] = STORE(acc[r * head_dim + d] * inv_sum[r]);
}

/* Shared body of the two decode entry points: out (T) when out_f32 is NULL (every seq_len >= 1), else
 * out_f32 and lse [batch, num_heads] float32, where a seq_len 0 row gets zeros and -inf. */
static int NAME(paged_decode)(T *out, float *out_f32, float *lse, const T *q, int64_t q_row_stride,
                              const T *cache, int64_t num_blocks, const int64_t *tables, int64_t table_width,
                              const int64_t *seq_lens, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, float scale, int nthreads) {
    const int64_t group = num_heads / num_kv_heads, min_len = out_f32 ? 0 : 1;
    int64_t max_len = 1; /* >= 1: scratch is never a zero-size allocation */
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = seq_lens[b], used = (len + block_size - 1) / block_size;
        if (len < min_len || used > table_width) return -2;
        for (int64_t j = 0; j < used; j++)
            if (tables[b * table_width + j] < 0 || tables[b * table_width + j] >= num_blocks) return -2;
        max_len = len > max_len ? len : max_len;
    }
    /* one work item = a request's heads, or one KV head when there are too few requests to share */
    const int64_t split = batch >= 2 * nthreads ? 1 : num_kv_heads;
    const int64_t heads_per_item = num_kv_heads / split, rows = heads_per_item * group;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (batch * split > 1)
    {
        float *scores = malloc((size_t)(rows * max_len) * sizeof(float));
        float *acc = malloc((size_t)(rows * head_dim) * sizeof(float));
        float *qf = malloc((size_t)(rows * head_dim) * sizeof(float));
        if (!scores || !acc || !qf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t item = 0; item < split; item++) {
                if (!scores || !acc || !qf) continue;
                const int64_t h0 = item * heads_per_item, h1 = h0 + heads_per_item;
                const int64_t first = b * num_heads + h0 * group; /* the item's first (row, head) */
                T *o = out_f32 ? NULL : out + first * head_dim;
                float *of = out_f32 ? out_f32 + first * head_dim : NULL, *l = out_f32 ? lse + first : NULL;
                if (seq_lens[b] == 0) { /* lse variant only: no key, zeros and -inf (never 0/0) */
                    memset(of, 0, (size_t)(rows * head_dim) * sizeof(float));
                    for (int64_t r = 0; r < rows; r++) l[r] = -INFINITY;
                    continue;
                }
                const T *qb = q + b * q_row_stride + h0 * group * head_dim;
                for (int64_t i = 0; i < rows * head_dim; i++) qf[i] = LOAD(qb[i]);
                const int64_t *tb = tables + b * table_width;
                if (head_dim == 64)
                    NAME(attend_heads)(o, of, l, qf, cache, tb, seq_lens[b], group, 64, h0, h1, num_kv_heads,
                                       block_size, scale, scores, acc);
                else if (head_dim == 128)
                    NAME(attend_heads)(o, of, l, qf, cache, tb, seq_lens[b], group, 128, h0, h1, num_kv_heads,
                                       block_size, scale, scores, acc);
                else
                    NAME(attend_heads)(o, of, l, qf, cache, tb, seq_lens[b], group, head_dim, h0, h1,
                                       num_kv_heads, block_size, scale, scores, acc);
            }
        free(scores);
        free(acc);
        free(qf);
    }
    return failed ? -1 : 0;
}

/* q: [batch] rows (q_row_stride elements apart) of [num_heads, head_dim]; out: [batch, num_heads,
 * head_dim] contiguous; tables: [batch, table_width] block ids; seq_lens: [batch] keys per row (>= 1).
 * Returns 0; -1 when scratch memory could not be allocated; -2 when a length or block id is out of
 * range (nothing is read then). */
int NAME(di_paged_decode_attention)(T *out, const T *q, int64_t q_row_stride, const T *cache, int64_t num_blocks,
                                    const int64_t *tables, int64_t table_width, const int64_t *seq_lens,
                                    int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t block_size, float scale, int nthreads) {
    return NAME(paged_decode)(out, NULL, NULL, q, q_row_stride, cache, num_blocks, tables, table_width, seq_lens,
                              batch, num_heads, num_kv_heads, head_dim, block_size, scale, nthreads);
}

/* As di_paged_decode_attention, with out [batch, num_heads, head_dim] float32 and lse [batch, num_heads]
 * float32 (natural log of sum exp(scale * q.k)); seq_lens may be 0 (zeros, -inf). */
int NAME(di_paged_decode_attention_lse)(float *out, float *lse, const T *q, int64_t q_row_stride, const T *cache,
                                        int64_t num_blocks, const int64_t *tables, int64_t table_width,
                                        const int64_t *seq_lens, int64_t batch, int64_t num_heads,
                                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                                        int nthreads) {
    return NAME(paged_decode)(NULL, out, lse, q, q_row_stride, cache, num_blocks, tables, table_width, seq_lens,
                              batch, num_heads, num_kv_heads, head_dim, block_size, scale, nthreads);
}

#undef ROUND
