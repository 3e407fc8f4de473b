"""``msattn losscurve``: the loss curve that the selection budget controls.

The same tiny model is pretrained (``msattn.workflow.train.pretrain``: same data, seed, steps and
Trainer settings) once per budget, each a set of attention fields over the config's own
(``dense``, ``topk=4``, ``block_k=64,topk=1``...), and scored on held-out text
(``msattn.eval.perplexity`` on ``persuasion.txt`` by default, in ``seq_len`` windows). Written to
``output_dir``: ``losscurve.png`` (training loss against step, one curve per budget; final held-out
loss against keys attended per query), ``losscurve.md`` (final training and held-out loss, seconds and
peak RSS per step) and ``losscurve.json``; each budget's model in its own subdirectory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from tqdm.auto import tqdm

from ..eval.loading import peak_rss_mb, reset_peak_rss
from ..eval.passkey import HELD_OUT, austen_dir
from ..eval.perplexity import run_perplexity
from ..eval.report import markdown_table
from ..config import ConfigError
from .arguments import AttentionArguments
from .data import make_tokenizer
from .train import pretrain

__all__ = ["parse_budget", "keys_per_query", "losscurve", "format_losscurve", "plot_losscurve"]


def parse_budget(text: str, base: AttentionArguments) -> tuple[str, AttentionArguments]:
    """``"dense"`` or ``"key=value,..."`` of AttentionArguments fields (over ``base``, method ``ms``);
    returns ``(name, fields)``, the name a directory name."""
    text = text.strip()
    if text == "dense":
        return "dense", dataclasses.replace(base, attention="dense")
    types = {f.name: f.type for f in dataclasses.fields(AttentionArguments)}
    values = {"attention": "ms"}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key == "attention":
            raise ConfigError(f"budgets: {text!r}: expected 'dense' or 'key=value,...' of the attention fields "
                              f"({', '.join(k for k in types if k != 'attention')}), got {item!r}")
        try:
            values[key] = int(value) if "int" in str(types[key]) else value.strip()
        except ValueError:
            raise ConfigError(f"budgets: {text!r}: {key} must be an int, got {value!r}") from None
    return text.replace("=", "").replace(",", "_"), dataclasses.replace(base, **values)


def keys_per_query(method: str, ms, seq_len: int) -> float:
    """Keys each query attends, averaged over the positions of a ``seq_len`` sequence: ``(n + 1) / 2``
    for dense attention; for MS attention the group's own tokens up to the query plus ``topk`` whole
    key regions before the group (fewer where fewer exist)."""
    if method == "dense":
        return (seq_len + 1) / 2
    total = 0
    for i in range(seq_len):
        group = i // ms.span * ms.span
        total += i - group + 1 + min(ms.topk, group // ms.block_k) * ms.block_k
    return total / seq_len


def losscurve(lc, arch, attn, data, training) -> list[dict]:
    """Pretrain once per budget of ``lc.budgets``; returns one record per budget."""
    budgets = [parse_budget(b, attn) for b in lc.budgets]
    names = [name for name, _ in budgets]
    if len(set(names)) != len(names):
        raise ConfigError(f"budgets: each must differ, got {lc.budgets}")
    eval_text = lc.eval_text
    if eval_text is None:
        try:
            eval_text = os.path.join(austen_dir(), HELD_OUT)
        except FileNotFoundError as e:
            raise ConfigError(f"eval_text: none given and {e}") from None
    if not os.path.isfile(eval_text):
        raise ConfigError(f"eval_text: {eval_text}: no such file")
    if training.max_steps > 0 and training.logging_steps > training.max_steps:
        raise ConfigError(f"logging_steps: {training.logging_steps} logs no training loss in max_steps = "
                          f"{training.max_steps} steps; the curves need logging_steps <= max_steps")
    out = training.output_dir
    records = []
    for name, budget in tqdm(budgets, desc="budgets"):
        run = dataclasses.replace(training, output_dir=os.path.join(out, name), save_strategy="no")
        reset_peak_rss()
        trainer = pretrain(arch, budget, data, run)
        peak = peak_rss_mb()
        history = trainer.state.log_history
        curve = [(h["step"], h["loss"]) for h in history if "loss" in h]
        runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
        method, settings = budget.method(None), budget.settings(None)
        held = run_perplexity(trainer.model.eval(), make_tokenizer(arch.tokenizer), eval_text, [data.seq_len],
                              method=method, tokens=lc.eval_tokens, chunk_size=None)[0]
        records.append({
            "budget": name, "method": method,
            "ms_config": dataclasses.asdict(settings.ms) if method == "ms" else None,
            "keys_per_query": keys_per_query(method, settings.ms, data.seq_len),
            "steps": trainer.state.global_step, "train_curve": curve,
            "final_train_loss": sum(loss for _, loss in curve[-5:]) / len(curve[-5:]),
            "held_out_loss": math.log(held["perplexity"]), "held_out_windows": held["windows"],
            "seconds_per_step": runtime / max(1, trainer.state.global_step), "peak_rss_mb": peak,
        })
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "losscurve.json"), "w") as f:
        json.dump(records, f, indent=1)
    table = format_losscurve(records)
    with open(os.path.join(out, "losscurve.md"), "w") as f:
        f.write(table + "\n")
    plot_losscurve(records, os.path.join(out, "losscurve.png"))
    print(table)
    print(f"wrote {out}/losscurve.png, losscurve.md, losscurve.json")
    return records


def format_losscurve(records) -> str:
    """The table: one row per budget, in the order given."""
    rows = [["budget", "keys/query", "final train loss", "held-out loss", "s/step", "peak RSS MB"]]
    rows += [[r["budget"], f"{r['keys_per_query']:.1f}", f"{r['final_train_loss']:.4f}", f"{r['held_out_loss']:.4f}",
              f"{r['seconds_per_step']:.3f}", f"{r['peak_rss_mb']:.0f}"] for r in records]
    return markdown_table(rows, left=1)


def plot_losscurve(records, path) -> None:
    """Two panels: training loss against step per budget (from the first quarter of the run on); held-out
    loss against keys attended per query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, final) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for r in records:
            steps, losses = zip(*r["train_curve"]) if r["train_curve"] else ((), ())
            curves.plot(steps, losses, label=r["budget"], lw=1.2, ls="--" if r["method"] == "dense" else "-")
        late = [loss for r in records for step, loss in r["train_curve"] if step >= r["steps"] / 4]
        if late:  # the first quarter's fall off the top: the budgets differ by a few percent late on
            curves.set_ylim(min(late) - 0.02 * (max(late) - min(late)), max(late))
        curves.set_xlabel("step")
        curves.set_ylabel("training loss")
        curves.set_title("training loss by selection budget")
        curves.legend(fontsize=8)
        ms = [r for r in records if r["method"] != "dense"]
        by_block = {}
        for r in ms:
            by_block.setdefault(r["ms_config"]["block_k"], []).append(r)
        for block_k, rs in sorted(by_block.items()):
            rs = sorted(rs, key=lambda r: r["keys_per_query"])
            final.plot([r["keys_per_query"] for r in rs], [r["held_out_loss"] for r in rs], "o-",
                       label=f"MS, key regions of {block_k}")
        for r in records:
            if r["method"] == "dense":
                final.plot([r["keys_per_query"]], [r["held_out_loss"]], "k*", ms=10, label="dense")
        final.set_xscale("log", base=2)
        final.set_xlabel("keys attended per query (mean)")
        final.set_ylabel("held-out loss (nats/token)")
        final.set_title("final held-out loss")
        final.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
    finally:
        plt.close(fig)
