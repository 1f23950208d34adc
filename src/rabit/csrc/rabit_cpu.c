/*
 * RaBiT CPU kernels: y = sum_p g_p * (B_p (h_p * x)) + bias, B_p in {-1,+1} packed as bits.
 *
 * Packed layout "tiled16" (see rabit/packing.py): uint8 [k][out_pad/16][in_pad/8][16],
 * bit j of byte [p][t][c][r] = B_p[16t + r][8c + j] > 0.  out_pad = ceil(out/16)*16, in_pad = ceil(in/32)*32.
 *
 * Method (lookup tables, as T-MAC / bitnet.cpp, but exact fp32):
 *   for every group of 4 inputs q and path p, a 16-entry table T_p,q[m] = sum_{j<4} (bit j of m ? +a_j : -a_j),
 *   a_j = h_p[4q+j] * x[4q+j] (0 for padded inputs).  The nibble of a row's sign byte then selects that row's
 *   partial sum: one vpermps gives the partial sums of 16 rows x 4 inputs, one vaddps accumulates them.
 *   No multiplications in the big product; x is read once (when building the tables) for all paths.
 *
 * ISA: AVX-512 (F+BW+VL) and AVX2+FMA code paths compiled with target attributes, selected at run time;
 * a portable scalar path otherwise.  Threads: OpenMP over tiles of 16 output rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RABIT_X86 1
#endif

#define RABIT_API __attribute__((visibility("default")))

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

#define TILE 16
#define TG 4           /* tiles per group in the SIMD inner loops (64 rows) */
#define BCHUNK 8       /* batch rows processed per table build */

/* ------------------------------------------------------------------ dtype conversion */
static inline float bf2f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0) {
        f = (float)m * 5.9604644775390625e-8f;  /* m * 2^-24 */
        memcpy(&u, &f, 4); u |= s;
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&f, &u, 4); return f;
}
static inline uint16_t f2h(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00u);      /* >= 65520: inf */
    if (a < 0x38800000u) {                                      /* < 2^-14: subnormal half */
        float af; memcpy(&af, &a, 4);
        return (uint16_t)(s | (uint32_t)rintf(af * 16777216.0f));
    }
    return (uint16_t)(s | ((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13));
}
static inline float ld(const void *p, int dt, int64_t i) {
    switch (dt) {
    case DT_F16: return h2f(((const uint16_t *)p)[i]);
    case DT_BF16: return bf2f(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}
static inline void st(void *p, int dt, int64_t i, float v) {
    switch (dt) {
    case DT_F16: ((uint16_t *)p)[i] = f2h(v); break;
    case DT_BF16: ((uint16_t *)p)[i] = f2bf(v); break;
    default: ((float *)p)[i] = v;
    }
}

/* ------------------------------------------------------------------ scratch (per calling thread) */
static __thread float *tl_buf = NULL;
static __thread size_t tl_cap = 0;
static float *scratch(size_t nfloats) {
    if (nfloats > tl_cap) {
        free(tl_buf);
        size_t cap = nfloats + nfloats / 4 + 1024;
        tl_buf = (float *)aligned_alloc(64, ((cap * sizeof(float) + 63) / 64) * 64);
        tl_cap = tl_buf ? cap : 0;
    }
    return tl_buf;
}

typedef struct {
    const void *x; int x_dt; int64_t x_stride;   /* x rows: batch x in (row stride in elements) */
    const uint8_t *packed; int k; int64_t out, in, in_pad, nb, ntiles;
    const float *g;      /* [k][out_pad], fp32, zero-padded */
    const float *h;      /* [k][in_pad], fp32, zero-padded */
    const float *bias;   /* [out_pad] or NULL */
    void *y; int y_dt; int64_t y_stride;
    float *tables;       /* [bchunk][k][in_pad/4][16] */
    int64_t b0, nbatch;  /* current batch chunk */
} job_t;

/* a_j = h_p[j] * x_b[j] for one group of 4 inputs */
static inline void group_inputs(const job_t *J, int64_t b, int p, int64_t q, float a[4]) {
    const float *h = J->h + (int64_t)p * J->in_pad;
    const char *xr = (const char *)J->x + (b * J->x_stride) * (J->x_dt == DT_F32 ? 4 : 2);
    for (int j = 0; j < 4; j++) {
        int64_t col = 4 * q + j;
        a[j] = col < J->in ? h[col] * ld(xr, J->x_dt, col) : 0.0f;
    }
}

/* ------------------------------------------------------------------ scalar path */
static void build_tables_scalar(const job_t *J, int64_t lo, int64_t hi) {
    int64_t ng = J->in_pad / 4;
    for (int64_t it = lo; it < hi; it++) {   /* it over (b, p, q) */
        int64_t q = it % ng, bp = it / ng;
        int p = (int)(bp % J->k);
        int64_t b = bp / J->k;
        float a[4];
        group_inputs(J, J->b0 + b, p, q, a);
        float *T = J->tables + it * 16;
        for (int m = 0; m < 16; m++) {
            float t = (m & 1) ? a[0] : -a[0];
            t += (m & 2) ? a[1] : -a[1];
            t += (m & 4) ? a[2] : -a[2];
            t += (m & 8) ? a[3] : -a[3];
            T[m] = t;
        }
    }
}

static void tiles_scalar(const job_t *J, int64_t t0, int64_t t1) {
    int64_t ng = J->in_pad / 4, nb = J->nb;
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t b = 0; b < J->nbatch; b++) {
            float yv[TILE] = {0};
            for (int p = 0; p < J->k; p++) {
                const uint8_t *P = J->packed + ((int64_t)p * J->ntiles + t) * nb * TILE;
                const float *T = J->tables + ((b * J->k) + p) * ng * 16;
                float acc[TILE] = {0};
                for (int64_t c = 0; c < nb; c++) {
                    const float *tl = T + 32 * c, *th = tl + 16;
                    for (int r = 0; r < TILE; r++) {
                        uint8_t v = P[c * TILE + r];
                        acc[r] += tl[v & 15] + th[v >> 4];
                    }
                }
                const float *g = J->g + (int64_t)p * (J->ntiles * TILE) + t * TILE;
                for (int r = 0; r < TILE; r++) yv[r] += g[r] * acc[r];
            }
            int64_t bb = J->b0 + b;
            for (int r = 0; r < TILE; r++) {
                int64_t row = t * TILE + r;
                if (row >= J->out) break;
                float v = yv[r] + (J->bias ? J->bias[row] : 0.0f);
                st(J->y, J->y_dt, bb * J->y_stride + row, v);
            }
        }
    }
}

static void store_tile(const job_t *J, int64_t b, int64_t t, const float *v) {
    int64_t bb = J->b0 + b;
    for (int r = 0; r < TILE; r++) {
        int64_t row = t * TILE + r;
        if (row >= J->out) break;
        st(J->y, J->y_dt, bb * J->y_stride + row, v[r]);
    }
}

#ifdef RABIT_X86
/* ------------------------------------------------------------------ AVX2 path */
#define AVX2_ATTR __attribute__((target("avx2,fma")))

AVX2_ATTR static void build_tables_avx2(const job_t *J, int64_t lo, int64_t hi) {
    int64_t ng = J->in_pad / 4;
    const __m256 s0 = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
    const __m256 s1 = _mm256_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1);
    const __m256 s2 = _mm256_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1);
    for (int64_t it = lo; it < hi; it++) {
        int64_t q = it % ng, bp = it / ng;
        int p = (int)(bp % J->k);
        int64_t b = bp / J->k;
        float a[4];
        group_inputs(J, J->b0 + b, p, q, a);
        __m256 t = _mm256_mul_ps(s0, _mm256_set1_ps(a[0]));
        t = _mm256_fmadd_ps(s1, _mm256_set1_ps(a[1]), t);
        t = _mm256_fmadd_ps(s2, _mm256_set1_ps(a[2]), t);
        __m256 a3 = _mm256_set1_ps(a[3]);
        float *T = J->tables + it * 16;
        _mm256_store_ps(T, _mm256_sub_ps(t, a3));
        _mm256_store_ps(T + 8, _mm256_add_ps(t, a3));
    }
}

/* 8 rows (one half of a tile), one path: returns sum over inputs */
AVX2_ATTR static inline __m256 lut8_avx2(const uint8_t *P, const float *T, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t c = 0; c < nb; c++) {
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(P + c * TILE)));
        const float *tl = T + 32 * c;
        __m256 l0 = _mm256_load_ps(tl), l1 = _mm256_load_ps(tl + 8);
        __m256 h0 = _mm256_load_ps(tl + 16), h1 = _mm256_load_ps(tl + 24);
        __m256i ih = _mm256_srli_epi32(idx, 4);
        __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l0, idx), _mm256_permutevar8x32_ps(l1, idx),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(h0, ih), _mm256_permutevar8x32_ps(h1, ih),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(idx, 24)));
        acc0 = _mm256_add_ps(acc0, vl);
        acc1 = _mm256_add_ps(acc1, vh);
    }
    return _mm256_add_ps(acc0, acc1);
}

AVX2_ATTR static void tiles_avx2(const job_t *J, int64_t t0, int64_t t1) {
    int64_t ng = J->in_pad / 4, nb = J->nb, out_pad = J->ntiles * TILE;
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t b = 0; b < J->nbatch; b++) {
            __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
            for (int p = 0; p < J->k; p++) {
                const uint8_t *P = J->packed + ((int64_t)p * J->ntiles + t) * nb * TILE;
                const float *T = J->tables + ((b * J->k) + p) * ng * 16;
                const float *g = J->g + p * out_pad + t * TILE;
                y0 = _mm256_fmadd_ps(_mm256_loadu_ps(g), lut8_avx2(P, T, nb), y0);
                y1 = _mm256_fmadd_ps(_mm256_loadu_ps(g + 8), lut8_avx2(P + 8, T, nb), y1);
            }
            if (J->bias) {
                y0 = _mm256_add_ps(y0, _mm256_loadu_ps(J->bias + t * TILE));
                y1 = _mm256_add_ps(y1, _mm256_loadu_ps(J->bias + t * TILE + 8));
            }
            int64_t row0 = t * TILE;
            if (J->y_dt == DT_F32 && row0 + TILE <= J->out) {
                float *yp = (float *)J->y + (J->b0 + b) * J->y_stride + row0;
                _mm256_storeu_ps(yp, y0); _mm256_storeu_ps(yp + 8, y1);
            } else {
                float v[TILE];
                _mm256_storeu_ps(v, y0); _mm256_storeu_ps(v + 8, y1);
                store_tile(J, b, t, v);
            }
        }
    }
}

/* ------------------------------------------------------------------ AVX-512 path */
#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

AVX512_ATTR static void build_tables_avx512(const job_t *J, int64_t lo, int64_t hi) {
    int64_t ng = J->in_pad / 4;
    const __m512 s0 = _mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
    const __m512 s1 = _mm512_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1);
    const __m512 s2 = _mm512_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1);
    const __m512 s3 = _mm512_setr_ps(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int64_t it = lo; it < hi; it++) {
        int64_t q = it % ng, bp = it / ng;
        int p = (int)(bp % J->k);
        int64_t b = bp / J->k;
        float a[4];
        if (J->x_dt == DT_F32 && 4 * q + 4 <= J->in) {
            const float *xr = (const float *)J->x + (J->b0 + b) * J->x_stride + 4 * q;
            const float *h = J->h + (int64_t)p * J->in_pad + 4 * q;
            a[0] = h[0] * xr[0]; a[1] = h[1] * xr[1]; a[2] = h[2] * xr[2]; a[3] = h[3] * xr[3];
        } else {
            group_inputs(J, J->b0 + b, p, q, a);
        }
        __m512 t = _mm512_mul_ps(s0, _mm512_set1_ps(a[0]));
        t = _mm512_fmadd_ps(s1, _mm512_set1_ps(a[1]), t);
        t = _mm512_fmadd_ps(s2, _mm512_set1_ps(a[2]), t);
        t = _mm512_fmadd_ps(s3, _mm512_set1_ps(a[3]), t);
        _mm512_store_ps(J->tables + it * 16, t);
    }
}

/* NT tiles (16 rows each, consecutive), one path, one batch row: acc[i] += partial sums */
#define LUT512_BODY(NT)                                                                        \
    for (int64_t c = 0; c < nb; c++) {                                                         \
        __m512 tl = _mm512_load_ps(T + 32 * c), th = _mm512_load_ps(T + 32 * c + 16);         \
        for (int i = 0; i < NT; i++) {                                                         \
            __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(P + i * tstride + c * TILE))); \
            a0[i] = _mm512_add_ps(a0[i], _mm512_permutexvar_ps(idx, tl));                     \
            a1[i] = _mm512_add_ps(a1[i], _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), th)); \
        }                                                                                      \
    }

AVX512_ATTR static inline void tilegroup_avx512(const job_t *J, int64_t t, int nt) {
    int64_t ng = J->in_pad / 4, nb = J->nb, out_pad = J->ntiles * TILE, tstride = nb * TILE;
    for (int64_t b = 0; b < J->nbatch; b++) {
        __m512 y[TG];
        for (int i = 0; i < TG; i++) y[i] = _mm512_setzero_ps();
        for (int p = 0; p < J->k; p++) {
            const uint8_t *P = J->packed + ((int64_t)p * J->ntiles + t) * tstride;
            const float *T = J->tables + ((b * J->k) + p) * ng * 16;
            __m512 a0[TG], a1[TG];
            for (int i = 0; i < TG; i++) { a0[i] = _mm512_setzero_ps(); a1[i] = _mm512_setzero_ps(); }
            if (nt == TG) { LUT512_BODY(TG) } else { LUT512_BODY(1) }
            const float *g = J->g + p * out_pad + t * TILE;
            for (int i = 0; i < nt; i++)
                y[i] = _mm512_fmadd_ps(_mm512_loadu_ps(g + i * TILE), _mm512_add_ps(a0[i], a1[i]), y[i]);
        }
        for (int i = 0; i < nt; i++) {
            int64_t row0 = (t + i) * TILE;
            if (J->bias) y[i] = _mm512_add_ps(y[i], _mm512_loadu_ps(J->bias + row0));
            if (J->y_dt == DT_F32) {
                int64_t n = J->out - row0;
                __mmask16 m = n >= TILE ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
                _mm512_mask_storeu_ps((float *)J->y + (J->b0 + b) * J->y_stride + row0, m, y[i]);
            } else {
                float v[TILE];
                _mm512_storeu_ps(v, y[i]);
                store_tile(J, b, t + i, v);
            }
        }
    }
}

AVX512_ATTR static void tiles_avx512(const job_t *J, int64_t t0, int64_t t1) {
    int64_t t = t0;
    for (; t + TG <= t1; t += TG) tilegroup_avx512(J, t, TG);
    for (; t < t1; t++) tilegroup_avx512(J, t, 1);
}

AVX512_ATTR static void dense_rows_avx512(const uint8_t *packed, int k, int64_t ntiles, int64_t nb, int64_t in,
                                          const float *g, const float *h, int64_t in_pad, float *W,
                                          int64_t r0, int64_t r1) {
    int64_t out_pad = ntiles * TILE;
    for (int64_t r = r0; r < r1; r++) {
        float *w = W + r * in;
        int64_t t = r / TILE, rr = r % TILE;
        for (int p = 0; p < k; p++) {
            const uint8_t *P = packed + ((int64_t)p * ntiles + t) * nb * TILE + rr;
            __m512 gv = _mm512_set1_ps(g[p * out_pad + r]);
            const float *hp = h + (int64_t)p * in_pad;
            for (int64_t c = 0; c < nb; c += 2) {
                int64_t col = 8 * c;
                if (col >= in) break;
                __mmask16 m = (__mmask16)(P[c * TILE] | ((uint32_t)P[(c + 1) * TILE] << 8));
                __m512 v = _mm512_mul_ps(gv, _mm512_load_ps(hp + col));
                v = _mm512_mask_blend_ps(m, _mm512_sub_ps(_mm512_setzero_ps(), v), v);
                int64_t n = in - col;
                __mmask16 lm = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
                __m512 wv = p ? _mm512_maskz_loadu_ps(lm, w + col) : _mm512_setzero_ps();
                _mm512_mask_storeu_ps(w + col, lm, _mm512_add_ps(wv, v));
            }
        }
    }
}
#endif /* RABIT_X86 */

static void dense_rows_scalar(const uint8_t *packed, int k, int64_t ntiles, int64_t nb, int64_t in,
                              const float *g, const float *h, int64_t in_pad, float *W, int64_t r0, int64_t r1) {
    int64_t out_pad = ntiles * TILE;
    for (int64_t r = r0; r < r1; r++) {
        float *w = W + r * in;
        int64_t t = r / TILE, rr = r % TILE;
        for (int64_t j = 0; j < in; j++) w[j] = 0.0f;
        for (int p = 0; p < k; p++) {
            const uint8_t *P = packed + ((int64_t)p * ntiles + t) * nb * TILE + rr;
            float gr = g[p * out_pad + r];
            const float *hp = h + (int64_t)p * in_pad;
            for (int64_t j = 0; j < in; j++) {
                float v = gr * hp[j];
                w[j] += ((P[(j >> 3) * TILE] >> (j & 7)) & 1) ? v : -v;
            }
        }
    }
}

/* ------------------------------------------------------------------ dispatch */
static int cpu_isa(void) {
#ifdef RABIT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

static int pick_isa(int want) {
    int best = cpu_isa();
    if (want == ISA_AUTO || want > best) return best;
    return want;
}

RABIT_API int rabit_cpu_isa(void) { return cpu_isa(); }

RABIT_API int rabit_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int64_t pad_in(int64_t in) { int64_t p = (in + 31) / 32 * 32; return p < 32 ? 32 : p; }

/* convert a (k x n) matrix of scales into fp32 zero-padded rows of length npad */
static void load_scales(const void *src, int dt, int k, int64_t n, int64_t npad, float *dst) {
    for (int p = 0; p < k; p++) {
        for (int64_t i = 0; i < n; i++) dst[p * npad + i] = ld(src, dt, (int64_t)p * n + i);
        for (int64_t i = n; i < npad; i++) dst[p * npad + i] = 0.0f;
    }
}

/*
 * y[b, :out] = sum_p g[p] * (B_p (h[p] * x[b])) + bias   for b < batch.
 * x: batch rows of `in` elements, row stride x_stride (elements), dtype x_dt.  y: row stride y_stride, dtype y_dt.
 * g: (k, out) contiguous, h: (k, in) contiguous, bias: (out,) or NULL.  Returns 0 on success.
 */
RABIT_API int rabit_gemm(const void *x, int x_dt, int64_t batch, int64_t x_stride,
                         const uint8_t *packed, int k, int64_t out, int64_t in,
                         const void *g, int g_dt, const void *h, int h_dt, const void *bias, int bias_dt,
                         void *y, int y_dt, int64_t y_stride, int nthreads, int isa_req) {
    if (k < 1 || out < 1 || in < 1 || batch < 0) return 1;
    if (batch == 0) return 0;
    int isa = pick_isa(isa_req);
    int64_t in_pad = pad_in(in), ntiles = (out + TILE - 1) / TILE, out_pad = ntiles * TILE;
    int64_t ng = in_pad / 4;
    int64_t bchunk = batch < BCHUNK ? batch : BCHUNK;
    size_t n_g = (size_t)k * out_pad, n_h = (size_t)k * in_pad, n_b = bias ? (size_t)out_pad : 0;
    size_t off_h = (n_g + 15) / 16 * 16, off_b = off_h + (n_h + 15) / 16 * 16;
    size_t off_t = off_b + (n_b + 15) / 16 * 16;
    size_t n_t = (size_t)bchunk * k * ng * 16;
    float *buf = scratch(off_t + n_t);
    if (!buf) return 2;
    float *gf = buf, *hf = buf + off_h, *bf = bias ? buf + off_b : NULL;
    load_scales(g, g_dt, k, out, out_pad, gf);
    load_scales(h, h_dt, k, in, in_pad, hf);
    if (bias) load_scales(bias, bias_dt, 1, out, out_pad, bf);

    job_t J = {x, x_dt, x_stride, packed, k, out, in, in_pad, in_pad / 8, ntiles, gf, hf, bf,
               y, y_dt, y_stride, buf + off_t, 0, 0};

    /* small problems: no threads (fork/join costs more than the work) */
    int nt = nthreads < 1 ? 1 : nthreads;
    double work = (double)k * out_pad * in_pad * bchunk;
    if (work < 256.0 * 1024.0) nt = 1;
    if (nt > ntiles) nt = (int)ntiles;
    int64_t ntg = (ntiles + TG - 1) / TG;   /* work items: groups of TG tiles */

    for (int64_t b0 = 0; b0 < batch; b0 += bchunk) {
        J.b0 = b0;
        J.nbatch = batch - b0 < bchunk ? batch - b0 : bchunk;
        int64_t nitems = J.nbatch * k * ng;
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int tid = 0, nth = 1;
#ifdef _OPENMP
            tid = omp_get_thread_num(); nth = omp_get_num_threads();
#endif
            int64_t lo = nitems * tid / nth, hi = nitems * (tid + 1) / nth;
#ifdef RABIT_X86
            if (isa == ISA_AVX512) build_tables_avx512(&J, lo, hi);
            else if (isa == ISA_AVX2) build_tables_avx2(&J, lo, hi);
            else
#endif
                build_tables_scalar(&J, lo, hi);
#pragma omp barrier
            int64_t g0 = ntg * tid / nth, g1 = ntg * (tid + 1) / nth;
            int64_t t0 = g0 * TG, t1 = g1 * TG < ntiles ? g1 * TG : ntiles;
#ifdef RABIT_X86
            if (isa == ISA_AVX512) tiles_avx512(&J, t0, t1);
            else if (isa == ISA_AVX2) tiles_avx2(&J, t0, t1);
            else
#endif
                tiles_scalar(&J, t0, t1);
        }
    }
    return 0;
}

/* W (out x in, fp32, row-major) = sum_p g_p[:,None] * B_p * h_p[None,:] */
RABIT_API int rabit_dense_weight(const uint8_t *packed, int k, int64_t out, int64_t in,
                                 const void *g, int g_dt, const void *h, int h_dt,
                                 float *W, int nthreads, int isa_req) {
    if (k < 1 || out < 1 || in < 1) return 1;
    int isa = pick_isa(isa_req);
    int64_t in_pad = pad_in(in), ntiles = (out + TILE - 1) / TILE, out_pad = ntiles * TILE;
    size_t off_h = ((size_t)k * out_pad + 15) / 16 * 16;
    float *buf = scratch(off_h + (size_t)k * in_pad);
    if (!buf) return 2;
    float *gf = buf, *hf = buf + off_h;
    load_scales(g, g_dt, k, out, out_pad, gf);
    load_scales(h, h_dt, k, in, in_pad, hf);
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)k * out * in < 256.0 * 1024.0) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num(); nth = omp_get_num_threads();
#endif
        int64_t r0 = out * tid / nth, r1 = out * (tid + 1) / nth;
#ifdef RABIT_X86
        if (isa == ISA_AVX512) dense_rows_avx512(packed, k, ntiles, in_pad / 8, in, gf, hf, in_pad, W, r0, r1);
        else
#endif
            dense_rows_scalar(packed, k, ntiles, in_pad / 8, in, gf, hf, in_pad, W, r0, r1);
    }
    return 0;
}
