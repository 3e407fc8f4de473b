/*
 * ms_attention.cu -- MS attention forward and backward on the GPU (DESIGN section 1, steps 6-7),
 * the CUDA twin of csrc/cpu/ms_attention.c: same params, same semantics.
 *
 * Contract. Each launcher takes device pointers in the params, launches on `stream` over all its
 * items and returns at once: MSATTN_OK, an error code with nothing launched (MSATTN_ERR_DTYPE for
 * float64, MSATTN_ERR_ARG for sizes beyond the kernels: head dim > 256, a shared-memory need above
 * what the device allows, a grid above 2^31 - 1 blocks), or MSATTN_ERR_CUDA when the launch failed.
 *   msattn_ms_fwd_cuda      out (B, Hq, Nq, D), lse (B, Hq, Nq) float32
 *   msattn_ms_invert_cuda   inv_offsets (B, Hkv, NK + 1), inv_groups (B, Hkv, G * T): for each key
 *                           region the groups that selected it, ascending (CSR)
 *   msattn_ms_bwd_dq_cuda   pass 1: delta (B, Hq, Nq) = rowsum(dout * out) - dlse, and dq
 *   msattn_ms_bwd_dkv_cuda  pass 2: dk, dv of every key (zeros for keys no query sees); needs pass 1's
 *                           delta and the inverted index in p->inv_offsets / p->inv_groups
 * A query with no visible key gets output 0 and lse -inf; the backward treats lse -inf as "no
 * keys". NaN inputs give NaN outputs, as on the CPU.
 *
 * Work items. Forward and pass 1: one block per (b, query head, BQ-query tile of a group). The key
 * list of a group is virtual: "slot" s < n_sel*CK is token s % CK of the (s / CK)-th selected
 * region, slot n_sel*CK + u is own token s_g + u; its compact RoPE position is the slot number
 * (msattn_compact_selected / msattn_compact_own). Tiles of BK slots are staged in shared memory
 * (fp32, rotated for rope="selected"); invalid slots (padding, past N, past the causal limit) are
 * masked to -inf rather than compacted, which changes only the fp32 summation grouping against the
 * CPU. Pass 2: one block per (b, KV head, tile of up to 32 keys inside one key region). It walks the
 * region's readers in ascending group order -- the groups that selected it (inverted index) merged
 * with the group that owns it -- and, per group, its query heads and query tiles in order; each
 * key's dK/dV accumulate in registers of one thread, so no atomics and the same sums in the same
 * order on every run: deterministic. dK of a group is rotated back to the key's frame (RoPE with
 * that group's compact position) before it joins the total.
 *
 * Arithmetic: fp32 in registers for every input dtype (16-bit inputs are widened on load, results
 * rounded to nearest even on store), scores in the log2 domain (s * scale * log2 e, exp2), warp
 * butterflies for row max/sum, a double for the final lse. 16-bit inputs with D in {16, 32, 64, 128}
 * run on tensor cores, forward and both backward passes (ms_*_tc_kernel: mma.sync m16n8k16 with fp32
 * accumulators, a KV head's query heads in one block, the same work items and summation order on
 * every run); everything else (fp32, other head dims) runs the FMA loops over fp32 shared-memory
 * tiles below.
 *
 * Validity. The kernels trust the index to come from ms_select (ascending candidates, -1 padded)
 * but stay inside their buffers for any int32 content: entries outside [0, NK) end a row, group
 * numbers outside [0, G) are skipped.
 *
 * Legend: B batch, Hq/Hkv heads, hg = Hq/Hkv, N keys, Nq queries (the last Nq positions), D head
 * dim, DS = D rounded up to 4 (float4 rows), KS = DS + 4 (padded rows read one per lane),
 * DL = ceil(D / 32) dims per lane, CK block_k, T topk, span = merge * block_q tokens per group,
 * G groups of the call (g0 the first; gi index, ga = g0 + gi absolute), NK key regions,
 * n_sel selected regions of a group, BQ/BK query/key tile, KT keys of a pass-2 block.
 */
#include <limits.h>

#include "common.cuh"

#define MS_BQ 32     /* queries per forward / pass-1 block */
#define MS_BK 32     /* key slots per staged tile: one per lane */
#define MS_WARPS 4   /* warps of a forward / pass-1 block */
#define MS_RPW 8     /* query rows per warp: MS_BQ / MS_WARPS */
#define MS_KPW 4     /* keys per warp in pass 2 */
#define MS_DMAX 256  /* largest head dim (the glue checks D <= 256) */

// ----------------------------------------------------------------------------------------------
// dimensions, the group's key slots, and tile staging

struct MsDims {
    int64_t N, Nq, D, T, hg, span, NK, G, g0, BH;
    int CK, DS, KS;
    float c; /* scale * log2(e) */
};

__host__ __device__ static inline MsDims ms_dims(const msattn_ms_params &p) {
    MsDims d;
    d.N = p.N; d.Nq = p.Nq; d.D = p.D; d.T = p.topk; d.hg = p.Hq / p.Hkv;
    d.span = msattn_span(p.block_q, p.merge);
    d.NK = msattn_num_key_regions(p.N, p.block_k);
    d.G = msattn_num_groups(p.N, p.Nq, d.span);
    d.g0 = msattn_first_group(p.N, p.Nq, d.span);
    d.BH = (int64_t)p.B * p.Hkv;
    d.CK = p.block_k;
    d.DS = (p.D + 3) / 4 * 4;
    d.KS = d.DS + 4;
    d.c = (float)(p.scale * MS_LOG2E);
    return d;
}

/* the length of the valid prefix of a selection row: entries outside [0, NK) end it */
__device__ static int ms_count_selected(const int32_t *sel, int64_t T, int64_t NK, int *red) {
    int first = (int)T;
    for (int64_t i = threadIdx.x; i < T; i += blockDim.x)
        if (sel[i] < 0 || sel[i] >= NK) first = min(first, (int)i);
    return ms_block_min_int(first, red);
}

/* rank of region j in a selection row's valid prefix, -1 if absent */
__device__ static int ms_find_rank(const int32_t *sel, int n_sel, int64_t j, int *red) {
    int first = INT_MAX;
    for (int i = threadIdx.x; i < n_sel; i += blockDim.x)
        if (sel[i] == j) first = min(first, i);
    first = ms_block_min_int(first, red);
    return first == INT_MAX ? -1 : first;
}

/* the key slots of a group (see the file comment) */
struct MsGroupKeys {
    const int32_t *sel; /* (T) the group's selection row */
    int64_t ga, n_sel, lsel, kend;
    msattn_range own;
};

/* slot s of group gk: its absolute position (-1: padded or past N) and compact RoPE position */
__device__ __forceinline__ void ms_slot(const msattn_ms_params &p, const MsDims &d, const MsGroupKeys &gk, int64_t b,
                                        int64_t s, int *pos, int *comp) {
    int64_t t = -1, cp;
    if (s < gk.lsel) {
        const int64_t i = s / d.CK, u = s % d.CK;
        const msattn_range reg = msattn_key_region(gk.sel[i], d.CK, d.N);
        if (reg.begin + u < reg.end) t = reg.begin + u;
        cp = msattn_compact_selected(i, u, d.CK);
    } else {
        t = gk.own.begin + (s - gk.lsel);
        cp = msattn_compact_own(gk.n_sel, d.CK, t, gk.ga, d.span);
    }
    if (t >= 0 && !ms_key_valid(p.key_mask, p.mask_sb, b, t)) t = -1;
    *pos = (int)t;
    *comp = t >= 0 && p.rope.cos != nullptr && cp < p.rope.len ? (int)cp : -1;
}

/* dst (rows, ld) = rows of view v at (b, h, first + r), r < nvalid, as fp32; rows >= nvalid and
 * dims >= D are 0 */
__device__ __forceinline__ void ms_stage_rows(float *dst, int ld, int rows, const msattn_view &v, msattn_dtype dt,
                                              int64_t b, int64_t h, int64_t first, int nvalid, int64_t D) {
    for (int e = threadIdx.x; e < rows * ld; e += blockDim.x) {
        const int r = e / ld, dd = e % ld;
        dst[e] = r < nvalid && dd < D ? ms_load(v.data, ms_off(v, b, h, first + r, dd), dt) : 0.0f;
    }
}

/* dst (rows, ld) = rows of view v at the positions pos[r] (-1: a zero row) */
__device__ __forceinline__ void ms_stage_keys(float *dst, int ld, int rows, const msattn_view &v, msattn_dtype dt,
                                              int64_t b, int64_t h, const int *pos, int64_t D) {
    for (int e = threadIdx.x; e < rows * ld; e += blockDim.x) {
        const int r = e / ld, dd = e % ld;
        dst[e] = pos[r] >= 0 && dd < D ? ms_load(v.data, ms_off(v, b, h, pos[r], dd), dt) : 0.0f;
    }
}

/* dot of two shared rows of DS floats, 16-byte aligned */
__device__ __forceinline__ float ms_dot4(const float *x, const float *y, int DS) {
    const float4 *x4 = reinterpret_cast<const float4 *>(x), *y4 = reinterpret_cast<const float4 *>(y);
    float acc = 0.0f;
    for (int i = 0; i < DS / 4; ++i) {
        const float4 a = x4[i], b = y4[i];
        acc = fmaf(a.x, b.x, acc);
        acc = fmaf(a.y, b.y, acc);
        acc = fmaf(a.z, b.z, acc);
        acc = fmaf(a.w, b.w, acc);
    }
    return acc;
}

/* the (b, hq, query tile, group) of a forward / pass-1 block, heaviest (last) groups first */
struct MsQueryItem {
    int64_t b, hq, h, gi, i0;
    int nq;
};

__device__ static inline bool ms_query_item(const msattn_ms_params &p, const MsDims &d, MsQueryItem *it) {
    const int64_t tpg = msattn_cdiv(d.span, MS_BQ), bhq = (int64_t)p.B * p.Hq;
    int64_t x = blockIdx.x;
    const int64_t tile = x % tpg;
    x /= tpg;
    it->b = (x % bhq) / p.Hq;
    it->hq = (x % bhq) % p.Hq;
    it->h = it->hq / d.hg;
    it->gi = d.G - 1 - x / bhq;
    const msattn_range qr = msattn_group_queries(d.g0 + it->gi, d.span, d.N, d.Nq);
    it->i0 = qr.begin + tile * MS_BQ;
    it->nq = (int)msattn_min64(MS_BQ, qr.end - it->i0);
    return it->i0 < qr.end;
}

/* the key slots a query tile [i0, i0 + nq) of group gi can see: causal stops after its last query */
__device__ static inline MsGroupKeys ms_group_keys(const msattn_ms_params &p, const MsDims &d, int64_t bh, int64_t gi,
                                                   int64_t qlast, int *red) {
    MsGroupKeys gk;
    gk.sel = p.index + (bh * d.G + gi) * d.T;
    gk.ga = d.g0 + gi;
    gk.n_sel = ms_count_selected(gk.sel, d.T, d.NK, red);
    gk.lsel = gk.n_sel * d.CK;
    gk.own = msattn_group_own_keys(gk.ga, d.span, d.N);
    const int64_t own_end = p.causal ? msattn_min64(gk.own.end, qlast + 1) : gk.own.end;
    gk.kend = gk.lsel + msattn_max64(0, own_end - gk.own.begin);
    return gk;
}

static inline int ms_dl_of(int D) { return D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : 8; }

// ----------------------------------------------------------------------------------------------
// forward: block (b, hq, query tile of a group), MS_WARPS warps of MS_RPW query rows; a lane
// holds one key of the tile for the scores and dims lane + 32 i of the output rows

/* shared: Qs (BQ, DS) | Ks (BK, KS) | Vs (BK, KS) floats | kpos, kcomp (BK) | qcomp (BQ) | red (33) */
static size_t ms_fwd_smem(const MsDims &d) {
    return (size_t)(MS_BQ * d.DS + 2 * MS_BK * d.KS) * 4 + (size_t)(2 * MS_BK + MS_BQ + 33) * 4;
}

/* q (B, Hq, Nq, D), k/v (B, Hkv, N, D), index (B, Hkv, G, T) read; out (B, Hq, Nq, D),
 * lse (B, Hq, Nq) float32 written. grid: B * Hq * G * ceil(span / BQ) blocks of 128 threads */
template <int DL>
__global__ void __launch_bounds__(MS_WARPS * 32, 1) ms_fwd_kernel(const msattn_ms_params p) {
    extern __shared__ float4 ms_smem4[];
    const MsDims d = ms_dims(p);
    float *Qs = reinterpret_cast<float *>(ms_smem4);
    float *Ks = Qs + MS_BQ * d.DS, *Vs = Ks + MS_BK * d.KS;
    int *kpos = reinterpret_cast<int *>(Vs + MS_BK * d.KS), *kcomp = kpos + MS_BK, *qcomp = kcomp + MS_BK;
    int *red = qcomp + MS_BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, row0 = warp * MS_RPW;

    MsQueryItem it;
    if (!ms_query_item(p, d, &it)) return; /* block-uniform: past the group's last query */
    const int64_t b = it.b, h = it.h, hq = it.hq, i0 = it.i0, bh = b * p.Hkv + h;
    const MsGroupKeys gk = ms_group_keys(p, d, bh, it.gi, i0 + it.nq - 1, red);
    const bool rope = p.rope.cos != nullptr;

    // the tile's queries, rotated to the group's compact positions for rope="selected"
    ms_stage_rows(Qs, d.DS, MS_BQ, p.q, p.dtype, b, hq, i0 - (d.N - d.Nq), it.nq, d.D);
    for (int r = tid; r < MS_BQ; r += blockDim.x) {
        const int64_t cp = msattn_compact_own(gk.n_sel, d.CK, i0 + r, gk.ga, d.span);
        qcomp[r] = rope && r < it.nq && cp < p.rope.len ? (int)cp : -1;
    }
    __syncthreads();
    if (rope) {
        ms_rope_tile(Qs, d.DS, MS_BQ, qcomp, p.rope, 1.0f);
        __syncthreads();
    }

    float m[MS_RPW], l[MS_RPW], o[MS_RPW][DL];
#pragma unroll
    for (int r = 0; r < MS_RPW; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) o[r][i] = 0.0f;
    }

    for (int64_t t0 = 0; t0 < gk.kend; t0 += MS_BK) {
        if (tid < MS_BK) {
            int pos = -1, comp = -1;
            if (t0 + tid < gk.kend) ms_slot(p, d, gk, b, t0 + tid, &pos, &comp);
            kpos[tid] = pos;
            kcomp[tid] = comp;
        }
        __syncthreads();
        ms_stage_keys(Ks, d.KS, MS_BK, p.k, p.dtype, b, h, kpos, d.D);
        ms_stage_keys(Vs, d.KS, MS_BK, p.v, p.dtype, b, h, kpos, d.D);
        __syncthreads();
        if (rope) {
            ms_rope_tile(Ks, d.KS, MS_BK, kcomp, p.rope, 1.0f);
            __syncthreads();
        }

        // scores of this lane's key against the warp's rows, and the online-softmax update
        const int kp = kpos[lane];
        float pr[MS_RPW];
#pragma unroll
        for (int r = 0; r < MS_RPW; ++r) {
            const int row = row0 + r;
            const bool vis = kp >= 0 && row < it.nq && (!p.causal || kp <= i0 + row);
            const float s = vis ? ms_dot4(Qs + row * d.DS, Ks + lane * d.KS, d.DS) * d.c : -INFINITY;
            const float mnew = fmaxf(m[r], ms_warp_max(s));
            float alpha;
            if (mnew == -INFINITY) { /* nothing visible yet: keep NaN scores as NaN, else 0 */
                pr[r] = s != s ? s : 0.0f;
                alpha = 1.0f;
            } else {
                pr[r] = exp2f(s - mnew);
                alpha = exp2f(m[r] - mnew);
            }
            l[r] = l[r] * alpha + ms_warp_sum(pr[r]);
            m[r] = mnew;
#pragma unroll
            for (int i = 0; i < DL; ++i) o[r][i] *= alpha;
        }
        // o += P V: each V row is read once per lane and serves all the warp's rows
        for (int kk = 0; kk < MS_BK; ++kk) {
            float vv[DL];
#pragma unroll
            for (int i = 0; i < DL; ++i) {
                const int dd = lane + 32 * i;
                vv[i] = dd < d.D ? Vs[kk * d.KS + dd] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < MS_RPW; ++r) {
                const float pk = __shfl_sync(MS_FULL_MASK, pr[r], kk);
#pragma unroll
                for (int i = 0; i < DL; ++i) o[r][i] = fmaf(pk, vv[i], o[r][i]);
            }
        }
        __syncthreads(); /* before the next tile overwrites Ks, Vs, kpos */
    }

    float *lse = static_cast<float *>(p.lse);
#pragma unroll
    for (int r = 0; r < MS_RPW; ++r) {
        const int row = row0 + r;
        if (row >= it.nq) continue;
        const int64_t i = i0 + row - (d.N - d.Nq);
        float scale_o, lse_r;
        if (l[r] != 0.0f) { /* NaN included: NaN in, NaN out */
            scale_o = __frcp_rn(l[r]);
            lse_r = (float)(((double)m[r] + log2((double)l[r])) * MS_LN2);
        } else { /* no visible key (padding): 0, and lse -inf */
            scale_o = 0.0f;
            lse_r = -INFINITY;
        }
#pragma unroll
        for (int x = 0; x < DL; ++x) {
            const int dd = lane + 32 * x;
            if (dd < d.D) ms_store(p.out.data, ms_off(p.out, b, hq, i, dd), p.dtype, l[r] != 0.0f ? o[r][x] * scale_o : 0.0f);
        }
        if (lane == 0) lse[(b * p.Hq + hq) * d.Nq + i] = lse_r;
    }
}

// ----------------------------------------------------------------------------------------------
// forward on tensor cores: 16-bit inputs (bf16, fp16) with D in {16, 32, 64, 128}
//
// Block: (b, KV head, group, tile of 64 rows), 4 warps of 16 rows. A row is one (query, query head)
// pair, query-major: row r of the group is query r / hg of its query head r % hg, so the block's
// query heads share every staged K/V tile (GQA without re-reading K/V per head). Tiles of 64 key
// slots are staged in shared memory as 16-bit (rotated in fp32, then rounded, for rope="selected");
// S = Q K^T and O += P V are mma.sync m16n8k16 with fp32 accumulators; P is rounded to the input
// dtype for the second product, its fp32 row sums feed the softmax denominator. Same masking,
// online softmax, NaN and empty-row rules as ms_fwd_kernel.

#define MS_TC_ROWS 64  /* rows (query, head) of a block */
#define MS_TC_KEYS 64  /* key slots of a staged tile */
#define MS_TC_PAD 8    /* 16-bit elements of padding per shared row: conflict-free fragment loads */

/* B fragment (16 x 8) with B[k][n] = t[n0 + n][k0 + k]: the tile's rows are B's columns */
__device__ __forceinline__ void ms_frag_b_rows(uint32_t *b, const uint16_t *t, int ld, int n0, int k0) {
    const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
    const uint16_t *p = t + (n0 + g) * ld + k0 + 2 * t4;
    b[0] = *reinterpret_cast<const uint32_t *>(p);
    b[1] = *reinterpret_cast<const uint32_t *>(p + 8);
}

/* B fragment (16 x 8) with B[k][n] = t[k0 + k][n0 + n]: the tile's rows are B's rows */
__device__ __forceinline__ void ms_frag_b_cols(uint32_t *b, const uint16_t *t, int ld, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
    const uint16_t *p = t + (k0 + 2 * t4) * ld + n0 + g;
    b[0] = (uint32_t)p[0] | ((uint32_t)p[ld] << 16);
    b[1] = (uint32_t)p[8 * ld] | ((uint32_t)p[9 * ld] << 16);
}

/* the A fragment (16 x 16) of two 16 x 8 accumulators side by side (columns 0-7, 8-15), rounded */
template <bool BF16>
__device__ __forceinline__ void ms_frag_a_of(uint32_t *a, const float *c0, const float *c1) {
    a[0] = ms_pack16<BF16>(c0[0], c0[1]);
    a[1] = ms_pack16<BF16>(c0[2], c0[3]);
    a[2] = ms_pack16<BF16>(c1[0], c1[1]);
    a[3] = ms_pack16<BF16>(c1[2], c1[3]);
}

/* 8 16-bit elements from a uint4, as floats */
template <bool BF16>
__device__ __forceinline__ void ms_unpack8(float *x, uint4 u) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        x[2 * i] = ms_from16<BF16>(w[i] & 0xffffu);
        x[2 * i + 1] = ms_from16<BF16>(w[i] >> 16);
    }
}

template <bool BF16>
__device__ __forceinline__ uint4 ms_pack8(const float *x) {
    return make_uint4(ms_pack16<BF16>(x[0], x[1]), ms_pack16<BF16>(x[2], x[3]), ms_pack16<BF16>(x[4], x[5]),
                      ms_pack16<BF16>(x[6], x[7]));
}

/* x1, x2 (8 each) rotated by RoPE at compact position ps, pair dims i0 .. i0 + 7 */
__device__ __forceinline__ void ms_rope8(float *x1, float *x2, const msattn_rope &r, int ps, int i0) {
    const int half = r.dim / 2;
#pragma unroll
    for (int i = 0; i < 8; ++i)
        ms_rotate_pair(x1[i], x2[i], r.cos[(int64_t)ps * half + i0 + i], r.sin[(int64_t)ps * half + i0 + i]);
}

/* dst (rows, ld) 16-bit = rows of a view of the kernel's 16-bit dtype starting at element offsets
 * off[r] (-1: a zero row), each rotated by RoPE at compact position comp[r] (-1: not rotated; RoPE
 * in fp32, then rounded). Rows with unit dim stride and 16-byte alignment move 8 elements at a time
 * (the common case); others element by element. */
template <int D, bool BF16>
__device__ __forceinline__ void ms_stage16(uint16_t *dst, int ld, int rows, const void *base, msattn_dtype dt,
                                           int64_t sd, const int64_t *off, const int *comp,
                                           const msattn_rope &r) {
    const int half = r.cos != nullptr ? r.dim / 2 : 0, tail0 = 2 * half, tail = D - tail0;
    const uint16_t *src = static_cast<const uint16_t *>(base);
    if (sd == 1 && half % 8 == 0 && (reinterpret_cast<uintptr_t>(base) & 15) == 0) {
        for (int e = threadIdx.x; e < rows * (half / 8); e += blockDim.x) { /* rotated pairs, 8 at a time */
            const int row = e / (half / 8), i0 = 8 * (e % (half / 8));
            const int64_t o = off[row];
            float x1[8], x2[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) x1[i] = x2[i] = 0.0f;
            if (o >= 0 && (o & 7) == 0) {
                ms_unpack8<BF16>(x1, *reinterpret_cast<const uint4 *>(src + o + i0));
                ms_unpack8<BF16>(x2, *reinterpret_cast<const uint4 *>(src + o + i0 + half));
            } else if (o >= 0) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    x1[i] = ms_load(base, o + i0 + i, dt);
                    x2[i] = ms_load(base, o + i0 + i + half, dt);
                }
            }
            if (o >= 0 && comp[row] >= 0) ms_rope8(x1, x2, r, comp[row], i0);
            *reinterpret_cast<uint4 *>(dst + row * ld + i0) = ms_pack8<BF16>(x1);
            *reinterpret_cast<uint4 *>(dst + row * ld + i0 + half) = ms_pack8<BF16>(x2);
        }
        for (int e = threadIdx.x; e < rows * (tail / 8); e += blockDim.x) { /* the rest, copied as is */
            const int row = e / (tail / 8), dd = tail0 + 8 * (e % (tail / 8));
            const int64_t o = off[row];
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (o >= 0 && (o & 7) == 0) {
                v = *reinterpret_cast<const uint4 *>(src + o + dd);
            } else if (o >= 0) {
                float x[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) x[i] = ms_load(base, o + dd + i, dt);
                v = ms_pack8<BF16>(x);
            }
            *reinterpret_cast<uint4 *>(dst + row * ld + dd) = v;
        }
        return;
    }
    for (int e = threadIdx.x; e < rows * half; e += blockDim.x) { /* the rotated pairs (i, i + half) */
        const int row = e / half, i = e % half;
        float x1 = 0.0f, x2 = 0.0f;
        if (off[row] >= 0) {
            x1 = ms_load(base, off[row] + i * sd, dt);
            x2 = ms_load(base, off[row] + (i + half) * sd, dt);
            const int ps = comp[row];
            if (ps >= 0) ms_rotate_pair(x1, x2, r.cos[(int64_t)ps * half + i], r.sin[(int64_t)ps * half + i]);
        }
        dst[row * ld + i] = ms_to16<BF16>(x1);
        dst[row * ld + i + half] = ms_to16<BF16>(x2);
    }
    for (int e = threadIdx.x; e < rows * tail; e += blockDim.x) { /* the dims RoPE leaves alone */
        const int row = e / tail, dd = tail0 + e % tail;
        dst[row * ld + dd] = off[row] >= 0 ? ms_to16<BF16>(ms_load(base, off[row] + dd * sd, dt)) : (uint16_t)0;
    }
}

/* a tensor-core block's rows: the (query, query head) pairs [r0, r0 + 64) of group gi under KV head
 * (b, h), query-major (pair r: query qr.begin + r / hg, query head h * hg + r % hg) */
struct MsTcItem {
    int64_t b, h, bh, gi, r0, rows_g;
    msattn_range qr;
};

/* the item of this block, heaviest (last) groups first; false: past the group's last pair */
__device__ static inline bool ms_tc_item(const msattn_ms_params &p, const MsDims &d, MsTcItem *it) {
    const int64_t tpg = msattn_cdiv(d.hg * d.span, MS_TC_ROWS);
    int64_t x = blockIdx.x;
    it->r0 = (x % tpg) * MS_TC_ROWS;
    x /= tpg;
    it->bh = x % d.BH;
    it->gi = d.G - 1 - x / d.BH;
    it->b = it->bh / p.Hkv;
    it->h = it->bh % p.Hkv;
    it->qr = msattn_group_queries(d.g0 + it->gi, d.span, d.N, d.Nq);
    it->rows_g = d.hg * (it->qr.end - it->qr.begin);
    return it->r0 < it->rows_g;
}

/* per row of the block, for rows [c0, c0 + 64) of group (ga, n_sel): element offsets of the row in
 * q and, when `second` (a (B, Hq, Nq, D) view) is given, in it (into off2), or -1; absolute position
 * or -1, query head, compact RoPE position or -1 */
__device__ static inline void ms_tc_rows(const msattn_ms_params &p, const MsDims &d, int64_t b, int64_t h,
                                         msattn_range qr, int64_t c0, int64_t ga, int64_t n_sel,
                                         const msattn_view *second, int64_t *qoff, int64_t *off2, int *rowpos,
                                         int *rowhq, int *qcomp) {
    const int64_t rows_g = d.hg * (qr.end - qr.begin), q_first = d.N - d.Nq;
    for (int r = threadIdx.x; r < MS_TC_ROWS; r += blockDim.x) {
        const int64_t rg = c0 + r;
        int64_t o1 = -1, o2 = -1;
        int pos = -1, hq = 0, comp = -1;
        if (rg < rows_g) {
            const int64_t qp = qr.begin + rg / d.hg;
            hq = (int)(h * d.hg + rg % d.hg);
            pos = (int)qp;
            o1 = ms_off(p.q, b, hq, qp - q_first, 0);
            if (second) o2 = ms_off(*second, b, hq, qp - q_first, 0);
            const int64_t cp = msattn_compact_own(n_sel, d.CK, qp, ga, d.span);
            comp = p.rope.cos != nullptr && cp < p.rope.len ? (int)cp : -1;
        }
        qoff[r] = o1;
        if (second) off2[r] = o2;
        rowpos[r] = pos;
        rowhq[r] = hq;
        qcomp[r] = comp;
    }
}

/* the key slots [t0, t0 + 64) of group gk under KV head (b, h): absolute positions kpos (-1: none),
 * compact RoPE positions kcomp, and K (rotated for rope="selected") and V staged 16-bit into Ks, Vs
 * (64, D + PAD). Every thread of the block; synchronises before it returns. */
template <int D, bool BF16>
__device__ __forceinline__ void ms_tc_stage_keys(const msattn_ms_params &p, const MsDims &d, const MsGroupKeys &gk,
                                                 int64_t b, int64_t h, int64_t t0, uint16_t *Ks, uint16_t *Vs,
                                                 int *kpos, int *kcomp, int64_t *koff, int64_t *voff) {
    const int tid = threadIdx.x;
    if (tid < MS_TC_KEYS) {
        int pos = -1, comp = -1;
        if (t0 + tid < gk.kend) ms_slot(p, d, gk, b, t0 + tid, &pos, &comp);
        kpos[tid] = pos;
        kcomp[tid] = comp;
        koff[tid] = pos >= 0 ? ms_off(p.k, b, h, pos, 0) : -1;
        voff[tid] = pos >= 0 ? ms_off(p.v, b, h, pos, 0) : -1;
    }
    __syncthreads();
    ms_stage16<D, BF16>(Ks, D + MS_TC_PAD, MS_TC_KEYS, p.k.data, p.dtype, p.k.sd, koff, kcomp, p.rope);
    ms_stage16<D, BF16>(Vs, D + MS_TC_PAD, MS_TC_KEYS, p.v.data, p.dtype, p.v.sd, voff, kcomp, msattn_rope{});
    __syncthreads();
}

/* shared: Qs, Ks, Vs (64, D + PAD) 16-bit | qoff, koff, voff (64) int64 | qcomp, kcomp, kpos,
 * rowpos, rowhq (64) int | red (33) int */
template <int D>
static size_t ms_fwd_tc_smem() {
    return (size_t)3 * 64 * (D + MS_TC_PAD) * 2 + (size_t)3 * 64 * 8 + (size_t)(5 * 64 + 33) * 4;
}

/* as ms_fwd_kernel. grid: B * Hkv * G * ceil(hg * span / 64) blocks of 128 threads */
template <int D, bool BF16>
__global__ void __launch_bounds__(128) ms_fwd_tc_kernel(const msattn_ms_params p) {
    extern __shared__ float4 ms_smem4[];
    constexpr int LD = D + MS_TC_PAD, KS16 = D / 16, NT = D / 8, ST = MS_TC_KEYS / 8;
    const MsDims d = ms_dims(p);
    uint16_t *Qs = reinterpret_cast<uint16_t *>(ms_smem4), *Ks = Qs + 64 * LD, *Vs = Ks + 64 * LD;
    int64_t *qoff = reinterpret_cast<int64_t *>(Vs + 64 * LD), *koff = qoff + 64, *voff = koff + 64;
    int *qcomp = reinterpret_cast<int *>(voff + 64), *kcomp = qcomp + 64, *kpos = kcomp + 64;
    int *rowpos = kpos + 64, *rowhq = rowpos + 64, *red = rowhq + 64;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;

    MsTcItem it;
    if (!ms_tc_item(p, d, &it)) return; /* block-uniform */
    const int64_t b = it.b, h = it.h;
    const int64_t qlast = it.qr.begin + (msattn_min64(it.rows_g, it.r0 + MS_TC_ROWS) - 1) / d.hg;
    const MsGroupKeys gk = ms_group_keys(p, d, it.bh, it.gi, qlast, red);
    const int64_t q_first = d.N - d.Nq; /* absolute position of q's row 0 */
    ms_tc_rows(p, d, b, h, it.qr, it.r0, gk.ga, gk.n_sel, nullptr, qoff, nullptr, rowpos, rowhq, qcomp);
    __syncthreads();
    ms_stage16<D, BF16>(Qs, LD, MS_TC_ROWS, p.q.data, p.dtype, p.q.sd, qoff, qcomp, p.rope);
    __syncthreads();

    // this warp's rows g and g + 8 of its 16: query fragments, positions
    const int wr = warp * 16;
    uint32_t qf[KS16][4];
#pragma unroll
    for (int kk = 0; kk < KS16; ++kk) ms_frag_a(qf[kk], Qs, LD, wr, kk * 16);
    const int pos0 = rowpos[wr + g], pos8 = rowpos[wr + g + 8];

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    for (int64_t t0 = 0; t0 < gk.kend; t0 += MS_TC_KEYS) {
        ms_tc_stage_keys<D, BF16>(p, d, gk, b, h, t0, Ks, Vs, kpos, kcomp, koff, voff);

        // S = Q K^T for the warp's 16 rows and the tile's 64 slots, masked, in the log2 domain
        float s[ST][4];
#pragma unroll
        for (int j = 0; j < ST; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS16; ++kk) {
                uint32_t bf[2];
                ms_frag_b_rows(bf, Ks, LD, j * 8, kk * 16);
                ms_mma16816<BF16>(s[j], qf[kk], bf[0], bf[1]);
            }
            const int kp0 = kpos[j * 8 + 2 * t4], kp1 = kpos[j * 8 + 2 * t4 + 1];
            const bool v00 = kp0 >= 0 && pos0 >= 0 && (!p.causal || kp0 <= pos0);
            const bool v01 = kp1 >= 0 && pos0 >= 0 && (!p.causal || kp1 <= pos0);
            const bool v80 = kp0 >= 0 && pos8 >= 0 && (!p.causal || kp0 <= pos8);
            const bool v81 = kp1 >= 0 && pos8 >= 0 && (!p.causal || kp1 <= pos8);
            s[j][0] = v00 ? s[j][0] * d.c : -INFINITY;
            s[j][1] = v01 ? s[j][1] * d.c : -INFINITY;
            s[j][2] = v80 ? s[j][2] * d.c : -INFINITY;
            s[j][3] = v81 ? s[j][3] * d.c : -INFINITY;
        }
        // online softmax: a row's 64 scores lie in the 4 lanes of a quad
        uint32_t pf[ST / 2][4];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < ST; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hr], s[j][2 * hr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(MS_FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(MS_FULL_MASK, mx, 2));
            const float mnew = fmaxf(m[hr], mx);
            float alpha = 1.0f, sum = 0.0f;
#pragma unroll
            for (int j = 0; j < ST; ++j)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float &v = s[j][2 * hr + c];
                    v = mnew == -INFINITY ? (v != v ? v : 0.0f) : exp2f(v - mnew); /* NaN in, NaN out */
                    sum += v;
                }
            if (mnew != -INFINITY) alpha = exp2f(m[hr] - mnew);
            l[hr] = l[hr] * alpha + sum; /* this lane's share; the quad's shares are added at the end */
            m[hr] = mnew;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                o[n][2 * hr] *= alpha;
                o[n][2 * hr + 1] *= alpha;
            }
        }
#pragma unroll
        for (int kk = 0; kk < ST / 2; ++kk) ms_frag_a_of<BF16>(pf[kk], s[2 * kk], s[2 * kk + 1]);
        // O += P V: B fragments are columns of V (two 16-bit loads per register)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int kk = 0; kk < ST / 2; ++kk) {
                uint32_t bf[2];
                ms_frag_b_cols(bf, Vs, LD, kk * 16, n * 8);
                ms_mma16816<BF16>(o[n], pf[kk], bf[0], bf[1]);
            }
        __syncthreads(); /* before the next tile overwrites Ks, Vs, kpos */
    }

    // the quad's shares of l, then out = O / l and lse, as ms_fwd_kernel
    float *lse = static_cast<float *>(p.lse);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float lt = l[hr];
        lt += __shfl_xor_sync(MS_FULL_MASK, lt, 1);
        lt += __shfl_xor_sync(MS_FULL_MASK, lt, 2);
        const int row = wr + g + 8 * hr, pos = rowpos[row];
        if (pos < 0) continue;
        const int64_t i = pos - q_first, hq = rowhq[row];
        const float scale_o = lt != 0.0f ? __frcp_rn(lt) : 0.0f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int dd = n * 8 + 2 * t4;
            ms_store(p.out.data, ms_off(p.out, b, hq, i, dd), p.dtype, lt != 0.0f ? o[n][2 * hr] * scale_o : 0.0f);
            ms_store(p.out.data, ms_off(p.out, b, hq, i, dd + 1), p.dtype,
                     lt != 0.0f ? o[n][2 * hr + 1] * scale_o : 0.0f);
        }
        if (t4 == 0)
            lse[(b * p.Hq + hq) * d.Nq + i] =
                lt != 0.0f ? (float)(((double)m[hr] + log2((double)lt)) * MS_LN2) : -INFINITY;
    }
}

// ----------------------------------------------------------------------------------------------
// backward: the inverted index, one block per (b, h)

/* index (B, Hkv, G, T) read; offs (B*Hkv, NK + 1), grp (B*Hkv, G * T) written. Region j's choosing
 * groups are grp[offs[j] .. offs[j+1]), ascending: groups are filled one after the other, and the
 * entries of one valid row are distinct regions, so no two threads of a group share a cursor. */
__global__ void __launch_bounds__(256) ms_invert_kernel(const msattn_ms_params p, int32_t *inv_offsets,
                                                        int32_t *inv_groups) {
    __shared__ int red[33];
    const MsDims d = ms_dims(p);
    const int64_t bh = blockIdx.x, GT = d.G * d.T;
    int32_t *offs = inv_offsets + bh * (d.NK + 1), *grp = inv_groups + bh * GT;
    const int32_t *idx = p.index + bh * GT;
    const int tid = threadIdx.x;

    for (int64_t j = tid; j <= d.NK; j += blockDim.x) offs[j] = 0;
    __syncthreads();
    for (int64_t e = tid; e < GT; e += blockDim.x)
        if (idx[e] >= 0 && idx[e] < d.NK) atomicAdd(&offs[idx[e] + 1], 1);
    __syncthreads();
    // inclusive scan: offs[j] = start of region j's list
    int carry = 0;
    for (int64_t j0 = 0; j0 <= d.NK; j0 += blockDim.x) {
        const int64_t j = j0 + tid;
        const int v = j <= d.NK ? offs[j] : 0;
        int total;
        const int before = ms_block_excl_scan(v, &total, red);
        if (j <= d.NK) offs[j] = carry + before + v;
        carry += total;
    }
    __syncthreads();
    // fill, group after group; offs[j] walks to the end of region j's list
    for (int64_t gi = 0; gi < d.G; ++gi) {
        for (int64_t r = tid; r < d.T; r += blockDim.x) {
            const int32_t j = idx[gi * d.T + r];
            if (j >= 0 && j < d.NK) grp[atomicAdd(&offs[j], 1)] = (int32_t)gi;
        }
        __syncthreads();
    }
    // shift back by one (offs[j] = old offs[j - 1], offs[0] = 0), in chunks from the top so a chunk
    // reads only entries no chunk has written yet
    for (int64_t j1 = d.NK + 1; j1 > 1; j1 -= blockDim.x) {
        const int64_t jlo = msattn_max64(1, j1 - blockDim.x), j = jlo + tid;
        const int v = j < j1 ? offs[j - 1] : 0;
        __syncthreads();
        if (j < j1) offs[j] = v;
        __syncthreads();
    }
    if (tid == 0) offs[0] = 0;
}

// ----------------------------------------------------------------------------------------------
// backward pass 1: delta and dq, block (b, hq, query tile of a group) as in the forward

/* shared: Qs, dOs (BQ, DS) | Ks, Vs (BK, KS) floats | lse2, delta (BQ) floats | kpos, kcomp (BK) |
 * qcomp (BQ) | red (33) */
static size_t ms_bwd_dq_smem(const MsDims &d) {
    return (size_t)(2 * MS_BQ * d.DS + 2 * MS_BK * d.KS + 2 * MS_BQ) * 4 + (size_t)(2 * MS_BK + MS_BQ + 33) * 4;
}

/* q, dout, out (B, Hq, Nq, D), k/v (B, Hkv, N, D), lse (B, Hq, Nq), dlse (B, Hq, Nq) or NULL, index
 * read; dq (B, Hq, Nq, D) and delta (B, Hq, Nq) written. grid as the forward's */
template <int DL>
__global__ void __launch_bounds__(MS_WARPS * 32, 1) ms_bwd_dq_kernel(const msattn_ms_params p) {
    extern __shared__ float4 ms_smem4[];
    const MsDims d = ms_dims(p);
    float *Qs = reinterpret_cast<float *>(ms_smem4);
    float *dOs = Qs + MS_BQ * d.DS, *Ks = dOs + MS_BQ * d.DS, *Vs = Ks + MS_BK * d.KS;
    float *lse2 = Vs + MS_BK * d.KS, *delta = lse2 + MS_BQ;
    int *kpos = reinterpret_cast<int *>(delta + MS_BQ), *kcomp = kpos + MS_BK, *qcomp = kcomp + MS_BK;
    int *red = qcomp + MS_BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, row0 = warp * MS_RPW;

    MsQueryItem it;
    if (!ms_query_item(p, d, &it)) return;
    const int64_t b = it.b, h = it.h, hq = it.hq, i0 = it.i0, bh = b * p.Hkv + h;
    const int64_t qrow0 = i0 - (d.N - d.Nq), lrow0 = (b * p.Hq + hq) * d.Nq + qrow0;
    const MsGroupKeys gk = ms_group_keys(p, d, bh, it.gi, i0 + it.nq - 1, red);
    const bool rope = p.rope.cos != nullptr;

    ms_stage_rows(Qs, d.DS, MS_BQ, p.q, p.dtype, b, hq, qrow0, it.nq, d.D);
    ms_stage_rows(dOs, d.DS, MS_BQ, p.dout, p.dtype, b, hq, qrow0, it.nq, d.D);
    for (int r = tid; r < MS_BQ; r += blockDim.x) {
        const int64_t cp = msattn_compact_own(gk.n_sel, d.CK, i0 + r, gk.ga, d.span);
        qcomp[r] = rope && r < it.nq && cp < p.rope.len ? (int)cp : -1;
    }
    __syncthreads();
    if (rope) ms_rope_tile(Qs, d.DS, MS_BQ, qcomp, p.rope, 1.0f);
    // delta = rowsum(dout * out) - dlse, one warp per row; lse in log2 units, +inf for "no key"
    // so that every probability of the row is exp2(-inf) = 0
    for (int r = 0; r < MS_RPW; ++r) {
        const int row = row0 + r;
        if (row >= it.nq) { /* warp-uniform; rows past the tile's queries see nothing */
            if (lane == 0) {
                delta[row] = 0.0f;
                lse2[row] = INFINITY;
            }
            continue;
        }
        float acc = 0.0f;
        for (int dd = lane; dd < d.D; dd += 32)
            acc = fmaf(dOs[row * d.DS + dd], ms_load(p.out.data, ms_off(p.out, b, hq, qrow0 + row, dd), p.dtype), acc);
        acc = ms_warp_sum(acc);
        if (lane == 0) {
            if (p.dlse) acc -= static_cast<const float *>(p.dlse)[lrow0 + row];
            p.delta[lrow0 + row] = acc;
            delta[row] = acc;
            const float ls = static_cast<const float *>(p.lse)[lrow0 + row];
            lse2[row] = ls == -INFINITY ? INFINITY : (float)((double)ls * MS_LOG2E);
        }
    }
    __syncthreads();

    float dq[MS_RPW][DL];
#pragma unroll
    for (int r = 0; r < MS_RPW; ++r)
#pragma unroll
        for (int i = 0; i < DL; ++i) dq[r][i] = 0.0f;

    for (int64_t t0 = 0; t0 < gk.kend; t0 += MS_BK) {
        if (tid < MS_BK) {
            int pos = -1, comp = -1;
            if (t0 + tid < gk.kend) ms_slot(p, d, gk, b, t0 + tid, &pos, &comp);
            kpos[tid] = pos;
            kcomp[tid] = comp;
        }
        __syncthreads();
        ms_stage_keys(Ks, d.KS, MS_BK, p.k, p.dtype, b, h, kpos, d.D);
        ms_stage_keys(Vs, d.KS, MS_BK, p.v, p.dtype, b, h, kpos, d.D);
        __syncthreads();
        if (rope) {
            ms_rope_tile(Ks, d.KS, MS_BK, kcomp, p.rope, 1.0f);
            __syncthreads();
        }
        // P and dS of this lane's key for the warp's rows
        const int kp = kpos[lane];
        float ds[MS_RPW];
#pragma unroll
        for (int r = 0; r < MS_RPW; ++r) {
            const int row = row0 + r;
            const bool vis = kp >= 0 && row < it.nq && (!p.causal || kp <= i0 + row);
            ds[r] = 0.0f; /* exactly 0 when unseen, even if the row's delta is NaN */
            if (vis) {
                const float pr = exp2f(ms_dot4(Qs + row * d.DS, Ks + lane * d.KS, d.DS) * d.c - lse2[row]);
                const float dp = ms_dot4(dOs + row * d.DS, Vs + lane * d.KS, d.DS);
                ds[r] = pr * (dp - delta[row]);
            }
        }
        // dq += dS K (rotated keys: dq is rotated back at the end)
        for (int kk = 0; kk < MS_BK; ++kk) {
            float kv[DL];
#pragma unroll
            for (int i = 0; i < DL; ++i) {
                const int dd = lane + 32 * i;
                kv[i] = dd < d.D ? Ks[kk * d.KS + dd] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < MS_RPW; ++r) {
                const float g = __shfl_sync(MS_FULL_MASK, ds[r], kk);
#pragma unroll
                for (int i = 0; i < DL; ++i) dq[r][i] = fmaf(g, kv[i], dq[r][i]);
            }
        }
        __syncthreads();
    }

    // dq * scale, rotated back to the query's own frame through Qs (no longer needed), then stored
    const float scale = (float)p.scale;
#pragma unroll
    for (int r = 0; r < MS_RPW; ++r)
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            const int dd = lane + 32 * i;
            if (dd < d.D) Qs[(row0 + r) * d.DS + dd] = dq[r][i] * scale;
        }
    __syncthreads();
    if (rope) {
        ms_rope_tile(Qs, d.DS, MS_BQ, qcomp, p.rope, -1.0f);
        __syncthreads();
    }
    for (int e = tid; e < it.nq * d.D; e += blockDim.x) {
        const int r = e / (int)d.D, dd = e % (int)d.D;
        ms_store(p.dq.data, ms_off(p.dq, b, hq, qrow0 + r, dd), p.dtype, Qs[r * d.DS + dd]);
    }
}

// ----------------------------------------------------------------------------------------------
// backward pass 2: dk and dv, block (b, h, key tile of one region), MS_KPW keys per warp; a lane
// holds one query column of the staged query tile for the scores, and dims lane + 32 i of its keys

/* a pass-2 block's keys: [t0, t0 + nk) of key region j of (b, h), the region's u-th tile of KT */
struct MsKeyItem {
    int64_t b, h, bh, j, t0;
    msattn_range reg;
    int nk;
};

/* the item of this block; early regions are read by the most groups, so they come first. false:
 * past the region's end (the last region is short) */
__device__ static inline bool ms_key_item(const msattn_ms_params &p, const MsDims &d, int KT, MsKeyItem *it) {
    const int64_t tpr = msattn_cdiv(d.CK, KT);
    int64_t x = blockIdx.x;
    const int64_t u = x % tpr;
    x /= tpr;
    it->bh = x % d.BH;
    it->j = x / d.BH;
    it->b = it->bh / p.Hkv;
    it->h = it->bh % p.Hkv;
    it->reg = msattn_key_region(it->j, d.CK, d.N);
    it->t0 = it->reg.begin + u * KT;
    it->nk = (int)msattn_min64(KT, it->reg.end - it->t0);
    return it->t0 < it->reg.end;
}

/* one reader of a key region: its group, whether it owns the region, its selection's length and
 * the region's rank in it (0 for the owner) */
struct MsReader {
    int64_t gi, ga;
    bool is_own;
    int n_sel, rank;

    /* the compact RoPE position (-1: beyond the tables) of key t of the region starting at
     * region_begin, in this reader's frame, as the forward gave it */
    __device__ int key_comp(const msattn_ms_params &p, const MsDims &d, int64_t t, int64_t region_begin) const {
        const int64_t cp = is_own ? msattn_compact_own(n_sel, d.CK, t, ga, d.span)
                                  : msattn_compact_selected(rank, t - region_begin, d.CK);
        return cp < p.rope.len ? (int)cp : -1;
    }
};

/* the groups that read key region j of (b, h), ascending: those whose selection holds j (the inverted
 * index) merged with the group that owns j. next() must be reached by every thread of the block. */
struct MsReaders {
    const int32_t *grp;
    int64_t e, e_end, gown, bh;
    bool own_pending;

    __device__ MsReaders(const msattn_ms_params &p, const MsDims &d, int64_t bh_, int64_t j) : bh(bh_) {
        const int32_t *offs = p.inv_offsets + bh * (d.NK + 1);
        grp = p.inv_groups + bh * d.G * d.T;
        e = msattn_max64(0, offs[j]);
        e_end = msattn_min64(offs[j + 1], d.G * d.T);
        gown = msattn_group_of_position(msattn_key_region(j, p.block_k, d.N).begin, d.span) - d.g0;
        own_pending = gown >= 0 && gown < d.G;
    }

    /* the next reader into *r; false when there is none */
    __device__ bool next(const msattn_ms_params &p, const MsDims &d, int64_t j, int *red, MsReader *r) {
        for (;;) {
            const int64_t next_sel = e < e_end ? grp[e] : INT64_MAX;
            if (own_pending && gown <= next_sel) {
                r->gi = gown;
                r->is_own = true;
                own_pending = false;
            } else if (e < e_end) {
                r->gi = next_sel;
                r->is_own = false;
                ++e;
            } else {
                return false;
            }
            if (r->gi < 0 || r->gi >= d.G) continue; /* only a corrupt index gets here */
            r->ga = d.g0 + r->gi;
            const int32_t *sel = p.index + (bh * d.G + r->gi) * d.T;
            r->n_sel = ms_count_selected(sel, d.T, d.NK, red);
            r->rank = r->is_own ? 0 : ms_find_rank(sel, r->n_sel, j, red);
            if (r->rank >= 0) return true;
        }
    }
};

/* keys per pass-2 block: the region size rounded up to MS_KPW, at most 32 */
static int ms_dkv_keys(int CK) { return CK >= 32 ? 32 : (CK + MS_KPW - 1) / MS_KPW * MS_KPW; }

/* shared: Ks, Vs (KT, DS) | Qs, dOs (32, KS) floats | lse2, delta (32) floats | kpos, kcomp (KT) |
 * qcomp (32) | red (33) */
static size_t ms_bwd_dkv_smem(const MsDims &d, int KT) {
    return (size_t)(2 * KT * d.DS + 2 * 32 * d.KS + 2 * 32) * 4 + (size_t)(2 * KT + 32 + 33) * 4;
}

/* q, dout (B, Hq, Nq, D), k/v (B, Hkv, N, D), lse, delta (B, Hq, Nq), index, inv_offsets,
 * inv_groups read; dk, dv (B, Hkv, N, D) written. grid: B * Hkv * NK * ceil(CK / KT) blocks of
 * KT * 8 threads (KT / MS_KPW warps) */
template <int DL>
__global__ void __launch_bounds__(256, 1) ms_bwd_dkv_kernel(const msattn_ms_params p) {
    extern __shared__ float4 ms_smem4[];
    const MsDims d = ms_dims(p);
    const int nwarps = blockDim.x >> 5, KT = nwarps * MS_KPW;
    float *Ks = reinterpret_cast<float *>(ms_smem4);
    float *Vs = Ks + KT * d.DS, *Qs = Vs + KT * d.DS, *dOs = Qs + 32 * d.KS;
    float *lse2 = dOs + 32 * d.KS, *delta = lse2 + 32;
    int *kpos = reinterpret_cast<int *>(delta + 32), *kcomp = kpos + KT, *qcomp = kcomp + KT;
    int *red = qcomp + 32;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, krow0 = warp * MS_KPW;

    MsKeyItem it;
    if (!ms_key_item(p, d, KT, &it)) return; /* block-uniform: the last region is short */
    const int64_t bh = it.bh, j = it.j, b = it.b, h = it.h, t0 = it.t0;
    const msattn_range reg = it.reg;
    const int nk = it.nk;
    const bool rope = p.rope.cos != nullptr;

    for (int r = tid; r < KT; r += blockDim.x)
        kpos[r] = r < nk && ms_key_valid(p.key_mask, p.mask_sb, b, t0 + r) ? (int)(t0 + r) : -1;
    __syncthreads();
    ms_stage_keys(Vs, d.DS, KT, p.v, p.dtype, b, h, kpos, d.D);
    if (!rope) ms_stage_keys(Ks, d.DS, KT, p.k, p.dtype, b, h, kpos, d.D); /* one frame for every group */
    __syncthreads();

    float dk[MS_KPW][DL], dv[MS_KPW][DL], dkg[MS_KPW][DL];
#pragma unroll
    for (int r = 0; r < MS_KPW; ++r)
#pragma unroll
        for (int i = 0; i < DL; ++i) dk[r][i] = dv[r][i] = dkg[r][i] = 0.0f;

    MsReaders rd(p, d, bh, j);
    MsReader rdr;
    while (rd.next(p, d, j, red, &rdr)) {
        // the keys in this group's frame: compact positions as the forward gave them
        if (rope) {
            for (int r = tid; r < KT; r += blockDim.x)
                kcomp[r] = kpos[r] >= 0 ? rdr.key_comp(p, d, t0 + r, reg.begin) : -1;
            ms_stage_keys(Ks, d.DS, KT, p.k, p.dtype, b, h, kpos, d.D);
            __syncthreads();
            ms_rope_tile(Ks, d.DS, KT, kcomp, p.rope, 1.0f);
            __syncthreads();
        }

        // causal own span: a key is seen only by queries at or after it, so earlier query tiles are
        // skipped whole; selected regions lie before the group and every query sees them
        const bool masked = p.causal && rdr.is_own;
        const msattn_range qr = msattn_group_queries(rdr.ga, d.span, d.N, d.Nq);
        const int64_t qlo = masked ? msattn_max64(qr.begin, t0) : qr.begin;
        for (int64_t hq = h * d.hg; hq < (h + 1) * d.hg; ++hq) {
            for (int64_t c0 = qlo; c0 < qr.end; c0 += 32) {
                const int ncol = (int)msattn_min64(32, qr.end - c0);
                const int64_t qrow0 = c0 - (d.N - d.Nq), lrow0 = (b * p.Hq + hq) * d.Nq + qrow0;
                ms_stage_rows(Qs, d.KS, 32, p.q, p.dtype, b, hq, qrow0, ncol, d.D);
                ms_stage_rows(dOs, d.KS, 32, p.dout, p.dtype, b, hq, qrow0, ncol, d.D);
                for (int c = tid; c < 32; c += blockDim.x) {
                    const int64_t cp = msattn_compact_own(rdr.n_sel, d.CK, c0 + c, rdr.ga, d.span);
                    qcomp[c] = rope && c < ncol && cp < p.rope.len ? (int)cp : -1;
                    float ls = INFINITY, dl = 0.0f; /* padding columns: probability 0 */
                    if (c < ncol) {
                        const float lv = static_cast<const float *>(p.lse)[lrow0 + c];
                        ls = lv == -INFINITY ? INFINITY : (float)((double)lv * MS_LOG2E);
                        dl = p.delta[lrow0 + c];
                    }
                    lse2[c] = ls;
                    delta[c] = dl;
                }
                __syncthreads();
                if (rope) {
                    ms_rope_tile(Qs, d.KS, 32, qcomp, p.rope, 1.0f);
                    __syncthreads();
                }
                // P and dS of the warp's keys against this lane's query column
                float pr[MS_KPW], ds[MS_KPW];
                const int64_t qpos = c0 + lane;
#pragma unroll
                for (int r = 0; r < MS_KPW; ++r) {
                    const int kr = krow0 + r, kp = kpos[kr];
                    const bool vis = kp >= 0 && lane < ncol && (!masked || kp <= qpos);
                    pr[r] = ds[r] = 0.0f; /* exactly 0 when unseen: padded keys get dK = dV = 0 */
                    if (vis) {
                        pr[r] = exp2f(ms_dot4(Ks + kr * d.DS, Qs + lane * d.KS, d.DS) * d.c - lse2[lane]);
                        const float dp = ms_dot4(Vs + kr * d.DS, dOs + lane * d.KS, d.DS);
                        ds[r] = pr[r] * (dp - delta[lane]);
                    }
                }
                // dv += P^T dO, dk_g += dS^T Q, columns in order
                for (int c = 0; c < 32; ++c) {
                    float qv[DL], gv[DL];
#pragma unroll
                    for (int i = 0; i < DL; ++i) {
                        const int dd = lane + 32 * i;
                        qv[i] = dd < d.D ? Qs[c * d.KS + dd] : 0.0f;
                        gv[i] = dd < d.D ? dOs[c * d.KS + dd] : 0.0f;
                    }
#pragma unroll
                    for (int r = 0; r < MS_KPW; ++r) {
                        const float pc = __shfl_sync(MS_FULL_MASK, pr[r], c);
                        const float dc = __shfl_sync(MS_FULL_MASK, ds[r], c);
#pragma unroll
                        for (int i = 0; i < DL; ++i) {
                            dv[r][i] = fmaf(pc, gv[i], dv[r][i]);
                            dkg[r][i] = fmaf(dc, qv[i], dkg[r][i]);
                        }
                    }
                }
                __syncthreads(); /* before the next tile overwrites Qs, dOs */
            }
        }

        // this group's dK joins the total in the key's own frame
        if (rope) {
#pragma unroll
            for (int r = 0; r < MS_KPW; ++r)
#pragma unroll
                for (int i = 0; i < DL; ++i) {
                    const int dd = lane + 32 * i;
                    if (dd < d.D) Ks[(krow0 + r) * d.DS + dd] = dkg[r][i];
                }
            __syncthreads();
            ms_rope_tile(Ks, d.DS, KT, kcomp, p.rope, -1.0f);
            __syncthreads();
#pragma unroll
            for (int r = 0; r < MS_KPW; ++r)
#pragma unroll
                for (int i = 0; i < DL; ++i) {
                    const int dd = lane + 32 * i;
                    if (dd < d.D) dk[r][i] += Ks[(krow0 + r) * d.DS + dd];
                    dkg[r][i] = 0.0f;
                }
            __syncthreads(); /* before the next group restages Ks */
        } else {
#pragma unroll
            for (int r = 0; r < MS_KPW; ++r)
#pragma unroll
                for (int i = 0; i < DL; ++i) {
                    dk[r][i] += dkg[r][i];
                    dkg[r][i] = 0.0f;
                }
        }
    }

    const float scale = (float)p.scale;
#pragma unroll
    for (int r = 0; r < MS_KPW; ++r) {
        const int kr = krow0 + r;
        if (kr >= nk) continue;
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            const int dd = lane + 32 * i;
            if (dd >= d.D) continue;
            ms_store(p.dk.data, ms_off(p.dk, b, h, t0 + kr, dd), p.dtype, dk[r][i] * scale);
            ms_store(p.dv.data, ms_off(p.dv, b, h, t0 + kr, dd), p.dtype, dv[r][i]);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// backward on tensor cores: 16-bit inputs with D in {16, 32, 64, 128}, the same passes and the same
// order of every sum on every run (deterministic). Pass 1 as the tensor-core forward (64 rows of
// (query, query head) per block, tiles of 64 key slots): S = QK^T and dP = dO V^T recomputed, dS =
// P (dP - delta), dq += dS K. Pass 2: a block owns 16 keys of one region; for each reader group
// (ascending, as ms_bwd_dkv_kernel) the group's rows come in chunks of 64, a warp takes 16 of them:
// S^T = K Q^T, dP^T = V dO^T, dv += P^T dO, dk_g += dS^T Q; the warps' shares are added in warp
// order through shared memory (per group when dK must be rotated back to the key's frame). P and dS
// are rounded to the input dtype for their products, as in the forward.

/* shared: Qs, dOs, Ks, Vs (64, D + PAD) 16-bit | qoff, ooff, koff, voff (64) int64 | lse2, delta (64)
 * float | qcomp, kcomp, kpos, rowpos, rowhq (64) int | red (33) int */
template <int D>
static size_t ms_bwd_dq_tc_smem() {
    return (size_t)4 * 64 * (D + MS_TC_PAD) * 2 + (size_t)4 * 64 * 8 + (size_t)2 * 64 * 4 + (size_t)(5 * 64 + 33) * 4;
}

/* as ms_bwd_dq_kernel (writes delta and dq). grid as the tensor-core forward's */
template <int D, bool BF16>
__global__ void __launch_bounds__(128) ms_bwd_dq_tc_kernel(const msattn_ms_params p) {
    extern __shared__ float4 ms_smem4[];
    constexpr int LD = D + MS_TC_PAD, KS16 = D / 16, NT = D / 8, ST = MS_TC_KEYS / 8;
    const MsDims d = ms_dims(p);
    uint16_t *Qs = reinterpret_cast<uint16_t *>(ms_smem4), *dOs = Qs + 64 * LD, *Ks = dOs + 64 * LD;
    uint16_t *Vs = Ks + 64 * LD;
    int64_t *qoff = reinterpret_cast<int64_t *>(Vs + 64 * LD), *ooff = qoff + 64, *koff = ooff + 64;
    int64_t *voff = koff + 64;
    float *lse2 = reinterpret_cast<float *>(voff + 64), *delta = lse2 + 64;
    int *qcomp = reinterpret_cast<int *>(delta + 64), *kcomp = qcomp + 64, *kpos = kcomp + 64;
    int *rowpos = kpos + 64, *rowhq = rowpos + 64, *red = rowhq + 64;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;

    MsTcItem it;
    if (!ms_tc_item(p, d, &it)) return;
    const int64_t b = it.b, h = it.h;
    const int64_t qlast = it.qr.begin + (msattn_min64(it.rows_g, it.r0 + MS_TC_ROWS) - 1) / d.hg;
    const MsGroupKeys gk = ms_group_keys(p, d, it.bh, it.gi, qlast, red);
    const int64_t q_first = d.N - d.Nq;
    ms_tc_rows(p, d, b, h, it.qr, it.r0, gk.ga, gk.n_sel, &p.dout, qoff, ooff, rowpos, rowhq, qcomp);
    __syncthreads();
    ms_stage16<D, BF16>(Qs, LD, MS_TC_ROWS, p.q.data, p.dtype, p.q.sd, qoff, qcomp, p.rope);
    ms_stage16<D, BF16>(dOs, LD, MS_TC_ROWS, p.dout.data, p.dtype, p.dout.sd, ooff, qcomp, msattn_rope{});
    // delta = rowsum(dout * out) - dlse, a warp per row; lse in log2 units, +inf for "no key"
    for (int r = warp; r < MS_TC_ROWS; r += 4) {
        if (rowpos[r] < 0) { /* warp-uniform */
            if (lane == 0) {
                delta[r] = 0.0f;
                lse2[r] = INFINITY;
            }
            continue;
        }
        const int64_t i = rowpos[r] - q_first, lrow = (b * p.Hq + rowhq[r]) * d.Nq + i;
        float acc = 0.0f;
        for (int dd = lane; dd < D; dd += 32)
            acc = fmaf(ms_load(p.dout.data, ms_off(p.dout, b, rowhq[r], i, dd), p.dtype),
                       ms_load(p.out.data, ms_off(p.out, b, rowhq[r], i, dd), p.dtype), acc);
        acc = ms_warp_sum(acc);
        if (lane == 0) {
            if (p.dlse) acc -= static_cast<const float *>(p.dlse)[lrow];
            p.delta[lrow] = acc;
            delta[r] = acc;
            const float ls = static_cast<const float *>(p.lse)[lrow];
            lse2[r] = ls == -INFINITY ? INFINITY : (float)((double)ls * MS_LOG2E);
        }
    }
    __syncthreads();

    const int wr = warp * 16;
    const int pos0 = rowpos[wr + g], pos8 = rowpos[wr + g + 8];
    const float l0 = lse2[wr + g], l8 = lse2[wr + g + 8], dl0 = delta[wr + g], dl8 = delta[wr + g + 8];
    float dq[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

    for (int64_t t0 = 0; t0 < gk.kend; t0 += MS_TC_KEYS) {
        ms_tc_stage_keys<D, BF16>(p, d, gk, b, h, t0, Ks, Vs, kpos, kcomp, koff, voff);

        float s[ST][4], dp[ST][4];
#pragma unroll
        for (int j = 0; j < ST; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[j][c] = dp[j][c] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS16; ++kk) {
            uint32_t qa[4], oa[4];
            ms_frag_a(qa, Qs, LD, wr, kk * 16);
            ms_frag_a(oa, dOs, LD, wr, kk * 16);
#pragma unroll
            for (int j = 0; j < ST; ++j) {
                uint32_t bf[2];
                ms_frag_b_rows(bf, Ks, LD, j * 8, kk * 16);
                ms_mma16816<BF16>(s[j], qa, bf[0], bf[1]);
                ms_frag_b_rows(bf, Vs, LD, j * 8, kk * 16);
                ms_mma16816<BF16>(dp[j], oa, bf[0], bf[1]);
            }
        }
        // dS = P (dP - delta), exactly 0 where unseen (even if the row's delta is NaN)
#pragma unroll
        for (int j = 0; j < ST; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int kp = kpos[j * 8 + 2 * t4 + (c & 1)], pos = c < 2 ? pos0 : pos8;
                const bool vis = kp >= 0 && pos >= 0 && (!p.causal || kp <= pos);
                const float pr = exp2f(s[j][c] * d.c - (c < 2 ? l0 : l8));
                s[j][c] = vis ? pr * (dp[j][c] - (c < 2 ? dl0 : dl8)) : 0.0f;
            }
        // dq += dS K (rotated keys: dq is rotated back at the end)
#pragma unroll
        for (int kk = 0; kk < ST / 2; ++kk) {
            uint32_t da[4];
            ms_frag_a_of<BF16>(da, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                uint32_t bf[2];
                ms_frag_b_cols(bf, Ks, LD, kk * 16, n * 8);
                ms_mma16816<BF16>(dq[n], da, bf[0], bf[1]);
            }
        }
        __syncthreads();
    }

    // dq * scale through shared memory (Ks and Vs, no longer needed), rotated back, stored
    float *dqs = reinterpret_cast<float *>(Ks); /* (64, D) floats fit in Ks + Vs */
    const float scale = (float)p.scale;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int dd = n * 8 + 2 * t4;
        dqs[(wr + g) * D + dd] = dq[n][0] * scale;
        dqs[(wr + g) * D + dd + 1] = dq[n][1] * scale;
        dqs[(wr + g + 8) * D + dd] = dq[n][2] * scale;
        dqs[(wr + g + 8) * D + dd + 1] = dq[n][3] * scale;
    }
    __syncthreads();
    if (p.rope.cos != nullptr) {
        ms_rope_tile(dqs, D, MS_TC_ROWS, qcomp, p.rope, -1.0f);
        __syncthreads();
    }
    for (int e = tid; e < MS_TC_ROWS * D; e += blockDim.x) {
        const int r = e / D, dd = e % D;
        if (rowpos[r] >= 0) ms_store(p.dq.data, ms_off(p.dq, b, rowhq[r], rowpos[r] - q_first, dd), p.dtype, dqs[e]);
    }
}

#define MS_TC_KT 16 /* keys of a pass-2 block */

/* shared: Ks, Vs (16, D + PAD) | Qs, dOs (64, D + PAD) 16-bit | part (4, 16, D) | dkt (16, D) floats |
 * koff, voff (16), qoff, ooff (64) int64 | lse2, delta (64) float | kpos, kcomp (16), qcomp, rowpos,
 * rowhq (64) int | red (33) int */
template <int D>
static size_t ms_bwd_dkv_tc_smem() {
    return (size_t)(2 * MS_TC_KT + 2 * 64) * (D + MS_TC_PAD) * 2 + (size_t)5 * MS_TC_KT * D * 4 +
           (size_t)(2 * MS_TC_KT + 2 * 64) * 8 + (size_t)2 * 64 * 4 + (size_t)(2 * MS_TC_KT + 3 * 64 + 33) * 4;
}

/* the four warps' (16, D) accumulators c[NT][4] added in warp order into out (16, D), through part */
template <int D>
__device__ __forceinline__ void ms_tc_sum_warps(float *out, float *part, const float (*c)[4], bool add) {
    constexpr int NT = D / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    float *mine = part + warp * MS_TC_KT * D;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int dd = n * 8 + 2 * t4;
        mine[g * D + dd] = c[n][0];
        mine[g * D + dd + 1] = c[n][1];
        mine[(g + 8) * D + dd] = c[n][2];
        mine[(g + 8) * D + dd + 1] = c[n][3];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < MS_TC_KT * D; e += blockDim.x) {
        const float v = ((part[e] + part[MS_TC_KT * D + e]) + part[2 * MS_TC_KT * D + e]) + part[3 * MS_TC_KT * D + e];
        out[e] = add ? out[e] + v : v;
    }
    __syncthreads();
}

/* as ms_bwd_dkv_kernel. grid: B * Hkv * NK * ceil(CK / 16) blocks of 128 threads */
template <int D, bool BF16>
__global__ void __launch_bounds__(128, 1) ms_bwd_dkv_tc_kernel(const msattn_ms_params p) {
    extern __shared__ float4 ms_smem4[];
    constexpr int LD = D + MS_TC_PAD, KS16 = D / 16, NT = D / 8, KT = MS_TC_KT;
    const MsDims d = ms_dims(p);
    uint16_t *Ks = reinterpret_cast<uint16_t *>(ms_smem4), *Vs = Ks + KT * LD, *Qs = Vs + KT * LD;
    uint16_t *dOs = Qs + 64 * LD;
    float *part = reinterpret_cast<float *>(dOs + 64 * LD), *dkt = part + 4 * KT * D;
    int64_t *koff = reinterpret_cast<int64_t *>(dkt + KT * D), *voff = koff + KT, *qoff = voff + KT;
    int64_t *ooff = qoff + 64;
    float *lse2 = reinterpret_cast<float *>(ooff + 64), *delta = lse2 + 64;
    int *kpos = reinterpret_cast<int *>(delta + 64), *kcomp = kpos + KT, *qcomp = kcomp + KT;
    int *rowpos = qcomp + 64, *rowhq = rowpos + 64, *red = rowhq + 64;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const bool rope = p.rope.cos != nullptr;

    MsKeyItem it;
    if (!ms_key_item(p, d, KT, &it)) return; /* block-uniform: the last region is short */
    const int64_t bh = it.bh, j = it.j, b = it.b, h = it.h, t0 = it.t0;
    const msattn_range reg = it.reg;
    const int nk = it.nk;

    for (int r = tid; r < KT; r += blockDim.x) {
        const bool ok = r < nk && ms_key_valid(p.key_mask, p.mask_sb, b, t0 + r);
        kpos[r] = ok ? (int)(t0 + r) : -1;
        koff[r] = ok ? ms_off(p.k, b, h, t0 + r, 0) : -1;
        voff[r] = ok ? ms_off(p.v, b, h, t0 + r, 0) : -1;
        kcomp[r] = -1;
    }
    for (int e = tid; e < KT * D; e += blockDim.x) dkt[e] = 0.0f;
    __syncthreads();
    ms_stage16<D, BF16>(Vs, LD, KT, p.v.data, p.dtype, p.v.sd, voff, kcomp, msattn_rope{});
    if (!rope) ms_stage16<D, BF16>(Ks, LD, KT, p.k.data, p.dtype, p.k.sd, koff, kcomp, p.rope);
    __syncthreads();
    // this lane's keys g and g + 8
    const int kp0 = kpos[g], kp8 = kpos[g + 8];

    float dk[NT][4], dv[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) dk[n][c] = dv[n][c] = 0.0f;

    MsReaders rd(p, d, bh, j);
    MsReader rdr;
    while (rd.next(p, d, j, red, &rdr)) {
        // the keys in this group's frame: compact positions as the forward gave them
        if (rope) {
            for (int r = tid; r < KT; r += blockDim.x)
                kcomp[r] = kpos[r] >= 0 ? rdr.key_comp(p, d, t0 + r, reg.begin) : -1;
            __syncthreads();
            ms_stage16<D, BF16>(Ks, LD, KT, p.k.data, p.dtype, p.k.sd, koff, kcomp, p.rope);
        }

        // the group's rows in chunks of 64; causal own span: queries before the first key skip
        const bool masked = p.causal && rdr.is_own;
        const msattn_range qr = msattn_group_queries(rdr.ga, d.span, d.N, d.Nq);
        const int64_t qlo = masked ? msattn_max64(qr.begin, t0) : qr.begin;
        const int64_t rows_g = d.hg * (qr.end - qr.begin);
        for (int64_t c0 = (qlo - qr.begin) * d.hg; c0 < rows_g; c0 += MS_TC_ROWS) {
            ms_tc_rows(p, d, b, h, qr, c0, rdr.ga, rdr.n_sel, &p.dout, qoff, ooff, rowpos, rowhq, qcomp);
            __syncthreads();
            for (int r = tid; r < MS_TC_ROWS; r += blockDim.x) {
                float ls = INFINITY, dl = 0.0f; /* no row: probability 0 */
                if (rowpos[r] >= 0) {
                    const int64_t lrow = (b * p.Hq + rowhq[r]) * d.Nq + rowpos[r] - (d.N - d.Nq);
                    const float lv = static_cast<const float *>(p.lse)[lrow];
                    ls = lv == -INFINITY ? INFINITY : (float)((double)lv * MS_LOG2E);
                    dl = p.delta[lrow];
                }
                lse2[r] = ls;
                delta[r] = dl;
            }
            ms_stage16<D, BF16>(Qs, LD, MS_TC_ROWS, p.q.data, p.dtype, p.q.sd, qoff, qcomp, p.rope);
            ms_stage16<D, BF16>(dOs, LD, MS_TC_ROWS, p.dout.data, p.dtype, p.dout.sd, ooff, qcomp, msattn_rope{});
            __syncthreads();

            // this warp's 16 rows: S^T and dP^T (16 keys x 16 rows)
            const int wr = warp * 16;
            float s[2][4], dp[2][4];
#pragma unroll
            for (int jn = 0; jn < 2; ++jn)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[jn][c] = dp[jn][c] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS16; ++kk) {
                uint32_t ka[4], va[4];
                ms_frag_a(ka, Ks, LD, 0, kk * 16);
                ms_frag_a(va, Vs, LD, 0, kk * 16);
#pragma unroll
                for (int jn = 0; jn < 2; ++jn) {
                    uint32_t bf[2];
                    ms_frag_b_rows(bf, Qs, LD, wr + jn * 8, kk * 16);
                    ms_mma16816<BF16>(s[jn], ka, bf[0], bf[1]);
                    ms_frag_b_rows(bf, dOs, LD, wr + jn * 8, kk * 16);
                    ms_mma16816<BF16>(dp[jn], va, bf[0], bf[1]);
                }
            }
            // P^T into s, dS^T into dp; exactly 0 where unseen
#pragma unroll
            for (int jn = 0; jn < 2; ++jn)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int row = wr + jn * 8 + 2 * t4 + (c & 1), kp = c < 2 ? kp0 : kp8, pos = rowpos[row];
                    const bool vis = kp >= 0 && pos >= 0 && (!masked || kp <= pos);
                    const float pr = vis ? exp2f(s[jn][c] * d.c - lse2[row]) : 0.0f;
                    dp[jn][c] = vis ? pr * (dp[jn][c] - delta[row]) : 0.0f;
                    s[jn][c] = pr;
                }
            // dv += P^T dO, dk (or this group's dk) += dS^T Q
            uint32_t pa[4], da[4];
            ms_frag_a_of<BF16>(pa, s[0], s[1]);
            ms_frag_a_of<BF16>(da, dp[0], dp[1]);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                uint32_t bf[2];
                ms_frag_b_cols(bf, dOs, LD, wr, n * 8);
                ms_mma16816<BF16>(dv[n], pa, bf[0], bf[1]);
                ms_frag_b_cols(bf, Qs, LD, wr, n * 8);
                ms_mma16816<BF16>(dk[n], da, bf[0], bf[1]);
            }
            __syncthreads(); /* before the next chunk restages Qs, dOs, rows */
        }

        // this group's dK joins the total in the key's own frame
        if (rope) {
            float *dkg = part; /* the warps' sum lands in part's first slot, then is rotated back */
            ms_tc_sum_warps<D>(dkg, part, dk, false);
            ms_rope_tile(dkg, D, KT, kcomp, p.rope, -1.0f);
            __syncthreads();
            for (int i = tid; i < KT * D; i += blockDim.x) dkt[i] += dkg[i];
#pragma unroll
            for (int n = 0; n < NT; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
            __syncthreads();
        }
    }

    // the warps' shares in warp order, then stored; keys past the region or padded get 0
    if (!rope) ms_tc_sum_warps<D>(dkt, part, dk, false);
    const float scale = (float)p.scale;
    for (int i = tid; i < KT * D; i += blockDim.x) {
        const int r = i / D, dd = i % D;
        if (r < nk) ms_store(p.dk.data, ms_off(p.dk, b, h, t0 + r, dd), p.dtype, kpos[r] >= 0 ? dkt[i] * scale : 0.0f);
    }
    __syncthreads();
    ms_tc_sum_warps<D>(dkt, part, dv, false);
    for (int i = tid; i < KT * D; i += blockDim.x) {
        const int r = i / D, dd = i % D;
        if (r < nk) ms_store(p.dv.data, ms_off(p.dv, b, h, t0 + r, dd), p.dtype, kpos[r] >= 0 ? dkt[i] : 0.0f);
    }
}

// ----------------------------------------------------------------------------------------------
// launchers

/* the checks every attention launcher shares */
static int ms_check(const msattn_ms_params *p) {
    if (p->dtype == MSATTN_F64) return MSATTN_ERR_DTYPE; /* fp32 compute only; the CPU serves float64 */
    if (p->D < 1 || p->D > MS_DMAX || p->Hkv < 1 || p->Hq % p->Hkv != 0 || p->topk < 1 || p->block_k < 1)
        return MSATTN_ERR_ARG;
    if (p->rope.cos != nullptr && (p->rope.dim < 2 || p->rope.dim > p->D)) return MSATTN_ERR_ARG;
    return MSATTN_OK;
}

/* forward / pass-1 grid: one block per (b, hq, group, query tile) */
static int64_t ms_query_blocks(const msattn_ms_params *p, const MsDims &d) {
    return (int64_t)p->B * p->Hq * d.G * msattn_cdiv(d.span, MS_BQ);
}

/* launch KERNEL<DL> for the head dim D, setting the caller's `status` */
#define MS_DISPATCH_DL(D, KERNEL, ...)                                                        \
    switch (ms_dl_of(D)) {                                                                    \
    case 1: status = ms_launch_dl(KERNEL<1>, __VA_ARGS__); break;                             \
    case 2: status = ms_launch_dl(KERNEL<2>, __VA_ARGS__); break;                             \
    case 4: status = ms_launch_dl(KERNEL<4>, __VA_ARGS__); break;                             \
    default: status = ms_launch_dl(KERNEL<8>, __VA_ARGS__); break;                            \
    }

template <class Kernel>
static int ms_launch_dl(Kernel kernel, int64_t blocks, int threads, size_t smem, cudaStream_t stream,
                        const msattn_ms_params *p) {
    const int s = ms_set_smem(kernel, smem);
    if (s != MSATTN_OK) return s;
    kernel<<<(unsigned)blocks, threads, smem, stream>>>(*p);
    return ms_launch_status();
}

/* launch a tensor-core kernel on `blocks` blocks of 128 threads (none: nothing to do) */
template <class Kernel>
static int ms_launch_tc(Kernel kernel, int64_t blocks, size_t smem, cudaStream_t stream, const msattn_ms_params *p) {
    if (blocks == 0) return MSATTN_OK;
    if (blocks > INT_MAX) return MSATTN_ERR_ARG;
    return ms_launch_dl(kernel, blocks, 128, smem, stream, p);
}

/* the grid of the tensor-core forward and pass 1: 64-row tiles of every group's (query, head) rows */
static int64_t ms_tc_query_blocks(const MsDims &d) { return d.BH * d.G * msattn_cdiv(d.hg * d.span, MS_TC_ROWS); }

template <int D, bool BF16>
static int ms_fwd_tc_launch(const msattn_ms_params *p, const MsDims &d, cudaStream_t stream) {
    return ms_launch_tc(ms_fwd_tc_kernel<D, BF16>, ms_tc_query_blocks(d), ms_fwd_tc_smem<D>(), stream, p);
}

template <int D, bool BF16>
static int ms_bwd_dq_tc_launch(const msattn_ms_params *p, const MsDims &d, cudaStream_t stream) {
    return ms_launch_tc(ms_bwd_dq_tc_kernel<D, BF16>, ms_tc_query_blocks(d), ms_bwd_dq_tc_smem<D>(), stream, p);
}

template <int D, bool BF16>
static int ms_bwd_dkv_tc_launch(const msattn_ms_params *p, const MsDims &d, cudaStream_t stream) {
    return ms_launch_tc(ms_bwd_dkv_tc_kernel<D, BF16>, d.BH * d.NK * msattn_cdiv(p->block_k, MS_TC_KT),
                        ms_bwd_dkv_tc_smem<D>(), stream, p);
}

/* the tensor-core kernels: 16-bit inputs, D in {16, 32, 64, 128} */
static bool ms_tc_applies(const msattn_ms_params *p) {
    return (p->dtype == MSATTN_BF16 || p->dtype == MSATTN_F16) &&
           (p->D == 16 || p->D == 32 || p->D == 64 || p->D == 128);
}

/* LAUNCH<D, BF16>(p, d, stream) for the call's head dim and dtype */
#define MS_TC_DISPATCH(LAUNCH, p, d, stream)                                                     \
    ((p)->dtype == MSATTN_BF16                                                                  \
         ? ((p)->D == 16 ? LAUNCH<16, true>(p, d, stream) : (p)->D == 32 ? LAUNCH<32, true>(p, d, stream) \
            : (p)->D == 64 ? LAUNCH<64, true>(p, d, stream) : LAUNCH<128, true>(p, d, stream))  \
         : ((p)->D == 16 ? LAUNCH<16, false>(p, d, stream) : (p)->D == 32 ? LAUNCH<32, false>(p, d, stream) \
            : (p)->D == 64 ? LAUNCH<64, false>(p, d, stream) : LAUNCH<128, false>(p, d, stream)))

int msattn_ms_fwd_cuda(const msattn_ms_params *p, void *stream) {
    int status = ms_check(p);
    if (status != MSATTN_OK) return status;
    const MsDims d = ms_dims(*p);
    if (ms_tc_applies(p)) return MS_TC_DISPATCH(ms_fwd_tc_launch, p, d, (cudaStream_t)stream);
    const int64_t blocks = ms_query_blocks(p, d);
    if (blocks == 0) return MSATTN_OK;
    if (blocks > INT_MAX) return MSATTN_ERR_ARG;
    MS_DISPATCH_DL(p->D, ms_fwd_kernel, blocks, MS_WARPS * 32, ms_fwd_smem(d), (cudaStream_t)stream, p);
    return status;
}

int msattn_ms_invert_cuda(const msattn_ms_params *p, int32_t *inv_offsets, int32_t *inv_groups, void *stream) {
    const MsDims d = ms_dims(*p);
    if (d.BH == 0) return MSATTN_OK;
    if (d.BH > INT_MAX || d.G * d.T >= INT_MAX || d.NK >= INT_MAX) return MSATTN_ERR_ARG;
    ms_invert_kernel<<<(unsigned)d.BH, 256, 0, (cudaStream_t)stream>>>(*p, inv_offsets, inv_groups);
    return ms_launch_status();
}

int msattn_ms_bwd_dq_cuda(const msattn_ms_params *p, void *stream) {
    int status = ms_check(p);
    if (status != MSATTN_OK) return status;
    const MsDims d = ms_dims(*p);
    if (ms_tc_applies(p)) return MS_TC_DISPATCH(ms_bwd_dq_tc_launch, p, d, (cudaStream_t)stream);
    const int64_t blocks = ms_query_blocks(p, d);
    if (blocks == 0) return MSATTN_OK;
    if (blocks > INT_MAX) return MSATTN_ERR_ARG;
    MS_DISPATCH_DL(p->D, ms_bwd_dq_kernel, blocks, MS_WARPS * 32, ms_bwd_dq_smem(d), (cudaStream_t)stream, p);
    return status;
}

int msattn_ms_bwd_dkv_cuda(const msattn_ms_params *p, void *stream) {
    int status = ms_check(p);
    if (status != MSATTN_OK) return status;
    const MsDims d = ms_dims(*p);
    if (ms_tc_applies(p)) return MS_TC_DISPATCH(ms_bwd_dkv_tc_launch, p, d, (cudaStream_t)stream);
    const int KT = ms_dkv_keys(p->block_k);
    const int64_t blocks = d.BH * d.NK * msattn_cdiv(p->block_k, KT);
    if (blocks == 0) return MSATTN_OK;
    if (blocks > INT_MAX) return MSATTN_ERR_ARG;
    MS_DISPATCH_DL(p->D, ms_bwd_dkv_kernel, blocks, KT / MS_KPW * 32, ms_bwd_dkv_smem(d, KT),
                   (cudaStream_t)stream, p);
    return status;
}
