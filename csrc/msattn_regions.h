/*
 * msattn_regions.h -- region, group and position arithmetic of MS attention (DESIGN section 1, 3).
 *
 * The one place where "which tokens does a group see, at which position" is written down. Header
 * only, C99, usable from C, C++ and CUDA (MSATTN_HD marks host+device functions), so the CPU kernels,
 * the CUDA kernels and the glue cannot disagree; the CPU tests exercise every function here.
 *
 * Positions are absolute, 0..N-1; the call holds the last Nq of them as queries. "ga" is an absolute
 * group number, "gi = ga - first group" its index in the call's selection tensor.
 * span = merge * block_q tokens per group; require span % block_k == 0.
 */
#ifndef MSATTN_REGIONS_H
#define MSATTN_REGIONS_H

#include <stdint.h>

#if defined(__CUDACC__)
#define MSATTN_HD __host__ __device__ static inline
#else
#define MSATTN_HD static inline
#endif

typedef struct {
    int64_t begin, end; /* [begin, end), empty when begin >= end */
} msattn_range;

MSATTN_HD int64_t msattn_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
MSATTN_HD int64_t msattn_min64(int64_t a, int64_t b) { return a < b ? a : b; }
MSATTN_HD int64_t msattn_max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* tokens of a query group */
MSATTN_HD int64_t msattn_span(int block_q, int merge) { return (int64_t)block_q * merge; }

/* number of key regions, NK */
MSATTN_HD int64_t msattn_num_key_regions(int64_t N, int block_k) { return msattn_cdiv(N, block_k); }

/* first absolute query region / group holding a query of the call, and how many there are */
MSATTN_HD int64_t msattn_first_query_region(int64_t N, int64_t Nq, int block_q) {
    return (N - Nq) / block_q;
}
MSATTN_HD int64_t msattn_num_query_regions(int64_t N, int64_t Nq, int block_q) {
    return Nq <= 0 ? 0 : (N - 1) / block_q - (N - Nq) / block_q + 1;
}
MSATTN_HD int64_t msattn_first_group(int64_t N, int64_t Nq, int64_t span) { return (N - Nq) / span; }
MSATTN_HD int64_t msattn_num_groups(int64_t N, int64_t Nq, int64_t span) {
    return Nq <= 0 ? 0 : (N - 1) / span - (N - Nq) / span + 1;
}

/* tokens of key region j: [j*CK, min((j+1)*CK, N)) */
MSATTN_HD msattn_range msattn_key_region(int64_t j, int block_k, int64_t N) {
    msattn_range r = {j * block_k, msattn_min64((j + 1) * (int64_t)block_k, N)};
    return r;
}

/* positions of absolute query region a held in the call */
MSATTN_HD msattn_range msattn_query_region(int64_t a, int block_q, int64_t N, int64_t Nq) {
    msattn_range r = {msattn_max64(a * block_q, N - Nq), msattn_min64((a + 1) * (int64_t)block_q, N)};
    return r;
}

/* positions of absolute group ga held in the call (its queries) */
MSATTN_HD msattn_range msattn_group_queries(int64_t ga, int64_t span, int64_t N, int64_t Nq) {
    msattn_range r = {msattn_max64(ga * span, N - Nq), msattn_min64((ga + 1) * span, N)};
    return r;
}

/* the group's own tokens [s_g, e_g), capped at N: every query of the group sees them (causal: up to
 * its own position) */
MSATTN_HD msattn_range msattn_group_own_keys(int64_t ga, int64_t span, int64_t N) {
    msattn_range r = {ga * span, msattn_min64((ga + 1) * span, N)};
    return r;
}

/* key regions inside the group's own span (never candidates) */
MSATTN_HD msattn_range msattn_group_own_regions(int64_t ga, int64_t span, int block_k, int64_t N) {
    msattn_range t = msattn_group_own_keys(ga, span, N);
    msattn_range r = {t.begin / block_k, msattn_cdiv(t.end, block_k)};
    return r;
}

/* is key region j a candidate of group ga? causal: it ends at or before s_g; non-causal: it lies
 * outside the group's own span (emptiness under a padding mask is checked by the caller) */
MSATTN_HD int msattn_is_candidate(int64_t j, int64_t ga, int64_t span, int block_k, int64_t N,
                                  int causal) {
    msattn_range own = msattn_group_own_regions(ga, span, block_k, N);
    if (causal) return (j + 1) * (int64_t)block_k <= ga * span;
    return j < own.begin || j >= own.end;
}

/* the key regions a ranking group takes before any ranked one when `local` > 0: the `local` regions
 * just before its own span, [s_g/CK - local, s_g/CK) (those holding no valid key excepted, by the
 * caller); they count towards topk, so local <= topk */
MSATTN_HD msattn_range msattn_local_regions(int64_t ga, int64_t span, int block_k, int local) {
    const int64_t end = ga * span / block_k;
    msattn_range r = {msattn_max64(end - local, 0), end};
    return r;
}

/* the absolute group whose own span holds key position t */
MSATTN_HD int64_t msattn_group_of_position(int64_t t, int64_t span) { return t / span; }

// ----------------------------------------------------------------------------------------------
// positions for rope="selected" (DESIGN section 3): the i-th selected region's tokens get i*CK + t,
// the group's own tokens n_sel*CK + (pos - s_g).

MSATTN_HD int64_t msattn_compact_selected(int64_t i, int64_t t_in_region, int block_k) {
    return i * block_k + t_in_region;
}
MSATTN_HD int64_t msattn_compact_own(int64_t n_sel, int block_k, int64_t pos, int64_t ga,
                                     int64_t span) {
    return n_sel * block_k + (pos - ga * span);
}
/* the largest compact position + 1 any group can use: the size of the cos/sin table it needs */
MSATTN_HD int64_t msattn_compact_len(int topk, int block_k, int64_t span) {
    return (int64_t)topk * block_k + span;
}

// ----------------------------------------------------------------------------------------------
// SelfExtend (DESIGN section 3): distance i - j inside the neighbour window W is kept; beyond it the
// distance is floor(i/G) - floor(j/G) + W - floor(W/G). Expressed as positions of the rotated
// vectors: the grouped query sits at floor(i/G) + W - floor(W/G), the grouped key at floor(j/G).

MSATTN_HD int64_t msattn_self_extend_query_pos(int64_t i, int group, int window) {
    return i / group + window - window / group;
}
MSATTN_HD int64_t msattn_self_extend_key_pos(int64_t j, int group) { return j / group; }
MSATTN_HD int msattn_self_extend_is_neighbour(int64_t i, int64_t j, int window) {
    return i - j < window;
}

#endif /* MSATTN_REGIONS_H */
