"""Perplexity at long context: windows of a text, each token's negative log-likelihood given its prefix.

A window of L tokens is the tokenizer's BOS (when it has one) followed by the next L - 1 tokens of the
text; windows do not overlap and start at the beginning of the text. Logits are consumed a slice at a time
(``msattn.prefill``'s ``on_logits``: about 64 MB of them), so memory does not grow with L or the vocabulary.
Only as much of the text is tokenized as the longest length needs.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..hf.cache import prefill
from .loading import auto_batch_size, model_device, peak_rss_mb, reset_peak_rss

__all__ = ["text_tokens", "window_nll", "run_perplexity"]


def text_tokens(tokenizer, text: str, need: int) -> list[int]:
    """At least ``need`` tokens of ``text`` (encoded without BOS), or all of them when the text is shorter.

    Encodes growing prefixes cut at whitespace, so a long file is not tokenized beyond what is needed.
    """
    chars = max(1024, 8 * need)
    while True:
        if chars >= len(text):
            return tokenizer.encode(text, bos=False)
        cut = text.rfind(" ", 0, chars)
        ids = tokenizer.encode(text[:cut if cut > 0 else chars], bos=False)
        if len(ids) >= need + 1:  # the last token may be a word cut short: drop it
            return ids[:-1]
        chars *= 2


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, *, chunk_size: int | None = 16384, on_chunk=None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens ``1..N-1`` of each ``(B, N)`` row given its prefix,
    and the number of tokens it sums over, ``B * (N - 1)``. Logits are read one chunk at a time."""
    total = torch.zeros((), dtype=torch.float64)

    def accumulate(start, logits):
        nonlocal total
        targets = input_ids[:, start + 1:start + logits.shape[1] + 1]
        logits = logits[:, :targets.shape[1]].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        total += nll.double().cpu()

    prefill(model, input_ids, chunk_size=chunk_size, on_logits=accumulate, on_chunk=on_chunk)
    return total.item(), input_ids.shape[0] * (input_ids.shape[1] - 1)


def run_perplexity(model, tokenizer, text_path, lengths: Sequence[int], *, method: str,
                   chunk_size: int | None = 16384, windows: int = 1, tokens: int | None = None,
                   batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """Perplexity of a prepared model (``loading.prepare``) on ``windows`` windows of each length.

    ``tokens`` (overrides ``windows``): every length is measured on the same first ``tokens`` tokens of
    the text, in ``tokens // length`` windows (at least one), so perplexities at different lengths
    score the same text and differ only by the context each token gets.

    Returns one record per length: ``{"method", "length", "windows", "perplexity", "seconds",
    "peak_rss_mb"}`` (``peak_cuda_mb`` too on CUDA). A text too short for one window of the longest
    length is an error; when it holds fewer than ``windows`` windows of some length, those that fit are
    used (with a warning) and ``"windows"`` says how many.
    """
    path = os.fspath(text_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: text file not found")
    if windows < 1:
        raise ValueError(f"run_perplexity: windows must be at least 1, got {windows}")
    if tokens is not None and tokens < 1:
        raise ValueError(f"run_perplexity: tokens must be at least 1, got {tokens}")
    per_length = {n: windows if tokens is None else max(1, tokens // n) for n in lengths}
    if min(lengths) < 2:
        raise ValueError(f"run_perplexity: lengths must be at least 2 tokens, got {min(lengths)}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    prefix = tokenizer.encode("", bos=True)  # [BOS] or []
    body = {length: length - len(prefix) for length in lengths}
    text_ids = text_tokens(tokenizer, text, max(body[length] * per_length[length] for length in lengths))
    longest = max(lengths)
    if len(text_ids) < body[longest]:
        raise ValueError(f"{path}: the text has {len(text_ids)} tokens, shorter than the length {longest} "
                         f"({body[longest]} text tokens after BOS)")
    device = model_device(model)
    records = []
    for length in tqdm(lengths, desc=f"perplexity {method}", disable=not progress):
        want = per_length[length]
        count = min(want, len(text_ids) // body[length])
        if count < want:
            warnings.warn(f"{path}: the text holds only {count} windows of {length} tokens, not {want}",
                          stacklevel=2)
        rows = [prefix + text_ids[i * body[length]:(i + 1) * body[length]] for i in range(count)]
        size = batch_size or auto_batch_size(length, count)
        reset_peak_rss(device)
        start, nll, predicted = time.perf_counter(), 0.0, 0
        with tqdm(total=count * length, desc=f"{length} tokens", unit="tok", unit_scale=True, leave=False,
                  disable=not progress) as bar:
            for first in range(0, count, size):
                ids = torch.tensor(rows[first:first + size], dtype=torch.long, device=device)
                batch = ids.shape[0]
                part, n = window_nll(model, ids, chunk_size=chunk_size,
                                     on_chunk=lambda s, e: bar.update(batch * (e - s)))
                nll, predicted = nll + part, predicted + n
                del ids
        record = {"method": method, "length": int(length), "windows": count, "perplexity": math.exp(nll / predicted),
                  "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
        if device.type == "cuda":
            record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        records.append(record)
    return records
