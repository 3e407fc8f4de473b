/*
 * simd_kernels.h -- the vector loops of msattn_simd_ops, written once in simd.h's vocabulary.
 *
 * Included by simd_avx512.c, simd_avx2.c and simd_scalar.c with MSATTN_ISA set; each defines the
 * table msattn_simd_<isa>. Loops follow one pattern: the vector loop, then a "leftovers" tail.
 *
 * The two tile loops carry the flops:
 *  qk: s (4, 64) = a (4, d) . bt (d, 64). Per d: broadcast a[r][d] for 4 rows, load 64 columns of
 *      bt, 4 x 64 FMAs into 4 x (64 / VL) accumulators (16 zmm on AVX-512). Columns are done in
 *      passes of QK_NV vectors so the accumulators stay in registers on narrower ISAs.
 *  pv: o (4, dp) += p (4, 64) . b (64, dp). Per column c: broadcast p[r][c], load PV_NV vectors of
 *      b's row, 4 x PV_NV FMAs; the o tile stays in registers over all 64 columns.
 */
#include <math.h>
#include <string.h>

#include "simd.h"

#if MSATTN_ISA == MSATTN_ISA_AVX512
#include "screen_bounds.h"
#define QK_NV 4 /* vectors per row per pass: 4 x 4 = 16 accumulators */
#define PV_NV 4
#elif MSATTN_ISA == MSATTN_ISA_AVX2
#define QK_NV 2 /* 4 x 2 = 8 accumulators of 16 ymm */
#define PV_NV 2
#else
#define QK_NV 4
#define PV_NV 4
#endif

#define MS_INLINE static inline __attribute__((always_inline))

// ----------------------------------------------------------------------------------------------
// score tile

static void MS_SUFFIX(qk)(float *s, const float *a, int64_t lda, int rows, const float *bt,
                          int64_t ldb, int d) {
    /* rows < 4 repeat the last row; only valid rows are stored */
    const float *a0 = a;
    const float *a1 = a + (rows > 1 ? 1 : 0) * lda;
    const float *a2 = a + (rows > 2 ? 2 : rows - 1) * lda;
    const float *a3 = a + (rows > 3 ? 3 : rows - 1) * lda;
    for (int c0 = 0; c0 < MSATTN_TILE; c0 += QK_NV * VL) {
        vf acc[4][QK_NV];
#pragma GCC unroll 4
        for (int v = 0; v < QK_NV; ++v) acc[0][v] = acc[1][v] = acc[2][v] = acc[3][v] = vf_zero();
        const float *b = bt + c0;
        for (int k = 0; k < d; ++k, b += ldb) {
            vf x0 = vf_set1(a0[k]), x1 = vf_set1(a1[k]), x2 = vf_set1(a2[k]), x3 = vf_set1(a3[k]);
#pragma GCC unroll 4
            for (int v = 0; v < QK_NV; ++v) {
                vf bv = vf_load(b + v * VL);
                acc[0][v] = vf_fma(x0, bv, acc[0][v]);
                acc[1][v] = vf_fma(x1, bv, acc[1][v]);
                acc[2][v] = vf_fma(x2, bv, acc[2][v]);
                acc[3][v] = vf_fma(x3, bv, acc[3][v]);
            }
        }
#pragma GCC unroll 4
        for (int v = 0; v < QK_NV; ++v) {
            vf_store(s + 0 * MSATTN_TILE + c0 + v * VL, acc[0][v]);
            if (rows > 1) vf_store(s + 1 * MSATTN_TILE + c0 + v * VL, acc[1][v]);
            if (rows > 2) vf_store(s + 2 * MSATTN_TILE + c0 + v * VL, acc[2][v]);
            if (rows > 3) vf_store(s + 3 * MSATTN_TILE + c0 + v * VL, acc[3][v]);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// output tile

/* o[r][0 : nv*VL] += sum_c p[r][c] * b[c][0 : nv*VL], nv a compile-time constant after inlining */
MS_INLINE void MS_SUFFIX(pv_chunk)(float *o, int64_t ldo, const float *p, int rows, int ncols,
                                   const float *b, int64_t ldb, const int nv) {
    float *o0 = o;
    float *o1 = o + (rows > 1 ? 1 : 0) * ldo;
    float *o2 = o + (rows > 2 ? 2 : rows - 1) * ldo;
    float *o3 = o + (rows > 3 ? 3 : rows - 1) * ldo;
    const float *p0 = p;
    const float *p1 = p + (rows > 1 ? 1 : 0) * MSATTN_TILE;
    const float *p2 = p + (rows > 2 ? 2 : rows - 1) * MSATTN_TILE;
    const float *p3 = p + (rows > 3 ? 3 : rows - 1) * MSATTN_TILE;
    vf acc[4][PV_NV];
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v) {
        acc[0][v] = vf_load(o0 + v * VL);
        acc[1][v] = vf_load(o1 + v * VL);
        acc[2][v] = vf_load(o2 + v * VL);
        acc[3][v] = vf_load(o3 + v * VL);
    }
    for (int c = 0; c < ncols; ++c, b += ldb) {
        vf x0 = vf_set1(p0[c]), x1 = vf_set1(p1[c]), x2 = vf_set1(p2[c]), x3 = vf_set1(p3[c]);
#pragma GCC unroll 4
        for (int v = 0; v < nv; ++v) {
            vf bv = vf_load(b + v * VL);
            acc[0][v] = vf_fma(x0, bv, acc[0][v]);
            acc[1][v] = vf_fma(x1, bv, acc[1][v]);
            acc[2][v] = vf_fma(x2, bv, acc[2][v]);
            acc[3][v] = vf_fma(x3, bv, acc[3][v]);
        }
    }
    /* store the duplicated rows first so the real row is written last */
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v) {
        vf_store(o3 + v * VL, acc[3][v]);
        vf_store(o2 + v * VL, acc[2][v]);
        vf_store(o1 + v * VL, acc[1][v]);
        vf_store(o0 + v * VL, acc[0][v]);
    }
}

static void MS_SUFFIX(pv)(float *o, int64_t ldo, const float *p, int rows, int ncols,
                          const float *b, int64_t ldb, int dp) {
    int j = 0;
    for (; j + PV_NV * VL <= dp; j += PV_NV * VL)
        MS_SUFFIX(pv_chunk)(o + j, ldo, p, rows, ncols, b + j, ldb, PV_NV);
    // leftovers: dp is a multiple of 16, so what remains is whole vectors
    int rest = (dp - j) / VL;
#if PV_NV > 1
    if (rest >= 2) {
        MS_SUFFIX(pv_chunk)(o + j, ldo, p, rows, ncols, b + j, ldb, 2);
        j += 2 * VL;
        rest -= 2;
    }
#endif
#if PV_NV > 2
    if (rest >= 1) MS_SUFFIX(pv_chunk)(o + j, ldo, p, rows, ncols, b + j, ldb, 1);
#else
    (void)rest;
#endif
}

// ----------------------------------------------------------------------------------------------
// row operations of the online softmax and its backward

static void MS_SUFFIX(softmax_update)(float *s, int rows, int nc, float *m, float *l, float *o, int64_t ldo,
                                      int dp) {
    for (int r = 0; r < rows; ++r) {
        float *x = s + r * MSATTN_TILE;
        /* row max */
        int i = 0;
        float mx = -INFINITY;
#if VL > 1
        if (nc >= VL) {
            vf vm = vf_load(x);
            for (i = VL; i + VL <= nc; i += VL) vm = vf_max(vm, vf_load(x + i));
            mx = vf_hmax(vm);
        }
#endif
        for (; i < nc; ++i) mx = x[i] > mx ? x[i] : mx;
        const float mnew = mx > m[r] ? mx : m[r];
        if (mnew == -INFINITY) { /* nothing visible yet, or only NaN scores */
            for (int c = 0; c < nc; ++c)
                if (x[c] != x[c]) l[r] = NAN;
            memset(x, 0, (size_t)nc * sizeof(float));
            continue;
        }
        /* p = exp2(s - mnew) and its sum */
        vf acc = vf_zero(), vs = vf_set1(mnew);
        for (i = 0; i + VL <= nc; i += VL) {
            vf e = vf_exp2(vf_sub(vf_load(x + i), vs));
            vf_store(x + i, e);
            acc = vf_add(acc, e);
        }
        float sum = vf_hsum(acc);
        for (; i < nc; ++i) {
            x[i] = exp2f(x[i] - mnew);
            sum += x[i];
        }
        /* rescale what was accumulated under the old max */
        if (mnew != m[r]) {
            const float alpha = exp2f(m[r] - mnew);
            float *orow = o + r * ldo;
            vf va = vf_set1(alpha);
            for (i = 0; i + VL <= dp; i += VL) vf_store(orow + i, vf_mul(vf_load(orow + i), va));
            for (; i < dp; ++i) orow[i] *= alpha;
            l[r] *= alpha;
        }
        l[r] += sum;
        m[r] = mnew;
    }
}

static void MS_SUFFIX(probs_ds_rows)(float *s, const float *y, int rows, int nc, const float *sub,
                                     const float *c0) {
    for (int r = 0; r < rows; ++r) {
        float *x = s + r * MSATTN_TILE;
        const float *yr = y + r * MSATTN_TILE;
        vf vs = vf_set1(sub[r]), vc = vf_set1(c0[r]);
        int i = 0;
        for (; i + VL <= nc; i += VL)
            vf_store(x + i, vf_mul(vf_exp2(vf_sub(vf_load(x + i), vs)), vf_sub(vf_load(yr + i), vc)));
        for (; i < nc; ++i) x[i] = exp2f(x[i] - sub[r]) * (yr[i] - c0[r]);
    }
}

static float MS_SUFFIX(max)(const float *x, int n) {
    int i = 0;
    float m = -INFINITY;
#if VL > 1
    if (n >= VL) {
        vf vm = vf_load(x);
        for (i = VL; i + VL <= n; i += VL) vm = vf_max(vm, vf_load(x + i));
        m = vf_hmax(vm);
    }
#endif
    // leftovers
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
}

static float MS_SUFFIX(exp2_sum)(float *x, int n, float sub) {
    int i = 0;
    float sum = 0.0f;
    vf acc = vf_zero(), vs = vf_set1(sub);
    for (; i + VL <= n; i += VL) {
        vf e = vf_exp2(vf_sub(vf_load(x + i), vs));
        vf_store(x + i, e);
        acc = vf_add(acc, e);
    }
    sum = vf_hsum(acc);
    // leftovers
    for (; i < n; ++i) {
        x[i] = exp2f(x[i] - sub);
        sum += x[i];
    }
    return sum;
}

static void MS_SUFFIX(exp2_sub)(float *x, const float *sub, int n) {
    int i = 0;
    for (; i + VL <= n; i += VL) vf_store(x + i, vf_exp2(vf_sub(vf_load(x + i), vf_load(sub + i))));
    for (; i < n; ++i) x[i] = exp2f(x[i] - sub[i]);
}

static void MS_SUFFIX(scale)(float *x, int n, float a) {
    int i = 0;
    vf va = vf_set1(a);
    for (; i + VL <= n; i += VL) vf_store(x + i, vf_mul(vf_load(x + i), va));
    for (; i < n; ++i) x[i] *= a;
}

static void MS_SUFFIX(mul_sub)(float *x, const float *y, float c, int n) {
    int i = 0;
    vf vc = vf_set1(c);
    for (; i + VL <= n; i += VL)
        vf_store(x + i, vf_mul(vf_load(x + i), vf_sub(vf_load(y + i), vc)));
    for (; i < n; ++i) x[i] *= y[i] - c;
}

static void MS_SUFFIX(mul_sub_vec)(float *x, const float *y, const float *c, int n) {
    int i = 0;
    for (; i + VL <= n; i += VL)
        vf_store(x + i, vf_mul(vf_load(x + i), vf_sub(vf_load(y + i), vf_load(c + i))));
    for (; i < n; ++i) x[i] *= y[i] - c[i];
}

static float MS_SUFFIX(dot)(const float *x, const float *y, int n) {
    int i = 0;
    vf acc = vf_zero();
    for (; i + VL <= n; i += VL) acc = vf_fma(vf_load(x + i), vf_load(y + i), acc);
    float s = vf_hsum(acc);
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

/* The selection's score of a query-region mean q (double) and a key-region sum k (float), the same
 * bits on every instruction set and on the GPU (csrc/cuda/select.cu): dims padded with zeros to a
 * multiple of 8; partial l = fused multiply-adds over dims l, l + 8, l + 16, ... in order from +0;
 * dot = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)). AVX-512 keeps the eight partials in one
 * register; the other instruction sets spell them out. */
#if MSATTN_ISA != MSATTN_ISA_AVX512
static inline double MS_SUFFIX(dot8)(const double *q, const double *k, int d) {
    double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < d; i += 8)
        for (int l = 0; l < 8; ++l) {
            const int e = i + l;
            p[l] = fma(e < d ? q[e] : 0.0, e < d ? k[e] : 0.0, p[l]);
        }
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}
#else
/* lane r of the result = the tree sum above of the lanes of a[r] */
static inline __m512d ms_tree8_pd(const __m512d *a) {
    __m512d u[4];
    for (int i = 0; i < 4; ++i) /* lanes (2m, 2m+1) of a[2i], a[2i+1] summed pairwise */
        u[i] = _mm512_add_pd(_mm512_unpacklo_pd(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_pd(a[2 * i], a[2 * i + 1]));
    const __m512d x0 = _mm512_add_pd(_mm512_shuffle_f64x2(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f64x2(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512d x1 = _mm512_add_pd(_mm512_shuffle_f64x2(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f64x2(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_pd(_mm512_shuffle_f64x2(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f64x2(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if MSATTN_ISA == MSATTN_ISA_AVX512
/* appends to keep the c0 + r (r < 8, in mask m) whose v[r] is not below lim; returns how many. Writes
 * eight slots whatever it keeps (a compress to memory is microcoded and slow on AMD's Zen 4) */
static inline int ms_keep_not_below(int32_t *keep, __m512d v, __m512d lim, __mmask8 m, int c0) {
    const __mmask8 k = (__mmask8)(_mm512_cmp_pd_mask(v, lim, _CMP_NLT_UQ) & m);
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(c0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_storeu_si256((__m256i *)keep, _mm256_maskz_compress_epi32(k, idx));
    return __builtin_popcount((unsigned)k);
}
#endif

/* s[c] = score(q, sums + cand[c] * d) / counts[cand[c]] for c < n; keep[0..m) = the c whose s[c] is
 * not below `below` (NaN kept), ascending; returns m. keep has room for n + 8 */
static int MS_SUFFIX(score_block)(double *s, int32_t *keep, const double *q, const float *sums, const int32_t *cand,
                                  const int32_t *counts, int n, int d, double below) {
    int kept = 0;
#if MSATTN_ISA == MSATTN_ISA_AVX512
    /* eight candidates at a time (the last batch repeats its last candidate): a register of
     * partials per candidate, then one transposed tree reduction for the eight */
    const int dfull = d & ~7;
    const __mmask8 tail = (__mmask8)((1u << (d & 7)) - 1u);
    const __m512d lim = _mm512_set1_pd(below);
    for (int c = 0; c < n; c += 8) {
        const int m = n - c < 8 ? n - c : 8;
        const float *row[8];
        double cnt[8];
        for (int r = 0; r < 8; ++r) {
            const int32_t j = cand[c + (r < m ? r : m - 1)];
            row[r] = sums + (int64_t)j * d;
            cnt[r] = (double)counts[j];
        }
        __m512d acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_pd();
        for (int i = 0; i < dfull; i += 8) {
            const __m512d qi = _mm512_loadu_pd(q + i);
            for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_pd(qi, _mm512_cvtps_pd(_mm256_loadu_ps(row[r] + i)), acc[r]);
        }
        if (tail) { /* the last dims, and 0 * 0 for the padding, as dot8 */
            const __m512d qi = _mm512_maskz_loadu_pd(tail, q + dfull);
            for (int r = 0; r < 8; ++r)
                acc[r] = _mm512_fmadd_pd(qi, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(tail, row[r] + dfull)), acc[r]);
        }
        const __m512d v = _mm512_div_pd(ms_tree8_pd(acc), _mm512_loadu_pd(cnt));
        const __mmask8 valid = (__mmask8)((1u << m) - 1u);
        _mm512_mask_storeu_pd(s + c, valid, v);
        kept += ms_keep_not_below(keep + kept, v, lim, valid, c);
    }
#else
    double row[MSATTN_MAX_HEAD_DIM];
    for (int c = 0; c < n; ++c) {
        const float *k = sums + (int64_t)cand[c] * d;
        for (int i = 0; i < d; ++i) row[i] = (double)k[i];
        s[c] = MS_SUFFIX(dot8)(q, row, d) / (double)counts[cand[c]];
        if (!(s[c] < below)) keep[kept++] = c;
    }
#endif
    return kept;
}

/* Screening before exact scores, for blocks that many query regions score. A candidate's float score
 * (the same dot product in float32, any order: fused or not, d FMAs) differs from the exact one by
 * at most (d + 5) * 2^-24 * sum_i |q_i k_i| / count <= (d + 5) * 2^-24 * |q| |k| / count (Cauchy-Schwarz;
 * the 5 covers rounding q to float, the division, and the double path's own rounding). The select
 * pass gives qbound >= 4 (d + 5) 2^-24 |q| and kscale[c] >= |k_c| / count_c, rounded up; a candidate
 * whose float score plus qbound * kscale[c] is below the heap's last (rounded down to float) cannot
 * reach it, and only the others get exact scores (score_block). The factor 4 covers the rounding of
 * the bound and of the sum. Below float's normal range roundings are absolute (at most 2^-149 each,
 * or 2^-126 |other factor| where denormals are flushed): qbound adds 2^-118 sqrt(d) and the margin
 * qabs * kinv[c], qabs = 2^-118 (sqrt(d) |q| + d), covers them (msattn_amx_bounds gives the same
 * terms). The exact scores decide, so the selection is the one score_block gives.
 * The float scores are a matrix product: the attention's score tile (qk) on a panel of 64 candidates. */
static void MS_SUFFIX(screen_tile)(uint64_t *keep, float *lanes, float *ends, const float *a, int64_t lda, int rows,
                                   const float *kp, int d, const float *qbound, const float *qabs, const float *lim,
                                   const uint64_t *valid) {
    float s[MSATTN_ROWS * MSATTN_TILE] __attribute__((aligned(64)));
    MS_SUFFIX(qk)(s, a, lda, rows, kp, MSATTN_TILE, d);
    const float *kinv = kp + (int64_t)d * MSATTN_TILE, *kscale = kinv + MSATTN_TILE;
    for (int r = 0; r < rows; ++r) {
        uint64_t m = 0;
#if MSATTN_ISA == MSATTN_ISA_AVX512
        m = ms_bounds_row_avx512(lanes + 16 * r, ends + 2 * r, s + r * MSATTN_TILE, kinv, kscale, qbound[r], qabs[r],
                                 lim[r], valid[r]);
#else
        float h = -INFINITY, l = -INFINITY;
        for (int x = 0; x < 16; ++x) lanes[16 * r + x] = -INFINITY;
        for (int c = 0; c < MSATTN_TILE; ++c) {
            if (!((valid[r] >> c) & 1)) continue;
            const float f = s[r * MSATTN_TILE + c] * kinv[c], e = fmaf(qbound[r], kscale[c], qabs[r] * kinv[c]);
            const float up = f + e, down = f - e;
            m |= (uint64_t)!(up < lim[r]) << c;
            if (up != up) h = INFINITY;
            else if (up > h) h = up;
            if (down < INFINITY && down > lanes[16 * r + c % 16]) lanes[16 * r + c % 16] = down;
            if (down < INFINITY && down > l) l = down;
        }
        ends[2 * r] = l;
        ends[2 * r + 1] = h;
#endif
        keep[r] = m;
    }
}

// ----------------------------------------------------------------------------------------------
// conversions

static void MS_SUFFIX(to_f32)(float *dst, const void *src, int n, msattn_dtype dtype, float a) {
    int i = 0;
    vf va = vf_set1(a);
    switch (dtype) {
    case MSATTN_F32: {
        const float *s = (const float *)src;
        for (; i + VL <= n; i += VL) vf_store(dst + i, vf_mul(vf_load(s + i), va));
        break;
    }
    case MSATTN_BF16: {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + VL <= n; i += VL) vf_store(dst + i, vf_mul(vf_from_bf16(s + i), va));
        break;
    }
    case MSATTN_F16: {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + VL <= n; i += VL) vf_store(dst + i, vf_mul(vf_from_f16(s + i), va));
        break;
    }
    default: break;
    }
    // leftovers (and every element of a double input)
    for (; i < n; ++i) dst[i] = msattn_load_f32(src, i, dtype) * a;
}

static void MS_SUFFIX(from_f32)(void *dst, const float *src, int n, msattn_dtype dtype) {
    int i = 0;
    switch (dtype) {
    case MSATTN_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    case MSATTN_F64:
        for (; i < n; ++i) ((double *)dst)[i] = src[i];
        return;
    case MSATTN_BF16:
        for (; i < n; ++i) ((uint16_t *)dst)[i] = msattn_f32_to_bf16(src[i]);
        return;
    default:
        for (; i < n; ++i) ((uint16_t *)dst)[i] = msattn_f32_to_f16(src[i]);
        return;
    }
}

/* the table of this instruction set; screen_amx: the AMX screen (amx.c) or NULL */
#define MS_TABLE(table, isa_name, screen_amx)                                                          \
    const msattn_simd_ops table = {isa_name, MS_SUFFIX(qk), MS_SUFFIX(pv), MS_SUFFIX(softmax_update),  \
                                   MS_SUFFIX(probs_ds_rows), MS_SUFFIX(max), MS_SUFFIX(exp2_sum),      \
                                   MS_SUFFIX(exp2_sub), MS_SUFFIX(scale), MS_SUFFIX(mul_sub),          \
                                   MS_SUFFIX(mul_sub_vec), MS_SUFFIX(dot), MS_SUFFIX(score_block),     \
                                   MS_SUFFIX(screen_tile), MS_SUFFIX(to_f32), MS_SUFFIX(from_f32),     \
                                   screen_amx};

#if MSATTN_ISA == MSATTN_ISA_AVX512
MS_TABLE(msattn_simd_avx512, "avx512", NULL)
/* AVX-512 with the selection's first screening pass on AMX tiles (amx.c) */
MS_TABLE(msattn_simd_amx, "amx", msattn_screen_amx)
#elif MSATTN_ISA == MSATTN_ISA_AVX2
MS_TABLE(msattn_simd_avx2, "avx2", NULL)
#else
MS_TABLE(msattn_simd_scalar, "scalar", NULL)
#endif

