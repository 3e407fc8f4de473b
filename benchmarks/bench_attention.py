"""MS attention against PyTorch SDPA (and flash-attn on CUDA when importable).

Validates first (msattn equals SDPA when topk covers every region, on a small case), then for each
sequence length and implementation, in a fresh subprocess so memory is measured cleanly:
forward ms and forward+backward ms (median of --repeats after --warmup), useful GFLOP/s of the forward,
speedup over SDPA measured in the same run, and peak memory of one forward+backward (CPU: the
process's peak RSS during the call above its RSS before it, reset through /proc/self/clear_refs;
CUDA: max_memory_allocated). Also prints the fp32 torch.matmul rate on 2048x2048 as the machine's
ceiling. One fixed-width row per (length, impl); --json writes them all.

Useful flops (DESIGN section 7): dense causal 2*B*Hq*N^2*D forward (4*... non-causal); MS: 4*D per
(query, key) pair it attends, counted exactly from the selection; backward 2.5x forward.

    python benchmarks/bench_attention.py --lengths 4096,32768 --json bench_out/attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch
from measure import DTYPES, add_attention_args, median_ms


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_attention_args(ap, lengths="4096,16384,32768", dtype="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--impls", default="sdpa,msattn", help="of sdpa, msattn, flash (CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-backward", action="store_true", help="time the forward only")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# one measurement (runs in a child process)

def ms_pairs(index, n, nq, block_q, block_k, merge, hg, causal):
    """(query, key) pairs MS attends for the selection `index` (B, Hkv, G, T), all query heads."""
    span = block_q * merge
    g0 = (n - nq) // span
    nsel = (index >= 0).sum(-1).to(torch.float64)  # (B, Hkv, G)
    # the selected tokens (full regions when causal; a partial last region only non-causal)
    last = math.ceil(n / block_k) - 1
    sel_tokens = nsel * block_k - (index == last).sum(-1).to(torch.float64) * (last * block_k + block_k - n)
    total = 0.0
    for gi in range(index.shape[2]):
        ga = g0 + gi
        qs, qe = max(ga * span, n - nq), min((ga + 1) * span, n)
        own_s, own_e = ga * span, min((ga + 1) * span, n)
        nq_g = qe - qs
        if causal:  # query at p sees own tokens own_s..p
            own = sum(p - own_s + 1 for p in range(qs, qe))
        else:
            own = nq_g * (own_e - own_s)
        total += float(sel_tokens[:, :, gi].sum()) * nq_g * hg + own * hg * index.shape[0] * index.shape[1]
    return total


def run_child(cfg):
    import msattn  # noqa: F401  (imported here so the parent stays light)

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    dtype = DTYPES[cfg["dtype"]]
    B, Hq, Hkv, N, D = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["n"], cfg["head_dim"]
    causal = cfg["causal"]
    torch.manual_seed(0)
    q = torch.randn(B, Hq, N, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, Hq, N, D, device=device, dtype=dtype)
    kw = dict(block_q=cfg["block_q"], block_k=cfg["block_k"], merge=cfg["merge"], topk=cfg["topk"], causal=causal)
    impl = cfg["impl"]
    if impl == "msattn":
        def fwd():
            return msattn.ms_attention(q, k, v, **kw)
        index = msattn.ms_select(q.detach(), k.detach(), **kw)
        pairs = ms_pairs(index, N, N, cfg["block_q"], cfg["block_k"], cfg["merge"], Hq // Hkv, causal)
        flops = 4.0 * D * pairs
    elif impl == "sdpa":
        def fwd():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        flops = (2.0 if causal else 4.0) * B * Hq * N * N * D
    elif impl == "flash":
        from flash_attn import flash_attn_func
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        q, k, v = qt, kt, vt
        dout = dout.transpose(1, 2).contiguous()

        def fwd():
            return flash_attn_func(q, k, v, causal=causal)
        flops = (2.0 if causal else 4.0) * B * Hq * N * N * D
    else:
        raise SystemExit(f"unknown impl {impl!r}")

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, (q, k, v), dout)

    # peak memory of one forward+backward, then timings
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (fwd_bwd if not cfg["no_backward"] else fwd)()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        from msattn.eval.loading import peak_rss_mb, reset_peak_rss, rss_mb

        ok = reset_peak_rss()
        base = rss_mb()
        with torch.no_grad() if cfg["no_backward"] else torch.enable_grad():
            (fwd_bwd if not cfg["no_backward"] else fwd)()
        peak_mb = peak_rss_mb() - base if ok else float("nan")
    with torch.no_grad():
        fwd_ms = median_ms(fwd, cfg["warmup"], cfg["repeats"], device)
    fb_ms = float("nan") if cfg["no_backward"] else median_ms(fwd_bwd, cfg["warmup"], cfg["repeats"], device)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "flops": flops, "peak_mb": peak_mb,
            "threads": torch.get_num_threads(), "isa": msattn.isa()}


# ---------------------------------------------------------------------------------------------
# the parent: validation, ceiling, table

def validate(args):
    """msattn with topk covering every region must equal SDPA; fails loudly otherwise."""
    import msattn

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    n = 4 * args.block_q * args.merge + 7
    q = torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype)
    k = torch.randn(1, args.kv_heads, n, args.head_dim, device=device, dtype=dtype)
    v = torch.randn(1, args.kv_heads, n, args.head_dim, device=device, dtype=dtype)
    causal = not args.non_causal
    out = msattn.ms_attention(q, k, v, block_q=args.block_q, block_k=args.block_k, merge=args.merge,
                              topk=math.ceil(n / args.block_k), causal=causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                           enable_gqa=True)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    print(f"validation: msattn (topk covering) vs SDPA at N={n}: max rel err {err:.2e} (tol {tol:.0e})")
    if not err <= tol:
        raise SystemExit("validation failed: msattn does not equal SDPA on the dense case")


def matmul_gflops(device, threads):
    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    ms = median_ms(lambda: a @ b, 3, 10, device)
    return 2 * 2048**3 / (ms * 1e-3) / 1e9


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))))
        return
    validate(args)
    device = torch.device(args.device)
    ceiling = matmul_gflops(device, args.threads)
    print(f"ceiling: torch.matmul fp32 2048x2048 at {ceiling:.0f} GFLOP/s "
          f"({torch.get_num_threads() if not args.threads else args.threads} threads, {device})")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    if "flash" in impls and device.type != "cuda":
        impls.remove("flash")
    causal = not args.non_causal
    cfg_name = (f"B{args.batch} Hq{args.heads} Hkv{args.kv_heads} D{args.head_dim} {args.dtype} "
                f"{'causal' if causal else 'full'} bq{args.block_q} bk{args.block_k} m{args.merge} k{args.topk}")
    print(cfg_name)
    header = (f"{'N':>7} | {'impl':<7} | {'fwd ms':>9} | {'fwd+bwd ms':>10} | {'GFLOP/s':>7} | {'%mm':>4} | "
              f"{'x fwd':>6} | {'x f+b':>6} | {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        base = None
        for impl in impls:
            cfg = dict(impl=impl, n=n, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                       head_dim=args.head_dim, dtype=args.dtype, block_q=args.block_q, block_k=args.block_k,
                       merge=args.merge, topk=args.topk, causal=causal, device=args.device, threads=args.threads,
                       warmup=args.warmup, repeats=args.repeats, no_backward=args.no_backward)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{n:>7} | {impl:<7} | failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(line[0][7:])
            gflops = res["flops"] / (res["fwd_ms"] * 1e-3) / 1e9
            if impl == "sdpa":
                base = res
            x_fwd = base["fwd_ms"] / res["fwd_ms"] if base else float("nan")
            x_fb = base["fwd_bwd_ms"] / res["fwd_bwd_ms"] if base else float("nan")
            print(f"{n:>7} | {impl:<7} | {res['fwd_ms']:>9.1f} | {res['fwd_bwd_ms']:>10.1f} | {gflops:>7.1f} | "
                  f"{100 * gflops / ceiling:>3.0f}% | {x_fwd:>6.2f} | {x_fb:>6.2f} | {res['peak_mb']:>8.1f}")
            rows.append({**cfg, **res, "fwd_gflops": gflops, "matmul_gflops": ceiling,
                         "speedup_fwd": x_fwd, "speedup_fwd_bwd": x_fb})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": cfg_name, "matmul_gflops": ceiling, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
