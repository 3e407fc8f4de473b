/*
 * msattn.h -- the C ABI of msattn's kernels.
 *
 * Everything a kernel needs arrives in one params struct per op: raw data pointers, strides in
 * elements, sizes and flags. No torch, no CUDA types: the CPU kernels (csrc/cpu), the CUDA kernels
 * (csrc/cuda) and the ATen glue (csrc/torch) all include this file and nothing else of each other.
 *
 * Kernels never thread on their own. Each CPU entry point takes a work range [begin, end) over the
 * items its comment names; the caller (at::parallel_for in the glue, or a test harness) spreads the
 * ranges over threads. Every entry point returns MSATTN_OK or an error code and never aborts.
 *
 * Dimension legend
 *   B    batch                     Hq   query heads          Hkv  key/value heads (Hq % Hkv == 0)
 *   N    key length (positions 0..N-1)                       Nq   query length: the last Nq positions
 *   D    head dim                  CQ   block_q              CK   block_k
 *   G    query groups holding at least one query of the call (msattn_num_groups)
 *   NK   key regions, ceil(N / CK)  NA  query regions holding a query of the call
 *   T    topk (selected key regions per group)
 */
#ifndef MSATTN_H
#define MSATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ----------------------------------------------------------------------------------------------
// common types

/* the largest head dim D: the kernels' fixed-size row buffers have this many entries, and the ATen
   glue refuses larger D (csrc/torch/checks.h) */
#define MSATTN_MAX_HEAD_DIM 256

/* the largest region, group, top-k and position counts the glue accepts: every product of them that a
   kernel forms fits in int64, and each alone fits in int */
#define MSATTN_MAX_BLOCK (1 << 20)
#define MSATTN_MAX_SPAN (1 << 24)
#define MSATTN_MAX_TOKENS ((int64_t)1 << 31)

enum {
    MSATTN_OK = 0,
    MSATTN_ERR_ARG = 1,    /* a size or flag outside what the kernel supports */
    MSATTN_ERR_DTYPE = 2,  /* a dtype the kernel was not built for */
    MSATTN_ERR_NOMEM = 3,  /* a scratch buffer too small */
    /* [CUDA addition] a CUDA call or launch failed; cudaGetLastError() holds the reason */
    MSATTN_ERR_CUDA = 4,
};

typedef enum {
    MSATTN_F32 = 0,
    MSATTN_F64 = 1,
    MSATTN_BF16 = 2,
    MSATTN_F16 = 3,
} msattn_dtype;

/* A strided 4-D view (batch, head, token, dim); strides in elements. */
typedef struct {
    void *data;
    int64_t sb, sh, sn, sd;
} msattn_view;

/* RoPE applied inside a kernel: cos/sin tables of shape (len, dim/2) as fp32, rows contiguous.
 * Pairs are (x[i], x[i + dim/2]) like HuggingFace's rotate_half; dims >= dim pass through.
 * cos == NULL means no rotation. */
typedef struct {
    const float *cos, *sin;
    int len, dim;
} msattn_rope;

// ----------------------------------------------------------------------------------------------
// MS attention: selection (DESIGN section 1, steps 1-5)

/* Key-region summaries: per (b, h, region) the float32 sum of the valid keys, added token by token in
 * position order (so a cache that appends tokens reproduces the from-scratch sums bit for bit), and
 * their number. A region's score for query region a is (qbar_a . ksum_j) / kcount_j in double. */
typedef struct {
    float *sum;                   /* (B, Hkv, NKcap, D): region stride D, dim stride 1 */
    int64_t sum_sb, sum_sh;
    int32_t *count;               /* (B, Hkv, NKcap) */
    int64_t count_sb, count_sh;
} msattn_region_sums;

typedef struct {
    int B, Hq, Hkv, Nq, N, D;
    int block_q, block_k, merge, topk, causal;
    int local;                    /* 0 <= local <= topk: a ranking group first takes the valid regions of
                                   * msattn_local_regions, then topk - (their number) ranked ones */
    int coarse_regions;           /* 0: exact ranking. >= 1: multi-scale ranking: coarse region J holds the
                                   * key regions [J * coarse_regions, (J + 1) * coarse_regions); each ranking
                                   * group ranks the coarse regions holding one of its candidates by
                                   * qg . csum_J / ccount_J, qg the mean of its ranking query regions' qbar,
                                   * keeps the best coarse_topk, and its query regions rank only the
                                   * candidates inside them (their lists may then hold fewer than T) */
    int coarse_topk;              /* >= 1 with coarse_regions; 0 without */
    msattn_dtype dtype;
    msattn_view q;                /* (B, Hq, Nq, D) */
    msattn_view k;                /* (B, Hkv, N, D) */
    const uint8_t *key_mask;      /* (B, N) at row stride mask_sb, 1 = real token; NULL: all real */
    int64_t mask_sb;
    msattn_region_sums ksum;      /* the N keys' region sums: a workspace, or a cache's */
    msattn_region_sums csum;      /* multi-scale only, a workspace: (B, Hkv, NC, D) and (B, Hkv, NC), NC = cdiv(NK,
                                   * coarse_regions): the coarse regions' sums, each the float rounding of its
                                   * regions' float sums added in double in ascending order, and counts */
    int sums_given;               /* 1: ksum already holds the sums of all N keys (a cache's) */
    /* workspaces, written by msattn_region_means_cpu and read by msattn_select_cpu */
    double *qbar;                 /* (B, Hkv, NA, D) query-region means summed over the GQA group */
    int32_t *qcount;              /* (B, Hkv, NA)    valid queries per query region */
    float *kpanel;                /* CPU only, or NULL: (B, Hkv, NP, D + 2, 64), NP = cdiv(NK, 64), the key-region
                                   * sums tile-major for the blocked screen: panel i holds regions
                                   * 64i..64i+63, rows 0..D-1 their sums transposed, row D 1 / count,
                                   * row D + 1 a bound >= |sum| / count (zeros past NK and for empty
                                   * regions); written by pass 1 when msattn_select_panel_floats > 0 */
    uint16_t *kpanel16;           /* CPU only, or NULL: the same sums as two bf16 parts for the AMX screen,
                                   * (B, Hkv, NP, 2, 64 * DP), DP = D rounded up to 32, high parts then low
                                   * parts in AMX's layout (simd.h, msattn_amx_panel_offset); written by
                                   * pass 1 when msattn_select_panel16_elems > 0 */
    /* output */
    int32_t *index;               /* (B, Hkv, G, T) ascending, -1 padded, contiguous */
    /* [CUDA addition] msattn_select_cuda only, ignored by the CPU kernels: cuda_slots blocks share
     * the (b, h, g) items, block i using msattn_select_cuda_slot_bytes(p) bytes of device memory
     * at cuda_scratch + i * that (candidate scores, per-region lists, sort buffer) */
    void *cuda_scratch;
    int cuda_slots;
} msattn_select_params;

/* items: (b, h, region) for b < B, h < Hkv, region < NK + NA (key regions first; skipped when
 * sums_given) */
int msattn_region_means_cpu(const msattn_select_params *p, int64_t begin, int64_t end);
/* Append tokens [t0, t1) of k (B, Hkv, t1 - t0, D), whose padding mask (B, t1 - t0) is `mask` (NULL:
 * all real), to the region sums; the sums must hold exactly tokens [0, t0). items: (b, h) */
int msattn_region_sums_append_cpu(msattn_region_sums s, msattn_view k, msattn_dtype dtype,
                                  const uint8_t *mask, int64_t mask_sb, int Hkv, int D, int block_k,
                                  int64_t t0, int64_t t1, int64_t begin, int64_t end);
/* multi-scale only, after msattn_region_means_cpu: the coarse regions' sums. items: (b, h, J) for J < NC */
int msattn_coarse_sums_cpu(const msattn_select_params *p, int64_t begin, int64_t end);
/* items: (b, h, g) for b < B, h < Hkv, g < G; consecutive groups of one (b, h) score their candidates
 * together, up to msattn_select_tile_groups(p) of them: give it ranges of that many */
int msattn_select_cpu(const msattn_select_params *p, int64_t begin, int64_t end, void *scratch);
int64_t msattn_select_tile_groups(const msattn_select_params *p);
/* floats of the kpanel workspace the CPU selection uses (0: it screens nothing, kpanel may be NULL) */
size_t msattn_select_panel_floats(const msattn_select_params *p);
/* elements of the kpanel16 workspace (0: the instruction set in use has no AMX screen) */
size_t msattn_select_panel16_elems(const msattn_select_params *p);
size_t msattn_select_scratch_bytes(const msattn_select_params *p);

// ----------------------------------------------------------------------------------------------
// MS attention: forward and backward over a selection (DESIGN section 1, steps 6-7)

typedef struct {
    int B, Hq, Hkv, Nq, N, D;
    int block_q, block_k, merge, topk, causal;
    double scale;                 /* softmax scale, usually 1/sqrt(D) */
    msattn_dtype dtype;           /* of q, k, v, out, dout, dq, dk, dv */
    msattn_view q;                /* (B, Hq, Nq, D) */
    msattn_view k, v;             /* (B, Hkv, N, D) */
    msattn_view out;              /* (B, Hq, Nq, D) forward output, backward input */
    void *lse;                    /* (B, Hq, Nq) contiguous, float (double for F64); -inf: no key */
    const int32_t *index;         /* (B, Hkv, G, T) from msattn_select_cpu */
    const uint8_t *key_mask;      /* (B, N) at row stride mask_sb, or NULL */
    int64_t mask_sb;
    msattn_rope rope;             /* rope="selected": rotate with compact positions, else cos NULL */
    /* backward only */
    msattn_view dout;             /* (B, Hq, Nq, D) */
    msattn_view dq;               /* (B, Hq, Nq, D) */
    msattn_view dk, dv;           /* (B, Hkv, N, D) */
    const void *dlse;             /* (B, Hq, Nq) contiguous gradient of lse, lse's dtype, or NULL */
    float *delta;                 /* (B, Hq, Nq) workspace: rowsum(dout * out) - dlse, by pass 1 */
    const int32_t *inv_offsets;   /* (B, Hkv, NK + 1) workspace: CSR offsets of the inverted index */
    const int32_t *inv_groups;    /* (B, Hkv, G * T) workspace: choosing groups, ascending per region */
    int kv_blocks;                /* key blocks per (b, h) for backward pass 2, >= 1 */
} msattn_ms_params;

/* forward; items: (b, h, g) for b < B, h < Hkv, g < G */
int msattn_ms_fwd_cpu(const msattn_ms_params *p, int64_t begin, int64_t end, void *scratch);
size_t msattn_ms_fwd_scratch_bytes(const msattn_ms_params *p);
/* inverted index for backward pass 2; items: (b, h); writes inv_offsets and inv_groups */
int msattn_ms_invert_cpu(const msattn_ms_params *p, int32_t *inv_offsets, int32_t *inv_groups,
                         int64_t begin, int64_t end);
/* backward pass 1: delta and dq; items: (b, h, g) */
int msattn_ms_bwd_dq_cpu(const msattn_ms_params *p, int64_t begin, int64_t end, void *scratch);
/* backward pass 2: dk and dv; items: (b, h, key block) for key block < kv_blocks */
int msattn_ms_bwd_dkv_cpu(const msattn_ms_params *p, int64_t begin, int64_t end, void *scratch);
size_t msattn_ms_bwd_scratch_bytes(const msattn_ms_params *p);
/* naive twins, accumulating in double. fwd items: (b, h, g); bwd items: (b, h) and it writes
 * dq, dk, dv of those heads in full (no delta or inverted index needed). */
int msattn_ms_fwd_ref_cpu(const msattn_ms_params *p, int64_t begin, int64_t end);
int msattn_ms_bwd_ref_cpu(const msattn_ms_params *p, int64_t begin, int64_t end);

// ----------------------------------------------------------------------------------------------
// [SelfExtend] dense attention with SelfExtend positions (DESIGN section 3, csrc/cpu/self_extend.c)
//
// q and k arrive un-rotated; the kernel rotates them with the tables in `rope`. A query at position
// i (the last Nq of N, causal mask bottom-right) scores key j with
//   |i - j| < W            q rotated at i, k at j (ordinary RoPE, "neighbour")
//   i - j >= W             q rotated at floor(i/G) + W - floor(W/G), k at floor(j/G) ("grouped")
//   j - i >= max(W, 1)     non-causal only: q at floor(i/G) - W + floor(W/G), k at floor(j/G), the
//                          mirror image, so a grouped distance keeps its sign
// (msattn_regions.h: msattn_self_extend_*). sliding_window > 0 also hides keys with
// |i - j| >= sliding_window (Mistral). Every rotation stays within positions -(N-1)..N-1, and a
// negative position rotates backwards, so tables of N rows suffice.

typedef struct {
    int B, Hq, Hkv, Nq, N, D;
    int causal;
    int group_size;               /* G >= 1 */
    int window;                   /* W >= 0: distances below W keep their positions */
    int sliding_window;           /* > 0: only keys with |i - j| < sliding_window are visible; 0: all */
    double scale;                 /* softmax scale, usually 1/sqrt(D) */
    msattn_dtype dtype;           /* of q, k, v, out, dout, dq, dk, dv */
    msattn_view q;                /* (B, Hq, Nq, D) un-rotated */
    msattn_view k, v;             /* (B, Hkv, N, D), k un-rotated */
    msattn_view out;              /* (B, Hq, Nq, D) forward output, backward input */
    void *lse;                    /* (B, Hq, Nq) contiguous, float (double for F64); -inf: no key */
    const uint8_t *key_mask;      /* (B, N) at row stride mask_sb, 1 = real token; NULL: all real */
    int64_t mask_sb;
    msattn_rope rope;             /* required: cos/sin (len >= N, rotary_dim / 2) */
    int block_q;                  /* queries per item of the forward and of backward pass 1, >= 1 */
    int block_kv;                 /* keys per item of backward pass 2, >= 1 */
    /* backward only */
    msattn_view dout;             /* (B, Hq, Nq, D) */
    msattn_view dq;               /* (B, Hq, Nq, D) */
    msattn_view dk, dv;           /* (B, Hkv, N, D) */
    const void *dlse;             /* (B, Hq, Nq) contiguous gradient of lse, lse's dtype, or NULL */
    float *delta;                 /* (B, Hq, Nq) workspace: rowsum(dout * out) - dlse, by pass 1 */
} msattn_self_extend_params;

/* forward; items (b, h, query block) for b < B, h < Hkv, query block < ceil(Nq / block_q) */
int msattn_self_extend_fwd_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end, void *scratch);
size_t msattn_self_extend_fwd_scratch_bytes(const msattn_self_extend_params *p);
/* backward pass 1: delta and dq; items (b, h, query block) */
int msattn_self_extend_bwd_dq_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end, void *scratch);
/* backward pass 2: dk and dv; items (b, h, key block) for key block < ceil(N / block_kv) */
int msattn_self_extend_bwd_dkv_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end, void *scratch);
size_t msattn_self_extend_bwd_scratch_bytes(const msattn_self_extend_params *p);
/* naive twins, accumulating in double (they also serve F64). fwd items: (b, hq) for hq < Hq;
 * bwd items: (b, h), writing dq, dk, dv of those heads in full (no delta needed) */
int msattn_self_extend_fwd_ref_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end);
int msattn_self_extend_bwd_ref_cpu(const msattn_self_extend_params *p, int64_t begin, int64_t end);
// [/SelfExtend]

// ----------------------------------------------------------------------------------------------
// [Infini-attention] one segment with a compressive memory (DESIGN section 3, csrc/cpu/infini.c)
//
// Per batch b and KV head h, a segment of N keys (positions 0..N-1, the last Nq of them queries),
// sigma(x) = ELU(x) + 1, g = sigmoid(beta[hq]) per query head:
//   out = g * sigma(q) M / (sigma(q) . z + eps) + (1 - g) * causal_softmax(q k^T * scale) v
//   M' = M + sigma(K)^T V                                          (linear)
//   M' = M + sigma(K)^T (V - sigma(K) M / (sigma(K) z + eps))       (delta rule, old M and z)
//   z' = z + sum_t sigma(K_t)                                       (valid keys only)
// One memory per KV head, shared by its query heads (GQA). M is (D, D) and z (D), float32 (float64
// for F64 inputs), contiguous. The eps makes an empty memory (M = 0, z = 0) retrieve exactly 0.

#define MSATTN_INFINI_EPS 1e-6

typedef struct {
    int B, Hq, Hkv, Nq, N, D;
    int causal;                   /* local attention causal inside the segment (bottom-right) */
    int delta_rule;               /* 1: delta-rule memory update, 0: linear */
    int update_memory;            /* 0: the segment is not written (mem_out = mem, norm_out = norm) */
    double scale;                 /* softmax scale, usually 1/sqrt(D) */
    double eps;                   /* retrieval denominator guard, MSATTN_INFINI_EPS */
    msattn_dtype dtype;           /* of q, k, v, out, out_local, dout, dout_local, dq, dk, dv */
    msattn_view q;                /* (B, Hq, Nq, D) */
    msattn_view k, v;             /* (B, Hkv, N, D) */
    const double *beta;           /* (Hq) gate logits */
    const void *mem;              /* (B, Hkv, D, D) contiguous, float (double for F64) */
    const void *norm;             /* (B, Hkv, D) contiguous, like mem */
    const uint8_t *key_mask;      /* (B, N) at row stride mask_sb, 1 = real token; NULL: all real */
    int64_t mask_sb;
    int q_block;                  /* queries per item of the forward and backward pass 1, >= 1 */
    int k_block;                  /* keys per item of backward pass 2, >= 1 */
    msattn_rope rope;             /* cos NULL: q and k are used as given. Else they arrive un-rotated:
                                   * the local attention rotates them with their positions in the
                                   * segment (query i at N - Nq + i, key t at t; len >= N) and the
                                   * memory reads and writes them un-rotated */
    /* forward outputs, backward inputs */
    msattn_view out;              /* (B, Hq, Nq, D) the gated mix */
    msattn_view out_local;        /* (B, Hq, Nq, D) A_loc alone */
    void *lse;                    /* (B, Hq, Nq) contiguous, float (double for F64); -inf: no key */
    void *mem_out, *norm_out;     /* like mem, norm (forward only) */
    /* backward only */
    msattn_view dout;             /* (B, Hq, Nq, D) */
    msattn_view dout_local;       /* (B, Hq, Nq, D) gradient of out_local, data NULL: zero */
    const void *dlse;             /* (B, Hq, Nq) contiguous like lse, or NULL */
    const void *dmem_out;         /* (B, Hkv, D, D) gradient of mem_out like mem, or NULL: zero */
    const void *dnorm_out;        /* (B, Hkv, D) gradient of norm_out, or NULL: zero */
    msattn_view dq;               /* (B, Hq, Nq, D) */
    msattn_view dk, dv;           /* (B, Hkv, N, D) */
    void *dmem, *dnorm;           /* (B, Hkv, D, D), (B, Hkv, D) like mem */
    double *dbeta;                /* (B, Hq) contiguous: per batch element, summed over b by the caller */
    float *delta;                 /* (B, Hq, Nq) workspace: rowsum(dA_loc * A_loc) - dlse, by pass 1 */
} msattn_infini_params;

/* local attention, retrieval and mix; items: (b, h, query block) for b < B, h < Hkv,
 * query block < ceil(Nq / q_block) */
int msattn_infini_fwd_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch);
/* the memory write: mem_out, norm_out; items: (b, h) */
int msattn_infini_update_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch);
size_t msattn_infini_fwd_scratch_bytes(const msattn_infini_params *p);  /* both forward kernels */
/* backward pass 1: dq and delta; items: (b, h, query block) */
int msattn_infini_bwd_dq_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch);
/* backward pass 2: dk and dv (local attention and memory write); items: (b, h, key block) for
 * key block < ceil(N / k_block); needs delta from pass 1 */
int msattn_infini_bwd_dkv_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch);
/* backward pass 3: dmem, dnorm and dbeta of the group's heads; items: (b, h) */
int msattn_infini_bwd_dmem_cpu(const msattn_infini_params *p, int64_t begin, int64_t end, void *scratch);
size_t msattn_infini_bwd_scratch_bytes(const msattn_infini_params *p);  /* all three passes */
/* naive twins in double, items (b, h): the forward writes out, out_local, lse, mem_out, norm_out;
 * the backward dq, dk, dv, dmem, dnorm and dbeta of those heads (no delta workspace needed) */
int msattn_infini_fwd_ref_cpu(const msattn_infini_params *p, int64_t begin, int64_t end);
int msattn_infini_bwd_ref_cpu(const msattn_infini_params *p, int64_t begin, int64_t end);
// [/Infini-attention]

// ----------------------------------------------------------------------------------------------
// CUDA launchers (csrc/cuda): the same params with device pointers; `stream` is a cudaStream_t.
// Each launches over all items (the grid spreads them) and returns a status, never aborts.

int msattn_region_means_cuda(const msattn_select_params *p, void *stream);
/* multi-scale only, after msattn_region_means_cuda: the coarse regions' sums (msattn_coarse_sums_cpu's) */
int msattn_coarse_sums_cuda(const msattn_select_params *p, void *stream);
int msattn_select_cuda(const msattn_select_params *p, void *stream);
/* msattn_region_sums_append_cpu on the GPU (same arguments, device pointers; B * Hkv items at once) */
int msattn_region_sums_append_cuda(msattn_region_sums s, msattn_view k, msattn_dtype dtype, const uint8_t *mask,
                                   int64_t mask_sb, int B, int Hkv, int D, int block_k, int64_t t0, int64_t t1,
                                   void *stream);
/* [CUDA addition] device workspace of one selection block (see cuda_scratch) */
size_t msattn_select_cuda_slot_bytes(const msattn_select_params *p);
int msattn_ms_fwd_cuda(const msattn_ms_params *p, void *stream);
int msattn_ms_invert_cuda(const msattn_ms_params *p, int32_t *inv_offsets, int32_t *inv_groups,
                          void *stream);
int msattn_ms_bwd_dq_cuda(const msattn_ms_params *p, void *stream);
int msattn_ms_bwd_dkv_cuda(const msattn_ms_params *p, void *stream);

// ----------------------------------------------------------------------------------------------
// SIMD dispatch (csrc/cpu/simd.c)

/* "amx" (AVX-512 with AMX tiles for the selection screen), "avx512", "avx2" or "scalar": the instruction set
 * the CPU kernels use now. */
const char *msattn_isa_name(void);
/* Force an instruction set ("amx", "avx512", "avx2", "scalar", or "auto" for the best this CPU has).
 * Returns MSATTN_ERR_ARG for an unknown name or one this CPU cannot run. */
int msattn_isa_set(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* MSATTN_H */
