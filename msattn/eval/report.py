"""Reports of evaluation records: Markdown tables (fixed width, rows = lengths, columns = methods), JSON,
and a PNG plot of the metric against length on a log2 axis, one line per method.

A record is a flat dict with at least ``"method"`` and ``"length"`` (``run_passkey`` and
``run_perplexity`` produce them); the metric is ``"accuracy"`` or ``"perplexity"``, whichever the records
hold.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

__all__ = ["format_cell", "format_length", "metric_of", "markdown_table", "format_table", "plot_methods", "format_report",
           "write_json", "plot", "write_report"]

_TITLES = {"accuracy": "passkey accuracy", "perplexity": "perplexity", "seconds_per_trial": "seconds per trial",
           "seconds": "seconds", "peak_rss_mb": "peak RSS (MiB)", "peak_cuda_mb": "peak CUDA memory (MiB)"}


def format_length(n: int) -> str:
    """4096 -> "4K", 1048576 -> "1M", 1000 -> "1000"."""
    for unit, size in (("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def metric_of(records: Sequence[dict]) -> str:
    for name in ("accuracy", "perplexity"):
        if any(name in r for r in records):
            return name
    raise ValueError("report: the records hold neither 'accuracy' nor 'perplexity'")


def format_cell(value) -> str:
    """A table cell: ``-`` for None, else the value formatted for the report tables."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value or math.isinf(value):
            return str(value)
        return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: Sequence[Sequence[str]], left: int = 0) -> str:
    """Rows of cells (the first the header) as a Markdown table padded to fixed width, so it reads as
    plain text too: the first ``left`` columns aligned left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) if i < left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])


def format_table(records: Sequence[dict], value: str | None = None) -> str:
    """A Markdown table of one field: one row per length, one column per method (in first-seen order)."""
    value = value or metric_of(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    lengths = sorted({r["length"] for r in records})
    cells = {(r["length"], r["method"]): format_cell(r.get(value)) for r in records}
    return markdown_table([["length"] + methods] +
                          [[format_length(n)] + [cells.get((n, m), "-") for m in methods] for n in lengths])


def format_report(records: Sequence[dict]) -> str:
    """The metric's table followed by the cost tables (time, memory), each under a heading."""
    metric = metric_of(records)
    fields = [metric] + [f for f in ("seconds_per_trial", "seconds", "peak_rss_mb", "peak_cuda_mb")
                         if any(f in r for r in records)]
    return "\n\n".join(f"## {_TITLES.get(f, f)}\n\n{format_table(records, f)}" for f in fields) + "\n"


def write_json(records: Sequence[dict], path) -> None:
    with open(os.fspath(path), "w") as f:
        json.dump(list(records), f, indent=2)
        f.write("\n")


def plot_methods(ax, records: Sequence[dict], value: str) -> None:
    """On a matplotlib axis: ``value`` against length (log2 axis, one tick per length), one line per
    method in first-seen order, and a light grid."""
    for method in dict.fromkeys(r["method"] for r in records):
        points = sorted((r["length"], r[value]) for r in records if r["method"] == method and r.get(value) is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    lengths = sorted({r["length"] for r in records})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("length (tokens)")
    ax.grid(True, alpha=0.3)


def plot(records: Sequence[dict], path, value: str | None = None, title: str | None = None) -> None:
    """PNG of ``value`` (default the metric) against length (log2 axis), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value = value or metric_of(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        plot_methods(ax, records, value)
        ax.set_ylabel(_TITLES.get(value, value))
        if value == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(title or _TITLES.get(value, value))
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
    finally:
        plt.close(fig)


def write_report(records: Sequence[dict], directory, name: str) -> dict[str, str]:
    """Write ``name.md``, ``name.json`` and ``name.png`` into ``directory`` (created if needed); returns
    the paths by kind."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {kind: os.path.join(directory, f"{name}.{kind}") for kind in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(format_report(records))
    write_json(records, paths["json"])
    plot(records, paths["png"])
    return paths
