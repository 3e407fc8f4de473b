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

/* s[c] = (q . kt[:, c]) / count[c] for c < n, kt (d, ldk) holding candidate c in column c; each dot is
 * q[0] k[0], then one fused multiply-add per dim in order: the same bits on every instruction set (and
 * on the GPU, csrc/cuda/select.cu). Returns whether every s[c] < below (false for a NaN score) */
static int MS_SUFFIX(score_block)(double *s, const double *q, const double *kt, int64_t ldk, int n, int d,
                                  const double *count, double below) {
    int c = 0, all_below = 1;
#if MSATTN_ISA != MSATTN_ISA_SCALAR
    const vd lim = vd_set1(below);
    /* four vectors of candidates at once: independent FMA chains hide the FMA latency */
    for (; c + 4 * VDL <= n; c += 4 * VDL) {
        vd a0 = vd_zero(), a1 = vd_zero(), a2 = vd_zero(), a3 = vd_zero();
        for (int i = 0; i < d; ++i) {
            const vd qi = vd_set1(q[i]);
            const double *k = kt + (int64_t)i * ldk + c;
            a0 = vd_fma(qi, vd_load(k), a0);
            a1 = vd_fma(qi, vd_load(k + VDL), a1);
            a2 = vd_fma(qi, vd_load(k + 2 * VDL), a2);
            a3 = vd_fma(qi, vd_load(k + 3 * VDL), a3);
        }
        a0 = vd_div(a0, vd_load(count + c));
        a1 = vd_div(a1, vd_load(count + c + VDL));
        a2 = vd_div(a2, vd_load(count + c + 2 * VDL));
        a3 = vd_div(a3, vd_load(count + c + 3 * VDL));
        all_below &= vd_all_lt(a0, lim) & vd_all_lt(a1, lim) & vd_all_lt(a2, lim) & vd_all_lt(a3, lim);
        vd_store(s + c, a0);
        vd_store(s + c + VDL, a1);
        vd_store(s + c + 2 * VDL, a2);
        vd_store(s + c + 3 * VDL, a3);
    }
    for (; c + VDL <= n; c += VDL) {
        vd a = vd_zero();
        for (int i = 0; i < d; ++i) a = vd_fma(vd_set1(q[i]), vd_load(kt + (int64_t)i * ldk + c), a);
        a = vd_div(a, vd_load(count + c));
        all_below &= vd_all_lt(a, lim);
        vd_store(s + c, a);
    }
#endif
    for (; c < n; ++c) { /* fma() rounds once, as the vector FMA does */
        double acc = 0.0;
        for (int i = 0; i < d; ++i) acc = fma(q[i], kt[(int64_t)i * ldk + c], acc);
        s[c] = acc / count[c];
        all_below &= s[c] < below;
    }
    return all_below;
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

const msattn_simd_ops MS_SUFFIX(msattn_simd) = {
#if MSATTN_ISA == MSATTN_ISA_AVX512
    "avx512",
#elif MSATTN_ISA == MSATTN_ISA_AVX2
    "avx2",
#else
    "scalar",
#endif
    MS_SUFFIX(qk),
    MS_SUFFIX(pv),
    MS_SUFFIX(softmax_update),
    MS_SUFFIX(probs_ds_rows),
    MS_SUFFIX(max),
    MS_SUFFIX(exp2_sum),
    MS_SUFFIX(exp2_sub),
    MS_SUFFIX(scale),
    MS_SUFFIX(mul_sub),
    MS_SUFFIX(mul_sub_vec),
    MS_SUFFIX(dot),
    MS_SUFFIX(score_block),
    MS_SUFFIX(to_f32),
    MS_SUFFIX(from_f32),
};
