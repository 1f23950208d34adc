/* exp for the softmax-like loops of the CPU kernels (decode_ops_cpu.c, kl_cpu.c): plain C that gcc vectorizes
 * inside `omp simd` loops when built with -fno-trapping-math (with trapping math the clamp stays a branch and the
 * loop scalar). */
#ifndef RABIT_EXP_H
#define RABIT_EXP_H

#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 (softmax after subtracting the maximum): Cephes' expf polynomial on x - n ln2 with n rounded
 * to nearest by the 1.5 * 2^23 trick (vectorizable: no floorf, no branches); relative error ~2e-7.  Below -87.3 it
 * returns 0, as expf underflows to 0 there (denormals aside). */
static inline float exp_nonpos(float x) {
    x = x < -87.3f ? -87.3f : x;
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return x <= -87.3f ? 0.0f : p * s;
}

#endif
