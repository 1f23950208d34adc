/*
 * The small fp32 operations of a batch-1 decoding step, each one native call: a layer's RMSNorm (with the residual
 * add before it) and its attention for the new token (rotary embedding of q and k, the KV-cache write, scores,
 * softmax and the weighted sum of values).  In PyTorch these are ~20 dispatched ops per layer at 1-14 us each
 * (F.rms_norm alone is five ops on the CPU, ~10 us for 576 values), more than the layer's packed GEMVs cost on a
 * small model (docs/RESULTS.md section 28).  Also the gated MLP's silu(gate) * up.  The reference is the PyTorch code in rabit.generate.StaticDecoder; the
 * tests compare the two on odd shapes (tests/test_decode_ops.py).
 * Single-threaded (the decoder runs its small ops on one thread) except the attention over a long cache, which takes
 * its KV heads on the threads it is given; loops vectorized with `omp simd` (active only with -fopenmp or
 * -fopenmp-simd) and compiled for AVX-512, AVX2 and baseline x86-64, chosen at load time.  Built with
 * -fno-trapping-math (rabit.kernels.native_build.EXP_FLAGS): with trapping math gcc keeps exp_nonpos's clamp a
 * branch, and every loop calling it (the softmax, silu) stayed scalar on AVX2.  The flag changes no value computed, only
 * whether floating-point exceptions may be raised speculatively.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rabit_exp.h"

#define DEC_API __attribute__((visibility("default")))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DEC_CLONES
#endif

/*
 * If a is not NULL: x += a (n values, in place: x is the residual stream).  Then y = x / sqrt(mean(x^2) + eps) * w,
 * as transformers' LlamaRMSNorm in fp32 (x * rsqrt(variance + eps), then times the weight; the mean of squares is
 * summed in double here).  Returns 0, or 1 for bad sizes.
 */
DEC_API DEC_CLONES int dec_add_rms_norm(float *x, const float *a, const float *w, int64_t n, float eps, float *y) {
    if (n < 1) return 1;
    double ss = 0.0;
    if (a) {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) {
            float v = x[i] + a[i];
            x[i] = v;
            ss += (double)v * v;
        }
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    }
    float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
    return 0;
}

static __thread float *tl_scores = NULL;
static __thread int64_t tl_cap = 0;

/* this thread's scratch of n floats (grown on demand), or NULL when out of memory */
static float *scores_scratch(int64_t n) {
    if (n > tl_cap) {
        float *p = (float *)realloc(tl_scores, (size_t)(2 * n) * sizeof(float));
        if (!p) return NULL;
        tl_scores = p;
        tl_cap = 2 * n;
    }
    return tl_scores;
}

/* The G query heads of KV head kv (queries q, rotated here) over its cached keys K and values V (T rows of D
 * each, from position lo): each block of 4 cached keys (then values) is read from L2 once and used by the G heads
 * from L1, and each head's 4 dot products are independent sums.  s: G x T scores, qr: G x D rotated queries.
 * Cloned per ISA itself: it runs inside dec_attend_one's OpenMP region, whose outlined body is not a clone. */
static DEC_CLONES void attend_group(const float *q, const float *K, const float *V, int64_t T, int64_t G, int64_t D,
                                const float *cos, const float *sin_signed, float scale, float *s, float *qr,
                                float *o) {
    const int64_t half = D / 2;
    for (int64_t g = 0; g < G; g++) {
        const float *qu = q + g * D;
        float *qg = qr + g * D;
        for (int64_t d = 0; d < D; d++) qg[d] = qu[d] * cos[d] + qu[d < half ? d + half : d - half] * sin_signed[d];
    }
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
        const float *k0 = K + t * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qr + g * D;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t d = 0; d < D; d++) {
                a0 += qg[d] * k0[d];
                a1 += qg[d] * k1[d];
                a2 += qg[d] * k2[d];
                a3 += qg[d] * k3[d];
            }
            float *sg = s + g * T + t;
            sg[0] = a0 * scale; sg[1] = a1 * scale; sg[2] = a2 * scale; sg[3] = a3 * scale;
        }
    }
    for (; t < T; t++) {
        const float *kt = K + t * D;
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qr + g * D;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < D; d++) acc += qg[d] * kt[d];
            s[g * T + t] = acc * scale;
        }
    }
    for (int64_t g = 0; g < G; g++) {   /* softmax of each head's scores, normalized in place */
        float *sg = s + g * T, mx = -INFINITY, sum = 0.0f;
        for (t = 0; t < T; t++) mx = sg[t] > mx ? sg[t] : mx;
#pragma omp simd reduction(+ : sum)
        for (t = 0; t < T; t++) {
            float e = exp_nonpos(sg[t] - mx);
            sg[t] = e;
            sum += e;
        }
        const float inv = 1.0f / sum;
        for (t = 0; t < T; t++) sg[t] *= inv;
        float *oh = o + g * D;
        for (int64_t d = 0; d < D; d++) oh[d] = 0.0f;
    }
    for (t = 0; t + 4 <= T; t += 4) {
        const float *v0 = V + t * D, *v1 = v0 + D, *v2 = v1 + D, *v3 = v2 + D;
        for (int64_t g = 0; g < G; g++) {
            const float *sg = s + g * T + t;
            const float p0 = sg[0], p1 = sg[1], p2 = sg[2], p3 = sg[3];
            float *oh = o + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) oh[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
        }
    }
    for (; t < T; t++) {
        const float *vt = V + t * D;
        for (int64_t g = 0; g < G; g++) {
            const float p = s[g * T + t];
            float *oh = o + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) oh[d] += p * vt[d];
        }
    }
}

/* Below this many cached floats read (keys and values of all KV heads) one thread attends alone: a fork costs
 * more than it saves (the 16-head, 128-wide benchmark Llama reaches it at ~32 positions). */
#define ATTEND_PARALLEL_FLOATS (1 << 15)

/*
 * Attention of one new token at position pos (batch 1, no mask: it attends to keys lo..pos).
 *   q: (H, D), k, v: (KV, D), this token's projections (q and k before the rotary embedding);
 *   kc, vc: the layer's caches, (KV, max_len, D) contiguous; this call writes the rotated k and v at pos;
 *   cos, sin_signed: the rotary tables' rows for pos (D values; sin_signed = [-sin[:D/2], sin[D/2:]], so that
 *   rope(u) = u * cos + roll(u, D/2) * sin_signed, transformers' rotate_half form);
 *   heads h = kv * (H / KV) + j share KV head kv (grouped-query attention);
 *   o: (H, D) = softmax(scale * q_h . K[kv, lo..pos]) V[kv, lo..pos].
 * nthreads: OpenMP threads over the KV heads (each head's sums are the same whichever thread takes it, so the
 * result does not depend on it); the reads of a long cache are what a step's attention waits for.
 * Returns 0, 1 for bad arguments, 2 when out of memory.
 */
DEC_API DEC_CLONES int dec_attend_one(const float *q, const float *k, const float *v, float *kc, float *vc,
                                      int64_t max_len, int64_t pos, int64_t lo, const float *cos,
                                      const float *sin_signed, int64_t H, int64_t KV, int64_t D, float scale,
                                      float *o, int nthreads) {
    if (H < 1 || KV < 1 || H % KV || D < 2 || D % 2 || pos < 0 || pos >= max_len || lo < 0 || lo > pos) return 1;
    const int64_t half = D / 2, T = pos - lo + 1, G = H / KV;
    for (int64_t kv = 0; kv < KV; kv++) {
        const float *ku = k + kv * D;
        float *kd = kc + (kv * max_len + pos) * D, *vd = vc + (kv * max_len + pos) * D;
        for (int64_t d = 0; d < D; d++) {
            float rolled = ku[d < half ? d + half : d - half];
            kd[d] = ku[d] * cos[d] + rolled * sin_signed[d];
            vd[d] = v[kv * D + d];
        }
    }
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > KV) nt = (int)KV;
    if (2 * KV * T * D < ATTEND_PARALLEL_FLOATS) nt = 1;
    int failed = 0;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static) reduction(| : failed)
    for (int64_t kv = 0; kv < KV; kv++) {
        float *s = scores_scratch(G * (T + D));
        if (!s) { failed = 1; continue; }
        attend_group(q + kv * G * D, kc + (kv * max_len + lo) * D, vc + (kv * max_len + lo) * D, T, G, D, cos,
                     sin_signed, scale, s, s + G * T, o + kv * G * D);
    }
    return failed ? 2 : 0;
}

/* y = silu(a) * b = a * sigmoid(a) * b (n values), the gated MLP's activation in one pass; sigmoid from
 * exp(-|a|) <= 1 on either side of 0, so that nothing overflows. */
DEC_API DEC_CLONES int dec_silu_mul(const float *a, const float *b, float *y, int64_t n) {
    if (n < 0) return 1;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float x = a[i], e = exp_nonpos(x < 0.0f ? x : -x);
        float sig = (x < 0.0f ? e : 1.0f) / (1.0f + e);
        y[i] = x * sig * b[i];
    }
    return 0;
}
