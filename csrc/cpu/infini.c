/*
 * infini.c -- Infini-attention for one segment on the CPU (arXiv 2404.07143, DESIGN section 3).
 *
 * Per batch b and KV head h: a segment of N keys (positions 0..N-1) whose last Nq positions are the
 * queries; for each query head hq of h's GQA group, with g = sigmoid(beta[hq]),
 *   A_loc = softmax(q k^T * scale) v         causal inside the segment, padded keys skipped
 *   A_mem = sigma(q) M / (sigma(q) . z + eps)  sigma(x) = ELU(x) + 1 > 0, eps = MSATTN_INFINI_EPS
 *   out   = g * A_mem + (1 - g) * A_loc
 * and the memory of KV head h, shared by its query heads, takes the segment's valid keys:
 *   linear  M' = M + sigma(K)^T V
 *   delta   M' = M + sigma(K)^T (V - sigma(K) M / (sigma(K) z + eps))   (old M and z on the right)
 *   z' = z + sum_t sigma(K_t)
 * sigma > 0 makes z >= 0 and the denominator positive for any memory built by this op; eps only
 * decides the empty memory (M = 0, z = 0), which retrieves exactly 0.
 * With rope tables (p->rope.cos), q and k arrive un-rotated: A_loc scores R(i) q against R(t) k with
 * positions inside the segment (the same relative angles as absolute positions), while sigma(q),
 * sigma(k) and the memory use them un-rotated, so that what the memory stores and retrieves does not
 * depend on where in the sequence it was written. Local gradients are rotated back.
 *
 *   forward   item (b, h, query block): packs the keys up to the block's last query (K transposed
 *             tile-major, V as rows, fp32) once, then for every query head of the GQA group runs the
 *             flash loop of ms_attention.c (4 x 64 score tiles through the simd table, online
 *             softmax), the retrieval (rows x (D, D) through the pv tile) and the mix. Saves A_loc
 *             and its log-sum-exp for the backward.
 *   update    item (b, h): M' and z', 64 keys at a time: sigma(K) transposed times V (or the
 *             delta-rule residual) through the pv tile into an fp32 accumulator.
 *   backward  pass 1, item (b, h, query block): dq (local and retrieval) and
 *             delta = rowsum(dA_loc * A_loc) - dlse.
 *             pass 2, item (b, h, key block): dk, dv of the block's keys. The local part walks the
 *             query columns at or after the block, packed in chunks (as ms_attention.c's pass 2);
 *             the memory-write part is per key, from dM' and dz'.
 *             pass 3, item (b, h): dM, dz (from dM', dz', the retrieval and the delta rule) and the
 *             per-batch dbeta of the group's query heads.
 *             Every output belongs to one item and is summed in a fixed order: no atomics, the
 *             results do not depend on the number of threads.
 *   _ref      naive twins in double, item (b, h); they also serve fp64 inputs.
 *
 * Gradients, per query i (dO its output gradient) and key t, a = sigma(k_t), c = a . z + eps:
 *   dA_loc = (1 - g) dO + dO_local;  dA_mem = g dO;  dbeta = g (1 - g) sum dO . (A_mem - A_loc)
 *   retrieval: dnum = dA_mem / den, dden = -dA_mem . A_mem / den; dsigma(q) = M dnum + z dden;
 *              dM += sigma(q) dnum^T, dz += sigma(q) dden
 *   linear:    dv_t += dM'^T a; da = dM' v_t + dz'
 *   delta:     r = M^T a / c, du = dM'^T a; dv_t += du; da = dM' (v_t - r) + dz' - (M du) / c
 *              + z (du . r) / c; dM += -a du^T / c, dz += a (du . r) / c
 *   dk_t += da * sigma'(k_t); dM += dM', dz += dz' (the identity part of the update)
 *
 * Legend: B batch, Hq/Hkv heads, hg = Hq/Hkv, N keys of the segment, Nq queries (the last Nq
 * positions), D head dim of q, k, v (M is (D, D)), Dp = D rounded up to 16, L keys of an item,
 * Lp = L rounded up to 64, QB q_block, KB k_block, CC query columns per packed chunk (pass 2).
 */
#include <stdlib.h>

#include "common.h"

typedef struct {
    int64_t N, Nq, D, Dp, hg, QB, KB, nqb, nkb, Lpmax;
    float c; /* scale * log2(e): scores in the log2 domain */
} inf_dims;

static inf_dims inf_dims_of(const msattn_infini_params *p) {
    inf_dims d;
    d.N = p->N; d.Nq = p->Nq; d.D = p->D; d.Dp = ms_round_up(p->D, MSATTN_DPAD);
    d.hg = p->Hkv > 0 ? p->Hq / p->Hkv : 1;
    d.QB = p->q_block > 0 ? p->q_block : 1;
    d.KB = p->k_block > 0 ? p->k_block : 1;
    d.nqb = msattn_cdiv(p->Nq, d.QB);
    d.nkb = msattn_cdiv(p->N, d.KB);
    d.Lpmax = ms_round_up(p->N > 0 ? p->N : 1, MSATTN_TILE);
    d.c = (float)(p->scale * MS_LOG2E_D);
    return d;
}

/* rows per register sub-block of a query block */
#define INF_ROWS 16
/* query columns per packed chunk of backward pass 2 */
#define INF_COLS 256

static inline double inf_gate(double beta) { return 1.0 / (1.0 + exp(-beta)); }

/* x = sigma(x) in place for n <= MSATTN_MAX_HEAD_DIM values (a head's), and dsig = sigma'(x) (1 above
 * 0, e^x below) unless NULL; e^x through the table's vector exp2 */
static void inf_sigma(const msattn_simd_ops *ops, float *x, float *dsig, int64_t n) {
    float e[MSATTN_MAX_HEAD_DIM];
    for (int64_t i = 0; i < n; ++i) e[i] = x[i] * (float)MS_LOG2E_D;
    ops->exp2_sum(e, (int)n, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
        const int pos = x[i] > 0.0f;
        if (dsig) dsig[i] = pos ? 1.0f : e[i];
        x[i] = pos ? x[i] + 1.0f : e[i];
    }
}

/* dst[0..Dp) = a * row (b, h, t) of v, zero past D */
static inline void inf_load_row(float *dst, const msattn_simd_ops *ops, const msattn_view *v,
                                msattn_dtype dt, int64_t b, int64_t h, int64_t t, const inf_dims *d,
                                float a) {
    ms_load_row(dst, ops, v, dt, b, h, t, (int)d->D, a);
    memset(dst + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
}

/* valid keys in [t0, t1), ascending, into kpos; returns their number */
static int64_t inf_valid_keys(const msattn_infini_params *p, int64_t b, int64_t t0, int64_t t1,
                              int32_t *kpos) {
    int64_t n = 0;
    for (int64_t t = t0; t < t1; ++t)
        if (ms_valid(p->key_mask, p->mask_sb, b, t)) kpos[n++] = (int32_t)t;
    return n;
}

/* the memory of (b, h) as fp32 rows: mrow (D, Dp) = M, mt (D, Dp) = M^T (or NULL), z (Dp);
 * padding zero. m and z are float (the fast kernels never see F64). */
static void inf_load_memory(const inf_dims *d, const float *m, const float *z, float *mrow, float *mt,
                            float *zrow) {
    for (int64_t i = 0; i < d->D; ++i) {
        memcpy(mrow + i * d->Dp, m + i * d->D, (size_t)d->D * sizeof(float));
        memset(mrow + i * d->Dp + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
        if (mt) {
            for (int64_t j = 0; j < d->D; ++j) mt[j * d->Dp + i] = m[i * d->D + j];
            memset(mt + i * d->Dp + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
        }
    }
    if (zrow) {
        if (z) memcpy(zrow, z, (size_t)d->D * sizeof(float));
        else memset(zrow, 0, (size_t)d->D * sizeof(float));
        memset(zrow + d->D, 0, (size_t)(d->Dp - d->D) * sizeof(float));
    }
}

/* out (rows, dp at stride ldo) += x (rows, n at stride ldx) . bm (n, dp at stride ldb), through the
 * pv tile: x is copied 4 rows x 64 columns at a time into `tile` (MSATTN_ROWS x MSATTN_TILE) */
static void inf_xm(const msattn_simd_ops *ops, float *out, int64_t ldo, const float *x, int64_t ldx,
                   int64_t rows, int64_t n, const float *bm, int64_t ldb, int dp, float *tile) {
    for (int64_t r0 = 0; r0 < rows; r0 += MSATTN_ROWS) {
        const int rr = (int)msattn_min64(MSATTN_ROWS, rows - r0);
        for (int64_t c0 = 0; c0 < n; c0 += MSATTN_TILE) {
            const int nc = (int)msattn_min64(MSATTN_TILE, n - c0);
            for (int r = 0; r < rr; ++r)
                memcpy(tile + r * MSATTN_TILE, x + (r0 + r) * ldx + c0, (size_t)nc * sizeof(float));
            ops->pv(out + r0 * ldo, ldo, tile, rr, nc, bm + c0 * ldb, ldb, dp);
        }
    }
}

/* acc (D, Dp) += xt^T . y: xt is (D, 64) transposed tile-major (row i = dim i of n items), y the
 * items as rows (n, Dp). The outer-product sum of n items, through the pv tile. */
static void inf_outer(const msattn_simd_ops *ops, const inf_dims *d, float *acc, const float *xt,
                      const float *y, int n) {
    for (int64_t d0 = 0; d0 < d->D; d0 += MSATTN_ROWS)
        ops->pv(acc + d0 * d->Dp, d->Dp, xt + d0 * MSATTN_TILE, (int)msattn_min64(MSATTN_ROWS, d->D - d0), n,
                y, d->Dp, (int)d->Dp);
}

/* transpose n rows (n <= 64, stride Dp) into a (D, 64) tile */
static void inf_transpose(const inf_dims *d, float *xt, const float *rows, int n) {
    for (int c = 0; c < n; ++c)
        for (int64_t i = 0; i < d->D; ++i) xt[i * MSATTN_TILE + c] = rows[c * d->Dp + i];
}

/* retrieval of `rows` rows of sigma(q) (stride Dp): num = sigma(q) M / den in place, den per row */
static void inf_retrieve(const msattn_simd_ops *ops, const msattn_infini_params *p, const inf_dims *d,
                         float *num, const float *sq, int rows, const float *mrow, const float *z,
                         float *den, float *tile) {
    memset(num, 0, (size_t)(rows * d->Dp) * sizeof(float));
    inf_xm(ops, num, d->Dp, sq, d->Dp, rows, d->D, mrow, d->Dp, (int)d->Dp, tile);
    for (int r = 0; r < rows; ++r) {
        den[r] = ops->dot(sq + r * d->Dp, z, (int)d->D) + (float)p->eps;
        ops->scale(num + r * d->Dp, (int)d->D, 1.0f / den[r]);
    }
}

/* pack L keys (positions kpos) of (b, h) for the local attention, converted to fp32 (keys rotated at
 * their positions with rope tables):
 *   kt, vt  K, V transposed, tile-major: tile i (64 keys) is a contiguous (D, 64) block (or NULL)
 *   krows, vrows  K, V as rows (Lp, Dp) (or NULL); keys past L are zero */
static void inf_pack_keys(const msattn_infini_params *p, const msattn_simd_ops *ops, const inf_dims *d,
                          int64_t b, int64_t h, const int32_t *kpos, int64_t L, int64_t Lp, float *kt,
                          float *vt, float *krows, float *vrows, float *tmp) {
    for (int pass = 0; pass < 2; ++pass) {
        const msattn_view *src = pass == 0 ? &p->k : &p->v;
        float *tt = pass == 0 ? kt : vt, *rr = pass == 0 ? krows : vrows;
        if (!tt && !rr) continue;
        for (int64_t t = 0; t < Lp; ++t) {
            if (t < L) {
                inf_load_row(tmp, ops, src, p->dtype, b, h, kpos[t], d, 1.0f);
                if (pass == 0 && p->rope.cos) ms_rope_rotate(tmp, &p->rope, kpos[t], 1.0f);
            } else {
                memset(tmp, 0, (size_t)d->Dp * sizeof(float));
            }
            if (tt) {
                float *tile = tt + (t / MSATTN_TILE) * d->D * MSATTN_TILE + t % MSATTN_TILE;
                for (int64_t i = 0; i < d->D; ++i) tile[i * MSATTN_TILE] = tmp[i];
            }
            if (rr) memcpy(rr + t * d->Dp, tmp, (size_t)d->Dp * sizeof(float));
        }
    }
}

/* causal mask of a (rows, 64) score tile: -inf where key position > query position */
static inline void inf_mask_causal(float *s, int rows, int nc, const int32_t *kpos, int64_t qpos0) {
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < nc; ++c)
            if (kpos[c] > qpos0 + r) s[r * MSATTN_TILE + c] = -INFINITY;
}

static inline int64_t inf_mem_off(const msattn_infini_params *p, int64_t b, int64_t h) {
    return (b * p->Hkv + h) * (int64_t)p->D;
}

// ----------------------------------------------------------------------------------------------
// forward: local attention, retrieval, mix

static size_t inf_fwd_bytes(const inf_dims *d) {
    return (size_t)d->Lpmax * 4 + (size_t)(d->D * d->Lpmax + d->Lpmax * d->Dp) * 4 +
           (size_t)(5 * INF_ROWS * d->Dp) * 4 + (size_t)(2 * MSATTN_ROWS * MSATTN_TILE) * 4 +
           (size_t)(d->D * d->Dp + d->Dp + INF_ROWS) * 4 + 12 * 64;
}

static size_t inf_update_bytes(const inf_dims *d) {
    return (size_t)(2 * d->D * d->Dp + 2 * d->Dp) * 4 + (size_t)(3 * MSATTN_TILE * d->Dp) * 4 +
           (size_t)(d->D * MSATTN_TILE + MSATTN_ROWS * MSATTN_TILE + MSATTN_TILE) * 4 + 12 * 64;
}

size_t msattn_infini_fwd_scratch_bytes(const msattn_infini_params *p) {
    const inf_dims d = inf_dims_of(p);
    const size_t a = inf_fwd_bytes(&d), b = inf_update_bytes(&d);
    return a > b ? a : b;
}

int msattn_infini_fwd_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const inf_dims d = inf_dims_of(p);
    char *cur = (char *)scratch;
    int32_t *kpos = (int32_t *)ms_carve(&cur, (size_t)d.Lpmax, 4);
    float *kt = (float *)ms_carve(&cur, (size_t)(d.D * d.Lpmax), 4);
    float *vr = (float *)ms_carve(&cur, (size_t)(d.Lpmax * d.Dp), 4);
    float *qb = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);  /* q * scale * log2(e) */
    float *sq = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);  /* sigma(q) */
    float *ob = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);  /* A_loc */
    float *num = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4); /* A_mem */
    float *tmp = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);
    float *s = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *tile = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *mrow = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);
    float *z = (float *)ms_carve(&cur, (size_t)d.Dp, 4);
    float *den = (float *)ms_carve(&cur, INF_ROWS, 4);
    float *lse = (float *)p->lse;

    for (int64_t w = begin; w < end; ++w) {
        const int64_t qi = w % d.nqb, bh = w / d.nqb, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t i0 = qi * d.QB, i1 = msattn_min64(d.Nq, i0 + d.QB), off = d.N - d.Nq;
        /* causal: keys after the block's last query are never visible */
        const int64_t L = inf_valid_keys(p, b, 0, p->causal ? off + i1 : d.N, kpos);
        const int64_t Lp = ms_round_up(L > 0 ? L : 1, MSATTN_TILE);
        inf_pack_keys(p, ops, &d, b, h, kpos, L, Lp, kt, NULL, NULL, vr, tmp);
        inf_load_memory(&d, (const float *)p->mem + inf_mem_off(p, b, h) * d.D,
                        (const float *)p->norm + inf_mem_off(p, b, h), mrow, NULL, z);

        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
            const double g = inf_gate(p->beta[hq]);
            for (int64_t j0 = i0; j0 < i1; j0 += INF_ROWS) {
                const int qrows = (int)msattn_min64(INF_ROWS, i1 - j0);
                const int64_t pos0 = off + j0;
                for (int r = 0; r < qrows; ++r) {
                    inf_load_row(qb + r * d.Dp, ops, &p->q, p->dtype, b, hq, j0 + r, &d, d.c);
                    if (p->rope.cos) ms_rope_rotate(qb + r * d.Dp, &p->rope, pos0 + r, 1.0f);
                    inf_load_row(sq + r * d.Dp, ops, &p->q, p->dtype, b, hq, j0 + r, &d, 1.0f);
                    inf_sigma(ops, sq + r * d.Dp, NULL, d.D);
                }
                float m[INF_ROWS], l[INF_ROWS];
                for (int r = 0; r < INF_ROWS; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }
                memset(ob, 0, (size_t)(INF_ROWS * d.Dp) * sizeof(float));
                const int64_t kend = p->causal ? ms_upper_bound(kpos, L, pos0 + qrows - 1) : L;
                for (int64_t t0 = 0; t0 < kend; t0 += MSATTN_TILE) {
                    const int nc = (int)msattn_min64(MSATTN_TILE, kend - t0);
                    const float *ktile = kt + (t0 / MSATTN_TILE) * d.D * MSATTN_TILE;
                    for (int r0 = 0; r0 < qrows; r0 += MSATTN_ROWS) {
                        const int rows = (int)msattn_min64(MSATTN_ROWS, qrows - r0);
                        const int64_t q0 = pos0 + r0;
                        if (p->causal && kpos[t0] > q0 + rows - 1) continue; /* not yet visible */
                        ops->qk(s, qb + r0 * d.Dp, d.Dp, rows, ktile, MSATTN_TILE, (int)d.D);
                        if (p->causal && kpos[t0 + nc - 1] > q0) inf_mask_causal(s, rows, nc, kpos + t0, q0);
                        ops->softmax_update(s, rows, nc, m + r0, l + r0, ob + r0 * d.Dp, d.Dp, (int)d.Dp);
                        ops->pv(ob + r0 * d.Dp, d.Dp, s, rows, nc, vr + t0 * d.Dp, d.Dp, (int)d.Dp);
                    }
                }
                inf_retrieve(ops, p, &d, num, sq, qrows, mrow, z, den, tile);
                const float gm = (float)g, gl = (float)(1.0 - g);
                for (int r = 0; r < qrows; ++r) {
                    const int64_t row = (b * p->Hq + hq) * d.Nq + j0 + r;
                    float *o = ob + r * d.Dp, *a = num + r * d.Dp;
                    if (l[r] != 0.0f) { /* NaN included: NaN in, NaN out */
                        ops->scale(o, (int)d.D, 1.0f / l[r]);
                        lse[row] = (float)((m[r] + log2((double)l[r])) * MS_LN2);
                    } else { /* no visible key: A_loc = 0 */
                        memset(o, 0, (size_t)d.D * sizeof(float));
                        lse[row] = -INFINITY;
                    }
                    ms_store_row(&p->out_local, ops, p->dtype, b, hq, j0 + r, o, (int)d.D);
                    for (int64_t i = 0; i < d.D; ++i) a[i] = gm * a[i] + gl * o[i];
                    ms_store_row(&p->out, ops, p->dtype, b, hq, j0 + r, a, (int)d.D);
                }
            }
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// forward: the memory write

/* load up to 64 valid keys from *t onwards: a = sigma(k) rows and v rows (stride Dp); advances *t */
static int inf_next_keys(const msattn_infini_params *p, const msattn_simd_ops *ops, const inf_dims *d,
                         int64_t b, int64_t h, int64_t *t, float *arow, float *vrow) {
    int n = 0;
    for (; *t < d->N && n < MSATTN_TILE; ++*t) {
        if (!ms_valid(p->key_mask, p->mask_sb, b, *t)) continue;
        inf_load_row(arow + n * d->Dp, ops, &p->k, p->dtype, b, h, *t, d, 1.0f);
        inf_sigma(ops, arow + n * d->Dp, NULL, d->D);
        if (vrow) inf_load_row(vrow + n * d->Dp, ops, &p->v, p->dtype, b, h, *t, d, 1.0f);
        ++n;
    }
    return n;
}

/* r = a M / (a . z + eps) for n rows of a; c[i] = a_i . z + eps */
static void inf_delta_retrieve(const msattn_simd_ops *ops, const msattn_infini_params *p, const inf_dims *d,
                               float *r, const float *arow, int n, const float *mrow, const float *z,
                               float *c, float *tile) {
    memset(r, 0, (size_t)(n * d->Dp) * sizeof(float));
    inf_xm(ops, r, d->Dp, arow, d->Dp, n, d->D, mrow, d->Dp, (int)d->Dp, tile);
    for (int i = 0; i < n; ++i) {
        c[i] = ops->dot(arow + i * d->Dp, z, (int)d->D) + (float)p->eps;
        ops->scale(r + i * d->Dp, (int)d->D, 1.0f / c[i]);
    }
}

int msattn_infini_update_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const inf_dims d = inf_dims_of(p);
    char *cur = (char *)scratch;
    float *m0 = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);   /* the incoming M */
    float *macc = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4); /* M' */
    float *z0 = (float *)ms_carve(&cur, (size_t)d.Dp, 4);
    float *zacc = (float *)ms_carve(&cur, (size_t)d.Dp, 4);
    float *arow = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4);
    float *urow = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4);
    float *rrow = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4);
    float *at = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *tile = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *c = (float *)ms_carve(&cur, MSATTN_TILE, 4);

    for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p->Hkv, h = bh % p->Hkv, off = inf_mem_off(p, b, h);
        inf_load_memory(&d, (const float *)p->mem + off * d.D, (const float *)p->norm + off, m0, NULL, z0);
        memcpy(macc, m0, (size_t)(d.D * d.Dp) * sizeof(float));
        memcpy(zacc, z0, (size_t)d.Dp * sizeof(float));
        for (int64_t t = 0; p->update_memory;) {
            const int n = inf_next_keys(p, ops, &d, b, h, &t, arow, urow);
            if (n == 0) break;
            if (p->delta_rule) { /* u = v - retrieval from the old memory */
                inf_delta_retrieve(ops, p, &d, rrow, arow, n, m0, z0, c, tile);
                for (int64_t i = 0; i < n * d.Dp; ++i) urow[i] -= rrow[i];
            }
            inf_transpose(&d, at, arow, n);
            inf_outer(ops, &d, macc, at, urow, n);
            for (int i = 0; i < n; ++i)
                for (int64_t j = 0; j < d.D; ++j) zacc[j] += arow[i * d.Dp + j];
        }
        float *mo = (float *)p->mem_out + off * d.D;
        for (int64_t i = 0; i < d.D; ++i) memcpy(mo + i * d.D, macc + i * d.Dp, (size_t)d.D * sizeof(float));
        memcpy((float *)p->norm_out + off, zacc, (size_t)d.D * sizeof(float));
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward pass 1: dq and delta, item (b, h, query block)

static size_t inf_bwd_dq_bytes(const inf_dims *d) {
    return (size_t)d->Lpmax * 4 + (size_t)(2 * d->D * d->Lpmax + d->Lpmax * d->Dp) * 4 +
           (size_t)(9 * INF_ROWS * d->Dp) * 4 + (size_t)(3 * MSATTN_ROWS * MSATTN_TILE) * 4 +
           (size_t)(2 * d->D * d->Dp + d->Dp + INF_ROWS) * 4 + 24 * 64;
}

/* dA_loc rows: (1 - g) dO + dO_local */
static void inf_load_dlocal(const msattn_infini_params *p, const msattn_simd_ops *ops, const inf_dims *d,
                            float *dst, const float *dob, float *tmp, int64_t b, int64_t hq, int64_t i, float gl) {
    for (int64_t x = 0; x < d->Dp; ++x) dst[x] = gl * dob[x];
    if (p->dout_local.data) {
        inf_load_row(tmp, ops, &p->dout_local, p->dtype, b, hq, i, d, 1.0f);
        for (int64_t x = 0; x < d->D; ++x) dst[x] += tmp[x];
    }
}

int msattn_infini_bwd_dq_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const inf_dims d = inf_dims_of(p);
    char *cur = (char *)scratch;
    int32_t *kpos = (int32_t *)ms_carve(&cur, (size_t)d.Lpmax, 4);
    float *kt = (float *)ms_carve(&cur, (size_t)(d.D * d.Lpmax), 4);
    float *vt = (float *)ms_carve(&cur, (size_t)(d.D * d.Lpmax), 4);
    float *kr = (float *)ms_carve(&cur, (size_t)(d.Lpmax * d.Dp), 4);
    float *qb = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);  /* q * scale * log2(e) */
    float *sq = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);  /* q, then sigma(q) */
    float *dsq = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4); /* sigma'(q) */
    float *dob = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4); /* dO */
    float *dab = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4); /* dA_loc */
    float *alb = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4); /* A_loc */
    float *dqb = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);
    float *num = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4); /* A_mem, then dnum */
    float *ds = (float *)ms_carve(&cur, (size_t)(INF_ROWS * d.Dp), 4);  /* dsigma(q) */
    float *s = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *dp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *tile = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *mrow = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);
    float *mt = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);
    float *z = (float *)ms_carve(&cur, (size_t)d.Dp, 4);
    float *den = (float *)ms_carve(&cur, INF_ROWS, 4);
    const float *lse = (const float *)p->lse;

    for (int64_t w = begin; w < end; ++w) {
        const int64_t qi = w % d.nqb, bh = w / d.nqb, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t i0 = qi * d.QB, i1 = msattn_min64(d.Nq, i0 + d.QB), off = d.N - d.Nq;
        const int64_t L = inf_valid_keys(p, b, 0, p->causal ? off + i1 : d.N, kpos);
        const int64_t Lp = ms_round_up(L > 0 ? L : 1, MSATTN_TILE);
        inf_pack_keys(p, ops, &d, b, h, kpos, L, Lp, kt, vt, kr, NULL, dqb);
        inf_load_memory(&d, (const float *)p->mem + inf_mem_off(p, b, h) * d.D,
                        (const float *)p->norm + inf_mem_off(p, b, h), mrow, mt, z);

        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
            const double g = inf_gate(p->beta[hq]);
            const float gm = (float)g, gl = (float)(1.0 - g);
            for (int64_t j0 = i0; j0 < i1; j0 += INF_ROWS) {
                const int qrows = (int)msattn_min64(INF_ROWS, i1 - j0);
                const int64_t pos0 = off + j0, row0 = (b * p->Hq + hq) * d.Nq + j0;
                float delta[INF_ROWS], lse2[INF_ROWS];
                for (int r = 0; r < qrows; ++r) {
                    float *x = sq + r * d.Dp;
                    inf_load_row(x, ops, &p->q, p->dtype, b, hq, j0 + r, &d, 1.0f);
                    for (int64_t i = 0; i < d.Dp; ++i) qb[r * d.Dp + i] = x[i] * d.c;
                    if (p->rope.cos) ms_rope_rotate(qb + r * d.Dp, &p->rope, pos0 + r, 1.0f);
                    inf_sigma(ops, x, dsq + r * d.Dp, d.D);
                    inf_load_row(dob + r * d.Dp, ops, &p->dout, p->dtype, b, hq, j0 + r, &d, 1.0f);
                    inf_load_row(alb + r * d.Dp, ops, &p->out_local, p->dtype, b, hq, j0 + r, &d, 1.0f);
                    inf_load_dlocal(p, ops, &d, dab + r * d.Dp, dob + r * d.Dp, dqb, b, hq, j0 + r, gl);
                    delta[r] = ops->dot(dab + r * d.Dp, alb + r * d.Dp, (int)d.D);
                    if (p->dlse) delta[r] -= ((const float *)p->dlse)[row0 + r];
                    p->delta[row0 + r] = delta[r];
                    /* a query without keys: +inf makes every probability 0 */
                    lse2[r] = lse[row0 + r] == -INFINITY ? INFINITY : (float)(lse[row0 + r] * MS_LOG2E_D);
                }
                memset(dqb, 0, (size_t)(INF_ROWS * d.Dp) * sizeof(float));
                const int64_t kend = p->causal ? ms_upper_bound(kpos, L, pos0 + qrows - 1) : L;
                for (int64_t t0 = 0; t0 < kend; t0 += MSATTN_TILE) {
                    const int nc = (int)msattn_min64(MSATTN_TILE, kend - t0);
                    const int64_t toff = (t0 / MSATTN_TILE) * d.D * MSATTN_TILE;
                    for (int r0 = 0; r0 < qrows; r0 += MSATTN_ROWS) {
                        const int rows = (int)msattn_min64(MSATTN_ROWS, qrows - r0);
                        const int64_t q0 = pos0 + r0;
                        if (p->causal && kpos[t0] > q0 + rows - 1) continue;
                        ops->qk(s, qb + r0 * d.Dp, d.Dp, rows, kt + toff, MSATTN_TILE, (int)d.D);
                        if (p->causal && kpos[t0 + nc - 1] > q0) inf_mask_causal(s, rows, nc, kpos + t0, q0);
                        ops->qk(dp, dab + r0 * d.Dp, d.Dp, rows, vt + toff, MSATTN_TILE, (int)d.D);
                        ops->probs_ds_rows(s, dp, rows, nc, lse2 + r0, delta + r0);
                        ops->pv(dqb + r0 * d.Dp, d.Dp, s, rows, nc, kr + t0 * d.Dp, d.Dp, (int)d.Dp);
                    }
                }
                /* retrieval: dnum = g dO / den, dden = -g dO . A_mem / den, ds = M dnum + z dden */
                inf_retrieve(ops, p, &d, num, sq, qrows, mrow, z, den, tile);
                float dden[INF_ROWS];
                for (int r = 0; r < qrows; ++r) {
                    float *a = num + r * d.Dp;
                    const float *go = dob + r * d.Dp;
                    dden[r] = -gm * ops->dot(go, a, (int)d.D) / den[r];
                    for (int64_t i = 0; i < d.Dp; ++i) a[i] = gm * go[i] / den[r];
                }
                memset(ds, 0, (size_t)(qrows * d.Dp) * sizeof(float));
                inf_xm(ops, ds, d.Dp, num, d.Dp, qrows, d.D, mt, d.Dp, (int)d.Dp, tile);
                for (int r = 0; r < qrows; ++r) {
                    float *gq = dqb + r * d.Dp;
                    const float *x = ds + r * d.Dp, *ds1 = dsq + r * d.Dp;
                    ops->scale(gq, (int)d.D, (float)p->scale);
                    if (p->rope.cos) ms_rope_rotate(gq, &p->rope, pos0 + r, -1.0f); /* local part, rotated back */
                    for (int64_t i = 0; i < d.D; ++i) gq[i] += (x[i] + z[i] * dden[r]) * ds1[i];
                    ms_store_row(&p->dq, ops, p->dtype, b, hq, j0 + r, gq, (int)d.D);
                }
            }
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward pass 2: dk and dv, item (b, h, key block)

static size_t inf_bwd_dkv_bytes(const inf_dims *d) {
    const int64_t KBp = ms_round_up(d->KB, MSATTN_ROWS);
    return (size_t)KBp * 4 + (size_t)(11 * KBp * d->Dp) * 4 + (size_t)(2 * d->D * INF_COLS) * 4 +
           (size_t)(2 * INF_COLS * d->Dp) * 4 + (size_t)(3 * INF_COLS + 2 * (INF_COLS / MSATTN_TILE)) * 4 +
           (size_t)(3 * MSATTN_ROWS * MSATTN_TILE) * 4 + (size_t)(4 * d->D * d->Dp + 2 * d->Dp + KBp) * 4 +
           (size_t)(2 * d->Dp) * 4 + 42 * 64;
}

/* pack query columns [c0, c0 + n) of the item (n a multiple of 64): column c is query
 * i = ibeg + c % nqp of head h*hg + c / nqp, inert when i >= Nq. ibeg and nqp are multiples of 64, so
 * a tile always holds the same queries at the same lanes whatever the key block: the sums do not
 * depend on k_block (which the caller may choose from the thread count).
 * qt, dat: q * scale * log2(e) (rotated with rope tables) and dA_loc transposed, tile-major; qrow,
 * darow as rows; lse2, delta, qpos per column; tmin, tmax per 64-column tile over its real columns. */
static void inf_pack_columns(const msattn_infini_params *p, const msattn_simd_ops *ops, const inf_dims *d,
                             int64_t b, int64_t h, int64_t ibeg, int64_t nqp, int64_t c0, int n, float *qt,
                             float *dat, float *qrow, float *darow, float *lse2, float *delta, int32_t *qpos,
                             int32_t *tmin, int32_t *tmax, float *tmp) {
    const float *lse = (const float *)p->lse;
    for (int c = 0; c < n; ++c) {
        float *qtc = qt + (c / MSATTN_TILE) * d->D * MSATTN_TILE + c % MSATTN_TILE;
        float *dac = dat + (c / MSATTN_TILE) * d->D * MSATTN_TILE + c % MSATTN_TILE;
        float *qr = qrow + c * d->Dp, *dr = darow + c * d->Dp;
        const int64_t hq = h * d->hg + (c0 + c) / nqp, i = ibeg + (c0 + c) % nqp;
        if (i < d->Nq) {
            const int64_t row = (b * p->Hq + hq) * d->Nq + i;
            const float gl = (float)(1.0 - inf_gate(p->beta[hq]));
            inf_load_row(qr, ops, &p->q, p->dtype, b, hq, i, d, 1.0f);
            if (p->rope.cos) ms_rope_rotate(qr, &p->rope, d->N - d->Nq + i, 1.0f);
            inf_load_row(tmp, ops, &p->dout, p->dtype, b, hq, i, d, 1.0f);
            inf_load_dlocal(p, ops, d, dr, tmp, tmp + d->Dp, b, hq, i, gl);
            for (int64_t k = 0; k < d->D; ++k) {
                qtc[k * MSATTN_TILE] = qr[k] * d->c;
                dac[k * MSATTN_TILE] = dr[k];
            }
            lse2[c] = lse[row] == -INFINITY ? INFINITY : (float)(lse[row] * MS_LOG2E_D);
            delta[c] = p->delta[row];
            qpos[c] = (int32_t)(d->N - d->Nq + i);
        } else {
            for (int64_t k = 0; k < d->D; ++k) qtc[k * MSATTN_TILE] = dac[k * MSATTN_TILE] = 0.0f;
            memset(qr, 0, (size_t)d->Dp * sizeof(float));
            memset(dr, 0, (size_t)d->Dp * sizeof(float));
            lse2[c] = INFINITY;
            delta[c] = 0.0f;
            qpos[c] = INT32_MAX;
        }
    }
    for (int t0 = 0; t0 < n; t0 += MSATTN_TILE) {
        int32_t lo = INT32_MAX, hi = -1;
        for (int c = t0; c < t0 + MSATTN_TILE; ++c) {
            if (qpos[c] == INT32_MAX) continue;
            lo = qpos[c] < lo ? qpos[c] : lo;
            hi = qpos[c] > hi ? qpos[c] : hi;
        }
        tmin[t0 / MSATTN_TILE] = lo;
        tmax[t0 / MSATTN_TILE] = hi;
    }
}

int msattn_infini_bwd_dkv_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const inf_dims d = inf_dims_of(p);
    const int64_t KBp = ms_round_up(d.KB, MSATTN_ROWS);
    char *cur = (char *)scratch;
    int32_t *kp = (int32_t *)ms_carve(&cur, (size_t)KBp, 4);
    float *kr = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4);   /* the block's valid keys, rows */
    float *krot = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4); /* rotated for the local part (rope) */
    float *vr = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4);
    float *dka = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4);  /* their gradients */
    float *dva = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4);
    float *arow = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4); /* sigma(k) */
    float *dsig = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4); /* sigma'(k) */
    float *rrow = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4); /* delta rule: retrieval */
    float *durow = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4);
    float *dsk = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4); /* d sigma(k) */
    float *ubuf = (float *)ms_carve(&cur, (size_t)(KBp * d.Dp), 4);   /* u = v (- r), then M du */
    float *qt = (float *)ms_carve(&cur, (size_t)(d.D * INF_COLS), 4);
    float *dat = (float *)ms_carve(&cur, (size_t)(d.D * INF_COLS), 4);
    float *qrow = (float *)ms_carve(&cur, (size_t)(INF_COLS * d.Dp), 4);
    float *darow = (float *)ms_carve(&cur, (size_t)(INF_COLS * d.Dp), 4);
    float *lse2 = (float *)ms_carve(&cur, INF_COLS, 4);
    float *delta = (float *)ms_carve(&cur, INF_COLS, 4);
    int32_t *qpos = (int32_t *)ms_carve(&cur, INF_COLS, 4);
    int32_t *tmin = (int32_t *)ms_carve(&cur, INF_COLS / MSATTN_TILE, 4);
    int32_t *tmax = (int32_t *)ms_carve(&cur, INF_COLS / MSATTN_TILE, 4);
    float *s = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *dp = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *tile = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *mrow = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);
    float *mt = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);
    float *dmrow = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);  /* dM' */
    float *dmt = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);    /* dM'^T */
    float *z = (float *)ms_carve(&cur, (size_t)d.Dp, 4);
    float *dz = (float *)ms_carve(&cur, (size_t)d.Dp, 4);              /* dz' */
    float *cden = (float *)ms_carve(&cur, (size_t)KBp, 4);
    float *tmp = (float *)ms_carve(&cur, (size_t)(2 * d.Dp), 4);
    const int write_grad = p->update_memory && (p->dmem_out || p->dnorm_out);

    for (int64_t w = begin; w < end; ++w) {
        const int64_t kb = w % d.nkb, bh = w / d.nkb, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t t0 = kb * d.KB, t1 = msattn_min64(d.N, t0 + d.KB), off = d.N - d.Nq;
        const int64_t nk = inf_valid_keys(p, b, t0, t1, kp);
        const float *kl = p->rope.cos ? krot : kr; /* the keys the local attention scores */
        for (int64_t r = 0; r < nk; ++r) {
            inf_load_row(kr + r * d.Dp, ops, &p->k, p->dtype, b, h, kp[r], &d, 1.0f);
            inf_load_row(vr + r * d.Dp, ops, &p->v, p->dtype, b, h, kp[r], &d, 1.0f);
            if (p->rope.cos) {
                memcpy(krot + r * d.Dp, kr + r * d.Dp, (size_t)d.Dp * sizeof(float));
                ms_rope_rotate(krot + r * d.Dp, &p->rope, kp[r], 1.0f);
            }
        }
        memset(dka, 0, (size_t)(KBp * d.Dp) * sizeof(float));
        memset(dva, 0, (size_t)(KBp * d.Dp) * sizeof(float));

        /* local attention: the query columns that can see a key of the block, from a multiple of 64 */
        const int64_t ibeg = p->causal ? msattn_max64(0, t0 - off) / MSATTN_TILE * MSATTN_TILE : 0;
        const int64_t nqp = ms_round_up(msattn_max64(d.Nq - ibeg, 0), MSATTN_TILE);
        const int64_t ncol = nk > 0 ? d.hg * nqp : 0;
        for (int64_t c0 = 0; c0 < ncol; c0 += INF_COLS) {
            const int n = (int)msattn_min64(INF_COLS, ncol - c0);
            inf_pack_columns(p, ops, &d, b, h, ibeg, nqp, c0, n, qt, dat, qrow, darow, lse2, delta, qpos, tmin,
                             tmax, tmp);
            for (int64_t r0 = 0; r0 < nk; r0 += MSATTN_ROWS) {
                const int rows = (int)msattn_min64(MSATTN_ROWS, nk - r0);
                for (int ct = 0; ct < n; ct += MSATTN_TILE) {
                    const int nc = MSATTN_TILE;
                    const int64_t toff = (ct / MSATTN_TILE) * d.D * MSATTN_TILE;
                    const int32_t tlo = tmin[ct / MSATTN_TILE], thi = tmax[ct / MSATTN_TILE];
                    if (p->causal && thi < kp[r0]) continue; /* every query of the tile precedes */
                    ops->qk(s, kl + r0 * d.Dp, d.Dp, rows, qt + toff, MSATTN_TILE, (int)d.D);
                    for (int r = 0; r < rows; ++r) ops->exp2_sub(s + r * MSATTN_TILE, lse2 + ct, nc);
                    if (p->causal && tlo < kp[r0 + rows - 1])
                        for (int r = 0; r < rows; ++r)
                            for (int c = 0; c < nc; ++c)
                                if (qpos[ct + c] < kp[r0 + r]) s[r * MSATTN_TILE + c] = 0.0f;
                    ops->pv(dva + r0 * d.Dp, d.Dp, s, rows, nc, darow + ct * d.Dp, d.Dp, (int)d.Dp);
                    ops->qk(dp, vr + r0 * d.Dp, d.Dp, rows, dat + toff, MSATTN_TILE, (int)d.D);
                    for (int r = 0; r < rows; ++r)
                        ops->mul_sub_vec(s + r * MSATTN_TILE, dp + r * MSATTN_TILE, delta + ct, nc);
                    ops->pv(dka + r0 * d.Dp, d.Dp, s, rows, nc, qrow + ct * d.Dp, d.Dp, (int)d.Dp);
                }
            }
        }
        for (int64_t r = 0; r < nk; ++r) {
            ops->scale(dka + r * d.Dp, (int)d.D, (float)p->scale);
            if (p->rope.cos) ms_rope_rotate(dka + r * d.Dp, &p->rope, kp[r], -1.0f); /* rotated back */
        }

        /* the memory write */
        if (write_grad && nk > 0) {
            const int64_t moff = inf_mem_off(p, b, h);
            if (p->dmem_out) {
                inf_load_memory(&d, (const float *)p->dmem_out + moff * d.D, NULL, dmrow, dmt, NULL);
            } else {
                memset(dmrow, 0, (size_t)(d.D * d.Dp) * sizeof(float));
                memset(dmt, 0, (size_t)(d.D * d.Dp) * sizeof(float));
            }
            if (p->dnorm_out) memcpy(dz, (const float *)p->dnorm_out + moff, (size_t)d.D * sizeof(float));
            else memset(dz, 0, (size_t)d.D * sizeof(float));
            for (int64_t r = 0; r < nk; ++r) {
                float *a = arow + r * d.Dp;
                memcpy(a, kr + r * d.Dp, (size_t)d.Dp * sizeof(float));
                inf_sigma(ops, a, dsig + r * d.Dp, d.D);
            }
            /* du = dM'^T a, the gradient of each key's written value */
            memset(durow, 0, (size_t)(nk * d.Dp) * sizeof(float));
            inf_xm(ops, durow, d.Dp, arow, d.Dp, nk, d.D, dmrow, d.Dp, (int)d.Dp, tile);
            for (int64_t i = 0; i < nk * d.Dp; ++i) dva[i] += durow[i];
            /* da = dM' u + dz' with u = v (linear) or v - r (delta) */
            memcpy(ubuf, vr, (size_t)(nk * d.Dp) * sizeof(float));
            if (p->delta_rule) {
                inf_load_memory(&d, (const float *)p->mem + moff * d.D, (const float *)p->norm + moff, mrow, mt, z);
                for (int64_t r0 = 0; r0 < nk; r0 += MSATTN_TILE) {
                    const int n = (int)msattn_min64(MSATTN_TILE, nk - r0);
                    inf_delta_retrieve(ops, p, &d, rrow + r0 * d.Dp, arow + r0 * d.Dp, n, mrow, z, cden + r0, tile);
                }
                for (int64_t i = 0; i < nk * d.Dp; ++i) ubuf[i] -= rrow[i];
            }
            memset(dsk, 0, (size_t)(nk * d.Dp) * sizeof(float));
            inf_xm(ops, dsk, d.Dp, ubuf, d.Dp, nk, d.D, dmt, d.Dp, (int)d.Dp, tile);
            if (p->delta_rule) { /* - (M du) / c + z (du . r) / c */
                memset(ubuf, 0, (size_t)(nk * d.Dp) * sizeof(float));
                inf_xm(ops, ubuf, d.Dp, durow, d.Dp, nk, d.D, mt, d.Dp, (int)d.Dp, tile);
                for (int64_t r = 0; r < nk; ++r) {
                    const float dc = ops->dot(durow + r * d.Dp, rrow + r * d.Dp, (int)d.D) / cden[r];
                    float *x = dsk + r * d.Dp;
                    const float *mdu = ubuf + r * d.Dp;
                    for (int64_t i = 0; i < d.D; ++i) x[i] += z[i] * dc - mdu[i] / cden[r];
                }
            }
            for (int64_t r = 0; r < nk; ++r) {
                float *gk = dka + r * d.Dp;
                const float *x = dsk + r * d.Dp, *ds1 = dsig + r * d.Dp;
                for (int64_t i = 0; i < d.D; ++i) gk[i] += (x[i] + dz[i]) * ds1[i];
            }
        }

        int64_t r = 0;
        memset(tmp, 0, (size_t)d.Dp * sizeof(float));
        for (int64_t t = t0; t < t1; ++t) {
            const int own = r < nk && kp[r] == t;
            ms_store_row(&p->dk, ops, p->dtype, b, h, t, own ? dka + r * d.Dp : tmp, (int)d.D);
            ms_store_row(&p->dv, ops, p->dtype, b, h, t, own ? dva + r * d.Dp : tmp, (int)d.D);
            r += own;
        }
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// backward pass 3: dM, dz, dbeta, item (b, h)

static size_t inf_bwd_dmem_bytes(const inf_dims *d) {
    return (size_t)(3 * d->D * d->Dp + 2 * d->Dp) * 4 + (size_t)(6 * MSATTN_TILE * d->Dp) * 4 +
           (size_t)(d->D * MSATTN_TILE + MSATTN_ROWS * MSATTN_TILE + 3 * MSATTN_TILE) * 4 + 20 * 64;
}

size_t msattn_infini_bwd_scratch_bytes(const msattn_infini_params *p) {
    const inf_dims d = inf_dims_of(p);
    size_t a = inf_bwd_dq_bytes(&d), b = inf_bwd_dkv_bytes(&d), c = inf_bwd_dmem_bytes(&d);
    a = a > b ? a : b;
    return a > c ? a : c;
}

int msattn_infini_bwd_dmem_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE;
    const msattn_simd_ops *ops = msattn_simd();
    const inf_dims d = inf_dims_of(p);
    char *cur = (char *)scratch;
    float *mrow = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4);
    float *dmrow = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4); /* dM' */
    float *dmacc = (float *)ms_carve(&cur, (size_t)(d.D * d.Dp), 4); /* dM */
    float *z = (float *)ms_carve(&cur, (size_t)d.Dp, 4);
    float *dzacc = (float *)ms_carve(&cur, (size_t)d.Dp, 4);
    float *xrow = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4); /* sigma(q) or sigma(k) */
    float *yrow = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4); /* dO */
    float *alb = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4); /* A_loc */
    float *num = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4); /* A_mem / r */
    float *gy = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4);  /* dnum / dn */
    float *du = (float *)ms_carve(&cur, (size_t)(MSATTN_TILE * d.Dp), 4);
    float *xt = (float *)ms_carve(&cur, (size_t)(d.D * MSATTN_TILE), 4);
    float *tile = (float *)ms_carve(&cur, MSATTN_ROWS * MSATTN_TILE, 4);
    float *den = (float *)ms_carve(&cur, MSATTN_TILE, 4);
    float *dden = (float *)ms_carve(&cur, MSATTN_TILE, 4);

    for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p->Hkv, h = bh % p->Hkv, moff = inf_mem_off(p, b, h);
        inf_load_memory(&d, (const float *)p->mem + moff * d.D, (const float *)p->norm + moff, mrow, NULL, z);
        if (p->dmem_out) inf_load_memory(&d, (const float *)p->dmem_out + moff * d.D, NULL, dmrow, NULL, NULL);
        else memset(dmrow, 0, (size_t)(d.D * d.Dp) * sizeof(float));
        memcpy(dmacc, dmrow, (size_t)(d.D * d.Dp) * sizeof(float));
        memset(dzacc, 0, (size_t)d.Dp * sizeof(float));
        if (p->dnorm_out) memcpy(dzacc, (const float *)p->dnorm_out + moff, (size_t)d.D * sizeof(float));

        /* the retrieval of every query head of the group */
        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
            const double g = inf_gate(p->beta[hq]);
            const float gm = (float)g;
            double dbeta = 0.0;
            for (int64_t i0 = 0; i0 < d.Nq; i0 += MSATTN_TILE) {
                const int n = (int)msattn_min64(MSATTN_TILE, d.Nq - i0);
                for (int r = 0; r < n; ++r) {
                    inf_load_row(xrow + r * d.Dp, ops, &p->q, p->dtype, b, hq, i0 + r, &d, 1.0f);
                    inf_sigma(ops, xrow + r * d.Dp, NULL, d.D);
                    inf_load_row(yrow + r * d.Dp, ops, &p->dout, p->dtype, b, hq, i0 + r, &d, 1.0f);
                    inf_load_row(alb + r * d.Dp, ops, &p->out_local, p->dtype, b, hq, i0 + r, &d, 1.0f);
                }
                inf_retrieve(ops, p, &d, num, xrow, n, mrow, z, den, tile);
                for (int r = 0; r < n; ++r) {
                    const float *go = yrow + r * d.Dp, *a = num + r * d.Dp;
                    const float da = ops->dot(go, a, (int)d.D);
                    dbeta += (double)da - (double)ops->dot(go, alb + r * d.Dp, (int)d.D);
                    dden[r] = -gm * da / den[r];
                    for (int64_t i = 0; i < d.Dp; ++i) gy[r * d.Dp + i] = gm * go[i] / den[r];
                }
                inf_transpose(&d, xt, xrow, n);
                inf_outer(ops, &d, dmacc, xt, gy, n);
                for (int64_t i = 0; i < d.D; ++i) dzacc[i] += ops->dot(xt + i * MSATTN_TILE, dden, n);
            }
            p->dbeta[b * p->Hq + hq] = g * (1.0 - g) * dbeta;
        }

        /* the delta rule reads M and z: dM += -a du^T / c, dz += a (du . r) / c */
        if (p->update_memory && p->delta_rule && p->dmem_out) {
            for (int64_t t = 0;;) {
                const int n = inf_next_keys(p, ops, &d, b, h, &t, xrow, NULL);
                if (n == 0) break;
                inf_delta_retrieve(ops, p, &d, num, xrow, n, mrow, z, den, tile);
                memset(du, 0, (size_t)(n * d.Dp) * sizeof(float));
                inf_xm(ops, du, d.Dp, xrow, d.Dp, n, d.D, dmrow, d.Dp, (int)d.Dp, tile);
                for (int r = 0; r < n; ++r) {
                    dden[r] = ops->dot(du + r * d.Dp, num + r * d.Dp, (int)d.D) / den[r];
                    for (int64_t i = 0; i < d.Dp; ++i) gy[r * d.Dp + i] = -du[r * d.Dp + i] / den[r];
                }
                inf_transpose(&d, xt, xrow, n);
                inf_outer(ops, &d, dmacc, xt, gy, n);
                for (int64_t i = 0; i < d.D; ++i) dzacc[i] += ops->dot(xt + i * MSATTN_TILE, dden, n);
            }
        }
        float *dm = (float *)p->dmem + moff * d.D;
        for (int64_t i = 0; i < d.D; ++i) memcpy(dm + i * d.D, dmacc + i * d.Dp, (size_t)d.D * sizeof(float));
        memcpy((float *)p->dnorm + moff, dzacc, (size_t)d.D * sizeof(float));
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// naive twins, in double

/* q, k as given; ql, kl as the local attention scores them (rotated with rope tables) */
typedef struct {
    double *q, *k, *ql, *kl, *v, *sq, *num, *o, *go, *gl, *sc, *pr, *dpr, *m, *z, *dm, *dz, *dk, *dv, *dq, *tmp;
} inf_ref_buf;

static void inf_ref_free(inf_ref_buf *r) {
    double **f[] = {&r->q, &r->k, &r->ql, &r->kl, &r->v, &r->sq, &r->num, &r->o, &r->go, &r->gl, &r->sc,
                    &r->pr, &r->dpr, &r->m, &r->z, &r->dm, &r->dz, &r->dk, &r->dv, &r->dq, &r->tmp};
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); ++i) { free(*f[i]); *f[i] = NULL; }
}

static int inf_ref_alloc(inf_ref_buf *r, int64_t N, int64_t D) {
    memset(r, 0, sizeof(*r));
    const size_t nd = (size_t)(N > 0 ? N : 1) * (size_t)D, dd = (size_t)D * (size_t)D, n1 = (size_t)(N > 0 ? N : 1);
    r->q = malloc(D * 8); r->k = malloc(nd * 8); r->v = malloc(nd * 8); r->sq = malloc(D * 8);
    r->ql = malloc(D * 8); r->kl = malloc(nd * 8);
    r->num = malloc(D * 8); r->o = malloc(D * 8); r->go = malloc(D * 8); r->gl = malloc(D * 8);
    r->sc = malloc(n1 * 8); r->pr = malloc(n1 * 8); r->dpr = malloc(n1 * 8);
    r->m = malloc(dd * 8); r->z = malloc(D * 8); r->dm = malloc(dd * 8); r->dz = malloc(D * 8);
    r->dk = malloc(nd * 8); r->dv = malloc(nd * 8); r->dq = malloc(D * 8); r->tmp = malloc(D * 8);
    if (!r->q || !r->k || !r->ql || !r->kl || !r->v || !r->sq || !r->num || !r->o || !r->go || !r->gl ||
        !r->sc || !r->pr || !r->dpr || !r->m || !r->z || !r->dm || !r->dz || !r->dk || !r->dv || !r->dq || !r->tmp) {
        inf_ref_free(r);
        return MSATTN_ERR_NOMEM;
    }
    return MSATTN_OK;
}

static msattn_dtype inf_mem_dtype(const msattn_infini_params *p) {
    return p->dtype == MSATTN_F64 ? MSATTN_F64 : MSATTN_F32;
}

static void inf_ref_row(double *x, const msattn_infini_params *p, const msattn_view *v, int64_t b, int64_t h,
                        int64_t t, int64_t D) {
    for (int64_t i = 0; i < D; ++i)
        x[i] = msattn_load_f64(v->data, b * v->sb + h * v->sh + t * v->sn + i * v->sd, p->dtype);
}

static void inf_ref_store(const msattn_view *v, msattn_dtype dt, int64_t b, int64_t h, int64_t t, const double *x,
                          int64_t D) {
    for (int64_t i = 0; i < D; ++i) msattn_store_f64(v->data, b * v->sb + h * v->sh + t * v->sn + i * v->sd, dt, x[i]);
}

static inline double inf_ref_sigma(double x) { return x > 0.0 ? x + 1.0 : exp(x); }
static inline double inf_ref_dsigma(double x) { return x > 0.0 ? 1.0 : exp(x); }

/* the keys and values of (b, h) in double, keys as sigma(k) in a copy when wanted */
static void inf_ref_load_kv(const msattn_infini_params *p, inf_ref_buf *r, int64_t b, int64_t h) {
    for (int64_t t = 0; t < p->N; ++t) {
        inf_ref_row(r->k + t * p->D, p, &p->k, b, h, t, p->D);
        inf_ref_row(r->v + t * p->D, p, &p->v, b, h, t, p->D);
        memcpy(r->kl + t * p->D, r->k + t * p->D, (size_t)p->D * 8);
        if (p->rope.cos) ms_rope_rotate_f64(r->kl + t * p->D, &p->rope, t, 1.0);
    }
}

/* query i of head hq into q, and as the local attention scores it into ql */
static void inf_ref_load_q(const msattn_infini_params *p, inf_ref_buf *r, int64_t b, int64_t hq, int64_t i) {
    inf_ref_row(r->q, p, &p->q, b, hq, i, p->D);
    memcpy(r->ql, r->q, (size_t)p->D * 8);
    if (p->rope.cos) ms_rope_rotate_f64(r->ql, &p->rope, p->N - p->Nq + i, 1.0);
}

/* local attention of query i (ql, kl): probabilities into pr (0 for invisible keys), out into o;
 * returns the log-sum-exp (-inf without keys) */
static double inf_ref_local(const msattn_infini_params *p, inf_ref_buf *r, int64_t b, int64_t i) {
    const int64_t D = p->D, pos = p->N - p->Nq + i;
    double mx = -INFINITY, sum = 0.0;
    for (int64_t t = 0; t < p->N; ++t) {
        r->sc[t] = -INFINITY;
        if (!ms_valid(p->key_mask, p->mask_sb, b, t) || (p->causal && t > pos)) continue;
        double s = 0.0;
        for (int64_t x = 0; x < D; ++x) s += r->ql[x] * r->kl[t * D + x];
        r->sc[t] = s * p->scale;
        mx = r->sc[t] > mx ? r->sc[t] : mx;
    }
    for (int64_t x = 0; x < D; ++x) r->o[x] = 0.0;
    if (mx == -INFINITY) {
        for (int64_t t = 0; t < p->N; ++t) r->pr[t] = 0.0;
        return -INFINITY;
    }
    for (int64_t t = 0; t < p->N; ++t) {
        r->pr[t] = r->sc[t] == -INFINITY ? 0.0 : exp(r->sc[t] - mx);
        sum += r->pr[t];
    }
    for (int64_t t = 0; t < p->N; ++t) {
        r->pr[t] /= sum;
        for (int64_t x = 0; x < D; ++x) r->o[x] += r->pr[t] * r->v[t * D + x];
    }
    return mx + log(sum);
}

/* sq = sigma(q), num = sq M / den; returns den */
static double inf_ref_retrieve(const msattn_infini_params *p, inf_ref_buf *r, const double *x) {
    const int64_t D = p->D;
    double den = p->eps;
    for (int64_t i = 0; i < D; ++i) { r->sq[i] = inf_ref_sigma(x[i]); den += r->sq[i] * r->z[i]; }
    for (int64_t j = 0; j < D; ++j) {
        double s = 0.0;
        for (int64_t i = 0; i < D; ++i) s += r->sq[i] * r->m[i * D + j];
        r->num[j] = s / den;
    }
    return den;
}

static void inf_ref_load_memory(const msattn_infini_params *p, inf_ref_buf *r, int64_t off) {
    const msattn_dtype mdt = inf_mem_dtype(p);
    for (int64_t i = 0; i < p->D * p->D; ++i) r->m[i] = msattn_load_f64(p->mem, off * p->D + i, mdt);
    for (int64_t i = 0; i < p->D; ++i) r->z[i] = msattn_load_f64(p->norm, off + i, mdt);
}

int msattn_infini_fwd_ref_cpu(const msattn_infini_params *p, int64_t begin, int64_t end) {
    const int64_t D = p->D, hg = p->Hq / p->Hkv;
    const msattn_dtype mdt = inf_mem_dtype(p);
    inf_ref_buf r;
    if (inf_ref_alloc(&r, p->N, D) != MSATTN_OK) return MSATTN_ERR_NOMEM;
    for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p->Hkv, h = bh % p->Hkv, off = inf_mem_off(p, b, h);
        inf_ref_load_kv(p, &r, b, h);
        inf_ref_load_memory(p, &r, off);
        for (int64_t hq = h * hg; hq < (h + 1) * hg; ++hq) {
            const double g = inf_gate(p->beta[hq]);
            for (int64_t i = 0; i < p->Nq; ++i) {
                const int64_t row = (b * p->Hq + hq) * p->Nq + i;
                inf_ref_load_q(p, &r, b, hq, i);
                const double lse = inf_ref_local(p, &r, b, i);
                if (p->dtype == MSATTN_F64) ((double *)p->lse)[row] = lse;
                else ((float *)p->lse)[row] = (float)lse;
                inf_ref_store(&p->out_local, p->dtype, b, hq, i, r.o, D);
                inf_ref_retrieve(p, &r, r.q);
                for (int64_t x = 0; x < D; ++x) r.tmp[x] = g * r.num[x] + (1.0 - g) * r.o[x];
                inf_ref_store(&p->out, p->dtype, b, hq, i, r.tmp, D);
            }
        }
        /* M' and z' (dm, dz as accumulators); the delta rule reads the old m, z */
        memcpy(r.dm, r.m, (size_t)(D * D) * 8);
        memcpy(r.dz, r.z, (size_t)D * 8);
        for (int64_t t = 0; p->update_memory && t < p->N; ++t) {
            if (!ms_valid(p->key_mask, p->mask_sb, b, t)) continue;
            inf_ref_retrieve(p, &r, r.k + t * D); /* sq = sigma(k_t), num = its retrieval */
            for (int64_t i = 0; i < D; ++i) {
                r.dz[i] += r.sq[i];
                for (int64_t j = 0; j < D; ++j)
                    r.dm[i * D + j] += r.sq[i] * (r.v[t * D + j] - (p->delta_rule ? r.num[j] : 0.0));
            }
        }
        for (int64_t i = 0; i < D * D; ++i) msattn_store_f64(p->mem_out, off * D + i, mdt, r.dm[i]);
        for (int64_t i = 0; i < D; ++i) msattn_store_f64(p->norm_out, off + i, mdt, r.dz[i]);
    }
    inf_ref_free(&r);
    return MSATTN_OK;
}

int msattn_infini_bwd_ref_cpu(const msattn_infini_params *p, int64_t begin, int64_t end) {
    const int64_t D = p->D, N = p->N, hg = p->Hq / p->Hkv;
    const msattn_dtype mdt = inf_mem_dtype(p);
    inf_ref_buf r;
    if (inf_ref_alloc(&r, N, D) != MSATTN_OK) return MSATTN_ERR_NOMEM;
    for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p->Hkv, h = bh % p->Hkv, off = inf_mem_off(p, b, h);
        inf_ref_load_kv(p, &r, b, h);
        inf_ref_load_memory(p, &r, off);
        for (int64_t i = 0; i < D * D; ++i)
            r.dm[i] = p->dmem_out ? msattn_load_f64(p->dmem_out, off * D + i, mdt) : 0.0;
        for (int64_t i = 0; i < D; ++i) r.dz[i] = p->dnorm_out ? msattn_load_f64(p->dnorm_out, off + i, mdt) : 0.0;
        memset(r.dk, 0, (size_t)(N * D) * 8);
        memset(r.dv, 0, (size_t)(N * D) * 8);
        const int64_t dmo = off * D; /* dM' is read again below for the memory write */

        for (int64_t hq = h * hg; hq < (h + 1) * hg; ++hq) {
            const double g = inf_gate(p->beta[hq]);
            double dbeta = 0.0;
            for (int64_t i = 0; i < p->Nq; ++i) {
                const int64_t row = (b * p->Hq + hq) * p->Nq + i;
                inf_ref_load_q(p, &r, b, hq, i);
                inf_ref_row(r.go, p, &p->dout, b, hq, i, D);
                for (int64_t x = 0; x < D; ++x) r.gl[x] = (1.0 - g) * r.go[x];
                if (p->dout_local.data) {
                    inf_ref_row(r.tmp, p, &p->dout_local, b, hq, i, D);
                    for (int64_t x = 0; x < D; ++x) r.gl[x] += r.tmp[x];
                }
                inf_ref_local(p, &r, b, i);
                /* local attention */
                double delta = 0.0;
                for (int64_t t = 0; t < N; ++t) {
                    double s = 0.0;
                    for (int64_t x = 0; x < D; ++x) s += r.gl[x] * r.v[t * D + x];
                    r.dpr[t] = s;
                    delta += r.pr[t] * s;
                }
                if (p->dlse)
                    delta -= p->dtype == MSATTN_F64 ? ((const double *)p->dlse)[row]
                                                    : (double)((const float *)p->dlse)[row];
                for (int64_t x = 0; x < D; ++x) r.dq[x] = 0.0;
                for (int64_t t = 0; t < N; ++t) {
                    if (r.pr[t] == 0.0) continue;
                    const double ds = r.pr[t] * (r.dpr[t] - delta) * p->scale;
                    for (int64_t x = 0; x < D; ++x) {
                        r.dq[x] += ds * r.kl[t * D + x];
                        r.dk[t * D + x] += ds * r.ql[x];
                        r.dv[t * D + x] += r.pr[t] * r.gl[x];
                    }
                }
                if (p->rope.cos) ms_rope_rotate_f64(r.dq, &p->rope, N - p->Nq + i, -1.0);
                /* retrieval */
                const double den = inf_ref_retrieve(p, &r, r.q);
                double da = 0.0;
                for (int64_t x = 0; x < D; ++x) {
                    da += r.go[x] * r.num[x];
                    dbeta += r.go[x] * (r.num[x] - r.o[x]);
                }
                const double dden = -g * da / den;
                for (int64_t x = 0; x < D; ++x) {
                    double s = r.z[x] * dden;
                    for (int64_t j = 0; j < D; ++j) s += r.m[x * D + j] * g * r.go[j] / den;
                    r.dq[x] += s * inf_ref_dsigma(r.q[x]);
                    r.dz[x] += r.sq[x] * dden;
                    for (int64_t j = 0; j < D; ++j) r.dm[x * D + j] += r.sq[x] * g * r.go[j] / den;
                }
                inf_ref_store(&p->dq, p->dtype, b, hq, i, r.dq, D);
            }
            p->dbeta[b * p->Hq + hq] = g * (1.0 - g) * dbeta;
        }

        for (int64_t t = 0; p->rope.cos && t < N; ++t) ms_rope_rotate_f64(r.dk + t * D, &p->rope, t, -1.0);
        /* the memory write, from dM' and dz' */
        for (int64_t t = 0; p->update_memory && t < N; ++t) {
            if (!ms_valid(p->key_mask, p->mask_sb, b, t)) continue;
            const double *k = r.k + t * D, *v = r.v + t * D;
            const double c = inf_ref_retrieve(p, &r, k); /* sq = a, num = r */
            double *du = r.go, *da = r.gl;
            for (int64_t j = 0; j < D; ++j) {
                double s = 0.0;
                for (int64_t i = 0; i < D; ++i)
                    s += r.sq[i] * (p->dmem_out ? msattn_load_f64(p->dmem_out, dmo + i * D + j, mdt) : 0.0);
                du[j] = s;
                r.dv[t * D + j] += s;
            }
            double dur = 0.0;
            for (int64_t j = 0; j < D; ++j) dur += du[j] * r.num[j];
            for (int64_t i = 0; i < D; ++i) {
                double s = p->dnorm_out ? msattn_load_f64(p->dnorm_out, off + i, mdt) : 0.0;
                for (int64_t j = 0; j < D; ++j) {
                    const double dmp = p->dmem_out ? msattn_load_f64(p->dmem_out, dmo + i * D + j, mdt) : 0.0;
                    s += dmp * (v[j] - (p->delta_rule ? r.num[j] : 0.0));
                    if (p->delta_rule) s -= r.m[i * D + j] * du[j] / c;
                }
                if (p->delta_rule) {
                    s += r.z[i] * dur / c;
                    r.dz[i] += r.sq[i] * dur / c;
                    for (int64_t j = 0; j < D; ++j) r.dm[i * D + j] -= r.sq[i] * du[j] / c;
                }
                da[i] = s;
            }
            for (int64_t i = 0; i < D; ++i) r.dk[t * D + i] += da[i] * inf_ref_dsigma(k[i]);
        }
        for (int64_t t = 0; t < N; ++t) {
            inf_ref_store(&p->dk, p->dtype, b, h, t, r.dk + t * D, D);
            inf_ref_store(&p->dv, p->dtype, b, h, t, r.dv + t * D, D);
        }
        for (int64_t i = 0; i < D * D; ++i) msattn_store_f64(p->dmem, off * D + i, mdt, r.dm[i]);
        for (int64_t i = 0; i < D; ++i) msattn_store_f64(p->dnorm, off + i, mdt, r.dz[i]);
    }
    inf_ref_free(&r);
    return MSATTN_OK;
}
