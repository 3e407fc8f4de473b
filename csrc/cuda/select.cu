/*
 * select.cu -- MS attention selection on the GPU (DESIGN section 1, steps 1-5), the CUDA twin of
 * csrc/cpu/select.c: same params, same results.
 *
 * Contract. msattn_region_means_cuda writes the key-region sums and counts (unless p->sums_given)
 * and the query-region means qbar / qcount; msattn_select_cuda then writes index (B, Hkv, G, T):
 * for every (b, h, g) the key regions the group attends to besides its own tokens, ascending, -1
 * padded. msattn_region_sums_append_cuda adds a cache's new tokens to its region sums, in the order
 * pass 1 adds them. All three launch on `stream` and return at once (MSATTN_OK, or an error code
 * with nothing launched, or MSATTN_ERR_CUDA when the launch failed). Selection needs p->cuda_slots
 * blocks of msattn_select_cuda_slot_bytes(p) bytes of device workspace at p->cuda_scratch.
 *
 * Bit-for-bit agreement with the CPU. Every sum is added in the CPU's order, with explicitly rounded
 * intrinsics (__fadd_rn, __dadd_rn, __fma_rn) so that nvcc contracts or reorders nothing:
 *   key sums   float32, token by token in position order (ms_add_tokens);
 *   qbar       double, token by token, query heads of the GQA group in order, then / count;
 *   scores     double, dot(qbar_a, ksum_j) / kcount_j with the CPU's score_block order on every
 *              instruction set: dims padded with zeros to a multiple of 8, partial l = fused
 *              multiply-adds (__fma_rn) over dims l, l + 8, ... in order, then the tree
 *              ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)).
 * The ranking uses the same order-preserving uint64 image of the double (NaN above +inf), ties to
 * the lower region. One caveat: NaN payloads and signs produced by arithmetic differ between x86
 * and NVIDIA GPUs, so with NaN inputs the place of NaN scores may differ from the CPU's.
 *
 * Algorithm of one (b, h, g) item, one thread block, everything in candidate space (candidate c is
 * the c-th candidate region in ascending order, so "lower c" is "lower region"):
 *   1. candidates by a block compaction; at most T of them: written as they are (dense).
 *   2b. multi-scale (coarse_regions > 0): the group's mean query scores the coarse regions holding a
 *      candidate (sums from ms_coarse_sums_kernel), exactly; the best coarse_topk (sel_winners) are
 *      kept and the candidates become the regions inside them, so a list may hold TL < T regions.
 *   2, 3. each ranking query region's top T (TL), its list rank by rank:
 *      screened (at least SEL_SCREEN_MIN ranking regions, T <= SEL_SCREEN_TMAX; sel_screen): SEL_SR
 *      regions at a time against tiles of 8 candidates on tensor cores (mma.sync m16n8k16, bf16x3:
 *      about fp32 accuracy), each score bounded from below and above; a limit that T candidates
 *      provably reach rules out the rest, and only the survivors (a few T on real data) get exact
 *      double scores and are ranked, a warp per region, by counting. The bounds decide nothing but
 *      who is scored exactly, so the selection is the CPU's bit for bit however the tensor cores
 *      round; a region with more than SEL_SURV survivors (near-ties by the thousand) goes the exact way.
 *      exact (a decode step's single query region; a region the screen overflowed): scores of up to
 *      SEL_QR regions at a time (a warp each, a lane per candidate) against tiles of candidates' key
 *      sums staged in shared memory, into the slot's key array; then per region an MSB-first radix
 *      select on the 64-bit keys (8 passes of 8 bits, shared-memory histogram) gives the T-th key K;
 *      winners are the keys above K and the lowest-c keys equal to K (block scan in c order); a
 *      bitonic sort orders the T winners by (key desc, c asc).
 *   4. the interleave: list l's rank r sits at position r*nl + l of the CPU's walk; firstpos[c] =
 *      the smallest position holding c (atomicMin: order-free), -1 for the nloc local regions
 *      (p.local), which the CPU takes before the walk. The CPU then keeps the first T - nloc
 *      distinct regions of the walk, i.e. every c with firstpos[c] <= pT, pT the position where
 *      the (T - nloc)-th new region appears (block scan over positions in order). Those c,
 *      ascending, are the output.
 * Nothing depends on thread scheduling: scans and sorts are deterministic, atomics only count or
 * take minima.
 *
 * Legend: B batch, Hq/Hkv heads, hg = Hq/Hkv, N keys, Nq queries (the last Nq positions), D head
 * dim, CQ/CK block_q/block_k, NK key regions, NA query regions of the call (a0 the first), G groups
 * of the call (g0 the first; gi index, ga = g0 + gi absolute), T topk, nc candidates of a group,
 * nl query regions of a group that rank (hold a valid query), P2T = T rounded up to a power of 2.
 */
#include <limits.h>

#include "common.cuh"

#define SEL_THREADS 256 /* threads of a selection block: 8 warps */
#define SEL_QR 8        /* query regions scored per sweep over the candidates: one per warp */
#define SEL_CT 32       /* candidates per staged tile: one per lane */
#define SEL_DC 32       /* dims per staged chunk of key sums */
#define SEL_DMAX 256    /* largest head dim (the glue checks D <= 256) */
static_assert(SEL_DC % 8 == 0 && SEL_DMAX % 8 == 0, "a chunk of dims must hold whole groups of the eight partials");
#define SEL_SR 16          /* query regions of a screen: the rows of mma m16n8k16 */
#define SEL_SCREEN_MIN 4   /* fewer ranking query regions (a decode step) score every candidate exactly */
#define SEL_SURV 2048      /* survivors a warp ranks by itself; a region with more is scored exactly */
#define SEL_SCREEN_TMAX 512 /* a region keeps at least T survivors: above this T the screen saves nothing */
#define SEL_QLD (SEL_DMAX + 8) /* 16-bit elements per row of the screen's query tile (+8: conflict-free fragments) */
static_assert(SEL_QR * sizeof(uint64_t) >= SEL_SR * sizeof(float), "the screen's upper bounds live in the keys");

// ----------------------------------------------------------------------------------------------
// dimensions and the per-block workspace

struct SelDims {
    int64_t N, Nq, D, T, hg, span, NK, NA, a0, G, g0, BH;
    int64_t NC, CT; /* multi-scale: coarse regions, and the most a group keeps (0, 0 without) */
    int block_q, block_k, merge;
};

__host__ __device__ static inline SelDims sel_dims(const msattn_select_params &p) {
    SelDims d;
    d.N = p.N; d.Nq = p.Nq; d.D = p.D; d.T = p.topk; d.hg = p.Hq / p.Hkv;
    d.block_q = p.block_q; d.block_k = p.block_k; d.merge = p.merge;
    d.span = msattn_span(p.block_q, p.merge);
    d.NK = msattn_num_key_regions(p.N, p.block_k);
    d.NA = msattn_num_query_regions(p.N, p.Nq, p.block_q);
    d.a0 = msattn_first_query_region(p.N, p.Nq, p.block_q);
    d.G = msattn_num_groups(p.N, p.Nq, d.span);
    d.g0 = msattn_first_group(p.N, p.Nq, d.span);
    d.BH = (int64_t)p.B * p.Hkv;
    d.NC = p.coarse_regions > 0 ? msattn_cdiv(d.NK, p.coarse_regions) : 0;
    d.CT = msattn_min64(p.coarse_topk, d.NC);
    return d;
}

__host__ __device__ static inline int64_t sel_pow2_at_least(int64_t x) {
    int64_t n = 1;
    while (n < x) n <<= 1;
    return n;
}

/* one block's workspace, carved from its slot; every piece 256-byte aligned */
struct SelSlot {
    int32_t *cand;     /* (NK)        candidate regions of the item, ascending */
    int32_t *firstpos; /* (NK)        first walk position of candidate c, INT_MAX: never listed */
    int32_t *alist;    /* (merge)     ranking query regions (index into qbar, a - a0), ascending */
    int32_t *lists;    /* (merge, T)  each ranking region's top T (TL, then -1), as candidate indices, by rank */
    uint64_t *keys;    /* (SEL_QR, NK) order keys of the scores of the regions being ranked (the screen:
                          its (SEL_SR, NK) float upper bounds) */
    uint64_t *wkey;    /* (W)         the winners of one region, then sorted: keys; W = max(P2T, CT) */
    int32_t *wc;       /* (W)         ... and their candidate indices (multi-scale: then the kept coarse regions) */
    int32_t *ccand;    /* (NC)        multi-scale: the group's coarse candidates, ascending */
    uint32_t *cls;     /* (SEL_SR, T) the screen: per region, the largest lower bound of the candidates c = i (mod T) */
    int32_t *sid;      /* (8, SEL_SURV) each warp's survivors of one region, ascending candidate indices */
    uint64_t *skey;    /* (8, SEL_SURV) ... and the order keys of their exact scores */
};

__host__ __device__ static inline size_t sel_piece(int64_t n, size_t esize) {
    return ((size_t)n * esize + 255) / 256 * 256;
}

#define SEL_PIECES 11

/* offsets of the pieces; returns the slot size */
__host__ __device__ static inline size_t sel_layout(const SelDims &d, size_t off[SEL_PIECES]) {
    const int64_t W = msattn_max64(sel_pow2_at_least(d.T), d.CT), nw = SEL_THREADS / 32;
    const size_t sz[SEL_PIECES] = {sel_piece(d.NK, 4), sel_piece(d.NK, 4), sel_piece(d.merge, 4),
                                   sel_piece((int64_t)d.merge * d.T, 4), sel_piece((int64_t)SEL_QR * d.NK, 8),
                                   sel_piece(W, 8), sel_piece(W, 4), sel_piece((int64_t)SEL_SR * d.T, 4), sel_piece(nw * SEL_SURV, 4),
                                   sel_piece(nw * SEL_SURV, 8), sel_piece(d.NC, 4)};
    size_t total = 0;
    for (int i = 0; i < SEL_PIECES; ++i) {
        off[i] = total;
        total += sz[i];
    }
    return total;
}

__device__ static inline SelSlot sel_slot(const SelDims &d, char *base) {
    size_t off[SEL_PIECES];
    sel_layout(d, off);
    SelSlot s;
    s.cand = (int32_t *)(base + off[0]);
    s.firstpos = (int32_t *)(base + off[1]);
    s.alist = (int32_t *)(base + off[2]);
    s.lists = (int32_t *)(base + off[3]);
    s.keys = (uint64_t *)(base + off[4]);
    s.wkey = (uint64_t *)(base + off[5]);
    s.wc = (int32_t *)(base + off[6]);
    s.cls = (uint32_t *)(base + off[7]);
    s.sid = (int32_t *)(base + off[8]);
    s.skey = (uint64_t *)(base + off[9]);
    s.ccand = (int32_t *)(base + off[10]);
    return s;
}

// ----------------------------------------------------------------------------------------------
// ranking keys: the CPU's ms_order_key and ms_before

__device__ __forceinline__ uint64_t sel_order_key(double s) {
    const uint64_t u = (uint64_t)__double_as_longlong(s);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

/* (ka, ca) ranks before (kb, cb): higher score first, then lower candidate (= lower region) */
__device__ __forceinline__ bool sel_before(uint64_t ka, int ca, uint64_t kb, int cb) {
    return ka > kb || (ka == kb && ca < cb);
}

// ----------------------------------------------------------------------------------------------
// pass 1: region sums and query means, one block per (b, h, region), a thread per dim

/* grid: B * Hkv * NR blocks, NR = NK + NA (or NA when the key sums are given: key regions skipped);
 * p.ksum.sum float32 (B, Hkv, >=NK, D), p.ksum.count (B, Hkv, >=NK), p.qbar (B, Hkv, NA, D),
 * p.qcount (B, Hkv, NA) are written; q (B, Hq, Nq, D), k (B, Hkv, N, D), key_mask (B, N) read */
__global__ void ms_region_means_kernel(const msattn_select_params p) {
    const SelDims d = sel_dims(p);
    const int64_t NR = p.sums_given ? d.NA : d.NK + d.NA;
    const int64_t w = blockIdx.x;
    const int64_t r = w % NR + (p.sums_given ? d.NK : 0), bh = w / NR, b = bh / p.Hkv, h = bh % p.Hkv;
    if (r < d.NK) { /* key region r: the float32 sum of its valid keys, token by token in position order */
        const msattn_range tok = msattn_key_region(r, p.block_k, d.N);
        float *sum = p.ksum.sum + b * p.ksum.sum_sb + h * p.ksum.sum_sh + r * d.D;
        int32_t count = 0;
        for (int64_t dd = threadIdx.x; dd < d.D; dd += blockDim.x) {
            float acc = 0.0f;
            count = 0;
            for (int64_t t = tok.begin; t < tok.end; ++t) {
                if (!ms_key_valid(p.key_mask, p.mask_sb, b, t)) continue;
                ++count;
                acc = __fadd_rn(acc, ms_load(p.k.data, ms_off(p.k, b, h, t, dd), p.dtype));
            }
            sum[dd] = acc;
        }
        /* every thread counted the same tokens, and thread 0 always has dim 0 (D >= 1) */
        if (threadIdx.x == 0) p.ksum.count[b * p.ksum.count_sb + h * p.ksum.count_sh + r] = count;
        return;
    }
    /* query region a0 + a: the mean of its valid queries, summed over KV head h's query heads */
    const int64_t a = r - d.NK;
    const msattn_range pos = msattn_query_region(d.a0 + a, p.block_q, d.N, d.Nq);
    double *qbar = p.qbar + (bh * d.NA + a) * d.D;
    int32_t count = 0;
    for (int64_t dd = threadIdx.x; dd < d.D; dd += blockDim.x) {
        double acc = 0.0;
        count = 0;
        for (int64_t t = pos.begin; t < pos.end; ++t) {
            if (!ms_key_valid(p.key_mask, p.mask_sb, b, t)) continue;
            ++count;
            for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq)
                acc = __dadd_rn(acc, ms_load_f64(p.q.data, ms_off(p.q, b, hq, t - (d.N - d.Nq), dd), p.dtype));
        }
        qbar[dd] = count > 0 ? __ddiv_rn(acc, (double)count) : acc;
    }
    if (threadIdx.x == 0) p.qcount[bh * d.NA + a] = count; /* thread 0 always has dim 0 (D >= 1) */
}

/* grid: B * Hkv * nr blocks, nr = the regions that tokens [t0, t1) touch (j0 the first); a thread per
 * dim. Adds the valid new tokens to their region's float32 sum and count in position order, starting
 * the region afresh at its first token: the sums pass 1 computes from scratch, bit for bit.
 * k (B, Hkv, t1 - t0, D) and mask (B, t1 - t0) hold the new tokens only. */
__global__ void ms_region_sums_append_kernel(const msattn_region_sums s, const msattn_view k, const msattn_dtype dtype,
                                             const uint8_t *mask, const int64_t mask_sb, const int Hkv, const int D,
                                             const int block_k, const int64_t t0, const int64_t t1,
                                             const int64_t j0, const int64_t nr) {
    const int64_t w = blockIdx.x, j = j0 + w % nr, bh = w / nr, b = bh / Hkv, h = bh % Hkv;
    const int64_t tb = msattn_max64(j * block_k, t0), te = msattn_min64((j + 1) * block_k, t1);
    const bool fresh = tb % block_k == 0;
    float *sum = s.sum + b * s.sum_sb + h * s.sum_sh + j * D;
    int32_t *count = s.count + b * s.count_sb + h * s.count_sh + j;
    const int32_t before = fresh ? 0 : *count;
    int32_t added = 0;
    for (int64_t dd = threadIdx.x; dd < D; dd += blockDim.x) {
        float acc = fresh ? 0.0f : sum[dd];
        added = 0;
        for (int64_t t = tb; t < te; ++t) {
            if (!ms_key_valid(mask, mask_sb, b, t - t0)) continue;
            ++added;
            acc = __fadd_rn(acc, ms_load(k.data, ms_off(k, b, h, t - t0, dd), dtype));
        }
        sum[dd] = acc;
    }
    __syncthreads(); /* every thread has read the old count before thread 0 (which has dim 0) writes it */
    if (threadIdx.x == 0) *count = before + added;
}

/* grid: B * Hkv * NC blocks, a thread per dim. Multi-scale: coarse region J's sum, its regions' float sums
 * added in double in ascending order and rounded to float once, and its count (the CPU's order) */
__global__ void ms_coarse_sums_kernel(const msattn_select_params p) {
    const SelDims d = sel_dims(p);
    const int64_t S = p.coarse_regions, w = blockIdx.x, J = w % d.NC, bh = w / d.NC, b = bh / p.Hkv, h = bh % p.Hkv;
    const float *sum = p.ksum.sum + b * p.ksum.sum_sb + h * p.ksum.sum_sh;
    const int32_t *count = p.ksum.count + b * p.ksum.count_sb + h * p.ksum.count_sh;
    const int64_t j1 = msattn_min64((J + 1) * S, d.NK);
    for (int64_t dd = threadIdx.x; dd < d.D; dd += blockDim.x) {
        double acc = 0.0;
        for (int64_t j = J * S; j < j1; ++j)
            if (count[j] > 0) acc = __dadd_rn(acc, (double)sum[j * d.D + dd]);
        p.csum.sum[b * p.csum.sum_sb + h * p.csum.sum_sh + J * d.D + dd] = __double2float_rn(acc);
    }
    if (threadIdx.x == 0) {
        int64_t n = 0;
        for (int64_t j = J * S; j < j1; ++j) n += count[j];
        p.csum.count[b * p.csum.count_sb + h * p.csum.count_sh + J] = (int32_t)n;
    }
}

// ----------------------------------------------------------------------------------------------
// pass 2 helpers: exact top T of one query region, and the bitonic sort of its winners

/* keys (nc): order keys, nc >= T. Writes the top T (key desc, index asc) to wkey / wc in index order.
 * Every thread must call. */
__device__ static void sel_winners(const uint64_t *keys, int nc, int T, const SelSlot &s, int *hist, int *red,
                                   int *misc) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // radix select, most significant byte first: after the pass at `shift`, prefix holds the top
    // bytes of the T-th largest key and k how many keys with that prefix are still to be taken
    uint64_t prefix = 0, pmask = 0;
    int k = T;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int c = tid; c < nc; c += blockDim.x) {
            const uint64_t key = keys[c];
            if ((key & pmask) == prefix) atomicAdd(&hist[(int)((key >> shift) & 255u)], 1);
        }
        __syncthreads();
        if (warp == 0) {
            // lane L holds digits 255 - 8L - i (i < 8): lanes in descending digit order, so an
            // inclusive scan over lanes counts the keys at or above each lane's digits
            int cnt[8], sum = 0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                cnt[i] = hist[255 - 8 * lane - i];
                sum += cnt[i];
            }
            int incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int n = __shfl_up_sync(MS_FULL_MASK, incl, o);
                if (lane >= o) incl += n;
            }
            // the keys with this prefix number >= k, so some lane reaches k
            const unsigned reach = __ballot_sync(MS_FULL_MASK, incl >= k);
            if (lane == __ffs(reach) - 1) {
                int cum = incl - sum;
                for (int i = 0; i < 8; ++i) {
                    if (cum + cnt[i] >= k) {
                        misc[0] = 255 - 8 * lane - i;
                        misc[1] = k - cum;
                        break;
                    }
                    cum += cnt[i];
                }
            }
        }
        __syncthreads();
        prefix |= (uint64_t)misc[0] << shift;
        pmask |= (uint64_t)0xff << shift;
        k = misc[1];
        /* misc is next written after two more barriers that every thread passes after this read */
    }
    const uint64_t kth = prefix; /* the T-th largest key; take the k lowest-c keys equal to it */

    // the winners, in candidate order (the order only matters for the ties at kth)
    int nwin = 0, neq = 0;
    for (int c0 = 0; c0 < nc; c0 += blockDim.x) {
        const int c = c0 + tid;
        const uint64_t key = c < nc ? keys[c] : 0;
        const int gt = c < nc && key > kth, eq = c < nc && key == kth;
        int teq, twin;
        const int eqrank = neq + ms_block_excl_scan(eq, &teq, red);
        const int take = gt || (eq && eqrank < k);
        const int pos = nwin + ms_block_excl_scan(take, &twin, red);
        if (take) {
            s.wkey[pos] = key;
            s.wc[pos] = c;
        }
        neq += teq;
        nwin += twin;
    }
    __syncthreads(); /* nwin == T */
}

/* keys (nc): order keys of one region's scores, nc >= T. Writes lists[l*ld + r] = the candidate of
 * rank r < T and lowers firstpos of each to its walk position r*nl + l. Every thread must call. */
__device__ static void sel_top_list(const uint64_t *keys, int nc, int T, int ld, int l, int nl, const SelSlot &s,
                                    int *hist, int *red, int *misc) {
    const int tid = threadIdx.x, p2t = (int)sel_pow2_at_least(T);
    sel_winners(keys, nc, T, s, hist, red, misc);
    // pad to a power of two with entries that rank after every real one
    for (int i = T + tid; i < p2t; i += blockDim.x) {
        s.wkey[i] = 0;
        s.wc[i] = INT_MAX;
    }
    __syncthreads();

    // bitonic sort into rank order; each compare-exchange pair belongs to one thread per stage,
    // and __syncthreads orders the global-memory stages within the block
    for (int size = 2; size <= p2t; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < p2t; i += blockDim.x) {
                const int ixj = i ^ stride;
                if (ixj <= i) continue;
                const uint64_t ka = s.wkey[i], kb = s.wkey[ixj];
                const int ca = s.wc[i], cb = s.wc[ixj];
                const bool up = (i & size) == 0;
                if (up ? sel_before(kb, cb, ka, ca) : sel_before(ka, ca, kb, cb)) {
                    s.wkey[i] = kb; s.wkey[ixj] = ka;
                    s.wc[i] = cb; s.wc[ixj] = ca;
                }
            }
            __syncthreads();
        }
    }
    for (int r = tid; r < T; r += blockDim.x) {
        const int c = s.wc[r];
        s.lists[(int64_t)l * ld + r] = c;
        atomicMin(&s.firstpos[c], r * nl + l);
    }
    __syncthreads();
}

// ----------------------------------------------------------------------------------------------
// pass 2 helpers: the screen on tensor cores

/* order-preserving image of a float (0 only for the NaN of all ones bits; below every other float's) */
__device__ __forceinline__ uint32_t sel_fkey(float x) {
    const uint32_t u = __float_as_uint(x);
    return (u >> 31) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float sel_fkey_inv(uint32_t k) {
    return __uint_as_float((k >> 31) ? (k & 0x7fffffffu) : ~k);
}

/* x = hi + lo + r, hi = bf16(x), lo = bf16(x - hi), |r| <= 2^-16 |x| (subnormal parts may flush: qabs) */
__device__ __forceinline__ void sel_split(float x, uint16_t *hi, uint16_t *lo) {
    *hi = ms_to16<true>(x);
    *lo = ms_to16<true>(__fsub_rn(x, ms_from16<true>(*hi)));
}

/* The top T lists (row stride ld) of the ranking regions l0 .. l0 + nr - 1 (nr <= SEL_SR), screened, nc >= T.
 * Every thread must call.
 *  1. Tensor cores score the regions' means against every candidate's sum in bf16x3 (both split into bf16
 *     parts hi + lo; q_hi k_hi + q_lo k_hi + q_hi k_lo, fp32 accumulators), and bound each exact score:
 *     f = acc / count, e = qbound * kscale + qabs / count, exact in [f - e, f + e] (the margin below),
 *     kscale = |sum| / count rounded up (|sum| in double from the same loads as the products).
 *     Upper bounds go to the keys buffer (SEL_SR x NK floats); per region, the largest lower bound of
 *     the candidates c = i (mod T) goes to cls[i] (atomicMax of order images: order-free).
 *  2. lim = the smallest of a region's T class maxima: T distinct candidates have exact scores >= lim,
 *     so a candidate whose upper bound is below lim cannot be in the top T (NaN bounds always survive;
 *     a lower bound that is NaN or +inf bounds nothing and is left out; a class without one gives
 *     lim = -inf: every candidate survives). At least T survive (the class maxima).
 *  3. A warp per region: its survivors, ascending, get exact scores in the CPU's order (lanes 8v + u
 *     hold partial u of survivor v; the shuffles xor 1, 2, 4 are the CPU's tree), and each survivor's
 *     rank is the number of survivors ranking before it; ranks below T are the list. More than
 *     SEL_SURV survivors: the region's bit in *overflow, for exact_rows.
 * The margin. What bf16x3 leaves out (q_lo k_lo and the residuals) is at most 3.1 2^-16 sum |q_i k_i|.
 * Tensor cores add exact products but align and round (or truncate) inside an mma to fp32: each of the
 * m = 3 dp / 16 mma instructions of the chain errs by at most 18 2^-23 of (1.02) sum |q_i k_i| (17
 * addends and the result, an ulp each), the float mean and the division add 4 2^-23. Cauchy-Schwarz:
 * |f - exact| <= gamma |q| |k| / count, gamma = 3.2 2^-16 + (18.4 m + 4) 2^-23 (2^-12.6 at D = 256);
 * qbound = 2 gamma |q| (the 2 covers the rounding of the bound itself). Subnormal parts and results
 * may flush to zero (tensor cores, and --use_fast_math's ftz): at most 2^-126 an element or addition,
 * covered by 2^-100 sqrt(dp) in qbound and qabs = 2^-90 (sqrt(dp) |q| + dp), far above them. */
__device__ static void sel_screen(const SelSlot &s, const double *qbar, const float *ksum, const int32_t *kcount,
                                  int nc, int64_t NK, int D, int d8, int T, int ld, int l0, int nr, int nl,
                                  uint16_t (*q16)[SEL_SR][SEL_QLD], float *qbound, float *qabs, unsigned *overflow) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const int dp = (D + 15) & ~15; /* the products' dims: D rounded up to the mma's 16, zeros past D */

    // the regions' means as bf16 parts (zeros past D and past nr), their margins, empty classes
    for (int e = tid; e < SEL_SR * dp; e += blockDim.x) {
        const int r = e / dp, dd = e % dp;
        const float x = r < nr && dd < D ? __double2float_rn(qbar[(int64_t)s.alist[l0 + r] * D + dd]) : 0.0f;
        sel_split(x, &q16[0][r][dd], &q16[1][r][dd]);
    }
    for (int r = warp; r < nr; r += nw) {
        const double *qr = qbar + (int64_t)s.alist[l0 + r] * D;
        double ss = 0.0;
        for (int dd = lane; dd < D; dd += 32) ss = __fma_rn(qr[dd], qr[dd], ss);
        ss = ms_warp_sum_f64(ss);
        if (lane == 0) {
            const double qn = sqrt(ss), rd = sqrt((double)dp), m = 3.0 * (dp / 16);
            const double gamma = 3.2 * 0x1p-16 + (18.4 * m + 4.0) * 0x1p-23;
            qbound[r] = __double2float_ru(2.0 * (gamma * qn + 0x1p-100 * rd));
            qabs[r] = __double2float_ru(0x1p-90 * (rd * qn + dp));
        }
    }
    for (int e = tid; e < nr * T; e += blockDim.x) s.cls[e] = 0u;
    if (tid == 0) *overflow = 0u;
    __syncthreads();

    // 1. bounds, a warp per tile of 8 candidates: B[k][n] = sum of candidate n0 + n, dim k0 + k
    float *ub = reinterpret_cast<float *>(s.keys); /* (SEL_SR, NK) upper bounds */
    const int g = lane >> 2, t4 = lane & 3;
    for (int n0 = 8 * warp; n0 < nc; n0 += 8 * nw) {
        const bool have = n0 + g < nc;
        const float *kp = have ? ksum + (int64_t)s.cand[n0 + g] * D : nullptr;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        double ss = 0.0; /* this lane's part of |sum|^2 of candidate n0 + g */
        for (int k0 = 0; k0 < dp; k0 += 16) {
            uint32_t bhi[2], blo[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) { /* b[i]: dims k0 + 8i + 2 t4 and the next one */
                const int d0 = k0 + 8 * i + 2 * t4;
                const float x0 = have && d0 < D ? kp[d0] : 0.0f, x1 = have && d0 + 1 < D ? kp[d0 + 1] : 0.0f;
                ss = __fma_rn((double)x0, (double)x0, __fma_rn((double)x1, (double)x1, ss));
                uint16_t h0, lo0, h1, lo1;
                sel_split(x0, &h0, &lo0);
                sel_split(x1, &h1, &lo1);
                bhi[i] = (uint32_t)h0 | ((uint32_t)h1 << 16);
                blo[i] = (uint32_t)lo0 | ((uint32_t)lo1 << 16);
            }
            uint32_t ahi[4], alo[4];
            ms_frag_a(ahi, &q16[0][0][0], SEL_QLD, 0, k0);
            ms_frag_a(alo, &q16[1][0][0], SEL_QLD, 0, k0);
            ms_mma16816<true>(acc, ahi, bhi[0], bhi[1]);
            ms_mma16816<true>(acc, alo, bhi[0], bhi[1]);
            ms_mma16816<true>(acc, ahi, blo[0], blo[1]);
        }
        // candidate n0 + g's scales: its four lanes' parts summed, then the columns' from their lanes
        ss = __dadd_rn(ss, __shfl_xor_sync(MS_FULL_MASK, ss, 1));
        ss = __dadd_rn(ss, __shfl_xor_sync(MS_FULL_MASK, ss, 2));
        const int32_t n = have ? kcount[s.cand[n0 + g]] : 1;
        const float kinv_g = __fdiv_rn(1.0f, (float)n), kscale_g = __double2float_ru(sqrt(ss) / (double)n);
        const float kinv[2] = {__shfl_sync(MS_FULL_MASK, kinv_g, 8 * t4), __shfl_sync(MS_FULL_MASK, kinv_g, 8 * t4 + 4)};
        const float kscale[2] = {__shfl_sync(MS_FULL_MASK, kscale_g, 8 * t4),
                                 __shfl_sync(MS_FULL_MASK, kscale_g, 8 * t4 + 4)};
#pragma unroll
        for (int i = 0; i < 4; ++i) { /* accumulator i: region g + 8 (i / 2), candidate n0 + 2 t4 + i % 2 */
            const int r = g + 8 * (i >> 1), c = n0 + 2 * t4 + (i & 1);
            if (r >= nr || c >= nc) continue;
            const float ki = kinv[i & 1], f = __fmul_rn(acc[i], ki);
            const float e = __fmaf_rn(qbound[r], kscale[i & 1], __fmul_rn(qabs[r], ki));
            const float down = __fsub_rn(f, e);
            ub[r * NK + c] = __fadd_rn(f, e);
            if (down < INFINITY) atomicMax(&s.cls[r * T + c % T], sel_fkey(down)); /* false for NaN */
        }
    }
    __syncthreads();

    // 2, 3. a warp per region: its limit, survivors, exact scores and ranks
    const uint32_t below = (1u << lane) - 1u; /* the lanes before this one */
    int32_t *sid = s.sid + warp * SEL_SURV;
    uint64_t *skey = s.skey + warp * SEL_SURV;
    for (int r = warp; r < nr; r += nw) {
        const int l = l0 + r;
        uint32_t m = UINT32_MAX;
        for (int i = lane; i < T; i += 32) m = min(m, s.cls[r * T + i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = min(m, __shfl_xor_sync(MS_FULL_MASK, m, o));
        const float lim = m == 0u ? -INFINITY : sel_fkey_inv(m);
        int ns = 0;
        for (int c0 = 0; c0 < nc; c0 += 32) {
            const int c = c0 + lane;
            const bool keep = c < nc && !(ub[r * NK + c] < lim); /* NaN survives */
            const uint32_t bal = __ballot_sync(MS_FULL_MASK, keep);
            const int pos = ns + __popc(bal & below);
            if (keep && pos < SEL_SURV) sid[pos] = c;
            ns += __popc(bal);
        }
        if (ns > SEL_SURV) { /* warp-uniform */
            if (lane == 0) atomicOr(overflow, 1u << r);
            continue;
        }
        __syncwarp();
        const double *qr = qbar + (int64_t)s.alist[l] * D;
        for (int i0 = 0; i0 < ns; i0 += 4) {
            const int i = i0 + (lane >> 3), u = lane & 7;
            double part = 0.0;
            int32_t j = 0;
            if (i < ns) {
                j = s.cand[sid[i]];
                const float *kp = ksum + (int64_t)j * D;
                for (int dd = u; dd < d8; dd += 8)
                    part = __fma_rn(dd < D ? qr[dd] : 0.0, dd < D ? (double)kp[dd] : 0.0, part);
            }
            part = __dadd_rn(part, __shfl_xor_sync(MS_FULL_MASK, part, 1));
            part = __dadd_rn(part, __shfl_xor_sync(MS_FULL_MASK, part, 2));
            part = __dadd_rn(part, __shfl_xor_sync(MS_FULL_MASK, part, 4));
            if (i < ns && u == 0) skey[i] = sel_order_key(__ddiv_rn(part, (double)kcount[j]));
        }
        __syncwarp();
        for (int i = lane; i < ns; i += 32) {
            const uint64_t ki = skey[i];
            int rank = 0;
            for (int x = 0; x < ns && rank < T; ++x) { /* ascending candidates: x < i is the lower region */
                const uint64_t kx = skey[x];
                rank += kx > ki || (kx == ki && x < i);
            }
            if (rank < T) {
                const int c = sid[i];
                s.lists[(int64_t)l * ld + rank] = c;
                atomicMin(&s.firstpos[c], rank * nl + l);
            }
        }
        __syncwarp(); /* the next region reuses sid and skey */
    }
    __syncthreads();
}

// ----------------------------------------------------------------------------------------------
// pass 2: selection, SEL_THREADS threads, one (b, h, g) item at a time per block

/* grid: p.cuda_slots blocks, block i striding over the B * Hkv * G items with workspace slot i.
 * index (B, Hkv, G, T) written; ksum float32 (B, Hkv, >=NK, D), kcount (B, Hkv, >=NK), qbar (B, Hkv, NA, D),
 * qcount (B, Hkv, NA) read */
__global__ void __launch_bounds__(SEL_THREADS, 1) ms_select_kernel(const msattn_select_params p, size_t slot_bytes) {
    __shared__ double qs[SEL_QR][SEL_DMAX];       /* qbar of the regions being scored */
    __shared__ double kt[SEL_CT][SEL_DC + 1];     /* key sums of a candidate tile (widened exactly); +1: lanes
                                                     hit distinct banks */
    __shared__ int hist[256];
    __shared__ int red[33];
    __shared__ int misc[4];
    __shared__ int rows[SEL_QR];                      /* the regions (list indices) exact_rows scores */
    __shared__ __align__(16) uint16_t q16[2][SEL_SR][SEL_QLD]; /* the screen's means as bf16 parts (hi, lo) */
    __shared__ float qbound[SEL_SR], qabs[SEL_SR];   /* ... and their margins */
    __shared__ unsigned overflow[1];                 /* ... and its regions with too many survivors */
    const SelDims d = sel_dims(p);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int T = (int)d.T;
    const SelSlot s = sel_slot(d, (char *)p.cuda_scratch + (size_t)blockIdx.x * slot_bytes);
    const int64_t items = d.BH * d.G;

    for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
        __syncthreads(); /* the previous item is done with the workspace */
        // later groups have more candidates: start them first (the CPU's order)
        const int64_t item = (d.G - 1 - w / d.BH) + d.G * (w % d.BH);
        const int64_t gi = item % d.G, bh = item / d.G, ga = d.g0 + gi, b = bh / p.Hkv, h = bh % p.Hkv;
        int32_t *out = p.index + item * d.T;
        const int32_t *kcount = p.ksum.count + b * p.ksum.count_sb + h * p.ksum.count_sh;
        const float *ksum = p.ksum.sum + b * p.ksum.sum_sb + h * p.ksum.sum_sh;

        /* the group's candidates among the regions region(x), x < n ascending, into s.cand (in that order);
           returns their number. Every thread must call. */
        auto gather = [&](int64_t n, auto region) {
            int m = 0;
            for (int64_t x0 = 0; x0 < n; x0 += blockDim.x) {
                const int64_t x = x0 + tid, j = x < n ? region(x) : d.NK;
                const int flag = j < d.NK && kcount[j] > 0 &&
                                 msattn_is_candidate(j, ga, d.span, p.block_k, d.N, p.causal);
                int total;
                const int pos = ms_block_excl_scan(flag, &total, red);
                if (flag) s.cand[m + pos] = (int32_t)j;
                m += total;
            }
            __syncthreads();
            return m;
        };

        // 1. candidates, ascending
        int nc = gather(d.NK, [](int64_t x) { return x; });
        if (nc <= T) { /* few enough: take them all (dense) */
            for (int i = tid; i < T; i += blockDim.x) out[i] = i < nc ? s.cand[i] : -1;
            continue;
        }

        // 2. the query regions of the group that rank: those holding a valid query of the call
        const int64_t abeg = msattn_max64(ga * p.merge, d.a0), aend = msattn_min64((ga + 1) * p.merge, d.a0 + d.NA);
        int nl = 0;
        for (int64_t x0 = abeg; x0 < aend; x0 += blockDim.x) {
            const int64_t a = x0 + tid;
            const int flag = a < aend && p.qcount[bh * d.NA + (a - d.a0)] > 0;
            int total;
            const int pos = ms_block_excl_scan(flag, &total, red);
            if (flag) s.alist[nl + pos] = (int32_t)(a - d.a0);
            nl += total;
        }
        if (nl == 0) { /* no valid query in the group: nothing ranks, nothing is selected */
            for (int i = tid; i < T; i += blockDim.x) out[i] = -1;
            continue;
        }
        const int d8 = ((int)d.D + 7) & ~7; /* D rounded up to the eight partials; dims D..d8-1 are zeros */
        const double *qbar = p.qbar + bh * d.NA * d.D;

        /* exact scores of qs rows [0, nr) (staged by the caller, zeros from D to d8; a warp each) against
           the sums of list[0..n), into rows [0, nr) of the keys. Every thread must call. */
        auto score_rows = [&](int nr, const float *sums, const int32_t *counts, const int32_t *list, int n) {
            const bool scoring = warp < nr; /* warp-uniform */
            for (int c0 = 0; c0 < n; c0 += SEL_CT) {
                // the CPU's score_block: eight partials (dim d into partial d % 8), then a fixed tree
                double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
                for (int d0 = 0; d0 < d8; d0 += SEL_DC) {
                    __syncthreads(); /* the previous chunk is consumed (and qs is staged) */
                    for (int e = tid; e < SEL_CT * SEL_DC; e += blockDim.x) {
                        const int r = e / SEL_DC, dd = e % SEL_DC, c = c0 + r;
                        kt[r][dd] = c < n && d0 + dd < d.D ? (double)sums[(int64_t)list[c] * d.D + d0 + dd] : 0.0;
                    }
                    __syncthreads();
                    if (scoring) {
                        /* d0 and SEL_DC are multiples of 8: dim d0 + dd + u goes to partial u; indices known at
                           compile time keep part[] in registers */
                        const int dend = (int)msattn_min64(SEL_DC, d8 - d0);
#pragma unroll 1
                        for (int dd = 0; dd < dend; dd += 8) {
#pragma unroll
                            for (int u = 0; u < 8; ++u)
                                part[u] = __fma_rn(qs[warp][d0 + dd + u], kt[lane][dd + u], part[u]);
                        }
                    }
                }
                const int c = c0 + lane;
                if (scoring && c < n) {
                    const double dot = __dadd_rn(__dadd_rn(__dadd_rn(part[0], part[1]), __dadd_rn(part[2], part[3])),
                                                 __dadd_rn(__dadd_rn(part[4], part[5]), __dadd_rn(part[6], part[7])));
                    s.keys[(int64_t)warp * d.NK + c] = sel_order_key(__ddiv_rn(dot, (double)counts[list[c]]));
                }
            }
            __syncthreads();
        };

        // 2b. multi-scale: the group ranks the coarse regions holding one of its candidates by its mean
        // query (its ranking regions' means added in order, / nl), keeps the best coarse_topk, and its
        // regions rank only the candidates inside them: TL = min(T, their number) a list
        int TL = T;
        if (p.coarse_regions > 0) {
            const int64_t S = p.coarse_regions, limit = p.causal ? ga * d.span / p.block_k : d.NK;
            const msattn_range own = msattn_group_own_regions(ga, d.span, p.block_k, d.N);
            const float *csum = p.csum.sum + b * p.csum.sum_sb + h * p.csum.sum_sh;
            const int32_t *ccount = p.csum.count + b * p.csum.count_sb + h * p.csum.count_sh;
            for (int dd = tid; dd < d8; dd += blockDim.x) {
                double acc = 0.0;
                for (int i = 0; i < nl && dd < d.D; ++i) acc = __dadd_rn(acc, qbar[(int64_t)s.alist[i] * d.D + dd]);
                qs[0][dd] = dd < d.D ? __ddiv_rn(acc, (double)nl) : 0.0;
            }
            int ncc = 0;
            for (int64_t J0 = 0; J0 < d.NC; J0 += blockDim.x) {
                const int64_t J = J0 + tid, lo = J * S, hi = msattn_min64(lo + S, d.NK);
                int holds = 0;
                if (J < d.NC && lo < limit) {
                    if (hi <= limit && (p.causal || hi <= own.begin || lo >= own.end)) {
                        holds = ccount[J] > 0; /* every region of J is a candidate position */
                    } else {
                        for (int64_t j = lo; j < hi && !holds; ++j)
                            holds = kcount[j] > 0 && msattn_is_candidate(j, ga, d.span, p.block_k, d.N, p.causal);
                    }
                }
                int total;
                const int pos = ms_block_excl_scan(holds, &total, red);
                if (holds) s.ccand[ncc + pos] = (int32_t)J;
                ncc += total;
            }
            __syncthreads();
            const int ct = (int)msattn_min64(p.coarse_topk, ncc);
            const int32_t *kept = s.ccand; /* ascending */
            if (ncc > ct) {
                score_rows(1, csum, ccount, s.ccand, ncc);
                sel_winners(s.keys, ncc, ct, s, hist, red, misc); /* wc: the winners' indices, ascending */
                for (int i = tid; i < ct; i += blockDim.x) s.wc[i] = s.ccand[s.wc[i]];
                __syncthreads();
                kept = s.wc;
            }
            nc = gather((int64_t)ct * S, [&](int64_t x) { return (int64_t)kept[x / S] * S + x % S; });
            TL = (int)msattn_min64(T, nc);
        }

        // the local regions (msattn_local_regions) come before the walk: walk position -1 (multi-scale:
        // those among the ranked candidates; step 5 adds every valid one)
        const msattn_range loc = msattn_local_regions(ga, d.span, p.block_k, p.local);
        int nloc = 0;
        for (int64_t j = loc.begin; j < loc.end; ++j) nloc += kcount[j] > 0;
        for (int c = tid; c < nc; c += blockDim.x)
            s.firstpos[c] = s.cand[c] >= loc.begin && s.cand[c] < loc.end ? -1 : INT_MAX;
        __syncthreads();

        // 3. each ranking region's top TL: screened on tensor cores SEL_SR regions at a time where
        // enough regions rank (survivors scored exactly), else every candidate scored exactly

        /* the exact way for the regions rows[0..nr) (list indices, nr <= SEL_QR). Every thread must call. */
        auto exact_rows = [&](const int *rows, int nr) {
            for (int e = tid; e < SEL_QR * d8; e += blockDim.x) { /* zero from D to d8: the padding */
                const int r = e / d8, dd = e % d8;
                qs[r][dd] = r < nr && dd < d.D ? qbar[(int64_t)s.alist[rows[r]] * d.D + dd] : 0.0;
            }
            score_rows(nr, ksum, kcount, s.cand, nc);
            for (int r = 0; r < nr; ++r)
                sel_top_list(s.keys + (int64_t)r * d.NK, nc, TL, T, rows[r], nl, s, hist, red, misc);
        };

        if (TL == 0) {
            /* multi-scale left no candidate: every list empty */
        } else if (nl < SEL_SCREEN_MIN || TL > SEL_SCREEN_TMAX) {
            for (int l0 = 0; l0 < nl; l0 += SEL_QR) {
                const int nr = (int)msattn_min64(SEL_QR, nl - l0);
                if (tid < SEL_QR) rows[tid] = l0 + tid;
                __syncthreads();
                exact_rows(rows, nr);
            }
        } else {
            for (int l0 = 0; l0 < nl; l0 += SEL_SR) {
                const int nr = (int)msattn_min64(SEL_SR, nl - l0);
                sel_screen(s, qbar, ksum, kcount, nc, d.NK, (int)d.D, d8, TL, T, l0, nr, nl, q16, qbound, qabs,
                           overflow);
                // regions with more survivors than a warp ranks: every candidate scored exactly (rare:
                // near-ties by the thousand)
                unsigned ov = *overflow; /* sel_screen ends with a barrier */
                __syncthreads();         /* ... and the next one resets it */
                while (ov != 0u) {
                    int nr2 = 0;
                    for (; ov != 0u && nr2 < SEL_QR; ++nr2, ov &= ov - 1u)
                        if (tid == 0) rows[nr2] = l0 + __ffs((int)ov) - 1;
                    __syncthreads();
                    exact_rows(rows, nr2);
                }
            }
        }
        for (int64_t e = tid; e < (int64_t)nl * (T - TL); e += blockDim.x) /* short lists end in -1 */
            s.lists[(e / (T - TL)) * T + TL + e % (T - TL)] = -1;
        __syncthreads();

        // 4. the walk position where the (T - nloc)-th distinct region not local appears (-1: none
        // needed, the local regions fill the set)
        const int need = T - nloc;
        if (tid == 0) misc[2] = need == 0 ? -1 : INT_MAX;
        __syncthreads();
        const int64_t npos = (int64_t)nl * T;
        int taken = 0;
        for (int64_t x0 = 0; x0 < npos && taken < need; x0 += blockDim.x) {
            const int64_t x = x0 + tid;
            int fresh = 0;
            if (x < npos) {
                const int64_t r = x / nl, l = x % nl;
                const int c = s.lists[l * T + r]; /* -1: past a short list's end */
                fresh = c >= 0 && s.firstpos[c] == (int)x;
            }
            int total;
            const int before = ms_block_excl_scan(fresh, &total, red);
            if (fresh && taken + before + 1 == need) misc[2] = (int)x;
            taken += total;
        }
        __syncthreads();
        const int pT = misc[2];

        // 5. the chosen regions, ascending: the ranked candidates the walk reached before pT, with the
        // valid local regions (which multi-scale may not have among its candidates) in their place
        int n = 0, below = 0; /* chosen ranked candidates; those below the local regions */
        for (int c0 = 0; c0 < nc; c0 += blockDim.x) {
            const int c = c0 + tid;
            const int flag = c < nc && s.firstpos[c] != INT_MAX && s.firstpos[c] <= pT &&
                             !(s.cand[c] >= loc.begin && s.cand[c] < loc.end);
            below += ms_block_sum_int(flag && s.cand[c] < loc.begin, red);
            int total;
            const int pos = ms_block_excl_scan(flag, &total, red);
            if (flag) out[n + pos + (s.cand[c] >= loc.end ? nloc : 0)] = s.cand[c];
            n += total;
        }
        if (tid == 0)
            for (int64_t j = loc.begin, i = below; j < loc.end; ++j)
                if (kcount[j] > 0) out[i++] = (int32_t)j;
        for (int i = n + nloc + tid; i < T; i += blockDim.x) out[i] = -1;
    }
}

// ----------------------------------------------------------------------------------------------
// launchers

size_t msattn_select_cuda_slot_bytes(const msattn_select_params *p) {
    const SelDims d = sel_dims(*p);
    size_t off[SEL_PIECES];
    return sel_layout(d, off);
}

int msattn_region_means_cuda(const msattn_select_params *p, void *stream) {
    if (p->D < 1 || p->D > SEL_DMAX || p->Hkv < 1 || p->Hq % p->Hkv != 0) return MSATTN_ERR_ARG;
    const SelDims d = sel_dims(*p);
    const int64_t blocks = d.BH * (p->sums_given ? d.NA : d.NK + d.NA);
    if (blocks == 0) return MSATTN_OK;
    if (blocks > INT_MAX) return MSATTN_ERR_ARG;
    const int threads = (int)msattn_min64(256, ms_round_up(d.D, 32));
    ms_region_means_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(*p);
    return ms_launch_status();
}

int msattn_region_sums_append_cuda(msattn_region_sums s, msattn_view k, msattn_dtype dtype, const uint8_t *mask,
                                   int64_t mask_sb, int B, int Hkv, int D, int block_k, int64_t t0, int64_t t1,
                                   void *stream) {
    if (D < 1 || D > SEL_DMAX || Hkv < 1 || block_k < 1 || t0 < 0 || t1 < t0) return MSATTN_ERR_ARG;
    if (t1 == t0 || B == 0) return MSATTN_OK;
    const int64_t j0 = t0 / block_k, nr = (t1 - 1) / block_k - j0 + 1, blocks = (int64_t)B * Hkv * nr;
    if (blocks > INT_MAX) return MSATTN_ERR_ARG;
    const int threads = (int)msattn_min64(256, ms_round_up(D, 32));
    ms_region_sums_append_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(
        s, k, dtype, mask, mask_sb, Hkv, D, block_k, t0, t1, j0, nr);
    return ms_launch_status();
}

int msattn_coarse_sums_cuda(const msattn_select_params *p, void *stream) {
    if (p->D < 1 || p->Hkv < 1 || p->coarse_regions < 1) return MSATTN_ERR_ARG;
    const SelDims d = sel_dims(*p);
    const int64_t blocks = d.BH * d.NC;
    if (blocks == 0) return MSATTN_OK;
    if (blocks > INT_MAX) return MSATTN_ERR_ARG;
    const int threads = (int)msattn_min64(256, ms_round_up(d.D, 32));
    ms_coarse_sums_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(*p);
    return ms_launch_status();
}

int msattn_select_cuda(const msattn_select_params *p, void *stream) {
    if (p->D < 1 || p->D > SEL_DMAX || p->Hkv < 1 || p->Hq % p->Hkv != 0 || p->topk < 1 || p->local < 0 ||
        p->local > p->topk)
        return MSATTN_ERR_ARG;
    const SelDims d = sel_dims(*p);
    if (d.BH * d.G == 0) return MSATTN_OK;
    /* walk positions r*nl + l and candidate indices are int; sizes beyond that are unsupported */
    if ((int64_t)p->merge * p->topk >= INT_MAX || d.NK >= INT_MAX || sel_pow2_at_least(d.T) >= INT_MAX)
        return MSATTN_ERR_ARG;
    if (p->cuda_scratch == nullptr || p->cuda_slots < 1) return MSATTN_ERR_NOMEM;
    ms_select_kernel<<<(unsigned)p->cuda_slots, SEL_THREADS, 0, (cudaStream_t)stream>>>(
        *p, msattn_select_cuda_slot_bytes(p));
    return ms_launch_status();
}
