/*
 * common.h -- small helpers every CPU kernel shares: strided row loads and stores with dtype
 * conversion, RoPE rotation of a row, scratch carving, and the key list of an MS group.
 */
#ifndef MSATTN_CPU_COMMON_H
#define MSATTN_CPU_COMMON_H

#include <math.h>
#include <string.h>

#include "../msattn_regions.h"
#include "simd.h"

#define MS_LN2 0.6931471805599453
#define MS_LOG2E_D 1.4426950408889634

static inline int64_t ms_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* dst[0..n) = a * row (b, h, t) of v; rows with a unit dim stride take the vector path */
static inline void ms_load_row(float *dst, const msattn_simd_ops *ops, const msattn_view *v,
                               msattn_dtype dt, int64_t b, int64_t h, int64_t t, int n, float a) {
    const int64_t off = b * v->sb + h * v->sh + t * v->sn;
    const size_t esize = dt == MSATTN_F64 ? 8 : dt == MSATTN_F32 ? 4 : 2;
    if (v->sd == 1) {
        ops->to_f32(dst, (const char *)v->data + off * (int64_t)esize, n, dt, a);
    } else {
        for (int i = 0; i < n; ++i) dst[i] = msattn_load_f32(v->data, off + i * v->sd, dt) * a;
    }
}

/* row (b, h, t) of v = src[0..n) rounded to dt */
static inline void ms_store_row(const msattn_view *v, const msattn_simd_ops *ops, msattn_dtype dt,
                                int64_t b, int64_t h, int64_t t, const float *src, int n) {
    const int64_t off = b * v->sb + h * v->sh + t * v->sn;
    const size_t esize = dt == MSATTN_F64 ? 8 : dt == MSATTN_F32 ? 4 : 2;
    if (v->sd == 1) {
        ops->from_f32((char *)v->data + off * (int64_t)esize, src, n, dt);
    } else {
        for (int i = 0; i < n; ++i) msattn_store_f64(v->data, off + i * v->sd, dt, src[i]);
    }
}

/* rotate x by the angles of position pos (sign +1), or back (sign -1): pairs (x[i], x[i + dim/2]) */
static inline void ms_rope_rotate(float *x, const msattn_rope *r, int64_t pos, float sign) {
    const int half = r->dim / 2;
    const float *c = r->cos + pos * half, *s = r->sin + pos * half;
    for (int i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half], si = sign * s[i];
        x[i] = x1 * c[i] - x2 * si;
        x[i + half] = x2 * c[i] + x1 * si;
    }
}

static inline void ms_rope_rotate_f64(double *x, const msattn_rope *r, int64_t pos, double sign) {
    const int half = r->dim / 2;
    const float *c = r->cos + pos * half, *s = r->sin + pos * half;
    for (int i = 0; i < half; ++i) {
        const double x1 = x[i], x2 = x[i + half], si = sign * s[i];
        x[i] = x1 * c[i] - x2 * si;
        x[i + half] = x2 * c[i] + x1 * si;
    }
}

/* carve n elements of size esize from a scratch cursor, 64-byte aligned */
static inline void *ms_carve(char **cursor, size_t n, size_t esize) {
    char *p = *cursor;
    *cursor += (n * esize + 63) / 64 * 64;
    return p;
}

static inline int ms_valid(const uint8_t *mask, int64_t mask_sb, int64_t b, int64_t t) {
    return mask == NULL || mask[b * mask_sb + t] != 0;
}

/* Keys of group ga of (b, h): the valid tokens of the selected regions (index row `sel`, ascending),
 * then the valid tokens of the group's own span. Writes their absolute positions to kpos and their
 * compact positions (rope="selected") to kcomp; returns their number. *n_sel_out: selected regions.
 * Causal lists are ascending in position. */
static inline int64_t ms_group_keys(const int32_t *sel, int topk, int64_t ga, int64_t span,
                                    int block_k, int64_t N, const uint8_t *mask, int64_t mask_sb,
                                    int64_t b, int32_t *kpos, int32_t *kcomp, int64_t *n_sel_out) {
    int64_t n = 0, n_sel = 0;
    for (int i = 0; i < topk && sel[i] >= 0; ++i, ++n_sel) {
        msattn_range tok = msattn_key_region(sel[i], block_k, N);
        for (int64_t t = tok.begin; t < tok.end; ++t) {
            if (!ms_valid(mask, mask_sb, b, t)) continue;
            kpos[n] = (int32_t)t;
            kcomp[n] = (int32_t)msattn_compact_selected(i, t - tok.begin, block_k);
            ++n;
        }
    }
    msattn_range own = msattn_group_own_keys(ga, span, N);
    for (int64_t t = own.begin; t < own.end; ++t) {
        if (!ms_valid(mask, mask_sb, b, t)) continue;
        kpos[n] = (int32_t)t;
        kcomp[n] = (int32_t)msattn_compact_own(n_sel, block_k, t, ga, span);
        ++n;
    }
    *n_sel_out = n_sel;
    return n;
}

/* number of entries of a sorted position list <= pos */
static inline int64_t ms_upper_bound(const int32_t *x, int64_t n, int64_t pos) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (x[mid] <= pos) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

#endif /* MSATTN_CPU_COMMON_H */
