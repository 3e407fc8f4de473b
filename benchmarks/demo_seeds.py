"""How reliably does the demo's training recipe teach the MS model the passkey? One model per seed.

    python benchmarks/demo_seeds.py --seeds 0,1,2,3 [demo training flags, e.g. --steps 1000]

Trains the demo's MS model (``msattn.demo_toy.train_model``: the same data stream and initialisation as
``python -m msattn.demo_toy --seed S``) once per seed: the first stages one after the other, then the
seeds' own stages two at a time (one core each), and measures
passkey accuracy exactly as the demo does (``run_passkey`` with exact decoding, 5-digit keys, the
prompts of ``--seed S``). Prints a Markdown table: one row per seed, and the mean.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing

from msattn import demo_toy as demo
from msattn.eval.__main__ import parse_lengths
from msattn.eval.passkey import run_passkey
from msattn.eval.report import format_length, markdown_table


def one_seed(seed: int, flags: list[str], lengths: list[int], trials: int, first_stage: bytes) -> dict:
    args = demo.parse_args([*flags, "--seed", str(seed)])
    model, tokenizer, _, timings = demo.train_model("ms", args, position=seed % 2, first_stage=first_stage)
    records = run_passkey(model, tokenizer, lengths, trials, method="ms", seed=args.seed + 1, digits=demo.DIGITS,
                          exact=True, progress=False)
    return {"seed": seed, **timings, "accuracy": {r["length"]: r["accuracy"] for r in records}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--lengths", type=parse_lengths, default=[256, 1024, 4096], help="e.g. 256,1k,4k")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once, one core each")
    args, flags = ap.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    demo.parse_args(flags)  # refuse unknown flags before training anything
    # the first stages one after the other (each on demo.FIRST_STAGE_THREADS threads: side by side they
    # would oversubscribe the cores), then the seeds' own stages side by side, one core each
    firsts = [demo.train_first_stage(demo.parse_args([*flags, "--seed", str(s)])) for s in seeds]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        n = len(seeds)
        results = list(pool.map(one_seed, seeds, [flags] * n, [args.lengths] * n, [args.trials] * n, firsts))
    print(f"recipe: {' '.join(flags) or '(demo defaults)'}; MS passkey accuracy, {args.trials} trials per length")
    rows = [["seed"] + [format_length(n) for n in args.lengths] + ["copy nll", "train s (first stage + own)"]]
    rows += [[str(r["seed"])] + [f"{r['accuracy'][n]:.2f}" for n in args.lengths]
             + [f"{r['final_copy_nll']:.3f}", f"{r['first_stage_seconds']:.0f} + {r['train_seconds']:.0f}"]
             for r in results]
    mean = [sum(r["accuracy"][n] for r in results) / len(results) for n in args.lengths]
    rows.append(["mean"] + [f"{m:.2f}" for m in mean] + ["", ""])
    print(markdown_table(rows))
    return results


if __name__ == "__main__":
    main()
