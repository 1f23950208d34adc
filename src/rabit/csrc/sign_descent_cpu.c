/*
 * One pass of coordinate descent on the sign planes of a k-path binary layer with its scales fixed
 * (rabit.ops.refine.sign_descent), natively.
 *
 * The layer's weight at (r, c) is one of 2^k levels, sum_i s_i g_i[r] h_i[c] with s in {-1, +1}^k; combination l
 * takes s_i = +1 where bit (k - 1 - i) of l is set (itertools.product's order, as rabit.ops.refine). The objective
 * is the output error e_r H e_r^T of each row, e = w - q, so rows never interact. With G = E H given, each row
 * walks its columns in `order` and, at column c, moves its weight from the current level q to the level v that
 * lowers the error most: with a = q - v (the error e grows by a at c),
 *
 *     delta(v) = 2 a G[r, c] + a^2 H[c, c]
 *
 * and only a strictly negative delta moves it; then G[r, :] += a H[c, :]. The fp32 operations are those of the
 * PyTorch loop (`_sign_descent_reference`), in the same order (no FMA: -ffp-contract=off), and ties keep the first
 * level, so the two agree bit for bit. OpenMP threads over rows (static): no reductions, so the thread count does
 * not change a bit.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SD_API __attribute__((visibility("default")))
#define SD_KMAX 8

/* G[r, :] += a H[c, :], the pass's only long loop: compiled for AVX-512, AVX2 and plain x86-64, chosen at load
 * time. A product then a sum, no FMA (-ffp-contract=off): every clone gives the reference's bits. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void axpy(float *restrict y, const float *restrict x, float a, int64_t n) {
    for (int64_t t = 0; t < n; t++) y[t] = y[t] + a * x[t];
}

static inline float level(const float *g, const float *h, int k, int64_t out, int64_t in, int64_t r, int64_t c,
                          int l) {
    float v = 0.0f;
    for (int i = 0; i < k; i++) {
        const float gh = g[i * out + r] * h[i * in + c];
        const float s = ((l >> (k - 1 - i)) & 1) ? 1.0f : -1.0f;
        v = v + s * gh;
    }
    return v;
}

/*
 * g:      fp32 (k, out) contiguous, the row scales;  h: fp32 (k, in) contiguous, the column scales
 * H:      fp32 (in, ldh), the metric (symmetric), H[c * ldh + j]
 * order:  int64 (in,), the column order
 * choice: int64 (out, in) contiguous, the current level of every weight; updated in place
 * G:      fp32 (out, in) contiguous, (w - q) H on entry; updated in place
 * flips:  int64 (out,), written: the moves each row made
 * Returns 0, or -1 for bad arguments.
 */
SD_API int sd_pass(const float *g, const float *h, int k, const float *H, int64_t ldh, const int64_t *order,
                   int64_t *choice, float *G, int64_t out, int64_t in, int64_t *flips, int nthreads) {
    if (k < 1 || k > SD_KMAX || out < 0 || in < 0 || ldh < in) return -1;
    for (int64_t j = 0; j < in; j++)
        if (order[j] < 0 || order[j] >= in) return -1;
    if (out == 0 || in == 0) return 0;
    const int nlev = 1 << k;
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)out * in * nlev < 256.0 * 1024) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < out; r++) {
        int64_t *ch = choice + r * in;
        float *gr = G + r * in;
        int64_t moved = 0;
        for (int64_t j = 0; j < in; j++) {
            const int64_t c = order[j];
            const int cur = (int)ch[c];
            const float q = level(g, h, k, out, in, r, c, cur);
            const float gc = gr[c], hcc = H[c * ldh + c];
            int best = cur;
            float bd = 0.0f, ba = 0.0f;
            for (int l = 0; l < nlev; l++) {
                if (l == cur) continue;
                const float a = q - level(g, h, k, out, in, r, c, l);
                const float d = (2.0f * a) * gc + (a * a) * hcc;
                if (d < bd) { bd = d; best = l; ba = a; }
            }
            if (best != cur) {
                axpy(gr, H + c * ldh, ba, in);
                ch[c] = best;
                moved++;
            }
        }
        flips[r] = moved;
    }
    return 0;
}
