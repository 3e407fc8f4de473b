// ops.cpp -- the schemas of torch.ops.msattn, declared once; devices add implementations in
// their own files (ms_attention_cpu.cpp, ms_attention_cuda.cpp). Fake kernels and autograd live in
// msattn/ops.py. The module init is empty: importing msattn._C only runs these registrations.
#include <Python.h>
#include <torch/library.h>

PyMODINIT_FUNC PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    return PyModule_Create(&module);
}

TORCH_LIBRARY(msattn, m) {
    // selection (DESIGN 1.1-1.5) -> int32 (B, Hkv, G, topk), ascending, -1 padded
    // key_sums float32 (B, Hkv, >= NK, D) and key_counts int32 (B, Hkv, >= NK): a cache's region sums
    // of all N keys (see ms_region_sums_append_), used instead of reading k
    // local (0 <= local <= topk): a ranking group first takes the local regions just before it (0: DESIGN's rule)
    // coarse_regions > 0: multi-scale ranking (coarse regions of that many key regions, the best coarse_topk
    // for each group's mean query kept, its query regions ranking the key regions inside them); 0: exact
    // cu_seqlens_q, cu_seqlens_k int32 (S + 1): packed sequences along the tokens of a batch of one
    // (FlashAttention's varlen convention, csrc/torch/packed.h); the index then holds (1, Hkv, sum G_s, topk)
    m.def("ms_select(Tensor q, Tensor k, Tensor? key_padding_mask, Tensor? key_sums, Tensor? key_counts, "
          "int block_q, int block_k, int merge, int topk, bool causal, int local=0, int coarse_regions=0, "
          "int coarse_topk=0, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> Tensor");
    // append the keys at positions [start, start + n) of k (B, Hkv, n, D) to region sums that hold the
    // keys [0, start); key_padding_mask (B, n) for the new keys
    m.def("ms_region_sums_append_(Tensor(a!) key_sums, Tensor(b!) key_counts, Tensor k, "
          "Tensor? key_padding_mask, int start, int block_k) -> ()");
    // attention over a selection (DESIGN 1.6) -> out (B, Hq, Nq, D), lse (B, Hq, Nq)
    m.def("ms_fwd(Tensor q, Tensor k, Tensor v, Tensor index, Tensor? key_padding_mask, "
          "Tensor? rope_cos, Tensor? rope_sin, int block_q, int block_k, int merge, bool causal, "
          "float scale, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) -> (Tensor, Tensor)");
    // its backward (DESIGN 1.7) -> dq, dk, dv
    // dlse (B, Hq, Nq), when given, is the gradient flowing into lse
    m.def("ms_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor index, "
          "Tensor? key_padding_mask, Tensor? rope_cos, Tensor? rope_sin, int block_q, int block_k, "
          "int merge, bool causal, float scale, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None) "
          "-> (Tensor, Tensor, Tensor)");
}
