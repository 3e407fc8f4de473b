"""The main job (python -m msattn.demo) end to end on a tiny GGUF model written by the test: the same
code path as the real model (GGUF -> cached HF directory -> a short fine-tune with pass keys -> passkey
on real-text filler and perplexity, dense and MS)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msattn import demo
from msattn.eval.loading import fast_dtype

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gguf import tiny_llama, write_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_on_a_gguf_model(tmp_path):
    """Fine-tune (2 steps, half of them pass keys), then dense vs MS on the fine-tuned weights; a second
    run reuses the fine-tune; --steps 0 evaluates the base model as is."""
    model = write_gguf(tmp_path / "tiny.gguf", tiny_llama())
    sentences = " ".join(f"Sentence {i} is here, and then it ends." for i in range(300))
    (tmp_path / "book.txt").write_text(sentences)
    env = dict(os.environ, MSATTN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    book = str(tmp_path / "book.txt")
    cmd = [sys.executable, "-m", "msattn.demo", "--model", str(model), "--steps", "2", "--train-len", "256",
           "--train-text", book, "--lengths", "300,600", "--trials", "2", "--filler", book, "--text", book,
           "--tokens", "600", "--chunk-size", "256", "--dtype", "float32", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "finetune" / "msattn.json").read_text())
    assert meta["training"] == {"seq_len": 256, "max_steps": 2, "passkey_share": 0.75, "text": [book]}
    assert meta["base_model"]["model"] == str(model) and meta["ms_config"]["rope"] == "selected"
    records = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["length"]) for r in records] == [("dense", 300), ("dense", 600), ("ms", 300), ("ms", 600)]
    assert all(r["passkey_trials"] == 2 and r["passkey_filler"] == "book.txt" and 0 <= r["passkey_accuracy"] <= 1
               and r["perplexity"] > 1 for r in records)
    # at 300 tokens (< topk * block_k) MS attention is exactly dense: the same perplexity
    assert abs(records[0]["perplexity"] - records[2]["perplexity"]) < 1e-3 * records[0]["perplexity"]
    assert (out / "compare.png").stat().st_size > 0 and "passkey" in proc.stdout

    again = subprocess.run(cmd[:cmd.index("--lengths")] + ["--lengths", "300", "--trials", "1", "--methods", "ms"]
                           + cmd[cmd.index("--filler"):], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=env)
    assert again.returncode == 0, again.stderr
    assert f"reusing the fine-tune in {out / 'finetune'}" in again.stdout
    rerun = json.loads((out / "compare.json").read_text())
    assert rerun[0]["perplexity"] == records[2]["perplexity"]  # the same weights

    base = subprocess.run(cmd[:cmd.index("--steps")] + ["--steps", "0"] + cmd[cmd.index("--train-len"):]
                          + ["--out", str(tmp_path / "base")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert base.returncode == 0, base.stderr
    assert not (tmp_path / "base" / "finetune").exists()
    untrained = json.loads((tmp_path / "base" / "compare.json").read_text())
    assert untrained[0]["perplexity"] != records[0]["perplexity"]  # the fine-tune changed the weights


def test_demo_defaults_are_the_eval_and_finetune_clis():
    # every default is an argument python -m msattn.eval (and msattn finetune) accepts, and given
    # arguments come last (they win)
    from msattn.cli import build_parser as finetune_parser
    from msattn.eval.__main__ import build_parser

    args = build_parser().parse_args(demo.DEFAULTS + ["--model", "x", "--trials", "7"])
    assert args.task == "compare" and args.trials == 7 and args.score_channels == "slow"
    assert args.methods == ["dense", "ms"] and args.rope == "selected"
    assert args.chunk_size % (args.merge * args.block_q) == 0
    parser = finetune_parser("finetune")
    parsed = parser.parse_args_into_dataclasses(
        demo.FINETUNE[1:] + demo.precision_args()
        + ["--model", "smollm2-135m", "--max_steps", "3", "--seq_len", "2048", "--output_dir", "x"])
    named = {type(x).__name__: x for x in parsed}
    attn, data, training = named["AttentionArguments"], named["DataArguments"], named["TrainingArguments"]
    assert (attn.block_q, attn.merge, attn.topk, attn.local, attn.rope) == (16, 16, 64, 2, "selected")
    assert data.passkey_share == 0.75 and training.max_steps == 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert training.bf16 == (fast_dtype(device) == torch.bfloat16)  # bf16 autocast where it is the faster dtype


def test_demo_precision_follows_the_cpu(monkeypatch):
    from msattn.eval import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, flag in ((True, "true"), (False, "false")):
        monkeypatch.setattr(loading, "_cpu_has_amx", lambda amx=amx: amx)
        assert demo.precision_args() == ["--bf16", flag]


@pytest.mark.parametrize("flag, value, message", [("--steps", "-1", "--steps must be >= 0, got -1"),
                                                  ("--train-len", "0", "--train-len must be >= 1, got 0")])
def test_demo_bad_arguments(tmp_path, flag, value, message):
    proc = subprocess.run([sys.executable, "-m", "msattn.demo", flag, value, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"python -m msattn.demo: error: {message}" in proc.stderr
    assert not (tmp_path / "finetune").exists()
