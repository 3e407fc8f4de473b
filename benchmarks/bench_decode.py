"""One decode step against a long cache: MS attention with MSCache's region sums vs dense SDPA.

For each cache length N, K and V (B, Hkv, N, D) sit in an MSCache layer whose region sums were
computed once (as a prefill leaves them). A decode step is what a patched model does per layer:
append one token, bring the region sums up to date, select from the sums (N/block_k dot products
per KV head) and attend to the selected regions plus the group's own tokens. Dense SDPA attends the
same query to all N+1 keys (enable_gqa, no K/V copies). Also shown: MS selecting from K itself
(no summaries), which reads all of K every step. Validates first (covering topk equals SDPA), then
prints one row per (N, impl): median ms per step over --repeats after --warmup, speedup over SDPA,
and the memory of K+V and of the region summaries.

    python benchmarks/bench_decode.py --lengths 16k,64k,256k,1m --json bench_out/decode.json
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

import msattn
from measure import median_ms
from msattn.eval.__main__ import parse_lengths
from msattn.hf.cache import MSLayer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="16k,64k,256k,1m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-q", type=int, default=16)
    ap.add_argument("--block-k", type=int, default=16)
    ap.add_argument("--merge", type=int, default=64)
    ap.add_argument("--topk", type=int, default=448)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def make_layer(k, v, block_k):
    layer = MSLayer(block_k=block_k)
    layer.update(k, v)
    layer.region_sums(None)
    return layer


def ms_step(layer, q, k1, v1, kw, use_sums=True):
    keys, values = layer.update(k1, v1)
    if use_sums:
        sums, counts = layer.region_sums(None)
        index = msattn.ms_select(q, keys, key_sums=sums, key_counts=counts, **kw)
    else:
        index = msattn.ms_select(q, keys, **kw)
    return msattn.ms_attention(q, keys, values, index=index, **kw)


def validate(args):
    n = 4 * args.block_k * 64 + 5
    kw = dict(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=math.ceil((n + 1) / args.block_k))
    k = torch.randn(1, args.kv_heads, n, args.head_dim)
    v = torch.randn(1, args.kv_heads, n, args.head_dim)
    q = torch.randn(1, args.heads, 1, args.head_dim)
    k1, v1 = torch.randn(1, args.kv_heads, 1, args.head_dim), torch.randn(1, args.kv_heads, 1, args.head_dim)
    out = ms_step(make_layer(k, v, args.block_k), q, k1, v1, kw)
    ref = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, k1], 2), torch.cat([v, v1], 2),
                                                           enable_gqa=True)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"validation: MS decode with covering topk vs SDPA at N={n + 1}: max rel err {err:.2e}")
    if not err <= 1e-5:
        raise SystemExit("validation failed")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    validate(args)
    kw = dict(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk)
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"B{B} Hq{Hq} Hkv{Hkv} D{D} float32 bq{args.block_q} bk{args.block_k} m{args.merge} k{args.topk}, "
          f"{torch.get_num_threads()} threads, isa {msattn.isa()}")
    header = (f"{'N':>8} | {'impl':<12} | {'ms/step':>9} | {'speedup':>7} | {'K+V MB':>8} | {'sums MB':>8} | "
              f"{'sums/KV':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for n in parse_lengths(args.lengths):
        torch.manual_seed(0)
        k = torch.randn(B, Hkv, n, D)
        v = torch.randn(B, Hkv, n, D)
        q = torch.randn(B, Hq, 1, D)
        k1, v1 = torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
        kv_mb = 2 * k.numel() * k.element_size() / 2**20
        kfull, vfull = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kfull, vfull, enable_gqa=True),
                         args.warmup, args.repeats)
        del kfull, vfull
        results = [("sdpa", sdpa, float("nan"))]
        for name, use_sums in (("ms+sums", True), ("ms, no sums", False)):
            layer = make_layer(k, v, args.block_k)
            sums_mb = (layer._sums[:, :, :math.ceil(n / args.block_k)].numel() * 4
                       + layer._counts[:, :, :math.ceil(n / args.block_k)].numel() * 4) / 2**20
            step = median_ms(lambda: ms_step(layer, q, k1, v1, kw, use_sums), args.warmup, args.repeats)
            results.append((name, step, sums_mb if use_sums else float("nan")))
            del layer
        for name, step, sums_mb in results:
            print(f"{n:>8} | {name:<12} | {step:>9.3f} | {sdpa / step:>7.1f} | {kv_mb:>8.1f} | {sums_mb:>8.2f} | "
                  f"{sums_mb / kv_mb:>8.4f}")
            rows.append({"n": n, "impl": name, "ms_per_step": step, "speedup": sdpa / step, "kv_mb": kv_mb,
                         "sums_mb": sums_mb, "block_k": args.block_k})
        del k, v
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
