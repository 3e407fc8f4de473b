"""How reliably does the demo's training recipe teach the MS model the passkey? One model per seed.

    python benchmarks/demo_seeds.py --seeds 0,1,2,3 [demo training flags, e.g. --steps 1000]

Trains the demo's MS model (``msattn.demo.train``: the same data stream and initialisation as
``python -m msattn.demo --seed S``) once per seed, two seeds at a time (one core each), and measures
passkey accuracy exactly as the demo does (``run_passkey`` with exact decoding, 5-digit keys, the
prompts of ``--seed S``). Prints a Markdown table: one row per seed, and the mean.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import time

import torch

from msattn import demo
from msattn.eval.loading import prepare
from msattn.eval.passkey import PasskeyTokenizer, run_passkey


def one_seed(seed: int, flags: list[str], lengths: list[int], trials: int) -> dict:
    torch.set_num_threads(1)
    args = demo.parse_args([*flags, "--seed", str(seed)])
    tokenizer = PasskeyTokenizer()
    torch.manual_seed(args.seed)
    model = demo.build_model(tokenizer, args)
    prepare(model, "ms", demo.method_settings(args))
    t0 = time.perf_counter()
    losses = demo.train(model, tokenizer, args, f"seed {seed}", position=seed % 2)
    seconds = time.perf_counter() - t0
    records = run_passkey(model, tokenizer, lengths, trials, method="ms", seed=args.seed + 1, digits=demo.DIGITS,
                          exact=True, progress=False)
    acc = {r["length"]: r["accuracy"] for r in records}
    last = losses[-20:]
    return {"seed": seed, "train_seconds": seconds, "final_copy_nll": sum(last) / len(last), "accuracy": acc}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once, one core each")
    args, flags = ap.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    demo.parse_args(flags)  # refuse unknown flags before training anything
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        n = len(seeds)
        results = list(pool.map(one_seed, seeds, [flags] * n, [lengths] * n, [args.trials] * n))
    print(f"recipe: {' '.join(flags) or '(demo defaults)'}; MS passkey accuracy, {args.trials} trials per length")
    print("| seed | " + " | ".join(str(n) for n in lengths) + " | copy nll | train s |")
    print("|---:|" + "---:|" * len(lengths) + "---:|---:|")
    for r in results:
        print(f"| {r['seed']} | " + " | ".join(f"{r['accuracy'][n]:.2f}" for n in lengths)
              + f" | {r['final_copy_nll']:.3f} | {r['train_seconds']:.0f} |")
    mean = {n: sum(r["accuracy"][n] for r in results) / len(results) for n in lengths}
    print("| mean | " + " | ".join(f"{mean[n]:.2f}" for n in lengths) + " | | |")
    return results


if __name__ == "__main__":
    main()
