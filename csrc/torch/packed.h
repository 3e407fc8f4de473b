// packed.h -- packed sequences for the MS ops of both devices (cu_seqlens, FlashAttention's varlen
// convention).
//
// A packed call holds S sequences back to back along the token axis of a batch of one:
//   q (1, Hq, total_q, D), k and v (1, Hkv, total_k, D), cu_seqlens_q int32 (S + 1), cu_seqlens_k int32 (S + 1)
// Sequence s owns queries [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and keys [cu_seqlens_k[s], cu_seqlens_k[s + 1]),
// its queries being the last of its keys (equal offsets: prefill and training; one query each: decoding).
// Regions, groups and positions restart at each sequence and no key of one sequence is visible to
// another: the op runs once per sequence on views (narrow) of the packed tensors, and the results are
// concatenated along the token axis (index: along the group axis, sequence after sequence). So a packed
// call equals separate calls, bit for bit. The offsets are read on the host: for CUDA tensors that is
// one device-to-host copy per call, and one launch sequence per sequence.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "../msattn_regions.h"
#include "checks.h"

namespace msattn {

struct Packed {
    std::vector<int64_t> q, k;  // S + 1 offsets into the token axes of q and k
    int64_t sequences() const { return (int64_t)q.size() - 1; }
    int64_t q_len(int64_t s) const { return q[s + 1] - q[s]; }
    int64_t k_len(int64_t s) const { return k[s + 1] - k[s]; }
};

// cu: int32 (S + 1) on `device`, 0 first, non-decreasing, `total` last
inline std::vector<int64_t> read_offsets(const at::Tensor &cu, int64_t total, const at::Device &device,
                                         const char *name, const char *axis) {
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 2,
                "msattn: ", name, " must be int32 of shape (S + 1,) with S >= 1 sequences, got ", cu.scalar_type(),
                " ", shape_str(cu));
    TORCH_CHECK(cu.device() == device, "msattn: ", name, " must be on q's device ", device, ", got ", cu.device());
    const at::Tensor host = cu.to(at::kCPU).to(at::kLong).contiguous();
    const int64_t *x = host.data_ptr<int64_t>();
    std::vector<int64_t> offsets(x, x + host.numel());
    TORCH_CHECK(offsets.front() == 0, "msattn: ", name, " must start at 0, got ", offsets.front());
    for (size_t s = 1; s < offsets.size(); ++s)
        TORCH_CHECK(offsets[s] >= offsets[s - 1], "msattn: ", name, " must be non-decreasing, got ", offsets[s - 1],
                    " then ", offsets[s], " at entries ", s - 1, " and ", s);
    TORCH_CHECK(offsets.back() == total, "msattn: ", name, " must end at ", axis, "'s length ", total, ", got ",
                offsets.back());
    return offsets;
}

// the packed layout of a call, or nullopt when no offsets are given (q (B, Hq, Nq, D), k (B, Hkv, N, D))
inline c10::optional<Packed> check_packed(const c10::optional<at::Tensor> &cu_q, const c10::optional<at::Tensor> &cu_k,
                                          const at::Tensor &q, const at::Tensor &k) {
    TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "msattn: cu_seqlens_q and cu_seqlens_k go together (pass the "
                "same tensor twice when queries and keys are the same tokens)");
    if (!cu_q.has_value()) return c10::nullopt;
    TORCH_CHECK(q.size(0) == 1, "msattn: packed sequences (cu_seqlens) lie along the tokens of a batch of one, got q "
                "of shape ", shape_str(q));
    Packed p{read_offsets(*cu_q, q.size(2), q.device(), "cu_seqlens_q", "q's token axis"),
             read_offsets(*cu_k, k.size(2), q.device(), "cu_seqlens_k", "k's token axis")};
    TORCH_CHECK(p.q.size() == p.k.size(), "msattn: cu_seqlens_q and cu_seqlens_k must describe as many sequences, "
                "got ", p.q.size() - 1, " and ", p.k.size() - 1);
    for (int64_t s = 0; s < p.sequences(); ++s)
        TORCH_CHECK(p.q_len(s) <= p.k_len(s), "msattn: sequence ", s, " has ", p.q_len(s), " queries but ",
                    p.k_len(s), " keys (its queries are the last of its keys)");
    return p;
}

// a padding mask's columns of sequence s, or undefined
inline c10::optional<at::Tensor> mask_of(const at::Tensor &mask, const Packed &p, int64_t s) {
    if (!mask.defined()) return c10::nullopt;
    return mask.narrow(1, p.k[s], p.k_len(s));
}

// Each op of a device runs through one of these: `one` is its single call (one sequence, or a padded
// batch), given the optional padding mask; with offsets it runs once per sequence on views and the
// results are concatenated.

// ms_select: one(q, k, mask, key_sums, key_counts) -> int32 (B, Hkv, G, T); packed (1, Hkv, sum G_s, T)
template <class Select>
at::Tensor select_maybe_packed(const c10::optional<at::Tensor> &cu_q, const c10::optional<at::Tensor> &cu_k,
                               const at::Tensor &q, const at::Tensor &k, const c10::optional<at::Tensor> &mask,
                               const c10::optional<at::Tensor> &key_sums, const c10::optional<at::Tensor> &key_counts,
                               Select one) {
    check_qkv(q, k, nullptr);
    const c10::optional<Packed> p = check_packed(cu_q, cu_k, q, k);
    if (!p) return one(q, k, mask, key_sums, key_counts);
    TORCH_CHECK(!key_sums.has_value(), "msattn: ms_select: a cache's key_sums cannot serve packed sequences "
                "(cu_seqlens); select from k");
    const at::Tensor m = check_mask(mask, k);
    std::vector<at::Tensor> parts;
    for (int64_t s = 0; s < p->sequences(); ++s)
        parts.push_back(one(q.narrow(2, p->q[s], p->q_len(s)), k.narrow(2, p->k[s], p->k_len(s)), mask_of(m, *p, s),
                            c10::nullopt, c10::nullopt));
    return at::cat(parts, 2);
}

// the group rows of sequence s in a packed index (1, Hkv, sum G_s, T); checks the total
inline std::vector<int64_t> group_offsets(const Packed &p, const at::Tensor &index, int64_t span) {
    std::vector<int64_t> g{0};
    for (int64_t s = 0; s < p.sequences(); ++s) g.push_back(g.back() + msattn_num_groups(p.k_len(s), p.q_len(s), span));
    TORCH_CHECK(index.dim() == 4 && index.size(2) == g.back(), "msattn: a packed index must hold the ", g.back(),
                " groups of its sequences along dim 2 (1, Hkv, G, topk), got ", shape_str(index));
    return g;
}

// ms_fwd: one(q, k, v, index, mask) -> (out, lse); packed: concatenated along the query tokens
template <class Forward>
std::tuple<at::Tensor, at::Tensor> fwd_maybe_packed(const c10::optional<at::Tensor> &cu_q,
                                                    const c10::optional<at::Tensor> &cu_k, const at::Tensor &q,
                                                    const at::Tensor &k, const at::Tensor &v, const at::Tensor &index,
                                                    const c10::optional<at::Tensor> &mask, int64_t span, Forward one) {
    check_qkv(q, k, &v);
    const c10::optional<Packed> p = check_packed(cu_q, cu_k, q, k);
    if (!p) return one(q, k, v, index, mask);
    const at::Tensor m = check_mask(mask, k);
    const std::vector<int64_t> g = group_offsets(*p, index, span);
    std::vector<at::Tensor> outs, lses;
    for (int64_t s = 0; s < p->sequences(); ++s) {
        const int64_t k0 = p->k[s], nk = p->k_len(s);
        auto r = one(q.narrow(2, p->q[s], p->q_len(s)), k.narrow(2, k0, nk), v.narrow(2, k0, nk),
                     index.narrow(2, g[s], g[s + 1] - g[s]), mask_of(m, *p, s));
        outs.push_back(std::get<0>(r));
        lses.push_back(std::get<1>(r));
    }
    return {at::cat(outs, 2), at::cat(lses, 2)};
}

// ms_bwd: one(dout, dlse, q, k, v, out, lse, index, mask) -> (dq, dk, dv); packed: concatenated
template <class Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_maybe_packed(
    const c10::optional<at::Tensor> &cu_q, const c10::optional<at::Tensor> &cu_k, const at::Tensor &dout,
    const c10::optional<at::Tensor> &dlse, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
    const at::Tensor &out, const at::Tensor &lse, const at::Tensor &index, const c10::optional<at::Tensor> &mask,
    int64_t span, Backward one) {
    check_qkv(q, k, &v);
    const c10::optional<Packed> p = check_packed(cu_q, cu_k, q, k);
    if (!p) return one(dout, dlse, q, k, v, out, lse, index, mask);
    TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && lse.dim() == 3 && lse.size(2) == q.size(2) &&
                    (!dlse.has_value() || dlse->sizes() == lse.sizes()),
                "msattn: ms_bwd: dout and out must have q's shape ", shape_str(q), " and lse (and dlse) (B, Hq, Nq)"
                ", got dout ", shape_str(dout), ", out ", shape_str(out), ", lse ", shape_str(lse));
    const at::Tensor m = check_mask(mask, k);
    const std::vector<int64_t> g = group_offsets(*p, index, span);
    std::vector<at::Tensor> dqs, dks, dvs;
    for (int64_t s = 0; s < p->sequences(); ++s) {
        const int64_t q0 = p->q[s], nq = p->q_len(s), k0 = p->k[s], nk = p->k_len(s);
        c10::optional<at::Tensor> dlse_s;
        if (dlse.has_value()) dlse_s = dlse->narrow(2, q0, nq);
        auto r = one(dout.narrow(2, q0, nq), dlse_s, q.narrow(2, q0, nq), k.narrow(2, k0, nk), v.narrow(2, k0, nk),
                     out.narrow(2, q0, nq), lse.narrow(2, q0, nq), index.narrow(2, g[s], g[s + 1] - g[s]),
                     mask_of(m, *p, s));
        dqs.push_back(std::get<0>(r));
        dks.push_back(std::get<1>(r));
        dvs.push_back(std::get<2>(r));
    }
    return {at::cat(dqs, 2), at::cat(dks, 2), at::cat(dvs, 2)};
}

}  // namespace msattn
