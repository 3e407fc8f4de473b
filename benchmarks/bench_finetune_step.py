"""A fine-tune step of the demo's recipe on this CPU: logits at every position against logits only where a
label follows (``msattn.workflow.data.collate_labelled``, what ``msattn finetune`` uses), and where a step's
time goes.

    python benchmarks/bench_finetune_step.py --model smollm2-135m --seq-len 1024 --items 8 --profile

The model gets the attention method and reduced LoRA of the demo's fine-tune (``msattn.demo.FINETUNE``, read
through ``msattn finetune``'s own parser: MS attention 16/16, merge 16, topk 64, local 2, RoPE on the
selected tokens; LoRA r 8) in ``--dtype``, but not its CRD NTK rotary (RESULTS' timings were measured
without it); the items are the first ``--items`` of the demo's data (its ``passkey_share``: three in
four are pass-key prompts with labels on the key only, the others text with every label). Each item is one
optimizer step (forward, backward, AdamW at learning rate 0, so the weights stay put), once with each
collation in turn, after one warm-up step of each. It prints the median seconds a step per collation and
kind of item, the ratio, and with ``--profile`` one step of each kind and collation under torch.profiler,
its self time split into the matrix products, MS attention's forward, backward and selection, the
optimizer and the rest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import default_data_collator

import msattn.lora
from msattn import cli, demo
from msattn.eval.loading import load, prepare
from msattn.eval.report import markdown_table
from msattn.models.gguf import resolve
from msattn.workflow.data import collate_labelled, text_dataset

GROUPS = {"matrix products (aten::mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
          # the profiler files a custom op's forward under its autograd node
          "MS attention forward": ("GeneratedBackwardFor_msattn_ms_fwd_default", "msattn::ms_fwd"),
          "MS attention backward (msattn::ms_bwd)": ("msattn::ms_bwd",),
          "selection (msattn::ms_select)": ("msattn::ms_select",),
          # AdamW's own frame and the elementwise ops it runs (which the model's norms run too: an upper bound)
          "optimizer (AdamW; every mul_, div, sqrt)": ("Optimizer.step#AdamW.step", "aten::addcdiv_",
                                                      "aten::addcmul_", "aten::lerp_", "aten::sqrt", "aten::mul_",
                                                      "aten::div")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if args.items < 1:
        ap.error(f"--items must be >= 1, got {args.items}")
    _, attn, _, lora, recipe, _ = cli.parse("finetune", demo.FINETUNE[1:] + ["--model", args.model])
    torch.manual_seed(0)
    model, tok = load(model=resolve(args.model), dtype=getattr(torch, args.dtype))
    prepare(model, attn.method(None), attn.settings())
    model = msattn.lora.apply(model, r=lora.lora_r, alpha=lora.lora_alpha).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    data = text_dataset(tok, [], args.seq_len, 50 * args.seq_len, passkey_share=recipe.passkey_share, seed=0)
    # the Trainer's default (the items stacked: logits at every position) and msattn's
    collations = {"every position": default_data_collator, "where a label follows": collate_labelled}

    def step(batch):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

    def kind(item) -> str:
        return "pass key" if (item["labels"] == -100).any() else "text"

    items = [data[i] for i in range(args.items)]
    for collate in collations.values():
        step(collate(items[:1]))
    seconds = {(name, kind(item)): [] for name in collations for item in items}
    for item in items:
        for name, collate in collations.items():
            batch = collate([item])
            t0 = time.perf_counter()
            step(batch)
            seconds[(name, kind(item))].append(time.perf_counter() - t0)
    rows = [["items", "count", *(f"s / step, logits at {name}" for name in collations), "ratio"]]
    for k in sorted({kind(i) for i in items}):
        med = [statistics.median(seconds[(name, k)]) for name in collations]
        rows.append([k, str(len(seconds[(next(iter(collations)), k)])), *(f"{m:.2f}" for m in med),
                     f"{med[0] / med[1]:.2f}x"])
    print(f"{args.model}, {args.dtype}, {args.seq_len} tokens a step, {torch.get_num_threads()} threads")
    print(markdown_table(rows))
    if not args.profile:
        return
    table = [["item, logits at", *GROUPS, "other", "total s"]]
    for k in sorted({kind(i) for i in items}):
        item = next(i for i in items if kind(i) == k)
        for name, collate in collations.items():
            batch = collate([item])
            with torch.profiler.profile() as prof:
                step(batch)
            self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
            total = sum(self_us.values())
            split = [sum(self_us.get(op, 0) for op in ops) for ops in GROUPS.values()]
            table.append([f"{k}, {name}", *(f"{x / 1e6:.2f}" for x in split), f"{(total - sum(split)) / 1e6:.2f}",
                          f"{total / 1e6:.2f}"])
    print()
    print(markdown_table(table))


if __name__ == "__main__":
    main()
