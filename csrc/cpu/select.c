/*
 * select.c -- MS attention selection on the CPU (DESIGN section 1, steps 1-5).
 *
 * For every (batch, KV head, query group) it writes the key regions the group attends to besides
 * its own tokens: int32 (B, Hkv, G, T), ascending, padded with -1.
 *
 *   msattn_region_means_cpu  pass 1: key-region sums (over valid keys, token by token in order;
 *                            skipped when a cache keeps them) and query-region means qbar (over
 *                            valid queries of the call), summed over the GQA group.
 *   msattn_region_sums_append_cpu  adds new tokens to a cache's region sums, exactly as pass 1 would.
 *   msattn_select_cpu        pass 2: per group, candidates; if more than T, each query region ranks
 *                            them by qbar_a . kbar_j (descending, ties to the lower j), keeps its top
 *                            T, and the lists are interleaved rank by rank without duplicates,
 *                            after the `local` regions just before the group (msattn_local_regions).
 *                            Consecutive groups of one (b, h) form a tile whose query regions score
 *                            each block of candidates while its sums are in cache (ops->score_block
 *                            from the sums; when several query regions score a block, ops->
 *                            screen_block first rules out in float32 those that provably cannot
 *                            reach the heap, and only the rest get exact scores); each region keeps
 *                            its top T in a bounded heap (O(NK log T), no per-candidate records
 *                            written), offered only the candidates not below the full heap's last.
 *
 * Key-region sums are float32 (a cache keeps them at 1/(2*block_k) of a float32 KV cache), added in
 * position order; scores are computed from them in double, in an order fixed by ops->score_block, so
 * the ranking is the same on every instruction set and on the GPU.
 * Ranking keys map a double to an unsigned integer with the same order (NaN above +inf, as
 * torch.sort puts it), so ranking is a total order and never misbehaves on NaN input.
 *
 * Legend: B batch, Hq/Hkv heads, N keys, Nq queries (the last Nq positions), D head dim,
 * CQ/CK block_q/block_k, NK key regions, NA query regions of the call, G groups of the call, T topk.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../msattn_regions.h"
#include "simd.h"

// ----------------------------------------------------------------------------------------------
// ranking

typedef struct {
    uint64_t key; /* order-preserving image of the score */
    int32_t j;    /* key region */
} ms_rank;

static inline uint64_t ms_order_key(double s) {
    union { double d; uint64_t u; } x;
    x.d = s;
    return (x.u >> 63) ? ~x.u : (x.u | 0x8000000000000000ull);
}

/* the score whose image is key (ms_order_key's inverse) */
static inline double ms_key_score(uint64_t key) {
    union { double d; uint64_t u; } x;
    x.u = (key >> 63) ? (key & 0x7fffffffffffffffull) : ~key;
    return x.d;
}

/* a ranks before b: higher score first, then lower region */
static inline int ms_before(ms_rank a, ms_rank b) {
    return a.key > b.key || (a.key == b.key && a.j < b.j);
}

static void ms_sort_ranks(ms_rank *x, int64_t n) {
    /* insertion sort for short runs, else quicksort on the middle-of-three pivot (keys are all
     * distinct since regions are, so this terminates and partitions evenly in expectation) */
    while (n > 24) {
        ms_rank a = x[0], b = x[n / 2], c = x[n - 1];
        ms_rank pivot = ms_before(a, b) ? (ms_before(b, c) ? b : (ms_before(a, c) ? c : a))
                                        : (ms_before(a, c) ? a : (ms_before(b, c) ? c : b));
        int64_t i = 0, j = n - 1;
        for (;;) {
            while (ms_before(x[i], pivot)) ++i;
            while (ms_before(pivot, x[j])) --j;
            if (i >= j) break;
            ms_rank t = x[i]; x[i] = x[j]; x[j] = t;
            ++i; --j;
        }
        /* recurse into the smaller side, loop on the larger */
        if (j + 1 < n - j - 1) {
            ms_sort_ranks(x, j + 1);
            x += j + 1; n -= j + 1;
        } else {
            ms_sort_ranks(x + j + 1, n - j - 1);
            n = j + 1;
        }
    }
    for (int64_t i = 1; i < n; ++i) {
        ms_rank v = x[i];
        int64_t k = i - 1;
        while (k >= 0 && ms_before(v, x[k])) { x[k + 1] = x[k]; --k; }
        x[k + 1] = v;
    }
}

static int ms_cmp_int32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* a ranking group's selection: first the valid regions of `local` (msattn_local_regions), then nl
 * sorted lists of t regions each (list l at lists + l*t) interleaved rank by rank, skipping
 * duplicates, until t distinct regions are in out; then sort out ascending and pad with -1. A group
 * with no list (no valid query ranks) selects nothing. seen: NK bytes, all zero on entry and on return. */
static void ms_interleave(int32_t *out, const int32_t *lists, int nl, int t, msattn_range local,
                          const int32_t *kcount, uint8_t *seen) {
    int n = 0;
    for (int64_t j = local.begin; j < local.end && nl > 0; ++j)
        if (kcount[j] > 0) { seen[j] = 1; out[n++] = (int32_t)j; }
    for (int r = 0; r < t && n < t; ++r)
        for (int l = 0; l < nl && n < t; ++l) {
            int32_t j = lists[(int64_t)l * t + r];
            if (!seen[j]) { seen[j] = 1; out[n++] = j; }
        }
    for (int i = 0; i < n; ++i) seen[out[i]] = 0;
    qsort(out, (size_t)n, sizeof(int32_t), ms_cmp_int32);
    for (int i = n; i < t; ++i) out[i] = -1;
}

static inline int ms_key_valid(const msattn_select_params *p, int64_t b, int64_t t) {
    return p->key_mask == NULL || p->key_mask[b * p->mask_sb + t] != 0;
}

// ----------------------------------------------------------------------------------------------
// pass 1: region sums and query means

/* add the valid tokens [tb, te) of key head (b, h), all in region j, to that region's sum and count,
 * in position order; a region's first token resets it */
static void ms_add_tokens(msattn_region_sums s, const msattn_view *k, msattn_dtype dt, const uint8_t *mask,
                          int64_t mask_sb, int64_t mask_t0, int64_t D, int block_k, int64_t b, int64_t h,
                          int64_t k_t0, int64_t tb, int64_t te) {
    const int64_t j = tb / block_k;
    float *acc = s.sum + b * s.sum_sb + h * s.sum_sh + j * D;
    int32_t *count = s.count + b * s.count_sb + h * s.count_sh + j;
    if (tb % block_k == 0) {
        memset(acc, 0, (size_t)D * sizeof(float));
        *count = 0;
    }
    const msattn_simd_ops *ops = msattn_simd();
    const size_t esize = dt == MSATTN_F64 ? 8 : dt == MSATTN_F32 ? 4 : 2;
    float row[MSATTN_MAX_HEAD_DIM];
    for (int64_t t = tb; t < te; ++t) {
        if (mask != NULL && mask[b * mask_sb + (t - mask_t0)] == 0) continue;
        ++*count;
        const int64_t off = b * k->sb + h * k->sh + (t - k_t0) * k->sn;
        if (k->sd == 1) ops->to_f32(row, (const char *)k->data + off * (int64_t)esize, (int)D, dt, 1.0f);
        else
            for (int64_t d = 0; d < D; ++d) row[d] = msattn_load_f32(k->data, off + d * k->sd, dt);
        for (int64_t d = 0; d < D; ++d) acc[d] += row[d];
    }
}

int msattn_region_sums_append_cpu(msattn_region_sums s, msattn_view k, msattn_dtype dtype,
                                  const uint8_t *mask, int64_t mask_sb, int Hkv, int D, int block_k,
                                  int64_t t0, int64_t t1, int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        for (int64_t tb = t0; tb < t1;) {
            const int64_t te = msattn_min64((tb / block_k + 1) * block_k, t1);
            ms_add_tokens(s, &k, dtype, mask, mask_sb, t0, D, block_k, b, h, t0, tb, te);
            tb = te;
        }
    }
    return MSATTN_OK;
}

int msattn_region_means_cpu(const msattn_select_params *p, int64_t begin, int64_t end) {
    const int64_t N = p->N, Nq = p->Nq, D = p->D, hg = p->Hq / p->Hkv;
    const int64_t NK = msattn_num_key_regions(N, p->block_k);
    const int64_t NA = msattn_num_query_regions(N, Nq, p->block_q);
    const int64_t a0 = msattn_first_query_region(N, Nq, p->block_q);
    for (int64_t w = begin; w < end; ++w) {
        const int64_t r = w % (NK + NA), bh = w / (NK + NA), b = bh / p->Hkv, h = bh % p->Hkv;
        if (r < NK) { /* key region r of head h: its sum, unless a cache keeps it */
            if (!p->sums_given) {
                msattn_range tok = msattn_key_region(r, p->block_k, N);
                ms_add_tokens(p->ksum, &p->k, p->dtype, p->key_mask, p->mask_sb, 0, D, p->block_k, b, h, 0,
                              tok.begin, tok.end);
            }
            continue;
        }
        /* query region a0 + (r - NK): the mean of its valid queries, summed over KV head h's query heads */
        const int64_t a = r - NK;
        double *acc = p->qbar + (bh * NA + a) * D;
        int32_t count = 0;
        memset(acc, 0, (size_t)D * sizeof(double));
        msattn_range pos = msattn_query_region(a0 + a, p->block_q, N, Nq);
        for (int64_t t = pos.begin; t < pos.end; ++t) {
            if (!ms_key_valid(p, b, t)) continue;
            ++count;
            for (int64_t hq = h * hg; hq < (h + 1) * hg; ++hq) {
                const int64_t off = b * p->q.sb + hq * p->q.sh + (t - (N - Nq)) * p->q.sn;
                for (int64_t d = 0; d < D; ++d) acc[d] += msattn_load_f64(p->q.data, off + d * p->q.sd, p->dtype);
            }
        }
        p->qcount[bh * NA + a] = count;
        if (count > 0)
            for (int64_t d = 0; d < D; ++d) acc[d] /= count;
    }
    return MSATTN_OK;
}

// ----------------------------------------------------------------------------------------------
// pass 2: selection per group

/* The top T of a stream of candidates, one bounded heap per query region: heap[0] is the candidate
 * that ranks last among those kept, so a new one enters only when it ranks before heap[0]. The kept
 * set is the unique top T of the strict order (score desc, region asc) whatever the stream order. */
static void ms_heap_sift_down(ms_rank *heap, int64_t n, int64_t i) {
    const ms_rank v = heap[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && ms_before(heap[c], heap[c + 1])) ++c; /* the child that ranks later */
        if (!ms_before(v, heap[c])) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = v;
}

static inline void ms_heap_offer(ms_rank *heap, int64_t *n, int64_t t, ms_rank x) {
    if (*n < t) { /* filling: sift up */
        int64_t i = (*n)++;
        while (i > 0) {
            const int64_t parent = (i - 1) / 2;
            if (!ms_before(heap[parent], x)) break;
            heap[i] = heap[parent];
            i = parent;
        }
        heap[i] = x;
    } else if (ms_before(x, heap[0])) {
        heap[0] = x;
        ms_heap_sift_down(heap, t, 0);
    }
}

/* Pass 2 works on tiles: up to msattn_select_tile_groups(p) consecutive groups of one (b, h), whose
 * query regions (about MS_TILE_QUERIES of them) score each block of MS_SCORE_BLOCK candidates while
 * its key-region sums are in cache, so the sums stream from memory once per tile rather than once
 * per group. */
#define MS_SCORE_BLOCK 128
#define MS_TILE_QUERIES 64 /* 16 -> 64: a 1M passkey trial of the demo's model 38 -> 34.5 s (docs/notebook.md) */
#define MS_SCREEN_QUERIES 4 /* query regions from which a block is transposed once and screened */
#define MS_KT_LD (MS_SCORE_BLOCK + 16) /* its row stride (floats): not a multiple of 1 KB, so its rows do
                                        * not all fall into the same few L1 sets */

int64_t msattn_select_tile_groups(const msattn_select_params *p) {
    return p->merge >= MS_TILE_QUERIES ? 1 : MS_TILE_QUERIES / p->merge;
}

/* scratch layout (8-byte items first): scores, exact scores of a screened block (2 * MS_SCORE_BLOCK
 * double) | heaps (Q * T ranks) | heap sizes (Q int64) | query-region means (Q pointers) | the block
 * transposed (D * MS_KT_LD float) | its 1 / count and norm / count (2 * MS_SCORE_BLOCK float) | the
 * means in float (Q * D) and their bounds (Q float) | per query region its tile group (Q int32) | per
 * tile group its first and last query region and whether it ranks (3 * tile int32) | lists (merge *
 * T int32) | two lists of a block's candidates (2 * (MS_SCORE_BLOCK + 16) int32) and their region
 * ids (MS_SCORE_BLOCK int32) | candidates (NK int32) | seen (NK bytes); Q = tile * merge. T beyond NK
 * is never needed (a group with at most T candidates takes them all). */
size_t msattn_select_scratch_bytes(const msattn_select_params *p) {
    const int64_t NK = msattn_num_key_regions(p->N, p->block_k);
    const int64_t T = msattn_min64(p->topk, NK), M = p->merge, tile = msattn_select_tile_groups(p), Q = tile * M;
    return (size_t)2 * MS_SCORE_BLOCK * sizeof(double) + (size_t)Q * T * sizeof(ms_rank) +
           (size_t)Q * (sizeof(int64_t) + sizeof(double *)) +
           ((size_t)p->D * MS_KT_LD + 2 * MS_SCORE_BLOCK + (size_t)Q * (p->D + 1)) * sizeof(float) +
           (size_t)Q * sizeof(int32_t) + (size_t)3 * tile * sizeof(int32_t) +
           (size_t)(M * T + 3 * MS_SCORE_BLOCK + 32) * sizeof(int32_t) + (size_t)NK * (sizeof(int32_t) + 1) + 64;
}

int msattn_select_cpu(const msattn_select_params *p, int64_t begin, int64_t end, void *scratch) {
    const msattn_simd_ops *ops = msattn_simd();
    const int64_t N = p->N, Nq = p->Nq, D = p->D, T = p->topk, M = p->merge;
    const int64_t span = msattn_span(p->block_q, p->merge);
    const int64_t NK = msattn_num_key_regions(N, p->block_k);
    const int64_t NA = msattn_num_query_regions(N, Nq, p->block_q);
    const int64_t a0 = msattn_first_query_region(N, Nq, p->block_q);
    const int64_t g0 = msattn_first_group(N, Nq, span), G = msattn_num_groups(N, Nq, span);
    const int64_t TH = msattn_min64(T, NK), tile = msattn_select_tile_groups(p), Q = tile * M;
    double *scores = (double *)scratch, *exact = scores + MS_SCORE_BLOCK;
    ms_rank *heaps = (ms_rank *)(exact + MS_SCORE_BLOCK);
    int64_t *fill = (int64_t *)(heaps + Q * TH);
    const double **qbs = (const double **)(fill + Q);
    float *kt = (float *)(qbs + Q), *kinv = kt + D * MS_KT_LD, *kscale = kinv + MS_SCORE_BLOCK;
    float *qfs = kscale + MS_SCORE_BLOCK, *qbound = qfs + Q * D;
    int32_t *qtile = (int32_t *)(qbound + Q);
    int32_t *first = qtile + Q, *last = first + tile, *ranks = last + tile;
    int32_t *lists = ranks + tile;
    int32_t *keep = lists + M * TH, *keep2 = keep + MS_SCORE_BLOCK + 16, *sub = keep2 + MS_SCORE_BLOCK + 16;
    int32_t *cand = sub + MS_SCORE_BLOCK;
    uint8_t *seen = (uint8_t *)(cand + NK);
    memset(seen, 0, (size_t)NK);

    for (int64_t w = begin; w < end;) {
        const int64_t bh = w / G, gi0 = w % G, b = bh / p->Hkv, h = bh % p->Hkv;
        const int64_t nt = msattn_min64(msattn_min64(tile, G - gi0), end - w);
        const int32_t *kcount = p->ksum.count + b * p->ksum.count_sb + h * p->ksum.count_sh;
        const float *ksum = p->ksum.sum + b * p->ksum.sum_sb + h * p->ksum.sum_sh;
        /* each group: at most T candidates -> all of them (dense); else register its ranking query
         * regions (one without a valid query ranks nothing) */
        int64_t nq = 0;
        int any = 0;
        for (int64_t t = 0; t < nt; ++t) {
            const int64_t ga = g0 + gi0 + t;
            int32_t *out = p->index + (w + t) * T;
            int64_t nc = 0;
            for (int64_t j = 0; j < NK && nc <= T; ++j)
                if (kcount[j] > 0 && msattn_is_candidate(j, ga, span, p->block_k, N, p->causal)) cand[nc++] = (int32_t)j;
            ranks[t] = nc > T;
            first[t] = last[t] = (int32_t)nq;
            if (!ranks[t]) {
                memcpy(out, cand, (size_t)nc * sizeof(int32_t));
                for (int64_t i = nc; i < T; ++i) out[i] = -1;
                continue;
            }
            any = 1;
            const int64_t abeg = msattn_max64(ga * M, a0), aend = msattn_min64((ga + 1) * M, a0 + NA);
            for (int64_t a = abeg; a < aend; ++a)
                if (p->qcount[bh * NA + (a - a0)] != 0) {
                    qbs[nq] = p->qbar + (bh * NA + (a - a0)) * D;
                    qtile[nq] = (int32_t)t;
                    fill[nq++] = 0;
                }
            last[t] = (int32_t)nq;
        }
        if (any) {
            /* the candidates of any ranking group, ascending (causal: the last group's, which hold
             * every earlier group's): each query region offers only its own group's, in ascending
             * order, to its bounded heap */
            int64_t nc = 0, tlast = nt - 1;
            while (!ranks[tlast]) --tlast;
            for (int64_t j = 0; j < NK; ++j) {
                if (kcount[j] <= 0) continue;
                if (p->causal) {
                    if (msattn_is_candidate(j, g0 + gi0 + tlast, span, p->block_k, N, 1)) cand[nc++] = (int32_t)j;
                    continue;
                }
                for (int64_t t = 0; t < nt; ++t)
                    if (ranks[t] && msattn_is_candidate(j, g0 + gi0 + t, span, p->block_k, N, 0)) {
                        cand[nc++] = (int32_t)j;
                        break;
                    }
            }
            /* several query regions score each block: transpose it once, screen each region's
             * candidates in float (simd_kernels.h) and score exactly only those that may reach its
             * heap; the means in float and their bounds 4 (D + 5) 2^-24 |q|, rounded up */
            const int screen = nq >= MS_SCREEN_QUERIES;
            if (screen)
                for (int64_t i = 0; i < nq; ++i) {
                    double sq = 0.0;
                    for (int64_t d = 0; d < D; ++d) {
                        qfs[i * D + d] = (float)qbs[i][d];
                        sq += qbs[i][d] * qbs[i][d];
                    }
                    qbound[i] = msattn_float_up(4.0 * (double)(D + 5) * 0x1p-24 * sqrt(sq) * (1.0 + 0x1p-20));
                }
            for (int64_t c0 = 0; c0 < nc; c0 += MS_SCORE_BLOCK) {
                const int64_t cn = msattn_min64(MS_SCORE_BLOCK, nc - c0);
                if (screen) ops->screen_prep(kt, MS_KT_LD, kinv, kscale, ksum, cand + c0, kcount, (int)cn, (int)D);
                for (int64_t i = 0; i < nq; ++i) {
                    const int64_t ga = g0 + gi0 + qtile[i];
                    ms_rank *heap = heaps + i * TH;
                    /* a full heap's last kept score: a candidate strictly below it ranks after it
                     * (NaN compares false and takes the exact path); only the others are offered */
                    double worst = fill[i] == T ? ms_key_score(heap[0].key) : -INFINITY;
                    int nk;
                    if (screen && fill[i] == T) { /* a heap not yet full takes every candidate: nothing to screen */
                        const int m = ops->screen_block(keep, qfs + i * D, qbound[i], kt, MS_KT_LD, kinv, kscale, (int)cn,
                                                        (int)D, worst);
                        for (int k = 0; k < m; ++k) sub[k] = cand[c0 + keep[k]];
                        nk = ops->score_block(exact, keep2, qbs[i], ksum, sub, kcount, m, (int)D, worst);
                        for (int k = 0; k < nk; ++k) { /* keep2 ascends and keep2[k] >= k: compact in place */
                            keep[k] = keep[keep2[k]];
                            scores[keep[k]] = exact[keep2[k]];
                        }
                    } else {
                        nk = ops->score_block(scores, keep, qbs[i], ksum, cand + c0, kcount, (int)cn, (int)D, worst);
                    }
                    for (int k = 0; k < nk; ++k) {
                        const int64_t c = keep[k];
                        if (fill[i] == T && scores[c] < worst) continue;
                        const int32_t j = cand[c0 + c];
                        if (!msattn_is_candidate(j, ga, span, p->block_k, N, p->causal)) continue;
                        const ms_rank x = {ms_order_key(scores[c]), j};
                        ms_heap_offer(heap, &fill[i], T, x);
                        if (fill[i] == T) worst = ms_key_score(heap[0].key);
                    }
                }
            }
            for (int64_t t = 0; t < nt; ++t) {
                if (!ranks[t]) continue;
                const int nl = last[t] - first[t];
                for (int l = 0; l < nl; ++l) {
                    ms_rank *heap = heaps + (int64_t)(first[t] + l) * TH;
                    ms_sort_ranks(heap, T);
                    for (int64_t r = 0; r < T; ++r) lists[(int64_t)l * T + r] = heap[r].j;
                }
                ms_interleave(p->index + (w + t) * T, lists, nl, (int)T,
                              msattn_local_regions(g0 + gi0 + t, span, p->block_k, p->local), kcount, seen);
            }
        }
        w += nt;
    }
    return MSATTN_OK;
}
