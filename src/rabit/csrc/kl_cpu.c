/*
 * The distillation loss over the vocabulary, one row (token) at a time: KL(softmax(t/T) || softmax(s/T)) and its
 * gradient with respect to s, softmax(s/T) - softmax(t/T) scaled by 1/T, for a chunk of student logits s and teacher
 * logits t.  The reference is the PyTorch code in rabit.train.losses (_kl_chunk_reference): two log-softmaxes, an
 * exp, a masked product, a sum and two more passes for the gradient, ~10 passes over (rows, vocab) fp32 tensors
 * with a temporary each; here three passes over a row that stay in the core's caches, three exps per element
 * instead of four, no temporaries.  With a 49k vocabulary that was ~0.36 s of a 5.3 s training step of 512 tokens on
 * a 2-core Zen 3 (docs/RESULTS.md section 34).
 *
 * Per row: the two maxima; the two sums of exp(x - max) (the student's exps kept in the gradient row); then
 * log_p = (x - max) - log(sum) for both, the KL terms p_t * (log_p_t - log_p_s) where p_t > 0 (xlogy: a teacher
 * probability that underflows to 0 adds nothing, as in the reference), and the gradient.  Sums in fp32 over the
 * vector lanes (as torch's reductions), so results match the reference to fp32 rounding, not bitwise.  Each row's KL
 * is written out (the caller sums them in a fixed order), so the thread count does not change a bit.
 * Built with -fno-trapping-math so that exp_nonpos vectorizes (rabit_exp.h).
 */
#include <math.h>
#include <stdint.h>

#include "rabit_exp.h"

#define KL_API __attribute__((visibility("default")))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KL_CLONES
#endif

/* One row of v logits; it = 1/T.  g: the gradient row, or NULL.  Returns the row's KL. */
static KL_CLONES float kl_row(const float *s, const float *t, int64_t v, float it, float *g) {
    float ms = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : ms, mt)
    for (int64_t j = 0; j < v; j++) {
        ms = s[j] > ms ? s[j] : ms;   /* not fmaxf: gcc calls it per element instead of vectorizing */
        mt = t[j] > mt ? t[j] : mt;
    }
    ms *= it;   /* max(x / T) = max(x) / T: rounding is monotonic */
    mt *= it;
    float zs = 0.0f, zt = 0.0f;
    if (g) {
#pragma omp simd reduction(+ : zs, zt)
        for (int64_t j = 0; j < v; j++) {
            float es = exp_nonpos(s[j] * it - ms);
            g[j] = es;
            zs += es;
            zt += exp_nonpos(t[j] * it - mt);
        }
    } else {
#pragma omp simd reduction(+ : zs, zt)
        for (int64_t j = 0; j < v; j++) {
            zs += exp_nonpos(s[j] * it - ms);
            zt += exp_nonpos(t[j] * it - mt);
        }
    }
    const float lzs = logf(zs), lzt = logf(zt), izs = 1.0f / zs;
    float kl = 0.0f;
    if (g) {
#pragma omp simd reduction(+ : kl)
        for (int64_t j = 0; j < v; j++) {
            float lpt = (t[j] * it - mt) - lzt, lps = (s[j] * it - ms) - lzs;
            float pt = exp_nonpos(lpt);
            kl += pt > 0.0f ? pt * (lpt - lps) : 0.0f;
            g[j] = (g[j] * izs - pt) * it;
        }
    } else {
#pragma omp simd reduction(+ : kl)
        for (int64_t j = 0; j < v; j++) {
            float lpt = (t[j] * it - mt) - lzt, lps = (s[j] * it - ms) - lzs;
            float pt = exp_nonpos(lpt);
            kl += pt > 0.0f ? pt * (lpt - lps) : 0.0f;
        }
    }
    return kl;
}

/*
 * s, t: fp32 rows of v logits, row r at s + r * lds, t + r * ldt.  inv_temp: 1/T > 0.
 * g: fp32 (rows, v) gradient rows at g + r * ldg, written; NULL for the loss alone.
 * kl_out: fp32 (rows), each row's KL, written.
 * Returns 0, or 1 for bad arguments.
 */
KL_API int kl_rows(const float *s, int64_t lds, const float *t, int64_t ldt, int64_t rows, int64_t v, float inv_temp,
                   float *g, int64_t ldg, float *kl_out, int nthreads) {
    if (rows < 0 || v < 1 || lds < v || ldt < v || (g && ldg < v) || !(inv_temp > 0.0f)) return 1;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > rows) nt = rows < 1 ? 1 : (int)rows;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        kl_out[r] = kl_row(s + r * lds, t + r * ldt, v, inv_temp, g ? g + r * ldg : 0);
    return 0;
}
