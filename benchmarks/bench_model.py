"""A whole model under MS attention against the same model with PyTorch SDPA: forward+backward.

The model is stories260K (the llama2.c checkpoint in ../shared/data, converted to a HF Llama) when it
is there, else (or with --tiny) a random Llama with head dim 64 built here. Validates first (the model
patched with an MS config covering every region gives SDPA's logits on a small input), then for each
sequence length and implementation, in a fresh subprocess so memory is measured cleanly: the time of
one forward+backward of the language-modelling loss (all parameters trainable; median of --repeats
after --warmup), tokens per second, the speedup over SDPA in the same run, and the peak memory of one
forward+backward (CPU: the process's peak RSS during the call above its RSS before it, reset through
/proc/self/clear_refs; CUDA: max_memory_allocated). A configuration whose first call shows that warm-up
and repeats would take more than --budget seconds reports that first call alone (runs = 1). One
fixed-width row per (length, impl); --json writes them all.

    python benchmarks/bench_model.py --lengths 8192,32768 --json bench_out/model.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import sync

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260K" / "stories260K.bin"
TINY_LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,32768", help="comma-separated sequence lengths")
    ap.add_argument("--llama2c", default=str(STORIES), help="llama2.c checkpoint (default: stories260K)")
    ap.add_argument("--tiny", action="store_true", help="a random Llama with head dim 64 instead")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--block-q", type=int, default=16)
    ap.add_argument("--block-k", type=int, default=16)
    ap.add_argument("--merge", type=int, default=16)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--rope", choices=("inputs", "selected"), default="inputs")
    ap.add_argument("--impls", default="sdpa,msattn", help="of sdpa, msattn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=600.0,
                    help="seconds a configuration may spend on warm-up and repeats after its first call")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# the model

def build_model(cfg):
    """(model, name): stories260K from cfg["llama2c"] when it exists and cfg["tiny"] is off, else the
    random Llama; in cfg["dtype"] on cfg["device"], sdpa attention, every parameter trainable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype, device = DTYPES[cfg["dtype"]], torch.device(cfg["device"])
    if not cfg["tiny"] and cfg["llama2c"] and os.path.isfile(cfg["llama2c"]):
        from msattn.models import load_llama2c

        model, _ = load_llama2c(cfg["llama2c"], dtype=dtype)
        name = Path(cfg["llama2c"]).stem
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **TINY_LLAMA)).to(dtype)
        name = "tiny-llama"
    c = model.config
    name += (f" (L{c.num_hidden_layers} C{c.hidden_size} Hq{c.num_attention_heads} Hkv{c.num_key_value_heads} "
             f"D{c.hidden_size // c.num_attention_heads})")
    return model.to(device).train(), name


def ms_config(cfg, topk=None):
    import msattn

    return msattn.MSConfig(block_q=cfg["block_q"], block_k=cfg["block_k"], merge=cfg["merge"],
                           topk=topk or cfg["topk"], rope=cfg["rope"])


# ---------------------------------------------------------------------------------------------
# one measurement (runs in a child process)

def run_child(cfg):
    import msattn
    import msattn.hf

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    model, _ = build_model(cfg)
    if cfg["impl"] == "msattn":
        msattn.hf.patch(model, ms_config(cfg))
    elif cfg["impl"] != "sdpa":
        raise SystemExit(f"unknown impl {cfg['impl']!r}")
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (cfg["batch"], cfg["n"]), device=device)  # (B, N)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    # the first call measures peak memory; its time decides whether warm-up and repeats fit the budget
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fwd_bwd()
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        from msattn.eval.loading import peak_rss_mb, reset_peak_rss, rss_mb

        ok = reset_peak_rss()
        base = rss_mb()
        t0 = time.perf_counter()
        fwd_bwd()
        first_ms = (time.perf_counter() - t0) * 1e3
        peak_mb = peak_rss_mb() - base if ok else float("nan")
    if first_ms * 1e-3 * (cfg["warmup"] + cfg["repeats"]) > cfg["budget"]:
        ms, runs = first_ms, 1
    else:
        for _ in range(cfg["warmup"]):
            fwd_bwd()
        sync(device)
        times = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            fwd_bwd()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        ms, runs = statistics.median(times), cfg["repeats"]
    return {"fwd_bwd_ms": ms, "first_ms": first_ms, "runs": runs, "peak_mb": peak_mb,
            "threads": torch.get_num_threads(), "isa": msattn.isa()}


# ---------------------------------------------------------------------------------------------
# the parent: validation, table

def validate(cfg):
    """The model patched with a covering MS config must give SDPA's logits; fails loudly otherwise."""
    import msattn.hf

    model, name = build_model(cfg)
    n = 4 * cfg["block_q"] * cfg["merge"] + 7
    ids = torch.randint(3, model.config.vocab_size, (1, n), device=cfg["device"])
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
        msattn.hf.patch(model, ms_config(cfg, topk=math.ceil(n / cfg["block_k"])))
        got = model(input_ids=ids).logits.double()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    tol = 1e-5 if cfg["dtype"] == "float32" else 2e-2
    print(f"validation: {name} patched (topk covering) vs SDPA at N={n}: max rel err of logits {err:.2e} "
          f"(tol {tol:.0e})")
    if not err <= tol:
        raise SystemExit("validation failed: the patched model does not equal SDPA on the dense case")
    return name


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))))
        return
    common = dict(llama2c=args.llama2c, tiny=args.tiny, batch=args.batch, dtype=args.dtype, block_q=args.block_q,
                  block_k=args.block_k, merge=args.merge, topk=args.topk, rope=args.rope, device=args.device,
                  threads=args.threads, warmup=args.warmup, repeats=args.repeats, budget=args.budget)
    name = validate(common)
    cfg_name = (f"{name} B{args.batch} {args.dtype} fwd+bwd | msattn bq{args.block_q} bk{args.block_k} "
                f"m{args.merge} k{args.topk} rope={args.rope}")
    print(cfg_name)
    header = (f"{'N':>7} | {'impl':<7} | {'runs':>4} | {'fwd+bwd ms':>11} | {'tok/s':>8} | {'x f+b':>6} | "
              f"{'peak MB':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        base = None
        for impl in [s.strip() for s in args.impls.split(",") if s.strip()]:
            cfg = dict(common, impl=impl, n=n)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{n:>7} | {impl:<7} | failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(line[0][7:])
            if impl == "sdpa":
                base = res
            speedup = base["fwd_bwd_ms"] / res["fwd_bwd_ms"] if base else float("nan")
            tok_s = args.batch * n / (res["fwd_bwd_ms"] * 1e-3)
            print(f"{n:>7} | {impl:<7} | {res['runs']:>4} | {res['fwd_bwd_ms']:>11.1f} | {tok_s:>8.0f} | "
                  f"{speedup:>6.2f} | {res['peak_mb']:>8.1f}", flush=True)
            rows.append({**cfg, **res, "tokens_per_s": tok_s, "speedup_fwd_bwd": speedup})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": cfg_name, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
