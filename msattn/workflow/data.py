"""Training text: a byte-level tokenizer that needs nothing downloaded, the corpus files, token chunks.

- :func:`byte_tokenizer`: an HF fast tokenizer (``tokenizers``' BPE with no merges over a byte-level
  alphabet): id 0 ``<unk>``, 1 ``<s>`` (BOS), 2 ``</s>`` (EOS), ``3 + b`` for each UTF-8 byte ``b``
  (the byte ids of llama2.c's vocabularies), so ``save_pretrained`` / ``AutoTokenizer`` round-trip it.
- :func:`corpus_files`: the files a phase trains on; by default the Austen novels of
  ``../shared/data/austen`` other than the held-out ``persuasion.txt``, which is refused as training text.
- :class:`TokenChunks`: consecutive ``seq_len`` chunks of the tokenized files, as a map-style dataset.
- :class:`PasskeyMix`: those chunks with a share replaced by pass-key prompts hidden in the same text,
  the loss on the key's digits only: what teaches a model to retrieve (``passkey_share``).
- :func:`collate_labelled`: the Trainer's collator, asking the model for logits only where a loss is taken.
"""

from __future__ import annotations

import os
import random

import torch

from ..eval.loading import HFTokenizer, load_tokenizer
from ..eval.passkey import (HELD_OUT, TextFiller, austen_files, passkey_prompt, random_key,
                            template_length)
from ..config import ConfigError

__all__ = ["BYTE_OFFSET", "byte_tokenizer", "make_tokenizer", "corpus_files", "TokenChunks", "PasskeyMix",
           "text_dataset", "collate_labelled"]

BYTE_OFFSET = 3  # ids 0..2 are <unk>, <s>, </s>


def _byte_alphabet() -> list[str]:
    """The printable character that byte-level BPE (GPT-2's convention) writes for each byte 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer():
    """A byte-level HF tokenizer of 259 ids (see the module docstring); ``tokenizer("ab")`` is
    ``[1, 3 + 97, 3 + 98]`` (BOS added, as llama2.c does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: BYTE_OFFSET + b for b, c in enumerate(_byte_alphabet())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tokenizer(spec: str):
    """The tokenizer a config names, behind the ``encode(text, bos=True)`` / ``decode`` protocol:
    ``"bytes"`` (:func:`byte_tokenizer`), or a path (an HF tokenizer directory or ``tokenizer.json``, or a
    llama2.c ``tok*.bin``; see ``msattn.eval.loading.load_tokenizer``)."""
    if spec == "bytes":
        return HFTokenizer(byte_tokenizer())
    return load_tokenizer(spec)


def corpus_files(paths) -> list[str]:
    """The training files: ``paths``, or the Austen novels but the held-out one when ``paths`` is empty.
    A missing file, or the held-out novel, is an error naming the key ``text``."""
    try:
        files = [os.fspath(p) for p in paths] if paths else austen_files()
    except FileNotFoundError as e:
        raise ConfigError(f"text: none given and {e}") from None
    for path in files:
        if os.path.basename(path) == HELD_OUT:
            raise ConfigError(f"text: {path} is the held-out evaluation text (../shared/data/README.md); "
                             "train on the other novels")
        if not os.path.isfile(path):
            raise ConfigError(f"text: {path}: no such file")
    return files


class TokenChunks(torch.utils.data.Dataset):
    """Consecutive ``seq_len`` chunks of a token stream, each ``{"input_ids", "labels"}`` int64
    ``(seq_len,)`` (the model shifts the labels itself)."""

    def __init__(self, ids, seq_len: int):
        n = len(ids) // seq_len
        if n == 0:
            raise ConfigError(f"text: {len(ids)} tokens make no chunk of seq_len={seq_len}; give more text")
        self.chunks = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, seq_len)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i) -> dict:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def check_passkey_share(share: float, tokenizer, seq_len: int) -> None:
    """``passkey_share`` in [0, 1], and (when > 0) ``seq_len`` long enough for a pass-key prompt."""
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"passkey_share: expected a share between 0 and 1, got {share}")
    longest = 10 ** PasskeyMix.DIGITS - 1  # the widest key
    need = template_length(tokenizer, longest) + len(tokenizer.encode(str(longest), bos=False))
    if share and seq_len < need:
        raise ConfigError(f"passkey_share: a pass-key prompt needs at least {need} tokens, got seq_len={seq_len}")


class PasskeyMix(torch.utils.data.Dataset):
    """``chunks`` with a share of the items replaced by pass-key prompts (``msattn.eval.passkey``'s
    prompt, a 5-digit key at a uniform depth of the ``filler`` text, from a uniform offset), each
    ``seq_len`` tokens: the prompt and the key's tokens after it. Labels are -100 but on the key's
    tokens, so those items train retrieval only; the others are the text's chunks as they are.

    Which items are prompts, and each prompt's key, depth and offset, follow from ``(seed, index)``
    alone: the same on every process and epoch, and drawn from streams the evaluation's
    ``trial_plan`` does not use.
    """

    DIGITS = 5  # of each key

    def __init__(self, chunks: TokenChunks, tokenizer, filler: TextFiller, share: float, seed: int = 0):
        check_passkey_share(share, tokenizer, chunks.chunks.shape[1])
        self.chunks, self.tokenizer, self.filler, self.share, self.seed = chunks, tokenizer, filler, share, seed
        self.seq_len = chunks.chunks.shape[1]

    def __len__(self) -> int:
        return len(self.chunks)

    def is_passkey(self, i: int) -> bool:
        return random.Random(f"passkey-train/{self.seed}/{i}").random() < self.share

    def __getitem__(self, i) -> dict:
        if not self.is_passkey(i):
            return self.chunks[i]
        rng = random.Random(f"passkey-train-prompt/{self.seed}/{i}")
        key = random_key(rng, self.DIGITS)
        answer = self.tokenizer.encode(str(key), bos=False)
        ids, _ = passkey_prompt(self.tokenizer, self.seq_len - len(answer), key, rng.random(), filler=self.filler,
                                offset=rng.random())
        input_ids = torch.tensor(ids + answer, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        labels[len(ids):] = input_ids[len(ids):]
        return {"input_ids": input_ids, "labels": labels}


def text_dataset(tokenizer, paths, seq_len: int, max_tokens: int | None = None, *, passkey_share: float = 0.0,
                 seed: int = 0) -> TokenChunks | PasskeyMix:
    """Each file tokenized with BOS first, concatenated, cut into ``seq_len`` chunks (at most
    ``max_tokens`` tokens in all); with ``passkey_share > 0`` a :class:`PasskeyMix` of them, its prompts
    hidden in the same files."""
    files = corpus_files(paths)
    ids: list[int] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            ids += tokenizer.encode(f.read(), bos=True)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    chunks = TokenChunks(ids, seq_len)
    if not passkey_share:
        return chunks
    check_passkey_share(passkey_share, tokenizer, seq_len)  # before tokenizing the filler
    try:
        filler = TextFiller(tokenizer, files)
    except ValueError as e:  # too little text
        raise ConfigError(f"passkey_share: {e}") from None
    return PasskeyMix(chunks, tokenizer, filler, passkey_share, seed)


def collate_labelled(items: list[dict]) -> dict:
    """The items ``{"input_ids", "labels"}`` (int64 ``(N,)`` each) as a batch that computes the loss of
    transformers' causal LM on only the positions that have one.

    Returns ``input_ids`` and ``labels`` ``(B, N)``, ``logits_to_keep``: int64 ``(K,)``, the positions
    ``p`` whose next token carries a label in some row, and ``shift_labels`` ``(B, K)``: those next
    tokens' labels (-100 in a row without one). The causal-LM loss takes ``shift_labels`` as they are,
    and the Trainer counts the loss's tokens from them, so the loss and its gradients are the ones of
    logits at every position; a pass-key item (labels on the key's few tokens) no longer projects its
    other positions onto the vocabulary (49,152 x 576 multiply-adds a position for SmolLM2, three times
    with the backward of a trained, tied embedding), and a text item keeps all positions but the last.
    """
    input_ids = torch.stack([item["input_ids"] for item in items])
    labels = torch.stack([item["labels"] for item in items])
    following = labels[:, 1:]
    keep = (following != -100).any(0).nonzero()[:, 0]
    return {"input_ids": input_ids, "labels": labels, "logits_to_keep": keep, "shift_labels": following[:, keep]}
