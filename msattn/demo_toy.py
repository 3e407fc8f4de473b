"""The toy demo: a tiny Llama trained on short sequences retrieves a passkey from far longer ones.

``python -m msattn.demo_toy`` (``make demo-toy``) needs nothing downloaded. It trains a tiny Llama from
scratch on synthetic passkey prompts of ``--train-len`` tokens, with the same data and steps for
every method; ``--hard-keys`` of the training keys repeat digits on purpose (:func:`training_key`).
The first ``--short-steps`` are on prompts short enough for MS attention to be exactly
dense, where the copy is learned first: this first stage is trained once (:func:`train_first_stage`)
and both the MS model and the dense baseline continue from it on prompts up to ``--train-len``, each
with its own attention, side by side:

- ``ms``: MS attention with RoPE on selected tokens only (``MSConfig(rope="selected")``): every
  distance it ever sees is bounded by ``topk * block_k + merge * block_q``, whatever the length; of
  its ``--topk`` regions, ``--local`` are always the ones just before each group, so no token loses
  its nearest context at a group boundary; its loss adds :class:`SelectionLoss`, which teaches the
  answer's queries to select the key's regions (selection itself passes no gradient);
- ``dense``: PyTorch SDPA with ordinary RoPE, the baseline;
- ``infini`` (only when asked, ``--methods ms,dense,infini``): Infini-attention with segments of
  ``--segment-len`` tokens, trained on the same data, every step with its own attention (which is not
  dense on the first stage's prompts) through :func:`msattn.hf.infini.train_by_segments`; its recipe
  (``--infini-*``): the memory holds un-rotated keys (``InfiniConfig.unrotated_memory``), the gates
  start at 0 (half memory), and a share of the long batches puts a segment boundary between the
  question and its answer. It needs longer training than the others (``--steps 4000 --short-steps
  2800``: its first stage teaches retrieval from one segment of memory) and still fails where a
  boundary splits the question from the answer (benchmarks/RESULTS.md).

Then it evaluates passkey retrieval (``msattn.eval.passkey``) at lengths from 1x to ``--max-len``
(default 64x the training length; the MS model's answer tokens are predicted exactly as a forward over
the whole sequence predicts them, ``--decode exact``, see ``greedy_generate``), prints the table, writes
``passkey.json`` (a list of ``{method, length, trials, accuracy, ...}``), ``passkey.md`` and
``passkey.png`` into ``--out`` and saves both
models there (``ms/``, ``dense/``, ``infini/``: HF model directories with ``msattn.json``, loadable by
``python -m msattn.eval --model DIR``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import math
import multiprocessing
import os
import random
import time

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .config import InfiniConfig, MSConfig
from .eval import report
from .eval.loading import Settings, load, prepare, save_checkpoint
from .eval.passkey import PasskeyTokenizer, random_key, passkey_prompt, run_passkey, template_length
from .hf.infini import train_by_segments

DIGITS = 5             # evaluation keys, the standard passkey
MAX_TRAIN_DIGITS = 7   # training keys have 5..7 digits


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m msattn.demo_toy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="directory for models, table, JSON and plot")
    ap.add_argument("--train-len", type=int, default=256, help="training sequence length (tokens)")
    ap.add_argument("--max-len", type=int, default=None, help="longest evaluated length (default 64x train-len)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per model")
    ap.add_argument("--short-steps", type=int, default=1400,
                    help="the first steps train on sequences short enough for MS attention to be exactly dense (96 "
                         "tokens for the default MS parameters: msattn.demo_toy.short_length), once for both models "
                         "(msattn.demo_toy.train_first_stage)")
    ap.add_argument("--select-weight", type=float, default=0.1,
                    help="weight of the MS model's selection loss (msattn.demo_toy.SelectionLoss; 0: none)")
    ap.add_argument("--hard-keys", type=float, default=0.5,
                    help="share of training keys drawn from 2-3 distinct digits (msattn.demo_toy.training_key)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--trials", type=int, default=20, help="passkey trials per length")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the models already in --out")
    ap.add_argument("--methods", default="ms,dense", help="which models to train and evaluate, among ms, dense, infini")
    ap.add_argument("--block-q", type=int, default=16)
    ap.add_argument("--block-k", type=int, default=16)
    ap.add_argument("--merge", type=int, default=2)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--local", type=int, default=2,
                    help="of the topk regions, how many are always the ones just before the group (MSConfig.local): "
                         "without it a token at the start of a group sees only the regions ranking picks")
    ap.add_argument("--segment-len", type=int, default=64, help="Infini-attention segment length (tokens)")
    ap.add_argument("--infini-gate-init", type=float, default=0.0,
                    help="Infini-attention's initial gate logit (InfiniConfig.gate_init; 0: half memory, half local)")
    ap.add_argument("--infini-delta-rule", action="store_true", help="Infini-attention writes with the delta rule")
    ap.add_argument("--infini-rotated-memory", action="store_true",
                    help="Infini-attention's memory holds rotated keys (InfiniConfig.unrotated_memory=False)")
    ap.add_argument("--infini-boundary", type=float, default=0.5,
                    help="share of Infini-attention's long training batches whose answer straddles a segment "
                         "boundary (msattn.demo_toy.batch)")
    ap.add_argument("--infini-horizon", type=int, default=None,
                    help="train Infini-attention this many segments at a time (msattn.hf.infini.train_by_segments; "
                         "default: the whole sequence in one window)")
    ap.add_argument("--heads", type=int, default=4, help="query heads (KV heads: half); head dim = hidden / heads")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tied-embeddings", action="store_true",
                    help="tie the output layer to the input embeddings (the default before; see build_model)")
    ap.add_argument("--chunk-size", type=int, default=16384, help="prefill chunk (tokens) at evaluation")
    ap.add_argument("--decode", choices=["exact", "cached"], default="exact",
                    help="how the MS model's answers are generated (msattn.eval.passkey.greedy_generate): exact "
                         "(default), each token as a forward over the whole sequence predicts it, the way the model "
                         "was trained; or cached, single-query decode steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for the evaluation (0: torch's default); training uses one per model")
    return ap.parse_args(argv)


def build_model(tokenizer: PasskeyTokenizer, args) -> LlamaForCausalLM:
    """A tiny Llama (GQA: --heads query heads, half as many KV heads) for the passkey vocabulary.

    The output layer is its own matrix unless ``--tied-embeddings``: with tied embeddings the current
    token's own direction pushes the model to repeat it, the copy's most frequent slip, and the copy is
    learned on 1 seed of 4; untied, on 4 of 4 (docs/notebook.md)."""
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                         vocab_size=tokenizer.vocab_size,
                         max_position_embeddings=args.train_len, tie_word_embeddings=args.tied_embeddings,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def digit_runs(ids: list[int], is_digit) -> list[range]:
    """The positions of each run of digit tokens in ``ids`` (in a passkey prompt: the key's occurrences)."""
    runs, i = [], 0
    while i < len(ids):
        if is_digit(ids[i]):
            j = i
            while j < len(ids) and is_digit(ids[j]):
                j += 1
            runs.append(range(i, j))
            i = j
        else:
            i += 1
    return runs


def copy_weights(ids: list[int], answer: list[int]) -> list[float]:
    """Loss weights of a training sequence ``ids + answer`` (one per next-token target): 1 on the answer
    (and the "." that ends it), 0 elsewhere. The filler is trivially predictable and the key's first
    occurrence is random; its second occurrence repeats the first at a fixed distance, and training on
    that positional copy slows the content-based copy that retrieval needs (after 1000 dense steps,
    seeds 2 and 4 answer 0.68 and 0.57 of 80-token prompts with it, 0.93 and 0.97 without it:
    docs/notebook.md)."""
    weights = [0.0] * (len(ids) + len(answer))
    for t in range(len(ids), len(ids) + len(answer)):
        weights[t - 1] = 1.0
    return weights


def digit_ids(tokenizer: PasskeyTokenizer) -> set[int]:
    """The ids of the ten digit tokens."""
    return set(tokenizer.encode("0123456789", bos=False))


def shortest_training_length(tokenizer: PasskeyTokenizer) -> int:
    """Tokens of a training sequence without filler: the prompt, the longest key, its answer and "."."""
    return template_length(tokenizer, "9" * MAX_TRAIN_DIGITS) + MAX_TRAIN_DIGITS + 1


def training_key(rng: random.Random, digits: int, hard: float) -> str:
    """A training key of ``digits`` digits: with probability ``hard`` drawn from two or three distinct
    digits (repeated digits and repeated pairs, where the digit before is not enough to tell which
    comes next), else uniform like the evaluation's keys. The MS model's last misses were such slips
    (87113 -> 87111); with half the keys hard, seeds 0 and 2 answer 140 / 140 and 137 / 140 prompts
    from 1x to 64x instead of 139 and 119 (docs/notebook.md). ``hard=0`` draws nothing more than
    the evaluation's key (``msattn.eval.passkey.sample``), so recipes from before it reproduce."""
    if hard and rng.random() < hard:
        pool = rng.sample("0123456789", rng.randint(2, 3))
        return "".join(rng.choice(pool) for _ in range(digits))
    return str(random_key(rng, digits))


def batch(tokenizer: PasskeyTokenizer, rng: random.Random, max_len: int, size: int, hard: float = 0.0,
          boundary: tuple[int, float] | None = None):
    """``size`` training sequences, all of one length drawn for the batch: half the batches short (up
    to twice the prompt template), half up to ``max_len``. Each is a passkey prompt followed by its
    answer and the "." that ends it; keys have ``DIGITS`` to ``MAX_TRAIN_DIGITS`` digits and come from
    :func:`training_key` (a share ``hard`` of them repeating digits on purpose). ``boundary = (segment,
    share)``: a share of the batches instead ends 8 tokens or less past a multiple of ``segment`` (or 3
    before it), so that a segment boundary falls in the question's end or the answer (Infini-attention:
    the answer's digits then see the question only through the memory, the case that evaluation prompts
    of a multiple of the segment length always pose). Returns ``(inputs, targets, weights)``, ``(size,
    n)`` each."""
    lo = shortest_training_length(tokenizer)
    mid = min(2 * lo, max_len)
    n = rng.randint(lo, mid) if rng.random() < 0.5 else rng.randint(mid, max_len)
    if boundary is not None and rng.random() < boundary[1]:
        segment = boundary[0]
        ends = [m * segment + u for m in range(1, max_len // segment + 2) for u in range(-3, 8)
                if lo <= m * segment + u <= max_len]
        n = rng.choice(ends) if ends else n
    end = tokenizer.encode(".", bos=False)  # the answer ends like the key sentence's key
    inputs, weights = [], []
    for _ in range(size):
        digits = rng.randint(DIGITS, MAX_TRAIN_DIGITS)
        ids, text = passkey_prompt(tokenizer, n - digits - len(end), training_key(rng, digits, hard), rng.random())
        answer = tokenizer.encode(text, bos=False)
        inputs.append(ids + answer + end)
        weights.append(copy_weights(ids, answer + end))
    x = torch.tensor(inputs)
    return x, torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1), torch.tensor(weights)


def short_length(config: MSConfig) -> int:
    """The longest sequence on which MS attention with ``config`` is exactly dense: every group has at
    most ``topk`` candidate regions (DESIGN section 1, step 5), i.e. the last group starts at most
    ``topk * block_k`` tokens in (96 tokens for the demo's defaults)."""
    return (config.topk * config.block_k // config.span + 1) * config.span


class SelectionLoss:
    """A loss that teaches the MS model's queries to select the key (DESIGN section 1 has no gradient
    through selection: without this, the region means rank the key first only as far as training the
    attention happens to make them).

    For every query that predicts an answer digit (the question's last token and the answer's digits
    but the last) and every layer and KV head, the regions the op could select for that query's group
    (those lying entirely before the group) are scored as ``ms_select`` ranks them: the sum over the KV
    head's query heads of ``q . kbar_j``, ``kbar_j`` the mean un-rotated key of region ``j``
    (``rope="selected"``: the outputs of ``q_proj`` and ``k_proj``), but with the query itself rather
    than its region's mean (scores are linear in the query, so queries that each rank the key first
    make means that do). The loss is the cross-entropy of choosing a region holding a digit of the
    key (either occurrence) among them, averaged over queries, KV heads and layers. Queries whose group
    takes every candidate (at most ``topk``) or sees no key region among them are left out.

    Hooks on ``q_proj``/``k_proj`` keep their latest outputs; :meth:`remove` takes them off.
    """

    def __init__(self, model, config: MSConfig, digit_ids: set[int]):
        if config.rope != "selected":
            raise ValueError(f"SelectionLoss: selection scores un-rotated q and k only with rope='selected', "
                             f"got rope={config.rope!r}")
        mc = model.config
        self.heads, self.kv_heads = mc.num_attention_heads, mc.num_key_value_heads
        self.head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.config, self.digit_ids = config, digit_ids
        self.outputs, self.handles = {}, []
        for i, layer in enumerate(model.model.layers):
            for name in ("q_proj", "k_proj"):
                hook = (lambda m, a, out, key=(name, i): self.outputs.__setitem__(key, out))
                self.handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))
        self.layers = len(model.model.layers)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles, self.outputs = [], {}

    def targets(self, x: torch.Tensor):
        """For the batch ``x`` ``(B, n)``: ``(rows, cols, candidates, key)``, the scored queries' batch
        rows and positions, and boolean ``(I, n // block_k)`` masks of their candidate regions and of
        the candidates holding a key digit; None when no query qualifies."""
        cfg, (B, n) = self.config, x.shape
        regions = n // cfg.block_k
        rows, cols, ends = [], [], []
        key_regions = torch.zeros(B, regions, dtype=torch.bool)
        for b, ids in enumerate(x.tolist()):
            runs = digit_runs(ids, self.digit_ids.__contains__)
            if len(runs) < 3:
                continue
            held = [j for j in {p // cfg.block_k for run in runs[:2] for p in run} if j < regions]
            key_regions[b, held] = True
            answer = runs[-1]
            for t in range(answer.start - 1, answer.stop - 1):
                end = (t // cfg.span) * cfg.span // cfg.block_k  # candidates: regions [0, end)
                if end > cfg.topk and held and min(held) < end:
                    rows.append(b)
                    cols.append(t)
                    ends.append(end)
        if not rows:
            return None
        rows = torch.tensor(rows)
        cand = torch.arange(regions) < torch.tensor(ends)[:, None]
        return rows, torch.tensor(cols), cand, cand & key_regions[rows]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The loss for the forward just run on ``x`` ``(B, n)``, or None where no query qualifies."""
        found = self.targets(x)
        if found is None:
            return None
        rows, cols, cand, key = found
        (B, n), ck = x.shape, self.config.block_k
        regions, group = cand.shape[1], self.heads // self.kv_heads
        total = 0.0
        for i in range(self.layers):
            q = self.outputs[("q_proj", i)].view(B, n, self.kv_heads, group, self.head_dim).sum(3)[rows, cols]
            k = self.outputs[("k_proj", i)][:, :regions * ck].view(B, regions, ck, self.kv_heads, self.head_dim)
            scores = torch.einsum("ihd,irhd->ihr", q.float(), k.float().mean(2)[rows])  # (I, Hkv, regions)
            scores = scores.masked_fill(~cand[:, None], float("-inf"))
            picked = scores.masked_fill(~key[:, None], float("-inf"))
            total = total + (scores.logsumexp(-1) - picked.logsumexp(-1)).mean()
        return total / self.layers


FIRST_STAGE_THREADS = 2  # the shared first stage's threads, whatever the cores: see train_first_stage
SHARES_FIRST_STAGE = ("ms", "dense")  # methods whose attention is exactly dense on the first stage's sequences


class Training:
    """One model's run of the demo's recipe: AdamW with warm-up and cosine decay over ``--steps``, and the
    seeded data stream (:func:`batch`); the same stream for every method.

    The first ``--short-steps`` batches are at most :func:`short_length` tokens (or ``--train-len``, if
    shorter), where MS attention is exactly dense: the copy is learned there first. :meth:`run` trains
    up to a given step and can stop after the first stage; :meth:`state_dict` and
    :meth:`load_state_dict` carry the model, optimizer, schedule and data stream to another process."""

    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.rng = random.Random(args.seed)
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        warmup, steps = max(1, args.steps // 40), args.steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        self.losses: list[float] = []  # the copy loss of each step so far

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": self.rng.getstate(), "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.rng.setstate(state["rng"])
        self.losses = list(state["losses"])

    def run(self, stop: int, name: str, position: int = 0, config: MSConfig | InfiniConfig | None = None) -> None:
        """Train from the current step up to step ``stop``. Given the MS ``config``, the loss adds
        ``--select-weight`` times :class:`SelectionLoss` (which never applies in the first stage). Given
        an ``InfiniConfig``, the long batches straddle a segment boundary in a share ``--infini-boundary``
        (:func:`batch`) and each step runs :func:`msattn.hf.infini.train_by_segments` with
        ``--infini-horizon``."""
        args, model = self.args, self.model
        short = min(short_length(method_settings(args).ms), args.train_len)
        infini = config if isinstance(config, InfiniConfig) else None
        select = (SelectionLoss(model, config, digit_ids(self.tokenizer))
                  if isinstance(config, MSConfig) and args.select_weight else None)
        boundary = None if infini is None or not args.infini_boundary else (infini.segment_len, args.infini_boundary)
        model.train()
        try:
            with tqdm(range(len(self.losses), stop), desc=f"train {name}", position=position) as bar:
                for step in bar:
                    first = step < args.short_steps
                    x, y, w = batch(self.tokenizer, self.rng, short if first else args.train_len, args.batch_size,
                                    args.hard_keys, None if first else boundary)
                    self.opt.zero_grad()
                    if infini is not None:  # the copy weights as transformers' labels: -100 where unweighted
                        scored = torch.cat([torch.zeros_like(w[:, :1]), w[:, :-1]], 1) > 0
                        labels = x.masked_fill(~scored, -100)
                        loss = train_by_segments(model, x, labels, horizon=args.infini_horizon)
                    else:
                        logits = model(x).logits
                        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                                reduction="none")
                        loss = (nll * w.flatten()).sum() / w.sum()
                        total = loss
                        if select is not None and (extra := select(x)) is not None:
                            total = loss + args.select_weight * extra
                        total.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    self.opt.step()
                    self.sched.step()
                    self.losses.append(loss.item())
                    bar.set_postfix(copy_nll=f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.3f}")
        finally:
            if select is not None:
                select.remove()
        model.eval()


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _new_model(args):
    torch.manual_seed(args.seed)
    tokenizer = PasskeyTokenizer()
    return build_model(tokenizer, args), tokenizer


def train_first_stage(args, position: int = 0) -> bytes:
    """The first ``--short-steps`` of the recipe, trained once for every method in
    ``SHARES_FIRST_STAGE``: on these sequences MS attention is exactly dense attention (every group takes
    all its candidates, and compact positions are absolute positions; tests/test_demo.py checks the
    logits), so the MS model and the dense baseline would train the same model twice. Trained with
    dense attention (SDPA) on ``FIRST_STAGE_THREADS`` threads; returns the :class:`Training` state
    (``torch.save`` bytes, for :func:`train_model` in this or another process) with its seconds.

    The thread count is fixed, not the machine's: how many threads share a matrix product changes its
    rounding, and this tiny model's training amplifies rounding into a different model (seed 0 on two
    threads instead of one once retrieved 0.15 at 256 tokens and nothing beyond, on one thread 0.65 to
    0.50 up to 16K: docs/notebook.md). With fixed counts a seed gives the same model on any number
    of cores (of the same instruction set)."""
    if not 0 <= args.short_steps <= args.steps:
        raise ValueError(f"train_first_stage: short_steps must lie in [0, steps = {args.steps}], got {args.short_steps}")
    with _threads(FIRST_STAGE_THREADS):
        model, tokenizer = _new_model(args)
        prepare(model, "dense", method_settings(args))
        run = Training(model, tokenizer, args)
        t0 = time.perf_counter()
        run.run(args.short_steps, "first stage (shared)", position)
        state = {"training": run.state_dict(), "seconds": time.perf_counter() - t0}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def train_model(method: str, args, position: int = 0, first_stage: bytes | None = None):
    """One method's model, trained from scratch (seeded by ``--seed``). Methods in
    ``SHARES_FIRST_STAGE`` start from ``first_stage`` (:func:`train_first_stage`'s state; trained here
    when None) and train the remaining steps with their own attention; others (``infini``) train every
    step with theirs. The remaining steps run on one thread (see :func:`train_first_stage`). Returns
    ``(model, tokenizer, settings, timings)``, the model in eval mode."""
    settings = method_settings(args)
    first_seconds = 0.0
    with _threads(1):
        model, tokenizer = _new_model(args)
        prepare(model, method, settings)  # before the optimizer: Infini-attention adds its gates
        run = Training(model, tokenizer, args)
        if method in SHARES_FIRST_STAGE:
            if first_stage is None:
                first_stage = train_first_stage(args, position)
            state = torch.load(io.BytesIO(first_stage), weights_only=False)
            run.load_state_dict(state["training"])
            first_seconds = state["seconds"]
        t0 = time.perf_counter()
        run.run(args.steps, method, position, config=settings.config(method))
    losses = run.losses
    timings = {"first_stage_seconds": first_seconds, "train_seconds": time.perf_counter() - t0,
               "final_copy_nll": sum(losses[-20:]) / len(losses[-20:])}
    return model, tokenizer, settings, timings


def train_and_save(method: str, args, position: int = 0, first_stage: bytes | None = None) -> dict:
    """Train one method's model (:func:`train_model`) and save it to ``--out/method``; returns its timings."""
    model, tokenizer, settings, timings = train_model(method, args, position, first_stage)
    save_checkpoint(model, tokenizer, os.path.join(args.out, method), method=method, settings=settings)
    return timings


def method_settings(args) -> Settings:
    """Every method's parameters: MS with RoPE on selected tokens, Infini with ``--segment-len`` and the
    ``--infini-*`` options."""
    ms = MSConfig(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk, local=args.local,
                  rope="selected")
    infini = InfiniConfig(segment_len=args.segment_len, delta_rule=args.infini_delta_rule,
                          gate_init=args.infini_gate_init, unrotated_memory=not args.infini_rotated_memory)
    return Settings(ms=ms, infini=infini)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("ms", "dense", "infini"):
            raise SystemExit(f"msattn.demo_toy: unknown method {m!r}; the demo trains 'ms', 'dense' and 'infini'")
    tokenizer = PasskeyTokenizer()
    shortest = shortest_training_length(tokenizer)
    if args.train_len < shortest:
        raise SystemExit(f"msattn.demo_toy: --train-len must be at least {shortest} tokens (the passkey prompt without "
                         f"filler, a {MAX_TRAIN_DIGITS}-digit key and its answer), got {args.train_len}")
    if not 0 <= args.short_steps <= args.steps:
        raise SystemExit(f"msattn.demo_toy: --short-steps must lie in [0, --steps = {args.steps}], got {args.short_steps}")
    if not 0 <= args.hard_keys <= 1:
        raise SystemExit(f"msattn.demo_toy: --hard-keys is a share of the training keys, in [0, 1], got {args.hard_keys}")
    if not args.select_weight >= 0:
        raise SystemExit(f"msattn.demo_toy: --select-weight must be >= 0, got {args.select_weight}")
    if not 0 <= args.infini_boundary <= 1:
        raise SystemExit(f"msattn.demo_toy: --infini-boundary is a share of the batches, in [0, 1], got "
                         f"{args.infini_boundary}")
    if args.infini_horizon is not None and args.infini_horizon < 1:
        raise SystemExit(f"msattn.demo_toy: --infini-horizon must be a positive number of segments, got "
                         f"{args.infini_horizon}")
    try:
        settings = method_settings(args)
    except ValueError as e:
        raise SystemExit(f"msattn.demo_toy: {e}") from None
    if args.short_steps and short_length(settings.ms) < shortest:
        raise SystemExit(f"msattn.demo_toy: --short-steps trains on sequences where MS attention is dense, at most "
                         f"{short_length(settings.ms)} tokens with these MS parameters, shorter than a training "
                         f"sequence ({shortest} tokens); give --short-steps 0 or a larger --topk")
    max_len = args.max_len or 64 * args.train_len
    lengths = []
    n = args.train_len
    while n <= max_len:
        lengths.append(n)
        n *= 2
    if lengths[-1] != max_len:
        lengths.append(max_len)
    os.makedirs(args.out, exist_ok=True)
    cfg = settings.ms
    if args.chunk_size % cfg.span:
        raise SystemExit(f"msattn.demo_toy: --chunk-size must be a multiple of merge * block_q = {cfg.span}")
    print(f"msattn demo: train at {args.train_len} tokens, evaluate {lengths[0]}..{lengths[-1]} "
          f"({lengths[-1] // args.train_len}x), {args.trials} trials per length; MS {cfg}")
    timings = {}
    if not args.eval_only:
        # the first stage once (train_first_stage), then each model's own steps on one thread: side by
        # side, one per core, where there are cores
        first = train_first_stage(args) if any(m in SHARES_FIRST_STAGE for m in methods) else None
        cores = os.cpu_count() or 1
        if len(methods) > 1 and cores >= len(methods):
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(len(methods), mp_context=ctx) as pool:
                jobs = {m: pool.submit(train_and_save, m, args, i, first) for i, m in enumerate(methods)}
                timings = {m: job.result() for m, job in jobs.items()}
        else:
            timings = {m: train_and_save(m, args, 0, first) for m in methods}
    records = []
    for method in methods:
        model, _ = load(model=os.path.join(args.out, method))
        prepare(model, method, settings)
        records += run_passkey(model, tokenizer, lengths, args.trials, method=method, seed=args.seed + 1,
                               digits=DIGITS, chunk_size=args.chunk_size, exact=args.decode == "exact")
    print(report.format_report(records))
    report.write_report(records, args.out, "passkey")
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"args": vars(args), "ms_config": cfg.__dict__, "training": timings}, f, indent=1, default=list)
    print(f"wrote {args.out}/passkey.json, passkey.md, passkey.png and the models in "
          f"{args.out}/{{{','.join(methods)}}}")


if __name__ == "__main__":
    main()
