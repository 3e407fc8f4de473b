"""What does the demo's MS model select when it answers? A diagnostic of passkey failures.

    python benchmarks/demo_selection.py --model demo_out/ms --lengths 250,256,1k --trials 40

For each prompt (the prompts ``run_passkey`` builds with ``--seed``) and each ``i`` from 1 to the key's
digits minus one, the key's first ``i`` digits are appended, as exact decoding has them after ``i``
steps when it is right so far. At a prompt length that is a multiple of ``merge * block_q`` the
answer then opens a new MS group holding those ``i`` answer tokens only, and that group selects with
the mean of their queries alone. For every ``i``, layer and KV head it records

- whether the key regions ``msattn.ms_select`` chooses for the last group (from the un-rotated q and k
  the kernel selects with: the outputs of ``q_proj`` and ``k_proj``, ``rope="selected"`` models only)
  hold a whole occurrence of the key, or at least one of its digits;
- for ``i = 1``, where the key's next digit ranks among all prompt positions by the un-rotated
  per-token logit ``q . k`` (the quantity that the region means average), best of the KV head's query
  heads;

and whether the forward predicts digit ``i`` (prefix-forced accuracy), and whether exact decoding
(``greedy_generate(exact=True)``) answers the prompt. Prints, per length: the share of prompts whose
selection holds a whole key occurrence / a key digit and the median rank, per answer tokens fed, layer
and KV head; the prefix-forced accuracy per answer tokens fed; the exact-decoding accuracy.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import msattn
from msattn import demo_toy as demo
from msattn.eval.__main__ import parse_lengths
from msattn.eval.loading import load, prepare, settings_from_meta, read_checkpoint_meta
from msattn.eval.passkey import greedy_generate, passkey_prompt, retrieved, trial_plan
from msattn.eval.report import markdown_table
from msattn.hf import patched_config


def capture(model) -> dict:
    """Forward hooks that keep each layer's q_proj and k_proj outputs ``(B, N, H*D)`` after a forward."""
    caught = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(("q", i), out))
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(("k", i), out))
    return caught


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an MS model saved by the demo (e.g. demo_out/ms)")
    ap.add_argument("--lengths", type=parse_lengths, default=[250, 256, 1024])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1, help="prompt seed (the demo evaluates with its --seed + 1)")
    ap.add_argument("--coarse-regions", type=int, default=None, help="multi-scale selection (MSConfig.coarse_regions)")
    ap.add_argument("--coarse-topk", type=int, default=None, help="multi-scale selection (MSConfig.coarse_topk)")
    args = ap.parse_args(argv)
    model, tokenizer = load(model=args.model)
    prepare(model, "ms", settings_from_meta(read_checkpoint_meta(args.model), coarse_regions=args.coarse_regions,
                                            coarse_topk=args.coarse_topk))
    cfg = patched_config(model)
    if cfg.rope != "selected":
        raise SystemExit(f"demo_selection: --model must use rope='selected' (q_proj/k_proj outputs are then what "
                         f"the kernel selects with), got rope={cfg.rope!r}")
    conf = model.config
    hq, hkv = conf.num_attention_heads, conf.num_key_value_heads
    caught = capture(model)
    digits = demo.digit_ids(tokenizer)
    rows = [["length", "answer tokens fed", "layer", "KV head", "whole key selected", "a key digit selected",
             "next digit's rank"]]
    forced = [["length", "answer tokens fed", "next digit predicted"]]
    accuracy = [["length", "exact-decoding accuracy"]]
    for n in args.lengths:
        plan = trial_plan(n, args.trials, seed=args.seed)
        whole, anykey, ranks, hits = {}, {}, {}, {}
        right = 0
        for key, depth, _ in plan:
            ids, answer = passkey_prompt(tokenizer, n, key, depth)
            a = tokenizer.encode(answer, bos=False)
            out = greedy_generate(model, torch.tensor([ids]), len(a) + 1, exact=True)
            right += retrieved(answer, tokenizer.decode(out[0].tolist()))
            runs = demo.digit_runs(ids, digits.__contains__)
            # the key's second digit inside an occurrence: what the first fed digit's query should find
            succ = [p for run in runs for p in run if p > run.start and ids[p - 1] == a[0] and ids[p] == a[1]]
            for fed in range(1, len(a)):
                with torch.no_grad():
                    logits = model(torch.tensor([ids + a[:fed]])).logits
                hits.setdefault(fed, []).append(logits[0, -1].argmax().item() == a[fed])
                start = (n + fed - 1) // cfg.span * cfg.span  # the last group: its queries so far
                for layer in range(conf.num_hidden_layers):
                    q = caught[("q", layer)].view(1, n + fed, hq, -1).transpose(1, 2)
                    k = caught[("k", layer)].view(1, n + fed, hkv, -1).transpose(1, 2)
                    sel = msattn.ms_select(q[:, :, start:], k, block_q=cfg.block_q, block_k=cfg.block_k,
                                           merge=cfg.merge, topk=cfg.topk, local=cfg.local,
                                           coarse_regions=cfg.coarse_regions, coarse_topk=cfg.coarse_topk)[0, :, -1]
                    for h in range(hkv):
                        tokens = {t for j in sel[h].tolist() if j >= 0
                                  for t in range(j * cfg.block_k, (j + 1) * cfg.block_k)}
                        cell = (fed, layer, h)
                        whole.setdefault(cell, []).append(any(set(run) <= tokens for run in runs))
                        anykey.setdefault(cell, []).append(any(t in tokens for run in runs for t in run))
                        if fed == 1:
                            best = n
                            for qh in range(h * hq // hkv, (h + 1) * hq // hkv):
                                order = (k[0, h, :n] @ q[0, qh, n]).argsort(descending=True).tolist()
                                best = min([best] + [order.index(p) for p in succ])
                            ranks.setdefault(cell, []).append(best)
        accuracy.append([str(n), f"{right / args.trials:.2f}"])
        for fed in sorted(hits):
            forced.append([str(n), str(fed), f"{sum(hits[fed]) / args.trials:.2f}"])
        for cell in sorted(whole):
            fed, layer, h = cell
            rank = f"{statistics.median(ranks[cell]):g}" if cell in ranks else ""
            rows.append([str(n), str(fed), str(layer), str(h), f"{sum(whole[cell]) / args.trials:.2f}",
                         f"{sum(anykey[cell]) / args.trials:.2f}", rank])
    print(f"{args.model}: the last group after the key's first digits, {args.trials} prompts per length")
    print(markdown_table(rows))
    print(markdown_table(forced))
    print(markdown_table(accuracy))
    return rows, forced, accuracy


if __name__ == "__main__":
    main()
