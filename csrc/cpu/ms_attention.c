/*
 * ms_attention.c -- MS attention forward and backward on the CPU (DESIGN section 1, steps 6-7).
 *
 * Each query of group g attends to the tokens of g's selected key regions plus g's own tokens
 * (causal: up to its own position), skipping padded keys. Flash-style: scores never leave a
 * (4 queries x 64 keys) tile, the softmax is online, the log-sum-exp per query is saved.
 *
 *   forward   item (b, h, g): pack the group's keys once, K transposed (D, L) and V as rows
 *             (L, Dp), fp32, converted from any dtype and rotated for rope="selected"; then every
 *             query head of the GQA group and every 4 queries run over the packed tiles.
 *   backward  pass 1, item (b, h, g): like the forward, computes delta = rowsum(dO * O) and dQ.
 *             pass 2, item (b, h, key block): dK and dV without atomics. The selection is
 *             inverted (for each key region, the groups that chose it, ascending); a key block
 *             walks its choosing groups in ascending order, packs each group's queries once
 *             (Q and dO, transposed and as rows), and accumulates into the block's keys. The sum
 *             for each key runs in the same order however the blocks are cut: deterministic.
 *   _ref      naive twins in double, one query at a time; they also serve fp64 inputs.
 *
 * Scores are kept in the log2 domain: q is packed times scale*log2(e), so p = exp2(s - m).
 * A query with no visible key gets output 0 and lse -inf; backward treats lse -inf as "no keys".
 *
 * Legend: B batch, Hq/Hkv heads, hg = Hq/Hkv, N keys, Nq queries, D head dim, Dp = D rounded up
 * to 16, CK block_k, T topk, span = merge*block_q tokens per group, L keys of a group,
 * Lp = L rounded up to 64, G groups of the call (gi index, ga = g0 + gi absolute).
 */
#include <stdlib.h>

#include "common.h"

typedef struct {
    int64_t N, Nq, D, Dp, T, hg, span, NK, G, g0, Lmax, Lpmax;
    float c; /* scale * log2(e) */
} ms_dims;

static ms_dims ms_dims_of(const msattn_ms_params *p) {
    ms_dims d;
    d.N = p->N; d.Nq = p->Nq; d.D = p->D; d.Dp = ms_round_up(p->D, MSATTN_DPAD);
    d.T = p->topk; d.hg = p->Hq / p->Hkv; d.span = msattn_span(p->block_q, p->merge);
    d.NK = msattn_num_key_regions(p->N, p->block_k);
    d.G = msattn_num_groups(p->N, p->Nq, d.span);
    d.g0 = msattn_first_group(p->N, p->Nq, d.span);
    d.Lmax = (int64_t)p->topk * p->block_k + d.span;
    d.Lpmax = ms_round_up(d.Lmax, MSATTN_TILE);
    d.c = (float)(p->scale * MS_LOG2E_D);
    return d;
}

static inline const int32_t *ms_index_row(const msattn_ms_params *p, const ms_dims *d, int64_t bh,
                                          int64_t gi) {
    return p->index + (bh * d->G + gi) * d->T;
}

/* pack the keys of a group, converted to fp32 (and rotated for rope="selected"):
 *   kt    K transposed, tile-major: tile i (64 keys) is a contiguous (D, 64) block at kt + i*D*64
 *   vt    V transposed, the same layout (backward), or NULL
 *   krows K as rows (Lp, Dp) (backward), or NULL;  vrows V as rows (Lp, Dp) (forward), or NULL
 * keys past L are zero. */
static void ms_pack_keys(const msattn_ms_params *p, const msattn_simd_ops *ops, const ms_dims *d,
                         int64_t b, int64_t h, const int32_t *kpos, const int32_t *kcomp, int64_t L,
                         int64_t Lp, float *kt, float *vrows, float *vt, float *krows, float *tmp) {
    const int rope = p->rope.cos != NULL;
    for (int64_t t = 0; t < Lp; ++t) {
        float *ktile = kt + (t / MSATTN_TILE) * d->D * MSATTN_TILE + t % MSATTN_TILE;
        if (t < L) {
            ms_load_row(tmp, ops, &p->k, p->dtype, b, h, kpos[t], (int)d->D, 1.0f);
            if (rope) ms_rope_rotate(tmp, &p->rope, kcomp[t], 1.0f);
        } else {
            memset(tmp, 0, (size_t)d->D * sizeof(float));
        }
        for (int64_t i = 0; i < d->D; ++i) ktile[i * MSATTN_TILE] = tmp[i];
        if (krows) {
            memcpy(krows + t * d->Dp, tmp, (size_t)d->D * sizeof(float));
            memset(krows + t * d->Dp + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
        }
        if (t < L) ms_load_row(tmp, ops, &p->v, p->dtype, b, h, kpos[t], (int)d->D, 1.0f);
        else memset(tmp, 0, (size_t)d->D * sizeof(float));
        if (vrows) {
            memcpy(vrows + t * d->Dp, tmp, (size_t)d->D * sizeof(float));
            memset(vrows + t * d->Dp + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
        }
        if (vt) {
            float *vtile = vt + (t / MSATTN_TILE) * d->D * MSATTN_TILE + t % MSATTN_TILE;
            for (int64_t i = 0; i < d->D; ++i) vtile[i * MSATTN_TILE] = tmp[i];
        }
    }
}

/* load `rows` query-side rows (q scaled by c and rotated, or any other view unscaled) */
static void ms_load_rows(float *dst, int64_t ld, const msattn_ms_params *p,
                         const msattn_simd_ops *ops, const msattn_view *v, const ms_dims *d,
                         int64_t b, int64_t hq, int64_t pos0, int rows, float a, int64_t rope_pos0) {
    for (int r = 0; r < rows; ++r) {
        float *x = dst + r * ld;
        ms_load_row(x, ops, v, p->dtype, b, hq, pos0 + r - (d->N - d->Nq), (int)d->D, a);
        memset(x + d->D, 0, (size_t)(ld - d->D) * sizeof(float));
        if (rope_pos0 >= 0) ms_rope_rotate(x, &p->rope, rope_pos0 + r, 1.0f);
    }
}

/* causal mask of a (rows, 64) tile: s[r][c] = -inf where key position > query position */
static inline void ms_mask_causal(float *s, int rows, int nc, const int32_t *kpos, int64_t qpos0) {
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < nc; ++c)
            if (kpos[c] > qpos0 + r) s[r * MSATTN_TILE + c] = -INFINITY;
}

/* queries per block: each packed 64-key tile is read from L1 by QBLOCK/4 register tiles */
#define MS_QBLOCK 16
/* an item with at most this many query rows (decoding: one query per head) skips the packing and
 * scores K rows in place: packing a group's keys pays off only over many queries */
#define MS_DIRECT_ROWS 8

// ----------------------------------------------------------------------------------------------
// forward

size_t msattn_ms_fwd_scratch_bytes(const msattn_ms_params *p) {
    ms_dims d = ms_dims_of(p);
    return 2 * (size_t)d.Lmax * 4 + (size_t)(d.D * d.Lpmax + d.Lpmax * d.Dp) * 4 +
           (size_t)(3 * MS_QBLOCK * d.Dp + MS_DIRECT_ROWS * MSATTN_TILE) * 4 + 8 * 64;
}

/* write the output rows of a finished softmax: o / l, lse; l == 0: no visible key, 0 and -inf */
static void ms_finish_rows(const msattn_ms_params *p, const msattn_simd_ops *ops, const ms_dims *d, int64_t b,
                           const int64_t *hq, const int64_t *pos, int rows, float *ob, const float *m,
                           const float *l) {
    float *lse = (float *)p->lse;
    for (int r = 0; r < rows; ++r) {
        const int64_t i = pos[r] - (d->N - d->Nq), row = (b * p->Hq + hq[r]) * d->Nq + i;
        float *o = ob + r * d->Dp;
        if (l[r] != 0.0f) { /* NaN included: NaN in, NaN out */
            ops->scale(o, (int)d->D, 1.0f / l[r]);
            lse[row] = (float)((m[r] + log2((double)l[r])) * MS_LN2);
        } else {
            memset(o, 0, (size_t)d->D * sizeof(float));
            lse[row] = -INFINITY;
        }
        ms_store_row(&p->out, ops, p->dtype, b, hq[r], i, o, (int)d->D);
    }
}

/* forward of one item with few query rows (hq[r], pos[r]): K rows are scored in place with dot
 * products, V rows copied 64 at a time; the online softmax is the packed path's */
static void ms_fwd_direct(const msattn_ms_params *p, const msattn_simd_ops *ops, const ms_dims *d, int64_t b,
                          int64_t h, int64_t ga, int64_t n_sel, const int32_t *kpos, const int32_t *kcomp,
                          int64_t L, const int64_t *hq, const int64_t *pos, int rows, float *qb, float *ob,
                          float *krow, float *vr, float *s) {
    const int rope = p->rope.cos != NULL;
    int64_t last = pos[0];
    for (int r = 0; r < rows; ++r) {
        ms_load_rows(qb + r * d->Dp, d->Dp, p, ops, &p->q, d, b, hq[r], pos[r], 1, d->c,
                     rope ? msattn_compact_own(n_sel, p->block_k, pos[r], ga, d->span) : -1);
        last = pos[r] > last ? pos[r] : last;
    }
    float m[MS_DIRECT_ROWS], l[MS_DIRECT_ROWS];
    for (int r = 0; r < rows; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
    memset(ob, 0, (size_t)(rows * d->Dp) * sizeof(float));
    const int64_t kend = p->causal ? ms_upper_bound(kpos, L, last) : L;
    for (int64_t t0 = 0; t0 < kend; t0 += MSATTN_TILE) {
        const int nc = (int)msattn_min64(MSATTN_TILE, kend - t0);
        for (int c = 0; c < nc; ++c) {
            ms_load_row(krow, ops, &p->k, p->dtype, b, h, kpos[t0 + c], (int)d->D, 1.0f);
            if (rope) ms_rope_rotate(krow, &p->rope, kcomp[t0 + c], 1.0f);
            for (int r = 0; r < rows; ++r)
                s[r * MSATTN_TILE + c] = p->causal && kpos[t0 + c] > pos[r]
                                             ? -INFINITY
                                             : ops->dot(qb + r * d->Dp, krow, (int)d->D);
            float *v = vr + c * d->Dp;
            ms_load_row(v, ops, &p->v, p->dtype, b, h, kpos[t0 + c], (int)d->D, 1.0f);
            memset(v + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
        }
        for (int r0 = 0; r0 < rows; r0 += MSATTN_ROWS) {
            const int rr = rows - r0 < MSATTN_ROWS ? rows - r0 : MSATTN_ROWS;
            ops->softmax_update(s + r0 * MSATTN_TILE, rr, nc, m + r0, l + r0, ob + r0 * d->Dp, d->Dp, (int)d->Dp);
            ops->pv(ob + r0 * d->Dp, d->Dp, s + r0 * MSATTN_TILE, rr, nc, vr, d->Dp, (int)d->Dp);
        }
    }
    ms_finish_rows(p, ops, d, b, hq, pos, rows, ob, m, l);
}

int msattn_ms_fwd_cpu(const msattn_ms_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const ms_dims d = ms_dims_of(p);
    char *cur = (char *)scratch;
    int32_t *kpos = (int32_t *)ms_carve(&cur, (size_t)d.Lmax, 4);
    int32_t *kcomp = (int32_t *)ms_carve(&cur, (size_t)d.Lmax, 4);
    float *kt = (float *)ms_carve(&cur, (size_t)(d.D * d.Lpmax), 4);
    float *vr = (float *)ms_carve(&cur, (size_t)(d.Lpmax * d.Dp), 4);
    float *qb = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *ob = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *tmp = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *s = (float *)ms_carve(&cur, MS_DIRECT_ROWS * MSATTN_TILE, 4);
    const int rope = p->rope.cos != NULL;

    for (int64_t w = begin; w < end; ++w) {
        const int64_t gi = w % d.G, bh = w / d.G, b = bh / p->Hkv, h = bh % p->Hkv, ga = d.g0 + gi;
        int64_t n_sel;
        const int64_t L = ms_group_keys(ms_index_row(p, &d, bh, gi), p->topk, ga, d.span, p->block_k,
                                        d.N, p->key_mask, p->mask_sb, b, kpos, kcomp, &n_sel);
        const msattn_range qr = msattn_group_queries(ga, d.span, d.N, d.Nq);
        if (d.hg * (qr.end - qr.begin) <= MS_DIRECT_ROWS) {
            int64_t hqs[MS_DIRECT_ROWS] = {0}, poss[MS_DIRECT_ROWS] = {0};
            int rows = 0;
            for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq)
                for (int64_t pos = qr.begin; pos < qr.end; ++pos, ++rows) { hqs[rows] = hq; poss[rows] = pos; }
            ms_fwd_direct(p, ops, &d, b, h, ga, n_sel, kpos, kcomp, L, hqs, poss, rows, qb, ob, tmp, vr, s);
            continue;
        }
        const int64_t Lp = ms_round_up(L > 0 ? L : 1, MSATTN_TILE);
        ms_pack_keys(p, ops, &d, b, h, kpos, kcomp, L, Lp, kt, vr, NULL, NULL, tmp);

        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
            for (int64_t i0 = qr.begin; i0 < qr.end; i0 += MS_QBLOCK) {
                const int qrows = (int)msattn_min64(MS_QBLOCK, qr.end - i0);
                const int64_t rope0 = rope ? msattn_compact_own(n_sel, p->block_k, i0, ga, d.span) : -1;
                ms_load_rows(qb, d.Dp, p, ops, &p->q, &d, b, hq, i0, qrows, d.c, rope0);
                float m[MS_QBLOCK], l[MS_QBLOCK];
                for (int r = 0; r < MS_QBLOCK; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
                memset(ob, 0, (size_t)(MS_QBLOCK * d.Dp) * sizeof(float));
                /* causal: keys after the last query of the block are never visible */
                const int64_t kend = p->causal ? ms_upper_bound(kpos, L, i0 + qrows - 1) : L;
                for (int64_t t0 = 0; t0 < kend; t0 += MSATTN_TILE) {
                    const int nc = (int)msattn_min64(MSATTN_TILE, kend - t0);
                    const float *ktile = kt + (t0 / MSATTN_TILE) * d.D * MSATTN_TILE;
                    for (int r0 = 0; r0 < qrows; r0 += MSATTN_ROWS) {
                        const int rows = (int)msattn_min64(MSATTN_ROWS, qrows - r0);
                        const int64_t q0 = i0 + r0;
                        if (p->causal && kpos[t0] > q0 + rows - 1) continue; /* not yet visible to these rows */
                        ops->qk(s, qb + r0 * d.Dp, d.Dp, rows, ktile, MSATTN_TILE, (int)d.D);
                        if (p->causal && kpos[t0 + nc - 1] > q0) ms_mask_causal(s, rows, nc, kpos + t0, q0);
                        ops->softmax_update(s, rows, nc, m + r0, l + r0, ob + r0 * d.Dp, d.Dp, (int)d.Dp);
                        ops->pv(ob + r0 * d.Dp, d.Dp, s, rows, nc, vr + t0 * d.Dp, d.Dp, (int)d.Dp);
                    }
                }
                int64_t hqs[MS_QBLOCK] = {0}, poss[MS_QBLOCK] = {0};
                for (int r = 0; r < qrows; ++r) { hqs[r] = hq; poss[r] = i0 + r; }
                ms_finish_rows(p, ops, &d, b, hqs, poss, qrows, ob, m, l);
            }
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward: the inverted index

int msattn_ms_invert_cpu(const msattn_ms_params *p, int32_t *inv_offsets, int32_t *inv_groups,
                         int64_t begin, int64_t end) {
    const ms_dims d = ms_dims_of(p);
    for (int64_t bh = begin; bh < end; ++bh) {
        int32_t *offs = inv_offsets + bh * (d.NK + 1);
        int32_t *grp = inv_groups + bh * d.G * d.T;
        memset(offs, 0, (size_t)(d.NK + 1) * sizeof(int32_t));
        const int32_t *idx = p->index + bh * d.G * d.T;
        for (int64_t e = 0; e < d.G * d.T; ++e)
            if (idx[e] >= 0) offs[idx[e] + 1]++;
        for (int64_t j = 0; j < d.NK; ++j) offs[j + 1] += offs[j];
        for (int64_t gi = 0; gi < d.G; ++gi) /* ascending groups: ascending lists */
            for (int64_t r = 0; r < d.T; ++r) {
                const int32_t j = idx[gi * d.T + r];
                if (j >= 0) grp[offs[j]++] = (int32_t)gi;
            }
        for (int64_t j = d.NK; j > 0; --j) offs[j] = offs[j - 1];
        offs[0] = 0;
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward pass 1: delta and dq, item (b, h, g)

static size_t ms_bwd_dq_bytes(const ms_dims *d) {
    return 2 * (size_t)d->Lmax * 4 + (size_t)(2 * d->D * d->Lpmax + d->Lpmax * d->Dp) * 4 +
           (size_t)(5 * MS_QBLOCK * d->Dp + 2 * MSATTN_ROWS * MSATTN_TILE) * 4 + 12 * 64;
}

int msattn_ms_bwd_dq_cpu(const msattn_ms_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const ms_dims d = ms_dims_of(p);
    char *cur = (char *)scratch;
    int32_t *kpos = (int32_t *)ms_carve(&cur, (size_t)d.Lmax, 4);
    int32_t *kcomp = (int32_t *)ms_carve(&cur, (size_t)d.Lmax, 4);
    float *kt = (float *)ms_carve(&cur, (size_t)(d.D * d.Lpmax), 4);
    float *vt = (float *)ms_carve(&cur, (size_t)(d.D * d.Lpmax), 4);
    float *kr = (float *)ms_carve(&cur, (size_t)(d.Lpmax * d.Dp), 4);
    float *qb = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *dob = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *ob = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *dqb = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *tmp = (float *)ms_carve(&cur, (size_t)(MS_QBLOCK * d.Dp), 4);
    float *s = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *dp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    const float *lse = (const float *)p->lse;
    const int rope = p->rope.cos != NULL;

    for (int64_t w = begin; w < end; ++w) {
        const int64_t gi = w % d.G, bh = w / d.G, b = bh / p->Hkv, h = bh % p->Hkv, ga = d.g0 + gi;
        int64_t n_sel;
        const int64_t L = ms_group_keys(ms_index_row(p, &d, bh, gi), p->topk, ga, d.span, p->block_k,
                                        d.N, p->key_mask, p->mask_sb, b, kpos, kcomp, &n_sel);
        const int64_t Lp = ms_round_up(L > 0 ? L : 1, MSATTN_TILE);
        ms_pack_keys(p, ops, &d, b, h, kpos, kcomp, L, Lp, kt, NULL, vt, kr, tmp);
        const msattn_range qr = msattn_group_queries(ga, d.span, d.N, d.Nq);

        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
            for (int64_t i0 = qr.begin; i0 < qr.end; i0 += MS_QBLOCK) {
                const int qrows = (int)msattn_min64(MS_QBLOCK, qr.end - i0);
                const int64_t row0 = (b * p->Hq + hq) * d.Nq + (i0 - (d.N - d.Nq));
                const int64_t rope0 = rope ? msattn_compact_own(n_sel, p->block_k, i0, ga, d.span) : -1;
                ms_load_rows(qb, d.Dp, p, ops, &p->q, &d, b, hq, i0, qrows, d.c, rope0);
                ms_load_rows(dob, d.Dp, p, ops, &p->dout, &d, b, hq, i0, qrows, 1.0f, -1);
                ms_load_rows(ob, d.Dp, p, ops, &p->out, &d, b, hq, i0, qrows, 1.0f, -1);
                float delta[MS_QBLOCK], lse2[MS_QBLOCK];
                for (int r = 0; r < qrows; ++r) {
                    delta[r] = ops->dot(dob + r * d.Dp, ob + r * d.Dp, (int)d.D);
                    if (p->dlse) delta[r] -= ((const float *)p->dlse)[row0 + r];
                    p->delta[row0 + r] = delta[r];
                    /* a query without keys: +inf makes every probability 0 */
                    lse2[r] = lse[row0 + r] == -INFINITY ? INFINITY : (float)(lse[row0 + r] * MS_LOG2E_D);
                }
                memset(dqb, 0, (size_t)(MS_QBLOCK * d.Dp) * sizeof(float));
                const int64_t kend = p->causal ? ms_upper_bound(kpos, L, i0 + qrows - 1) : L;
                for (int64_t t0 = 0; t0 < kend; t0 += MSATTN_TILE) {
                    const int nc = (int)msattn_min64(MSATTN_TILE, kend - t0);
                    const int64_t toff = (t0 / MSATTN_TILE) * d.D * MSATTN_TILE;
                    for (int r0 = 0; r0 < qrows; r0 += MSATTN_ROWS) {
                        const int rows = (int)msattn_min64(MSATTN_ROWS, qrows - r0);
                        const int64_t q0 = i0 + r0;
                        if (p->causal && kpos[t0] > q0 + rows - 1) continue;
                        ops->qk(s, qb + r0 * d.Dp, d.Dp, rows, kt + toff, MSATTN_TILE, (int)d.D);
                        if (p->causal && kpos[t0 + nc - 1] > q0) ms_mask_causal(s, rows, nc, kpos + t0, q0);
                        ops->qk(dp, dob + r0 * d.Dp, d.Dp, rows, vt + toff, MSATTN_TILE, (int)d.D);
                        ops->probs_ds_rows(s, dp, rows, nc, lse2 + r0, delta + r0);
                        ops->pv(dqb + r0 * d.Dp, d.Dp, s, rows, nc, kr + t0 * d.Dp, d.Dp, (int)d.Dp);
                    }
                }
                for (int r = 0; r < qrows; ++r) {
                    float *g = dqb + r * d.Dp;
                    ops->scale(g, (int)d.D, (float)p->scale);
                    if (rope) ms_rope_rotate(g, &p->rope, rope0 + r, -1.0f);
                    ms_store_row(&p->dq, ops, p->dtype, b, hq, i0 + r - (d.N - d.Nq), g, (int)d.D);
                }
            }
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward pass 2: dk and dv, item (b, h, key block)

typedef struct {
    int32_t gi; /* choosing group, index in the call */
    int32_t j;  /* key region; own span of the group when own != 0 */
    int32_t own;
} ms_pair;

static int ms_pair_cmp(const void *a, const void *b) {
    const ms_pair *x = (const ms_pair *)a, *y = (const ms_pair *)b;
    if (x->gi != y->gi) return x->gi < y->gi ? -1 : 1;
    return (x->j > y->j) - (x->j < y->j);
}

static int64_t ms_block_regions(const msattn_ms_params *p, const ms_dims *d) {
    return msattn_cdiv(d->NK, p->kv_blocks > 0 ? p->kv_blocks : 1);
}

static size_t ms_bwd_dkv_bytes(const msattn_ms_params *p, const ms_dims *d) {
    const int64_t RB = ms_block_regions(p, d), CK = p->block_k, CKp = ms_round_up(CK, MSATTN_ROWS);
    const int64_t ncp = ms_round_up(d->hg * d->span, MSATTN_TILE);
    const int64_t npairs = msattn_min64(RB * (d->G + 1), d->G * d->T + RB);
    return (size_t)npairs * sizeof(ms_pair) + (size_t)(2 * d->D * ncp + 2 * ncp * d->Dp) * 4 +
           (size_t)(3 * ncp) * 4 + 2 * (size_t)(RB * CK * d->Dp) * 4 + 4 * (size_t)(CKp * d->Dp) * 4 +
           2 * (size_t)CKp * 4 + (size_t)(MSATTN_ROWS * d->Dp + 2 * MSATTN_ROWS * MSATTN_TILE) * 4 +
           (size_t)(2 * (ncp / MSATTN_TILE + 1)) * 4 + 24 * 64;
}

size_t msattn_ms_bwd_scratch_bytes(const msattn_ms_params *p) {
    const ms_dims d = ms_dims_of(p);
    const size_t a = ms_bwd_dq_bytes(&d), b = ms_bwd_dkv_bytes(p, &d);
    return a > b ? a : b;
}

/* the columns of group gi for pass 2: its queries of every head of the GQA group, packed as
 * qt, dot: q * c and dO transposed, tile-major (64 columns a tile, (D, 64) each)
 * qrow, dorow: q and dO as rows (ncp, Dp); lse2, delta, qpos per column; tmin/tmax per tile */
static int64_t ms_pack_columns(const msattn_ms_params *p, const msattn_simd_ops *ops, const ms_dims *d,
                               int64_t b, int64_t h, int64_t ga, int64_t n_sel, float *qt, float *dot,
                               float *qrow, float *dorow, float *lse2, float *delta, int32_t *qpos,
                               int32_t *tmin, int32_t *tmax, float *tmp) {
    const float *lse = (const float *)p->lse;
    const msattn_range qr = msattn_group_queries(ga, d->span, d->N, d->Nq);
    const int64_t nq = qr.end - qr.begin, ncol = d->hg * nq;
    const int64_t ncp = ms_round_up(ncol, MSATTN_TILE);
    for (int64_t col = 0; col < ncp; ++col) {
        float *qtc = qt + (col / MSATTN_TILE) * d->D * MSATTN_TILE + col % MSATTN_TILE;
        float *dotc = dot + (col / MSATTN_TILE) * d->D * MSATTN_TILE + col % MSATTN_TILE;
        if (col < ncol) {
            const int64_t hq = h * d->hg + col / nq, pos = qr.begin + col % nq;
            const int64_t i = pos - (d->N - d->Nq), row = (b * p->Hq + hq) * d->Nq + i;
            ms_load_row(tmp, ops, &p->q, p->dtype, b, hq, i, (int)d->D, 1.0f);
            if (p->rope.cos)
                ms_rope_rotate(tmp, &p->rope, msattn_compact_own(n_sel, p->block_k, pos, ga, d->span), 1.0f);
            for (int64_t k = 0; k < d->D; ++k) qtc[k * MSATTN_TILE] = tmp[k] * d->c;
            memcpy(qrow + col * d->Dp, tmp, (size_t)d->D * sizeof(float));
            ms_load_row(tmp, ops, &p->dout, p->dtype, b, hq, i, (int)d->D, 1.0f);
            for (int64_t k = 0; k < d->D; ++k) dotc[k * MSATTN_TILE] = tmp[k];
            memcpy(dorow + col * d->Dp, tmp, (size_t)d->D * sizeof(float));
            lse2[col] = lse[row] == -INFINITY ? INFINITY : (float)(lse[row] * MS_LOG2E_D);
            delta[col] = p->delta[row];
            qpos[col] = (int32_t)pos;
        } else { /* padding columns: zero q, p = 0 */
            for (int64_t k = 0; k < d->D; ++k) qtc[k * MSATTN_TILE] = dotc[k * MSATTN_TILE] = 0.0f;
            memset(qrow + col * d->Dp, 0, (size_t)d->D * sizeof(float));
            memset(dorow + col * d->Dp, 0, (size_t)d->D * sizeof(float));
            lse2[col] = INFINITY;
            delta[col] = 0.0f;
            qpos[col] = INT32_MAX;
        }
        memset(qrow + col * d->Dp + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
        memset(dorow + col * d->Dp + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
    }
    for (int64_t c0 = 0; c0 < ncp; c0 += MSATTN_TILE) {
        int32_t lo = INT32_MAX, hi = -1;
        for (int64_t c = c0; c < c0 + MSATTN_TILE && c < ncol; ++c) {
            lo = qpos[c] < lo ? qpos[c] : lo;
            hi = qpos[c] > hi ? qpos[c] : hi;
        }
        tmin[c0 / MSATTN_TILE] = lo;
        tmax[c0 / MSATTN_TILE] = hi;
    }
    return ncol;
}

int msattn_ms_bwd_dkv_cpu(const msattn_ms_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const ms_dims d = ms_dims_of(p);
    const int64_t RB = ms_block_regions(p, &d), CK = p->block_k, KB = p->kv_blocks;
    const int64_t CKp = ms_round_up(CK, MSATTN_ROWS);
    const int64_t ncp_max = ms_round_up(d.hg * d.span, MSATTN_TILE);
    const int64_t npairs_max = msattn_min64(RB * (d.G + 1), d.G * d.T + RB);
    char *cur = (char *)scratch;
    ms_pair *pairs = (ms_pair *)ms_carve(&cur, (size_t)npairs_max, sizeof(ms_pair));
    float *qt = (float *)ms_carve(&cur, (size_t)(d.D * ncp_max), 4);
    float *dot = (float *)ms_carve(&cur, (size_t)(d.D * ncp_max), 4);
    float *qrow = (float *)ms_carve(&cur, (size_t)(ncp_max * d.Dp), 4);
    float *dorow = (float *)ms_carve(&cur, (size_t)(ncp_max * d.Dp), 4);
    float *lse2 = (float *)ms_carve(&cur, (size_t)ncp_max, 4);
    float *delta = (float *)ms_carve(&cur, (size_t)ncp_max, 4);
    int32_t *qpos = (int32_t *)ms_carve(&cur, (size_t)ncp_max, 4);
    int32_t *tmin = (int32_t *)ms_carve(&cur, (size_t)(ncp_max / MSATTN_TILE + 1), 4);
    int32_t *tmax = (int32_t *)ms_carve(&cur, (size_t)(ncp_max / MSATTN_TILE + 1), 4);
    float *dkacc = (float *)ms_carve(&cur, (size_t)(RB * CK * d.Dp), 4);
    float *dvacc = (float *)ms_carve(&cur, (size_t)(RB * CK * d.Dp), 4);
    float *kr = (float *)ms_carve(&cur, (size_t)(CKp * d.Dp), 4);   /* region keys as rows */
    float *vr = (float *)ms_carve(&cur, (size_t)(CKp * d.Dp), 4);
    float *dkr = (float *)ms_carve(&cur, (size_t)(CKp * d.Dp), 4);  /* their gradients, this group */
    float *dvr = (float *)ms_carve(&cur, (size_t)(CKp * d.Dp), 4);
    int32_t *kp = (int32_t *)ms_carve(&cur, (size_t)CKp, 4);
    int32_t *kc = (int32_t *)ms_carve(&cur, (size_t)CKp, 4);
    float *tmp = (float *)ms_carve(&cur, (size_t)(MSATTN_ROWS * d.Dp), 4);
    float *s = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *dp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    const int rope = p->rope.cos != NULL;

    for (int64_t w = begin; w < end; ++w) {
        const int64_t kb = w % KB, bh = w / KB, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t jb = kb * RB, je = msattn_min64(jb + RB, d.NK);
        if (jb >= je) continue;
        const int64_t tb = jb * CK, te = msattn_min64(je * CK, d.N);
        memset(dkacc, 0, (size_t)((te - tb) * d.Dp) * sizeof(float));
        memset(dvacc, 0, (size_t)((te - tb) * d.Dp) * sizeof(float));

        /* who reads this block: groups that selected one of its regions, and the own groups */
        int64_t np = 0;
        const int32_t *offs = p->inv_offsets + bh * (d.NK + 1);
        const int32_t *grp = p->inv_groups + bh * d.G * d.T;
        for (int64_t j = jb; j < je; ++j) {
            for (int32_t e = offs[j]; e < offs[j + 1]; ++e) {
                pairs[np].gi = grp[e]; pairs[np].j = (int32_t)j; pairs[np].own = 0; ++np;
            }
            const int64_t gown = msattn_group_of_position(j * CK, d.span) - d.g0;
            if (gown >= 0 && gown < d.G) {
                pairs[np].gi = (int32_t)gown; pairs[np].j = (int32_t)j; pairs[np].own = 1; ++np;
            }
        }
        qsort(pairs, (size_t)np, sizeof(ms_pair), ms_pair_cmp);

        for (int64_t e0 = 0; e0 < np;) {
            const int64_t gi = pairs[e0].gi, ga = d.g0 + gi;
            int64_t e1 = e0;
            while (e1 < np && pairs[e1].gi == gi) ++e1;
            const int32_t *sel = ms_index_row(p, &d, bh, gi);
            int64_t n_sel = 0;
            while (n_sel < d.T && sel[n_sel] >= 0) ++n_sel;
            const int64_t ncol = ms_pack_columns(p, ops, &d, b, h, ga, n_sel, qt, dot, qrow, dorow, lse2, delta,
                                                 qpos, tmin, tmax, tmp);

            for (int64_t e = e0; e < e1; ++e) {
                const int64_t j = pairs[e].j, own = pairs[e].own;
                /* the region's valid keys, rotated to the positions this group gives them */
                msattn_range tok = msattn_key_region(j, p->block_k, d.N);
                int64_t rank = 0;
                if (rope && !own)
                    while (sel[rank] != j) ++rank;
                int64_t nk = 0;
                for (int64_t t = tok.begin; t < tok.end; ++t) {
                    if (!ms_valid(p->key_mask, p->mask_sb, b, t)) continue;
                    kp[nk] = (int32_t)t;
                    kc[nk] = (int32_t)(own ? msattn_compact_own(n_sel, p->block_k, t, ga, d.span)
                                           : msattn_compact_selected(rank, t - tok.begin, p->block_k));
                    ms_load_row(kr + nk * d.Dp, ops, &p->k, p->dtype, b, h, t, (int)d.D, 1.0f);
                    if (rope) ms_rope_rotate(kr + nk * d.Dp, &p->rope, kc[nk], 1.0f);
                    ms_load_row(vr + nk * d.Dp, ops, &p->v, p->dtype, b, h, t, (int)d.D, 1.0f);
                    ++nk;
                }
                if (nk == 0) continue;
                memset(dkr, 0, (size_t)(nk * d.Dp) * sizeof(float));
                memset(dvr, 0, (size_t)(nk * d.Dp) * sizeof(float));
                const int masked = p->causal && own;
                /* column tiles outer: each tile's packed queries stay in L1 for every key chunk */
                for (int64_t c0 = 0; c0 < ncol; c0 += MSATTN_TILE) {
                    const int nc = (int)msattn_min64(MSATTN_TILE, ncol - c0);
                    const int64_t toff = (c0 / MSATTN_TILE) * d.D * MSATTN_TILE;
                    const int32_t tlo = tmin[c0 / MSATTN_TILE], thi = tmax[c0 / MSATTN_TILE];
                    for (int64_t r0 = 0; r0 < nk; r0 += MSATTN_ROWS) {
                        const int rows = (int)msattn_min64(MSATTN_ROWS, nk - r0);
                        if (masked && thi < kp[r0]) continue; /* every query of the tile precedes */
                        ops->qk(s, kr + r0 * d.Dp, d.Dp, rows, qt + toff, MSATTN_TILE, (int)d.D);
                        for (int r = 0; r < rows; ++r) ops->exp2_sub(s + r * MSATTN_TILE, lse2 + c0, nc);
                        if (masked && tlo < kp[r0 + rows - 1])
                            for (int r = 0; r < rows; ++r)
                                for (int c = 0; c < nc; ++c)
                                    if (qpos[c0 + c] < kp[r0 + r]) s[r * MSATTN_TILE + c] = 0.0f;
                        ops->pv(dvr + r0 * d.Dp, d.Dp, s, rows, nc, dorow + c0 * d.Dp, d.Dp, (int)d.Dp);
                        ops->qk(dp, vr + r0 * d.Dp, d.Dp, rows, dot + toff, MSATTN_TILE, (int)d.D);
                        for (int r = 0; r < rows; ++r)
                            ops->mul_sub_vec(s + r * MSATTN_TILE, dp + r * MSATTN_TILE, delta + c0, nc);
                        ops->pv(dkr + r0 * d.Dp, d.Dp, s, rows, nc, qrow + c0 * d.Dp, d.Dp, (int)d.Dp);
                    }
                }
                for (int64_t r = 0; r < nk; ++r) {
                    float *gk = dkr + r * d.Dp, *gv = dvr + r * d.Dp;
                    if (rope) ms_rope_rotate(gk, &p->rope, kc[r], -1.0f);
                    float *ak = dkacc + (kp[r] - tb) * d.Dp, *av = dvacc + (kp[r] - tb) * d.Dp;
                    for (int64_t k = 0; k < d.D; ++k) { ak[k] += gk[k]; av[k] += gv[k]; }
                }
            }
            e0 = e1;
        }
        for (int64_t t = tb; t < te; ++t) {
            float *gk = dkacc + (t - tb) * d.Dp;
            ops->scale(gk, (int)d.D, (float)p->scale);
            ms_store_row(&p->dk, ops, p->dtype, b, h, t, gk, (int)d.D);
            ms_store_row(&p->dv, ops, p->dtype, b, h, t, dvacc + (t - tb) * d.Dp, (int)d.D);
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// naive twins, in double

/* the keys of query `pos` of group ga, as (absolute, compact) positions; returns their number */
static int64_t ms_ref_keys(const msattn_ms_params *p, const ms_dims *d, int64_t b, int64_t bh,
                           int64_t gi, int64_t pos, int32_t *kpos, int32_t *kcomp, int64_t *n_sel) {
    const int64_t ga = d->g0 + gi;
    const int32_t *sel = p->index + (bh * d->G + gi) * d->T;
    int64_t n = 0;
    *n_sel = 0;
    for (int64_t i = 0; i < d->T; ++i) {
        if (sel[i] < 0) break;
        ++*n_sel;
        for (int64_t t = (int64_t)sel[i] * p->block_k; t < (int64_t)(sel[i] + 1) * p->block_k && t < d->N; ++t)
            if (ms_valid(p->key_mask, p->mask_sb, b, t)) {
                kpos[n] = (int32_t)t;
                kcomp[n++] = (int32_t)(i * p->block_k + (t - (int64_t)sel[i] * p->block_k));
            }
    }
    for (int64_t t = ga * d->span; t < (ga + 1) * d->span && t < d->N; ++t) {
        if (p->causal && t > pos) break;
        if (ms_valid(p->key_mask, p->mask_sb, b, t)) {
            kpos[n] = (int32_t)t;
            kcomp[n++] = (int32_t)(*n_sel * p->block_k + (t - ga * d->span));
        }
    }
    return n;
}

static void ms_ref_row(double *x, const msattn_ms_params *p, const msattn_view *v, int64_t b,
                       int64_t h, int64_t t, int64_t D, int64_t rope_pos) {
    for (int64_t k = 0; k < D; ++k)
        x[k] = msattn_load_f64(v->data, b * v->sb + h * v->sh + t * v->sn + k * v->sd, p->dtype);
    if (rope_pos >= 0) ms_rope_rotate_f64(x, &p->rope, rope_pos, 1.0);
}

static void ms_ref_store(const msattn_view *v, msattn_dtype dt, int64_t b, int64_t h, int64_t t,
                         const double *x, int64_t D) {
    for (int64_t k = 0; k < D; ++k) msattn_store_f64(v->data, b * v->sb + h * v->sh + t * v->sn + k * v->sd, dt, x[k]);
}

static void ms_ref_store_lse(const msattn_ms_params *p, int64_t row, double v) {
    if (p->dtype == MSATTN_F64) ((double *)p->lse)[row] = v;
    else ((float *)p->lse)[row] = (float)v;
}

int msattn_ms_fwd_ref_cpu(const msattn_ms_params *p, int64_t begin, int64_t end) {
    const ms_dims d = ms_dims_of(p);
    const int rope = p->rope.cos != NULL;
    int32_t *kpos = (int32_t *)malloc((size_t)d.Lmax * 4);
    int32_t *kcomp = (int32_t *)malloc((size_t)d.Lmax * 4);
    double *sc = (double *)malloc((size_t)d.Lmax * 8);
    double *q = (double *)malloc((size_t)d.D * 8), *k = (double *)malloc((size_t)d.D * 8);
    double *o = (double *)malloc((size_t)d.D * 8);
    int status = MSATTN_OK;
    if (!kpos || !kcomp || !sc || !q || !k || !o) { status = MSATTN_ERR_NOMEM; goto done; }
    for (int64_t w = begin; w < end; ++w) {
        const int64_t gi = w % d.G, bh = w / d.G, b = bh / p->Hkv, h = bh % p->Hkv, ga = d.g0 + gi;
        const msattn_range qr = msattn_group_queries(ga, d.span, d.N, d.Nq);
        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq)
            for (int64_t pos = qr.begin; pos < qr.end; ++pos) {
                int64_t n_sel;
                const int64_t L = ms_ref_keys(p, &d, b, bh, gi, pos, kpos, kcomp, &n_sel);
                const int64_t i = pos - (d.N - d.Nq);
                ms_ref_row(q, p, &p->q, b, hq, i, d.D, rope ? n_sel * p->block_k + (pos - ga * d.span) : -1);
                double mx = -INFINITY, sum = 0.0;
                for (int64_t t = 0; t < L; ++t) {
                    ms_ref_row(k, p, &p->k, b, h, kpos[t], d.D, rope ? kcomp[t] : -1);
                    double s = 0.0;
                    for (int64_t x = 0; x < d.D; ++x) s += q[x] * k[x];
                    sc[t] = s * p->scale;
                    mx = sc[t] > mx ? sc[t] : mx;
                }
                for (int64_t x = 0; x < d.D; ++x) o[x] = 0.0;
                for (int64_t t = 0; t < L; ++t) {
                    const double e = exp(sc[t] - mx);
                    sum += e;
                    ms_ref_row(k, p, &p->v, b, h, kpos[t], d.D, -1);
                    for (int64_t x = 0; x < d.D; ++x) o[x] += e * k[x];
                }
                for (int64_t x = 0; x < d.D; ++x) o[x] = L > 0 ? o[x] / sum : 0.0;
                ms_ref_store(&p->out, p->dtype, b, hq, i, o, d.D);
                ms_ref_store_lse(p, (b * p->Hq + hq) * d.Nq + i, L > 0 ? mx + log(sum) : -INFINITY);
            }
    }
done:
    free(kpos); free(kcomp); free(sc); free(q); free(k); free(o);
    return status;
}

int msattn_ms_bwd_ref_cpu(const msattn_ms_params *p, int64_t begin, int64_t end) {
    const ms_dims d = ms_dims_of(p);
    const int rope = p->rope.cos != NULL;
    int32_t *kpos = (int32_t *)malloc((size_t)d.Lmax * 4);
    int32_t *kcomp = (int32_t *)malloc((size_t)d.Lmax * 4);
    double *pr = (double *)malloc((size_t)d.Lmax * 8), *dpr = (double *)malloc((size_t)d.Lmax * 8);
    double *q = (double *)malloc((size_t)d.D * 8), *k = (double *)malloc((size_t)d.D * 8);
    double *g = (double *)malloc((size_t)d.D * 8), *dq = (double *)malloc((size_t)d.D * 8);
    double *gk = (double *)malloc((size_t)d.D * 8);
    double *dk = (double *)calloc((size_t)(d.N * d.D), 8), *dv = (double *)calloc((size_t)(d.N * d.D), 8);
    int status = MSATTN_OK;
    if (!kpos || !kcomp || !pr || !dpr || !q || !k || !g || !dq || !gk || !dk || !dv) { status = MSATTN_ERR_NOMEM; goto done; }
    for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p->Hkv, h = bh % p->Hkv;
        memset(dk, 0, (size_t)(d.N * d.D) * 8);
        memset(dv, 0, (size_t)(d.N * d.D) * 8);
        for (int64_t gi = 0; gi < d.G; ++gi) {
            const int64_t ga = d.g0 + gi;
            const msattn_range qr = msattn_group_queries(ga, d.span, d.N, d.Nq);
            for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq)
                for (int64_t pos = qr.begin; pos < qr.end; ++pos) {
                    int64_t n_sel;
                    const int64_t L = ms_ref_keys(p, &d, b, bh, gi, pos, kpos, kcomp, &n_sel);
                    const int64_t i = pos - (d.N - d.Nq);
                    const int64_t qrope = rope ? n_sel * p->block_k + (pos - ga * d.span) : -1;
                    ms_ref_row(q, p, &p->q, b, hq, i, d.D, qrope);
                    ms_ref_row(g, p, &p->dout, b, hq, i, d.D, -1);
                    double mx = -INFINITY, sum = 0.0, delta = 0.0;
                    for (int64_t t = 0; t < L; ++t) {
                        ms_ref_row(k, p, &p->k, b, h, kpos[t], d.D, rope ? kcomp[t] : -1);
                        double s = 0.0;
                        for (int64_t x = 0; x < d.D; ++x) s += q[x] * k[x];
                        pr[t] = s * p->scale;
                        mx = pr[t] > mx ? pr[t] : mx;
                    }
                    for (int64_t t = 0; t < L; ++t) { pr[t] = exp(pr[t] - mx); sum += pr[t]; }
                    for (int64_t t = 0; t < L; ++t) {
                        pr[t] /= sum;
                        ms_ref_row(k, p, &p->v, b, h, kpos[t], d.D, -1);
                        double s = 0.0;
                        for (int64_t x = 0; x < d.D; ++x) s += g[x] * k[x];
                        dpr[t] = s;
                        delta += pr[t] * s;
                    }
                    if (p->dlse)
                        delta -= p->dtype == MSATTN_F64 ? ((const double *)p->dlse)[(b * p->Hq + hq) * d.Nq + i]
                                                        : (double)((const float *)p->dlse)[(b * p->Hq + hq) * d.Nq + i];
                    for (int64_t x = 0; x < d.D; ++x) dq[x] = 0.0;
                    for (int64_t t = 0; t < L; ++t) {
                        const double ds = pr[t] * (dpr[t] - delta) * p->scale;
                        double *dkt = dk + (int64_t)kpos[t] * d.D, *dvt = dv + (int64_t)kpos[t] * d.D;
                        ms_ref_row(k, p, &p->k, b, h, kpos[t], d.D, rope ? kcomp[t] : -1);
                        for (int64_t x = 0; x < d.D; ++x) dq[x] += ds * k[x];
                        /* dK in the rotated frame of this group, rotated back */
                        for (int64_t x = 0; x < d.D; ++x) gk[x] = ds * q[x];
                        if (rope) ms_rope_rotate_f64(gk, &p->rope, kcomp[t], -1.0);
                        for (int64_t x = 0; x < d.D; ++x) { dkt[x] += gk[x]; dvt[x] += pr[t] * g[x]; }
                    }
                    if (rope) ms_rope_rotate_f64(dq, &p->rope, qrope, -1.0);
                    ms_ref_store(&p->dq, p->dtype, b, hq, i, dq, d.D);
                }
        }
        for (int64_t t = 0; t < d.N; ++t) {
            ms_ref_store(&p->dk, p->dtype, b, h, t, dk + t * d.D, d.D);
            ms_ref_store(&p->dv, p->dtype, b, h, t, dv + t * d.D, d.D);
        }
    }
done:
    free(kpos); free(kcomp); free(pr); free(dpr); free(q); free(k); free(g); free(dq); free(gk); free(dk); free(dv);
    return status;
}
