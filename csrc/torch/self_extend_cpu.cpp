// self_extend_cpu.cpp -- torch.ops.msattn.self_extend_fwd / self_extend_bwd (DESIGN section 3,
// SelfExtend): their schemas, argument checks, allocation, and the spreading of the C kernels' work
// items (csrc/cpu/self_extend.c) over ATen's thread pool. No kernel math.
//
// Legend: B batch, Hq / Hkv heads, Nq queries (the last Nq of N positions), N keys, D head dim,
// L rope table rows (>= N), R2 = rotary_dim / 2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../msattn.h"
#include "../msattn_regions.h"
#include "checks.h"
#include "run_items.h"

namespace msattn {
namespace {

// queries per forward / dq item: about 128 query rows over the GQA group, so each packed key tile
// serves many rows; keys per dk/dv item
int64_t se_block_q(int64_t hg) { return std::max<int64_t>(4, (128 / std::max<int64_t>(hg, 1) + 3) / 4 * 4); }
constexpr int64_t kSelfExtendBlockKV = 64;

// rope_cos, rope_sin: float32 (L, R2) each with L >= N and 2 * R2 <= D
msattn_rope check_se_rope(const at::Tensor &cos, const at::Tensor &sin, const at::Tensor &q, int64_t N,
                          at::Tensor &cos_c, at::Tensor &sin_c) {
    TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes(),
                "msattn: self_extend: rotary (cos, sin) must be 2-D (L, rotary_dim / 2) of one shape, got ",
                shape_str(cos), " and ", shape_str(sin));
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
                "msattn: self_extend: rotary (cos, sin) must be float32, got ", cos.scalar_type(), " and ",
                sin.scalar_type());
    TORCH_CHECK(cos.device() == q.device() && sin.device() == q.device(),
                "msattn: self_extend: rotary (cos, sin) must be on q's device ", q.device());
    TORCH_CHECK(cos.size(1) >= 1 && 2 * cos.size(1) <= q.size(3), "msattn: self_extend: rotary dim 2 * ",
                cos.size(1), " must be in [2, head dim ", q.size(3), "]");
    TORCH_CHECK(cos.size(0) >= N, "msattn: self_extend: rotary tables too short: they must cover positions 0..",
                N - 1, " (N = ", N, " keys), got ", cos.size(0), " rows");
    cos_c = cos.contiguous();
    sin_c = sin.contiguous();
    return msattn_rope{cos_c.data_ptr<float>(), sin_c.data_ptr<float>(), (int)cos.size(0), (int)(2 * cos.size(1))};
}

void check_se_args(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, int64_t group_size,
                   int64_t window, int64_t sliding_window, double scale) {
    check_qkv(q, k, &v);
    TORCH_CHECK(q.device().is_cpu(), "msattn: this is the CPU implementation, got q on ", q.device());
    TORCH_CHECK(group_size >= 1 && group_size <= (int64_t(1) << 30),
                "msattn: self_extend: group_size must be in [1, 2^30], got ", group_size);
    TORCH_CHECK(window >= 0 && window <= (int64_t(1) << 30), "msattn: self_extend: window must be in [0, 2^30], got ",
                window);
    TORCH_CHECK(sliding_window >= 0 && sliding_window <= (int64_t(1) << 30),
                "msattn: self_extend: sliding_window must be in [0, 2^30] (0: none), got ", sliding_window);
    TORCH_CHECK(std::isfinite(scale), "msattn: scale must be finite, got ", scale);
}

// the params both directions share
msattn_self_extend_params se_params(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                    const at::Tensor &mask, const msattn_rope &rope, int64_t group_size,
                                    int64_t window, int64_t sliding_window, bool causal, double scale) {
    msattn_self_extend_params p{};
    p.B = (int)q.size(0); p.Hq = (int)q.size(1); p.Hkv = (int)k.size(1);
    p.Nq = (int)q.size(2); p.N = (int)k.size(2); p.D = (int)q.size(3);
    p.causal = causal;
    p.group_size = (int)group_size;
    p.window = (int)window;
    p.sliding_window = (int)sliding_window;
    p.scale = scale;
    p.dtype = dtype_of(q);
    p.q = view_of(q);
    p.k = view_of(k);
    p.v = view_of(v);
    p.key_mask = mask_data(mask);
    p.mask_sb = mask_stride(mask);
    p.rope = rope;
    p.block_q = (int)se_block_q(p.Hq / p.Hkv);
    p.block_kv = (int)kSelfExtendBlockKV;
    return p;
}

// q (B, Hq, Nq, D), k and v (B, Hkv, N, D) un-rotated; rope_cos, rope_sin (L, R2);
// key_padding_mask bool (B, N) -> out (B, Hq, Nq, D), lse (B, Hq, Nq) float32 (float64 for float64)
std::tuple<at::Tensor, at::Tensor> self_extend_fwd_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                                       const at::Tensor &rope_cos, const at::Tensor &rope_sin,
                                                       const c10::optional<at::Tensor> &mask_, int64_t group_size,
                                                       int64_t window, int64_t sliding_window, bool causal,
                                                       double scale) {
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    check_se_args(q, k, v, group_size, window, sliding_window, scale);
    at::Tensor mask = check_mask(mask_, k), cos, sin;
    const msattn_rope rope = check_se_rope(rope_cos, rope_sin, q, k.size(2), cos, sin);
    at::Tensor out = at::empty(q.sizes(), q.options());
    at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)},
                               q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    if (out.numel() == 0) return {out, lse};
    msattn_self_extend_params p = se_params(q, k, v, mask, rope, group_size, window, sliding_window, causal, scale);
    p.out = view_of(out);
    p.lse = lse.data_ptr();
    if (p.dtype == MSATTN_F64) {
        run_items_dynamic((int64_t)p.B * p.Hq, 0, [](int64_t w) { return w; },
                          [&](int64_t item, void *) { return msattn_self_extend_fwd_ref_cpu(&p, item, item + 1); },
                          "self_extend_fwd (reference, float64)");
        return {out, lse};
    }
    // items (b, h, query block); causal: later blocks see more keys, so they go first
    const int64_t BH = (int64_t)p.B * p.Hkv, QB = msattn_cdiv(p.Nq, p.block_q);
    run_items_dynamic(
        BH * QB, msattn_self_extend_fwd_scratch_bytes(&p), [&](int64_t w) { return (QB - 1 - w / BH) + QB * (w % BH); },
        [&](int64_t item, void *scratch) { return msattn_self_extend_fwd_cpu(&p, item, item + 1, scratch); },
        "self_extend_fwd");
    return {out, lse};
}

// dout like q; dlse like lse or None; the forward's inputs and outputs -> dq, dk, dv
std::tuple<at::Tensor, at::Tensor, at::Tensor> self_extend_bwd_cpu(
    const at::Tensor &dout, const c10::optional<at::Tensor> &dlse_, const at::Tensor &q, const at::Tensor &k,
    const at::Tensor &v, const at::Tensor &out, const at::Tensor &lse_, const at::Tensor &rope_cos,
    const at::Tensor &rope_sin, const c10::optional<at::Tensor> &mask_, int64_t group_size, int64_t window,
    int64_t sliding_window, bool causal, double scale) {
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    check_se_args(q, k, v, group_size, window, sliding_window, scale);
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
    at::Tensor mask = check_mask(mask_, k), lse = lse_.contiguous(), cos, sin;
    const msattn_rope rope = check_se_rope(rope_cos, rope_sin, q, k.size(2), cos, sin);
    at::Tensor dq = at::empty(q.sizes(), q.options());
    at::Tensor dk = at::empty(k.sizes(), k.options());
    at::Tensor dv = at::empty(v.sizes(), v.options());
    if (q.numel() == 0 || k.numel() == 0) {
        dk.zero_();
        dv.zero_();
        return {dq, dk, dv};
    }
    msattn_self_extend_params p = se_params(q, k, v, mask, rope, group_size, window, sliding_window, causal, scale);
    p.out = view_of(out);
    p.lse = lse.data_ptr();
    p.dout = view_of(dout);
    p.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
    p.dq = view_of(dq);
    p.dk = view_of(dk);
    p.dv = view_of(dv);
    const int64_t BH = (int64_t)p.B * p.Hkv;
    if (p.dtype == MSATTN_F64) {
        run_items_dynamic(BH, 0, [](int64_t w) { return w; },
                          [&](int64_t item, void *) { return msattn_self_extend_bwd_ref_cpu(&p, item, item + 1); },
                          "self_extend_bwd (reference, float64)");
        return {dq, dk, dv};
    }
    at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    p.delta = delta.data_ptr<float>();
    const size_t scratch = msattn_self_extend_bwd_scratch_bytes(&p);
    const int64_t QB = msattn_cdiv(p.Nq, p.block_q), KB = msattn_cdiv(p.N, p.block_kv);
    // pass 1 writes delta, which pass 2 reads
    run_items_dynamic(
        BH * QB, scratch, [&](int64_t w) { return (QB - 1 - w / BH) + QB * (w % BH); },
        [&](int64_t item, void *s) { return msattn_self_extend_bwd_dq_cpu(&p, item, item + 1, s); },
        "self_extend_bwd (dq)");
    // causal: early key blocks are seen by more queries
    run_items_dynamic(
        BH * KB, scratch, [&](int64_t w) { return (w / BH) + KB * (w % BH); },
        [&](int64_t item, void *s) { return msattn_self_extend_bwd_dkv_cpu(&p, item, item + 1, s); },
        "self_extend_bwd (dk, dv)");
    return {dq, dk, dv};
}

}  // namespace
}  // namespace msattn

TORCH_LIBRARY_FRAGMENT(msattn, m) {
    // SelfExtend attention (DESIGN 3) on un-rotated q (B, Hq, Nq, D), k, v (B, Hkv, N, D) with rotary
    // tables (L >= N, rotary_dim / 2); sliding_window 0: none -> out (B, Hq, Nq, D), lse (B, Hq, Nq)
    m.def("self_extend_fwd(Tensor q, Tensor k, Tensor v, Tensor rope_cos, Tensor rope_sin, Tensor? key_padding_mask, "
          "int group_size, int window, int sliding_window, bool causal, float scale) -> (Tensor, Tensor)");
    // its backward -> dq, dk, dv; dlse (B, Hq, Nq), when given, is the gradient flowing into lse
    m.def("self_extend_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
          "Tensor rope_cos, Tensor rope_sin, Tensor? key_padding_mask, int group_size, int window, "
          "int sliding_window, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msattn, CPU, m) {
    m.impl("self_extend_fwd", &msattn::self_extend_fwd_cpu);
    m.impl("self_extend_bwd", &msattn::self_extend_bwd_cpu);
}
