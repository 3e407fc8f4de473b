"""``msattn infer``: long-context generation with a model's attention method, measured.

The prompt is a text file, or a pass key hidden in filler text (``msattn.eval.passkey``). It is run
through the model in chunks (``msattn.prefill``, the method's cache), then continued greedily one token
at a time against the cache. Printed at the end, and written as JSON to ``report`` when given: prefill
and decode tokens/s, peak memory (process RSS; CUDA's allocator peak on a GPU), the generated text and,
for a pass key, whether it was retrieved.
"""

from __future__ import annotations

import json
import random
import time

import torch
from tqdm.auto import tqdm

from ..eval.loading import load, parse_dtype, peak_rss_mb, prepare, read_checkpoint_meta, reset_peak_rss
from ..eval.passkey import greedy_generate, make_filler, passkey_prompt, random_key, retrieved
from ..config import ConfigError

__all__ = ["infer"]


def _prompt(args, tokenizer) -> tuple[list[int], str | None]:
    """The prompt's ids and, for a pass key, the answer."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return tokenizer.encode(f.read(), bos=True), None
        except OSError as e:
            raise ConfigError(f"prompt_file: {e}") from None
    try:
        filler = make_filler(args.filler, tokenizer)
        key = random_key(random.Random(args.seed), 5)
        return passkey_prompt(tokenizer, args.passkey_length, key, args.passkey_depth, filler=filler)
    except (OSError, ValueError) as e:
        raise ConfigError(f"passkey: {e}") from None


def infer(args, attn) -> dict:
    """Run ``args`` (InferArguments) with the attention of ``attn`` (None fields: as saved with the
    model); returns the measurements that are printed."""
    from ..hf import patched_config
    from ..models.gguf import resolve

    if args.model is None:
        raise ConfigError("model: required (an HF directory, a pretrain or finetune output, .gguf file or named model)")
    if (args.prompt_file is None) == (args.passkey_length is None):
        raise ConfigError("give one of prompt_file (a text file) or passkey_length (tokens)")
    for key in ("max_new_tokens", "chunk_size") + (("passkey_length",) if args.passkey_length is not None else ()):
        if getattr(args, key) < 1:
            raise ConfigError(f"{key}: expected a positive int, got {getattr(args, key)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        path = resolve(args.model)
        model, tokenizer = load(model=path, tokenizer=args.tokenizer, dtype=parse_dtype(args.dtype, device))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    meta = read_checkpoint_meta(path)
    method = attn.method(meta)
    prepare(model, method, attn.settings(meta))
    config = patched_config(model)
    span = getattr(config, "span", 1)
    if args.chunk_size % span:
        raise ConfigError(f"chunk_size: must be a multiple of the MS group span merge * block_q = {span}, "
                          f"got {args.chunk_size}")
    model.to(device)
    ids, answer = _prompt(args, tokenizer)
    n = len(ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, n)

    reset_peak_rss(device)
    prefilled = []
    start = time.perf_counter()
    with torch.no_grad(), tqdm(total=n, desc="prefill", unit="tok", unit_scale=True) as bar:
        def on_chunk(s, e):
            bar.update(e - s)
            if e == n:
                prefilled.append(time.perf_counter())
        new = greedy_generate(model, input_ids, args.max_new_tokens, chunk_size=args.chunk_size, on_chunk=on_chunk)
    end = time.perf_counter()
    text = tokenizer.decode(new[0].tolist())
    prefill_s, decode_s = prefilled[0] - start, end - prefilled[0]
    result = {
        "model": args.model, "method": method, "config": repr(config), "dtype": args.dtype, "device": str(device),
        "prompt_tokens": n, "new_tokens": args.max_new_tokens, "chunk_size": args.chunk_size,
        "prefill_seconds": prefill_s, "prefill_tokens_per_s": n / prefill_s,
        # the first new token comes from the prefill's last logits; the others take one step each
        "decode_seconds": decode_s, "decode_tokens_per_s": (args.max_new_tokens - 1) / decode_s if decode_s > 0 else None,
        "peak_rss_mb": peak_rss_mb(), "text": text,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if answer is not None:
        result.update(passkey=answer, passkey_depth=args.passkey_depth, filler=args.filler,
                      retrieved=retrieved(answer, text))
    print(f"generated: {text!r}")
    if answer is not None:
        print(f"pass key {answer}: {'retrieved' if result['retrieved'] else 'not retrieved'}")
    decode = result["decode_tokens_per_s"]
    print(f"{method}{'' if config is None else ' ' + repr(config)}, {args.dtype} on {device}: prefill {n:,} tokens in {prefill_s:.2f} s "
          f"({result['prefill_tokens_per_s']:,.0f} tok/s); decode {args.max_new_tokens} tokens in {decode_s:.2f} s "
          f"({'-' if decode is None else f'{decode:,.1f}'} tok/s); peak RSS {result['peak_rss_mb']:,.0f} MB"
          + (f", peak CUDA {result['peak_cuda_mb']:,.0f} MB" if "peak_cuda_mb" in result else ""))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(result, f, indent=1)
    return result
