/*
 * Causal self-attention forward (prefill: as many queries as keys) on bf16 queries, keys and values, for the passes
 * that need no gradient: perplexity windows and the block stage's forward passes.  torch's CPU flash-attention
 * kernel took 56 % of a 2048-token forward of the default model on a 2-core Zen 5 (36 ms a layer: ~140 GFLOP/s, where
 * the same machine's bf16 matmuls run at ~750) and ~19 % of the block stage (docs/RESULTS.md section 48).
 *
 * Flash-attention order: per (batch, query head, block of QB queries), the key blocks up to the diagonal; scores
 * S = scale * Q K^T in fp32, an online softmax (running maximum and sum per query), P rounded to bf16 (as torch's
 * kernel does for bf16 inputs), O += P V in fp32, O / sum written out in bf16.  Keys and values are first repacked
 * per (batch, key head) so that AVX-512 BF16's dot product of bf16 pairs (vdpbf16ps) reads them in order:
 *   K as [key/16][d/2][16 keys][2 d]   (S: 16 keys per vector, one query's d pair broadcast)
 *   V as [key/2][d/16][16 d][2 keys]   (O: 16 d per vector, one query's pair of P values broadcast)
 * Grouped-query attention: query head h reads key head h / (Hq / Hkv).  Padded keys (T rounded up to the key
 * block) are zero and masked.
 *
 * Paths: AVX-512 BF16 (chosen when the CPU has it), AVX2 + FMA (CPUs without it, e.g. Zen 3: the same packed keys
 * and values, each bf16 pair widened to two fp32 vectors by a shift and a mask, the queries widened once per task,
 * P kept as fp32 values rounded to bf16 in place of S) and portable C with the same blocking and rounding points
 * (for tests, and for `isa` 1).  The caller checks the shapes (head size a multiple of 32).  OpenMP threads over the
 * (batch, head, query block) tasks, the longest (last) query blocks first.  Returns 0, or -1 when out of memory.
 *
 * fp32 inputs (att_causal_f32: CPUs without native bf16 run the job's passes in fp32) have their own packing (K as
 * [key/16][d][16 keys], V as rows), fp32 throughout with no rounding to bf16, on AVX2 + FMA (4 queries x 16 keys,
 * then 4 queries x 16 d a tile) or portable C; the blocking, online softmax and task order are the bf16 paths'.
 * An AVX-512 F version (4 x 64 tiles) was slower than this AVX2 one on Zen 5 (docs/RESULTS.md section 50).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rabit_exp.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "rabit_simd.h"
#define ATT_X86 1
#define BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#define AVX2_ATTR __attribute__((target("avx2,fma")))
#endif

#define ATT_API __attribute__((visibility("default")))
#define QB 64   /* queries per task */
#define KB 64   /* keys per block: S is QB x KB fp32 (16 KB) */
#define DMAX 256
/* equal blocks: a task's last key block starts at its first query, so no query's block is wholly masked */
_Static_assert(QB == KB, "the online softmax assumes QB == KB");

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX512BF16 = 2, ISA_AVX2 = 3 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, as torch (NaN kept quiet) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    int64_t qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, osb, osh, ost;
    int64_t B, Hq, Hkv, T, D, Tpad;
    float scale;
    uint16_t *kp, *vp;   /* packed keys and values, Tpad * D each per (batch, key head) */
    int f32;             /* fp32 inputs and output: q, k, v, out, kp and vp point to floats (the fp32 paths) */
} Attn;

/* Repacks one (batch, key head)'s keys and values into the layouts above; rows past T are zero. */
static void pack_kv(const Attn *a, int64_t b, int64_t h) {
    const int64_t D = a->D, Tp = a->Tpad;
    uint16_t *kp = a->kp + (b * a->Hkv + h) * Tp * D, *vp = a->vp + (b * a->Hkv + h) * Tp * D;
    const uint16_t *k = a->k + b * a->ksb + h * a->ksh, *v = a->v + b * a->vsb + h * a->vsh;
    for (int64_t j = 0; j < Tp; j++) {
        const uint16_t *kr = j < a->T ? k + j * a->kst : NULL, *vr = j < a->T ? v + j * a->vst : NULL;
        /* K: block j/16, lane j%16; element (dp, lane, e) at ((j/16) * D/2 + dp) * 32 + lane * 2 + e */
        uint16_t *kb = kp + (j / 16) * 16 * D + (j % 16) * 2;
        for (int64_t dp = 0; dp < D / 2; dp++) {
            kb[dp * 32] = kr ? kr[2 * dp] : 0;
            kb[dp * 32 + 1] = kr ? kr[2 * dp + 1] : 0;
        }
        /* V: pair j/2, element (d16, lane, e) at ((j/2) * D/16 + d/16) * 32 + (d%16) * 2 + j%2 */
        uint16_t *vb = vp + (j / 2) * 2 * D + (j % 2);
        for (int64_t d = 0; d < D; d++) vb[(d / 16) * 32 + (d % 16) * 2] = vr ? vr[d] : 0;
    }
}

/* The fp32 paths' packing of one (batch, key head): K as [key/16][D][16 keys] (S: 16 keys per vector, one query
 * element broadcast), V as rows [key][D] (O: D values per row, one P value broadcast); rows past T are zero. */
static void pack_kv_f32(const Attn *a, int64_t b, int64_t h) {
    const int64_t D = a->D, Tp = a->Tpad;
    float *kp = (float *)a->kp + (b * a->Hkv + h) * Tp * D, *vp = (float *)a->vp + (b * a->Hkv + h) * Tp * D;
    const float *k = (const float *)a->k + b * a->ksb + h * a->ksh, *v = (const float *)a->v + b * a->vsb + h * a->vsh;
    for (int64_t j = 0; j < Tp; j++) {
        float *kb = kp + (j / 16) * 16 * D + (j % 16);
        if (j < a->T) {
            for (int64_t d = 0; d < D; d++) kb[d * 16] = k[j * a->kst + d];
            memcpy(vp + j * D, v + j * a->vst, (size_t)D * sizeof(float));
        } else {
            for (int64_t d = 0; d < D; d++) kb[d * 16] = 0.0f;
            memset(vp + j * D, 0, (size_t)D * sizeof(float));
        }
    }
}

/* ---- portable C: the same blocking and rounding points as the AVX-512 BF16 path ---- */

/* S[i][j] = scale * sum_d q_i[d] k_j[d] for QB x KB, products of bf16 values summed in fp32 */
static void scores_c(const Attn *a, const uint16_t *q, int64_t rows, const uint16_t *kblk, float *S) {
    const int64_t D = a->D;
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *qi = q + i * a->qst;
        for (int64_t j = 0; j < KB; j++) {
            const uint16_t *kb = kblk + (j / 16) * 16 * D + (j % 16) * 2;
            float s = 0.0f;
            for (int64_t dp = 0; dp < D / 2; dp++)
                s += bf16_to_f32(qi[2 * dp]) * bf16_to_f32(kb[dp * 32]) +
                     bf16_to_f32(qi[2 * dp + 1]) * bf16_to_f32(kb[dp * 32 + 1]);
            S[i * KB + j] = s * a->scale;
        }
    }
}

/* O[i] += sum_j P[i][j] v_j over a key block (P in bf16) */
static void pv_c(const Attn *a, const uint16_t *P, int64_t rows, const uint16_t *vblk, float *O) {
    const int64_t D = a->D;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t d = 0; d < D; d++) {
            float s = 0.0f;
            for (int64_t jp = 0; jp < KB / 2; jp++) {
                const uint16_t *vb = vblk + jp * 2 * D + (d / 16) * 32 + (d % 16) * 2;
                s += bf16_to_f32(P[i * KB + 2 * jp]) * bf16_to_f32(vb[0]) +
                     bf16_to_f32(P[i * KB + 2 * jp + 1]) * bf16_to_f32(vb[1]);
            }
            O[i * D + d] += s;
        }
}

/* The online softmax over one key block: keys past `limit[i]` (the query's own position) are masked.  m, l: the
 * running maximum and sum; O's row is rescaled when the maximum grows.  P: exp(S - m) in bf16, or (P NULL, the
 * fp32 paths) left in S in fp32. */
static void softmax_block(const Attn *a, float *S, int64_t rows, int64_t j0, int64_t q0, float *m, float *l,
                          float *O, uint16_t *P) {
    const int64_t D = a->D;
    for (int64_t i = 0; i < rows; i++) {
        float *s = S + i * KB;
        const int64_t last = q0 + i - j0;   /* the last key (within the block) query q0 + i sees */
        const int64_t n = last + 1 < KB ? last + 1 : KB;
        float mx = m[i];
        for (int64_t j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        const float alpha = m[i] == -INFINITY ? 0.0f : exp_nonpos(m[i] - mx);
        float sum = 0.0f;
        for (int64_t j = 0; j < KB; j++) {
            float p = j < n ? exp_nonpos(s[j] - mx) : 0.0f;
            if (P) {
                uint16_t pb = f32_to_bf16(p);
                P[i * KB + j] = pb;
                p = bf16_to_f32(pb);   /* the sum of what O adds up: the weights normalize exactly */
            } else {
                s[j] = p;
            }
            sum += p;
        }
        l[i] = l[i] * alpha + sum;
        m[i] = mx;
        if (alpha != 1.0f)
            for (int64_t d = 0; d < D; d++) O[i * D + d] *= alpha;
    }
}

/* ---- portable C on fp32 inputs: the fp32 paths' blocking, no rounding to bf16 anywhere ---- */

static void scores_f32_c(const Attn *a, const float *q, int64_t rows, const float *kblk, float *S) {
    const int64_t D = a->D;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < KB; j++) {
            const float *kb = kblk + (j / 16) * 16 * D + (j % 16);
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) s += q[i * a->qst + d] * kb[d * 16];
            S[i * KB + j] = s * a->scale;
        }
}

static void pv_f32_c(const Attn *a, const float *P, int64_t rows, const float *vblk, float *O) {
    const int64_t D = a->D;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < KB; j++) {
            const float p = P[i * KB + j];
            for (int64_t d = 0; d < D; d++) O[i * D + d] += p * vblk[j * D + d];
        }
}

#ifdef ATT_X86
static BF16_ATTR inline __m512 exp_nonpos512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    __m512 s = _mm512_castsi512_ps(e);
    __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LE_OQ);
    return _mm512_maskz_mul_ps(~under, p, s);
}

/* S = scale * Q K^T for `rows` queries (any) and KB keys: 4 queries x 64 keys a tile, 16 accumulators */
static BF16_ATTR void scores_bf16(const Attn *a, const uint16_t *q, int64_t rows, const uint16_t *kblk, float *S) {
    const int64_t D = a->D, H = D / 2;
    const __m512 sc = _mm512_set1_ps(a->scale);
    for (int64_t i0 = 0; i0 < rows; i0 += 4) {
        const int64_t nr = rows - i0 < 4 ? rows - i0 : 4;
        const uint32_t *qr[4];
        for (int r = 0; r < 4; r++) qr[r] = (const uint32_t *)(q + (i0 + (r < nr ? r : 0)) * a->qst);
        __m512 acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t dp = 0; dp < H; dp++) {
            __m512bh kv[4];
            for (int c = 0; c < 4; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kblk + (c * H + dp) * 32);
            for (int r = 0; r < 4; r++) {
                __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qr[r][dp]);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
            }
        }
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(S + (i0 + r) * KB + c * 16, _mm512_mul_ps(acc[r][c], sc));
    }
}

/* The online softmax (as softmax_block) with 16-lane vectors */
static BF16_ATTR void softmax_bf16(const Attn *a, float *S, int64_t rows, int64_t j0, int64_t q0, float *m, float *l,
                                   float *O, uint16_t *P) {
    const int64_t D = a->D;
    for (int64_t i = 0; i < rows; i++) {
        float *s = S + i * KB;
        const int64_t last = q0 + i - j0;
        const int64_t n = last + 1 < KB ? last + 1 : KB;
        __m512 v[4];
        __m512 vmx = _mm512_set1_ps(m[i]);
        for (int c = 0; c < 4; c++) {
            int64_t lanes = n - c * 16;
            __mmask16 keep = lanes >= 16 ? (__mmask16)0xffff : lanes <= 0 ? 0 : (__mmask16)((1u << lanes) - 1);
            v[c] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep, s + c * 16);
            vmx = _mm512_max_ps(vmx, v[c]);
        }
        const float mx = _mm512_reduce_max_ps(vmx);
        const float alpha = m[i] == -INFINITY ? 0.0f : exp_nonpos(m[i] - mx);
        const __m512 vm = _mm512_set1_ps(mx);
        __m512 vs = _mm512_setzero_ps();
        for (int c = 0; c < 2; c++) {
            __m512 p0 = exp_nonpos512(_mm512_sub_ps(v[2 * c], vm));
            __m512 p1 = exp_nonpos512(_mm512_sub_ps(v[2 * c + 1], vm));
            __m512bh pb = _mm512_cvtne2ps_pbh(p1, p0);   /* p0 in the low half: keys in order */
            _mm512_storeu_si512(P + i * KB + c * 32, (__m512i)pb);
            /* the bf16 values widened back: the normalizer sums what O adds up */
            __m512i w = (__m512i)pb;
            __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
            __m512 hi = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
            vs = _mm512_add_ps(vs, _mm512_add_ps(lo, hi));
        }
        l[i] = l[i] * alpha + _mm512_reduce_add_ps(vs);
        m[i] = mx;
        if (alpha != 1.0f) {
            const __m512 va = _mm512_set1_ps(alpha);
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps(O + i * D + d, _mm512_mul_ps(_mm512_loadu_ps(O + i * D + d), va));
        }
    }
}

/* O += P V for `rows` queries over KB keys: 4 queries x 64 d a tile */
static BF16_ATTR void pv_bf16(const Attn *a, const uint16_t *P, int64_t rows, const uint16_t *vblk, float *O) {
    const int64_t D = a->D, D16 = D / 16;
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int nc = (int)((D - d0) / 16 < 4 ? (D - d0) / 16 : 4);
        for (int64_t i0 = 0; i0 < rows; i0 += 4) {
            const int64_t nr = rows - i0 < 4 ? rows - i0 : 4;
            const uint32_t *pr[4];
            for (int r = 0; r < 4; r++) pr[r] = (const uint32_t *)(P + (i0 + (r < nr ? r : 0)) * KB);
            __m512 acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
            for (int64_t jp = 0; jp < KB / 2; jp++) {
                __m512bh vv[4];
                for (int c = 0; c < nc; c++)
                    vv[c] = (__m512bh)_mm512_loadu_si512(vblk + (jp * D16 + d0 / 16 + c) * 32);
                for (int r = 0; r < 4; r++) {
                    __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pr[r][jp]);
                    for (int c = 0; c < nc; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
                }
            }
            for (int r = 0; r < nr; r++)
                for (int c = 0; c < nc; c++) {
                    float *o = O + (i0 + r) * D + d0 + c * 16;
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[r][c]));
                }
        }
    }
}

/* ---- AVX2 + FMA: 8-lane fp32 vectors on the same packed keys and values ---- */

static AVX2_ATTR inline __m256 exp_nonpos256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LE_OQ);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* bf16 pairs in 32-bit lanes as fp32: the element at the lower address (low half), the one above it (high half) */
static AVX2_ATTR inline __m256 pair_lo(__m256i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
static AVX2_ATTR inline __m256 pair_hi(__m256i x) {
    return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000u)));
}

/* S = scale * Q K^T from the fp32 queries Qf (rows x D): 4 queries x 16 keys a tile, 8 accumulators */
static AVX2_ATTR void scores_avx2(const Attn *a, const float *Qf, int64_t rows, const uint16_t *kblk, float *S) {
    const int64_t D = a->D, H = D / 2;
    const __m256 sc = _mm256_set1_ps(a->scale);
    for (int64_t i0 = 0; i0 < rows; i0 += 4) {
        const int64_t nr = rows - i0 < 4 ? rows - i0 : 4;
        const float *qr[4];
        for (int r = 0; r < 4; r++) qr[r] = Qf + (i0 + (r < nr ? r : 0)) * D;
        for (int c = 0; c < KB / 16; c++) {
            __m256 acc[4][2];
            for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            const uint16_t *kc = kblk + c * H * 32;
            for (int64_t dp = 0; dp < H; dp++) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(kc + dp * 32));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(kc + dp * 32 + 16));
                const __m256 k0e = pair_lo(x0), k0o = pair_hi(x0), k1e = pair_lo(x1), k1o = pair_hi(x1);
                for (int r = 0; r < 4; r++) {
                    const __m256 qe = _mm256_broadcast_ss(qr[r] + 2 * dp), qo = _mm256_broadcast_ss(qr[r] + 2 * dp + 1);
                    acc[r][0] = _mm256_fmadd_ps(qo, k0o, _mm256_fmadd_ps(qe, k0e, acc[r][0]));
                    acc[r][1] = _mm256_fmadd_ps(qo, k1o, _mm256_fmadd_ps(qe, k1e, acc[r][1]));
                }
            }
            for (int r = 0; r < nr; r++) {
                _mm256_storeu_ps(S + (i0 + r) * KB + c * 16, _mm256_mul_ps(acc[r][0], sc));
                _mm256_storeu_ps(S + (i0 + r) * KB + c * 16 + 8, _mm256_mul_ps(acc[r][1], sc));
            }
        }
    }
}

/* The online softmax (as softmax_block), P written over S as fp32 values, rounded to bf16 where `round_p` (the bf16
 * path, as torch's bf16 kernel) and left in fp32 otherwise (the fp32 path) */
static AVX2_ATTR void softmax_avx2(const Attn *a, float *S, int64_t rows, int64_t j0, int64_t q0, float *m, float *l,
                                   float *O, int round_p) {
    const int64_t D = a->D;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t i = 0; i < rows; i++) {
        float *s = S + i * KB;
        const int64_t last = q0 + i - j0;
        const int n = (int)(last + 1 < KB ? last + 1 : KB);
        __m256 v[KB / 8];
        __m256 vmx = _mm256_set1_ps(m[i]);
        for (int c = 0; c < KB / 8; c++) {
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8 * c), lane));
            v[c] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + 8 * c), keep);
            vmx = _mm256_max_ps(vmx, v[c]);
        }
        const float mx = hmax8(vmx);
        const float alpha = m[i] == -INFINITY ? 0.0f : exp_nonpos(m[i] - mx);
        const __m256 vm = _mm256_set1_ps(mx);
        const __m256i half = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
        const __m256i top = _mm256_set1_epi32((int)0xffff0000u);
        __m256 vs = _mm256_setzero_ps();
        for (int c = 0; c < KB / 8; c++) {
            __m256 p = exp_nonpos256(_mm256_sub_ps(v[c], vm));
            if (round_p) {   /* round to nearest even bf16 (p is finite and in [0, 1]), kept as fp32 */
                __m256i u = _mm256_castps_si256(p);
                u = _mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
                p = _mm256_castsi256_ps(_mm256_and_si256(u, top));
            }
            _mm256_storeu_ps(s + 8 * c, p);
            vs = _mm256_add_ps(vs, p);
        }
        l[i] = l[i] * alpha + hsum8(vs);
        m[i] = mx;
        if (alpha != 1.0f) {
            const __m256 va = _mm256_set1_ps(alpha);
            for (int64_t d = 0; d < D; d += 8)
                _mm256_storeu_ps(O + i * D + d, _mm256_mul_ps(_mm256_loadu_ps(O + i * D + d), va));
        }
    }
}

/* A P V tile of up to 4 queries (nr) x 16 d: the rows of P (the last repeated past nr) and zeroed sums */
static AVX2_ATTR inline void start_tile_avx2(const float *P, int64_t nr, const float *pr[4], __m256 acc[4][2]) {
    for (int r = 0; r < 4; r++) {
        pr[r] = P + (r < nr ? r : 0) * KB;
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    }
}

/* O[r][0:16] += the tile's sums, for its nr queries (O's rows D floats apart) */
static AVX2_ATTR inline void add_tile_avx2(float *O, int64_t D, int64_t nr, __m256 acc[4][2]) {
    for (int r = 0; r < nr; r++) {
        _mm256_storeu_ps(O + r * D, _mm256_add_ps(_mm256_loadu_ps(O + r * D), acc[r][0]));
        _mm256_storeu_ps(O + r * D + 8, _mm256_add_ps(_mm256_loadu_ps(O + r * D + 8), acc[r][1]));
    }
}

/* O += P V for `rows` queries over KB keys, P the fp32 weights softmax_avx2 left in S: 4 queries x 16 d a tile */
static AVX2_ATTR void pv_avx2(const Attn *a, const float *P, int64_t rows, const uint16_t *vblk, float *O) {
    const int64_t D = a->D, D16 = D / 16;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        for (int64_t i0 = 0; i0 < rows; i0 += 4) {
            const int64_t nr = rows - i0 < 4 ? rows - i0 : 4;
            const float *pr[4];
            __m256 acc[4][2];
            start_tile_avx2(P + i0 * KB, nr, pr, acc);
            for (int64_t jp = 0; jp < KB / 2; jp++) {
                const uint16_t *vb = vblk + (jp * D16 + d0 / 16) * 32;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)vb);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(vb + 16));
                const __m256 v0e = pair_lo(x0), v0o = pair_hi(x0), v1e = pair_lo(x1), v1o = pair_hi(x1);
                for (int r = 0; r < 4; r++) {
                    const __m256 pe = _mm256_broadcast_ss(pr[r] + 2 * jp), po = _mm256_broadcast_ss(pr[r] + 2 * jp + 1);
                    acc[r][0] = _mm256_fmadd_ps(po, v0o, _mm256_fmadd_ps(pe, v0e, acc[r][0]));
                    acc[r][1] = _mm256_fmadd_ps(po, v1o, _mm256_fmadd_ps(pe, v1e, acc[r][1]));
                }
            }
            add_tile_avx2(O + i0 * D + d0, D, nr, acc);
        }
    }
}

/* ---- AVX2 + FMA on fp32 inputs (CPUs without native bf16 run the job's passes in fp32) ---- */

/* S = scale * Q K^T from fp32 queries and keys packed by pack_kv_f32: 4 queries x 16 keys a tile */
static AVX2_ATTR void scores_f32_avx2(const Attn *a, const float *q, int64_t rows, const float *kblk, float *S) {
    const int64_t D = a->D;
    const __m256 sc = _mm256_set1_ps(a->scale);
    for (int64_t i0 = 0; i0 < rows; i0 += 4) {
        const int64_t nr = rows - i0 < 4 ? rows - i0 : 4;
        const float *qr[4];
        for (int r = 0; r < 4; r++) qr[r] = q + (i0 + (r < nr ? r : 0)) * a->qst;
        for (int c = 0; c < KB / 16; c++) {
            __m256 acc[4][2];
            for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            const float *kc = kblk + c * 16 * D;
            for (int64_t d = 0; d < D; d++) {
                const __m256 k0 = _mm256_loadu_ps(kc + d * 16), k1 = _mm256_loadu_ps(kc + d * 16 + 8);
                for (int r = 0; r < 4; r++) {
                    const __m256 qb = _mm256_broadcast_ss(qr[r] + d);
                    acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
                }
            }
            for (int r = 0; r < nr; r++) {
                _mm256_storeu_ps(S + (i0 + r) * KB + c * 16, _mm256_mul_ps(acc[r][0], sc));
                _mm256_storeu_ps(S + (i0 + r) * KB + c * 16 + 8, _mm256_mul_ps(acc[r][1], sc));
            }
        }
    }
}

/* O += P V for `rows` queries over KB keys, V rows of D floats: 4 queries x 16 d a tile */
static AVX2_ATTR void pv_f32_avx2(const Attn *a, const float *P, int64_t rows, const float *vblk, float *O) {
    const int64_t D = a->D;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        for (int64_t i0 = 0; i0 < rows; i0 += 4) {
            const int64_t nr = rows - i0 < 4 ? rows - i0 : 4;
            const float *pr[4];
            __m256 acc[4][2];
            start_tile_avx2(P + i0 * KB, nr, pr, acc);
            for (int64_t j = 0; j < KB; j++) {
                const __m256 v0 = _mm256_loadu_ps(vblk + j * D + d0), v1 = _mm256_loadu_ps(vblk + j * D + d0 + 8);
                for (int r = 0; r < 4; r++) {
                    const __m256 pb = _mm256_broadcast_ss(pr[r] + j);
                    acc[r][0] = _mm256_fmadd_ps(pb, v0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(pb, v1, acc[r][1]);
                }
            }
            add_tile_avx2(O + i0 * D + d0, D, nr, acc);
        }
    }
}

#endif

/* A task's running maxima, sums and outputs before its first key block */
static void start_task(float *m, float *l, float *O, int64_t rows, int64_t D) {
    for (int64_t i = 0; i < rows; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    memset(O, 0, (size_t)(rows * D) * sizeof(float));
}

/* One task: queries q0 .. q0 + rows - 1 of (batch b, query head h). */
static void attend(const Attn *a, int isa, int64_t b, int64_t h, int64_t q0, float *S, uint16_t *P, float *O,
                   float *Qf, float *m, float *l) {
    const int64_t D = a->D, rows = a->T - q0 < QB ? a->T - q0 : QB;
    const int64_t hk = h / (a->Hq / a->Hkv);
    const uint16_t *q = a->q + b * a->qsb + h * a->qsh + q0 * a->qst;
    const uint16_t *kp = a->kp + (b * a->Hkv + hk) * a->Tpad * D, *vp = a->vp + (b * a->Hkv + hk) * a->Tpad * D;
    start_task(m, l, O, rows, D);
    const int64_t j_end = q0 + rows;   /* keys 0 .. q0 + rows - 1 */
    if (isa == ISA_AVX2)
        for (int64_t i = 0; i < rows; i++)
            for (int64_t d = 0; d < D; d++) Qf[i * D + d] = bf16_to_f32(q[i * a->qst + d]);
    for (int64_t j0 = 0; j0 < j_end; j0 += KB) {
        const uint16_t *kblk = kp + j0 * D, *vblk = vp + j0 * D;
#ifdef ATT_X86
        if (isa == ISA_AVX2) {
            scores_avx2(a, Qf, rows, kblk, S);
            softmax_avx2(a, S, rows, j0, q0, m, l, O, 1);
            pv_avx2(a, S, rows, vblk, O);
            continue;
        }
        if (isa == ISA_AVX512BF16) {
            scores_bf16(a, q, rows, kblk, S);
            softmax_bf16(a, S, rows, j0, q0, m, l, O, P);
            pv_bf16(a, P, rows, vblk, O);
            continue;
        }
#endif
        scores_c(a, q, rows, kblk, S);
        softmax_block(a, S, rows, j0, q0, m, l, O, P);
        pv_c(a, P, rows, vblk, O);
    }
    uint16_t *out = a->out + b * a->osb + h * a->osh + q0 * a->ost;
    for (int64_t i = 0; i < rows; i++) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < D; d++) out[i * a->ost + d] = f32_to_bf16(O[i * D + d] * inv);
    }
}

/* One task on fp32 inputs (attend's order): queries q0 .. q0 + rows - 1 of (batch b, query head h). */
static void attend_f32(const Attn *a, int isa, int64_t b, int64_t h, int64_t q0, float *S, float *O, float *m,
                       float *l) {
    const int64_t D = a->D, rows = a->T - q0 < QB ? a->T - q0 : QB;
    const int64_t hk = h / (a->Hq / a->Hkv);
    const float *q = (const float *)a->q + b * a->qsb + h * a->qsh + q0 * a->qst;
    const float *kp = (const float *)a->kp + (b * a->Hkv + hk) * a->Tpad * D;
    const float *vp = (const float *)a->vp + (b * a->Hkv + hk) * a->Tpad * D;
    start_task(m, l, O, rows, D);
    for (int64_t j0 = 0; j0 < q0 + rows; j0 += KB) {
        const float *kblk = kp + j0 * D, *vblk = vp + j0 * D;
#ifdef ATT_X86
        if (isa == ISA_AVX2) {
            scores_f32_avx2(a, q, rows, kblk, S);
            softmax_avx2(a, S, rows, j0, q0, m, l, O, 0);
            pv_f32_avx2(a, S, rows, vblk, O);
            continue;
        }
#endif
        scores_f32_c(a, q, rows, kblk, S);
        softmax_block(a, S, rows, j0, q0, m, l, O, NULL);
        pv_f32_c(a, S, rows, vblk, O);
    }
    float *out = (float *)a->out + b * a->osb + h * a->osh + q0 * a->ost;
    for (int64_t i = 0; i < rows; i++) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < D; d++) out[i * a->ost + d] = O[i * D + d] * inv;
    }
}

/* Whether this CPU runs a path */
static int cpu_has(int isa) {
    if (isa == ISA_SCALAR) return 1;
#ifdef ATT_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX512BF16)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

/* The best path: AVX-512 BF16 (bf16 inputs only), else AVX2 + FMA, else portable C */
static int cpu_isa(int f32) {
    return !f32 && cpu_has(ISA_AVX512BF16) ? ISA_AVX512BF16 : cpu_has(ISA_AVX2) ? ISA_AVX2 : ISA_SCALAR;
}

ATT_API int att_cpu_has(int isa) { return cpu_has(isa); }

/* Packs the keys and values, then runs every (batch, head, query block) task on `threads` OpenMP threads. */
static int run(Attn *a, int isa, int threads) {
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, D = a->D, T = a->T;
    const size_t esize = a->f32 ? sizeof(float) : sizeof(uint16_t);
    const size_t packed = (size_t)(B * Hkv * a->Tpad * D) * esize;
    a->kp = aligned_alloc(64, packed);
    a->vp = aligned_alloc(64, packed);
    if (!a->kp || !a->vp) {
        free(a->kp);
        free(a->vp);
        return -1;
    }
    const int64_t nqb = (T + QB - 1) / QB, tasks = B * Hq * nqb;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * Hkv; bh++) {
            if (a->f32)
                pack_kv_f32(a, bh / Hkv, bh % Hkv);
            else
                pack_kv(a, bh / Hkv, bh % Hkv);
        }
        float *S = aligned_alloc(64, QB * KB * sizeof(float));
        uint16_t *P = aligned_alloc(64, QB * KB * sizeof(uint16_t));
        float *O = aligned_alloc(64, (size_t)(QB * D) * sizeof(float));
        float *Qf = aligned_alloc(64, (size_t)(QB * D) * sizeof(float));   /* the bf16 AVX2 path's fp32 queries */
        float *m = malloc(QB * sizeof(float)), *l = malloc(QB * sizeof(float));
        const int ok = S && P && O && Qf && m && l;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* the last query blocks (most keys) first, then the shorter ones fill the gaps */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!ok) continue;
            const int64_t qb = nqb - 1 - t / (B * Hq), bh = t % (B * Hq);
            if (a->f32)
                attend_f32(a, isa, bh / Hq, bh % Hq, qb * QB, S, O, m, l);
            else
                attend(a, isa, bh / Hq, bh % Hq, qb * QB, S, P, O, Qf, m, l);
        }
        free(S);
        free(P);
        free(O);
        free(Qf);
        free(m);
        free(l);
    }
    free(a->kp);
    free(a->vp);
    return failed ? -1 : 0;
}

/* out[b, h, t, :] = softmax(scale * q[b, h, t] . k[b, h', :t+1]) v[b, h', :t+1] for every query t < T; q, k, v, out
 * bf16 with unit stride along the head dimension and the given (batch, head, position) strides. */
ATT_API int att_causal_bf16(const uint16_t *q, int64_t qsb, int64_t qsh, int64_t qst, const uint16_t *k, int64_t ksb,
                            int64_t ksh, int64_t kst, const uint16_t *v, int64_t vsb, int64_t vsh, int64_t vst,
                            uint16_t *out, int64_t osb, int64_t osh, int64_t ost, int64_t B, int64_t Hq, int64_t Hkv,
                            int64_t T, int64_t D, float scale, int isa, int threads) {
    if (D % 32 != 0 || D > DMAX || Hkv < 1 || Hq % Hkv != 0 || T < 1 || B < 1) return -2;
    if (isa == ISA_AUTO) isa = cpu_isa(0);
    if (isa < ISA_SCALAR || isa > ISA_AVX2) return -2;
    if (!cpu_has(isa)) return -3;
    Attn a = {q, k, v, out, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, osb, osh, ost,
              B, Hq, Hkv, T, D, (T + KB - 1) / KB * KB, scale, NULL, NULL, 0};
    return run(&a, isa, threads);
}

/* att_causal_bf16 on fp32 q, k, v and out (element strides); paths: AVX2 + FMA and portable C (isa 2, AVX-512 BF16,
 * is a bf16 path: refused). fp32 scores, softmax and sums throughout, as torch's fp32 kernel. */
ATT_API int att_causal_f32(const float *q, int64_t qsb, int64_t qsh, int64_t qst, const float *k, int64_t ksb,
                           int64_t ksh, int64_t kst, const float *v, int64_t vsb, int64_t vsh, int64_t vst, float *out,
                           int64_t osb, int64_t osh, int64_t ost, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                           int64_t D, float scale, int isa, int threads) {
    if (D % 32 != 0 || D > DMAX || Hkv < 1 || Hq % Hkv != 0 || T < 1 || B < 1) return -2;
    if (isa == ISA_AUTO) isa = cpu_isa(1);
    if (isa != ISA_SCALAR && isa != ISA_AVX2) return -2;
    if (!cpu_has(isa)) return -3;
    Attn a = {(const uint16_t *)q, (const uint16_t *)k, (const uint16_t *)v, (uint16_t *)out, qsb, qsh, qst, ksb, ksh,
              kst, vsb, vsh, vst, osb, osh, ost, B, Hq, Hkv, T, D, (T + KB - 1) / KB * KB, scale, NULL, NULL, 1};
    return run(&a, isa, threads);
}
