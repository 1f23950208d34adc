/*
 * Native CPU kernels of the coupled RaBiT linear (rabit.ops.coupled), each one pass over out x in:
 *
 * cw_derive: the derivation coupled_weight() makes once per parameter change, B_1 = sign(latent),
 *     B_2 = sign(latent - g_1 B_1 h_1), ...: the weight W = sum_i g_i B_i h_i (fp32), the sign planes (bool
 *     bytes, 1 = +1) and the clipped-STE mask |latent| <= clip * sum_i |g_i| |h_i|^T, with the same fp32
 *     operations in the same order as the PyTorch formula (so the same bits: no FMA, -ffp-contract=off), without
 *     its per-path temporaries (outer product, its negation, torch.where, residual, bound).
 *
 * sg_scale_grads: the path-scale gradients for all k paths in one pass over d loss / d W:
 *
 *     dg_i[o] = sum_j s_i[o, j] * gw[o, j] * h_i[j]        dh_i[j] = sum_o g_i[o] * s_i[o, j] * gw[o, j]
 *
 * with s_i = +1 where the sign plane B_i is True (1 byte per weight, the bool plane coupled_weight() keeps),
 * else -1. gw: fp32 (out, in), row-major, contiguous (sg_scale_grads_bf16: bf16, each row widened to fp32 once,
 * so the sums are those of the fp32 call on gw.float()). The PyTorch formula (torch.where(B_i, gw, -gw), then two
 * matrix-vector products) writes and reads two dense out x in temporaries per path; here gw is read once for
 * all paths and s_i * gw is a sign flip in registers.
 *
 * Rows are split statically over OpenMP threads (contiguous ranges). sg_scale_grads accumulates dh in one buffer
 * per thread, summed in thread order at the end, so a result is reproducible for a given thread count; its
 * columns are walked in tiles (at most TILE_MAX) so that a tile of h_i and of the dh accumulators stays in L1
 * across rows. AVX-512 (F, BW, VL) and AVX2 (+FMA) paths, chosen at run time, and a scalar path; fp32
 * accumulation.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SG_X86 1
#endif
#include "rabit_simd.h"

#define SG_API __attribute__((visibility("default")))
#define PMAX 4          /* paths sharing one load of a gw vector; more paths: several passes */
#define TILE_MAX 1024   /* columns per tile */
#define KMAX 64

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

typedef struct {
    const float *gw; int64_t out, in; int k;
    const uint8_t *const *s; const float *const *g; const float *const *h;
    float *const *dg;
    const uint16_t *gwb;   /* gw as bf16 instead (gw unused), or NULL */
} job_t;

/* row o of gw as fp32 over columns [c0, c1): gw itself, or the bf16 row widened into buf (in floats) */
static inline const float *gw_row(const job_t *J, int64_t o, int64_t c0, int64_t c1, float *buf) {
    if (!J->gwb) return J->gw + o * J->in;
    const uint16_t *src = J->gwb + o * J->in;
    for (int64_t j = c0; j < c1; j++) {
        const uint32_t u = (uint32_t)src[j] << 16;
        memcpy(buf + j, &u, 4);
    }
    return buf;
}

/* rows [r0, r1) x columns [c0, c1) of paths p0 .. p0 + kk - 1: dg[p][o] += row partials, dh[p][j] += ... */
static void tile_scalar(const job_t *J, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int p0, int kk,
                        float *const *dh, float *buf) {
    for (int64_t o = r0; o < r1; o++) {
        const float *w = gw_row(J, o, c0, c1, buf);
        for (int p = p0; p < p0 + kk; p++) {
            const uint8_t *s = J->s[p] + o * J->in;
            const float *h = J->h[p];
            float *d = dh[p];
            const float go = J->g[p][o];
            float acc = 0.0f;
            for (int64_t j = c0; j < c1; j++) {
                const float v = s[j] ? w[j] : -w[j];
                acc += v * h[j];
                d[j] += go * v;
            }
            J->dg[p][o] += acc;
        }
    }
}

#ifdef SG_X86
#define AVX2_ATTR __attribute__((target("avx2,fma")))
#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

/* KK is a constant at every call site (always inlined): the per-path accumulators stay in registers */
__attribute__((always_inline)) AVX2_ATTR static inline void
tile_avx2_k(const job_t *J, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int p0, const int KK,
            float *const *dh, float *buf) {
    const __m256i sbit = _mm256_set1_epi32((int)0x80000000u), zero = _mm256_setzero_si256();
    for (int64_t o = r0; o < r1; o++) {
        const float *w = gw_row(J, o, c0, c1, buf);
        const uint8_t *s[PMAX]; const float *h[PMAX]; float *d[PMAX];
        __m256 acc[PMAX], gs[PMAX];
        float tail[PMAX];
        for (int p = 0; p < KK; p++) {
            s[p] = J->s[p0 + p] + o * J->in; h[p] = J->h[p0 + p]; d[p] = dh[p0 + p];
            acc[p] = _mm256_setzero_ps(); gs[p] = _mm256_set1_ps(J->g[p0 + p][o]); tail[p] = 0.0f;
        }
        int64_t j = c0;
        for (; j + 8 <= c1; j += 8) {
            const __m256i wv = _mm256_castps_si256(_mm256_loadu_ps(w + j));
            for (int p = 0; p < KK; p++) {
                /* bytes 0 -> all ones -> the sign bit set -> -gw */
                __m256i neg = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(s[p] + j))),
                                                 zero);
                __m256 v = _mm256_castsi256_ps(_mm256_xor_si256(wv, _mm256_and_si256(neg, sbit)));
                acc[p] = _mm256_fmadd_ps(v, _mm256_loadu_ps(h[p] + j), acc[p]);
                _mm256_storeu_ps(d[p] + j, _mm256_fmadd_ps(gs[p], v, _mm256_loadu_ps(d[p] + j)));
            }
        }
        for (; j < c1; j++) {
            for (int p = 0; p < KK; p++) {
                const float v = s[p][j] ? w[j] : -w[j];
                tail[p] += v * h[p][j];
                d[p][j] += J->g[p0 + p][o] * v;
            }
        }
        for (int p = 0; p < KK; p++) J->dg[p0 + p][o] += hsum8(acc[p]) + tail[p];
    }
}

AVX2_ATTR static void tile_avx2(const job_t *J, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int p0, int kk,
                                float *const *dh, float *buf) {
    switch (kk) {
    case 1: tile_avx2_k(J, r0, r1, c0, c1, p0, 1, dh, buf); break;
    case 2: tile_avx2_k(J, r0, r1, c0, c1, p0, 2, dh, buf); break;
    case 3: tile_avx2_k(J, r0, r1, c0, c1, p0, 3, dh, buf); break;
    default: tile_avx2_k(J, r0, r1, c0, c1, p0, 4, dh, buf); break;
    }
}

__attribute__((always_inline)) AVX512_ATTR static inline void
tile_avx512_k(const job_t *J, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int p0, const int KK,
              float *const *dh, float *buf) {
    const __m512i sbit = _mm512_set1_epi32((int)0x80000000u);
    const __m128i ones = _mm_set1_epi8((char)0xFF);
    const int64_t n = c1 - c0;
    const __mmask16 last = (n % 16) ? (__mmask16)((1u << (n % 16)) - 1u) : (__mmask16)0xFFFF;
    for (int64_t o = r0; o < r1; o++) {
        const float *w = gw_row(J, o, c0, c1, buf);
        const uint8_t *s[PMAX]; const float *h[PMAX]; float *d[PMAX];
        __m512 acc[PMAX], gs[PMAX];
        for (int p = 0; p < KK; p++) {
            s[p] = J->s[p0 + p] + o * J->in; h[p] = J->h[p0 + p]; d[p] = dh[p0 + p];
            acc[p] = _mm512_setzero_ps(); gs[p] = _mm512_set1_ps(J->g[p0 + p][o]);
        }
        for (int64_t j = c0; j < c1; j += 16) {
            const __mmask16 m = (c1 - j >= 16) ? (__mmask16)0xFFFF : last;
            const __m512i wv = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, w + j));
            for (int p = 0; p < KK; p++) {
                /* lanes whose byte is 0 (B = -1): flip the sign bit */
                const __mmask16 neg = _mm_testn_epi8_mask(_mm_maskz_loadu_epi8(m, s[p] + j), ones);
                const __m512 v = _mm512_castsi512_ps(_mm512_mask_xor_epi32(wv, neg, wv, sbit));
                acc[p] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, h[p] + j), acc[p]);
                _mm512_mask_storeu_ps(d[p] + j, m, _mm512_fmadd_ps(gs[p], v, _mm512_maskz_loadu_ps(m, d[p] + j)));
            }
        }
        for (int p = 0; p < KK; p++) J->dg[p0 + p][o] += _mm512_reduce_add_ps(acc[p]);
    }
}

AVX512_ATTR static void tile_avx512(const job_t *J, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int p0,
                                    int kk, float *const *dh, float *buf) {
    switch (kk) {
    case 1: tile_avx512_k(J, r0, r1, c0, c1, p0, 1, dh, buf); break;
    case 2: tile_avx512_k(J, r0, r1, c0, c1, p0, 2, dh, buf); break;
    case 3: tile_avx512_k(J, r0, r1, c0, c1, p0, 3, dh, buf); break;
    default: tile_avx512_k(J, r0, r1, c0, c1, p0, 4, dh, buf); break;
    }
}
#endif

static int cpu_isa(void) {
#ifdef SG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

SG_API int sg_cpu_isa(void) { return cpu_isa(); }

/* rows [r0, r1), all columns, all paths, into this thread's dh buffers */
static void rows_all(const job_t *J, int isa, int64_t r0, int64_t r1, float *const *dh, float *buf) {
    const int64_t ntiles = (J->in + TILE_MAX - 1) / TILE_MAX;
    const int64_t width = ((J->in + ntiles - 1) / ntiles + 15) / 16 * 16;   /* even tiles, whole vectors */
    for (int p = 0; p < J->k; p++)
        for (int64_t o = r0; o < r1; o++) J->dg[p][o] = 0.0f;
    for (int64_t c0 = 0; c0 < J->in; c0 += width) {
        const int64_t c1 = c0 + width < J->in ? c0 + width : J->in;
        for (int p0 = 0; p0 < J->k; p0 += PMAX) {
            const int kk = J->k - p0 < PMAX ? J->k - p0 : PMAX;
#ifdef SG_X86
            if (isa == ISA_AVX512) { tile_avx512(J, r0, r1, c0, c1, p0, kk, dh, buf); continue; }
            if (isa == ISA_AVX2) { tile_avx2(J, r0, r1, c0, c1, p0, kk, dh, buf); continue; }
#endif
            tile_scalar(J, r0, r1, c0, c1, p0, kk, dh, buf);
        }
    }
}

/*
 * dg[i] (out floats) and dh[i] (in floats) for i < k, from gw (out x in, fp32, contiguous), the sign planes
 * s[i] (out x in bytes, nonzero = +1), g[i] (out) and h[i] (in). isa_req: ISA_* (AUTO = the best this CPU
 * has; a better one than the CPU has is lowered to it). Below min_work (out * in * k) one thread runs, whatever
 * nthreads says: fork/join and the final barrier cost more than they save on small layers, and far more on a
 * loaded machine, where a thread may wait a scheduler slice for its sibling. Returns 0, or 1 for bad arguments,
 * 2 when out of memory.
 */
static int scale_grads(const float *gw, const uint16_t *gwb, int64_t out, int64_t in, int k,
                       const uint8_t *const *s, const float *const *g, const float *const *h, float *const *dg,
                       float *const *dh, int nthreads, int isa_req, int64_t min_work) {
    if (out < 0 || in < 0 || k < 1 || k > KMAX) return 1;
    for (int p = 0; p < k; p++) {
        if (in > 0 && out > 0 && (!s[p] || !g[p] || !h[p])) return 1;
        if (out > 0) memset(dg[p], 0, (size_t)out * sizeof(float));
        if (in > 0) memset(dh[p], 0, (size_t)in * sizeof(float));
    }
    if (out == 0 || in == 0) return 0;
    int isa = cpu_isa();
    if (isa_req != ISA_AUTO && isa_req < isa) isa = isa_req;
    job_t J = {gw, out, in, k, s, g, h, dg, gwb};
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)out * in * k < (double)min_work) nt = 1;
    if (nt > out) nt = (int)out;
    /* one widened gw row per thread, for bf16 input */
    float *rowbuf = gwb ? (float *)malloc((size_t)nt * in * sizeof(float)) : NULL;
    if (gwb && !rowbuf) return 2;
    if (nt == 1) {                                          /* accumulate straight into the outputs */
        rows_all(&J, isa, 0, out, dh, rowbuf);
        free(rowbuf);
        return 0;
    }
    float *ws = (float *)calloc((size_t)nt * k * in, sizeof(float));   /* per-thread dh accumulators */
    if (!ws) { free(rowbuf); return 2; }
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
        const int t = 0, n = 1;
#endif
        float *mine[KMAX];
        for (int p = 0; p < k; p++) mine[p] = ws + ((int64_t)t * k + p) * in;
        const int64_t r0 = out * t / n, r1 = out * (t + 1) / n;
        rows_all(&J, isa, r0, r1, mine, rowbuf ? rowbuf + (int64_t)t * in : NULL);
#pragma omp barrier
        /* dh = sum of the n buffers in thread order, the columns split over the threads */
        const int64_t j0 = in * t / n, j1 = in * (t + 1) / n;
        for (int p = 0; p < k; p++) {
            for (int64_t j = j0; j < j1; j++) {
                float sum = 0.0f;
                for (int u = 0; u < n; u++) sum += ws[((int64_t)u * k + p) * in + j];
                dh[p][j] = sum;
            }
        }
    }
    free(ws);
    free(rowbuf);
    return 0;
}

SG_API int sg_scale_grads(const float *gw, int64_t out, int64_t in, int k, const uint8_t *const *s,
                          const float *const *g, const float *const *h, float *const *dg, float *const *dh,
                          int nthreads, int isa_req, int64_t min_work) {
    return scale_grads(gw, NULL, out, in, k, s, g, h, dg, dh, nthreads, isa_req, min_work);
}

/* sg_scale_grads with gw as bf16 (out x in, contiguous): the same sums of the widened values, in the same order */
SG_API int sg_scale_grads_bf16(const uint16_t *gw, int64_t out, int64_t in, int k, const uint8_t *const *s,
                               const float *const *g, const float *const *h, float *const *dg, float *const *dh,
                               int nthreads, int isa_req, int64_t min_work) {
    if (!gw && out > 0 && in > 0) return 1;
    return scale_grads(NULL, gw, out, in, k, s, g, h, dg, dh, nthreads, isa_req, min_work);
}

/* ------------------------------------------------------------------ cw_derive */
typedef struct {
    const float *latent; int64_t out, in; int k;
    const float *const *g; const float *const *h;
    float *w; uint8_t *const *s; uint8_t *mask; float clip;
} derive_t;

/* one row: res (in floats of scratch) carries the residual latent - sum of the terms so far */
static int derive_row_scalar(const derive_t *D, int64_t o, float *res) {
    const int64_t n = D->in;
    const float *lat = D->latent + o * n;
    float *w = D->w + o * n;
    int bad = 0;
    for (int64_t j = 0; j < n; j++) bad |= !isfinite(lat[j]);
    for (int i = 0; i < D->k; i++) {
        const float gi = D->g[i][o];
        const float *h = D->h[i], *r = i == 0 ? lat : res;
        uint8_t *s = D->s[i] + o * n;
        for (int64_t j = 0; j < n; j++) {
            const float outer = gi * h[j];
            const int pos = r[j] >= 0.0f;
            const float term = pos ? outer : -outer;
            s[j] = (uint8_t)pos;
            if (i + 1 < D->k) res[j] = r[j] - term;
            w[j] = i == 0 ? term : w[j] + term;
        }
    }
    if (D->mask) {
        uint8_t *m = D->mask + o * n;
        for (int64_t j = 0; j < n; j++) {
            float b = fabsf(D->g[0][o]) * fabsf(D->h[0][j]);
            for (int i = 1; i < D->k; i++) b = b + fabsf(D->g[i][o]) * fabsf(D->h[i][j]);
            m[j] = (uint8_t)(fabsf(lat[j]) <= b * D->clip);
        }
    }
    return bad;
}

#ifdef SG_X86
AVX2_ATTR static inline void store_bytes8(uint8_t *dst, __m256 cmp) {   /* all-ones lanes -> 1, else 0 */
    __m256i a = _mm256_and_si256(_mm256_castps_si256(cmp), _mm256_set1_epi32(1));
    __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    _mm_storel_epi64((__m128i *)dst, _mm_packus_epi16(p16, p16));
}

AVX2_ATTR static int derive_row_avx2(const derive_t *D, int64_t o, float *res) {
    const int64_t n = D->in, nv = n / 8 * 8;
    const float *lat = D->latent + o * n;
    float *w = D->w + o * n;
    const __m256 sbit = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)), zero = _mm256_setzero_ps();
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 badv = zero;
    int bad = 0;
    for (int64_t j = 0; j < nv; j += 8) {
        __m256 x = _mm256_loadu_ps(lat + j), d = _mm256_sub_ps(x, x);   /* NaN exactly where x is not finite */
        badv = _mm256_or_ps(badv, _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
    }
    bad |= _mm256_movemask_ps(badv) != 0;
    for (int64_t j = nv; j < n; j++) bad |= !isfinite(lat[j]);
    for (int i = 0; i < D->k; i++) {
        const float gs = D->g[i][o];
        const __m256 gi = _mm256_set1_ps(gs);
        const float *h = D->h[i], *r = i == 0 ? lat : res;
        uint8_t *s = D->s[i] + o * n;
        const int last = i + 1 == D->k;
        for (int64_t j = 0; j < nv; j += 8) {
            const __m256 rv = _mm256_loadu_ps(r + j), outer = _mm256_mul_ps(gi, _mm256_loadu_ps(h + j));
            const __m256 pos = _mm256_cmp_ps(rv, zero, _CMP_GE_OQ);
            const __m256 term = _mm256_xor_ps(outer, _mm256_andnot_ps(pos, sbit));
            store_bytes8(s + j, pos);
            if (!last) _mm256_storeu_ps(res + j, _mm256_sub_ps(rv, term));
            _mm256_storeu_ps(w + j, i == 0 ? term : _mm256_add_ps(_mm256_loadu_ps(w + j), term));
        }
        for (int64_t j = nv; j < n; j++) {
            const float outer = gs * h[j];
            const int pos = r[j] >= 0.0f;
            const float term = pos ? outer : -outer;
            s[j] = (uint8_t)pos;
            if (!last) res[j] = r[j] - term;
            w[j] = i == 0 ? term : w[j] + term;
        }
    }
    if (D->mask) {
        uint8_t *m = D->mask + o * n;
        const __m256 clip = _mm256_set1_ps(D->clip);
        for (int64_t j = 0; j < nv; j += 8) {
            __m256 b = _mm256_mul_ps(_mm256_set1_ps(fabsf(D->g[0][o])), _mm256_and_ps(_mm256_loadu_ps(D->h[0] + j), absm));
            for (int i = 1; i < D->k; i++)
                b = _mm256_add_ps(b, _mm256_mul_ps(_mm256_set1_ps(fabsf(D->g[i][o])),
                                                   _mm256_and_ps(_mm256_loadu_ps(D->h[i] + j), absm)));
            store_bytes8(m + j, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(lat + j), absm), _mm256_mul_ps(b, clip),
                                              _CMP_LE_OQ));
        }
        for (int64_t j = nv; j < n; j++) {
            float b = fabsf(D->g[0][o]) * fabsf(D->h[0][j]);
            for (int i = 1; i < D->k; i++) b = b + fabsf(D->g[i][o]) * fabsf(D->h[i][j]);
            m[j] = (uint8_t)(fabsf(lat[j]) <= b * D->clip);
        }
    }
    return bad;
}

AVX512_ATTR static int derive_row_avx512(const derive_t *D, int64_t o, float *res) {
    const int64_t n = D->in;
    const float *lat = D->latent + o * n;
    float *w = D->w + o * n;
    const __m512i sbit = _mm512_set1_epi32((int)0x80000000u);
    const __m512 zero = _mm512_setzero_ps();
    const __m128i one = _mm_set1_epi8(1);
    const __mmask16 last_m = (n % 16) ? (__mmask16)((1u << (n % 16)) - 1u) : (__mmask16)0xFFFF;
    __mmask16 bad = 0;
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : last_m;
        const __m512 x = _mm512_maskz_loadu_ps(m, lat + j), d = _mm512_sub_ps(x, x);
        bad |= _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
    }
    for (int i = 0; i < D->k; i++) {
        const __m512 gi = _mm512_set1_ps(D->g[i][o]);
        const float *h = D->h[i], *r = i == 0 ? lat : res;
        uint8_t *s = D->s[i] + o * n;
        const int last = i + 1 == D->k;
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : last_m;
            const __m512 rv = _mm512_maskz_loadu_ps(m, r + j);
            const __m512 outer = _mm512_mul_ps(gi, _mm512_maskz_loadu_ps(m, h + j));
            const __mmask16 pos = _mm512_cmp_ps_mask(rv, zero, _CMP_GE_OQ);
            const __m512 term = _mm512_castsi512_ps(
                _mm512_mask_xor_epi32(_mm512_castps_si512(outer), (__mmask16)~pos, _mm512_castps_si512(outer), sbit));
            _mm_mask_storeu_epi8(s + j, m, _mm_maskz_mov_epi8(pos, one));
            if (!last) _mm512_mask_storeu_ps(res + j, m, _mm512_sub_ps(rv, term));
            _mm512_mask_storeu_ps(w + j, m, i == 0 ? term : _mm512_add_ps(_mm512_maskz_loadu_ps(m, w + j), term));
        }
    }
    if (D->mask) {
        uint8_t *mk = D->mask + o * n;
        const __m512 clip = _mm512_set1_ps(D->clip);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : last_m;
            __m512 b = _mm512_mul_ps(_mm512_set1_ps(fabsf(D->g[0][o])), _mm512_abs_ps(_mm512_maskz_loadu_ps(m, D->h[0] + j)));
            for (int i = 1; i < D->k; i++)
                b = _mm512_add_ps(b, _mm512_mul_ps(_mm512_set1_ps(fabsf(D->g[i][o])),
                                                   _mm512_abs_ps(_mm512_maskz_loadu_ps(m, D->h[i] + j))));
            const __mmask16 le = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_maskz_loadu_ps(m, lat + j)),
                                                    _mm512_mul_ps(b, clip), _CMP_LE_OQ);
            _mm_mask_storeu_epi8(mk + j, m, _mm_maskz_mov_epi8(le, one));
        }
    }
    return bad != 0;
}
#endif

/*
 * From latent (out x in fp32, contiguous), g[i] (out) and h[i] (in), i < k: w (out x in fp32), s[i] (out x in
 * bytes, 1 where B_i = +1) and, when mask is not NULL, mask (out x in bytes, 1 where |latent| <= clip * bound).
 * Returns 0, 1 when some latent is not finite (all outputs are still written), -1 for bad arguments, -2 when out
 * of memory. Threads and isa_req as sg_scale_grads.
 */
SG_API int cw_derive(const float *latent, int64_t out, int64_t in, int k, const float *const *g,
                     const float *const *h, float *w, uint8_t *const *s, uint8_t *mask, float clip, int nthreads,
                     int isa_req, int64_t min_work) {
    if (out < 0 || in < 0 || k < 1 || k > KMAX) return -1;
    if (out == 0 || in == 0) return 0;
    int isa = cpu_isa();
    if (isa_req != ISA_AUTO && isa_req < isa) isa = isa_req;
    derive_t D = {latent, out, in, k, g, h, w, s, mask, clip};
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)out * in * k < (double)min_work) nt = 1;
    if (nt > out) nt = (int)out;
    float *scratch = (float *)malloc((size_t)nt * in * sizeof(float));   /* one residual row per thread */
    if (!scratch) return -2;
    int bad = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : bad)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int t = 0, nth = 1;
#endif
        float *res = scratch + (int64_t)t * in;
        for (int64_t o = out * t / nth; o < out * (t + 1) / nth; o++) {
#ifdef SG_X86
            if (isa == ISA_AVX512) { bad |= derive_row_avx512(&D, o, res); continue; }
            if (isa == ISA_AVX2) { bad |= derive_row_avx2(&D, o, res); continue; }
#endif
            bad |= derive_row_scalar(&D, o, res);
        }
    }
    free(scratch);
    return bad;
}
