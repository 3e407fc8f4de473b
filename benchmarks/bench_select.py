"""MS selection (``msattn.ms_select``) against the attention it feeds, at long lengths on the CPU.

At long lengths selection dominates an MS forward: every query region scores every earlier key
region, ``(N/block_q) * (N/block_k) / 2`` scores per KV head, against ``N * topk * block_k`` attended
pairs. For each length: ``ms_select`` and ``ms_attention`` given that selection (median of --repeats
after --warmup), the share of the forward that is selection, and the rate of scores (one query
region against one candidate key region, all KV heads). Defaults: the demo model's shapes
(``python -m msattn.demo_toy``: Hq=4, Hkv=2, D=32, block_q=block_k=16, merge=2, topk=4), fp32, causal.

    python benchmarks/bench_select.py --lengths 65536,262144
    python benchmarks/bench_select.py --lengths 32768,262144,1048576 --heads 8 --kv-heads 2 --head-dim 64 \
        --merge 16 --topk 64   # the authors' regions (the shape of the GPU runs)

``MSATTN_ISA=avx512`` runs the same selection without the AMX screen. With ``--coarse-regions S
--coarse-topk C`` it times multi-scale selection against the exact one (in turn, each round) and
reports the share of the exact selection's regions that the multi-scale selection also chose:

    python benchmarks/bench_select.py --lengths 262144,1048576 --heads 8 --kv-heads 2 --head-dim 64 \
        --merge 16 --topk 64 --coarse-regions 64 --coarse-topk 16 --no-attention
"""

from __future__ import annotations

import argparse
import math

import torch
from measure import interleaved_median_ms, median_ms

import msattn


def scores_per_call(n: int, block_q: int, block_k: int, merge: int, topk: int, kv_heads: int) -> int:
    """Query-region x candidate-region scores of one causal call without padding: groups with at most
    ``topk`` candidates take them all and score nothing."""
    span = block_q * merge
    total = 0
    for g in range(-(-n // span)):
        cand = g * span // block_k
        if cand > topk:
            total += min(merge, -(-(n - g * span) // block_q)) * cand
    return total * kv_heads


def random_qkv(args, n: int):
    """q ``(1, Hq, n, D)``, k and v ``(1, Hkv, n, D)`` from seed 0, fp32."""
    torch.manual_seed(0)
    return (torch.randn(1, args.heads, n, args.head_dim), torch.randn(1, args.kv_heads, n, args.head_dim),
            torch.randn(1, args.kv_heads, n, args.head_dim))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="65536,262144", help="comma-separated sequence lengths")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--block-q", type=int, default=16)
    ap.add_argument("--block-k", type=int, default=16)
    ap.add_argument("--merge", type=int, default=2)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-attention", action="store_true", help="time the selection alone")
    ap.add_argument("--coarse-regions", type=int, default=0, help="also time multi-scale selection with coarse "
                    "regions of this many key regions")
    ap.add_argument("--coarse-topk", type=int, default=0, help="coarse regions each group keeps")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.coarse_regions:
        return compare_multiscale(args)
    kw = dict(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk)
    print(f"ms_select vs ms_attention (given the selection), B=1, Hq={args.heads}, Hkv={args.kv_heads}, "
          f"D={args.head_dim}, fp32, {kw}, {torch.get_num_threads()} threads, ISA {msattn.isa()}")
    print(f"{'N':>8} | {'select ms':>10} | {'attention ms':>12} | {'select share':>12} | {'Mscores/s':>10}")
    for n in [int(x) for x in args.lengths.split(",")]:
        q, k, v = random_qkv(args, n)
        index = msattn.ms_select(q, k, **kw)
        t_sel = median_ms(lambda: msattn.ms_select(q, k, **kw), args.warmup, args.repeats)
        t_att = math.nan if args.no_attention else median_ms(
            lambda: msattn.ms_attention(q, k, v, index=index, **kw), args.warmup, args.repeats)
        rate = scores_per_call(n, args.block_q, args.block_k, args.merge, args.topk, args.kv_heads) / t_sel / 1e3
        print(f"{n:>8} | {t_sel:>10.1f} | {t_att:>12.1f} | {t_sel / (t_sel + t_att):>12.0%} | {rate:>10.1f}")


def compare_multiscale(args):
    kw = dict(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk)
    coarse = dict(kw, coarse_regions=args.coarse_regions, coarse_topk=args.coarse_topk)
    print(f"ms_select exact vs multi-scale (coarse_regions={args.coarse_regions}, coarse_topk={args.coarse_topk}), "
          f"B=1, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, fp32, {kw}, {torch.get_num_threads()} "
          f"threads, ISA {msattn.isa()}, median of {args.repeats} in turn")
    print(f"{'N':>8} | {'exact ms':>9} | {'multi-scale ms':>14} | {'speedup':>7} | {'same regions':>12}")
    for n in [int(x) for x in args.lengths.split(",")]:
        q, k, _ = random_qkv(args, n)
        exact, multi = msattn.ms_select(q, k, **kw), msattn.ms_select(q, k, **coarse)
        same = sum(len(set(a.tolist()) & set(b.tolist()) - {-1})
                   for a, b in zip(exact.reshape(-1, args.topk), multi.reshape(-1, args.topk)))
        share = same / max(1, int((exact >= 0).sum()))
        t = interleaved_median_ms({"exact": lambda: msattn.ms_select(q, k, **kw),
                                   "multi": lambda: msattn.ms_select(q, k, **coarse)}, args.warmup, args.repeats)
        print(f"{n:>8} | {t['exact']:>9.1f} | {t['multi']:>14.1f} | {t['exact'] / t['multi']:>6.2f}x | {share:>12.1%}")


if __name__ == "__main__":
    main()
