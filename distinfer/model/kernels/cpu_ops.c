/* distinfer CPU kernels (float32 and bfloat16), loaded through ctypes by distinfer/model/kernels/cpu.py.
 *
 * Each replaces a chain of small torch ops with one pass over the data (bodies in cpu_ops_impl.h,
 * compiled once per element type: di_<kernel>_f32 and di_<kernel>_bf16):
 *   di_rms_norm       residual add + RMSNorm (transformers' LlamaRMSNorm order of operations)
 *   di_rope           neox RoPE in place on q and k heads (x*cos + rotate_half(x)*sin)
 *   di_write_kv       a step's K/V rows into their paged-cache slots
 *   di_silu_mul       silu(gate) * up for the fused gate_up projection
 *   di_paged_decode_attention
 *                     one query token per request against its paged KV, read in place from the
 *                     blocks (no gather copy); the query heads of a KV head share each K/V read.
 *   di_paged_decode_attention_lse
 *                     the same, output in float32 plus the log-sum-exp of the scaled scores per
 *                     row and head (partials that sequence parallelism merges); rows may be empty.
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

/* softmax numerators of row[0..n) (n >= 1) in place; returns 1 / their sum (normalization deferred);
 * with lse, *lse = log(sum_i exp(row[i])) = max + log(sum of numerators) */
static inline float exp_shifted(float *restrict row, int64_t n, float *lse) {
    float m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; i++) m = row[i] > m ? row[i] : m;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) {
        row[i] = expf(row[i] - m);
        sum += row[i];
    }
    if (lse) *lse = m + logf(sum);
    return 1.0f / sum;
}

static inline float bf16_to_f32(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* round to nearest even, as torch does; NaN stays NaN (quiet bit set) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded);
}

#define T float
#define NAME(f) f##_f32
#define LOAD(x) (x)
#define STORE(x) (x)
#include "cpu_ops_impl.h"
#undef T
#undef NAME
#undef LOAD
#undef STORE

#define T uint16_t
#define NAME(f) f##_bf16
#define LOAD(x) bf16_to_f32(x)
#define STORE(x) f32_to_bf16(x)
#include "cpu_ops_impl.h"
#undef T
#undef NAME
#undef LOAD
#undef STORE

/* y[n][o] = sum_i x[n][i] * w[o][i] (+ bias[o]) for a few bfloat16 rows x (decode batches), float32
 * accumulation, one bfloat16 rounding at the end like torch's linear. torch's own small-batch
 * bfloat16 matmul on CPU runs well below memory bandwidth; this streams each weight row once with
 * AVX512-BF16 dot products. Returns -1 when this build lacks AVX512-BF16 (callers use torch then). */
#ifdef __AVX512BF16__
#include <immintrin.h>
#define GEMV_MAX_ROWS 8

int di_has_bf16_gemv(void) { return 1; }

int di_linear_bf16(uint16_t *y, const uint16_t *x, const uint16_t *w, const uint16_t *bias, int64_t n,
                   int64_t in, int64_t out, int nthreads) {
    if (n > GEMV_MAX_ROWS || in % 32 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint16_t *wo = w + o * in;
        __m512 acc[GEMV_MAX_ROWS];
        for (int64_t r = 0; r < n; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 32) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(wo + i));
            for (int64_t r = 0; r < n; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)(x + r * in + i)), wv);
        }
        const float b = bias ? bf16_to_f32(bias[o]) : 0.0f;
        for (int64_t r = 0; r < n; r++) {
            const float dot = _mm512_reduce_add_ps(acc[r]);
            y[r * out + o] = f32_to_bf16(dot + b); /* bias added in float32, as torch's addmm does */
        }
    }
    return 0;
}
#else
int di_has_bf16_gemv(void) { return 0; }

int di_linear_bf16(uint16_t *y, const uint16_t *x, const uint16_t *w, const uint16_t *bias, int64_t n,
                   int64_t in, int64_t out, int nthreads) {
    (void)y, (void)x, (void)w, (void)bias, (void)n, (void)in, (void)out, (void)nthreads;
    return -1;
}
#endif
