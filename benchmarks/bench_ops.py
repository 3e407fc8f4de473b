"""MS attention's three ops alone: selection, forward over a selection, backward.

Times ``torch.ops.msattn.ms_select``, ``ms_fwd`` (given the selection) and ``ms_bwd`` separately on one
shape per length, median of --repeats after --warmup, so a change to one kernel shows in its own
column (``bench_attention.py`` times the whole op against SDPA). With ``--coarse-regions S --coarse-topk C``
it also times the multi-scale selection on the same tensors, in turn with the exact one.

    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --lengths 16384,65536 --coarse-regions 64 --coarse-topk 4
"""

from __future__ import annotations

import argparse
import math

import torch
from measure import DTYPES, add_attention_args, median_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_attention_args(ap, lengths="16384,65536", dtype="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--coarse-regions", type=int, default=0, help="also time multi-scale selection (0: do not)")
    ap.add_argument("--coarse-topk", type=int, default=0)
    args = ap.parse_args(argv)
    if (args.coarse_regions > 0) != (args.coarse_topk > 0):
        ap.error(f"--coarse-regions and --coarse-topk go together, got {args.coarse_regions} and {args.coarse_topk}")

    from msattn.ops import ops  # torch.ops.msattn, registered by the import
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    params = (args.block_q, args.block_k, args.merge)
    scale = 1.0 / math.sqrt(args.head_dim)
    print(f"B1 Hq{args.heads} Hkv{args.kv_heads} D{args.head_dim} {args.dtype} causal bq{args.block_q} "
          f"bk{args.block_k} m{args.merge} k{args.topk} on {device}")
    coarse = args.coarse_regions > 0
    ms_col = f" | {f's{args.coarse_regions},c{args.coarse_topk} ms':>12}" if coarse else ""
    print(f"{'N':>8} | {'select ms':>9}{ms_col} | {'fwd ms':>8} | {'bwd ms':>8}")
    for n in [int(x) for x in args.lengths.split(",")]:
        torch.manual_seed(0)
        q = torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, args.kv_heads, n, args.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        index = ops.ms_select(q, k, None, None, None, *params, args.topk, True)
        out, lse = ops.ms_fwd(q, k, v, index, None, None, None, *params, True, scale)
        dout = torch.randn_like(out)
        t_sel = median_ms(lambda: ops.ms_select(q, k, None, None, None, *params, args.topk, True),
                          args.warmup, args.repeats, device)
        t_fwd = median_ms(lambda: ops.ms_fwd(q, k, v, index, None, None, None, *params, True, scale),
                          args.warmup, args.repeats, device)
        t_bwd = median_ms(lambda: ops.ms_bwd(dout, None, q, k, v, out, lse, index, None, None, None, *params,
                                             True, scale), args.warmup, args.repeats, device)
        ms_val = ""
        if coarse:
            t_ms = median_ms(lambda: ops.ms_select(q, k, None, None, None, *params, args.topk, True, 0,
                                                   args.coarse_regions, args.coarse_topk),
                             args.warmup, args.repeats, device)
            ms_val = f" | {t_ms:>12.2f}"
        print(f"{n:>8} | {t_sel:>9.2f}{ms_val} | {t_fwd:>8.2f} | {t_bwd:>8.2f}")


if __name__ == "__main__":
    main()
