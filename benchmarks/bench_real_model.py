"""Prefill speed of a real model on this CPU: MS attention against dense SDPA, float32 against bfloat16,
and where MS attention's time goes.

    python benchmarks/bench_real_model.py --model smollm2-135m --lengths 32k,128k --dense-max 32k

For each dtype and length, each method prefills the first ``length`` tokens of ``--text`` (default
Persuasion) in chunks of ``--chunk-size`` through ``msattn.prefill`` (the cache of its method; only
the last position's logits), once after a warm-up prefill of one chunk; it prints tokens per second and
the ratio MS / dense measured in the same run, and peak RSS. ``--profile``: one more MS prefill under
torch.profiler, its self time split into the linear layers (``aten::mm``/``addmm``), MS attention given
the selection (``msattn::ms_fwd``), the selection (``msattn::ms_select`` and the region sums) and
everything else. Dense beyond ``--dense-max`` is skipped (quadratic: minutes per length on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import torch

import msattn
import msattn.hf
from msattn.eval.__main__ import parse_lengths
from msattn.eval.passkey import HELD_OUT, austen_dir
from msattn.eval.loading import load, peak_rss_mb, reset_peak_rss
from msattn.eval.perplexity import text_tokens
from msattn.eval.report import format_length, markdown_table
from msattn.hf.cache import prefill

GROUPS = {"linear layers (aten::mm, addmm)": ("aten::mm", "aten::addmm"),
          "MS attention given the selection (msattn::ms_fwd)": ("msattn::ms_fwd",),
          "selection (msattn::ms_select, region sums)": ("msattn::ms_select", "msattn::ms_region_sums_append_",
                                                         "msattn::ms_region_means")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", help="text to prefill (default: the Austen folder's persuasion.txt)")
    ap.add_argument("--lengths", type=parse_lengths, default=[32768, 131072])
    ap.add_argument("--dense-max", type=lambda s: parse_lengths(s)[0], default=32768)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--profile", action="store_true")
    for name, default in (("block-q", 16), ("block-k", 16), ("merge", 16), ("topk", 64), ("local", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--rope", default="selected")
    args = ap.parse_args(argv)
    cfg = msattn.MSConfig(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk,
                          local=args.local, rope=args.rope)
    print(f"{args.model}, {cfg}, chunk {args.chunk_size}, {torch.get_num_threads()} threads")
    rows = [["dtype", "length", "dense tok/s", "MS tok/s", "MS / dense", "peak RSS dense (MiB)", "peak RSS MS (MiB)"]]
    profiles = [["dtype", "length", *GROUPS, "other", "total (s)"]]
    for dtype in args.dtypes.split(","):
        model, tok = load(model=args.model, dtype=getattr(torch, dtype))
        with open(args.text or f"{austen_dir()}/{HELD_OUT}", encoding="utf-8") as f:
            ids = text_tokens(tok, f.read(), max(args.lengths))
        while len(ids) < max(args.lengths):  # a text shorter than the longest length: repeat it
            ids = ids + ids
        for n in args.lengths:
            x = torch.tensor([ids[:n]])
            speed, rss = {}, {}
            for method in ("dense", "ms"):
                if method == "dense" and n > args.dense_max:
                    continue
                if method == "ms":
                    msattn.hf.patch(model, cfg)
                with torch.no_grad():
                    prefill(model, x[:, :args.chunk_size], chunk_size=args.chunk_size)  # warm-up
                    reset_peak_rss(torch.device("cpu"))
                    start = time.perf_counter()
                    prefill(model, x, chunk_size=args.chunk_size)
                    speed[method] = n / (time.perf_counter() - start)
                    rss[method] = peak_rss_mb()
                    if method == "ms" and args.profile:
                        with torch.profiler.profile() as prof:
                            prefill(model, x, chunk_size=args.chunk_size)
                        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
                        total = sum(self_us.values())
                        parts = [sum(self_us.get(k, 0) for k in keys) for keys in GROUPS.values()]
                        profiles.append([dtype, format_length(n), *(f"{p / total:.0%}" for p in parts),
                                         f"{1 - sum(parts) / total:.0%}", f"{total / 1e6:.1f}"])
                if method == "ms":
                    msattn.hf.unpatch(model)
                print(f"{dtype} {format_length(n)} {method}: {speed[method]:.0f} tok/s, peak RSS {rss[method]:.0f} MiB",
                      flush=True)
            ratio = f"{speed['ms'] / speed['dense']:.2f}" if "dense" in speed else "-"
            rows.append([dtype, format_length(n), f"{speed['dense']:.0f}" if "dense" in speed else "-",
                         f"{speed['ms']:.0f}", ratio, f"{rss['dense']:.0f}" if "dense" in rss else "-",
                         f"{rss['ms']:.0f}"])
    print(markdown_table(rows))
    if args.profile:
        print()
        print("MS prefill, share of the profiled self time:")
        print(markdown_table(profiles))


if __name__ == "__main__":
    main()
