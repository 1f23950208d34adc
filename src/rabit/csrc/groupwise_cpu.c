/*
 * Group-quantized linear for a few input rows (decoding): y[b, r] = sum_c W[r, c] x[b, c] + bias[r], with
 * W[r, c] = code[r, c] * scale[r, c / group] in the layout of rabit.embedquant.quantize_groupwise:
 *   8 bits: int8 codes (rows, cols);
 *   4 bits: uint8 (rows, cols / 2), two codes offset by 8 per byte, the even column in the low nibble;
 *   scales: fp16 (rows, cols / group).
 * The output head of a model whose embedding is group-quantized (--embed-bits): the codes are read once per call,
 * never dequantized into memory, so a token costs one pass over 1 (8-bit) or 0.5 (4-bit) bytes per weight.
 * x and y are fp32; the dot products accumulate in fp32 (per group, then scaled).
 * AVX2 (+FMA, F16C) and scalar paths, chosen at run time; rows split over OpenMP threads in blocks.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GQ_X86 1
#endif
#include "rabit_simd.h"

#include "rabit_half.h"
#include "rabit_rows.h"

#define GQ_API __attribute__((visibility("default")))
#define ROW_BLOCK 64   /* rows per work item */
#define BMAX 4         /* input rows sharing one pass over a weight row */

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2 };

typedef struct {
    const float *x;      /* nb rows, stride x_stride; for 4 bits: even columns then odd columns, each cols/2 */
    int64_t x_stride, nb;
    const uint8_t *codes; int bits; int64_t cols, group, ngroups, row_bytes;
    const uint16_t *scales;
    const float *bias;
    float *y; int64_t y_stride;
} job_t;

static inline int code_at(const job_t *J, const uint8_t *row, int64_t c) {
    if (J->bits == 8) return (int)(int8_t)row[c];
    uint8_t v = row[c >> 1];
    return (int)((c & 1) ? (v >> 4) : (v & 0x0F)) - 8;
}

/* x value of column c of input row b (4 bits: the deinterleaved copy) */
static inline float x_at(const job_t *J, int64_t b, int64_t c) {
    const float *xb = J->x + b * J->x_stride;
    if (J->bits == 8) return xb[c];
    return (c & 1) ? xb[J->cols / 2 + (c >> 1)] : xb[c >> 1];
}

static void rows_scalar(const job_t *J, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = J->codes + r * J->row_bytes;
        const uint16_t *sc = J->scales + r * J->ngroups;
        for (int64_t b = 0; b < J->nb; b++) {
            float acc = 0.0f;
            for (int64_t gi = 0; gi < J->ngroups; gi++) {
                float t = 0.0f;
                for (int64_t c = gi * J->group; c < (gi + 1) * J->group; c++) t += (float)code_at(J, row, c) * x_at(J, b, c);
                acc += t * h2f(sc[gi]);
            }
            J->y[b * J->y_stride + r] = acc + (J->bias ? J->bias[r] : 0.0f);
        }
    }
}

#ifdef GQ_X86
#define AVX2_ATTR __attribute__((target("avx2,fma,f16c")))

/* One input row (decoding): four independent accumulators per group, so that the FMA latency chain does not
 * bound the loop (one chain ran at ~2.7 G weights/s per core, half the machine's bandwidth). */
AVX2_ATTR static void rows_avx2_one(const job_t *J, int64_t r0, int64_t r1) {
    const int64_t G = J->group, half = J->cols / 2;
    const float *x = J->x;
    const __m256i lo_mask = _mm256_set1_epi32(0x0F), eight = _mm256_set1_epi32(8);
#define CVT8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = J->codes + r * J->row_bytes;
        const uint16_t *sc = J->scales + r * J->ngroups;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t gi = 0; gi < J->ngroups; gi++) {
            __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps(), t2 = _mm256_setzero_ps(),
                   t3 = _mm256_setzero_ps();
            if (J->bits == 8) {
                const int8_t *cg = (const int8_t *)row + gi * G;
                const float *xg = x + gi * G;
                int64_t j = 0;
                for (; j + 32 <= G; j += 32) {
                    t0 = _mm256_fmadd_ps(CVT8(cg + j), _mm256_loadu_ps(xg + j), t0);
                    t1 = _mm256_fmadd_ps(CVT8(cg + j + 8), _mm256_loadu_ps(xg + j + 8), t1);
                    t2 = _mm256_fmadd_ps(CVT8(cg + j + 16), _mm256_loadu_ps(xg + j + 16), t2);
                    t3 = _mm256_fmadd_ps(CVT8(cg + j + 24), _mm256_loadu_ps(xg + j + 24), t3);
                }
                for (; j < G; j += 8) t0 = _mm256_fmadd_ps(CVT8(cg + j), _mm256_loadu_ps(xg + j), t0);
            } else {
                const uint8_t *cg = row + gi * G / 2;
                const float *xe = x + gi * G / 2, *xo = x + half + gi * G / 2;
                int64_t j = 0;
                for (; j + 16 <= G / 2; j += 16) {   /* 16 bytes: 32 values, 4 FMAs on independent chains */
                    __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cg + j)));
                    __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cg + j + 8)));
                    t0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, lo_mask), eight)),
                                         _mm256_loadu_ps(xe + j), t0);
                    t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), eight)),
                                         _mm256_loadu_ps(xo + j), t1);
                    t2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v1, lo_mask), eight)),
                                         _mm256_loadu_ps(xe + j + 8), t2);
                    t3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v1, 4), eight)),
                                         _mm256_loadu_ps(xo + j + 8), t3);
                }
                for (; j < G / 2; j += 8) {
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cg + j)));
                    t0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, lo_mask), eight)),
                                         _mm256_loadu_ps(xe + j), t0);
                    t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight)),
                                         _mm256_loadu_ps(xo + j), t1);
                }
            }
            __m256 t = _mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3));
            acc = _mm256_fmadd_ps(t, _mm256_set1_ps(_cvtsh_ss(sc[gi])), acc);
        }
        J->y[r] = hsum8(acc) + (J->bias ? J->bias[r] : 0.0f);
    }
#undef CVT8
}

/* group % 8 == 0 (8 bits) or group % 16 == 0 (4 bits); up to BMAX input rows share each code load */
AVX2_ATTR static void rows_avx2(const job_t *J, int64_t r0, int64_t r1) {
    const int64_t G = J->group, half = J->cols / 2;
    for (int64_t b0 = 0; b0 < J->nb; b0 += BMAX) {
        const int nb = (int)(J->nb - b0 < BMAX ? J->nb - b0 : BMAX);
        const float *xs[BMAX];
        for (int b = 0; b < nb; b++) xs[b] = J->x + (b0 + b) * J->x_stride;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row = J->codes + r * J->row_bytes;
            const uint16_t *sc = J->scales + r * J->ngroups;
            __m256 acc[BMAX];
            for (int b = 0; b < BMAX; b++) acc[b] = _mm256_setzero_ps();
            for (int64_t gi = 0; gi < J->ngroups; gi++) {
                __m256 t[BMAX];
                for (int b = 0; b < BMAX; b++) t[b] = _mm256_setzero_ps();
                if (J->bits == 8) {
                    const int8_t *cg = (const int8_t *)row + gi * G;
                    for (int64_t j = 0; j < G; j += 8) {
                        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cg + j))));
                        for (int b = 0; b < nb; b++)
                            t[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs[b] + gi * G + j), t[b]);
                    }
                } else {
                    const uint8_t *cg = row + gi * G / 2;
                    const __m256i lo_mask = _mm256_set1_epi32(0x0F), eight = _mm256_set1_epi32(8);
                    for (int64_t j = 0; j < G / 2; j += 8) {   /* 8 bytes: columns 2j.. of the group, 16 values */
                        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cg + j)));
                        __m256 we = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, lo_mask), eight));
                        __m256 wo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
                        int64_t xi = gi * G / 2 + j;
                        for (int b = 0; b < nb; b++) {
                            t[b] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xs[b] + xi), t[b]);
                            t[b] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xs[b] + half + xi), t[b]);
                        }
                    }
                }
                __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[gi]));
                for (int b = 0; b < nb; b++) acc[b] = _mm256_fmadd_ps(t[b], s, acc[b]);
            }
            for (int b = 0; b < nb; b++)
                J->y[(b0 + b) * J->y_stride + r] = hsum8(acc[b]) + (J->bias ? J->bias[r] : 0.0f);
        }
    }
}
#endif

static int cpu_isa(void) {
#ifdef GQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

GQ_API int gq_cpu_isa(void) { return cpu_isa(); }

/*
 * y[b, :rows] = W x[b] + bias for b < nb. x: fp32 (nb, cols), row stride x_stride; for bits == 4 each row holds
 * the even columns of x followed by the odd ones (the caller deinterleaves: the nibbles of a byte are columns 2j
 * and 2j + 1). y: fp32, row stride y_stride. bias: fp32 (rows,) or NULL. Returns 0 on success.
 */
GQ_API int gq_linear(const float *x, int64_t nb, int64_t x_stride, const uint8_t *codes, int bits, int64_t rows,
                     int64_t cols, int64_t group, const uint16_t *scales, const float *bias, float *y,
                     int64_t y_stride, int nthreads, int isa_req) {
    if ((bits != 8 && bits != 4) || rows < 1 || cols < 1 || group < 1 || cols % group || nb < 0) return 1;
    if (bits == 4 && (group % 2 || cols % 2)) return 1;
    if (nb == 0) return 0;
    int isa = cpu_isa();
    if (isa_req != ISA_AUTO && isa_req < isa) isa = isa_req;
    if (isa == ISA_AVX2 && group % (bits == 8 ? 8 : 16)) isa = ISA_SCALAR;
    job_t J = {x, x_stride, nb, codes, bits, cols, group, cols / group, bits == 8 ? cols : cols / 2, scales,
               bias, y, y_stride};
    int nt = row_block_threads(rows, cols, nb, nthreads, ROW_BLOCK);
    int64_t next = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (int64_t r0, r1; next_row_block(&next, rows, ROW_BLOCK, &r0, &r1);) {
#ifdef GQ_X86
        if (isa == ISA_AVX2 && nb == 1) rows_avx2_one(&J, r0, r1);
        else if (isa == ISA_AVX2) rows_avx2(&J, r0, r1);
        else
#endif
            rows_scalar(&J, r0, r1);
    }
    return 0;
}
