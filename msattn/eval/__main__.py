"""``python -m msattn.eval passkey|perplexity|compare``: evaluate attention methods on one model.

Methods: ``dense`` (SDPA), ``ms`` (MS attention), ``self_extend`` (training-free SelfExtend) and
``infini`` (Infini-attention; a model not trained with it gets the untrained, mostly local gate).

Examples::

    python -m msattn.eval passkey --llama2c stories260K.bin --tokenizer tok512.bin \\
        --lengths 1k,4k,16k --trials 10 --methods dense,ms --block-q 16 --merge 64 --topk 448
    python -m msattn.eval perplexity --model checkpoints/demo --text persuasion.txt --lengths 4k,16k
    python -m msattn.eval compare --llama2c stories260K.bin --tokenizer tok512.bin --lengths 512,1k,2k \
        --methods dense,ms,self_extend,infini --trials 20 --text persuasion.txt

Writes ``<out>/<task>.md`` (tables), ``.json`` (records) and ``.png`` (metric against length) and
prints the tables (``compare``: one table with passkey accuracy, perplexity, time and memory of every
method and length). Method parameters default to the checkpoint's ``msattn.json`` (demo checkpoints),
else to ``loading.Settings()``; flags override either.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .loading import DTYPES, load, method_names, parse_dtype, prepare, read_checkpoint_meta, settings_from_meta
from .passkey import make_filler

_LENGTH = re.compile(r"(\d+)([km]?)", re.IGNORECASE)


def parse_lengths(text: str) -> list[int]:
    """"1k,4k,1m,300" -> [1024, 4096, 1048576, 300] (k = 1024, m = 1024**2), in the given order."""
    lengths = []
    for item in text.split(","):
        match = _LENGTH.fullmatch(item.strip())
        if match is None or int(match[1]) == 0:
            raise argparse.ArgumentTypeError(f"cannot read length {item.strip()!r}: expected a positive number "
                                             "with an optional k (x1024) or m (x1024^2) suffix, e.g. 4k")
        lengths.append(int(match[1]) * {"": 1, "k": 2 ** 10, "m": 2 ** 20}[match[2].lower()])
    return lengths


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
                                         f"known methods: {', '.join(method_names())}")
    return methods


def _one_length(text: str) -> int:
    lengths = parse_lengths(text)
    if len(lengths) != 1:
        raise argparse.ArgumentTypeError(f"expected one length, got {text!r}")
    return lengths[0]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m msattn.eval", description=__doc__.split("\n\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_argument_group("model")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="HF model directory (a demo checkpoint directory included), a .gguf file, "
                       "or a named model: smollm2-135m")
    which.add_argument("--llama2c", help="llama2.c checkpoint (.bin); needs --tokenizer")
    source.add_argument("--tokenizer", help="tokenizer: llama2.c tok*.bin, HF tokenizer directory, or .json")
    source.add_argument("--dtype", choices=["auto", *DTYPES], default="float32",
                        help="parameter dtype (default float32); auto: bfloat16 on CUDA and CPUs with AMX, "
                             "else float32")
    run = common.add_argument_group("run")
    run.add_argument("--lengths", type=parse_lengths, required=True, help="comma-separated, e.g. 1k,4k,64k,1m")
    run.add_argument("--methods", type=parse_methods, default=["dense", "ms"],
                     help=f"comma-separated among {', '.join(method_names())} (default dense,ms)")
    run.add_argument("--chunk-size", type=positive_int, default=16384,
                     help="prefill chunk in tokens; for ms a multiple of merge*block_q (default 16384)")
    run.add_argument("--batch-size", type=positive_int, default=None,
                     help="sequences per forward (default: about 32K tokens a batch)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="eval_out", help="directory for the .md, .json and .png (default eval_out/)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--decode", choices=["cached", "exact"], default="cached",
                     help="passkey answers of MS models: cached single-query decode steps (default), or exact: each "
                          "token predicted as a forward over the whole sequence predicts it (re-runs its group)")
    ms = common.add_argument_group("MS attention (default: the checkpoint's msattn.json, else MSConfig())")
    ms.add_argument("--block-q", type=positive_int)
    ms.add_argument("--block-k", type=positive_int)
    ms.add_argument("--merge", type=positive_int)
    ms.add_argument("--topk", type=positive_int)
    ms.add_argument("--local", type=int, help="key regions just before each group always selected (0..topk)")
    ms.add_argument("--rope", choices=["inputs", "selected"])
    ms.add_argument("--coarse-regions", type=int, help="multi-scale selection: key regions per coarse region (0: exact)")
    ms.add_argument("--coarse-topk", type=int, help="multi-scale selection: coarse regions each group keeps")
    ms.add_argument("--score-channels", choices=["all", "slow"], help="channels selection scores with: all, or "
                    "(--rope selected) the rotary pairs slower than the model's window")
    peers = common.add_argument_group("SelfExtend and Infini-attention")
    peers.add_argument("--group-size", type=positive_int, help="SelfExtend group size G (default 8)")
    peers.add_argument("--window", type=int, help="SelfExtend neighbour window W (default 128)")
    peers.add_argument("--segment-len", type=positive_int, help="Infini-attention segment length (default 256, or the "
                       "checkpoint's)")
    peers.add_argument("--delta-rule", action="store_true", default=None, help="Infini-attention's delta-rule memory")
    peers.add_argument("--unrotated-memory", action="store_true", default=None,
                       help="Infini-attention's memory stores un-rotated keys (InfiniConfig.unrotated_memory)")

    keys = argparse.ArgumentParser(add_help=False)
    keys.add_argument("--digits", type=positive_int, default=5, help="digits of the pass key (default 5)")
    keys.add_argument("--filler", default="auto",
                      help="passkey filler: 'austen' (the Austen novels of $MSATTN_DATA/austen or "
                           "../shared/data/austen but persuasion.txt), 'repeated' (the landmark test's repeated "
                           "sentences), comma-separated text files, or 'auto' (default): 'repeated' for a model "
                           "with the passkey tokenizer (trained on the task; it reads no other text), else 'austen'")
    windows = argparse.ArgumentParser(add_help=False)
    windows.add_argument("--windows", type=positive_int, default=1, help="perplexity windows per length (default 1)")
    windows.add_argument("--tokens", type=_one_length, help="perplexity on the same first N tokens at every length "
                         "(N // length windows each; overrides --windows), e.g. 32k")

    passkey = tasks.add_parser("passkey", parents=[common, keys], help="passkey retrieval accuracy")
    passkey.add_argument("--trials", type=positive_int, default=10, help="prompts per length (default 10)")
    passkey.add_argument("--kv-dir", help="ms only: keep the cache's keys and values in files in this existing "
                         "directory, mapped into memory (msattn.hf.MSCache's kv_dir): for caches larger than the "
                         "memory, e.g. 1M tokens")
    perplexity = tasks.add_parser("perplexity", parents=[common, windows], help="perplexity on a text file")
    perplexity.add_argument("--text", required=True, help="UTF-8 text file")
    compare = tasks.add_parser("compare", parents=[common, keys, windows],
                               help="passkey, perplexity, time and memory of every method")
    compare.set_defaults(methods=list(method_names()))
    compare.add_argument("--trials", type=int, default=10, help="passkey prompts per length (0: no passkey test)")
    compare.add_argument("--text", help="UTF-8 text file for perplexity (default: no perplexity test)")
    return parser


def run(args) -> list[dict]:
    from .compare import run_compare
    from .passkey import run_passkey
    from .perplexity import run_perplexity

    meta = read_checkpoint_meta(args.model) if args.model else None
    if args.window is not None and args.window < 0:
        raise ValueError(f"--window must be >= 0, got {args.window}")
    settings = settings_from_meta(meta, block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk,
                                  local=args.local, rope=args.rope, coarse_regions=args.coarse_regions,
                                  coarse_topk=args.coarse_topk, score_channels=args.score_channels,
                                  group_size=args.group_size, window=args.window,
                                  segment_len=args.segment_len, delta_rule=args.delta_rule,
                                  unrotated_memory=args.unrotated_memory)
    kv_dir = getattr(args, "kv_dir", None)
    if kv_dir is not None and (args.methods != ["ms"] or not os.path.isdir(kv_dir)):
        raise ValueError(f"--kv-dir keeps MS attention's cache in files of an existing directory: it needs "
                         f"--methods ms and a directory, got --methods {','.join(args.methods)} and {kv_dir!r}")
    span = settings.ms.span
    if "ms" in args.methods and args.chunk_size % span:
        raise ValueError(f"--chunk-size {args.chunk_size} is not a multiple of the MS group span merge * block_q = "
                         f"{settings.ms.merge} * {settings.ms.block_q} = {span}")
    model, tokenizer = load(model=args.model, llama2c=args.llama2c, tokenizer=args.tokenizer,
                            dtype=parse_dtype(args.dtype))
    filler = make_filler(args.filler, tokenizer) if args.task != "perplexity" else None
    common = dict(chunk_size=args.chunk_size, batch_size=args.batch_size, progress=not args.quiet)
    if args.task == "compare":
        return run_compare(model, tokenizer, args.methods, args.lengths, settings=settings, trials=args.trials,
                           text=args.text, windows=args.windows, tokens=args.tokens, digits=args.digits, seed=args.seed,
                           exact=args.decode == "exact", filler=filler, **common)
    records = []
    for method in args.methods:
        model = prepare(model, method, settings)
        if args.task == "passkey":
            records += run_passkey(model, tokenizer, args.lengths, args.trials, method=method, seed=args.seed,
                                   digits=args.digits, exact=args.decode == "exact", filler=filler,
                                   kv_dir=kv_dir, **common)
        else:
            records += run_perplexity(model, tokenizer, args.text, args.lengths, method=method, windows=args.windows,
                                      tokens=args.tokens, **common)
    return records


def main(argv=None) -> int:
    from .report import format_report, write_report

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        if getattr(args, "text", None) is not None and not os.path.isfile(args.text):
            raise FileNotFoundError(f"{args.text}: text file not found")
        records = run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        parser.exit(2, f"{parser.prog} {args.task}: error: {e}\n")
    if args.task == "compare":
        from .compare import format_compare, write_compare

        paths = write_compare(records, args.out)
        print(format_compare(records))
    else:
        paths = write_report(records, args.out, args.task)
        print(format_report(records))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
