"""Why does MS attention miss a pass key? Does the selection hold the key, or is it held and the copy wrong?

    python benchmarks/passkey_selection.py --model smollm2-135m --dtype bfloat16 --length 16k --trials 6 \\
        --block-q 16 --block-k 16 --merge 64 --topk 448 --local 0 --rope selected

For each prompt of ``run_passkey`` (the same seed, key, depth and real-text filler; ``--filler`` as in
``python -m msattn.eval``), the MS model (RoPE on selected tokens) answers the prompt as ``--decode
exact`` does (``greedy_generate``: each new token's group is run again with the tokens so far), and
:class:`Probe` reads inside its attention function what each layer did. For every layer and KV head the
key regions the model selected for each group that predicted a token of the answer (its own
``ms_select`` call on the cache's region sums) are compared with the regions holding the key (both
occurrences). It prints, per prompt, the answer, whether it is right, in
how many of the layer x KV-head selections of the prompt's last group (the one predicting the answer's
first token, a space) a whole occurrence of the key is held, and per answer token (the space, then one
token per digit) in how many selections of the group that predicted it the region holding that token
of the key is held, by layer and KV head (a copy reads the key through a few heads: held elsewhere is
not enough). And where the attention of the query that predicted each digit went, measured by running the
kernel again on indicator values: the largest softmax mass any layer and head
puts on that token of the key, that head's mass on the whole key and on the answer so far, and per
layer the best head's mass on the token (a copy head of a working copy puts nearly all of it there).
Per layer, for the prompt's last group: the share of prompts and heads holding the key and the
median rank of the best key region among all candidates for the last query region (the rank the key
would need to be within ``topk``; 0 when the key lies in the group itself, which always attends to
it), by MS attention's score (the region's mean key), by Quest's upper bound of ``q . k`` over the
region (per-channel min and max keys; msattn does not implement it) and by the mean over the slow
rotary channels only (``MSConfig(score_channels="slow")``).

Memory: the model's own KV cache (in files with ``--kv-dir``, as ``python -m msattn.eval --kv-dir``),
so it runs at every length the eval runs at, 1M included; Quest's bound reads each layer's keys once.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from transformers.modeling_utils import AttentionInterface

import msattn
import msattn.hf.ms
from msattn.eval.__main__ import _one_length
from msattn.eval.loading import Settings, load, prepare
from msattn.eval.passkey import greedy_generate, make_filler, passkey_prompt, retrieved, trial_plan
from msattn.eval.report import markdown_table
from msattn.hf import decoder
from msattn.rope import compact_rope_tables, slow_rotary_channels


class Probe:
    """What each layer's attention did on the steps that predict the answer, read inside the model's own
    ``"msattn"`` attention function while installed. Step ``s`` is the forward whose keys end at ``n + s``
    (it predicts the answer's token ``s``; step 0 is the prefill's last chunk); ``steps(s)`` is False to
    skip step ``s``, None to read its selection only, or its marks (lists of positions).

    - ``index[(step, layer)]``: ``(Hkv, topk)``, the key regions the step's last group attends to besides
      its own, as the model selected them (``msattn.hf.ms.ms_select`` is wrapped: the selection from the
      cache's region sums that the kernel then attends with).
    - ``scores[layer]`` (step 0): ``(3, Hkv, nk)``, every candidate region before the last group scored for
      its last query region (``qbar``, summed over each KV head's query heads) by the region's mean key
      (from the cache's sums), by Quest's upper bound of ``q . k`` over the region (arXiv 2406.10774:
      ``sum_d max(q_d min_d, q_d max_d)`` with per-channel min and max keys; one pass over the keys) and by
      the mean over the ``slow`` channels only.
    - ``mass[(step, layer)]`` (steps >= 1 with marks): ``(Hq, len(marks))``, the softmax mass of the last
      query on each set of positions: the kernel runs again with indicator values (channel ``c`` of ``v``
      is 1 at the positions of ``marks[c]``), with the model's own selection, compact positions and scale.

    Memory: nothing but the model's cache (in files with ``--kv-dir``), one value-sized tensor at a time
    for the marks, and the scores.
    """

    def __init__(self, n: int, start: int, steps, *, slow: torch.Tensor, block_q: int, block_k: int):
        self.n, self.start, self.steps, self.slow, self.block_q, self.block_k = n, start, steps, slow, block_q, block_k
        self.index, self.scores, self.mass = {}, {}, {}
        self.selected = None
        self.original, self.original_select = msattn.hf.ms.attention_forward, msattn.hf.ms.ms_select
        msattn.hf.ms.ms_select = self._select
        AttentionInterface.register("msattn", self)

    def remove(self):
        AttentionInterface.register("msattn", self.original)
        msattn.hf.ms.ms_select = self.original_select

    def _select(self, *args, **kwargs):
        self.selected = self.original_select(*args, **kwargs)
        return self.selected

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        self.selected = None
        out = self.original(module, query, key, value, attention_mask, *args, **kwargs)
        step, layer = key.shape[2] - self.n, module.layer_idx
        marks = self.steps(step) if step >= 0 else False
        if marks is False:
            return out
        if self.selected is None:
            raise RuntimeError("the probe reads the selection the model made from an MSCache's region sums: "
                               "run the model with one (greedy_generate does)")
        self.index[(step, layer)] = self.selected[0, :, -1].clone()
        if step == 0:
            self.scores[layer] = self._scores(query, key)
        elif marks:
            v = torch.zeros_like(value)  # (B, Hkv, N, D)
            for c, positions in enumerate(marks):
                v[:, :, positions, c] = 1
            probe = self.original(module, query, key, v, attention_mask, *args, **kwargs)[0]  # (B, Nq, Hq, D)
            self.mass[(step, layer)] = probe[0, -1, :, :len(marks)].float()
        return out

    def _scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``(3, Hkv, nk)``: the candidates before the last group, scored for its last query region."""
        sums, counts = key._msattn_layer().region_sums(None)
        (hq, nq, d), hkv = query.shape[1:], key.shape[1]
        nk, bk = self.start // self.block_k, self.block_k
        last = (self.n - 1) // self.block_q * self.block_q - (self.n - nq)  # the last query region in the chunk
        assert last >= 0, "the prefill's last chunk holds the last query region"
        qbar = query[0, :, last:].float().mean(1).view(hkv, hq // hkv, d).sum(1)  # (Hkv, D)
        kbar = sums[0, :, :nk] / counts[0, :, :nk, None]  # (Hkv, nk, D)
        blocks = key[0, :, :nk * bk].float().reshape(hkv, nk, bk, d)
        lo, hi = blocks.amin(2), blocks.amax(2)
        bound = torch.maximum(qbar[:, None] * lo, qbar[:, None] * hi).sum(-1)
        return torch.stack([(kbar @ qbar[..., None])[..., 0], bound, ((kbar * self.slow) @ qbar[..., None])[..., 0]])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--length", type=_one_length, default=16384)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--filler", default="austen")
    ap.add_argument("--kv-dir", default=None,
                    help="keep the model's KV cache in files in this folder (as python -m msattn.eval --kv-dir)")
    ap.add_argument("--only", type=lambda x: {int(t) for t in x.split(",")}, default=None,
                    help="diagnose only these trials of the plan (e.g. the 'missed' trials of an eval record)")
    for name, default in (("block-q", 16), ("block-k", 16), ("merge", 64), ("topk", 448), ("local", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--rope", default="selected", choices=["selected"])
    ap.add_argument("--score-channels", default="all", choices=["all", "slow"],
                    help="what the model selects with (the table ranks by every scoring either way)")
    args = ap.parse_args(argv)
    cfg = msattn.MSConfig(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk,
                          local=args.local, rope=args.rope, score_channels=args.score_channels)
    model, tok = load(model=args.model, dtype=getattr(torch, args.dtype))
    filler = make_filler(args.filler, tok)
    model = prepare(model, "ms", Settings(ms=cfg))
    conf = model.config
    hq, hkv, layers = conf.num_attention_heads, conf.num_key_value_heads, conf.num_hidden_layers
    n = args.length
    start = (n - 1) // cfg.span * cfg.span  # the last group's first position
    held = {layer: [] for layer in range(layers)}
    ranks = {layer: [] for layer in range(layers)}
    bound_ranks = {layer: [] for layer in range(layers)}
    slow_ranks = {layer: [] for layer in range(layers)}
    # the rotary pairs that turn less than once within the model's window (the model's own rotary, CRD NTK's
    # inference base included): the channels MSConfig(score_channels="slow") scores with
    d = conf.hidden_size // hq
    slow = slow_rotary_channels(compact_rope_tables(decoder(model).rotary_emb.inner, 2), d,
                                conf.max_position_embeddings)
    prompts = [["key", "depth", "answer", "right", "layer x head selections holding the key",
                "per answer token: expected, generated, selections holding its region"]]
    steps_table = [["key", "token", "expected", "generated", "held",
                    f"KV heads holding it, per layer (0-{layers - 1}): bit h of a hex digit for KV head h",
                    "most attention on it: mass, where (and that head's mass on the whole key, on the answer so far)",
                    "the best head's mass on it per layer, in tenths"]]
    for trial, (key, depth, offset) in enumerate(trial_plan(n, args.trials, seed=args.seed)):
        if args.only and trial not in args.only:
            continue
        ids, answer = passkey_prompt(tok, n, key, depth, filler=filler, offset=offset)
        a = tok.encode(answer, bos=False)  # the answer's tokens: a space, then one token per digit
        # every occurrence of the answer's token run in the prompt; token s of the answer sits at run[s]
        runs = [range(p, p + len(a)) for p in range(len(ids) - len(a)) if ids[p:p + len(a)] == a]
        key_positions = [p for run in runs for p in run]
        # the step predicting answer token s: its mass on that token of the key (either occurrence), on
        # the whole key (both occurrences) and on the answer written so far (positions n on)
        probe = Probe(n, start, lambda s: ([[run[s] for run in runs], key_positions, list(range(n, n + s))]
                                           if s < len(a) else False),
                      slow=slow, block_q=cfg.block_q, block_k=cfg.block_k)
        try:
            out = greedy_generate(model, torch.tensor([ids]), len(a) + 2,
                                  chunk_size=cfg.span * max(1, 8192 // cfg.span), exact=True, kv_dir=args.kv_dir)
        finally:
            probe.remove()
        gen = out[0].tolist()
        text = tok.decode(gen)
        key_regions = [{t // cfg.block_k for t in run} for run in runs]
        count = 0
        token_held = [[0] * layers for _ in a]  # [answer token][layer]: bit h set if KV head h's selection holds it
        nk = start // cfg.block_k
        for layer in range(layers):
            for s in range(len(a)):
                end = n + s
                first = (end - 1) // cfg.span * cfg.span // cfg.block_k  # the group's own regions are always attended
                for h, sel in enumerate(probe.index[(s, layer)].tolist()):
                    chosen = set(sel) | set(range(first, (end - 1) // cfg.block_k + 1))
                    token_held[s][layer] |= any(run[s] // cfg.block_k in chosen for run in runs) << h
                    if s == 0:
                        ok = any(r <= chosen for r in key_regions)
                        held[layer].append(ok)
                        count += ok
            # the rank of the best key region for the last query region (0: the key lies in the group)
            for table, score in zip((ranks, bound_ranks, slow_ranks), probe.scores[layer]):
                for h in range(hkv):
                    order = score[h].argsort(descending=True).tolist()
                    table[layer].append(min((order.index(j) for r in key_regions for j in r if j < nk), default=0))
        per_token = []
        for s, want in enumerate(a):
            got = gen[s] if s < len(gen) else None
            total = sum(bin(m).count("1") for m in token_held[s])
            mark = "" if got == want else f"->{tok.decode([got])!r}"
            per_token.append(f"{tok.decode([want])!r}{mark}:{total}")
            best, per_layer = "-", "-"
            if all((s, layer) in probe.mass for layer in range(layers)):
                mass = torch.stack([probe.mass[(s, layer)] for layer in range(layers)])  # (layers, Hq, marks)
                on_token = mass[..., 0]
                i = int(on_token.argmax())
                lay, head = divmod(i, hq)
                best = (f"{on_token[lay, head]:.2f} (layer {lay} head {head}; key {mass[lay, head, 1]:.2f}, "
                        f"answer so far {mass[lay, head, 2]:.2f})")
                per_layer = "".join(str(min(9, int(10 * x))) for x in on_token.amax(1).tolist())
            heads = (" " if hkv > 4 else "").join(f"{m:x}" for m in token_held[s])
            steps_table.append([str(key), str(s), repr(tok.decode([want])), repr(tok.decode([got])),
                                f"{total}/{layers * hkv}", heads, best, per_layer])
            print(" | ".join(steps_table[-1]), file=sys.stderr, flush=True)
        prompts.append([str(key), f"{depth:.2f}", repr(text), str(retrieved(answer, text)), f"{count}/{layers * hkv}",
                        " ".join(per_token)])
        print(" | ".join(prompts[-1]), file=sys.stderr, flush=True)
    table = [["layer", "key held (share of prompts x heads)", "median rank of the best key region: by the mean",
              "by Quest's bound", "by the mean over the slow rotary channels"]]
    for layer in range(layers):
        table.append([str(layer), f"{sum(held[layer]) / len(held[layer]):.2f}", f"{statistics.median(ranks[layer]):g}",
                      f"{statistics.median(bound_ranks[layer]):g}",
                      f"{statistics.median(slow_ranks[layer]):g}"])
    table.append(["all", f"{sum(map(sum, held.values())) / sum(map(len, held.values())):.2f}",
                  f"{statistics.median(sum(ranks.values(), [])):g}",
                  f"{statistics.median(sum(bound_ranks.values(), [])):g}",
                  f"{statistics.median(sum(slow_ranks.values(), [])):g}"])
    print(f"{args.model}, {n} tokens, {cfg}, filler {args.filler}; slow rotary channels: {int(slow.sum())} of {d}")
    print(markdown_table(prompts, left=3))
    print()
    print(markdown_table(steps_table, left=7))
    print()
    print(markdown_table(table))


if __name__ == "__main__":
    main()
