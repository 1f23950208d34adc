/*
 * The column loop of GPTQ-style sign rounding (rabit.ops.refine.gptq_signs) for one block of columns, natively.
 *
 * For columns j = 0 .. bs-1 of the block, every row r independently:
 *
 *     l*        = the first l minimizing |w[r, j] - levels[j, r, l]|     (the 2^k values the paths can express)
 *     choice    = l*
 *     e         = (w[r, j] - levels[j, r, l*]) / U[j, j]
 *     w[r, c]  -= e * U[j, c]   for c > j                                 (error feedback within the block)
 *     err[r, j] = e
 *
 * The PyTorch loop (`_block_columns_reference`) runs ~6 tensor ops per column over all rows, so on a CPU its time is
 * per-op overhead and an out x (bs - j) temporary per column; rows never interact inside a block, so here each
 * row walks its own columns in a small buffer. The fp32 operations are the loop's, in the same order (a product,
 * then a subtraction: no FMA, -ffp-contract=off), and ties pick the first level as torch.argmin does, so the
 * result is bitwise the reference's for finite inputs. Rows are split statically over OpenMP threads; no
 * reductions, so the thread count does not change a bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GQ_API __attribute__((visibility("default")))
#define GQ_BS_MAX 4096

/*
 * w:      fp32 (out, ldw), the block's columns at w[r * ldw + j], j < bs; read only (each row is updated in a
 *         private buffer: the caller keeps only the errors and the choices)
 * levels: fp32 (bs, out, nlev) contiguous
 * u:      fp32 (bs, ldu), the block's upper-triangular Cholesky factor of H^-1, u[j * ldu + c]
 * choice: int64 (out, ldc), written at choice[r * ldc + j]
 * err:    fp32 (out, bs) contiguous, written
 * Returns 0, or -1 for bad arguments.
 */
GQ_API int gq_block_columns(const float *w, int64_t ldw, const float *levels, int nlev, const float *u, int64_t ldu,
                            int64_t *choice, int64_t ldc, float *err, int64_t out, int64_t bs, int nthreads) {
    if (out < 0 || bs < 0 || bs > GQ_BS_MAX || nlev < 1 || ldw < bs || ldu < bs || ldc < bs) return -1;
    if (out == 0 || bs == 0) return 0;
    int nt = nthreads < 1 ? 1 : nthreads;
    /* below ~1M multiply-subtracts a second thread costs more to wake than it saves */
    if ((double)out * bs * bs < 2.0 * 1024 * 1024) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < out; r++) {
        float row[GQ_BS_MAX];
        const float *wr = w + r * ldw;
        for (int64_t c = 0; c < bs; c++) row[c] = wr[c];
        for (int64_t j = 0; j < bs; j++) {
            const float col = row[j];
            const float *lv = levels + (j * out + r) * nlev;
            int best = 0;
            float bd = fabsf(col - lv[0]);
            for (int l = 1; l < nlev; l++) {
                float d = fabsf(col - lv[l]);
                if (d < bd) { bd = d; best = l; }
            }
            choice[r * ldc + j] = best;
            const float e = (col - lv[best]) / u[j * ldu + j];
            const float *uj = u + j * ldu;
            for (int64_t c = j + 1; c < bs; c++) row[c] = row[c] - e * uj[c];
            err[r * bs + j] = e;
        }
    }
    return 0;
}
