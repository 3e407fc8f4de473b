"""Perplexity at long context of a model fine-tuned by ``examples/finetune.py``, beside its dense base.

Loads the run saved in ``--run`` (``finetune.load_finetuned``: the base model patched with the run's
MSConfig, its CRD NTK rotary embedding at the inference base, the LoRA adapter) and evaluates it
(method ``ms-finetuned``) and the unpatched base model on PyTorch SDPA (method ``dense``) on the same
windows of ``--text`` with ``msattn.eval.perplexity``; writes ``perplexity.md/.json/.png`` into
``--out`` and prints the table. ``--merge``/``--topk`` evaluate with other MS parameters than the run
was trained with (its block sizes and RoPE mode stay).

    python examples/eval_finetuned.py --run runs/stories --text ../shared/data/austen/persuasion.txt \\
        --lengths 512,2k,8k,32k --tokens 32k --merge 64 --out runs/stories/eval
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune  # noqa: E402  (examples/finetune.py, beside this file)

from msattn.eval.__main__ import positive_int, parse_lengths  # noqa: E402
from msattn.eval.perplexity import run_perplexity  # noqa: E402
from msattn.eval.report import format_report, write_report  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the --out directory of examples/finetune.py")
    ap.add_argument("--text", type=Path, required=True, help="UTF-8 evaluation text")
    ap.add_argument("--lengths", type=parse_lengths, required=True, help="comma-separated, e.g. 512,2k,8k,32k")
    ap.add_argument("--windows", type=int, default=1, help="windows per length (%(default)s)")
    ap.add_argument("--tokens", type=parse_lengths, default=None,
                    help="score the same first N tokens at every length (N // length windows each), e.g. 32k")
    ap.add_argument("--chunk-size", type=positive_int, default=16384, help="prefill chunk in tokens (%(default)s)")
    ap.add_argument("--merge", type=positive_int, help="evaluate with this MS merge instead of the run's")
    ap.add_argument("--topk", type=positive_int, help="evaluate with this MS topk instead of the run's")
    ap.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense base model")
    ap.add_argument("--out", type=Path, default=None, help="report directory (default: RUN/eval)")
    args = ap.parse_args(argv)
    if not (args.run / finetune.CONFIG_NAME).is_file():
        ap.error(f"--run {args.run}: no {finetune.CONFIG_NAME} there; is it an examples/finetune.py output?")
    if not args.text.is_file():
        ap.error(f"--text {args.text}: file not found")
    try:
        model, tokenizer, config = finetune.load_finetuned(args.run, merge=args.merge, topk=args.topk)
    except ValueError as err:  # an MSConfig that cannot be (merge * block_q not a multiple of block_k...)
        ap.error(f"--merge/--topk: {err}")
    print(f"ms-finetuned: {config['msattn']}")
    common = dict(windows=args.windows, tokens=args.tokens[0] if args.tokens else None, chunk_size=args.chunk_size)
    records = run_perplexity(model, tokenizer, args.text, args.lengths, method="ms-finetuned", **common)
    if args.dense:
        base = config["base_model"]
        if "model" in base:
            dense, _ = finetune.base_model(tokenizer=base["tokenizer"], model=base["model"])
        elif "llama2c" in base:
            dense, _ = finetune.base_model(base["llama2c"], base["tokenizer"])
        else:
            dense, _ = finetune.base_model(None, base["tiny_llama"]["tokenizer"], seed=base["tiny_llama"]["seed"])
        records += run_perplexity(dense.eval(), tokenizer, args.text, args.lengths, method="dense", **common)
    out = args.out or args.run / "eval"
    write_report(records, out, "perplexity")
    print(format_report(records))
    print(f"wrote {out}/perplexity.md, .json, .png")
    return records


if __name__ == "__main__":
    main()
