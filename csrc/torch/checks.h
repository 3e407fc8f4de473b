// checks.h -- argument checks at the boundary, shared by the CPU and CUDA glue. Every message
// names the argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "../msattn.h"
#include "../msattn_regions.h"

namespace msattn {

inline std::string shape_str(const at::Tensor &t) {
    std::string s = "(";
    for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
    return s + ")";
}

inline msattn_dtype dtype_of(const at::Tensor &t) {
    switch (t.scalar_type()) {
    case at::kFloat: return MSATTN_F32;
    case at::kDouble: return MSATTN_F64;
    case at::kBFloat16: return MSATTN_BF16;
    case at::kHalf: return MSATTN_F16;
    default: TORCH_CHECK(false, "msattn: unsupported dtype ", t.scalar_type());
    }
}

inline msattn_view view_of(const at::Tensor &t) {
    return msattn_view{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// q (B, Hq, Nq, D), k (B, Hkv, N, D), and v like k when given
inline void check_qkv(const at::Tensor &q, const at::Tensor &k, const at::Tensor *v) {
    TORCH_CHECK(q.dim() == 4, "msattn: q must be 4-D (B, Hq, Nq, D), got shape ", shape_str(q));
    TORCH_CHECK(k.dim() == 4, "msattn: k must be 4-D (B, Hkv, N, D), got shape ", shape_str(k));
    const auto dt = q.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "msattn: q must be float32, float64, bfloat16 or float16, got ", dt);
    TORCH_CHECK(k.scalar_type() == dt, "msattn: k must have q's dtype ", dt, ", got ", k.scalar_type());
    TORCH_CHECK(k.device() == q.device(), "msattn: k must be on q's device ", q.device(), ", got ", k.device());
    TORCH_CHECK(k.size(0) == q.size(0), "msattn: k must have q's batch size ", q.size(0), ", got k of shape ",
                shape_str(k));
    TORCH_CHECK(k.size(3) == q.size(3), "msattn: k must have q's head dim ", q.size(3), ", got k of shape ",
                shape_str(k));
    TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= MSATTN_MAX_HEAD_DIM, "msattn: head dim must be in [1, ",
                MSATTN_MAX_HEAD_DIM, "], got q of shape ", shape_str(q));
    TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                "msattn: q heads must be a multiple of k heads (GQA), got q ", shape_str(q), " and k ",
                shape_str(k));
    TORCH_CHECK(q.size(2) <= k.size(2), "msattn: q may not be longer than k (queries are the last Nq of N "
                "positions), got q ", shape_str(q), " and k ", shape_str(k));
    TORCH_CHECK(k.size(2) < MSATTN_MAX_TOKENS, "msattn: k longer than 2^31 - 1 tokens: ", shape_str(k));
    if (v) {
        TORCH_CHECK(v->dim() == 4 && v->sizes() == k.sizes(), "msattn: v must have k's shape ", shape_str(k),
                    ", got ", shape_str(*v));
        TORCH_CHECK(v->scalar_type() == dt, "msattn: v must have q's dtype ", dt, ", got ", v->scalar_type());
        TORCH_CHECK(v->device() == q.device(), "msattn: v must be on q's device ", q.device(), ", got ",
                    v->device());
    }
}

// local: the regions just before each ranking group that it takes first, counted in topk
inline void check_local(int64_t local, int64_t topk) {
    TORCH_CHECK(local >= 0 && local <= topk, "msattn: local must lie in [0, topk = ", topk, "], got ", local);
}

// multi-scale ranking: coarse_regions key regions per coarse region (0: exact ranking), coarse_topk kept
inline void check_coarse(int64_t coarse_regions, int64_t coarse_topk) {
    TORCH_CHECK(coarse_regions >= 0 && coarse_regions <= MSATTN_MAX_BLOCK, "msattn: coarse_regions must lie in [0, ",
                MSATTN_MAX_BLOCK, "] (0: exact selection), got ", coarse_regions);
    if (coarse_regions == 0) {
        TORCH_CHECK(coarse_topk == 0, "msattn: coarse_topk needs coarse_regions >= 1 (multi-scale selection), got "
                    "coarse_topk ", coarse_topk, " with coarse_regions 0");
    } else {
        TORCH_CHECK(coarse_topk >= 1 && coarse_topk <= MSATTN_MAX_BLOCK, "msattn: coarse_topk must lie in [1, ",
                    MSATTN_MAX_BLOCK, "] with coarse_regions ", coarse_regions, ", got ", coarse_topk);
    }
}

inline void check_blocks(int64_t block_q, int64_t block_k, int64_t merge, int64_t topk) {
    TORCH_CHECK(block_q >= 1, "msattn: block_q must be >= 1, got ", block_q);
    TORCH_CHECK(block_k >= 1, "msattn: block_k must be >= 1, got ", block_k);
    TORCH_CHECK(merge >= 1, "msattn: merge must be >= 1, got ", merge);
    TORCH_CHECK(topk >= 1, "msattn: topk must be >= 1, got ", topk);
    // each bound before any product, so that no product overflows
    TORCH_CHECK(block_q <= MSATTN_MAX_SPAN && merge <= MSATTN_MAX_SPAN && block_q * merge <= MSATTN_MAX_SPAN,
                "msattn: a group (block_q * merge tokens) may hold at most ", MSATTN_MAX_SPAN, " tokens, got ",
                block_q, " * ", merge);
    TORCH_CHECK(block_k <= MSATTN_MAX_BLOCK, "msattn: block_k must be <= ", MSATTN_MAX_BLOCK, ", got ", block_k);
    TORCH_CHECK(topk <= MSATTN_MAX_BLOCK, "msattn: topk must be <= ", MSATTN_MAX_BLOCK, ", got ", topk);
    TORCH_CHECK((merge * block_q) % block_k == 0, "msattn: merge * block_q must be a multiple of block_k, got ",
                merge, " * ", block_q, " and ", block_k);
}

// key_padding_mask: bool (B, N), True = real token. Returns a contiguous bool tensor or undefined.
inline at::Tensor check_mask(const c10::optional<at::Tensor> &mask, const at::Tensor &k) {
    if (!mask.has_value()) return at::Tensor();
    const at::Tensor &m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "msattn: key_padding_mask must be bool (True = real token), got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == k.size(0) && m.size(1) == k.size(2),
                "msattn: key_padding_mask must have shape (B, N) = (", k.size(0), ", ", k.size(2), "), got ",
                shape_str(m));
    TORCH_CHECK(m.device() == k.device(), "msattn: key_padding_mask must be on ", k.device(), ", got ",
                m.device());
    return m.contiguous();
}

// a checked mask's data and batch stride for the C params (null and 0 when no mask was given)
inline const uint8_t *mask_data(const at::Tensor &mask) {
    return mask.defined() ? (const uint8_t *)mask.data_ptr<bool>() : nullptr;
}
inline int64_t mask_stride(const at::Tensor &mask) { return mask.defined() ? mask.stride(0) : 0; }

// region sums (a cache's, or a workspace such as multi-scale's coarse sums): float32 (B, Hkv, >= NK, D)
// and int32 (B, Hkv, >= NK), region and dim unit-strided, on k's device
inline msattn_region_sums sums_view(const at::Tensor &sums, const at::Tensor &counts, const at::Tensor &k, int64_t nk,
                                    const char *who) {
    TORCH_CHECK(sums.scalar_type() == at::kFloat && sums.dim() == 4 && sums.size(0) == k.size(0) &&
                    sums.size(1) == k.size(1) && sums.size(2) >= nk && sums.size(3) == k.size(3),
                "msattn: ", who, ": key_sums must be float32 (B, Hkv, >= NK, D) = (", k.size(0), ", ", k.size(1),
                ", >= ", nk, ", ", k.size(3), "), got ", sums.scalar_type(), " ", shape_str(sums));
    TORCH_CHECK(counts.scalar_type() == at::kInt && counts.dim() == 3 && counts.size(0) == k.size(0) &&
                    counts.size(1) == k.size(1) && counts.size(2) >= nk,
                "msattn: ", who, ": key_counts must be int32 (B, Hkv, >= NK) = (", k.size(0), ", ", k.size(1),
                ", >= ", nk, "), got ", counts.scalar_type(), " ", shape_str(counts));
    TORCH_CHECK(sums.stride(3) == 1 && sums.stride(2) == sums.size(3) && counts.stride(2) == 1,
                "msattn: ", who, ": key_sums and key_counts must be contiguous along regions and dims");
    TORCH_CHECK(sums.device() == k.device() && counts.device() == k.device(), "msattn: ", who,
                ": key_sums and key_counts must be on ", k.device());
    return msattn_region_sums{sums.data_ptr<float>(), sums.stride(0), sums.stride(1), counts.data_ptr<int32_t>(),
                              counts.stride(0), counts.stride(1)};
}

// ms_region_sums_append_'s arguments (any device): k (B, Hkv, n, D) holds the keys of positions
// [start, end = start + n), `mask` its padding mask (B, n) or undefined, `sums` the sums it adds to
struct AppendArgs {
    at::Tensor mask;
    msattn_region_sums sums;
    int64_t end;
};

inline AppendArgs check_append(const at::Tensor &key_sums, const at::Tensor &key_counts, const at::Tensor &k,
                               const c10::optional<at::Tensor> &mask, int64_t start, int64_t block_k) {
    TORCH_CHECK(k.dim() == 4, "msattn: ms_region_sums_append_: k must be 4-D (B, Hkv, n, D), got ", shape_str(k));
    TORCH_CHECK(k.size(3) >= 1 && k.size(3) <= MSATTN_MAX_HEAD_DIM, "msattn: ms_region_sums_append_: head dim must "
                "be in [1, ", MSATTN_MAX_HEAD_DIM, "], got k of shape ", shape_str(k));
    TORCH_CHECK(block_k >= 1 && block_k <= MSATTN_MAX_BLOCK, "msattn: block_k must be in [1, ", MSATTN_MAX_BLOCK,
                "], got ", block_k);
    TORCH_CHECK(start >= 0 && start < MSATTN_MAX_TOKENS - k.size(2), "msattn: ms_region_sums_append_: start must "
                "be >= 0 and start + n below 2^31 (positions are int32), got start ", start, " and n ", k.size(2));
    dtype_of(k);
    const int64_t end = start + k.size(2);
    return {check_mask(mask, k), sums_view(key_sums, key_counts, k, msattn_num_key_regions(end, (int)block_k),
                                           "ms_region_sums_append_"), end};
}

// rope tables applied inside a kernel: float32 (len, dim/2) each, len covering the positions the kernel
// rotates to (`positions` names them in the error)
inline msattn_rope check_rope(const c10::optional<at::Tensor> &cos, const c10::optional<at::Tensor> &sin,
                              const at::Tensor &q, int64_t needed_len, at::Tensor &cos_c, at::Tensor &sin_c,
                              const char *positions = "the compact positions (topk * block_k + merge * block_q)") {
    msattn_rope r{nullptr, nullptr, 0, 0};
    TORCH_CHECK(cos.has_value() == sin.has_value(), "msattn: rope_cos and rope_sin must be given together");
    if (!cos.has_value()) return r;
    TORCH_CHECK(cos->dim() == 2 && sin->sizes() == cos->sizes(),
                "msattn: rope_cos and rope_sin must be 2-D (len, rotary_dim / 2) of one shape, got ",
                shape_str(*cos), " and ", shape_str(*sin));
    TORCH_CHECK(cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat,
                "msattn: rope_cos and rope_sin must be float32, got ", cos->scalar_type(), " and ",
                sin->scalar_type());
    TORCH_CHECK(cos->device() == q.device() && sin->device() == q.device(),
                "msattn: rope_cos and rope_sin must be on q's device ", q.device());
    TORCH_CHECK(2 * cos->size(1) <= q.size(3) && cos->size(1) >= 1,
                "msattn: rotary dim 2 * ", cos->size(1), " exceeds head dim ", q.size(3));
    TORCH_CHECK(cos->size(0) >= needed_len, "msattn: rope tables must cover ", positions, " 0..", needed_len - 1,
                ", got ", cos->size(0), " rows");
    cos_c = cos->contiguous();
    sin_c = sin->contiguous();
    r.cos = cos_c.data_ptr<float>();
    r.sin = sin_c.data_ptr<float>();
    r.len = (int)cos->size(0);
    r.dim = (int)(2 * cos->size(1));
    return r;
}

// index: int32 (B, Hkv, G, topk) from ms_select for these shapes
inline void check_index(const at::Tensor &index, const at::Tensor &q, const at::Tensor &k, int64_t span) {
    const int64_t G = msattn_num_groups(k.size(2), q.size(2), span);
    TORCH_CHECK(index.scalar_type() == at::kInt, "msattn: index must be int32 (from ms_select), got ",
                index.scalar_type());
    TORCH_CHECK(index.dim() == 4 && index.size(0) == k.size(0) && index.size(1) == k.size(1) &&
                    index.size(2) == G && index.size(3) >= 1,
                "msattn: index must have shape (B, Hkv, G, topk) = (", k.size(0), ", ", k.size(1), ", ", G,
                ", topk), got ", shape_str(index));
    TORCH_CHECK(index.device() == q.device(), "msattn: index must be on q's device ", q.device());
}

}  // namespace msattn
