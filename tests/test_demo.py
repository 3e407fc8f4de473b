"""The demo (python -m msattn.demo) end to end at a toy size: training, checkpoints, report files."""

import importlib.util
import json
import os

import pytest
import torch

from msattn import demo
from msattn.eval import PasskeyTokenizer, load, prepare
from msattn.eval.loading import read_checkpoint_meta, settings_from_meta


def test_demo_trains_saves_and_reports_every_method(tmp_path):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--steps", "3", "--batch-size", "2", "--hidden", "32", "--heads", "4",
               "--train-len", "128", "--max-len", "256", "--trials", "2", "--methods", "ms,dense,infini",
               "--segment-len", "32", "--threads", "1"])
    records = json.loads((out / "passkey.json").read_text())
    assert sorted((r["method"], r["length"]) for r in records) == sorted(
        (m, n) for m in ("ms", "dense", "infini") for n in (128, 256))
    for r in records:
        assert r["trials"] == 2 and 0 <= r["accuracy"] <= 1
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "## passkey accuracy" in (out / "passkey.md").read_text()
    train = json.loads((out / "train.json").read_text())
    assert set(train["training"]) == {"ms", "dense", "infini"}
    # each checkpoint reloads as the method it was trained with
    x = torch.randint(3, PasskeyTokenizer().vocab_size, (1, 64))
    for method in ("ms", "infini"):
        meta = read_checkpoint_meta(out / method)
        assert meta["method"] == method
        settings = settings_from_meta(meta)
        model, tok = load(model=out / method)
        assert isinstance(tok, PasskeyTokenizer)
        if method == "ms":
            assert settings.ms.rope == "selected" and settings.ms.block_q == 16
        else:
            assert settings.segment_len == 32
            prepare(model, "infini", settings)
            gates = [layer.self_attn.infini_gate.beta for layer in model.model.layers]
            assert all(not torch.equal(g, torch.full_like(g, -3.0)) for g in gates)  # trained, not the init
        assert torch.isfinite(prepare(model, method, settings)(x).logits).all()


def test_demo_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'flash'"):
        demo.main(["--out", str(tmp_path), "--methods", "ms,flash"])
    with pytest.raises(SystemExit, match="--train-len must be at least"):
        demo.main(["--out", str(tmp_path), "--train-len", "40"])
    with pytest.raises(SystemExit, match="--chunk-size must be a multiple of merge \\* block_q = 32"):
        demo.main(["--out", str(tmp_path), "--chunk-size", "100"])


def test_demo_selection_diagnostic(tmp_path):
    # benchmarks/demo_selection.py on a toy demo model whose groups take every candidate (topk 16 at
    # 128 tokens): every layer and head must hold the whole key, whatever the weights
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--steps", "2", "--batch-size", "2", "--hidden", "32", "--train-len", "128",
               "--max-len", "128", "--trials", "1", "--methods", "ms", "--topk", "16", "--threads", "1"])
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "demo_selection.py")
    spec = importlib.util.spec_from_file_location("demo_selection", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows, forced, accuracy = script.main(["--model", str(out / "ms"), "--lengths", "100,128", "--trials", "3"])
    assert [r[:4] for r in rows[1:]] == [[n, fed, layer, h] for n in ("100", "128") for fed in "1234"
                                         for layer in "01" for h in "01"]
    assert all(r[4] == "1.00" and r[5] == "1.00" for r in rows[1:])
    assert all((r[6] != "") == (r[1] == "1") for r in rows[1:])  # the rank: for the first digit's group
    assert [f[:2] for f in forced[1:]] == [[n, fed] for n in ("100", "128") for fed in "1234"]
    assert [a[0] for a in accuracy[1:]] == ["100", "128"]
    with pytest.raises(SystemExit, match="rope='selected'"):
        dense = tmp_path / "dense"
        demo.main(["--out", str(dense), "--steps", "1", "--batch-size", "2", "--hidden", "32", "--train-len", "128",
                   "--max-len", "128", "--trials", "1", "--methods", "dense", "--threads", "1"])
        script.main(["--model", str(dense / "dense")])


def test_demo_model_has_its_own_output_layer_unless_tied():
    tokenizer = PasskeyTokenizer()
    untied = demo.build_model(tokenizer, demo.parse_args(["--hidden", "32"]))
    tied = demo.build_model(tokenizer, demo.parse_args(["--hidden", "32", "--tied-embeddings"]))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert not untied.config.tie_word_embeddings and tied.config.tie_word_embeddings


def test_demo_training_is_the_same_whatever_the_callers_threads():
    # train_model trains on one thread and gives the caller's count back: how many threads share a
    # product changes its rounding, which training amplifies into another model
    args = demo.parse_args(["--steps", "3", "--batch-size", "8"])
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            model, *_ = demo.train_model("ms", args)
            assert torch.get_num_threads() == threads
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
