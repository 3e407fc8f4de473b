"""Packed sequences against a padded batch: MS attention over sequences of mixed lengths.

The same sequences three ways, forward and forward+backward, median of --repeats after --warmup (the
three taken in turn, so that drift of the machine's speed falls on all of them):
packed along one row with ``cu_seqlens`` (what transformers' padding-free batches become), a right-padded
batch ``(S, max length)`` with a key padding mask (what padding collators produce), and one call per
sequence from Python. Validates first: the packed outputs equal the separate calls bit for bit.

    python benchmarks/bench_packed.py --lengths 512,4096,1024,3072,2048,768,1536,2560
"""

from __future__ import annotations

import argparse
import json

import torch
from measure import DTYPES, add_attention_args, interleaved_median_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_attention_args(ap, lengths="512,4096,1024,3072,2048,768,1536,2560", dtype="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)

    import msattn

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    lengths = [int(x) for x in args.lengths.split(",")]
    kw = dict(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk)
    torch.manual_seed(0)
    qs = [torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype) for n in lengths]
    ks = [torch.randn(1, args.kv_heads, n, args.head_dim, device=device, dtype=dtype) for n in lengths]
    vs = [torch.randn_like(k) for k in ks]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    packed = [torch.cat(xs, 2).requires_grad_() for xs in (qs, ks, vs)]
    width = max(lengths)

    def pad(xs):
        out = torch.zeros(len(xs), xs[0].shape[1], width, args.head_dim, device=device, dtype=dtype)
        for row, x in enumerate(xs):
            out[row, :, :x.shape[2]] = x[0]
        return out.requires_grad_()

    padded = [pad(xs) for xs in (qs, ks, vs)]
    mask = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    separate = [[x.clone().requires_grad_() for x in xs] for xs in zip(qs, ks, vs)]

    runs = {
        "packed": lambda: msattn.ms_attention(*packed, cu_seqlens_q=cu, **kw),
        "padded": lambda: msattn.ms_attention(*padded, key_padding_mask=mask, **kw),
        "separate": lambda: torch.cat([msattn.ms_attention(*x, **kw) for x in separate], 2),
    }
    want = runs["separate"]()
    assert torch.equal(runs["packed"](), want), "packed outputs differ from the separate calls"

    def backward(name):
        def run():
            out = runs[name]()
            out.backward(torch.ones_like(out))
        return run

    total = sum(lengths)
    print(f"{len(lengths)} sequences, {total} tokens ({min(lengths)}..{width}), Hq{args.heads} Hkv{args.kv_heads} "
          f"D{args.head_dim} {args.dtype} bq{args.block_q} bk{args.block_k} m{args.merge} k{args.topk} on {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'impl':>9} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | {'fwd vs packed':>13}")
    fwd = interleaved_median_ms(runs, args.warmup, args.repeats, device)
    both = interleaved_median_ms({name: backward(name) for name in runs}, args.warmup, args.repeats, device)
    rows = [dict(impl=name, fwd_ms=fwd[name], fwd_bwd_ms=both[name]) for name in runs]
    base = rows[0]["fwd_ms"]
    for r in rows:
        print(f"{r['impl']:>9} | {r['fwd_ms']:8.1f} | {r['fwd_bwd_ms']:10.1f} | {r['fwd_ms'] / base:12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(lengths=lengths, config=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
