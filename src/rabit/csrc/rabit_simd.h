/* SIMD helpers shared by the CPU kernels (included after <immintrin.h> on x86). */
#ifndef RABIT_SIMD_H
#define RABIT_SIMD_H

#if defined(__x86_64__) || defined(__i386__)
/* The sum of a __m256's 8 floats; inlined into any caller compiled for AVX2 (a superset of its target). */
__attribute__((target("avx2"))) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The largest of a __m256's 8 floats (as hsum8) */
__attribute__((target("avx2"))) static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
#endif

#endif
