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
``--kv-dir DIR``: MS also prefills with its cache's keys and values in files in DIR mapped into memory
(``MSCache(kv_dir=...)``), the column "MS, KV in files"; beyond ``--memory-max`` only that way (SmolLM2's
KV cache at 1M tokens, 22.5 GiB in bfloat16, does not fit this machine's memory).

    python benchmarks/bench_real_model.py --lengths 128k,1m --dtypes bfloat16 --dense-max 32k \
        --kv-dir /var/tmp --memory-max 256k
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import msattn
import msattn.hf
from msattn.eval.__main__ import parse_lengths
from msattn.eval.passkey import HELD_OUT, austen_dir
from msattn.eval.loading import load, peak_rss_mb, reset_peak_rss
from msattn.eval.perplexity import text_tokens
from msattn.eval.report import format_length, markdown_table
from msattn.hf.cache import new_cache, prefill

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
    ap.add_argument("--kv-dir", help="also prefill MS with the KV cache in files in this directory")
    ap.add_argument("--memory-max", type=lambda s: parse_lengths(s)[0], default=2 ** 40,
                    help="with --kv-dir: beyond this length MS runs only with the KV cache in files")
    for name, default in (("block-q", 16), ("block-k", 16), ("merge", 16), ("topk", 64), ("local", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--rope", default="selected")
    args = ap.parse_args(argv)
    cfg = msattn.MSConfig(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk,
                          local=args.local, rope=args.rope)
    if args.kv_dir is not None and not os.path.isdir(args.kv_dir):
        ap.error(f"--kv-dir must be an existing directory, got {args.kv_dir!r}")
    print(f"{args.model}, {cfg}, chunk {args.chunk_size}, {torch.get_num_threads()} threads")
    methods = ["dense", "ms"] + (["ms-files"] if args.kv_dir else [])
    rows = [["dtype", "length", "dense tok/s", "MS tok/s", "MS / dense", "peak RSS dense (MiB)", "peak RSS MS (MiB)"]]
    if args.kv_dir:
        rows[0] += ["MS, KV in files: tok/s", "peak RSS (MiB)", "page cache at the end (MiB)"]
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
            for method in methods:
                if (method == "dense" and n > args.dense_max) or (method == "ms" and n > args.memory_max):
                    continue
                if method != "dense":
                    msattn.hf.patch(model, cfg)
                kv_dir = args.kv_dir if method == "ms-files" else None
                with torch.no_grad():
                    prefill(model, x[:, :args.chunk_size], chunk_size=args.chunk_size)  # warm-up
                    reset_peak_rss(torch.device("cpu"))
                    start = time.perf_counter()
                    cache, _ = prefill(model, x, chunk_size=args.chunk_size, cache=new_cache(model, n, kv_dir=kv_dir))
                    speed[method] = n / (time.perf_counter() - start)
                    rss[method] = peak_rss_mb()
                    if kv_dir is not None:
                        page_cache = page_cache_mb()  # while the cache's files exist
                    del cache
                    if method == "ms" and args.profile:
                        with torch.profiler.profile() as prof:
                            prefill(model, x, chunk_size=args.chunk_size)
                        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
                        total = sum(self_us.values())
                        parts = [sum(self_us.get(k, 0) for k in keys) for keys in GROUPS.values()]
                        profiles.append([dtype, format_length(n), *(f"{p / total:.0%}" for p in parts),
                                         f"{1 - sum(parts) / total:.0%}", f"{total / 1e6:.1f}"])
                if method != "dense":
                    msattn.hf.unpatch(model)
                print(f"{dtype} {format_length(n)} {method}: {speed[method]:.0f} tok/s, peak RSS {rss[method]:.0f} MiB",
                      flush=True)

            def cell(table, method):
                return f"{table[method]:.0f}" if method in table else "-"

            ratio = f"{speed['ms'] / speed['dense']:.2f}" if "dense" in speed and "ms" in speed else "-"
            rows.append([dtype, format_length(n), cell(speed, "dense"), cell(speed, "ms"), ratio, cell(rss, "dense"),
                         cell(rss, "ms")])
            if args.kv_dir:
                rows[-1] += [cell(speed, "ms-files"), cell(rss, "ms-files"), f"{page_cache:.0f}"]
    print(markdown_table(rows))
    if args.profile:
        print()
        print("MS prefill, share of the profiled self time:")
        print(markdown_table(profiles))


def page_cache_mb() -> float:
    """The system's page cache (``Cached`` of /proc/meminfo) in MiB: where a mapped KV cache lives."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Cached:")) / 1024


if __name__ == "__main__":
    main()
