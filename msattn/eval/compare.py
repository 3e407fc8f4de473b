"""The method comparison: every method on the same model, lengths, prompts and text.

``run_compare`` prepares the model for each method in turn (``loading.prepare``) and runs the passkey
test (the same keys and depths for every method) and, given a text, the perplexity test at every
length. It returns one record per (method, length)::

    {"method", "length", "passkey_accuracy", "passkey_trials", "passkey_seconds_per_trial",
     "perplexity", "perplexity_windows", "perplexity_seconds", "peak_rss_mb"}

(a field is None when its test was not run; ``peak_rss_mb`` is the larger of the two tests' peaks).
``format_compare`` renders them as one Markdown table, ``plot_compare`` as a PNG with one panel per
metric, one line per method.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .loading import Settings, prepare
from .passkey import run_passkey
from .perplexity import run_perplexity
from .report import format_cell, format_length, markdown_table, plot_methods, write_json

__all__ = ["run_compare", "format_compare", "plot_compare", "write_compare"]

_COLUMNS = (("passkey_accuracy", "passkey"), ("perplexity", "perplexity"),
            ("passkey_seconds_per_trial", "s / passkey trial"), ("perplexity_seconds", "s / perplexity"),
            ("peak_rss_mb", "peak RSS MiB"))


def run_compare(model, tokenizer, methods: Sequence[str], lengths: Sequence[int], *, settings: Settings | None = None,
                trials: int = 10, text: str | None = None, windows: int = 1, tokens: int | None = None,
                digits: int = 5, seed: int = 0,
                chunk_size: int | None = 16384, batch_size: int | None = None, exact: bool = False,
                filler=None, progress: bool = True) -> list[dict]:
    """Passkey accuracy (``trials`` > 0) and perplexity on ``text`` (a path; None: skipped) of each method.

    Args:
        model: the model, loaded by ``loading.load``; it is patched and unpatched in place.
        methods: names from ``loading.method_names()``.
        lengths: prompt and window lengths in tokens.
        settings: every method's parameters (default ``Settings()``).
        windows, tokens: perplexity windows per length, or the same first ``tokens`` tokens of the text
            at every length (``perplexity.run_perplexity``).
        exact: passkey answers of MS models predicted exactly as a full forward would
            (``passkey.greedy_generate``).
        filler: the passkey filler (``passkey.TextFiller``), or None for the repeated sentences.
    Returns:
        one record per (method, length), methods in the given order, lengths ascending.
    """
    if trials < 0:
        raise ValueError(f"run_compare: trials must be >= 0, got {trials}")
    if trials == 0 and text is None:
        raise ValueError("run_compare: nothing to compare: give passkey trials > 0 or a text for perplexity")
    records = []
    common = dict(chunk_size=chunk_size, batch_size=batch_size, progress=progress)
    for method in methods:
        model = prepare(model, method, settings)
        rows = {n: {"method": method, "length": int(n), "passkey_accuracy": None, "passkey_trials": None,
                    "passkey_seconds_per_trial": None, "perplexity": None, "perplexity_windows": None,
                    "perplexity_seconds": None, "peak_rss_mb": None} for n in sorted(set(lengths))}
        if trials:
            for r in run_passkey(model, tokenizer, sorted(rows), trials, method=method, seed=seed, digits=digits,
                                 exact=exact, filler=filler, **common):
                rows[r["length"]].update(passkey_accuracy=r["accuracy"], passkey_trials=r["trials"],
                                         passkey_filler=r["filler"],
                                         passkey_seconds_per_trial=r["seconds_per_trial"],
                                         peak_rss_mb=r["peak_rss_mb"])
        if text is not None:
            for r in run_perplexity(model, tokenizer, text, sorted(rows), method=method, windows=windows,
                                    tokens=tokens, **common):
                row = rows[r["length"]]
                row.update(perplexity=r["perplexity"], perplexity_windows=r["windows"],
                           perplexity_seconds=r["seconds"],
                           peak_rss_mb=max(row["peak_rss_mb"] or 0.0, r["peak_rss_mb"]))
        records += rows.values()
    return records


def _shown(records: Sequence[dict]) -> list[tuple[str, str]]:
    return [(key, title) for key, title in _COLUMNS if any(r.get(key) is not None for r in records)]


def format_compare(records: Sequence[dict]) -> str:
    """One Markdown table: a row per (method, length), a column per measured quantity, fixed width."""
    columns = _shown(records)
    rows = [["method", "length"] + [title for _, title in columns]]
    rows += [[r["method"], format_length(r["length"])] + [format_cell(r.get(key)) for key, _ in columns] for r in records]
    return markdown_table(rows, left=1) + "\n"


def plot_compare(records: Sequence[dict], path) -> None:
    """PNG: one panel per measured quantity against length (log2 axis), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _shown(records)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8), squeeze=False)
    try:
        for ax, (key, title) in zip(axes[0], columns):
            plot_methods(ax, records, key)
            ax.set_title(title)
            if key == "passkey_accuracy":
                ax.set_ylim(-0.05, 1.05)
            elif key != "perplexity":
                ax.set_yscale("log")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=110)
    finally:
        plt.close(fig)


def write_compare(records: Sequence[dict], directory) -> dict[str, str]:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` into ``directory``; returns the paths."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {kind: os.path.join(directory, f"compare.{kind}") for kind in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write("## method comparison\n\n" + format_compare(records))
    write_json(records, paths["json"])
    plot_compare(records, paths["png"])
    return paths
