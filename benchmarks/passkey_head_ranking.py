"""Would the answer's digits be copied if each query head ranked the key regions for itself?

    python benchmarks/passkey_head_ranking.py --model runs/finetune_smollm2 --dtype float32 --length 256k \\
        --trials 5 --seed 1 --only 0,1,2 --block-q 16 --block-k 16 --merge 16 --topk 64 --local 2 \\
        --score-channels slow --kv-dir /work/kv --ranking each

``msattn.ms_select`` gives one selection per KV head, ranked by the sum over its query heads of
``qbar . kbar``: with GQA one query head's wish can be outvoted by the others'. On SmolLM2-135M the
digits of a pass key are copied by two query heads of one KV head (benchmarks/RESULTS.md, "The 256K
misses, diagnosed"), whose selection at 256K leaves the key out for some digits. This script answers the
prompts of ``run_passkey`` (same seed, keys, depths, filler) as ``--decode exact`` does, with the
selection of each **answer group** (the decode steps' forwards, which re-run the group of the new token)
computed here in PyTorch by one of two rules:

- ``sum``: the library's rule (each query region ranks by the sum over the KV head's query heads; the
  lists are interleaved rank by rank, skipping duplicates, after the ``local`` regions); a check that
  this reimplementation gives the library's answers;
- ``each``: every (query region, query head) pair ranks by its own ``qbar . kbar`` and the lists are
  interleaved rank by rank in that order (region-major), skipping duplicates, after the ``local``
  regions: still ``topk`` regions per KV head, so the attention kernel and its cost are unchanged.

The prefill (every group of the prompt) keeps the library's selection: only the groups that write the
answer change, so the answers isolate the rule's effect on the copy.
"""

from __future__ import annotations

import argparse

import torch

import msattn
import msattn.hf.ms
from msattn.eval.__main__ import _one_length
from msattn.eval.loading import Settings, load, prepare
from msattn.eval.passkey import greedy_generate, make_filler, passkey_prompt, retrieved, trial_plan

LIBRARY_SELECT = msattn.hf.ms.ms_select
CALLS = {"rule": 0, "library": 0}  # how many selections each gave


def rank_regions(query, key_sums, key_counts, *, start: int, block_q: int, block_k: int, topk: int, local: int,
                 score_channels, each: bool) -> torch.Tensor:
    """The selection of the one group whose queries ``query`` ``(1, Hq, m, D)`` sit at ``start .. start+m``
    (``start`` a group boundary), from the cache's region sums ``(1, Hkv, R, D)`` and counts ``(1, Hkv, R)``:
    int32 ``(1, Hkv, 1, topk)``, ascending, -1 padded (candidates: the regions before ``start``)."""
    _, hq, m, d = query.shape
    hkv = key_sums.shape[1]
    cand = start // block_k
    counts = key_counts[0, :, :cand].float()  # (Hkv, cand)
    kbar = key_sums[0, :, :cand].float() / counts.clamp(min=1)[..., None]  # (Hkv, cand, D)
    q = query[0].float()
    if score_channels is not None:
        q = q * score_channels.float()
    regions = -(-m // block_q)
    qbar = torch.stack([q[:, a * block_q:(a + 1) * block_q].mean(1) for a in range(regions)], 1)  # (Hq, A, D)
    qbar = qbar.view(hkv, hq // hkv, regions, d)
    if not each:
        qbar = qbar.sum(1, keepdim=True)  # (Hkv, 1, A, D): one list per query region
    scores = torch.einsum("hgad,hjd->hagj", qbar, kbar)  # (Hkv, A, heads ranking, cand): region-major lists
    scores = scores.masked_fill(counts[:, None, None] == 0, float("-inf")).flatten(1, 2)  # (Hkv, lists, cand)
    order = torch.sort(-scores, dim=-1, stable=True).indices[..., :topk]  # descending, ties to the lower region
    out = torch.full((1, hkv, 1, topk), -1, dtype=torch.int32)
    for h in range(hkv):
        chosen = [j for j in range(cand - 1, -1, -1) if counts[h, j] > 0][:local]
        seen = set(chosen)
        for j in order[h].T.flatten().tolist():  # rank by rank, list by list
            if len(chosen) == topk:
                break
            if j not in seen and counts[h, j] > 0:
                seen.add(j)
                chosen.append(j)
        chosen.sort()
        out[0, h, 0, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def answer_group_select(each: bool):
    """A stand-in for ``msattn.hf.ms.ms_select``: the rule above for a call holding exactly one whole
    group's queries so far with more candidates than ``topk`` (an exact decode step); the library's
    selection for every other call."""

    def select(query, key, *, key_sums=None, key_counts=None, block_q, block_k, merge, topk, causal=True,
               local=0, coarse_regions=0, coarse_topk=0, key_padding_mask=None, score_channels=None, **kw):
        n, m, span = key.shape[2], query.shape[2], merge * block_q
        start = n - m
        if (key_sums is None or not causal or key_padding_mask is not None or coarse_regions or start % span
                or m > span or start // block_k <= topk):
            CALLS["library"] += 1
            return LIBRARY_SELECT(query, key, key_sums=key_sums, key_counts=key_counts, block_q=block_q,
                                  block_k=block_k, merge=merge, topk=topk, causal=causal, local=local,
                                  coarse_regions=coarse_regions, coarse_topk=coarse_topk,
                                  key_padding_mask=key_padding_mask, score_channels=score_channels, **kw)
        CALLS["rule"] += 1
        return rank_regions(query, key_sums, key_counts, start=start, block_q=block_q, block_k=block_k, topk=topk,
                            local=local, score_channels=score_channels, each=each)

    return select


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--length", type=_one_length, default=16384)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--filler", default="austen")
    ap.add_argument("--kv-dir", default=None, help="keep the KV cache in files in this folder")
    ap.add_argument("--only", type=lambda x: {int(t) for t in x.split(",")}, default=None,
                    help="only these trials of the plan")
    for name, default in (("block-q", 16), ("block-k", 16), ("merge", 16), ("topk", 64), ("local", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--score-channels", default="slow", choices=["all", "slow"])
    ap.add_argument("--ranking", choices=["sum", "each"], required=True)
    args = ap.parse_args(argv)
    cfg = msattn.MSConfig(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk,
                          local=args.local, rope="selected", score_channels=args.score_channels)
    model, tok = load(model=args.model, dtype=getattr(torch, args.dtype))
    filler = make_filler(args.filler, tok)
    model = prepare(model, "ms", Settings(ms=cfg))
    msattn.hf.ms.ms_select = answer_group_select(args.ranking == "each")
    right = total = 0
    print(f"{args.model}, {args.length} tokens, {cfg}, ranking {args.ranking}")
    print("| trial | key | depth | answer | right |\n|---:|---:|---:|---|---|")
    for trial, (key, depth, offset) in enumerate(trial_plan(args.length, args.trials, seed=args.seed)):
        if args.only and trial not in args.only:
            continue
        ids, answer = passkey_prompt(tok, args.length, key, depth, filler=filler, offset=offset)
        out = greedy_generate(model, torch.tensor([ids]), len(tok.encode(answer, bos=False)) + 2,
                              chunk_size=cfg.span * max(1, 8192 // cfg.span), exact=True, kv_dir=args.kv_dir)
        text = tok.decode(out[0].tolist())
        ok = retrieved(answer, text)
        right, total = right + ok, total + 1
        print(f"| {trial} | {key} | {depth:.2f} | {text!r} | {ok} |", flush=True)
    print(f"\n{right} of {total} right; selections by the {args.ranking} rule: {CALLS['rule']}, by the library: "
          f"{CALLS['library']}")


if __name__ == "__main__":
    main()
