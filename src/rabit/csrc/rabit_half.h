/* fp16 / bf16 <-> fp32 conversions, bit-exact in C (no F16C needed), shared by the native kernels. */
#ifndef RABIT_HALF_H
#define RABIT_HALF_H
#include <stdint.h>
#include <string.h>
#include <math.h>

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

#endif
