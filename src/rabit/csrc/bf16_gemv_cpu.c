/*
 * bf16-weight linear for a few fp32 input rows (decoding): y[b, r] = sum_c W[r, c] x[b, c] + bias[r].
 * W: bf16 (rows, cols), row-major; x, y, bias: fp32.  The weights widen to fp32 exactly (a 16-bit shift) and the
 * products accumulate in fp32, so x is not rounded (oneDNN's bf16 GEMM, which this replaces for the output head of
 * a packed model, rounds x to bf16 first).
 * Why: a packed folder stores the embedding, and so a tied output head, in bf16; one decoding step reads the whole
 * (vocabulary x hidden) table, e.g. 57 MB for SmolLM2-135M, the largest single read of a token.  oneDNN's M = 1
 * bf16 GEMM read it at ~15 GB/s on the 2-core Zen 4 machine (docs/RESULTS.md section 28).
 * AVX-512 (F+BW), AVX2 (+FMA) and scalar paths chosen at run time; rows split over OpenMP threads in blocks.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BG_X86 1
#endif
#include "rabit_simd.h"
#include "rabit_half.h"
#include "rabit_rows.h"

#define BG_API __attribute__((visibility("default")))
#define ROW_BLOCK 64   /* rows per work item (64 x 576 bf16 = 72 KB) */
/* Software prefetch, in row groups ahead: each iteration of a row group's loop fetches the lines of the group
 * BG_PFQ groups on that it will read at the same progress (a linear stream BG_PFQ * 4 rows ahead).  The row
 * streams advance in step 2 KB apart, a pattern the hardware prefetcher did not follow: on the Zen 4 machine the
 * 49152 x 576 head went from 5.3 to 10.6 G weights/s on one thread and from 2.94 to 2.22 ms on two (1, 2: the
 * same; 4, 8: less; docs/RESULTS.md section 28).  0 turns it off. */
#ifndef BG_PFQ
#define BG_PFQ 2
#endif
#define RG 4           /* rows sharing each load of x (independent accumulator chains) */

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

typedef struct {
    const float *x; int64_t nb, x_stride;
    const uint16_t *w; int64_t cols;
    const float *bias;
    float *y; int64_t y_stride;
} job_t;

static void rows_scalar(const job_t *J, const float *x, float *y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = J->w + r * J->cols;
        float acc = 0.0f;
        for (int64_t c = 0; c < J->cols; c++) acc += bf2f(wr[c]) * x[c];
        y[r] = acc + (J->bias ? J->bias[r] : 0.0f);
    }
}

#ifdef BG_X86
#define AVX2_ATTR __attribute__((target("avx2,fma")))
#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

/* The SIMD paths read W as 32-bit pairs of bf16 (columns 2j, 2j + 1) and widen both halves in place: the low one
 * with a shift, the high one with a mask (no cross-lane unpacking, which made a first version with vpmovzxwd run
 * at ~18 GB/s against the machine's ~35-40 GB/s streaming read).  So they take x deinterleaved: xe = the even
 * columns, xo = the odd ones (zero-padded to a whole vector). */

AVX2_ATTR static void rows_avx2(const job_t *J, const float *xe, const float *xo, float *y, int64_t r0, int64_t r1) {
    const int64_t C = J->cols, C16 = C / 16 * 16;
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    int64_t r = r0;
    for (; r + RG <= r1; r += RG) {
        const uint16_t *w[RG] = {J->w + r * C, J->w + (r + 1) * C, J->w + (r + 2) * C, J->w + (r + 3) * C};
        __m256 a[RG] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t c = 0; c < C16; c += 16) {
            __m256 ve = _mm256_loadu_ps(xe + c / 2), vo = _mm256_loadu_ps(xo + c / 2);
#if BG_PFQ
            {
                const char *pf = (const char *)(w[0] + BG_PFQ * RG * C) + c * 8;   /* 128 bytes an iteration */
                _mm_prefetch(pf, _MM_HINT_T0); _mm_prefetch(pf + 64, _MM_HINT_T0);
            }
#endif
            for (int i = 0; i < RG; i++) {
                __m256i p = _mm256_loadu_si256((const __m256i *)(w[i] + c));
                a[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p, 16)), ve, a[i]);
                a[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p, hi)), vo, a[i]);
            }
        }
        for (int i = 0; i < RG; i++) {
            float s = hsum8(a[i]);
            for (int64_t c = C16; c < C; c++) s += bf2f(w[i][c]) * ((c & 1) ? xo[c / 2] : xe[c / 2]);
            y[r + i] = s + (J->bias ? J->bias[r + i] : 0.0f);
        }
    }
    for (; r < r1; r++) {
        const uint16_t *w0 = J->w + r * C;
        float s = 0.0f;
        for (int64_t c = 0; c < C; c++) s += bf2f(w0[c]) * ((c & 1) ? xo[c / 2] : xe[c / 2]);
        y[r] = s + (J->bias ? J->bias[r] : 0.0f);
    }
}

AVX512_ATTR static void rows_avx512(const job_t *J, const float *xe, const float *xo, float *y, int64_t r0,
                                    int64_t r1) {
    const int64_t C = J->cols, C32 = C / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (C - C32)) - 1ull);   /* bf16 elements of the last, partial vector */
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512 te = _mm512_loadu_ps(xe + C32 / 2), to = _mm512_loadu_ps(xo + C32 / 2);   /* zero-padded */
#define BG_PAIR(acc, p, ve, vo)                                                                  \
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(p, 16)), ve, acc);              \
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(p, hi)), vo, acc)
    int64_t r = r0;
    for (; r + RG <= r1; r += RG) {
        const uint16_t *w0 = J->w + r * C, *w1 = w0 + C, *w2 = w1 + C, *w3 = w2 + C;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (int64_t c = 0; c < C32; c += 32) {
            __m512 ve = _mm512_loadu_ps(xe + c / 2), vo = _mm512_loadu_ps(xo + c / 2);
#if BG_PFQ
            {
                const char *pf = (const char *)(w0 + BG_PFQ * RG * C) + c * 8;   /* 256 bytes an iteration */
                _mm_prefetch(pf, _MM_HINT_T0); _mm_prefetch(pf + 64, _MM_HINT_T0);
                _mm_prefetch(pf + 128, _MM_HINT_T0); _mm_prefetch(pf + 192, _MM_HINT_T0);
            }
#endif
            __m512i p0 = _mm512_loadu_si512(w0 + c), p1 = _mm512_loadu_si512(w1 + c);
            __m512i p2 = _mm512_loadu_si512(w2 + c), p3 = _mm512_loadu_si512(w3 + c);
            BG_PAIR(a0, p0, ve, vo); BG_PAIR(a1, p1, ve, vo); BG_PAIR(a2, p2, ve, vo); BG_PAIR(a3, p3, ve, vo);
        }
        if (tail) {
            __m512i p0 = _mm512_maskz_loadu_epi16(tail, w0 + C32), p1 = _mm512_maskz_loadu_epi16(tail, w1 + C32);
            __m512i p2 = _mm512_maskz_loadu_epi16(tail, w2 + C32), p3 = _mm512_maskz_loadu_epi16(tail, w3 + C32);
            BG_PAIR(a0, p0, te, to); BG_PAIR(a1, p1, te, to); BG_PAIR(a2, p2, te, to); BG_PAIR(a3, p3, te, to);
        }
        y[r] = _mm512_reduce_add_ps(a0) + (J->bias ? J->bias[r] : 0.0f);
        y[r + 1] = _mm512_reduce_add_ps(a1) + (J->bias ? J->bias[r + 1] : 0.0f);
        y[r + 2] = _mm512_reduce_add_ps(a2) + (J->bias ? J->bias[r + 2] : 0.0f);
        y[r + 3] = _mm512_reduce_add_ps(a3) + (J->bias ? J->bias[r + 3] : 0.0f);
    }
    for (; r < r1; r++) {
        const uint16_t *w0 = J->w + r * C;
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t c = 0; c < C32; c += 32) {
            __m512i p0 = _mm512_loadu_si512(w0 + c);
            BG_PAIR(a0, p0, _mm512_loadu_ps(xe + c / 2), _mm512_loadu_ps(xo + c / 2));
        }
        if (tail) {
            __m512i p0 = _mm512_maskz_loadu_epi16(tail, w0 + C32);
            BG_PAIR(a0, p0, te, to);
        }
        y[r] = _mm512_reduce_add_ps(a0) + (J->bias ? J->bias[r] : 0.0f);
    }
#undef BG_PAIR
}
#endif

static int cpu_isa(void) {
#ifdef BG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

BG_API int bg_cpu_isa(void) { return cpu_isa(); }

/*
 * y[b, :rows] = W x[b] + bias for b < nb.  x: fp32 (nb, cols), row stride x_stride; W: bf16 (rows, cols),
 * contiguous; y: fp32, row stride y_stride; bias: fp32 (rows,) or NULL.  isa_req caps the code path (ISA_AUTO: the
 * best this CPU has).  Returns 0 on success, 1 on bad arguments.
 */
BG_API int bg_linear(const float *x, int64_t nb, int64_t x_stride, const uint16_t *w, int64_t rows, int64_t cols,
                     const float *bias, float *y, int64_t y_stride, int nthreads, int isa_req) {
    if (rows < 1 || cols < 1 || nb < 0) return 1;
    if (nb == 0) return 0;
    int isa = cpu_isa();
    if (isa_req != ISA_AUTO && isa_req < isa) isa = isa_req;
    job_t J = {x, nb, x_stride, w, cols, bias, y, y_stride};
    /* the SIMD paths take each input row deinterleaved (even columns, then odd ones), zero-padded to 32 values */
    const int64_t half = (cols + 1) / 2 + 32;
    float *xd = NULL;
    if (isa != ISA_SCALAR) {
        xd = (float *)calloc((size_t)(2 * half * nb), sizeof(float));
        if (!xd) return 2;
        for (int64_t b = 0; b < nb; b++)
            for (int64_t c = 0; c < cols; c++) xd[2 * half * b + (c & 1) * half + c / 2] = x[b * x_stride + c];
    }
    int nt = row_block_threads(rows, cols, nb, nthreads, ROW_BLOCK);
    int64_t next = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (int64_t r0, r1; next_row_block(&next, rows, ROW_BLOCK, &r0, &r1);) {
        for (int64_t b = 0; b < nb; b++) {   /* the block's rows stay in L2 for the next input row */
            float *yb = y + b * y_stride;
#ifdef BG_X86
            const float *xe = xd + 2 * half * b, *xo = xe + half;
            if (isa == ISA_AVX512) rows_avx512(&J, xe, xo, yb, r0, r1);
            else if (isa == ISA_AVX2) rows_avx2(&J, xe, xo, yb, r0, r1);
            else
#endif
                rows_scalar(&J, x + b * x_stride, yb, r0, r1);
        }
    }
    free(xd);
    return 0;
}
