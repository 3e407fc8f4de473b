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
#include "common.h"
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

#define MS_SORT_SHORT 24 /* runs sorted by insertion */

/* Hoare partition of x[0..n), n > MS_SORT_SHORT, on the middle of three: returns j with x[0..j] ranking
 * before or as the pivot and x[j+1..n) after or as it, both sides nonempty (keys are all distinct since
 * regions are, so the median of three has an element after it) */
static int64_t ms_partition(ms_rank *x, int64_t n) {
    ms_rank a = x[0], b = x[n / 2], c = x[n - 1];
    ms_rank pivot = ms_before(a, b) ? (ms_before(b, c) ? b : (ms_before(a, c) ? c : a))
                                    : (ms_before(a, c) ? a : (ms_before(b, c) ? c : b));
    int64_t i = 0, j = n - 1;
    for (;;) {
        while (ms_before(x[i], pivot)) ++i;
        while (ms_before(pivot, x[j])) --j;
        if (i >= j) return j;
        ms_rank t = x[i]; x[i] = x[j]; x[j] = t;
        ++i; --j;
    }
}

static void ms_sort_ranks(ms_rank *x, int64_t n) {
    /* insertion sort for short runs, else quicksort (partitions evenly in expectation) */
    while (n > MS_SORT_SHORT) {
        const int64_t j = ms_partition(x, n);
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
 * sorted lists of t regions each (list l at lists + l*t; a multi-scale list shorter than t ends in -1)
 * interleaved rank by rank, skipping duplicates, until t distinct regions are in out; then sort out
 * ascending and pad with -1. A group with no list (no valid query ranks) selects nothing. seen: NK
 * bytes, all zero on entry and on return. */
static void ms_interleave(int32_t *out, const int32_t *lists, int nl, int t, msattn_range local,
                          const int32_t *kcount, uint8_t *seen) {
    int n = 0;
    for (int64_t j = local.begin; j < local.end && nl > 0; ++j)
        if (kcount[j] > 0) { seen[j] = 1; out[n++] = (int32_t)j; }
    for (int r = 0; r < t && n < t; ++r)
        for (int l = 0; l < nl && n < t; ++l) {
            int32_t j = lists[(int64_t)l * t + r];
            if (j >= 0 && !seen[j]) { seen[j] = 1; out[n++] = j; }
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
    float row[MSATTN_MAX_HEAD_DIM];
    for (int64_t t = tb; t < te; ++t) {
        if (mask != NULL && mask[b * mask_sb + (t - mask_t0)] == 0) continue;
        ++*count;
        ms_load_row(row, ops, k, dt, b, h, t - k_t0, (int)D, 1.0f);
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

/* The blocked screen's panels (msattn.h, kpanel): whether a call has them, and column j of head
 * (b, h) from that region's sum; the last region also zeroes the columns past NK. */
#define MS_SCREEN_QUERIES 4 /* query regions of a tile from which its candidates are screened */

size_t msattn_select_panel_floats(const msattn_select_params *p) {
    const int64_t NK = msattn_num_key_regions(p->N, p->block_k);
    const int64_t NA = msattn_num_query_regions(p->N, p->Nq, p->block_q);
    if (NA < MS_SCREEN_QUERIES || NK == 0 || p->coarse_regions > 0) return 0; /* multi-scale scores exactly */
    return (size_t)p->B * p->Hkv * msattn_cdiv(NK, MSATTN_TILE) * (p->D + 2) * MSATTN_TILE;
}

size_t msattn_select_panel16_elems(const msattn_select_params *p) {
    if (msattn_select_panel_floats(p) == 0 || msattn_simd()->screen_amx == NULL) return 0;
    const int64_t NK = msattn_num_key_regions(p->N, p->block_k);
    return (size_t)p->B * p->Hkv * msattn_cdiv(NK, MSATTN_TILE) * MSATTN_TILE * msattn_cdiv(p->D, 32) * 32 * 2;
}

/* column j of head (b, h) in the panels: its sum, 1 / count and a bound on |sum| / count (zeros for an
 * empty region), and, for the AMX screen, the sum as two bf16 parts (msattn_bf16_split; zeros past D);
 * the last region also zeroes the columns past NK */
static void ms_panel_column(const msattn_select_params *p, int64_t b, int64_t h, int64_t j, int64_t NK) {
    const int64_t D = p->D, DP = msattn_cdiv(D, 32) * 32, NP = msattn_cdiv(NK, MSATTN_TILE);
    const int64_t ld = (D + 2) * MSATTN_TILE, ld16 = 2 * MSATTN_TILE * DP, panel = (b * p->Hkv + h) * NP + j / MSATTN_TILE;
    const float *sum = p->ksum.sum + b * p->ksum.sum_sb + h * p->ksum.sum_sh + j * D;
    const int32_t count = p->ksum.count[b * p->ksum.count_sb + h * p->ksum.count_sh + j];
    const int64_t c = j % MSATTN_TILE;
    float *col = p->kpanel + panel * ld;
    double sq = 0.0;
    for (int64_t d = 0; d < D; ++d) {
        col[d * MSATTN_TILE + c] = count > 0 ? sum[d] : 0.0f;
        sq += (double)sum[d] * (double)sum[d];
    }
    col[D * MSATTN_TILE + c] = count > 0 ? 1.0f / (float)count : 0.0f;
    col[(D + 1) * MSATTN_TILE + c] = count > 0 ? msattn_float_up(sqrt(sq) / (double)count * (1.0 + 0x1p-20)) : 0.0f;
    uint16_t *col16 = p->kpanel16 != NULL ? p->kpanel16 + panel * ld16 : NULL;
    for (int64_t d = 0; col16 != NULL && d < DP; ++d) {
        uint16_t hi = 0, lo = 0;
        if (count > 0 && d < D) msattn_bf16_split(sum[d], &hi, &lo);
        col16[msattn_amx_panel_offset(d, c)] = hi;
        col16[MSATTN_TILE * DP + msattn_amx_panel_offset(d, c)] = lo;
    }
    if (j != NK - 1) return;
    for (int64_t x = c + 1; x < MSATTN_TILE; ++x) {
        for (int64_t d = 0; d < D + 2; ++d) col[d * MSATTN_TILE + x] = 0.0f;
        for (int64_t d = 0; col16 != NULL && d < DP; ++d)
            col16[msattn_amx_panel_offset(d, x)] = col16[MSATTN_TILE * DP + msattn_amx_panel_offset(d, x)] = 0;
    }
}

int msattn_region_means_cpu(const msattn_select_params *p, int64_t begin, int64_t end) {
    const msattn_simd_ops *ops = msattn_simd();
    const int64_t N = p->N, Nq = p->Nq, D = p->D, hg = p->Hq / p->Hkv;
    const int64_t NK = msattn_num_key_regions(N, p->block_k);
    const int64_t NA = msattn_num_query_regions(N, Nq, p->block_q);
    const int64_t a0 = msattn_first_query_region(N, Nq, p->block_q);
    for (int64_t w = begin; w < end; ++w) {
        const int64_t r = w % (NK + NA), bh = w / (NK + NA), b = bh / p->Hkv, h = bh % p->Hkv;
        if (r < NK) { /* key region r of head h: its sum, unless a cache keeps it, and its panel column */
            if (!p->sums_given) {
                msattn_range tok = msattn_key_region(r, p->block_k, N);
                ms_add_tokens(p->ksum, &p->k, p->dtype, p->key_mask, p->mask_sb, 0, D, p->block_k, b, h, 0,
                              tok.begin, tok.end);
            }
            if (p->kpanel != NULL) ms_panel_column(p, b, h, r, NK);
            continue;
        }
        /* query region a0 + (r - NK): the mean of its valid queries, summed over KV head h's query heads */
        const int64_t a = r - NK;
        double *acc = p->qbar + (bh * NA + a) * D;
        int32_t count = 0;
        memset(acc, 0, (size_t)D * sizeof(double));
        msattn_range pos = msattn_query_region(a0 + a, p->block_q, N, Nq);
        /* rows converted to float (exact but for float64) by ms_load_row, then added in double */
        float row[MSATTN_MAX_HEAD_DIM];
        for (int64_t t = pos.begin; t < pos.end; ++t) {
            if (!ms_key_valid(p, b, t)) continue;
            ++count;
            for (int64_t hq = h * hg; hq < (h + 1) * hg; ++hq) {
                if (p->dtype != MSATTN_F64) {
                    ms_load_row(row, ops, &p->q, p->dtype, b, hq, t - (N - Nq), (int)D, 1.0f);
                    for (int64_t d = 0; d < D; ++d) acc[d] += (double)row[d];
                } else {
                    const int64_t off = b * p->q.sb + hq * p->q.sh + (t - (N - Nq)) * p->q.sn;
                    for (int64_t d = 0; d < D; ++d) acc[d] += ((const double *)p->q.data)[off + d * p->q.sd];
                }
            }
        }
        p->qcount[bh * NA + a] = count;
        if (count > 0)
            for (int64_t d = 0; d < D; ++d) acc[d] /= count;
    }
    return MSATTN_OK;
}

/* coarse region J of head (b, h): its regions' float sums added in double in ascending order, rounded to
 * float once, and their counts (the CUDA kernel adds in the same order) */
int msattn_coarse_sums_cpu(const msattn_select_params *p, int64_t begin, int64_t end) {
    const int64_t D = p->D, S = p->coarse_regions, NK = msattn_num_key_regions(p->N, p->block_k);
    const int64_t NC = msattn_cdiv(NK, S);
    for (int64_t w = begin; w < end; ++w) {
        const int64_t J = w % NC, bh = w / NC, b = bh / p->Hkv, h = bh % p->Hkv;
        const float *sum = p->ksum.sum + b * p->ksum.sum_sb + h * p->ksum.sum_sh;
        const int32_t *count = p->ksum.count + b * p->ksum.count_sb + h * p->ksum.count_sh;
        double acc[MSATTN_MAX_HEAD_DIM] = {0};
        int64_t n = 0;
        for (int64_t j = J * S; j < msattn_min64((J + 1) * S, NK); ++j) {
            if (count[j] == 0) continue;
            n += count[j];
            for (int64_t d = 0; d < D; ++d) acc[d] += (double)sum[j * D + d];
        }
        float *out = p->csum.sum + b * p->csum.sum_sb + h * p->csum.sum_sh + J * D;
        for (int64_t d = 0; d < D; ++d) out[d] = (float)acc[d];
        p->csum.count[b * p->csum.count_sb + h * p->csum.count_sh + J] = (int32_t)n;
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
 * query regions (about MS_TILE_QUERIES of them) score each block of candidates while it is in cache,
 * so the key-region sums stream from memory once per tile rather than once per group.
 *
 * With at least MS_SCREEN_QUERIES ranking query regions a tile screens, in two passes over panels of
 * 64 candidates (pass 1's kpanel), with score tiles that bound each candidate's exact score from below
 * and above: float tiles of four query regions (ops->screen_tile: the attention's qk, then bounds), or
 * in pass A, where the instruction set has it, AMX tiles of sixteen (ops->screen_amx, bf16x3):
 *   A. every panel against every query region that reaches into it: per (region, panel) the largest
 *      lower and upper bound, and the largest lower bound of the columns c = l (mod 16). The T-th
 *      largest of a region's lower bounds, theta, is a lower bound on its T-th best exact score (T
 *      distinct candidates reach it), so no candidate whose upper bound is below theta can be selected.
 *   B. only the (region, panel) pairs whose largest upper bound reaches theta (raised to the heap's
 *      last once it is full), screened again (AMX tiles of sixteen where pass A used them); the survivors are scored exactly (score_block,
 *      once 64 of a region wait) into the region's heap.
 * One pass with the heap's last as the only threshold offers each region about T ln(C / T) of its C
 * candidates on random data (about 420 at 256K with the authors' topk 64); theta cuts that to a few
 * more than T. Otherwise (a decode step: one query region) a tile scores blocks of MS_SCORE_BLOCK
 * candidates exactly. */
#define MS_SCORE_BLOCK 128
#define MS_LANES 16 /* lower bounds per (query region, panel): of the columns c = l (mod 16) each */
#define MS_PENDING (2 * MSATTN_TILE) /* a query region's survivors are scored once 64 wait: full batches of score_block */
#define MS_TILE_QUERIES 128 /* 16 -> 64 (a 1M passkey trial of the demo's model 38 -> 34.5 s), 64 -> 128 with the blocked screen (docs/notebook.md) */

int64_t msattn_select_tile_groups(const msattn_select_params *p) {
    return p->merge >= MS_TILE_QUERIES ? 1 : MS_TILE_QUERIES / p->merge;
}

/* A tile's scratch, carved in one place for both msattn_select_scratch_bytes (no base: offsets only) and
 * msattn_select_cpu. Q = tile * merge query regions, NP = cdiv(NK, 64) panels, TH = min(T, NK) (a group
 * with at most T candidates takes them all and ranks nothing), DP = D rounded up to 32. */
typedef struct {
    double *scores;          /* exact scores of a batch (2 * MS_SCORE_BLOCK) */
    ms_rank *heaps;          /* per query region its top T (Q * TH) */
    int64_t *fill;           /* heap sizes (Q) */
    const double **qbs;      /* query-region means (Q) */
    uint64_t *masks, *valid; /* a screen's survivors and valid columns (16 each) */
    uint64_t *valid16;       /* the AMX screen's valid columns (16) */
    uint64_t *live;          /* per panel its nonempty columns (NP) */
    float *qfs;              /* the means in float (Q * D) */
    float *qbound, *qabs, *theta, *qbound16, *qabs16; /* margins (float screen, AMX screen), thetas (Q each) */
    float *plo;              /* per (query region, panel) its lane lower bounds (Q * NP * MS_LANES) */
    float *pmax, *phi;       /* per (query region, panel) the largest lower and upper bound (Q * NP each) */
    float *gq;               /* up to four gathered means (MSATTN_ROWS * D) */
    float *glim, *gbound, *gabs; /* the gathered rows' limits and margins (16 each) */
    float *glo, *gends;      /* a screen's lane bounds and ends (16 * MS_LANES, 2 * 16) */
    int32_t *qtile, *qlimit; /* per query region its tile group and candidate limit (Q each) */
    int32_t *grow;           /* gathered rows (16) */
    int32_t *first, *last, *ranks; /* per tile group its query regions and whether it ranks (tile each) */
    int32_t *lists;          /* a group's sorted lists (merge * TH) */
    int32_t *keep;           /* kept candidates of a batch (MS_SCORE_BLOCK + 16) */
    int32_t *sub;            /* a batch's region ids (MS_SCORE_BLOCK) */
    int32_t *cand;           /* candidates (NK) */
    int32_t *npend, *pend;   /* survivors waiting for exact scores: per query region their number and list (Q, Q * MS_PENDING) */
    ms_rank *coarse;         /* multi-scale: a group's kept coarse regions (min(coarse_topk, NC)) */
    ms_rank *ranked;         /* multi-scale: every scored candidate of a query region or group (NK) */
    double *all_scores;      /* multi-scale: their exact scores (NK) */
    uint16_t *q16;           /* the means as two bf16 parts for the AMX screen ((Q + 16) * 2 * DP) */
    uint16_t *gq16;          /* up to sixteen of them gathered (16 * 2 * DP) */
    uint8_t *seen;           /* interleaving marks (NK) */
} ms_select_scratch;

typedef struct {
    char *base; /* NULL: count only */
    size_t off;
} ms_arena;

static void *ms_take(ms_arena *a, int64_t n, size_t esize) {
    void *p = a->base != NULL ? a->base + a->off : NULL;
    a->off += ((size_t)n * esize + 63) / 64 * 64;
    return p;
}

static size_t ms_select_carve(const msattn_select_params *p, void *base, ms_select_scratch *s) {
    const int64_t NK = msattn_num_key_regions(p->N, p->block_k), NP = msattn_cdiv(NK, MSATTN_TILE);
    const int64_t TH = msattn_min64(p->topk, NK), M = p->merge, tile = msattn_select_tile_groups(p), Q = tile * M;
    const int64_t D = p->D, DP = msattn_cdiv(D, 32) * 32, R = MSATTN_ROWS;
    ms_arena a = {(char *)base, 0};
    s->scores = ms_take(&a, 2 * MS_SCORE_BLOCK, sizeof(double));
    s->heaps = ms_take(&a, Q * TH, sizeof(ms_rank));
    s->fill = ms_take(&a, Q, sizeof(int64_t));
    s->qbs = ms_take(&a, Q, sizeof(double *));
    s->masks = ms_take(&a, 16, sizeof(uint64_t));
    s->valid = ms_take(&a, 16, sizeof(uint64_t));
    s->valid16 = ms_take(&a, 16, sizeof(uint64_t));
    s->live = ms_take(&a, NP, sizeof(uint64_t));
    s->qfs = ms_take(&a, Q * D, sizeof(float));
    s->qbound = ms_take(&a, Q, sizeof(float));
    s->qabs = ms_take(&a, Q, sizeof(float));
    s->theta = ms_take(&a, Q, sizeof(float));
    s->qbound16 = ms_take(&a, Q, sizeof(float));
    s->qabs16 = ms_take(&a, Q, sizeof(float));
    s->plo = ms_take(&a, Q * NP * MS_LANES, sizeof(float));
    s->pmax = ms_take(&a, Q * NP, sizeof(float));
    s->phi = ms_take(&a, Q * NP, sizeof(float));
    s->gq = ms_take(&a, R * D, sizeof(float));
    s->glim = ms_take(&a, 16, sizeof(float));
    s->gbound = ms_take(&a, 16, sizeof(float));
    s->gabs = ms_take(&a, 16, sizeof(float));
    s->glo = ms_take(&a, 16 * MS_LANES, sizeof(float));
    s->gends = ms_take(&a, 2 * 16, sizeof(float));
    s->qtile = ms_take(&a, Q, sizeof(int32_t));
    s->qlimit = ms_take(&a, Q, sizeof(int32_t));
    s->grow = ms_take(&a, 16, sizeof(int32_t));
    s->first = ms_take(&a, tile, sizeof(int32_t));
    s->last = ms_take(&a, tile, sizeof(int32_t));
    s->ranks = ms_take(&a, tile, sizeof(int32_t));
    s->lists = ms_take(&a, M * TH, sizeof(int32_t));
    s->keep = ms_take(&a, MS_SCORE_BLOCK + 16, sizeof(int32_t));
    s->sub = ms_take(&a, MS_SCORE_BLOCK, sizeof(int32_t));
    s->cand = ms_take(&a, NK, sizeof(int32_t));
    s->npend = ms_take(&a, Q, sizeof(int32_t));
    s->pend = ms_take(&a, Q * MS_PENDING, sizeof(int32_t));
    s->q16 = ms_take(&a, (Q + 16) * 2 * DP, sizeof(uint16_t));
    s->gq16 = ms_take(&a, 16 * 2 * DP, sizeof(uint16_t));
    s->seen = ms_take(&a, NK, 1);
    s->coarse = ms_take(&a, p->coarse_regions > 0 ? msattn_min64(p->coarse_topk, msattn_cdiv(NK, p->coarse_regions)) : 0,
                        sizeof(ms_rank));
    s->ranked = ms_take(&a, p->coarse_regions > 0 ? NK : 0, sizeof(ms_rank));
    s->all_scores = ms_take(&a, p->coarse_regions > 0 ? NK : 0, sizeof(double));
    return a.off;
}

size_t msattn_select_scratch_bytes(const msattn_select_params *p) {
    ms_select_scratch s;
    return ms_select_carve(p, NULL, &s);
}

/* offer candidates sub[0..m) (valid candidates of query region i's group) to heap i, scored exactly */
static void ms_offer_exact(const msattn_simd_ops *ops, ms_rank *heap, int64_t *fill, int64_t T, const double *qb,
                           const float *ksum, const int32_t *kcount, const int32_t *sub, int m, int64_t D,
                           double *scores, int32_t *keep) {
    double worst = *fill == T ? ms_key_score(heap[0].key) : -INFINITY;
    const int nk = ops->score_block(scores, keep, qb, ksum, sub, kcount, m, (int)D, worst);
    for (int k = 0; k < nk; ++k) {
        const int64_t c = keep[k];
        if (*fill == T && scores[c] < worst) continue;
        const ms_rank x = {ms_order_key(scores[c]), sub[c]};
        ms_heap_offer(heap, fill, T, x);
        if (*fill == T) worst = ms_key_score(heap[0].key);
    }
}

/* reorder x[0..n) so that x[0..t) are its t first in ranking order (any order among them) */
static void ms_partition_top(ms_rank *x, int64_t n, int64_t t) {
    while (t > 0 && t < n) {
        if (n <= MS_SORT_SHORT) {
            ms_sort_ranks(x, n);
            return;
        }
        const int64_t j = ms_partition(x, n);
        if (t <= j + 1) {
            n = j + 1;
        } else {
            x += j + 1; n -= j + 1; t -= j + 1;
        }
    }
}

/* the top min(t, m) of candidates cand[0..m), scored exactly, into out[0..*fill) (any order): every score
 * computed (all_scores, m), then one partition of their ranks (ranked, m); O(m), where a bounded heap
 * offered many candidates would sift about t ln(m / t) times */
static void ms_top_exact(const msattn_simd_ops *ops, ms_rank *out, int64_t *fill, int64_t t, const double *qb,
                         const float *sums, const int32_t *counts, const int32_t *cand, int64_t m, int64_t D,
                         double *all_scores, ms_rank *ranked, int32_t *keep) {
    for (int64_t c0 = 0; c0 < m; c0 += MS_SCORE_BLOCK)
        ops->score_block(all_scores + c0, keep, qb, sums, cand + c0, counts, (int)msattn_min64(MS_SCORE_BLOCK, m - c0),
                         (int)D, -INFINITY);
    for (int64_t c = 0; c < m; ++c) ranked[c] = (ms_rank){ms_order_key(all_scores[c]), cand[c]};
    const int64_t n = msattn_min64(t, m);
    ms_partition_top(ranked, m, n);
    memcpy(out, ranked, (size_t)n * sizeof(ms_rank));
    *fill = n;
}

/* key region j holds a valid key and group ga may attend to it */
static inline int ms_valid_candidate(const msattn_select_params *p, const int32_t *kcount, int64_t j, int64_t ga) {
    return kcount[j] > 0 && msattn_is_candidate(j, ga, msattn_span(p->block_q, p->merge), p->block_k, p->N, p->causal);
}

static int ms_cmp_rank_region(const void *a, const void *b) {
    return ms_cmp_int32(&((const ms_rank *)a)->j, &((const ms_rank *)b)->j);
}

/* Multi-scale ranking of a tile's ranking groups (coarse_regions > 0). Per group: the coarse regions
 * holding one of its candidates, ranked by the group's mean query (the mean of its ranking query
 * regions' means, added in order) against the coarse sums, exactly, the best coarse_topk kept
 * (`coarse`); then every ranking query region of the group ranks the candidates inside the kept coarse
 * regions into its heap (ms_top_exact: every score, then one partition). Groups t < nt of the tile
 * start at absolute group ga0; the query regions first[t] .. last[t] - 1 of group t rank (ranks[t]).
 * Exact scores per group: NC + merge * coarse_topk * coarse_regions, against merge * NK for exact
 * ranking (whose screens avoid most of them). */
static void ms_select_multiscale(const msattn_select_params *p, const msattn_simd_ops *ops, int64_t b, int64_t h,
                                 int64_t ga0, int64_t nt, const int32_t *ranks, const int32_t *first,
                                 const int32_t *last, const double **qbs, ms_rank *heaps, int64_t *fill, ms_rank *coarse,
                                 int32_t *cand, double *all_scores, ms_rank *ranked, int32_t *keep) {
    const int64_t N = p->N, D = p->D, T = p->topk, S = p->coarse_regions, span = msattn_span(p->block_q, p->merge);
    const int64_t NK = msattn_num_key_regions(N, p->block_k), NC = msattn_cdiv(NK, S);
    const int64_t TH = msattn_min64(T, NK), CT = msattn_min64(p->coarse_topk, NC);
    const int32_t *kcount = p->ksum.count + b * p->ksum.count_sb + h * p->ksum.count_sh;
    const float *ksum = p->ksum.sum + b * p->ksum.sum_sb + h * p->ksum.sum_sh;
    const int32_t *ccount = p->csum.count + b * p->csum.count_sb + h * p->csum.count_sh;
    const float *csum = p->csum.sum + b * p->csum.sum_sb + h * p->csum.sum_sh;
    double qg[MSATTN_MAX_HEAD_DIM];
    for (int64_t t = 0; t < nt; ++t) {
        if (!ranks[t] || last[t] == first[t]) continue;
        const int64_t ga = ga0 + t;
        for (int64_t d = 0; d < D; ++d) qg[d] = 0.0;
        for (int64_t i = first[t]; i < last[t]; ++i)
            for (int64_t d = 0; d < D; ++d) qg[d] += qbs[i][d];
        for (int64_t d = 0; d < D; ++d) qg[d] /= (double)(last[t] - first[t]);
        /* the group's candidates are [0, limit) (causal) or all but its own regions [o.begin, o.end) */
        const msattn_range o = msattn_group_own_regions(ga, span, p->block_k, N);
        const int64_t limit = p->causal ? ga * span / p->block_k : NK;
        int64_t nc = 0;
        for (int64_t J = 0; J < NC && J * S < limit; ++J) {
            const int64_t lo = J * S, hi = msattn_min64(lo + S, NK);
            int holds = 0;
            if (hi <= limit && (p->causal || hi <= o.begin || lo >= o.end)) {
                holds = ccount[J] > 0; /* every region of J is a candidate position */
            } else {
                for (int64_t j = lo; j < hi && !holds; ++j)
                    holds = ms_valid_candidate(p, kcount, j, ga);
            }
            if (holds) cand[nc++] = (int32_t)J;
        }
        int64_t kept = 0;
        ms_top_exact(ops, coarse, &kept, CT, qg, csum, ccount, cand, nc, D, all_scores, ranked, keep);
        /* the candidates inside the kept coarse regions, ascending (cand is free again) */
        qsort(coarse, (size_t)kept, sizeof(ms_rank), ms_cmp_rank_region);
        int64_t m = 0;
        for (int64_t c = 0; c < kept; ++c)
            for (int64_t j = (int64_t)coarse[c].j * S; j < msattn_min64(((int64_t)coarse[c].j + 1) * S, NK); ++j)
                if (ms_valid_candidate(p, kcount, j, ga)) cand[m++] = (int32_t)j;
        for (int64_t i = first[t]; i < last[t]; ++i)
            ms_top_exact(ops, heaps + i * TH, &fill[i], T, qbs[i], ksum, kcount, cand, m, D, all_scores, ranked, keep);
    }
}

/* bits [lo, hi) of a 64-bit word, clipped to it */
static inline uint64_t ms_bits(int64_t lo, int64_t hi) {
    lo = msattn_max64(lo, 0);
    hi = msattn_min64(hi, 64);
    if (lo >= hi) return 0;
    return (hi - lo == 64 ? ~0ull : ((1ull << (hi - lo)) - 1)) << lo;
}

/* the columns of panel j0..j0+63 that are candidates of group ga: nonempty regions below NK (`live`),
 * causal below the group's first region, non-causal outside its own regions */
static inline uint64_t ms_row_columns(const msattn_select_params *p, uint64_t live, int64_t j0, int64_t ga,
                                      int64_t span, int64_t N) {
    if (p->causal) return live & ms_bits(0, ga * span / p->block_k - j0);
    msattn_range own = msattn_group_own_regions(ga, span, p->block_k, N);
    return live & ~ms_bits(own.begin - j0, own.end - j0);
}

static inline uint64_t ms_live_columns(const int32_t *kcount, int64_t j0, int64_t NK) {
    uint64_t live = 0;
    for (int64_t c = 0; c < MSATTN_TILE && j0 + c < NK; ++c) live |= (uint64_t)(kcount[j0 + c] > 0) << c;
    return live;
}

/* A value that at least k of x[0..n) reach, at most two 64ths of their finite range below the k-th
 * largest: a histogram of 64 buckets instead of a selection (-inf when n < k or nothing is finite). */
#define MS_BUCKETS 64
static float ms_kth_bound(const float *x, int64_t n, int64_t k) {
    if (n < k) return -INFINITY;
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < n; ++i)
        if (isfinite(x[i])) {
            lo = x[i] < lo ? x[i] : lo;
            hi = x[i] > hi ? x[i] : hi;
        }
    if (!(lo <= hi)) return -INFINITY;
    const float range = hi - lo;
    if (!(range > 0.0f) || !isfinite(range)) return lo; /* every finite value reaches lo; so do the +inf */
    const float scale = (float)MS_BUCKETS / range;
    int64_t count[MS_BUCKETS] = {0};
    for (int64_t i = 0; i < n; ++i) {
        if (!(x[i] >= lo)) continue; /* -inf */
        const float u = (x[i] - lo) * scale;
        count[u < (float)(MS_BUCKETS - 1) ? (int)u : MS_BUCKETS - 1]++;
    }
    int64_t above = 0;
    for (int b = MS_BUCKETS - 1; b > 0; --b) {
        above += count[b];
        /* bucket b holds values whose computed u >= b, so at least lo + (b - 1) * range / 64 (one
         * bucket for the rounding of u), rounded down */
        if (above >= k) {
            const float edge = nextafterf(lo + (float)(b - 1) / scale, -INFINITY);
            return edge > lo ? edge : lo;
        }
    }
    return lo;
}

/* theta: the T-th largest of a query region's lower bounds, x[0..np * MS_LANES) panel by panel, whose
 * panel maxima are pmax[0..np); reorders x. A bound theta1 that T panel maxima reach is at most theta
 * (the maxima are T of the values), so theta is the T-th largest of the values that reach theta1:
 * usually a few more than T of np * MS_LANES. */
static float ms_kth_largest(float *x, int64_t n, int64_t k);

static float ms_theta(float *x, const float *pmax, int64_t np, int64_t T) {
    if (np * MS_LANES < T) return -INFINITY;
    const float theta1 = ms_kth_bound(pmax, np, T);
    int64_t n = 0;
    for (int64_t i = 0; i < np; ++i)
        if (pmax[i] >= theta1)
            for (int l = 0; l < MS_LANES; ++l) { /* without branches: most lanes fall below */
                const float v = x[i * MS_LANES + l];
                x[n] = v;
                n += v >= theta1;
            }
    return ms_kth_largest(x, n, T);
}

/* the k-th largest (k >= 1) of x[0..n), reordering x; -inf when n < k (quickselect) */
static float ms_kth_largest(float *x, int64_t n, int64_t k) {
    if (n < k) return -INFINITY;
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        const float pivot = x[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot) ++i;
            while (x[j] < pivot) --j;
            if (i <= j) { float t = x[i]; x[i] = x[j]; x[j] = t; ++i; --j; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return x[want];
    }
    return x[want];
}

int msattn_select_cpu(const msattn_select_params *p, int64_t begin, int64_t end, void *scratch) {
    const msattn_simd_ops *ops = msattn_simd();
    const int64_t N = p->N, Nq = p->Nq, D = p->D, T = p->topk, M = p->merge;
    const int64_t span = msattn_span(p->block_q, p->merge);
    const int64_t NK = msattn_num_key_regions(N, p->block_k);
    const int64_t NA = msattn_num_query_regions(N, Nq, p->block_q);
    const int64_t a0 = msattn_first_query_region(N, Nq, p->block_q);
    const int64_t g0 = msattn_first_group(N, Nq, span), G = msattn_num_groups(N, Nq, span);
    const int64_t NP = msattn_cdiv(NK, MSATTN_TILE), ldp = (D + 2) * MSATTN_TILE;
    const int64_t TH = msattn_min64(T, NK), tile = msattn_select_tile_groups(p);
    ms_select_scratch sc;
    ms_select_carve(p, scratch, &sc);
    double *scores = sc.scores;
    ms_rank *heaps = sc.heaps;
    int64_t *fill = sc.fill;
    const double **qbs = sc.qbs;
    uint64_t *masks = sc.masks, *valid = sc.valid, *valid16 = sc.valid16, *live = sc.live;
    float *qfs = sc.qfs, *qbound = sc.qbound, *qabs = sc.qabs, *theta = sc.theta, *qbound16 = sc.qbound16;
    float *qabs16 = sc.qabs16, *plo = sc.plo, *pmax = sc.pmax, *phi = sc.phi;
    float *gq = sc.gq, *glim = sc.glim, *gbound = sc.gbound, *gabs = sc.gabs, *glo = sc.glo, *gends = sc.gends;
    int32_t *qtile = sc.qtile, *qlimit = sc.qlimit, *grow = sc.grow, *first = sc.first, *last = sc.last;
    int32_t *ranks = sc.ranks, *lists = sc.lists, *keep = sc.keep, *sub = sc.sub;
    int32_t *cand = sc.cand, *npend = sc.npend, *pend = sc.pend;
    uint16_t *q16 = sc.q16, *gq16 = sc.gq16;
    uint8_t *seen = sc.seen;
    ms_rank *coarse = sc.coarse;
    const int64_t DP = msattn_cdiv(D, 32) * 32;
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
                if (ms_valid_candidate(p, kcount, j, ga)) cand[nc++] = (int32_t)j;
            ranks[t] = nc > T;
            first[t] = last[t] = (int32_t)nq;
            if (!ranks[t]) {
                memcpy(out, cand, (size_t)nc * sizeof(int32_t));
                for (int64_t i = nc; i < T; ++i) out[i] = -1;
                continue;
            }
            any = 1;
            /* causal: the candidates lie below the group's first region; non-causal: anywhere */
            const int32_t limit = (int32_t)(p->causal ? ga * span / p->block_k : NK);
            const int64_t abeg = msattn_max64(ga * M, a0), aend = msattn_min64((ga + 1) * M, a0 + NA);
            for (int64_t a = abeg; a < aend; ++a)
                if (p->qcount[bh * NA + (a - a0)] != 0) {
                    qbs[nq] = p->qbar + (bh * NA + (a - a0)) * D;
                    qtile[nq] = (int32_t)t;
                    qlimit[nq] = limit;
                    npend[nq] = 0;
                    fill[nq++] = 0;
                }
            last[t] = (int32_t)nq;
        }
        if (any && p->coarse_regions > 0) {
            ms_select_multiscale(p, ops, b, h, g0 + gi0, nt, ranks, first, last, qbs, heaps, fill, coarse, cand,
                                 sc.all_scores, sc.ranked, keep);
        } else if (any && nq >= MS_SCREEN_QUERIES && p->kpanel != NULL) {
            const int amx = ops->screen_amx != NULL && p->kpanel16 != NULL;
            /* the blocked screen (passes A and B above). The query regions reaching into a panel are
             * a suffix of the tile's (their limits ascend). The means in float, with AMX also as two
             * bf16 parts, and the margins of each screen (simd_kernels.h, amx.c), rounded up. */
            for (int64_t i = 0; i < nq; ++i) {
                double sq = 0.0;
                for (int64_t d = 0; d < D; ++d) {
                    qfs[i * D + d] = (float)qbs[i][d];
                    sq += qbs[i][d] * qbs[i][d];
                }
                const double qn = sqrt(sq) * (1.0 + 0x1p-20), rd = sqrt((double)D);
                qbound[i] = msattn_float_up(4.0 * (double)(D + 5) * 0x1p-24 * qn + 0x1p-118 * rd);
                qabs[i] = msattn_float_up(0x1p-118 * (rd * qn + (double)D));
                if (amx) {
                    msattn_amx_bounds(qn, (int)DP, &qbound16[i], &qabs16[i]);
                    for (int64_t d = 0; d < DP; ++d) {
                        uint16_t hi = 0, lo = 0;
                        if (d < D) msattn_bf16_split(qfs[i * D + d], &hi, &lo);
                        q16[i * 2 * DP + d] = hi;
                        q16[i * 2 * DP + DP + d] = lo;
                    }
                }
            }
            if (amx) memset(q16 + nq * 2 * DP, 0, (size_t)16 * 2 * DP * sizeof(uint16_t)); /* rows past nq a tile reads */
            const int64_t pn = msattn_cdiv(qlimit[nq - 1], MSATTN_TILE); /* panels reached */
            for (int64_t pi = 0; pi < pn; ++pi) live[pi] = ms_live_columns(kcount, pi * MSATTN_TILE, NK);
            const float *panels = p->kpanel + bh * NP * ldp;
            const uint16_t *panels16 = amx ? p->kpanel16 + bh * NP * MSATTN_TILE * DP * 2 : NULL;
            /* A: panel bounds of every (query region, panel) it reaches; theta per query region */
            if (amx) msattn_amx_begin();
            for (int64_t pi = 0, qs = 0; pi < pn; ++pi) {
                const int64_t j0 = pi * MSATTN_TILE;
                while (qs < nq && qlimit[qs] <= j0) ++qs;
                for (int64_t r0 = qs; amx && r0 < nq; r0 += 16) { /* AMX: sixteen query regions at a time */
                    const int rows = (int)msattn_min64(16, nq - r0);
                    for (int r = 0; r < rows; ++r) valid16[r] = ms_row_columns(p, live[pi], j0, g0 + gi0 + qtile[r0 + r], span, N);
                    ops->screen_amx(NULL, plo + (r0 * NP + pi) * MS_LANES, NP * MS_LANES, pmax + r0 * NP + pi, phi + r0 * NP + pi,
                                    NP, q16 + r0 * 2 * DP, 2 * DP, rows, panels16 + pi * MSATTN_TILE * DP * 2, (int)DP,
                                    panels + pi * ldp + D * MSATTN_TILE, qbound16 + r0, qabs16 + r0, NULL, valid16);
                }
                for (int64_t r0 = qs; !amx && r0 < nq; r0 += MSATTN_ROWS) {
                    const int rows = (int)msattn_min64(MSATTN_ROWS, nq - r0);
                    for (int r = 0; r < rows; ++r) {
                        valid[r] = ms_row_columns(p, live[pi], j0, g0 + gi0 + qtile[r0 + r], span, N);
                        glim[r] = INFINITY;
                    }
                    ops->screen_tile(masks, glo, gends, qfs + r0 * D, D, rows, panels + pi * ldp, (int)D, qbound + r0, qabs + r0,
                                     glim, valid);
                    for (int r = 0; r < rows; ++r) {
                        memcpy(plo + ((r0 + r) * NP + pi) * MS_LANES, glo + r * MS_LANES, MS_LANES * sizeof(float));
                        pmax[(r0 + r) * NP + pi] = gends[2 * r];
                        phi[(r0 + r) * NP + pi] = gends[2 * r + 1];
                    }
                }
            }
            if (amx) msattn_amx_end();
            for (int64_t i = 0; i < nq; ++i) {
                const int64_t np = msattn_cdiv(qlimit[i], MSATTN_TILE);
                theta[i] = ms_theta(plo + i * NP * MS_LANES, pmax + i * NP, np, T);
            }
            /* B: the pairs whose upper bound reaches the limit (theta, raised to the heap's last once
             * it is full), gathered four (float) or sixteen (AMX) query regions at a time; survivors scored
             * exactly into the heaps */
            if (amx) msattn_amx_begin();
            const int R = amx ? 16 : MSATTN_ROWS;
            for (int64_t pi = 0, qs = 0; pi < pn; ++pi) {
                const int64_t j0 = pi * MSATTN_TILE;
                while (qs < nq && qlimit[qs] <= j0) ++qs;
                for (int64_t i0 = qs; i0 < nq;) {
                    int rows = 0;
                    for (; i0 < nq && rows < R; ++i0) {
                        if (phi[i0 * NP + pi] < theta[i0]) continue;
                        if (amx) {
                            memcpy(gq16 + rows * 2 * DP, q16 + i0 * 2 * DP, (size_t)2 * DP * sizeof(uint16_t));
                            gbound[rows] = qbound16[i0];
                            gabs[rows] = qabs16[i0];
                        } else {
                            memcpy(gq + rows * D, qfs + i0 * D, (size_t)D * sizeof(float));
                            gbound[rows] = qbound[i0];
                            gabs[rows] = qabs[i0];
                        }
                        glim[rows] = theta[i0];
                        valid[rows] = ms_row_columns(p, live[pi], j0, g0 + gi0 + qtile[i0], span, N);
                        grow[rows++] = (int32_t)i0;
                    }
                    if (rows == 0) continue;
                    if (amx)
                        ops->screen_amx(masks, glo, MS_LANES, gends, gends + 1, 2, gq16, 2 * DP, rows,
                                        panels16 + pi * MSATTN_TILE * DP * 2, (int)DP, panels + pi * ldp + D * MSATTN_TILE,
                                        gbound, gabs, glim, valid);
                    else
                        ops->screen_tile(masks, glo, gends, gq, D, rows, panels + pi * ldp, (int)D, gbound, gabs, glim, valid);
                    for (int r = 0; r < rows; ++r) {
                        const int64_t i = grow[r];
                        int32_t *pq = pend + i * MS_PENDING;
                        for (uint64_t bits = masks[r]; bits != 0; bits &= bits - 1)
                            pq[npend[i]++] = (int32_t)(j0 + __builtin_ctzll(bits));
                        if (npend[i] >= MSATTN_TILE) {
                            ms_offer_exact(ops, heaps + i * TH, &fill[i], T, qbs[i], ksum, kcount, pq, npend[i], D, scores, keep);
                            npend[i] = 0;
                            if (fill[i] == T) { /* the heap's last is a limit too (NaN: keep everything) */
                                const float last_kept = msattn_float_down(ms_key_score(heaps[i * TH].key));
                                theta[i] = last_kept <= theta[i] ? theta[i] : last_kept;
                            }
                        }
                    }
                }
            }
            if (amx) msattn_amx_end();
            for (int64_t i = 0; i < nq; ++i)
                if (npend[i] > 0)
                    ms_offer_exact(ops, heaps + i * TH, &fill[i], T, qbs[i], ksum, kcount, pend + i * MS_PENDING, npend[i], D,
                                   scores, keep);
        } else if (any) {
            /* few query regions (a decode step): the candidates of any ranking group, ascending, in
             * blocks scored exactly; each query region offers only its own group's */
            int64_t nc = 0;
            for (int64_t j = 0; j < NK; ++j)
                if (kcount[j] > 0 && j < qlimit[nq - 1]) cand[nc++] = (int32_t)j;
            for (int64_t c0 = 0; c0 < nc; c0 += MS_SCORE_BLOCK) {
                const int64_t cn = msattn_min64(MS_SCORE_BLOCK, nc - c0);
                for (int64_t i = 0; i < nq; ++i) {
                    const int64_t ga = g0 + gi0 + qtile[i];
                    int m = 0;
                    for (int64_t c = c0; c < c0 + cn; ++c)
                        if (msattn_is_candidate(cand[c], ga, span, p->block_k, N, p->causal)) sub[m++] = cand[c];
                    if (m > 0) ms_offer_exact(ops, heaps + i * TH, &fill[i], T, qbs[i], ksum, kcount, sub, m, D, scores, keep);
                }
            }
        }
        if (any)
            for (int64_t t = 0; t < nt; ++t) {
                if (!ranks[t]) continue;
                const int nl = last[t] - first[t];
                for (int l = 0; l < nl; ++l) {
                    ms_rank *heap = heaps + (int64_t)(first[t] + l) * TH;
                    const int64_t n = fill[first[t] + l]; /* T, or fewer after multi-scale ranking */
                    ms_sort_ranks(heap, n);
                    for (int64_t r = 0; r < T; ++r) lists[(int64_t)l * T + r] = r < n ? heap[r].j : -1;
                }
                ms_interleave(p->index + (w + t) * T, lists, nl, (int)T,
                              msattn_local_regions(g0 + gi0 + t, span, p->block_k, p->local), kcount, seen);
            }
        w += nt;
    }
    return MSATTN_OK;
}
