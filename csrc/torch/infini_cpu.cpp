// infini_cpu.cpp -- torch.ops.msattn.infini_fwd / infini_bwd: Infini-attention for one segment with a
// compressive memory (DESIGN section 3; the math is in csrc/cpu/infini.c). Schemas, checks,
// allocation and the spreading of work items over ATen's thread pool; no kernel math.
//
// Legend: B batch, Hq/Hkv heads, N keys of the segment, Nq queries (its last Nq positions), D head dim.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../msattn.h"
#include "checks.h"
#include "run_items.h"

namespace msattn {
namespace {

constexpr int64_t kQueryBlock = 64;  // queries per forward / backward-pass-1 item

at::ScalarType memory_dtype(const at::Tensor &q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// q (B, Hq, Nq, D), k v (B, Hkv, N, D), beta (Hq), memory (B, Hkv, D, D), norm (B, Hkv, D)
void check_infini_args(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &beta,
                       const at::Tensor &memory, const at::Tensor &norm, double scale) {
    check_qkv(q, k, &v);
    TORCH_CHECK(q.device().is_cpu(), "msattn: this is the CPU implementation, got q on ", q.device());
    const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(3);
    TORCH_CHECK(beta.dim() == 1 && beta.size(0) == Hq, "msattn: beta must be 1-D (Hq,) = (", Hq,
                ",), one gate logit per query head, got shape ", shape_str(beta));
    TORCH_CHECK(at::isFloatingType(beta.scalar_type()), "msattn: beta must be a floating tensor, got ",
                beta.scalar_type());
    TORCH_CHECK(beta.device() == q.device(), "msattn: beta must be on q's device ", q.device(), ", got ",
                beta.device());
    const auto mdt = memory_dtype(q);
    TORCH_CHECK(memory.dim() == 4 && memory.size(0) == B && memory.size(1) == Hkv && memory.size(2) == D &&
                    memory.size(3) == D,
                "msattn: memory must have shape (B, Hkv, D, D) = (", B, ", ", Hkv, ", ", D, ", ", D,
                "), one per key/value head, got ", shape_str(memory));
    TORCH_CHECK(memory.scalar_type() == mdt, "msattn: memory must be ", mdt, " (float64 for float64 inputs), got ",
                memory.scalar_type());
    TORCH_CHECK(memory.device() == q.device(), "msattn: memory must be on q's device ", q.device(), ", got ",
                memory.device());
    TORCH_CHECK(norm.dim() == 3 && norm.size(0) == B && norm.size(1) == Hkv && norm.size(2) == D,
                "msattn: norm must have shape (B, Hkv, D) = (", B, ", ", Hkv, ", ", D, "), got ", shape_str(norm));
    TORCH_CHECK(norm.scalar_type() == mdt, "msattn: norm must be ", mdt, " (float64 for float64 inputs), got ",
                norm.scalar_type());
    TORCH_CHECK(norm.device() == q.device(), "msattn: norm must be on q's device ", q.device(), ", got ",
                norm.device());
    TORCH_CHECK(std::isfinite(scale), "msattn: scale must be finite, got ", scale);
}

// rope tables for the local attention (q and k un-rotated): they cover the segment's positions 0..N-1
msattn_rope check_infini_rope(const c10::optional<at::Tensor> &cos, const c10::optional<at::Tensor> &sin,
                              const at::Tensor &q, const at::Tensor &k, at::Tensor &cos_c, at::Tensor &sin_c) {
    return check_rope(cos, sin, q, k.size(2), cos_c, sin_c, "the segment's positions");
}

// an optional gradient: undefined, or `like`'s shape and dtype
at::Tensor check_grad(const c10::optional<at::Tensor> &g, const at::Tensor &like, const char *name) {
    if (!g.has_value()) return at::Tensor();
    TORCH_CHECK(g->sizes() == like.sizes() && g->scalar_type() == like.scalar_type() && g->device() == like.device(),
                "msattn: ", name, " must have shape ", shape_str(like), " and dtype ", like.scalar_type(), ", got ",
                shape_str(*g), " ", g->scalar_type());
    return *g;
}

// the params both directions share; memory, norm, mask contiguous, beta_d float64 (Hq)
msattn_infini_params infini_params(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                   const at::Tensor &beta_d, const at::Tensor &memory, const at::Tensor &norm,
                                   const at::Tensor &mask, bool delta_rule, bool causal, double scale,
                                   bool update_memory) {
    msattn_infini_params p{};
    p.B = (int)q.size(0); p.Hq = (int)q.size(1); p.Hkv = (int)k.size(1);
    p.Nq = (int)q.size(2); p.N = (int)k.size(2); p.D = (int)q.size(3);
    p.causal = causal;
    p.delta_rule = delta_rule;
    p.update_memory = update_memory;
    p.scale = scale;
    p.eps = MSATTN_INFINI_EPS;
    p.dtype = dtype_of(q);
    p.q = view_of(q);
    p.k = view_of(k);
    p.v = view_of(v);
    p.beta = beta_d.data_ptr<double>();
    p.mem = memory.data_ptr();
    p.norm = norm.data_ptr();
    p.key_mask = mask_data(mask);
    p.mask_sb = mask_stride(mask);
    p.q_block = (int)kQueryBlock;
    // backward pass 2: an item packs the query columns after its keys once, so the larger its key block
    // the better, as long as every thread still gets a few items
    const int64_t BH = (int64_t)p.B * p.Hkv;
    p.k_block = 64;
    while (p.k_block < 512 && BH * msattn_cdiv(p.N, 2 * p.k_block) >= 4 * at::get_num_threads()) p.k_block *= 2;
    return p;
}

// -> out (B, Hq, Nq, D), out_local (B, Hq, Nq, D), lse (B, Hq, Nq), memory' (B, Hkv, D, D), norm' (B, Hkv, D)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> infini_fwd_cpu(
    const at::Tensor &q,                        // (B, Hq, Nq, D)
    const at::Tensor &k,                        // (B, Hkv, N, D)
    const at::Tensor &v,                        // (B, Hkv, N, D)
    const at::Tensor &beta_,                    // (Hq) gate logits
    const at::Tensor &memory_,                  // (B, Hkv, D, D) float32 (float64 for float64 inputs)
    const at::Tensor &norm_,                    // (B, Hkv, D)
    const c10::optional<at::Tensor> &mask_,     // (B, N) bool, True = real token
    const c10::optional<at::Tensor> &rope_cos,  // (L, R2) float32, L >= N, or None
    const c10::optional<at::Tensor> &rope_sin,
    bool delta_rule, bool causal, double scale, bool update_memory) {
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    check_infini_args(q, k, v, beta_, memory_, norm_, scale);
    at::Tensor mask = check_mask(mask_, k), memory = memory_.contiguous(), norm = norm_.contiguous();
    at::Tensor cos_c, sin_c;
    const msattn_rope rope = check_infini_rope(rope_cos, rope_sin, q, k, cos_c, sin_c);
    at::Tensor beta = beta_.to(at::kDouble).contiguous();
    at::Tensor out = at::empty(q.sizes(), q.options());
    at::Tensor out_local = at::empty(q.sizes(), q.options());
    at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(memory_dtype(q)));
    at::Tensor memory_out = at::empty(memory.sizes(), memory.options());
    at::Tensor norm_out = at::empty(norm.sizes(), norm.options());
    msattn_infini_params p = infini_params(q, k, v, beta, memory, norm, mask, delta_rule, causal, scale,
                                           update_memory);
    p.rope = rope;
    p.out = view_of(out);
    p.out_local = view_of(out_local);
    p.lse = lse.data_ptr();
    p.mem_out = memory_out.data_ptr();
    p.norm_out = norm_out.data_ptr();
    const int64_t BH = (int64_t)p.B * p.Hkv, QB = msattn_cdiv(p.Nq, p.q_block);
    const auto same = [](int64_t w) { return w; };
    if (p.dtype == MSATTN_F64) {
        run_items_dynamic(
            BH, 0, same, [&](int64_t item, void *) { return msattn_infini_fwd_ref_cpu(&p, item, item + 1); },
            "infini_fwd (reference, float64)");
        return {out, out_local, lse, memory_out, norm_out};
    }
    const size_t scratch = msattn_infini_fwd_scratch_bytes(&p);
    // causal: later query blocks see more keys, run them first
    run_items_dynamic(
        BH * QB, scratch, [&](int64_t w) { return (QB - 1 - w / BH) + QB * (w % BH); },
        [&](int64_t item, void *s) { return msattn_infini_fwd_cpu(&p, item, item + 1, s); }, "infini_fwd");
    run_items_dynamic(
        BH, scratch, same, [&](int64_t item, void *s) { return msattn_infini_update_cpu(&p, item, item + 1, s); },
        "infini_fwd (memory update)");
    return {out, out_local, lse, memory_out, norm_out};
}

// -> dq, dk, dv, dbeta (Hq), dmemory (B, Hkv, D, D), dnorm (B, Hkv, D)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> infini_bwd_cpu(
    const at::Tensor &dout,                        // (B, Hq, Nq, D)
    const c10::optional<at::Tensor> &dout_local_,  // (B, Hq, Nq, D) or None
    const c10::optional<at::Tensor> &dlse_,        // (B, Hq, Nq) or None
    const c10::optional<at::Tensor> &dmemory_,     // (B, Hkv, D, D) gradient of memory', or None
    const c10::optional<at::Tensor> &dnorm_,       // (B, Hkv, D) gradient of norm', or None
    const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &beta_,
    const at::Tensor &memory_, const at::Tensor &norm_,
    const at::Tensor &out_local,                   // (B, Hq, Nq, D) from infini_fwd
    const at::Tensor &lse_,                        // (B, Hq, Nq) from infini_fwd
    const c10::optional<at::Tensor> &mask_, const c10::optional<at::Tensor> &rope_cos,
    const c10::optional<at::Tensor> &rope_sin, bool delta_rule, bool causal, double scale, bool update_memory) {
    IsaCall isa_call(isa_mutex());  // one instruction set for the whole call
    check_infini_args(q, k, v, beta_, memory_, norm_, scale);
    at::Tensor cos_c, sin_c;
    const msattn_rope rope = check_infini_rope(rope_cos, rope_sin, q, k, cos_c, sin_c);
    TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() && dout.device() == q.device(),
                "msattn: dout must match q: shape ", shape_str(q), " dtype ", q.scalar_type(), ", got ",
                shape_str(dout), " ", dout.scalar_type());
    TORCH_CHECK(out_local.sizes() == q.sizes() && out_local.scalar_type() == q.scalar_type() &&
                    out_local.device() == q.device(),
                "msattn: out_local must match q: shape ", shape_str(q), " dtype ", q.scalar_type(), ", got ",
                shape_str(out_local), " ", out_local.scalar_type());
    const auto mdt = memory_dtype(q);
    TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == q.size(0) && lse_.size(1) == q.size(1) &&
                    lse_.size(2) == q.size(2) && lse_.scalar_type() == mdt && lse_.device() == q.device(),
                "msattn: lse must be ", mdt, " of shape (B, Hq, Nq) = (", q.size(0), ", ", q.size(1), ", ",
                q.size(2), "), got ", shape_str(lse_), " ", lse_.scalar_type());
    at::Tensor dout_local = check_grad(dout_local_, q, "dout_local");
    at::Tensor dlse = check_grad(dlse_, lse_, "dlse");
    at::Tensor dmem_out = check_grad(dmemory_, memory_, "dmemory");
    at::Tensor dnorm_out = check_grad(dnorm_, norm_, "dnorm");
    if (dlse.defined()) dlse = dlse.contiguous();
    if (dmem_out.defined()) dmem_out = dmem_out.contiguous();
    if (dnorm_out.defined()) dnorm_out = dnorm_out.contiguous();
    at::Tensor mask = check_mask(mask_, k), memory = memory_.contiguous(), norm = norm_.contiguous();
    at::Tensor lse = lse_.contiguous(), beta = beta_.to(at::kDouble).contiguous();

    at::Tensor dq = at::empty(q.sizes(), q.options());
    at::Tensor dk = at::empty(k.sizes(), k.options());
    at::Tensor dv = at::empty(v.sizes(), v.options());
    at::Tensor dmem = at::empty(memory.sizes(), memory.options());
    at::Tensor dnorm = at::empty(norm.sizes(), norm.options());
    at::Tensor dbeta_part = at::zeros({q.size(0), q.size(1)}, q.options().dtype(at::kDouble));  // (B, Hq)
    msattn_infini_params p = infini_params(q, k, v, beta, memory, norm, mask, delta_rule, causal, scale,
                                           update_memory);
    p.rope = rope;
    p.out_local = view_of(out_local);
    p.lse = lse.data_ptr();
    p.dout = view_of(dout);
    p.dout_local = dout_local.defined() ? view_of(dout_local) : msattn_view{nullptr, 0, 0, 0, 0};
    p.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
    p.dmem_out = dmem_out.defined() ? dmem_out.data_ptr() : nullptr;
    p.dnorm_out = dnorm_out.defined() ? dnorm_out.data_ptr() : nullptr;
    p.dq = view_of(dq);
    p.dk = view_of(dk);
    p.dv = view_of(dv);
    p.dmem = dmem.data_ptr();
    p.dnorm = dnorm.data_ptr();
    p.dbeta = dbeta_part.data_ptr<double>();
    const int64_t BH = (int64_t)p.B * p.Hkv, QB = msattn_cdiv(p.Nq, p.q_block), KB = msattn_cdiv(p.N, p.k_block);
    const auto same = [](int64_t w) { return w; };
    if (p.dtype == MSATTN_F64) {
        run_items_dynamic(
            BH, 0, same, [&](int64_t item, void *) { return msattn_infini_bwd_ref_cpu(&p, item, item + 1); },
            "infini_bwd (reference, float64)");
    } else {
        at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
        p.delta = delta.data_ptr<float>();
        const size_t scratch = msattn_infini_bwd_scratch_bytes(&p);
        run_items_dynamic(
            BH * QB, scratch, [&](int64_t w) { return (QB - 1 - w / BH) + QB * (w % BH); },
            [&](int64_t item, void *s) { return msattn_infini_bwd_dq_cpu(&p, item, item + 1, s); }, "infini_bwd (dq)");
        // causal: early key blocks are seen by more queries, run them first
        run_items_dynamic(
            BH * KB, scratch, [&](int64_t w) { return (w / BH) + KB * (w % BH); },
            [&](int64_t item, void *s) { return msattn_infini_bwd_dkv_cpu(&p, item, item + 1, s); },
            "infini_bwd (dk, dv)");
        run_items_dynamic(BH, scratch, same,
                       [&](int64_t item, void *s) { return msattn_infini_bwd_dmem_cpu(&p, item, item + 1, s); },
                       "infini_bwd (dmemory, dnorm, dbeta)");
    }
    // beta is shared by the batch: its per-batch partial sums are added in batch order (deterministic)
    at::Tensor dbeta = at::zeros({q.size(1)}, dbeta_part.options());
    for (int64_t b = 0; b < q.size(0); ++b) dbeta.add_(dbeta_part[b]);
    return {dq, dk, dv, dbeta.to(beta_.scalar_type()), dmem, dnorm};
}

}  // namespace
}  // namespace msattn

TORCH_LIBRARY_FRAGMENT(msattn, m) {
    // Infini-attention over one segment (DESIGN 3) -> out (B, Hq, Nq, D), out_local (B, Hq, Nq, D) the local
    // attention alone, lse (B, Hq, Nq) its log-sum-exp, memory' (B, Hkv, D, D), norm' (B, Hkv, D).
    // beta (Hq) gate logits; memory, norm float32 (float64 for float64 inputs); update_memory=False leaves
    // memory' = memory and norm' = norm (decoding inside a segment); rope_cos/rope_sin (L >= N, R2): q and k
    // arrive un-rotated, the local attention rotates them with their positions in the segment, the memory
    // uses them un-rotated
    m.def("infini_fwd(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor memory, Tensor norm, "
          "Tensor? key_padding_mask, Tensor? rope_cos, Tensor? rope_sin, bool delta_rule, bool causal, "
          "float scale, bool update_memory) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
    // its backward, given the gradients of out (and optionally of out_local, lse, memory', norm')
    // -> dq, dk, dv, dbeta, dmemory, dnorm
    m.def("infini_bwd(Tensor dout, Tensor? dout_local, Tensor? dlse, Tensor? dmemory, Tensor? dnorm, "
          "Tensor q, Tensor k, Tensor v, Tensor beta, Tensor memory, Tensor norm, Tensor out_local, Tensor lse, "
          "Tensor? key_padding_mask, Tensor? rope_cos, Tensor? rope_sin, bool delta_rule, bool causal, "
          "float scale, bool update_memory) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msattn, CPU, m) {
    m.impl("infini_fwd", &msattn::infini_fwd_cpu);
    m.impl("infini_bwd", &msattn::infini_bwd_cpu);
}
