/*
 * simd.h -- the vector vocabulary of the CPU kernels and the table they dispatch through.
 *
 * Two halves:
 *  1. msattn_simd_ops: a table of the few vector loops the kernels spend their time in (score tiles,
 *     output tiles, exp2, conversions). msattn_simd() returns the table for the instruction set chosen
 *     at run time (AVX-512, AVX2+FMA, or scalar C, which always works); kernels call through it.
 *  2. When MSATTN_ISA is defined (only by simd_avx512.c, simd_avx2.c, simd_scalar.c), one vocabulary
 *     of vector macros (vf, VL, vf_load, vf_fma, vf_exp2, ...) mapped onto that instruction set.
 *     simd_kernels.h writes each loop once in this vocabulary; each ISA file instantiates it.
 *
 * Tiles: a score tile is (rows <= 4, 64 columns), row-major with leading dimension 64 (MSATTN_TILE).
 * Packed operands are fp32; their leading dimensions are in floats.
 */
#ifndef MSATTN_SIMD_H
#define MSATTN_SIMD_H

#include <math.h>
#include <stdint.h>

#include "../msattn.h"

#define MSATTN_TILE 64 /* columns of a score tile */
#define MSATTN_ROWS 4  /* rows of a score tile */
#define MSATTN_DPAD 16 /* packed head dims are padded to a multiple of this */

typedef struct {
    const char *name;
    /* s (rows, 64) = a (rows, d) . bt (d, 64 at row stride ldb); a rows at stride lda; rows <= 4 */
    void (*qk)(float *s, const float *a, int64_t lda, int rows, const float *bt, int64_t ldb, int d);
    /* o (rows, dp) += p (rows, first ncols of 64) . b (ncols, dp at row stride ldb);
     * o rows at stride ldo; rows <= 4; dp % MSATTN_DPAD == 0 */
    void (*pv)(float *o, int64_t ldo, const float *p, int rows, int ncols, const float *b,
               int64_t ldb, int dp);
    /* online-softmax update of a score tile s (rows, 64) in log2 units, nc valid columns: per row
     * mnew = max(m, max s[:nc]); s = exp2(s - mnew); l = l * exp2(m - mnew) + sum s; the o row
     * (dp floats at stride ldo) *= exp2(m - mnew); m = mnew. A row with nothing visible yet gets
     * s = 0 (and l = NaN if a score was NaN). */
    void (*softmax_update)(float *s, int rows, int nc, float *m, float *l, float *o, int64_t ldo, int dp);
    /* s[r][c] = exp2(s[r][c] - sub[r]) * (y[r][c] - c0[r]): P and dS of a tile (sub = lse2 per row;
     * a row with sub = +inf gives 0) */
    void (*probs_ds_rows)(float *s, const float *y, int rows, int nc, const float *sub, const float *c0);
    /* max of x[0..n), -inf for n == 0 */
    float (*max)(const float *x, int n);
    /* x[i] = exp2(x[i] - sub); returns the sum of the new x */
    float (*exp2_sum)(float *x, int n, float sub);
    /* x[i] = exp2(x[i] - sub[i]) */
    void (*exp2_sub)(float *x, const float *sub, int n);
    /* x[i] *= a */
    void (*scale)(float *x, int n, float a);
    /* x[i] = x[i] * (y[i] - c) */
    void (*mul_sub)(float *x, const float *y, float c, int n);
    /* x[i] = x[i] * (y[i] - c[i]) */
    void (*mul_sub_vec)(float *x, const float *y, const float *c, int n);
    /* sum x[i] * y[i] */
    float (*dot)(const float *x, const float *y, int n);
    /* s[c] = score(q, sums + cand[c] * d) / counts[cand[c]] for c < n, the selection's score of a
     * double query-region mean and a float key-region sum (simd_kernels.h: eight partial sums of
     * fused multiply-adds and a fixed tree, the same bits on every instruction set). Writes to
     * keep[0..m), ascending, the c whose s[c] is not below `below` (a NaN score is kept); returns m.
     * keep must have room for n + 8 (slots past m may be written) */
    int (*score_block)(double *s, int32_t *keep, const double *q, const float *sums, const int32_t *cand,
                       const int32_t *counts, int n, int d, double below);
    /* screening for blocks of 64 candidates that many query regions score (simd_kernels.h). kp: a
     * panel (d + 2, 64): rows 0..d-1 the candidates' key-region sums transposed, row d their 1 / count,
     * row d + 1 kscale >= |sum| / count. Per row r < rows <= 4 of a (at stride lda) and column c set in
     * valid[r], the float score f = (row . column c) * kinv[c] and its margin e = qbound[r] * kscale[c] +
     * qabs[r] * kinv[c] bound the exact one (score_block's) from below by f - e and from above by f + e,
     * given qbound[r] >= 4 (d + 5) 2^-24 |row| + 2^-118 sqrt(d) and qabs[r] >= 2^-118 (sqrt(d) |row| + d). Writes bit c of keep[r] when f + e is not below lim[r] (or is
     * NaN); lanes[16 r + l] = the largest f - e of the columns c = l (mod 16); ends[2 r] = the largest
     * f - e, ends[2 r + 1] the largest f + e (+inf if one is NaN); -inf where no column is valid. */
    void (*screen_tile)(uint64_t *keep, float *lanes, float *ends, const float *a, int64_t lda, int rows, const float *kp,
                        int d, const float *qbound, const float *qabs, const float *lim, const uint64_t *valid);
    /* dst[i] = (float)src[i] * a for n contiguous elements of dtype */
    void (*to_f32)(float *dst, const void *src, int n, msattn_dtype dtype, float a);
    /* dst[i] = src[i] rounded to dtype (round to nearest even), n contiguous elements */
    void (*from_f32)(void *dst, const float *src, int n, msattn_dtype dtype);
    /* the same screen's first pass on AMX tiles (amx.c), NULL without AMX: rows <= 16 query regions of
     * qb (per row dp bf16 high parts then dp low parts, msattn_bf16_split, at stride ldq elements; dims
     * padded with zeros to dp, a multiple of 32; 16 rows readable) against the 64 candidates of a bf16
     * panel kb (high parts, then low parts at kb + 64 dp; msattn_amx_panel_offset), with kaux the float
     * panel's rows d and d + 1 (1 / count, kscale) and the margin e = qbound[r] * kscale[c] + qabs[r] *
     * kinv[c] (msattn_amx_bounds); writes screen_tile's keep against lim (unless keep is NULL; lim NULL:
     * +inf), lanes (row r at lanes + r * ldl) and ends (at lomax[r * ldm], himax[r * ldm]). Between
     * msattn_amx_begin and msattn_amx_end. */
    void (*screen_amx)(uint64_t *keep, float *lanes, int64_t ldl, float *lomax, float *himax, int64_t ldm,
                       const uint16_t *qb, int64_t ldq, int rows, const uint16_t *kb, int dp, const float *kaux,
                       const float *qbound, const float *qabs, const float *lim, const uint64_t *valid);
} msattn_simd_ops;

extern const msattn_simd_ops msattn_simd_avx512;
extern const msattn_simd_ops msattn_simd_avx2;
extern const msattn_simd_ops msattn_simd_scalar;
extern const msattn_simd_ops msattn_simd_amx;

/* AMX (amx.c): whether this CPU and OS run AMX tiles for this process (asks the kernel for the tile
 * state once); the bf16 panel element of dim i of column c (c < 64) at panel + msattn_amx_panel_offset:
 * tiles (i / 32, c / 16) of 16 x 32 bf16, pairs of dims side by side (AMX's VNNI layout); the margins of
 * a query region of float norm qnorm for the screen's bf16x3 product over dp dims */
int msattn_amx_usable(void);
static inline int64_t msattn_amx_panel_offset(int64_t i, int64_t c) {
    return ((i / 32 * 4 + c / 16) * 16 + (i % 32) / 2) * 32 + (c % 16) * 2 + i % 2;
}
void msattn_amx_bounds(double qnorm, int dp, float *qbound, float *qabs);
/* around a pass of screen_amx calls on one thread: load the tile configuration, release the tiles */
void msattn_amx_begin(void);
void msattn_amx_end(void);
void msattn_screen_amx(uint64_t *keep, float *lanes, int64_t ldl, float *lomax, float *himax, int64_t ldm,
                       const uint16_t *qb, int64_t ldq, int rows, const uint16_t *kb, int dp, const float *kaux,
                       const float *qbound, const float *qabs, const float *lim, const uint64_t *valid);

/* the table chosen now (best supported, or the one forced by msattn_isa_set / MSATTN_ISA env var) */
const msattn_simd_ops *msattn_simd(void);

// ----------------------------------------------------------------------------------------------
// scalar conversions, shared by every path (C11, no intrinsics)

/* x as a float no smaller (msattn_float_up) / no larger (msattn_float_down) than x; NaN stays NaN */
static inline float msattn_float_up(double x) {
    float f = (float)x;
    return (double)f < x ? nextafterf(f, INFINITY) : f;
}

static inline float msattn_float_down(double x) {
    float f = (float)x;
    return (double)f > x ? nextafterf(f, -INFINITY) : f;
}

static inline float msattn_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;
    return x.f;
}

static inline uint16_t msattn_f32_to_bf16(float f) {
    union { uint32_t u; float f; } x;
    x.f = f;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40); /* quiet NaN */
    x.u += 0x7fffu + ((x.u >> 16) & 1u);
    return (uint16_t)(x.u >> 16);
}

/* x = hi + lo + r in bf16, |r| <= 2^-16 |x| (the AMX screen's two parts of every operand) */
static inline void msattn_bf16_split(float x, uint16_t *hi, uint16_t *lo) {
    *hi = msattn_f32_to_bf16(x);
    *lo = msattn_f32_to_bf16(x - msattn_bf16_to_f32(*hi));
}

static inline float msattn_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    union { uint32_t u; float f; } x;
    if (exp == 0x1f) {
        x.u = sign | 0x7f800000u | (man << 13); /* inf, NaN */
    } else if (exp != 0) {
        x.u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        x.u = sign;
    } else { /* subnormal: value = man * 2^-24 */
        x.f = (float)man * 5.9604644775390625e-8f;
        x.u |= sign;
    }
    return x.f;
}

static inline uint16_t msattn_f32_to_f16(float f) {
    union { uint32_t u; float f; } x;
    x.f = f;
    uint32_t sign = (x.u >> 16) & 0x8000u, a = x.u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);   /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  /* rounds to >= 65520: inf */
    if (a < 0x38800000u) {                                     /* below 2^-14: subnormal or 0 */
        union { uint32_t u; float f; } y;
        y.u = a;
        /* adding 0.5 aligns the mantissa so the FPU rounds to nearest even at 2^-24 */
        y.f += 0.5f;
        return (uint16_t)(sign | (y.u - 0x3f000000u));
    }
    uint32_t odd = (a >> 13) & 1u;
    a += 0xc8000fffu + odd; /* rebias exponent (-112 << 23) and round to nearest even */
    return (uint16_t)(sign | (a >> 13));
}

static inline float msattn_load_f32(const void *base, int64_t off, msattn_dtype dt) {
    switch (dt) {
    case MSATTN_F32: return ((const float *)base)[off];
    case MSATTN_F64: return (float)((const double *)base)[off];
    case MSATTN_BF16: return msattn_bf16_to_f32(((const uint16_t *)base)[off]);
    default: return msattn_f16_to_f32(((const uint16_t *)base)[off]);
    }
}

static inline double msattn_load_f64(const void *base, int64_t off, msattn_dtype dt) {
    if (dt == MSATTN_F64) return ((const double *)base)[off];
    return (double)msattn_load_f32(base, off, dt);
}

static inline void msattn_store_f64(void *base, int64_t off, msattn_dtype dt, double v) {
    switch (dt) {
    case MSATTN_F32: ((float *)base)[off] = (float)v; break;
    case MSATTN_F64: ((double *)base)[off] = v; break;
    case MSATTN_BF16: ((uint16_t *)base)[off] = msattn_f32_to_bf16((float)v); break;
    default: ((uint16_t *)base)[off] = msattn_f32_to_f16((float)v);
    }
}

// ----------------------------------------------------------------------------------------------
// the macro vocabulary, for the ISA files only

#if defined(MSATTN_ISA)

#define MSATTN_ISA_SCALAR 0
#define MSATTN_ISA_AVX2 1
#define MSATTN_ISA_AVX512 2

#define MS_LOG2E 1.4426950408889634f

/* 2^f for f in [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 7, relative error < 6e-9 */
#define MS_EXP2_POLY(f)                                                                           \
    vf_fma(vf_fma(vf_fma(vf_fma(vf_fma(vf_fma(vf_fma(vf_set1(1.525273380405984e-05f), f,          \
                                                     vf_set1(1.5403530393381606e-04f)), f,        \
                                              vf_set1(1.3333558146428443e-03f)), f,               \
                                       vf_set1(9.618129107628477e-03f)), f,                       \
                                vf_set1(5.550410866482158e-02f)), f,                              \
                         vf_set1(2.402265069591007e-01f)), f,                                     \
                  vf_set1(6.931471805599453e-01f)), f, vf_set1(1.0f))

#if MSATTN_ISA == MSATTN_ISA_AVX512
#include <immintrin.h>
#define MS_SUFFIX(name) name##_avx512
#define VL 16
typedef __m512 vf;
#define vf_zero() _mm512_setzero_ps()
#define vf_set1(x) _mm512_set1_ps(x)
#define vf_load(p) _mm512_loadu_ps(p)
#define vf_store(p, v) _mm512_storeu_ps(p, v)
#define vf_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vf_add(a, b) _mm512_add_ps(a, b)
#define vf_sub(a, b) _mm512_sub_ps(a, b)
#define vf_mul(a, b) _mm512_mul_ps(a, b)
#define vf_max(a, b) _mm512_max_ps(a, b)
#define vf_hsum(v) _mm512_reduce_add_ps(v)
#define vf_hmax(v) _mm512_reduce_max_ps(v)
static inline vf vf_exp2(vf x) {
    /* max/min with the constant first keep a NaN x (they return the second operand on NaN) */
    x = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-160.0f), x));
    vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf f = _mm512_sub_ps(x, n);
    return _mm512_scalef_ps(MS_EXP2_POLY(f), n); /* 2^-160 underflows to exactly 0 */
}
/* 16 bf16 / f16 values to fp32 */
#define vf_from_bf16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define vf_from_f16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))

#elif MSATTN_ISA == MSATTN_ISA_AVX2
#include <immintrin.h>
#define MS_SUFFIX(name) name##_avx2
#define VL 8
typedef __m256 vf;
#define vf_zero() _mm256_setzero_ps()
#define vf_set1(x) _mm256_set1_ps(x)
#define vf_load(p) _mm256_loadu_ps(p)
#define vf_store(p, v) _mm256_storeu_ps(p, v)
#define vf_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vf_add(a, b) _mm256_add_ps(a, b)
#define vf_sub(a, b) _mm256_sub_ps(a, b)
#define vf_mul(a, b) _mm256_mul_ps(a, b)
#define vf_max(a, b) _mm256_max_ps(a, b)
static inline float vf_hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vf_hmax(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf vf_exp2(vf x) {
    vf nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    vf tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ); /* flush to exactly 0 */
    vf xc = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), x));
    vf n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf f = _mm256_sub_ps(xc, n);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    vf r = _mm256_mul_ps(MS_EXP2_POLY(f), _mm256_castsi256_ps(e));
    r = _mm256_andnot_ps(tiny, r);
    return _mm256_blendv_ps(r, x, nan);
}
#define vf_from_bf16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define vf_from_f16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))

#else /* scalar */
#include <math.h>
#define MS_SUFFIX(name) name##_scalar
#define VL 1
typedef float vf;
#define vf_zero() 0.0f
#define vf_set1(x) ((float)(x))
#define vf_load(p) (*(p))
#define vf_store(p, v) (*(p) = (v))
#define vf_fma(a, b, c) ((a) * (b) + (c))
#define vf_add(a, b) ((a) + (b))
#define vf_sub(a, b) ((a) - (b))
#define vf_mul(a, b) ((a) * (b))
#define vf_max(a, b) ((a) > (b) ? (a) : (b))
#define vf_hsum(v) (v)
#define vf_hmax(v) (v)
#define vf_exp2(x) exp2f(x)
#define vf_from_bf16(p) msattn_bf16_to_f32(*(const uint16_t *)(p))
#define vf_from_f16(p) msattn_f16_to_f32(*(const uint16_t *)(p))
#endif

#endif /* MSATTN_ISA */
#endif /* MSATTN_SIMD_H */
