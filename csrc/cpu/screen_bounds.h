/*
 * screen_bounds.h -- the bounds of one row of a selection score block on AVX-512, shared by the float
 * screen (simd_kernels.h, screen_tile) and the AMX screen (amx.c). Include only from a translation
 * unit compiled for AVX-512 (F, BW, DQ).
 *
 * s: 64 scores q . sum_c (not yet divided by the counts). With f = s[c] * kinv[c] (kinv = 1 / count) and
 * the margin e = qbound * kscale[c] + qabs * kinv[c] (kscale >= |sum_c| / count), f - e and f + e bound
 * the exact score of candidate c from below and above (the caller's qbound and qabs make them so).
 */
#ifndef MSATTN_SCREEN_BOUNDS_H
#define MSATTN_SCREEN_BOUNDS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* Over the columns set in valid: returns the mask of those whose f + e is not below lim (or NaN);
 * lanes[l] = the largest f - e of the columns c = l (mod 16), ends[0] = the largest f - e, ends[1] =
 * the largest f + e (+inf if one is NaN); -inf where no column is valid. A lower bound that overflowed
 * to +inf bounds nothing and is left out. */
static inline uint64_t ms_bounds_row_avx512(float *lanes, float *ends, const float *s, const float *kinv,
                                            const float *kscale, float qbound, float qabs, float lim,
                                            uint64_t valid) {
    const __m512 vlim = _mm512_set1_ps(lim), vqb = _mm512_set1_ps(qbound), vqa = _mm512_set1_ps(qabs);
    const __m512 inf = _mm512_set1_ps(INFINITY);
    __m512 vlo = _mm512_set1_ps(-INFINITY), vhi = vlo;
    __mmask16 nan = 0;
    uint64_t m = 0;
    for (int v = 0; v < 4; ++v) {
        const __mmask16 ok = (__mmask16)(valid >> (16 * v));
        const __m512 ki = _mm512_loadu_ps(kinv + 16 * v);
        const __m512 f = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * v), ki);
        const __m512 e = _mm512_fmadd_ps(vqb, _mm512_loadu_ps(kscale + 16 * v), _mm512_mul_ps(vqa, ki));
        const __m512 up = _mm512_add_ps(f, e), down = _mm512_sub_ps(f, e);
        m |= (uint64_t)_mm512_mask_cmp_ps_mask(ok, up, vlim, _CMP_NLT_UQ) << (16 * v);
        nan |= _mm512_mask_cmp_ps_mask(ok, up, up, _CMP_UNORD_Q);
        vhi = _mm512_mask_max_ps(vhi, ok, up, vhi); /* max_ps returns its second operand on NaN */
        vlo = _mm512_mask_max_ps(vlo, _mm512_mask_cmp_ps_mask(ok, down, inf, _CMP_LT_OQ), down, vlo);
    }
    _mm512_storeu_ps(lanes, vlo);
    ends[0] = _mm512_reduce_max_ps(vlo);
    ends[1] = nan ? INFINITY : _mm512_reduce_max_ps(vhi);
    return m;
}

#endif /* MSATTN_SCREEN_BOUNDS_H */
