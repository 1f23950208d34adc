/* Row blocks of a matrix-vector product handed out dynamically to OpenMP threads (a preempted thread does not hold
 * the others up): the scheduling shared by the bf16 and the group-quantized head kernels. */
#ifndef RABIT_ROWS_H
#define RABIT_ROWS_H

#include <stdint.h>

/* Threads for a rows x cols product over nb input rows in blocks of `block` rows: one when fork/join would cost
 * more than the work, never more than there are blocks. */
static inline int row_block_threads(int64_t rows, int64_t cols, int64_t nb, int nthreads, int64_t block) {
    int64_t nblocks = (rows + block - 1) / block;
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((double)rows * cols * nb < 256.0 * 1024.0) nt = 1;
    if (nt > nblocks) nt = (int)nblocks;
    return nt;
}

/* Claims the next block from the shared counter *next: rows [*r0, *r1); 0 when every block is taken. */
static inline int next_row_block(int64_t *next, int64_t rows, int64_t block, int64_t *r0, int64_t *r1) {
    int64_t bi = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    if (bi * block >= rows) return 0;
    *r0 = bi * block;
    *r1 = *r0 + block < rows ? *r0 + block : rows;
    return 1;
}

#endif
