// ms_attention_cpu.cpp -- CPU implementations of torch.ops.msattn.ms_select / ms_fwd / ms_bwd:
// checks, allocation, and the spreading of work items over ATen's thread pool. No kernel math.
//
// Work items are spread by run_items.h (dynamic scheduling: MS groups differ in cost, the causal
// prefix is cheap). Results never depend on the schedule: every item owns the outputs it writes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "../msattn.h"
#include "../msattn_regions.h"
#include "checks.h"
#include "packed.h"
#include "run_items.h"

namespace msattn {
namespace {

// the selection must be what ms_select could produce: each row strictly ascending candidates of its
// group, -1 only at the end. Checked so that a hand-made index cannot read out of bounds.
void check_index_values(const at::Tensor &index, int64_t N, int64_t Nq, int64_t span, int64_t block_k,
                        bool causal) {
    const int64_t NK = msattn_num_key_regions(N, block_k), g0 = msattn_first_group(N, Nq, span);
    const int64_t G = index.size(2), T = index.size(3);
    const int32_t *x = index.data_ptr<int32_t>();
    for (int64_t row = 0; row < index.numel() / T; ++row) {
        const int64_t ga = g0 + row % G;
        int32_t prev = -1;
        for (int64_t r = 0; r < T; ++r) {
            const int32_t j = x[row * T + r];
            if (j < 0) {
                TORCH_CHECK(j == -1, "msattn: index entries must be key regions or -1, got ", j);
                prev = INT32_MAX;
                continue;
            }
            TORCH_CHECK(prev != INT32_MAX, "msattn: index rows must put -1 padding last");
            TORCH_CHECK(j < NK && j > prev, "msattn: index rows must be strictly ascending key regions in [0, ",
                        NK, "), got ", j, " after ", prev);
            TORCH_CHECK(msattn_is_candidate(j, ga, span, (int)block_k, N, causal),
                        "msattn: index selects key region ", j, " which group ", ga,
                        " may not attend (its own span, or after it when causal)");
            prev = j;
        }
    }
}

// one sequence (or a padded batch); the callers hold the instruction set
at::Tensor ms_select_one(const at::Tensor &q, const at::Tensor &k, const c10::optional<at::Tensor> &mask_,
                         const c10::optional<at::Tensor> &key_sums, const c10::optional<at::Tensor> &key_counts,
                         int64_t block_q, int64_t block_k, int64_t merge, int64_t topk, bool causal,
                         int64_t local, int64_t coarse_regions, int64_t coarse_topk) {
    check_qkv(q, k, nullptr);
    check_blocks(block_q, block_k, merge, topk);
    check_local(local, topk);
    check_coarse(coarse_regions, coarse_topk);
    TORCH_CHECK(q.device().is_cpu(), "msattn: this is the CPU implementation, got q on ", q.device());
    at::Tensor mask = check_mask(mask_, k);
    TORCH_CHECK(key_sums.has_value() == key_counts.has_value(), "msattn: key_sums and key_counts go together");
    const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), N = k.size(2);
    const int64_t span = msattn_span((int)block_q, (int)merge);
    const int64_t NK = msattn_num_key_regions(N, (int)block_k), NA = msattn_num_query_regions(N, Nq, (int)block_q);
    const int64_t G = msattn_num_groups(N, Nq, span);
    at::Tensor index = at::empty({B, Hkv, G, topk}, q.options().dtype(at::kInt));
    if (index.numel() == 0) return index;

    at::Tensor sums, counts;
    if (key_sums.has_value()) {
        sums = *key_sums;
        counts = *key_counts;
    } else {
        sums = at::empty({B, Hkv, NK, D}, q.options().dtype(at::kFloat));
        counts = at::empty({B, Hkv, NK}, q.options().dtype(at::kInt));
    }
    at::Tensor qbar = at::empty({B, Hkv, NA, D}, q.options().dtype(at::kDouble));
    at::Tensor qcount = at::empty({B, Hkv, NA}, q.options().dtype(at::kInt));
    msattn_select_params p{};
    p.B = (int)B; p.Hq = (int)Hq; p.Hkv = (int)Hkv; p.Nq = (int)Nq; p.N = (int)N; p.D = (int)D;
    p.block_q = (int)block_q; p.block_k = (int)block_k; p.merge = (int)merge; p.topk = (int)topk;
    p.causal = causal;
    p.local = (int)local;
    p.coarse_regions = (int)coarse_regions;
    p.coarse_topk = (int)coarse_topk;
    p.dtype = dtype_of(q);
    p.q = view_of(q);
    p.k = view_of(k);
    p.key_mask = mask_data(mask);
    p.mask_sb = mask_stride(mask);
    p.ksum = sums_view(sums, counts, k, NK, "ms_select");
    const int64_t NC = coarse_regions > 0 ? msattn_cdiv(NK, coarse_regions) : 0;
    at::Tensor csums = at::empty({B, Hkv, NC, D}, q.options().dtype(at::kFloat));  // (B, Hkv, NC, D)
    at::Tensor ccounts = at::empty({B, Hkv, NC}, q.options().dtype(at::kInt));     // (B, Hkv, NC)
    p.csum = sums_view(csums, ccounts, k, NC, "ms_select (coarse sums)");
    p.sums_given = key_sums.has_value();
    p.qbar = qbar.data_ptr<double>();
    p.qcount = qcount.data_ptr<int32_t>();
    p.index = index.data_ptr<int32_t>();
    at::Tensor kpanel = at::empty({(int64_t)msattn_select_panel_floats(&p)}, q.options().dtype(at::kFloat));
    p.kpanel = kpanel.numel() > 0 ? kpanel.data_ptr<float>() : nullptr;
    at::Tensor kpanel16 = at::empty({(int64_t)msattn_select_panel16_elems(&p)}, q.options().dtype(at::kShort));
    p.kpanel16 = kpanel16.numel() > 0 ? reinterpret_cast<uint16_t *>(kpanel16.data_ptr<int16_t>()) : nullptr;

    // pass 1: region sums, their panels and query means, cheap and uniform
    at::parallel_for(0, B * Hkv * (NK + NA), 64, [&](int64_t b, int64_t e) { msattn_region_means_cpu(&p, b, e); });
    if (NC > 0)  // multi-scale: the coarse regions' sums from the region sums
        at::parallel_for(0, B * Hkv * NC, 16, [&](int64_t b, int64_t e) { msattn_coarse_sums_cpu(&p, b, e); });
    // pass 2: one item per tile of consecutive groups of one (b, h); later groups have more candidates
    const int64_t BH = B * Hkv, tile = msattn_select_tile_groups(&p), tiles = (G + tile - 1) / tile;
    run_items_dynamic(
        BH * tiles, msattn_select_scratch_bytes(&p), [&](int64_t w) { return (tiles - 1 - w / BH) + tiles * (w % BH); },
        [&](int64_t item, void *scratch) {
            const int64_t begin = (item / tiles) * G + (item % tiles) * tile;
            return msattn_select_cpu(&p, begin, std::min(begin + tile, (item / tiles + 1) * G), scratch);
        },
        "ms_select");
    return index;
}

at::Tensor ms_select_cpu(const at::Tensor &q, const at::Tensor &k, const c10::optional<at::Tensor> &mask,
                         const c10::optional<at::Tensor> &key_sums, const c10::optional<at::Tensor> &key_counts,
                         int64_t block_q, int64_t block_k, int64_t merge, int64_t topk, bool causal, int64_t local,
                         int64_t coarse_regions, int64_t coarse_topk,
                         const c10::optional<at::Tensor> &cu_seqlens_q,    // int32 (S + 1), packed.h
                         const c10::optional<at::Tensor> &cu_seqlens_k) {  // int32 (S + 1)
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    return select_maybe_packed(cu_seqlens_q, cu_seqlens_k, q, k, mask, key_sums, key_counts,
                               [&](auto q_s, auto k_s, auto mask_s, auto sums_s, auto counts_s) {
                                   return ms_select_one(q_s, k_s, mask_s, sums_s, counts_s, block_q, block_k, merge,
                                                        topk, causal, local, coarse_regions, coarse_topk);
                               });
}

void ms_region_sums_append_cpu(at::Tensor &key_sums, at::Tensor &key_counts, const at::Tensor &k,
                               const c10::optional<at::Tensor> &mask_, int64_t start, int64_t block_k) {
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    TORCH_CHECK(k.device().is_cpu(), "msattn: this is the CPU implementation, got k on ", k.device());
    const AppendArgs a = check_append(key_sums, key_counts, k, mask_, start, block_k);
    at::parallel_for(0, k.size(0) * k.size(1), 1, [&](int64_t b, int64_t e) {
        msattn_region_sums_append_cpu(a.sums, view_of(k), dtype_of(k),
                                      mask_data(a.mask), mask_stride(a.mask), (int)k.size(1), (int)k.size(3),
                                      (int)block_k, start, a.end, b, e);
    });
}

// the params both directions share
msattn_ms_params ms_params(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &index,
                           const at::Tensor &mask, const msattn_rope &rope, int64_t block_q, int64_t block_k,
                           int64_t merge, bool causal, double scale) {
    msattn_ms_params p{};
    p.B = (int)q.size(0); p.Hq = (int)q.size(1); p.Hkv = (int)k.size(1);
    p.Nq = (int)q.size(2); p.N = (int)k.size(2); p.D = (int)q.size(3);
    p.block_q = (int)block_q; p.block_k = (int)block_k; p.merge = (int)merge; p.topk = (int)index.size(3);
    p.causal = causal;
    p.scale = scale;
    p.dtype = dtype_of(q);
    p.q = view_of(q);
    p.k = view_of(k);
    p.v = view_of(v);
    p.index = index.data_ptr<int32_t>();
    p.key_mask = mask_data(mask);
    p.mask_sb = mask_stride(mask);
    p.rope = rope;
    return p;
}

void check_ms_args(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &index,
                   int64_t block_q, int64_t block_k, int64_t merge, bool causal, double scale) {
    check_qkv(q, k, &v);
    TORCH_CHECK(q.device().is_cpu(), "msattn: this is the CPU implementation, got q on ", q.device());
    check_blocks(block_q, block_k, merge, index.dim() == 4 ? std::max<int64_t>(index.size(3), 1) : 1);
    const int64_t span = block_q * merge;
    check_index(index, q, k, span);
    TORCH_CHECK(std::isfinite(scale), "msattn: scale must be finite, got ", scale);
    check_index_values(index.contiguous(), k.size(2), q.size(2), span, block_k, causal);
}

std::tuple<at::Tensor, at::Tensor> ms_fwd_one(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                              const at::Tensor &index_, const c10::optional<at::Tensor> &mask_,
                                              const c10::optional<at::Tensor> &rope_cos,
                                              const c10::optional<at::Tensor> &rope_sin, int64_t block_q,
                                              int64_t block_k, int64_t merge, bool causal, double scale) {
    check_ms_args(q, k, v, index_, block_q, block_k, merge, causal, scale);
    at::Tensor mask = check_mask(mask_, k), index = index_.contiguous(), cos, sin;
    const msattn_rope rope = check_rope(rope_cos, rope_sin, q, msattn_compact_len((int)index.size(3), (int)block_k,
                                                                                  block_q * merge), cos, sin);
    at::Tensor out = at::empty(q.sizes(), q.options());
    at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)},
                               q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    if (out.numel() == 0) return {out, lse};
    msattn_ms_params p = ms_params(q, k, v, index, mask, rope, block_q, block_k, merge, causal, scale);
    p.out = view_of(out);
    p.lse = lse.data_ptr();
    const int64_t BH = (int64_t)p.B * p.Hkv, G = index.size(2);
    const auto order = [&](int64_t w) { return (G - 1 - w / BH) + G * (w % BH); };
    if (p.dtype == MSATTN_F64) {
        run_items_dynamic(BH * G, 0, order, [&](int64_t item, void *) { return msattn_ms_fwd_ref_cpu(&p, item, item + 1); },
                  "ms_fwd (reference, float64)");
    } else {
        run_items_dynamic(BH * G, msattn_ms_fwd_scratch_bytes(&p), order,
                  [&](int64_t item, void *scratch) { return msattn_ms_fwd_cpu(&p, item, item + 1, scratch); },
                  "ms_fwd");
    }
    return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> ms_fwd_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                              const at::Tensor &index, const c10::optional<at::Tensor> &mask,
                                              const c10::optional<at::Tensor> &rope_cos,
                                              const c10::optional<at::Tensor> &rope_sin, int64_t block_q,
                                              int64_t block_k, int64_t merge, bool causal, double scale,
                                              const c10::optional<at::Tensor> &cu_seqlens_q,    // int32 (S + 1)
                                              const c10::optional<at::Tensor> &cu_seqlens_k) {  // int32 (S + 1)
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    return fwd_maybe_packed(cu_seqlens_q, cu_seqlens_k, q, k, v, index, mask, block_q * merge,
                            [&](auto q_s, auto k_s, auto v_s, auto index_s, auto mask_s) {
                                return ms_fwd_one(q_s, k_s, v_s, index_s, mask_s, rope_cos, rope_sin, block_q,
                                                  block_k, merge, causal, scale);
                            });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_bwd_one(
    const at::Tensor &dout, const c10::optional<at::Tensor> &dlse_, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out,
    const at::Tensor &lse_, const at::Tensor &index_, const c10::optional<at::Tensor> &mask_,
    const c10::optional<at::Tensor> &rope_cos, const c10::optional<at::Tensor> &rope_sin, int64_t block_q,
    int64_t block_k, int64_t merge, bool causal, double scale) {
    check_ms_args(q, k, v, index_, block_q, block_k, merge, causal, scale);
    TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() && dout.device() == q.device(),
                "msattn: dout must match q: shape ", shape_str(q), " dtype ", q.scalar_type(), ", got ",
                shape_str(dout), " ", dout.scalar_type());
    TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(),
                "msattn: out must match q: shape ", shape_str(q), " dtype ", q.scalar_type(), ", got ",
                shape_str(out), " ", out.scalar_type());
    const auto lse_dt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == q.size(0) && lse_.size(1) == q.size(1) &&
                    lse_.size(2) == q.size(2) && lse_.scalar_type() == lse_dt && lse_.device() == q.device(),
                "msattn: lse must be ", lse_dt, " of shape (B, Hq, Nq) = (", q.size(0), ", ", q.size(1), ", ",
                q.size(2), "), got ", shape_str(lse_), " ", lse_.scalar_type());
    at::Tensor dlse;
    if (dlse_.has_value()) {
        TORCH_CHECK(dlse_->sizes() == lse_.sizes() && dlse_->scalar_type() == lse_dt && dlse_->device() == q.device(),
                    "msattn: dlse must match lse: ", lse_dt, " of shape ", shape_str(lse_), ", got ",
                    shape_str(*dlse_), " ", dlse_->scalar_type());
        dlse = dlse_->contiguous();
    }
    at::Tensor mask = check_mask(mask_, k), index = index_.contiguous(), lse = lse_.contiguous(), cos, sin;
    const msattn_rope rope = check_rope(rope_cos, rope_sin, q, msattn_compact_len((int)index.size(3), (int)block_k,
                                                                                  block_q * merge), cos, sin);
    at::Tensor dq = at::empty(q.sizes(), q.options());
    at::Tensor dk = at::empty(k.sizes(), k.options());
    at::Tensor dv = at::empty(v.sizes(), v.options());
    if (q.numel() == 0 || k.numel() == 0) {
        dk.zero_();
        dv.zero_();
        return {dq, dk, dv};
    }
    msattn_ms_params p = ms_params(q, k, v, index, mask, rope, block_q, block_k, merge, causal, scale);
    p.out = view_of(out);
    p.lse = lse.data_ptr();
    p.dout = view_of(dout);
    p.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
    p.dq = view_of(dq);
    p.dk = view_of(dk);
    p.dv = view_of(dv);
    const int64_t BH = (int64_t)p.B * p.Hkv, G = index.size(2);
    if (p.dtype == MSATTN_F64) {
        run_items_dynamic(BH, 0, [](int64_t w) { return w; },
                  [&](int64_t item, void *) { return msattn_ms_bwd_ref_cpu(&p, item, item + 1); },
                  "ms_bwd (reference, float64)");
        return {dq, dk, dv};
    }
    const int64_t NK = msattn_num_key_regions(p.N, p.block_k);
    const int64_t Dp = (p.D + 15) / 16 * 16;
    // pass 2 blocks: enough for every thread to pull several, few enough that each block packs a
    // group's queries once for many of its keys; per-thread accumulators stay under ~16 MB
    const int64_t max_regions = std::max<int64_t>(1, (int64_t(16) << 20) / (8 * p.block_k * Dp));
    p.kv_blocks = (int)std::min<int64_t>(
        NK, std::max<int64_t>(msattn_cdiv(4 * at::get_num_threads(), BH), msattn_cdiv(NK, max_regions)));
    at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    at::Tensor inv_offsets = at::empty({BH, NK + 1}, q.options().dtype(at::kInt));
    at::Tensor inv_groups = at::empty({BH, G * index.size(3)}, q.options().dtype(at::kInt));
    p.delta = delta.data_ptr<float>();
    p.inv_offsets = inv_offsets.data_ptr<int32_t>();
    p.inv_groups = inv_groups.data_ptr<int32_t>();
    const size_t scratch = msattn_ms_bwd_scratch_bytes(&p);
    at::parallel_for(0, BH, 1, [&](int64_t b, int64_t e) {
        msattn_ms_invert_cpu(&p, inv_offsets.data_ptr<int32_t>(), inv_groups.data_ptr<int32_t>(), b, e);
    });
    run_items_dynamic(
        BH * G, scratch, [&](int64_t w) { return (G - 1 - w / BH) + G * (w % BH); },
        [&](int64_t item, void *s) { return msattn_ms_bwd_dq_cpu(&p, item, item + 1, s); }, "ms_bwd (dq)");
    const int64_t KB = p.kv_blocks;
    run_items_dynamic(
        BH * KB, scratch, [&](int64_t w) { return (w / BH) + KB * (w % BH); },  // early key blocks are read most
        [&](int64_t item, void *s) { return msattn_ms_bwd_dkv_cpu(&p, item, item + 1, s); }, "ms_bwd (dk, dv)");
    return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_bwd_cpu(
    const at::Tensor &dout, const c10::optional<at::Tensor> &dlse, const at::Tensor &q, const at::Tensor &k,
    const at::Tensor &v, const at::Tensor &out, const at::Tensor &lse, const at::Tensor &index,
    const c10::optional<at::Tensor> &mask, const c10::optional<at::Tensor> &rope_cos,
    const c10::optional<at::Tensor> &rope_sin, int64_t block_q, int64_t block_k, int64_t merge, bool causal,
    double scale, const c10::optional<at::Tensor> &cu_seqlens_q,  // int32 (S + 1)
    const c10::optional<at::Tensor> &cu_seqlens_k) {              // int32 (S + 1)
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    return bwd_maybe_packed(cu_seqlens_q, cu_seqlens_k, dout, dlse, q, k, v, out, lse, index, mask, block_q * merge,
                            [&](auto dout_s, auto dlse_s, auto q_s, auto k_s, auto v_s, auto out_s, auto lse_s,
                                auto index_s, auto mask_s) {
                                return ms_bwd_one(dout_s, dlse_s, q_s, k_s, v_s, out_s, lse_s, index_s, mask_s,
                                                  rope_cos, rope_sin, block_q, block_k, merge, causal, scale);
                            });
}

std::string isa() {
    IsaCall isa_call(isa_mutex());
    return msattn_isa_name();
}

void set_isa(const std::string &name) {
    std::unique_lock<std::shared_mutex> exclusive(isa_mutex());  // waits for the calls running now
    TORCH_CHECK(msattn_isa_set(name.c_str()) == MSATTN_OK, "msattn: set_isa(name) takes 'auto', 'amx', 'avx512', "
                "'avx2' or 'scalar' that this CPU can run, got '", name, "'");
}

}  // namespace
}  // namespace msattn

TORCH_LIBRARY_FRAGMENT(msattn, m) {
    // the instruction set of the CPU kernels, for tests and benchmarks
    m.def("isa() -> str", &msattn::isa);
    m.def("set_isa(str name) -> ()", &msattn::set_isa);
}

TORCH_LIBRARY_IMPL(msattn, CPU, m) {
    m.impl("ms_select", &msattn::ms_select_cpu);
    m.impl("ms_region_sums_append_", &msattn::ms_region_sums_append_cpu);
    m.impl("ms_fwd", &msattn::ms_fwd_cpu);
    m.impl("ms_bwd", &msattn::ms_bwd_cpu);
}
