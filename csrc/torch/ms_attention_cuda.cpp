// ms_attention_cuda.cpp -- CUDA implementations of torch.ops.msattn.ms_select / ms_fwd / ms_bwd:
// checks, allocation on the inputs' device, and the launches on the current CUDA stream. No kernel
// math; the kernels are csrc/cuda/*.cu behind the C ABI of msattn.h.
//
// Same schemas and the same boundary checks as the CPU glue (checks.h), with two differences:
//   * float64 is refused on CUDA for ms_fwd / ms_bwd (the kernels compute in fp32); ms_select takes it.
//   * the values of a caller-made `index` are not validated (the CPU glue walks them on the host;
//     here that would cost a device-to-host copy and a stream sync per call, and break CUDA graph
//     capture). The kernels stay inside their buffers for any int32 content; an index that did not
//     come from ms_select for these shapes gives unspecified (not unsafe) results.
// Everything is asynchronous on the current stream; workspaces come from the caching allocator.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "../msattn.h"
#include "../msattn_regions.h"
#include "checks.h"
#include "packed.h"

namespace msattn {
namespace {

// a launcher's status as a Python exception naming the op and what to change
void check_status(int status, const char *what) {
    if (status == MSATTN_ERR_CUDA) C10_CUDA_CHECK(cudaGetLastError());
    TORCH_CHECK(status != MSATTN_ERR_DTYPE, "msattn: ", what, ": dtype not supported by the CUDA kernels");
    TORCH_CHECK(status != MSATTN_ERR_ARG, "msattn: ", what, ": sizes beyond the CUDA kernels (head dim <= 256; "
                "head dims above 128 need about 130 KB of shared memory per block, as on A100/H100; "
                "at most 2^31 - 1 blocks)");
    TORCH_CHECK(status == MSATTN_OK, "msattn: ", what, " failed with status ", status);
}

void check_cuda(const at::Tensor &q, const char *who) {
    TORCH_CHECK(q.is_cuda(), "msattn: ", who, ": this is the CUDA implementation, got tensors on ", q.device());
}

void check_not_f64(const at::Tensor &q, const char *who) {
    TORCH_CHECK(q.scalar_type() != at::kDouble, "msattn: ", who, ": float64 is not supported on CUDA (the kernels "
                "compute in float32); use float32, bfloat16 or float16, or run float64 on the CPU");
}

void *stream_of() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t sm_count() {
    int dev = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return sms;
}

// ----------------------------------------------------------------------------------------------
// ms_select

at::Tensor ms_select_one(const at::Tensor &q,                            // (B, Hq, Nq, D)
                          const at::Tensor &k,                            // (B, Hkv, N, D)
                          const c10::optional<at::Tensor> &mask_,         // bool (B, N), True = real
                          const c10::optional<at::Tensor> &key_sums,      // float32 (B, Hkv, >= NK, D)
                          const c10::optional<at::Tensor> &key_counts,    // int32 (B, Hkv, >= NK)
                          int64_t block_q, int64_t block_k, int64_t merge, int64_t topk, bool causal,
                          int64_t local,    // the regions before the group taken first
                          int64_t coarse_regions, int64_t coarse_topk) {  // multi-scale (0, 0: exact)
    check_qkv(q, k, nullptr);
    check_blocks(block_q, block_k, merge, topk);
    check_local(local, topk);
    check_cuda(q, "ms_select");
    at::Tensor mask = check_mask(mask_, k);
    TORCH_CHECK(key_sums.has_value() == key_counts.has_value(), "msattn: key_sums and key_counts go together");
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), N = k.size(2);
    const int64_t span = msattn_span((int)block_q, (int)merge);
    const int64_t NK = msattn_num_key_regions(N, (int)block_k), NA = msattn_num_query_regions(N, Nq, (int)block_q);
    const int64_t G = msattn_num_groups(N, Nq, span);
    at::Tensor index = at::empty({B, Hkv, G, topk}, q.options().dtype(at::kInt));  // (B, Hkv, G, T)
    if (index.numel() == 0) return index;

    at::Tensor sums, counts;  // (B, Hkv, NK, D) float32, (B, Hkv, NK) int32
    if (key_sums.has_value()) {
        sums = *key_sums;
        counts = *key_counts;
    } else {
        sums = at::empty({B, Hkv, NK, D}, q.options().dtype(at::kFloat));
        counts = at::empty({B, Hkv, NK}, q.options().dtype(at::kInt));
    }
    at::Tensor qbar = at::empty({B, Hkv, NA, D}, q.options().dtype(at::kDouble));  // (B, Hkv, NA, D)
    at::Tensor qcount = at::empty({B, Hkv, NA}, q.options().dtype(at::kInt));      // (B, Hkv, NA)
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

    // selection blocks stride over the (b, h, g) items, each with its own workspace slot: enough
    // blocks to fill the GPU twice, as long as their workspace stays under 256 MB
    const size_t slot = msattn_select_cuda_slot_bytes(&p);
    const int64_t slots = std::max<int64_t>(
        1, std::min<int64_t>({B * Hkv * G, 2 * sm_count(), (int64_t)((size_t(256) << 20) / std::max<size_t>(slot, 1))}));
    at::Tensor scratch = at::empty({slots * (int64_t)slot}, q.options().dtype(at::kByte));
    p.cuda_scratch = scratch.data_ptr();
    p.cuda_slots = (int)slots;

    check_status(msattn_region_means_cuda(&p, stream_of()), "ms_select (region means)");
    if (NC > 0) check_status(msattn_coarse_sums_cuda(&p, stream_of()), "ms_select (coarse sums)");
    check_status(msattn_select_cuda(&p, stream_of()), "ms_select");
    return index;
}

at::Tensor ms_select_cuda(const at::Tensor &q, const at::Tensor &k, const c10::optional<at::Tensor> &mask,
                         const c10::optional<at::Tensor> &key_sums, const c10::optional<at::Tensor> &key_counts,
                         int64_t block_q, int64_t block_k, int64_t merge, int64_t topk, bool causal, int64_t local,
                         int64_t coarse_regions, int64_t coarse_topk,
                         const c10::optional<at::Tensor> &cu_seqlens_q,    // int32 (S + 1), packed.h
                         const c10::optional<at::Tensor> &cu_seqlens_k) {  // int32 (S + 1)
    check_coarse(coarse_regions, coarse_topk);
    return select_maybe_packed(cu_seqlens_q, cu_seqlens_k, q, k, mask, key_sums, key_counts,
                               [&](auto q_s, auto k_s, auto mask_s, auto sums_s, auto counts_s) {
                                   return ms_select_one(q_s, k_s, mask_s, sums_s, counts_s, block_q, block_k, merge,
                                                        topk, causal, local, coarse_regions, coarse_topk);
                               });
}

void ms_region_sums_append_cuda(at::Tensor &key_sums, at::Tensor &key_counts, const at::Tensor &k,
                                const c10::optional<at::Tensor> &mask_, int64_t start, int64_t block_k) {
    check_cuda(k, "ms_region_sums_append_");
    const AppendArgs a = check_append(key_sums, key_counts, k, mask_, start, block_k);
    const c10::cuda::CUDAGuard guard(k.device());
    check_status(msattn_region_sums_append_cuda(a.sums, view_of(k), dtype_of(k),
                                                mask_data(a.mask), mask_stride(a.mask), (int)k.size(0),
                                                (int)k.size(1), (int)k.size(3), (int)block_k, start, a.end,
                                                stream_of()),
                 "ms_region_sums_append_");
}

// ----------------------------------------------------------------------------------------------
// ms_fwd, ms_bwd

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
    p.kv_blocks = 1;  // the CPU's pass-2 blocking; the CUDA grid has its own
    return p;
}

void check_ms_args(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &index,
                   int64_t block_q, int64_t block_k, int64_t merge, double scale, const char *who) {
    check_qkv(q, k, &v);
    check_cuda(q, who);
    check_not_f64(q, who);
    check_blocks(block_q, block_k, merge, index.dim() == 4 ? std::max<int64_t>(index.size(3), 1) : 1);
    check_index(index, q, k, block_q * merge);
    TORCH_CHECK(std::isfinite(scale), "msattn: scale must be finite, got ", scale);
}

std::tuple<at::Tensor, at::Tensor> ms_fwd_one(const at::Tensor &q,                         // (B, Hq, Nq, D)
                                               const at::Tensor &k,                        // (B, Hkv, N, D)
                                               const at::Tensor &v,                        // (B, Hkv, N, D)
                                               const at::Tensor &index_,                   // int32 (B, Hkv, G, T)
                                               const c10::optional<at::Tensor> &mask_,     // bool (B, N)
                                               const c10::optional<at::Tensor> &rope_cos,  // float32 (L, rd/2)
                                               const c10::optional<at::Tensor> &rope_sin,  // float32 (L, rd/2)
                                               int64_t block_q, int64_t block_k, int64_t merge, bool causal,
                                               double scale) {
    check_ms_args(q, k, v, index_, block_q, block_k, merge, scale, "ms_fwd");
    const c10::cuda::CUDAGuard guard(q.device());
    at::Tensor mask = check_mask(mask_, k), index = index_.contiguous(), cos, sin;
    const msattn_rope rope = check_rope(rope_cos, rope_sin, q, msattn_compact_len((int)index.size(3), (int)block_k,
                                                                                  block_q * merge), cos, sin);
    at::Tensor out = at::empty(q.sizes(), q.options());                                 // (B, Hq, Nq, D)
    at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // (B, Hq, Nq)
    if (out.numel() == 0) return {out, lse};
    msattn_ms_params p = ms_params(q, k, v, index, mask, rope, block_q, block_k, merge, causal, scale);
    p.out = view_of(out);
    p.lse = lse.data_ptr();
    check_status(msattn_ms_fwd_cuda(&p, stream_of()), "ms_fwd");
    return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> ms_fwd_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                              const at::Tensor &index, const c10::optional<at::Tensor> &mask,
                                              const c10::optional<at::Tensor> &rope_cos,
                                              const c10::optional<at::Tensor> &rope_sin, int64_t block_q,
                                              int64_t block_k, int64_t merge, bool causal, double scale,
                                              const c10::optional<at::Tensor> &cu_seqlens_q,    // int32 (S + 1)
                                              const c10::optional<at::Tensor> &cu_seqlens_k) {  // int32 (S + 1)
    return fwd_maybe_packed(cu_seqlens_q, cu_seqlens_k, q, k, v, index, mask, block_q * merge,
                            [&](auto q_s, auto k_s, auto v_s, auto index_s, auto mask_s) {
                                return ms_fwd_one(q_s, k_s, v_s, index_s, mask_s, rope_cos, rope_sin, block_q,
                                                  block_k, merge, causal, scale);
                            });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_bwd_one(
    const at::Tensor &dout,                        // (B, Hq, Nq, D)
    const c10::optional<at::Tensor> &dlse_,        // float32 (B, Hq, Nq)
    const at::Tensor &q,                           // (B, Hq, Nq, D)
    const at::Tensor &k, const at::Tensor &v,      // (B, Hkv, N, D)
    const at::Tensor &out,                         // (B, Hq, Nq, D)
    const at::Tensor &lse_,                        // float32 (B, Hq, Nq)
    const at::Tensor &index_,                      // int32 (B, Hkv, G, T)
    const c10::optional<at::Tensor> &mask_,        // bool (B, N)
    const c10::optional<at::Tensor> &rope_cos,     // float32 (L, rd/2)
    const c10::optional<at::Tensor> &rope_sin,     // float32 (L, rd/2)
    int64_t block_q, int64_t block_k, int64_t merge, bool causal, double scale) {
    check_ms_args(q, k, v, index_, block_q, block_k, merge, scale, "ms_bwd");
    TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() && dout.device() == q.device(),
                "msattn: dout must match q: shape ", shape_str(q), " dtype ", q.scalar_type(), ", got ",
                shape_str(dout), " ", dout.scalar_type());
    TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(),
                "msattn: out must match q: shape ", shape_str(q), " dtype ", q.scalar_type(), ", got ",
                shape_str(out), " ", out.scalar_type());
    TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == q.size(0) && lse_.size(1) == q.size(1) &&
                    lse_.size(2) == q.size(2) && lse_.scalar_type() == at::kFloat && lse_.device() == q.device(),
                "msattn: lse must be float32 of shape (B, Hq, Nq) = (", q.size(0), ", ", q.size(1), ", ",
                q.size(2), ") on ", q.device(), ", got ", shape_str(lse_), " ", lse_.scalar_type());
    const c10::cuda::CUDAGuard guard(q.device());
    at::Tensor dlse;
    if (dlse_.has_value()) {
        TORCH_CHECK(dlse_->sizes() == lse_.sizes() && dlse_->scalar_type() == at::kFloat &&
                        dlse_->device() == q.device(),
                    "msattn: dlse must match lse: float32 of shape ", shape_str(lse_), ", got ", shape_str(*dlse_),
                    " ", dlse_->scalar_type());
        dlse = dlse_->contiguous();
    }
    at::Tensor mask = check_mask(mask_, k), index = index_.contiguous(), lse = lse_.contiguous(), cos, sin;
    const msattn_rope rope = check_rope(rope_cos, rope_sin, q, msattn_compact_len((int)index.size(3), (int)block_k,
                                                                                  block_q * merge), cos, sin);
    at::Tensor dq = at::empty(q.sizes(), q.options());  // (B, Hq, Nq, D)
    at::Tensor dk = at::empty(k.sizes(), k.options());  // (B, Hkv, N, D)
    at::Tensor dv = at::empty(v.sizes(), v.options());  // (B, Hkv, N, D)
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
    const int64_t NK = msattn_num_key_regions(p.N, p.block_k);
    at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // (B, Hq, Nq)
    at::Tensor inv_offsets = at::empty({BH, NK + 1}, q.options().dtype(at::kInt));                  // (B*Hkv, NK+1)
    at::Tensor inv_groups = at::empty({BH, G * index.size(3)}, q.options().dtype(at::kInt));        // (B*Hkv, G*T)
    p.delta = delta.data_ptr<float>();
    p.inv_offsets = inv_offsets.data_ptr<int32_t>();
    p.inv_groups = inv_groups.data_ptr<int32_t>();
    // all on one stream: pass 2 reads pass 1's delta and the inverted index
    check_status(msattn_ms_invert_cuda(&p, inv_offsets.data_ptr<int32_t>(), inv_groups.data_ptr<int32_t>(),
                                       stream_of()), "ms_bwd (inverted index)");
    check_status(msattn_ms_bwd_dq_cuda(&p, stream_of()), "ms_bwd (dq)");
    check_status(msattn_ms_bwd_dkv_cuda(&p, stream_of()), "ms_bwd (dk, dv)");
    return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_bwd_cuda(
    const at::Tensor &dout, const c10::optional<at::Tensor> &dlse, const at::Tensor &q, const at::Tensor &k,
    const at::Tensor &v, const at::Tensor &out, const at::Tensor &lse, const at::Tensor &index,
    const c10::optional<at::Tensor> &mask, const c10::optional<at::Tensor> &rope_cos,
    const c10::optional<at::Tensor> &rope_sin, int64_t block_q, int64_t block_k, int64_t merge, bool causal,
    double scale, const c10::optional<at::Tensor> &cu_seqlens_q,  // int32 (S + 1)
    const c10::optional<at::Tensor> &cu_seqlens_k) {              // int32 (S + 1)
    return bwd_maybe_packed(cu_seqlens_q, cu_seqlens_k, dout, dlse, q, k, v, out, lse, index, mask, block_q * merge,
                            [&](auto dout_s, auto dlse_s, auto q_s, auto k_s, auto v_s, auto out_s, auto lse_s,
                                auto index_s, auto mask_s) {
                                return ms_bwd_one(dout_s, dlse_s, q_s, k_s, v_s, out_s, lse_s, index_s, mask_s,
                                                  rope_cos, rope_sin, block_q, block_k, merge, causal, scale);
                            });
}

}  // namespace
}  // namespace msattn

TORCH_LIBRARY_IMPL(msattn, CUDA, m) {
    m.impl("ms_select", &msattn::ms_select_cuda);
    m.impl("ms_region_sums_append_", &msattn::ms_region_sums_append_cuda);
    m.impl("ms_fwd", &msattn::ms_fwd_cuda);
    m.impl("ms_bwd", &msattn::ms_bwd_cuda);
}
