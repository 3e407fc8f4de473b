"""The main job (python -m msattn.demo) end to end on a tiny GGUF model written by the test: the same
code path as the real model (GGUF -> cached HF directory -> passkey on real-text filler, dense and MS)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msattn import demo

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gguf import tiny_llama, write_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_on_a_gguf_model(tmp_path):
    model = write_gguf(tmp_path / "tiny.gguf", tiny_llama())
    sentences = " ".join(f"Sentence {i} is here, and then it ends." for i in range(300))
    (tmp_path / "book.txt").write_text(sentences)
    env = dict(os.environ, MSATTN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "msattn.demo", "--model", str(model), "--lengths", "300,600", "--trials", "2",
           "--filler", str(tmp_path / "book.txt"), "--text", str(tmp_path / "book.txt"), "--tokens", "600",
           "--chunk-size", "256", "--dtype", "float32", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["length"]) for r in records] == [("dense", 300), ("dense", 600), ("ms", 300), ("ms", 600)]
    assert all(r["passkey_trials"] == 2 and r["passkey_filler"] == "book.txt" and 0 <= r["passkey_accuracy"] <= 1
               and r["perplexity"] > 1 for r in records)
    # at 300 tokens (< topk * block_k) MS attention is exactly dense: the same perplexity
    assert abs(records[0]["perplexity"] - records[2]["perplexity"]) < 1e-3 * records[0]["perplexity"]
    assert (out / "compare.png").stat().st_size > 0 and "passkey" in proc.stdout


def test_demo_defaults_are_the_eval_cli():
    # every default is an argument python -m msattn.eval accepts, and given arguments come last (they win)
    from msattn.eval.__main__ import build_parser

    args = build_parser().parse_args(demo.DEFAULTS + ["--trials", "7"])
    assert args.task == "compare" and args.model == "smollm2-135m" and args.trials == 7
    assert args.methods == ["dense", "ms"] and args.rope == "selected"
    assert args.chunk_size % (args.merge * args.block_q) == 0
