"""Passkey retrieval: the standard prompt, a word-level tokenizer for models trained on it, the evaluation.

The prompt (Mohtashami & Jaggi's landmark-attention test, as used by LongLoRA, SelfExtend and the MS
attention paper)::

    <BOS> There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important information there. <filler ...> The pass key is N. Remember it.
    N is the pass key. <filler ...> What is the pass key? The pass key is

The filler is either the landmark test's "The grass is green. The sky is blue. The sun is yellow. Here
we go. There and back again." repeated (the default of :func:`passkey_prompt`), or real text
(:class:`TextFiller`: one or more text files, tokenized once and read cyclically from a per-trial
offset). Repeated sentences make the task easy for selection-based methods: every region of filler
looks alike and the key's regions stand out; in real text they do not. Either way the filler is cut at
token level so that the prompt has exactly the requested number of tokens, and the key sentence sits
at a uniformly random depth of the filler (in real text, at the sentence end nearest that depth).
Each piece is encoded on its own (``tokenizer.encode(piece, bos=False)`` encodes a piece that
continues a text, as llama2.c's dummy prefix space does), so cutting the filler never re-tokenizes
the rest.

Tokenizer protocol used throughout ``msattn.eval``: ``encode(text, bos=True) -> list[int]`` and
``decode(ids) -> str`` (``Llama2cTokenizer``, :class:`PasskeyTokenizer`, ``loading.HFTokenizer``).
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..hf.cache import new_cache, prefill
from ..hf.common import cache_argument
from .loading import auto_batch_size, is_patched, model_device, peak_rss_mb, reset_peak_rss

__all__ = ["INSTRUCTION", "FILLER", "KEY_SENTENCE", "QUESTION", "PasskeyTokenizer", "TextFiller", "HELD_OUT",
           "austen_dir", "austen_files", "make_filler", "passkey_prompt", "template_length", "random_key", "sample",
           "greedy_generate", "retrieved", "trial_plan", "run_passkey"]

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

_WORDS = re.compile(r"\d|\w+|[^\w\s]")
_PUNCT = re.compile(r"[^\w\s]")


# ---------------------------------------------------------------------------------------------
# the prompt

def _key_text(key) -> str:
    text = str(key)
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"passkey: the key must be a non-negative integer or a string of digits, got {key!r}")
    return text


def _pieces(tokenizer, key: str) -> tuple[list[int], list[int], list[int]]:
    """(instruction with BOS, key sentence, question) token ids."""
    return (tokenizer.encode(INSTRUCTION, bos=True), tokenizer.encode(KEY_SENTENCE.format(key=key), bos=False),
            tokenizer.encode(QUESTION, bos=False))


def template_length(tokenizer, key) -> int:
    """Tokens of the prompt without any filler (BOS included): the shortest prompt for this key."""
    return sum(len(p) for p in _pieces(tokenizer, _key_text(key)))


def _repeat(unit: list[int], n: int, *, from_end: bool) -> list[int]:
    """``n`` tokens of ``unit`` repeated: its first ``n`` or, ``from_end``, its last ``n``."""
    if n <= 0:
        return []
    stream = unit * math.ceil(n / len(unit))
    return stream[len(stream) - n:] if from_end else stream[:n]


class TextFiller:
    """Real text as passkey filler: ``files`` (UTF-8 text) joined by blank lines and tokenized once with
    ``tokenizer``; a prompt reads ``budget`` tokens of it cyclically from an offset (the file is repeated
    when a prompt needs more tokens than it has).

    Attributes:
        name: the files' base names joined by ``+`` (what the result records call the filler).
        ids: the text's token ids (without BOS).
    """

    SEARCH = 256  # tokens either side of the asked depth searched for a sentence end

    def __init__(self, tokenizer, files: Sequence):
        files = [os.fspath(f) for f in files]
        if not files:
            raise ValueError("TextFiller: give at least one text file")
        texts = []
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: filler text file not found")
            with open(path, encoding="utf-8") as f:
                texts.append(f.read().strip())
        self.name = "+".join(os.path.basename(f) for f in files)
        self.tokenizer = tokenizer
        self.ids = tokenizer.encode("\n\n".join(texts), bos=False)
        if len(self.ids) < 2 * self.SEARCH:
            raise ValueError(f"TextFiller: {self.name} holds {len(self.ids)} tokens; filler text needs at least "
                             f"{2 * self.SEARCH}")
        self._ends: dict[int, bool] = {}

    def _ends_sentence(self, token: int) -> bool:
        if token not in self._ends:
            text = self.tokenizer.decode([token]).rstrip().rstrip("\"'\u201d\u2019)")
            self._ends[token] = text.endswith((".", "!", "?"))
        return self._ends[token]

    def take(self, start: int, n: int) -> list[int]:
        """``n`` tokens from position ``start`` of the text repeated without end."""
        start %= len(self.ids)
        out = self.ids[start:start + n]
        while len(out) < n:
            out += self.ids[:n - len(out)]
        return out

    def sentence_start(self, position: int) -> int:
        """The first position at or after ``position`` that starts a sentence (within SEARCH tokens;
        ``position`` itself when none does)."""
        for p in range(position, position + self.SEARCH):
            if self._ends_sentence(self.ids[(p - 1) % len(self.ids)]):
                return p
        return position

    def split(self, tokens: list[int], at: int) -> int:
        """The position nearest ``at`` (within SEARCH tokens) in ``tokens`` right after a sentence end, or
        0 (``tokens`` start a sentence); ``at`` when there is none."""
        for delta in range(self.SEARCH + 1):
            for p in (at - delta, at + delta):
                if p == 0 or (0 < p <= len(tokens) and self._ends_sentence(tokens[p - 1])):
                    return p
        return at


HELD_OUT = "persuasion.txt"  # the Austen novel kept for perplexity: never filler, never trained on


def austen_dir() -> str:
    """The folder of the Austen novels: ``$MSATTN_DATA/austen``, or ``../shared/data/austen`` next to the
    working directory or to the source tree."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    places = [os.path.join(os.environ["MSATTN_DATA"], "austen")] if os.environ.get("MSATTN_DATA") else []
    places += [os.path.join(root, "..", "shared", "data", "austen") for root in (os.getcwd(), here)]
    for place in places:
        if os.path.isfile(os.path.join(place, HELD_OUT)):
            return os.path.normpath(place)
    raise FileNotFoundError("the Austen novels were not found in " + ", ".join(map(os.path.normpath, places))
                            + " (set MSATTN_DATA, or pass --filler FILE[,FILE...] / --filler repeated)")


def austen_files() -> list[str]:
    """The Austen novels but the held-out ``persuasion.txt``: the default passkey filler."""
    place = austen_dir()
    return [os.path.join(place, f) for f in sorted(os.listdir(place)) if f.endswith(".txt") and f != HELD_OUT]


def make_filler(spec: str, tokenizer):
    """The passkey filler of ``--filler``: None for 'repeated', else a TextFiller."""
    if spec == "auto":
        spec = "repeated" if isinstance(tokenizer, PasskeyTokenizer) else "austen"
    if spec == "repeated":
        return None
    files = austen_files() if spec == "austen" else [f for f in spec.split(",") if f]
    return TextFiller(tokenizer, files)


def passkey_prompt(tokenizer, n_tokens: int, key, depth: float, *, filler: TextFiller | None = None,
                   offset: float = 0.0) -> tuple[list[int], str]:
    """Build one passkey prompt of exactly ``n_tokens`` tokens (BOS included).

    Args:
        tokenizer: any tokenizer with ``encode(text, bos=True)``.
        n_tokens: the prompt length in tokens.
        key: the pass key, a non-negative int or a string of digits.
        depth: where the key sentence sits in the filler, from 0 (right after the instruction) to 1
            (right before the question).
        filler: real text to fill with (built with the same tokenizer), or None for the repeated
            sentences.
        offset: with ``filler``, where in its text the filler starts, as a fraction of its length
            (moved to the next sentence start).

    Returns:
        ``(ids, answer)``: the prompt's token ids and the key as text (what the model should continue
        the prompt with). The filler before the key ends with whole sentences and the filler after it
        starts with whole sentences (real text: at the sentence end nearest ``depth``); the cuts fall
        next to the instruction and the question.
    """
    answer = _key_text(key)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey_prompt: depth must lie in [0, 1], got {depth}")
    head, needle, tail = _pieces(tokenizer, answer)
    budget = n_tokens - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(f"passkey prompt of {n_tokens} tokens is shorter than the prompt template without "
                         f"filler, which needs at least {len(head) + len(needle) + len(tail)} tokens "
                         f"(key of {len(answer)} digits)")
    before = round(depth * budget)
    if filler is not None:
        if filler.tokenizer is not tokenizer:
            raise ValueError("passkey_prompt: the filler was tokenized with another tokenizer")
        if not 0.0 <= offset <= 1.0:
            raise ValueError(f"passkey_prompt: offset must lie in [0, 1], got {offset}")
        text = filler.take(filler.sentence_start(int(offset * len(filler.ids))), budget)
        before = filler.split(text, before)
        return head + text[:before] + needle + text[before:] + tail, answer
    unit = tokenizer.encode(FILLER, bos=False)
    ids = head + _repeat(unit, before, from_end=True) + needle + _repeat(unit, budget - before, from_end=False) + tail
    return ids, answer


def random_key(rng: random.Random, digits: int) -> int:
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"passkey: digits must be a positive int, got {digits!r}")
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def sample(tokenizer, rng: random.Random, n_tokens: int, digits: int = 5) -> tuple[list[int], list[int]]:
    """One random example: a prompt of ``n_tokens`` tokens with a uniform random key of ``digits`` digits
    at a uniform random depth. Returns ``(ids, answer_ids)``, the answer being ``encode(key, bos=False)``
    (the tokens that should follow the prompt)."""
    key = random_key(rng, digits)
    ids, answer = passkey_prompt(tokenizer, n_tokens, key, rng.random())
    return ids, tokenizer.encode(answer, bos=False)


# ---------------------------------------------------------------------------------------------
# a tokenizer for models trained from scratch on the task

def _default_vocab() -> list[str]:
    vocab = ["<pad>", "<bos>", "<eos>"] + [str(d) for d in range(10)]
    for text in (INSTRUCTION, FILLER, KEY_SENTENCE.format(key=0), QUESTION):
        for word in _WORDS.findall(text):
            if word not in vocab:
                vocab.append(word)
    return vocab


class PasskeyTokenizer:
    """Word-level tokenizer over exactly the passkey prompt's vocabulary.

    Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, 3..12 the digits "0".."9" (a number is its digits, one
    token each), then each word and punctuation mark of the instruction, filler, key sentence and
    question in order of first appearance (case-sensitive; words split by ``\\d|\\w+|[^\\w\\s]``).
    """

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab: Sequence[str] | None = None):
        vocab = _default_vocab() if vocab is None else list(vocab)
        head = ["<pad>", "<bos>", "<eos>"] + [str(d) for d in range(10)]
        if vocab[:len(head)] != head or len(set(vocab)) != len(vocab):
            raise ValueError("PasskeyTokenizer: the vocabulary must start with <pad>, <bos>, <eos>, the digits "
                             "0..9 and hold no duplicates")
        self.vocab = vocab
        self._ids = {word: i for i, word in enumerate(vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """str -> ids; a word outside the vocabulary raises ValueError naming it."""
        ids = [self.bos_id] if bos else []
        for word in _WORDS.findall(text):
            token = self._ids.get(word)
            if token is None:
                raise ValueError(f"PasskeyTokenizer: {word!r} is not in the vocabulary of the passkey prompt")
            ids.append(token)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids) -> str:
        """ids -> str: words joined by spaces, no space before punctuation or between the digits of a
        number; <pad>, <bos> and <eos> print nothing."""
        out, prev = [], None
        for token in ids:
            token = int(token)
            if not 0 <= token < len(self.vocab):
                raise ValueError(f"PasskeyTokenizer: id {token} is outside the vocabulary of {len(self.vocab)}")
            if token <= self.eos_id:
                continue
            word = self.vocab[token]
            glue = prev is None or _PUNCT.fullmatch(word) or (word.isdigit() and prev.isdigit())
            out.append(word if glue else " " + word)
            prev = word
        return "".join(out)

    def to_dict(self) -> dict:
        """JSON-serialisable form, for saving next to a model (``from_dict`` reads it back)."""
        return {"type": "PasskeyTokenizer", "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, data: dict) -> PasskeyTokenizer:
        if not isinstance(data, dict) or data.get("type") != "PasskeyTokenizer" or "vocab" not in data:
            raise ValueError("PasskeyTokenizer.from_dict: expected {'type': 'PasskeyTokenizer', 'vocab': [...]}")
        return cls(data["vocab"])

    def sample(self, rng: random.Random, n_tokens: int, digits: int = 5) -> tuple[list[int], list[int]]:
        """:func:`sample` with this tokenizer."""
        return sample(self, rng, n_tokens, digits)


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, chunk_size: int | None = 16384,
                    on_chunk=None, exact: bool = False, kv_dir: str | None = None) -> torch.Tensor:
    """Greedy continuation of ``(B, N)`` prompts: chunked prefill (:func:`msattn.prefill`, with the cache
    of the model's method), then one token at a time against the cache.
    ``on_chunk(start, end)`` is called after each prefill chunk. ``kv_dir``: the cache keeps its keys and
    values in files there, mapped into memory (MS attention only; :class:`msattn.hf.MSCache`). Returns
    the new tokens ``(B, max_new_tokens)``.

    ``exact`` (models patched with MS attention only; a no-op for others): every step runs the new
    token's whole group again (the cache is cropped to the group's start and the group's tokens are
    fed), so each token is predicted exactly as a forward over the whole sequence predicts it: the
    group selects with the mean of all its queries so far, as in training. The default cached step
    selects with the new query alone (DESIGN section 2) and costs one token instead of up to
    ``merge * block_q``.
    """
    cache = new_cache(model, capacity=input_ids.shape[1] + max_new_tokens, kv_dir=kv_dir)
    cache, last = prefill(model, input_ids, chunk_size=chunk_size, cache=cache, on_chunk=on_chunk)
    span = None
    if exact and is_patched(model):
        from ..hf import patched_config

        span = patched_config(model).span
    batch, n = input_ids.shape
    first = n if span is None else (n - 1) // span * span  # the earliest position a step re-feeds
    recent = input_ids[:, first:]  # the tokens from `first` on: all a step can need
    tokens = []
    for step in range(max_new_tokens):
        token = last.argmax(-1)
        tokens.append(token)
        if step + 1 == max_new_tokens:
            break
        recent = torch.cat([recent, token[:, None]], 1)
        end = n + step + 1
        start = end - 1 if span is None else (end - 1) // span * span
        if cache.get_seq_length() > start:
            cache.crop(start - cache.get_seq_length())
        position = torch.arange(start, end, device=input_ids.device).expand(batch, -1)
        last = model(recent[:, start - first:end - first], use_cache=True, position_ids=position,
                     **{cache_argument(model): cache}).logits[:, -1]
    return torch.stack(tokens, 1)


def retrieved(answer: str, text: str) -> bool:
    """The criterion of :func:`run_passkey`: the key ``answer`` appears as a whole number in ``text``."""
    return answer in re.findall(r"\d+", text)


def trial_plan(length: int, trials: int, *, seed: int = 0, digits: int = 5) -> list[tuple[int, float, float]]:
    """The ``(key, depth, offset)`` of each of ``trials`` prompts at ``length`` tokens that
    :func:`run_passkey` evaluates for ``seed`` (build them with :func:`passkey_prompt`; ``offset`` is
    used with real-text filler only): the same for every method."""
    rng = random.Random(f"passkey/{seed}/{length}")
    plan = [(random_key(rng, digits), rng.random()) for _ in range(trials)]
    offsets = random.Random(f"passkey-filler/{seed}/{length}")  # its own stream: keys and depths as before
    return [(key, depth, offsets.random()) for key, depth in plan]


def run_passkey(model, tokenizer, lengths: Sequence[int], trials: int, *, method: str, seed: int = 0,
                digits: int = 5, chunk_size: int | None = 16384, batch_size: int | None = None,
                extra_tokens: int = 4, exact: bool = False, filler: TextFiller | None = None,
                kv_dir: str | None = None, progress: bool = True) -> list[dict]:
    """Passkey retrieval accuracy of a prepared model (``loading.prepare``) at each prompt length.

    For each length, ``trials`` prompts with uniform random keys of ``digits`` digits at uniform random
    depths (the same for every method given ``seed``), batched ``batch_size`` at a time (None: about
    32K tokens a batch); each is continued greedily by the answer's token count plus ``extra_tokens``,
    and counts as retrieved when the generated text holds the key as a whole number. ``exact``: see
    :func:`greedy_generate`. ``filler``: real text around the key (:class:`TextFiller`), or None for
    the repeated sentences. ``kv_dir``: see :func:`greedy_generate`.

    Returns one record per length: ``{"method", "length", "trials", "accuracy", "seconds_per_trial",
    "peak_rss_mb", "filler", "missed"}`` (peak RSS of the process during that length's trials;
    ``peak_cuda_mb`` too on CUDA; ``filler``: the filler's name, or ``"repeated"``; ``missed``: one
    ``{"trial", "key", "depth", "offset", "generated"}`` per prompt not retrieved, ``trial`` its index in
    :func:`trial_plan`, so ``benchmarks/passkey_selection.py`` can rebuild and diagnose it).
    Every length is checked against the prompt template before any work starts.
    """
    if trials < 1:
        raise ValueError(f"run_passkey: trials must be at least 1, got {trials}")
    plans = {}
    for length in lengths:
        plan = trial_plan(length, trials, seed=seed, digits=digits)
        need = max(template_length(tokenizer, key) for key, _, _ in plan)
        if length < need:
            raise ValueError(f"passkey length {length} is shorter than the prompt template without filler, "
                             f"which needs at least {need} tokens with this tokenizer and {digits}-digit keys")
        plans[length] = plan
    device = model_device(model)
    records = []
    for length in tqdm(lengths, desc=f"passkey {method}", disable=not progress):
        plan = plans[length]
        size = batch_size or auto_batch_size(length, trials)
        reset_peak_rss(device)
        start, correct, missed = time.perf_counter(), 0, []
        with tqdm(total=trials * length, desc=f"{length} tokens", unit="tok", unit_scale=True, leave=False,
                  disable=not progress) as bar:
            for first in range(0, trials, size):
                prompts = [passkey_prompt(tokenizer, length, key, depth, filler=filler, offset=offset)
                           for key, depth, offset in plan[first:first + size]]
                ids = torch.tensor([p for p, _ in prompts], dtype=torch.long, device=device)
                new = max(len(tokenizer.encode(a, bos=False)) for _, a in prompts) + extra_tokens
                rows = ids.shape[0]
                out = greedy_generate(model, ids, new, chunk_size=chunk_size, exact=exact, kv_dir=kv_dir,
                                      on_chunk=lambda s, e: bar.update(rows * (e - s)))
                for trial, ((key, depth, offset), (_, a), row) in enumerate(zip(plan[first:], prompts, out), first):
                    text = tokenizer.decode(row.tolist())
                    if retrieved(a, text):
                        correct += 1
                    else:
                        missed.append({"trial": trial, "key": key, "depth": depth, "offset": offset,
                                       "generated": text})
                del ids, out
        seconds = time.perf_counter() - start
        record = {"method": method, "length": int(length), "trials": trials, "accuracy": correct / trials,
                  "seconds_per_trial": seconds / trials, "peak_rss_mb": peak_rss_mb(),
                  "filler": "repeated" if filler is None else filler.name, "missed": missed}
        if device.type == "cuda":
            record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        records.append(record)
    return records
