/*
 * self_extend.c -- SelfExtend attention forward and backward on the CPU (DESIGN section 3).
 *
 * Dense attention on un-rotated q and k: the kernel rotates them itself, with two rotations per
 * score. A query at position i (the last Nq of N, causal mask bottom-right) scores key j as
 *   near    |i - j| < W          q rotated at i, k at j (ordinary RoPE)
 *   past    i - j >= W           q rotated at floor(i/G) + W - floor(W/G), k at floor(j/G)
 *   future  j - i >= max(W, 1)   (non-causal only) q at floor(i/G) - W + floor(W/G), k at floor(j/G)
 * so the distance beyond the window is floor(i/G) - floor(j/G) + W - floor(W/G), with its sign.
 * The position arithmetic is msattn_regions.h's (msattn_self_extend_*). Padded keys are never
 * attended; sliding_window > 0 hides keys with |i - j| >= sliding_window (Mistral).
 *
 *   forward   item (b, h, query block): the block's queries of every head of the GQA group are
 *             loaded once in each rotation they use (times scale*log2(e)); the visible keys are
 *             walked in tiles of 64, each packed transposed in the rotations the item needs. Per
 *             (4 queries x 64 keys) tile the distances are classified: a tile of one kind costs one
 *             score tile (most of them: the grouped region far from the diagonal, the band inside
 *             the window); a tile across the window boundary computes each kind's tile and picks
 *             per element. Online softmax in the log2 domain; lse saved. An item with at most 8
 *             query rows (decoding) scores K rows in place instead of packing them.
 *   backward  pass 1, item (b, h, query block): delta = rowsum(dO * O) - dlse and dQ. dS is split by
 *             the kind of each score, accumulated against the keys in that rotation, and each part
 *             is rotated back from its query position at the end.
 *             pass 2, item (b, h, key block): dK and dV of the block's keys, loaded once in both
 *             rotations; the queries that see them are packed 64 at a time (Q in three rotations,
 *             dO, lse, delta), walked in position order: each key's sums run in the same order
 *             however items are scheduled, so gradients are deterministic, with no atomics.
 *   _ref      naive twins in double, one query at a time; they also serve fp64 inputs.
 *
 * A query with no visible key gets output 0 and lse -inf; backward treats lse -inf as "no keys".
 *
 * Legend: B batch, Hq/Hkv heads, hg = Hq/Hkv, N keys, Nq queries (positions q0 = N - Nq .. N-1),
 * D head dim, Dp = D rounded up to 16, G group_size, W window, SW sliding_window, R = hg * block_q
 * query rows of an item (row r: head h*hg + r / nrow, position i0 + r % nrow).
 */
#include <stdlib.h>

#include "common.h"

enum { SE_NEAR = 1, SE_PAST = 2, SE_FUTURE = 4 }; /* the kind of a score; 0: invisible */

typedef struct {
    int64_t N, Nq, q0, D, Dp, hg, G, W, SW, R;
    int causal;
    float c; /* scale * log2(e) */
} se_dims;

static se_dims se_dims_of(const msattn_self_extend_params *p) {
    se_dims d;
    d.N = p->N; d.Nq = p->Nq; d.q0 = (int64_t)p->N - p->Nq; d.D = p->D; d.Dp = ms_round_up(p->D, MSATTN_DPAD);
    d.hg = p->Hq / p->Hkv; d.G = p->group_size; d.W = p->window; d.SW = p->sliding_window;
    d.R = d.hg * (p->block_q > 0 ? p->block_q : 1);
    d.causal = p->causal;
    d.c = (float)(p->scale * MS_LOG2E_D);
    return d;
}

static int se_bad_args(const msattn_self_extend_params *p) {
    return p->rope.cos == NULL || p->rope.sin == NULL || p->rope.len < p->N || p->rope.dim < 2 ||
           p->rope.dim > p->D || p->group_size < 1 || p->window < 0 || p->sliding_window < 0 ||
           p->block_q < 1 || p->block_kv < 1 || p->Hkv < 1 || p->Hq % p->Hkv != 0;
}

// ----------------------------------------------------------------------------------------------
// positions and kinds

/* the kind of the score of query position i against key position j */
static inline int se_kind(const se_dims *d, int64_t i, int64_t j) {
    if (d->causal && j > i) return 0;
    if (d->SW > 0 && (i - j >= d->SW || j - i >= d->SW)) return 0;
    if (msattn_self_extend_is_neighbour(i, j, (int)d->W) && msattn_self_extend_is_neighbour(j, i, (int)d->W))
        return SE_NEAR;
    return i >= j ? SE_PAST : SE_FUTURE;
}

/* where a query at i / a key at j is rotated for a score of this kind */
static inline int64_t se_query_pos(const se_dims *d, int kind, int64_t i) {
    if (kind == SE_NEAR) return i;
    const int64_t past = msattn_self_extend_query_pos(i, (int)d->G, (int)d->W);
    return kind == SE_PAST ? past : past - 2 * (d->W - d->W / d->G);
}
static inline int64_t se_key_pos(const se_dims *d, int kind, int64_t j) {
    return kind == SE_NEAR ? j : msattn_self_extend_key_pos(j, (int)d->G);
}

/* can a query at i have a score of this kind at all? Then its rotation lies in -(N-1)..N-1:
 * past needs i >= W, and then floor(i/G) + W - floor(W/G) <= i (x - floor(x/G) grows with x);
 * future needs i + max(W, 1) <= N - 1, and then |floor(i/G) - W + floor(W/G)| <= N - 1. */
static inline int se_query_uses(const se_dims *d, int kind, int64_t i) {
    if (kind == SE_NEAR) return 1;
    if (kind == SE_PAST) return i >= d->W;
    return !d->causal && i + (d->W > 0 ? d->W : 1) <= d->N - 1;
}

/* RoPE at any position: a negative one rotates backwards */
static inline void se_rotate(float *x, const msattn_rope *r, int64_t pos, float sign) {
    if (pos < 0) { pos = -pos; sign = -sign; }
    ms_rope_rotate(x, r, pos, sign);
}
static inline void se_rotate_f64(double *x, const msattn_rope *r, int64_t pos, double sign) {
    if (pos < 0) { pos = -pos; sign = -sign; }
    ms_rope_rotate_f64(x, r, pos, sign);
}

/* The kinds among the pairs (query positions [ilo, ihi]) x (key positions [jlo, jhi]), a superset.
 * *mixed = 0 promises that every pair is visible and of the one returned kind: the tile then needs
 * no per-element work. Returns 0 when no pair is visible. */
static int se_tile_kinds(const se_dims *d, int64_t ilo, int64_t ihi, int64_t jlo, int64_t jhi, int *mixed) {
    const int64_t lo = ilo - jhi, hi = ihi - jlo; /* distances i - j */
    int64_t vlo = lo, vhi = hi;
    if (d->causal && vlo < 0) vlo = 0;
    if (d->SW > 0) {
        if (vhi > d->SW - 1) vhi = d->SW - 1;
        if (vlo < 1 - d->SW) vlo = 1 - d->SW;
    }
    *mixed = 0;
    if (vlo > vhi) return 0;
    int kinds = 0;
    if (d->W > 0 && vlo < d->W && vhi > -d->W) kinds |= SE_NEAR;
    if (vhi >= d->W) kinds |= SE_PAST;
    if (vlo < 0 && vlo <= -d->W) kinds |= SE_FUTURE;
    *mixed = vlo != lo || vhi != hi || (kinds & (kinds - 1)) != 0;
    return kinds;
}

/* the valid keys of row b among positions [jlo, jhi], ascending; returns their number */
static int64_t se_keys(const msattn_self_extend_params *p, int64_t b, int64_t jlo, int64_t jhi, int32_t *kpos) {
    int64_t n = 0;
    for (int64_t t = jlo; t <= jhi; ++t)
        if (ms_valid(p->key_mask, p->mask_sb, b, t)) kpos[n++] = (int32_t)t;
    return n;
}

/* key positions a query block [i0, i1) can see */
static void se_key_range(const se_dims *d, int64_t i0, int64_t i1, int64_t *jlo, int64_t *jhi) {
    *jlo = 0;
    *jhi = d->causal ? i1 - 1 : d->N - 1;
    if (d->SW > 0) {
        *jlo = msattn_max64(0, i0 - d->SW + 1);
        if (!d->causal) *jhi = msattn_min64(d->N - 1, i1 - 1 + d->SW - 1);
    }
}

// ----------------------------------------------------------------------------------------------
// score tiles

/* scratch tiles of one (4, 64) score tile: the merged scores, each kind's, and each element's kind */
typedef struct {
    float *s, *sn, *sp, *sf, *x;
    uint8_t *kk;
} se_tiles;

/* scores of `rows` rows against 64 columns. For kind k the score tile is a_k (rows, D at stride lda)
 * times b_k (transposed, (D, 64)). Rows and columns are at positions rp[r] and cp[c]; queries are
 * the rows when rows_are_queries. One kind and nothing invisible (!mixed): one qk into t->s.
 * Otherwise every present kind's tile is computed and merged per element (invisible: -inf), and
 * t->kk records each element's kind. Returns t->s. */
static float *se_scores(const msattn_simd_ops *ops, const se_dims *d, const se_tiles *t, int kinds, int mixed,
                        const float *an, const float *ap, const float *af, int64_t lda, int rows, const float *bn,
                        const float *bp, const float *bf, int nc, const int32_t *rp, const int32_t *cp,
                        int rows_are_queries) {
    const int D = (int)d->D;
    if (!mixed) {
        const float *a = kinds == SE_NEAR ? an : kinds == SE_PAST ? ap : af;
        const float *b = kinds == SE_NEAR ? bn : kinds == SE_PAST ? bp : bf;
        ops->qk(t->s, a, lda, rows, b, MSATTN_TILE, D);
        return t->s;
    }
    if (kinds & SE_NEAR) ops->qk(t->sn, an, lda, rows, bn, MSATTN_TILE, D);
    if (kinds & SE_PAST) ops->qk(t->sp, ap, lda, rows, bp, MSATTN_TILE, D);
    if (kinds & SE_FUTURE) ops->qk(t->sf, af, lda, rows, bf, MSATTN_TILE, D);
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < nc; ++c) {
            const int64_t i = rows_are_queries ? rp[r] : cp[c], j = rows_are_queries ? cp[c] : rp[r];
            const int k = se_kind(d, i, j), e = r * MSATTN_TILE + c;
            t->kk[e] = (uint8_t)k;
            t->s[e] = k == SE_NEAR ? t->sn[e] : k == SE_PAST ? t->sp[e] : k == SE_FUTURE ? t->sf[e] : -INFINITY;
        }
    }
    return t->s;
}

/* o_k (rows, dp at stride ldo) += (x where the kind is k) . b_k (nc rows, dp at stride ldb), for every
 * kind present; the kinds of a mixed tile are in t->kk (from se_scores) */
static void se_pv_split(const msattn_simd_ops *ops, const se_tiles *t, int kinds, int mixed, const float *x,
                        int rows, int nc, float *on, float *op, float *of, int64_t ldo, const float *bn,
                        const float *bp, const float *bf, int64_t ldb, int dp) {
    if (!mixed) {
        float *o = kinds == SE_NEAR ? on : kinds == SE_PAST ? op : of;
        const float *b = kinds == SE_NEAR ? bn : kinds == SE_PAST ? bp : bf;
        ops->pv(o, ldo, x, rows, nc, b, ldb, dp);
        return;
    }
    for (int k = SE_NEAR; k <= SE_FUTURE; k <<= 1) {
        if (!(kinds & k)) continue;
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < nc; ++c) {
                const int e = r * MSATTN_TILE + c;
                t->x[e] = t->kk[e] == k ? x[e] : 0.0f;
            }
        ops->pv(k == SE_NEAR ? on : k == SE_PAST ? op : of, ldo, t->x, rows, nc,
                k == SE_NEAR ? bn : k == SE_PAST ? bp : bf, ldb, dp);
    }
}

// ----------------------------------------------------------------------------------------------
// packing

/* query rows of one head: positions i0 .. i0+n-1 of view v (times a) into qn (n, Dp) rotated at
 * the near position, and into qp / qf (when not NULL) at the past / future positions; a row that
 * can have no score of a kind gets zeros there */
static void se_load_queries(const msattn_self_extend_params *p, const msattn_simd_ops *ops, const se_dims *d,
                            int64_t b, int64_t hq, int64_t i0, int n, float a, float *qn, float *qp, float *qf) {
    for (int r = 0; r < n; ++r) {
        const int64_t i = i0 + r;
        float *xn = qn + r * d->Dp;
        ms_load_row(xn, ops, &p->q, p->dtype, b, hq, i - d->q0, (int)d->D, a);
        memset(xn + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
        float *xs[2] = {qp ? qp + r * d->Dp : NULL, qf ? qf + r * d->Dp : NULL};
        for (int v = 0; v < 2; ++v) {
            const int kind = v == 0 ? SE_PAST : SE_FUTURE;
            if (!xs[v]) continue;
            if (se_query_uses(d, kind, i)) {
                memcpy(xs[v], xn, (size_t)d->Dp * sizeof(float));
                se_rotate(xs[v], &p->rope, se_query_pos(d, kind, i), 1.0f);
            } else {
                memset(xs[v], 0, (size_t)d->Dp * sizeof(float));
            }
        }
        se_rotate(xn, &p->rope, i, 1.0f);
    }
}

/* the keys kpos[0 .. nc) of (b, h), nc <= 64, each output when not NULL:
 *   ktn, ktg   K transposed (D, 64), rotated at the near / grouped key position; columns >= nc zero
 *   krn, krg   K as rows (64, Dp) in those rotations
 *   vt, vr     V transposed (D, 64) / as rows (64, Dp) */
static void se_pack_keys(const msattn_self_extend_params *p, const msattn_simd_ops *ops, const se_dims *d,
                         int64_t b, int64_t h, const int32_t *kpos, int nc, float *ktn, float *ktg, float *krn,
                         float *krg, float *vt, float *vr, float *tmp) {
    const int64_t D = d->D, Dp = d->Dp;
    float *xn = tmp, *xg = tmp + Dp;
    for (int c = 0; c < MSATTN_TILE; ++c) {
        if (c < nc) {
            const int64_t j = kpos[c];
            ms_load_row(xn, ops, &p->k, p->dtype, b, h, j, (int)D, 1.0f);
            memset(xn + D, 0, (size_t)(Dp - D) * sizeof(float));
            if (ktg || krg) {
                memcpy(xg, xn, (size_t)Dp * sizeof(float));
                se_rotate(xg, &p->rope, se_key_pos(d, SE_PAST, j), 1.0f);
            }
            if (ktn || krn) se_rotate(xn, &p->rope, j, 1.0f);
        } else {
            memset(xn, 0, (size_t)Dp * sizeof(float));
            memset(xg, 0, (size_t)Dp * sizeof(float));
        }
        if (ktn) for (int64_t x = 0; x < D; ++x) ktn[x * MSATTN_TILE + c] = xn[x];
        if (ktg) for (int64_t x = 0; x < D; ++x) ktg[x * MSATTN_TILE + c] = xg[x];
        if (krn && c < nc) memcpy(krn + c * Dp, xn, (size_t)Dp * sizeof(float));
        if (krg && c < nc) memcpy(krg + c * Dp, xg, (size_t)Dp * sizeof(float));
        if (vt || vr) {
            if (c < nc) {
                ms_load_row(xn, ops, &p->v, p->dtype, b, h, kpos[c], (int)D, 1.0f);
                memset(xn + D, 0, (size_t)(Dp - D) * sizeof(float));
            } else {
                memset(xn, 0, (size_t)Dp * sizeof(float));
            }
            if (vt) for (int64_t x = 0; x < D; ++x) vt[x * MSATTN_TILE + c] = xn[x];
            if (vr && c < nc) memcpy(vr + c * Dp, xn, (size_t)Dp * sizeof(float));
        }
    }
}

/* write a finished softmax row: o / l and lse; l == 0 (no visible key): 0 and -inf */
static void se_finish_row(const msattn_self_extend_params *p, const msattn_simd_ops *ops, const se_dims *d,
                          int64_t b, int64_t hq, int64_t i, float *o, float m, float l) {
    const int64_t row = ((int64_t)b * p->Hq + hq) * d->Nq + (i - d->q0);
    float *lse = (float *)p->lse;
    if (l != 0.0f) { /* NaN included: NaN in, NaN out */
        ops->scale(o, (int)d->D, 1.0f / l);
        lse[row] = (float)((m + log2((double)l)) * MS_LN2);
    } else {
        memset(o, 0, (size_t)d->D * sizeof(float));
        lse[row] = -INFINITY;
    }
    ms_store_row(&p->out, ops, p->dtype, b, hq, i - d->q0, o, (int)d->D);
}

/* items with at most this many query rows (decoding) score K rows in place instead of packing */
#define SE_DIRECT_ROWS 8

// ----------------------------------------------------------------------------------------------
// forward

size_t msattn_self_extend_fwd_scratch_bytes(const msattn_self_extend_params *p) {
    const se_dims d = se_dims_of(p);
    const int64_t R = msattn_max64(d.R, SE_DIRECT_ROWS);
    return (size_t)d.N * 4 + (size_t)(2 * d.D * MSATTN_TILE + MSATTN_TILE * d.Dp) * 4 +
           (size_t)(4 * R * d.Dp + 2 * R) * 4 + (size_t)(5 * SE_DIRECT_ROWS * MSATTN_TILE) * 4 +
           (size_t)(SE_DIRECT_ROWS * MSATTN_TILE) + (size_t)(4 * d.Dp) * 4 + 32 * 64;
}

/* forward of an item with few rows: each key is loaded and rotated once per kind its rows use,
 * scored with dot products; the online softmax is the packed path's */
static void se_fwd_direct(const msattn_self_extend_params *p, const msattn_simd_ops *ops, const se_dims *d,
                          int64_t b, int64_t h, int64_t i0, int nrow, const int32_t *kpos, int64_t L,
                          const float *qn, const float *qp, const float *qf, float *ob, float *m, float *l,
                          float *kn, float *kg, float *vr, float *s) {
    const int rows = (int)d->hg * nrow;
    const int64_t Dp = d->Dp;
    for (int r = 0; r < rows; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
    memset(ob, 0, (size_t)(rows * Dp) * sizeof(float));
    for (int64_t t0 = 0; t0 < L; t0 += MSATTN_TILE) {
        const int nc = (int)msattn_min64(MSATTN_TILE, L - t0);
        for (int c = 0; c < nc; ++c) {
            const int64_t j = kpos[t0 + c];
            int need = 0;
            for (int r = 0; r < nrow; ++r) need |= se_kind(d, i0 + r, j);
            float *v = vr + c * Dp;
            if (!need) {
                for (int r = 0; r < rows; ++r) s[r * MSATTN_TILE + c] = -INFINITY;
                memset(v, 0, (size_t)Dp * sizeof(float));
                continue;
            }
            ms_load_row(kn, ops, &p->k, p->dtype, b, h, j, (int)d->D, 1.0f);
            if (need & (SE_PAST | SE_FUTURE)) {
                memcpy(kg, kn, (size_t)d->D * sizeof(float));
                se_rotate(kg, &p->rope, se_key_pos(d, SE_PAST, j), 1.0f);
            }
            if (need & SE_NEAR) se_rotate(kn, &p->rope, j, 1.0f);
            for (int r = 0; r < rows; ++r) {
                const int k = se_kind(d, i0 + r % nrow, j);
                const float *q = (k == SE_NEAR ? qn : k == SE_PAST ? qp : qf) + r * Dp;
                s[r * MSATTN_TILE + c] = k ? ops->dot(q, k == SE_NEAR ? kn : kg, (int)d->D) : -INFINITY;
            }
            ms_load_row(v, ops, &p->v, p->dtype, b, h, j, (int)d->D, 1.0f);
            memset(v + d->D, 0, (size_t)(Dp - d->D) * sizeof(float));
        }
        for (int r0 = 0; r0 < rows; r0 += MSATTN_ROWS) {
            const int rr = rows - r0 < MSATTN_ROWS ? rows - r0 : MSATTN_ROWS;
            ops->softmax_update(s + r0 * MSATTN_TILE, rr, nc, m + r0, l + r0, ob + r0 * Dp, Dp, (int)Dp);
            ops->pv(ob + r0 * Dp, Dp, s + r0 * MSATTN_TILE, rr, nc, vr, Dp, (int)Dp);
        }
    }
}

int msattn_self_extend_fwd_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    if (se_bad_args(p)) return MSATTN_ERR_ARG;
    const msattn_simd_ops *ops = msattn_simd();
    const se_dims d = se_dims_of(p);
    const int64_t R = msattn_max64(d.R, SE_DIRECT_ROWS), Dp = d.Dp;
    char *cur = (char *)scratch;
    int32_t *kpos = (int32_t *)ms_carve(&cur, (size_t)d.N, 4);
    float *ktn = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *ktg = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *vr = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * Dp), 4);
    float *qn = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *qp = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *qf = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *ob = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *m = (float *)ms_carve(&cur, (size_t)R, 4);
    float *l = (float *)ms_carve(&cur, (size_t)R, 4);
    se_tiles t;
    t.s = (float *)ms_carve(&cur, SE_DIRECT_ROWS * MSATTN_TILE, 4);
    t.sn = (float *)ms_carve(&cur, SE_DIRECT_ROWS * MSATTN_TILE, 4);
    t.sp = (float *)ms_carve(&cur, SE_DIRECT_ROWS * MSATTN_TILE, 4);
    t.sf = (float *)ms_carve(&cur, SE_DIRECT_ROWS * MSATTN_TILE, 4);
    t.x = (float *)ms_carve(&cur, SE_DIRECT_ROWS * MSATTN_TILE, 4);
    t.kk = (uint8_t *)ms_carve(&cur, SE_DIRECT_ROWS * MSATTN_TILE, 1);
    float *tmp = (float *)ms_carve(&cur, (size_t)(4 * Dp), 4);
    const int64_t nqb = msattn_cdiv(d.Nq, p->block_q);
    int32_t rp[MSATTN_ROWS];

    for (int64_t w = begin; w < end; ++w) {
        const int64_t qb = w % nqb, bh = w / nqb, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t i0 = d.q0 + qb * p->block_q, i1 = msattn_min64(i0 + p->block_q, d.N);
        const int nrow = (int)(i1 - i0);
        int64_t jlo, jhi;
        se_key_range(&d, i0, i1, &jlo, &jhi);
        const int64_t L = se_keys(p, b, jlo, jhi, kpos);
        for (int64_t hh = 0; hh < d.hg; ++hh) {
            const int64_t r = hh * nrow;
            se_load_queries(p, ops, &d, b, h * d.hg + hh, i0, nrow, d.c, qn + r * Dp, qp + r * Dp,
                            d.causal ? NULL : qf + r * Dp);
        }
        if (d.hg * nrow <= SE_DIRECT_ROWS) {
            se_fwd_direct(p, ops, &d, b, h, i0, nrow, kpos, L, qn, qp, qf, ob, m, l, tmp, tmp + Dp, vr, t.s);
        } else {
            for (int64_t r = 0; r < d.hg * nrow; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
            memset(ob, 0, (size_t)(d.hg * nrow * Dp) * sizeof(float));
            for (int64_t t0 = 0; t0 < L; t0 += MSATTN_TILE) {
                const int nc = (int)msattn_min64(MSATTN_TILE, L - t0);
                const int32_t *kt = kpos + t0;
                int mixed;
                const int need = se_tile_kinds(&d, i0, i1 - 1, kt[0], kt[nc - 1], &mixed);
                if (!need) continue;
                se_pack_keys(p, ops, &d, b, h, kt, nc, (need & SE_NEAR) ? ktn : NULL,
                             (need & (SE_PAST | SE_FUTURE)) ? ktg : NULL, NULL, NULL, NULL, vr, tmp);
                for (int64_t hh = 0; hh < d.hg; ++hh) {
                    for (int r0 = 0; r0 < nrow; r0 += MSATTN_ROWS) {
                        const int rows = nrow - r0 < MSATTN_ROWS ? nrow - r0 : MSATTN_ROWS;
                        const int64_t qi = i0 + r0, row = hh * nrow + r0;
                        const int kinds = se_tile_kinds(&d, qi, qi + rows - 1, kt[0], kt[nc - 1], &mixed);
                        if (!kinds) continue;
                        for (int r = 0; r < rows; ++r) rp[r] = (int32_t)(qi + r);
                        float *s = se_scores(ops, &d, &t, kinds, mixed, qn + row * Dp, qp + row * Dp, qf + row * Dp,
                                             Dp, rows, ktn, ktg, ktg, nc, rp, kt, 1);
                        ops->softmax_update(s, rows, nc, m + row, l + row, ob + row * Dp, Dp, (int)Dp);
                        ops->pv(ob + row * Dp, Dp, s, rows, nc, vr, Dp, (int)Dp);
                    }
                }
            }
        }
        for (int64_t r = 0; r < d.hg * nrow; ++r)
            se_finish_row(p, ops, &d, b, h * d.hg + r / nrow, i0 + r % nrow, ob + r * Dp, m[r], l[r]);
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward pass 1: delta and dq, item (b, h, query block)

static size_t se_bwd_dq_bytes(const se_dims *d) {
    return (size_t)d->N * 4 + (size_t)(3 * d->D * MSATTN_TILE + 2 * MSATTN_TILE * d->Dp) * 4 +
           (size_t)(7 * d->R * d->Dp + 2 * d->R) * 4 + (size_t)(6 * MSATTN_ROWS * MSATTN_TILE) * 4 +
           MSATTN_ROWS * MSATTN_TILE + (size_t)(2 * d->Dp) * 4 + 32 * 64;
}

/* g (D) = sum over the kinds a query at i uses of its accumulator rotated back from that kind's
 * query position (dq), or for a key at j from its key positions (dk; gf unused) */
static void se_rotate_back_sum(const se_dims *d, const msattn_rope *rope, float *gn, float *gp, float *gf,
                               int64_t pos, int is_query) {
    se_rotate(gn, rope, pos, -1.0f);
    if (is_query) {
        if (se_query_uses(d, SE_PAST, pos)) {
            se_rotate(gp, rope, se_query_pos(d, SE_PAST, pos), -1.0f);
            for (int64_t x = 0; x < d->D; ++x) gn[x] += gp[x];
        }
        if (gf && se_query_uses(d, SE_FUTURE, pos)) {
            se_rotate(gf, rope, se_query_pos(d, SE_FUTURE, pos), -1.0f);
            for (int64_t x = 0; x < d->D; ++x) gn[x] += gf[x];
        }
    } else {
        se_rotate(gp, rope, se_key_pos(d, SE_PAST, pos), -1.0f);
        for (int64_t x = 0; x < d->D; ++x) gn[x] += gp[x];
    }
}

int msattn_self_extend_bwd_dq_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    if (se_bad_args(p)) return MSATTN_ERR_ARG;
    const msattn_simd_ops *ops = msattn_simd();
    const se_dims d = se_dims_of(p);
    const int64_t R = d.R, Dp = d.Dp;
    char *cur = (char *)scratch;
    int32_t *kpos = (int32_t *)ms_carve(&cur, (size_t)d.N, 4);
    float *ktn = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *ktg = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *vt = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *krn = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * Dp), 4);
    float *krg = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * Dp), 4);
    float *qn = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *qp = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *qf = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *dob = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *dqn = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *dqp = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *dqf = (float *)ms_carve(&cur, (size_t)(R * Dp), 4);
    float *lse2 = (float *)ms_carve(&cur, (size_t)R, 4);
    float *delta = (float *)ms_carve(&cur, (size_t)R, 4);
    se_tiles t;
    t.s = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.sn = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.sp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.sf = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.x = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.kk = (uint8_t *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 1);
    float *dp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *tmp = (float *)ms_carve(&cur, (size_t)(2 * Dp), 4);
    const float *lse = (const float *)p->lse;
    const int64_t nqb = msattn_cdiv(d.Nq, p->block_q);
    int32_t rp[MSATTN_ROWS];

    for (int64_t w = begin; w < end; ++w) {
        const int64_t qb = w % nqb, bh = w / nqb, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t i0 = d.q0 + qb * p->block_q, i1 = msattn_min64(i0 + p->block_q, d.N);
        const int nrow = (int)(i1 - i0), rows_all = (int)(d.hg * nrow);
        int64_t jlo, jhi;
        se_key_range(&d, i0, i1, &jlo, &jhi);
        const int64_t L = se_keys(p, b, jlo, jhi, kpos);
        for (int64_t hh = 0; hh < d.hg; ++hh) {
            const int64_t r = hh * nrow, hq = h * d.hg + hh;
            se_load_queries(p, ops, &d, b, hq, i0, nrow, d.c, qn + r * Dp, qp + r * Dp, d.causal ? NULL : qf + r * Dp);
            for (int x = 0; x < nrow; ++x) {
                const int64_t i = i0 + x, row = (b * p->Hq + hq) * d.Nq + (i - d.q0);
                float *g = dob + (r + x) * Dp;
                ms_load_row(g, ops, &p->dout, p->dtype, b, hq, i - d.q0, (int)d.D, 1.0f);
                memset(g + d.D, 0, (size_t)(Dp - d.D) * sizeof(float));
                ms_load_row(tmp, ops, &p->out, p->dtype, b, hq, i - d.q0, (int)d.D, 1.0f);
                float dl = ops->dot(g, tmp, (int)d.D);
                if (p->dlse) dl -= ((const float *)p->dlse)[row];
                delta[r + x] = p->delta[row] = dl;
                /* a query without keys: +inf makes every probability 0 */
                lse2[r + x] = lse[row] == -INFINITY ? INFINITY : (float)(lse[row] * MS_LOG2E_D);
            }
        }
        memset(dqn, 0, (size_t)(rows_all * Dp) * sizeof(float));
        memset(dqp, 0, (size_t)(rows_all * Dp) * sizeof(float));
        memset(dqf, 0, (size_t)(rows_all * Dp) * sizeof(float));
        for (int64_t t0 = 0; t0 < L; t0 += MSATTN_TILE) {
            const int nc = (int)msattn_min64(MSATTN_TILE, L - t0);
            const int32_t *kt = kpos + t0;
            int mixed;
            const int need = se_tile_kinds(&d, i0, i1 - 1, kt[0], kt[nc - 1], &mixed);
            if (!need) continue;
            const int near = need & SE_NEAR, grouped = need & (SE_PAST | SE_FUTURE);
            se_pack_keys(p, ops, &d, b, h, kt, nc, near ? ktn : NULL, grouped ? ktg : NULL, near ? krn : NULL,
                         grouped ? krg : NULL, vt, NULL, tmp);
            for (int64_t hh = 0; hh < d.hg; ++hh) {
                for (int r0 = 0; r0 < nrow; r0 += MSATTN_ROWS) {
                    const int rows = nrow - r0 < MSATTN_ROWS ? nrow - r0 : MSATTN_ROWS;
                    const int64_t qi = i0 + r0, row = hh * nrow + r0;
                    const int kinds = se_tile_kinds(&d, qi, qi + rows - 1, kt[0], kt[nc - 1], &mixed);
                    if (!kinds) continue;
                    for (int r = 0; r < rows; ++r) rp[r] = (int32_t)(qi + r);
                    float *s = se_scores(ops, &d, &t, kinds, mixed, qn + row * Dp, qp + row * Dp, qf + row * Dp, Dp,
                                         rows, ktn, ktg, ktg, nc, rp, kt, 1);
                    ops->qk(dp, dob + row * Dp, Dp, rows, vt, MSATTN_TILE, (int)d.D);
                    ops->probs_ds_rows(s, dp, rows, nc, lse2 + row, delta + row);
                    se_pv_split(ops, &t, kinds, mixed, s, rows, nc, dqn + row * Dp, dqp + row * Dp, dqf + row * Dp,
                                Dp, krn, krg, krg, Dp, (int)Dp);
                }
            }
        }
        for (int64_t r = 0; r < rows_all; ++r) {
            const int64_t hq = h * d.hg + r / nrow, i = i0 + r % nrow;
            float *g = dqn + r * Dp;
            se_rotate_back_sum(&d, &p->rope, g, dqp + r * Dp, d.causal ? NULL : dqf + r * Dp, i, 1);
            ops->scale(g, (int)d.D, (float)p->scale);
            ms_store_row(&p->dq, ops, p->dtype, b, hq, i - d.q0, g, (int)d.D);
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward pass 2: dk and dv, item (b, h, key block)

static size_t se_bwd_dkv_bytes(const msattn_self_extend_params *p, const se_dims *d) {
    const int64_t KB = ms_round_up(p->block_kv > 0 ? p->block_kv : 1, MSATTN_ROWS);
    return (size_t)KB * 4 + (size_t)(6 * KB * d->Dp) * 4 + (size_t)(4 * d->D * MSATTN_TILE) * 4 +
           (size_t)(4 * MSATTN_TILE * d->Dp) * 4 + (size_t)(3 * MSATTN_TILE) * 4 +
           (size_t)(6 * MSATTN_ROWS * MSATTN_TILE) * 4 + MSATTN_ROWS * MSATTN_TILE + (size_t)(2 * d->Dp) * 4 +
           32 * 64;
}

size_t msattn_self_extend_bwd_scratch_bytes(const msattn_self_extend_params *p) {
    const se_dims d = se_dims_of(p);
    const size_t a = se_bwd_dq_bytes(&d), b = se_bwd_dkv_bytes(p, &d);
    return a > b ? a : b;
}

/* the columns of pass 2: queries of head hq at positions p0 .. p0+np-1 (np <= 64), packed as
 *   qtn, qtp, qtf  q * c transposed (D, 64) in the three rotations (each when not NULL)
 *   qrn, qrp, qrf  q as rows (64, Dp) in those rotations;  dot, dor  dO transposed and as rows
 *   lse2, delta, qpos per column; columns past np: zero q and dO, lse2 +inf (p = 0) */
static void se_pack_queries(const msattn_self_extend_params *p, const msattn_simd_ops *ops, const se_dims *d,
                            int64_t b, int64_t hq, int64_t p0, int np, float *qtn, float *qtp, float *qtf,
                            float *qrn, float *qrp, float *qrf, float *dot, float *dor, float *lse2, float *delta,
                            int32_t *qpos, float *tmp) {
    const int64_t D = d->D, Dp = d->Dp;
    const float *lse = (const float *)p->lse;
    float *qt[3] = {qtn, qtp, qtf}, *qr[3] = {qrn, qrp, qrf};
    const int kinds[3] = {SE_NEAR, SE_PAST, SE_FUTURE};
    for (int c = 0; c < MSATTN_TILE; ++c) {
        const int64_t i = p0 + c;
        for (int v = 0; v < 3; ++v) {
            if (!qt[v]) continue;
            float *x = qr[v] + c * Dp;
            if (c < np && se_query_uses(d, kinds[v], i)) {
                ms_load_row(x, ops, &p->q, p->dtype, b, hq, i - d->q0, (int)D, 1.0f);
                memset(x + D, 0, (size_t)(Dp - D) * sizeof(float));
                se_rotate(x, &p->rope, se_query_pos(d, kinds[v], i), 1.0f);
            } else {
                memset(x, 0, (size_t)Dp * sizeof(float));
            }
            for (int64_t k = 0; k < D; ++k) qt[v][k * MSATTN_TILE + c] = x[k] * d->c;
        }
        float *g = dor + c * Dp;
        if (c < np) {
            const int64_t row = (b * p->Hq + hq) * d->Nq + (i - d->q0);
            ms_load_row(g, ops, &p->dout, p->dtype, b, hq, i - d->q0, (int)D, 1.0f);
            memset(g + D, 0, (size_t)(Dp - D) * sizeof(float));
            lse2[c] = lse[row] == -INFINITY ? INFINITY : (float)(lse[row] * MS_LOG2E_D);
            delta[c] = p->delta[row];
            qpos[c] = (int32_t)i;
        } else {
            memset(g, 0, (size_t)Dp * sizeof(float));
            lse2[c] = INFINITY;
            delta[c] = 0.0f;
            qpos[c] = INT32_MAX;
        }
        for (int64_t k = 0; k < D; ++k) dot[k * MSATTN_TILE + c] = g[k];
    }
    (void)tmp;
}

int msattn_self_extend_bwd_dkv_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    if (se_bad_args(p)) return MSATTN_ERR_ARG;
    const msattn_simd_ops *ops = msattn_simd();
    const se_dims d = se_dims_of(p);
    const int64_t KB = p->block_kv, KBp = ms_round_up(KB, MSATTN_ROWS), Dp = d.Dp;
    char *cur = (char *)scratch;
    int32_t *kp = (int32_t *)ms_carve(&cur, (size_t)KBp, 4);
    float *krn = (float *)ms_carve(&cur, (size_t)(KBp * Dp), 4);
    float *krg = (float *)ms_carve(&cur, (size_t)(KBp * Dp), 4);
    float *vr = (float *)ms_carve(&cur, (size_t)(KBp * Dp), 4);
    float *dkn = (float *)ms_carve(&cur, (size_t)(KBp * Dp), 4);
    float *dkg = (float *)ms_carve(&cur, (size_t)(KBp * Dp), 4);
    float *dvb = (float *)ms_carve(&cur, (size_t)(KBp * Dp), 4);
    float *qtn = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *qtp = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *qtf = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *dot = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *qrn = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * Dp), 4);
    float *qrp = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * Dp), 4);
    float *qrf = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * Dp), 4);
    float *dor = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * Dp), 4);
    float *lse2 = (float *)ms_carve(&cur, MSATTN_TILE, 4);
    float *delta = (float *)ms_carve(&cur, MSATTN_TILE, 4);
    int32_t *qpos = (int32_t *)ms_carve(&cur, MSATTN_TILE, 4);
    se_tiles t;
    t.s = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.sn = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.sp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.sf = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.x = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    t.kk = (uint8_t *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 1);
    float *dp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *tmp = (float *)ms_carve(&cur, (size_t)(2 * Dp), 4);
    const int64_t nkb = msattn_cdiv(d.N, KB);

    for (int64_t w = begin; w < end; ++w) {
        const int64_t kb = w % nkb, bh = w / nkb, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t k0 = kb * KB, k1 = msattn_min64(k0 + KB, d.N);
        const int64_t nk = se_keys(p, b, k0, k1 - 1, kp);
        memset(dkn, 0, (size_t)(KBp * Dp) * sizeof(float));
        memset(dkg, 0, (size_t)(KBp * Dp) * sizeof(float));
        memset(dvb, 0, (size_t)(KBp * Dp) * sizeof(float));
        if (nk > 0) {
            for (int64_t r = 0; r < nk; ++r) {
                float *xn = krn + r * Dp, *xg = krg + r * Dp, *v = vr + r * Dp;
                ms_load_row(xn, ops, &p->k, p->dtype, b, h, kp[r], (int)d.D, 1.0f);
                memset(xn + d.D, 0, (size_t)(Dp - d.D) * sizeof(float));
                memcpy(xg, xn, (size_t)Dp * sizeof(float));
                se_rotate(xn, &p->rope, kp[r], 1.0f);
                se_rotate(xg, &p->rope, se_key_pos(&d, SE_PAST, kp[r]), 1.0f);
                ms_load_row(v, ops, &p->v, p->dtype, b, h, kp[r], (int)d.D, 1.0f);
                memset(v + d.D, 0, (size_t)(Dp - d.D) * sizeof(float));
            }
            /* the query positions that may see a key of the block */
            int64_t ilo = d.q0, ihi = d.N - 1;
            if (d.causal) ilo = msattn_max64(ilo, kp[0]);
            if (d.SW > 0) {
                ihi = msattn_min64(ihi, kp[nk - 1] + d.SW - 1);
                if (!d.causal) ilo = msattn_max64(ilo, kp[0] - d.SW + 1);
            }
            for (int64_t p0 = ilo; p0 <= ihi; p0 += MSATTN_TILE) {
                const int np = (int)msattn_min64(MSATTN_TILE, ihi + 1 - p0);
                int mixed;
                const int need = se_tile_kinds(&d, p0, p0 + np - 1, kp[0], kp[nk - 1], &mixed);
                if (!need) continue;
                for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
                    se_pack_queries(p, ops, &d, b, hq, p0, np, (need & SE_NEAR) ? qtn : NULL,
                                    (need & SE_PAST) ? qtp : NULL, (need & SE_FUTURE) ? qtf : NULL, qrn, qrp, qrf,
                                    dot, dor, lse2, delta, qpos, tmp);
                    for (int64_t r0 = 0; r0 < nk; r0 += MSATTN_ROWS) {
                        const int rows = (int)msattn_min64(MSATTN_ROWS, nk - r0);
                        const int kinds = se_tile_kinds(&d, p0, p0 + np - 1, kp[r0], kp[r0 + rows - 1], &mixed);
                        if (!kinds) continue;
                        float *s = se_scores(ops, &d, &t, kinds, mixed, krn + r0 * Dp, krg + r0 * Dp, krg + r0 * Dp,
                                             Dp, rows, qtn, qtp, qtf, np, kp + r0, qpos, 0);
                        for (int r = 0; r < rows; ++r) ops->exp2_sub(s + r * MSATTN_TILE, lse2, np);
                        ops->pv(dvb + r0 * Dp, Dp, s, rows, np, dor, Dp, (int)Dp);
                        ops->qk(dp, vr + r0 * Dp, Dp, rows, dot, MSATTN_TILE, (int)d.D);
                        for (int r = 0; r < rows; ++r)
                            ops->mul_sub_vec(s + r * MSATTN_TILE, dp + r * MSATTN_TILE, delta, np);
                        se_pv_split(ops, &t, kinds, mixed, s, rows, np, dkn + r0 * Dp, dkg + r0 * Dp, dkg + r0 * Dp,
                                    Dp, qrn, qrp, qrf, Dp, (int)Dp);
                    }
                }
            }
        }
        /* every position of the block is written: padded keys get zero gradients */
        int64_t r = 0;
        for (int64_t j = k0; j < k1; ++j) {
            float *gk = tmp, *gv = tmp + Dp;
            if (r < nk && kp[r] == j) {
                memcpy(gk, dkn + r * Dp, (size_t)Dp * sizeof(float));
                se_rotate_back_sum(&d, &p->rope, gk, dkg + r * Dp, NULL, j, 0);
                ops->scale(gk, (int)d.D, (float)p->scale);
                memcpy(gv, dvb + r * Dp, (size_t)Dp * sizeof(float));
                ++r;
            } else {
                memset(gk, 0, (size_t)Dp * sizeof(float));
                memset(gv, 0, (size_t)Dp * sizeof(float));
            }
            ms_store_row(&p->dk, ops, p->dtype, b, h, j, gk, (int)d.D);
            ms_store_row(&p->dv, ops, p->dtype, b, h, j, gv, (int)d.D);
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// naive twins, in double

static void se_ref_row(double *x, const msattn_self_extend_params *p, const msattn_view *v, int64_t b, int64_t h,
                       int64_t t, int64_t D) {
    for (int64_t k = 0; k < D; ++k)
        x[k] = msattn_load_f64(v->data, b * v->sb + h * v->sh + t * v->sn + k * v->sd, p->dtype);
}

static void se_ref_store(const msattn_view *v, msattn_dtype dt, int64_t b, int64_t h, int64_t t, const double *x,
                         int64_t D) {
    for (int64_t k = 0; k < D; ++k) msattn_store_f64(v->data, b * v->sb + h * v->sh + t * v->sn + k * v->sd, dt, x[k]);
}

/* the un-rotated K rows of (b, h) in both rotations: kn (N, D) at j, kg (N, D) at floor(j/G) */
static void se_ref_keys(const msattn_self_extend_params *p, const se_dims *d, int64_t b, int64_t h, double *kn,
                        double *kg) {
    for (int64_t j = 0; j < d->N; ++j) {
        se_ref_row(kn + j * d->D, p, &p->k, b, h, j, d->D);
        memcpy(kg + j * d->D, kn + j * d->D, (size_t)d->D * sizeof(double));
        se_rotate_f64(kn + j * d->D, &p->rope, se_key_pos(d, SE_NEAR, j), 1.0);
        se_rotate_f64(kg + j * d->D, &p->rope, se_key_pos(d, SE_PAST, j), 1.0);
    }
}

/* query (b, hq, i) in its three rotations: qv (3, D), kind SE_NEAR / SE_PAST / SE_FUTURE at row 0 / 1 / 2 */
static void se_ref_query(const msattn_self_extend_params *p, const se_dims *d, int64_t b, int64_t hq, int64_t i,
                         double *qv) {
    se_ref_row(qv, p, &p->q, b, hq, i - d->q0, d->D);
    memcpy(qv + d->D, qv, (size_t)d->D * sizeof(double));
    memcpy(qv + 2 * d->D, qv, (size_t)d->D * sizeof(double));
    for (int v = 0; v < 3; ++v) {
        const int kind = 1 << v;
        if (se_query_uses(d, kind, i)) se_rotate_f64(qv + v * d->D, &p->rope, se_query_pos(d, kind, i), 1.0);
    }
}

static inline int se_slot(int kind) { return kind == SE_NEAR ? 0 : kind == SE_PAST ? 1 : 2; }

/* scaled scores of query (b, hq, i) against every key, -inf where invisible or padded; returns
 * their max and writes each key's kind */
static double se_ref_scores(const msattn_self_extend_params *p, const se_dims *d, int64_t b, int64_t i,
                            const double *qv, const double *kn, const double *kg, double *sc, uint8_t *kind) {
    double mx = -INFINITY;
    for (int64_t j = 0; j < d->N; ++j) {
        const int k = ms_valid(p->key_mask, p->mask_sb, b, j) ? se_kind(d, i, j) : 0;
        kind[j] = (uint8_t)k;
        sc[j] = -INFINITY;
        if (!k) continue;
        const double *q = qv + se_slot(k) * d->D, *kr = (k == SE_NEAR ? kn : kg) + j * d->D;
        double s = 0.0;
        for (int64_t x = 0; x < d->D; ++x) s += q[x] * kr[x];
        sc[j] = s * p->scale;
        mx = sc[j] > mx ? sc[j] : mx;
    }
    return mx;
}

int msattn_self_extend_fwd_ref_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end) {
    if (se_bad_args(p)) return MSATTN_ERR_ARG;
    const se_dims d = se_dims_of(p);
    const int64_t N = d.N, D = d.D;
    double *kn = (double *)malloc((size_t)(N * D + 1) * 8), *kg = (double *)malloc((size_t)(N * D + 1) * 8);
    double *sc = (double *)malloc((size_t)(N + 1) * 8), *qv = (double *)malloc((size_t)(3 * D) * 8);
    double *o = (double *)malloc((size_t)D * 8), *v = (double *)malloc((size_t)D * 8);
    uint8_t *kind = (uint8_t *)malloc((size_t)N + 1);
    int status = MSATTN_OK;
    if (!kn || !kg || !sc || !qv || !o || !v || !kind) { status = MSATTN_ERR_NOMEM; goto done; }
    for (int64_t w = begin; w < end; ++w) {
        const int64_t b = w / p->Hq, hq = w % p->Hq, h = hq / d.hg;
        se_ref_keys(p, &d, b, h, kn, kg);
        for (int64_t i = d.q0; i < N; ++i) {
            se_ref_query(p, &d, b, hq, i, qv);
            const double mx = se_ref_scores(p, &d, b, i, qv, kn, kg, sc, kind);
            double sum = 0.0;
            for (int64_t x = 0; x < D; ++x) o[x] = 0.0;
            for (int64_t j = 0; j < N; ++j) {
                if (!kind[j]) continue;
                const double e = exp(sc[j] - mx);
                sum += e;
                se_ref_row(v, p, &p->v, b, h, j, D);
                for (int64_t x = 0; x < D; ++x) o[x] += e * v[x];
            }
            for (int64_t x = 0; x < D; ++x) o[x] = sum > 0.0 ? o[x] / sum : 0.0;
            se_ref_store(&p->out, p->dtype, b, hq, i - d.q0, o, D);
            const double l = sum > 0.0 ? mx + log(sum) : -INFINITY;
            const int64_t row = (b * p->Hq + hq) * d.Nq + (i - d.q0);
            if (p->dtype == MSATTN_F64) ((double *)p->lse)[row] = l;
            else ((float *)p->lse)[row] = (float)l;
        }
    }
done:
    free(kn); free(kg); free(sc); free(qv); free(o); free(v); free(kind);
    return status;
}

int msattn_self_extend_bwd_ref_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end) {
    if (se_bad_args(p)) return MSATTN_ERR_ARG;
    const se_dims d = se_dims_of(p);
    const int64_t N = d.N, D = d.D;
    const size_t nd = (size_t)(N * D + 1);
    double *kn = (double *)malloc(nd * 8), *kg = (double *)malloc(nd * 8), *vv = (double *)malloc(nd * 8);
    double *dkn = (double *)malloc(nd * 8), *dkg = (double *)malloc(nd * 8), *dv = (double *)malloc(nd * 8);
    double *pr = (double *)malloc((size_t)(N + 1) * 8), *dpr = (double *)malloc((size_t)(N + 1) * 8);
    double *qv = (double *)malloc((size_t)(3 * D) * 8), *dqv = (double *)malloc((size_t)(3 * D) * 8);
    double *g = (double *)malloc((size_t)D * 8);
    uint8_t *kind = (uint8_t *)malloc((size_t)N + 1);
    int status = MSATTN_OK;
    if (!kn || !kg || !vv || !dkn || !dkg || !dv || !pr || !dpr || !qv || !dqv || !g || !kind) {
        status = MSATTN_ERR_NOMEM;
        goto done;
    }
    for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p->Hkv, h = bh % p->Hkv;
        se_ref_keys(p, &d, b, h, kn, kg);
        for (int64_t j = 0; j < N; ++j) se_ref_row(vv + j * D, p, &p->v, b, h, j, D);
        memset(dkn, 0, nd * 8);
        memset(dkg, 0, nd * 8);
        memset(dv, 0, nd * 8);
        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
            for (int64_t i = d.q0; i < N; ++i) {
                const int64_t row = (b * p->Hq + hq) * d.Nq + (i - d.q0);
                se_ref_query(p, &d, b, hq, i, qv);
                se_ref_row(g, p, &p->dout, b, hq, i - d.q0, D);
                const double mx = se_ref_scores(p, &d, b, i, qv, kn, kg, pr, kind);
                double sum = 0.0, delta = 0.0;
                for (int64_t j = 0; j < N; ++j) {
                    pr[j] = kind[j] ? exp(pr[j] - mx) : 0.0;
                    sum += pr[j];
                }
                for (int64_t j = 0; j < N; ++j) {
                    if (!kind[j]) continue;
                    pr[j] /= sum;
                    double s = 0.0;
                    for (int64_t x = 0; x < D; ++x) s += g[x] * vv[j * D + x];
                    dpr[j] = s;
                    delta += pr[j] * s;
                }
                if (p->dlse)
                    delta -= p->dtype == MSATTN_F64 ? ((const double *)p->dlse)[row]
                                                    : (double)((const float *)p->dlse)[row];
                for (int64_t x = 0; x < 3 * D; ++x) dqv[x] = 0.0;
                for (int64_t j = 0; j < N; ++j) {
                    if (!kind[j]) continue;
                    const double ds = pr[j] * (dpr[j] - delta) * p->scale;
                    const int slot = se_slot(kind[j]);
                    const double *kr = (kind[j] == SE_NEAR ? kn : kg) + j * D, *q = qv + slot * D;
                    double *dk = (kind[j] == SE_NEAR ? dkn : dkg) + j * D;
                    for (int64_t x = 0; x < D; ++x) {
                        dqv[slot * D + x] += ds * kr[x];
                        dk[x] += ds * q[x];
                        dv[j * D + x] += pr[j] * g[x];
                    }
                }
                /* each part back from the rotation its scores used */
                for (int v = 0; v < 3; ++v) {
                    const int k = 1 << v;
                    if (!se_query_uses(&d, k, i)) continue;
                    se_rotate_f64(dqv + v * D, &p->rope, se_query_pos(&d, k, i), -1.0);
                    if (v) for (int64_t x = 0; x < D; ++x) dqv[x] += dqv[v * D + x];
                }
                se_ref_store(&p->dq, p->dtype, b, hq, i - d.q0, dqv, D);
            }
        }
        for (int64_t j = 0; j < N; ++j) {
            se_rotate_f64(dkn + j * D, &p->rope, se_key_pos(&d, SE_NEAR, j), -1.0);
            se_rotate_f64(dkg + j * D, &p->rope, se_key_pos(&d, SE_PAST, j), -1.0);
            for (int64_t x = 0; x < D; ++x) dkn[j * D + x] += dkg[j * D + x];
            se_ref_store(&p->dk, p->dtype, b, h, j, dkn + j * D, D);
            se_ref_store(&p->dv, p->dtype, b, h, j, dv + j * D, D);
        }
    }
done:
    free(kn); free(kg); free(vv); free(dkn); free(dkg); free(dv); free(pr); free(dpr); free(qv); free(dqv);
    free(g); free(kind);
    return status;
}
