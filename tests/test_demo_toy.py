"""The demo (python -m msattn.demo_toy) end to end at a toy size: training, checkpoints, report files."""

import importlib.util
import io
import json
import os
import random

import pytest
import torch

from msattn import MSConfig
from msattn import demo_toy as demo
from msattn.eval import PasskeyTokenizer, load, prepare
from msattn.eval.passkey import passkey_prompt
from msattn.eval.loading import read_checkpoint_meta, settings_from_meta


def test_demo_trains_saves_and_reports_every_method(tmp_path):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--steps", "3", "--short-steps", "1", "--batch-size", "2", "--hidden", "32",
               "--heads", "4", "--train-len", "128", "--max-len", "256", "--trials", "2",
               "--methods", "ms,dense,infini", "--segment-len", "32", "--threads", "1"])
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
            assert settings.infini.segment_len == 32 and settings.infini.unrotated_memory
            prepare(model, "infini", settings)
            gates = [layer.self_attn.infini_gate.beta for layer in model.model.layers]
            assert all(not torch.equal(g, torch.full_like(g, settings.infini.gate_init)) for g in gates)  # trained
        assert torch.isfinite(prepare(model, method, settings)(x).logits).all()


def test_infini_recipe_lowers_the_copy_loss():
    """A few steps of the Infini-attention recipe (train_by_segments over 32-token segments, the boundary
    batches) lower the answer's loss from where the untrained model starts."""
    args = demo.parse_args(["--steps", "40", "--short-steps", "10", "--batch-size", "8", "--hidden", "32",
                            "--heads", "4", "--layers", "1", "--train-len", "128", "--segment-len", "32",
                            "--infini-horizon", "2", "--lr", "1e-2"])
    with demo._threads(1):
        model, tok = demo._new_model(args)
        settings = demo.method_settings(args)
        prepare(model, "infini", settings)
        run = demo.Training(model, tok, args)
        run.run(args.steps, "infini", config=settings.infini)
    first, last = sum(run.losses[:5]) / 5, sum(run.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_training_batches_straddle_a_segment_boundary_when_asked():
    tok = PasskeyTokenizer()
    rng = random.Random(0)
    lengths = [demo.batch(tok, rng, 256, 1, boundary=(64, 1.0))[0].shape[1] for _ in range(40)]
    assert all(-3 <= n - round(n / 64) * 64 < 8 for n in lengths) and len(set(lengths)) > 5
    rng = random.Random(0)
    plain = [demo.batch(tok, rng, 256, 1)[0].shape[1] for _ in range(40)]
    assert sum(-3 <= n - round(n / 64) * 64 < 8 for n in plain) < 20


def test_demo_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'flash'"):
        demo.main(["--out", str(tmp_path), "--methods", "ms,flash"])
    with pytest.raises(SystemExit, match="--train-len must be at least"):
        demo.main(["--out", str(tmp_path), "--train-len", "40"])
    with pytest.raises(SystemExit, match="--short-steps must lie in \\[0, --steps = 10\\], got 11"):
        demo.main(["--out", str(tmp_path), "--steps", "10", "--short-steps", "11"])
    with pytest.raises(SystemExit, match="--hard-keys is a share of the training keys, in \\[0, 1\\], got 1.5"):
        demo.main(["--out", str(tmp_path), "--hard-keys", "1.5"])
    with pytest.raises(SystemExit, match="--infini-boundary is a share of the batches, in \\[0, 1\\], got -1"):
        demo.main(["--out", str(tmp_path), "--infini-boundary", "-1"])
    with pytest.raises(SystemExit, match="--infini-horizon must be a positive number of segments, got 0"):
        demo.main(["--out", str(tmp_path), "--infini-horizon", "0"])
    with pytest.raises(SystemExit, match="MSConfig.local must be an int in \\[0, topk = 4\\], got 5"):
        demo.main(["--out", str(tmp_path), "--local", "5"])
    with pytest.raises(ValueError, match="short_steps must lie in \\[0, steps = 3\\], got 1400"):
        demo.train_first_stage(demo.parse_args(["--steps", "3"]))  # the API checks what main checks
    with pytest.raises(SystemExit, match="--select-weight must be >= 0, got -0.1"):
        demo.main(["--out", str(tmp_path), "--select-weight", "-0.1"])
    with pytest.raises(SystemExit, match="dense, at most 64 tokens .* shorter than a training sequence"):
        demo.main(["--out", str(tmp_path), "--topk", "2"])
    with pytest.raises(SystemExit, match="--chunk-size must be a multiple of merge \\* block_q = 32"):
        demo.main(["--out", str(tmp_path), "--chunk-size", "100"])


def test_demo_selection_diagnostic(tmp_path):
    # benchmarks/demo_selection.py on a toy demo model whose groups take every candidate (topk 16 at
    # 128 tokens): every layer and head must hold the whole key, whatever the weights
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--steps", "2", "--short-steps", "1", "--batch-size", "2", "--hidden", "32",
               "--train-len", "128", "--max-len", "128", "--trials", "1", "--methods", "ms", "--topk", "16",
               "--threads", "1"])
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
        demo.main(["--out", str(dense), "--steps", "1", "--short-steps", "0", "--batch-size", "2", "--hidden", "32",
                   "--train-len", "128", "--max-len", "128", "--trials", "1", "--methods", "dense", "--threads", "1"])
        script.main(["--model", str(dense / "dense")])


def test_demo_model_has_its_own_output_layer_unless_tied():
    tokenizer = PasskeyTokenizer()
    untied = demo.build_model(tokenizer, demo.parse_args(["--hidden", "32"]))
    tied = demo.build_model(tokenizer, demo.parse_args(["--hidden", "32", "--tied-embeddings"]))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert not untied.config.tie_word_embeddings and tied.config.tie_word_embeddings


def _same(a: dict, b: dict) -> bool:
    """Whether two state dicts hold bit-identical tensors."""
    return all(torch.equal(a[k], b[k]) for k in a)


def test_demo_training_is_the_same_whatever_the_callers_threads():
    # train_model trains the first stage on demo.FIRST_STAGE_THREADS threads and the rest on one, and
    # gives the caller's count back: how many threads share a product changes its rounding, which
    # training amplifies into another model
    args = demo.parse_args(["--steps", "3", "--short-steps", "2", "--batch-size", "8"])
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
    assert _same(states[0], states[1])


def test_the_first_stage_is_dense_attention_for_both_models_and_is_shared():
    # MS attention is exactly dense on the first stage's sequences (short_length tokens), so one first
    # stage serves the MS model and the dense baseline; each continues from the same state
    args = demo.parse_args(["--steps", "4", "--short-steps", "2", "--batch-size", "4", "--hidden", "32"])
    first = demo.train_first_stage(args)
    state = torch.load(io.BytesIO(first), weights_only=False)["training"]
    assert len(state["losses"]) == 2
    model, tokenizer = demo._new_model(args)
    model.load_state_dict(state["model"])
    model.eval()
    x, *_ = demo.batch(tokenizer, random.Random(3), demo.short_length(demo.method_settings(args).ms), 4)
    logits = {}
    for method in ("dense", "ms"):
        prepare(model, method, demo.method_settings(args))
        with torch.no_grad():
            logits[method] = model(x).logits
    torch.testing.assert_close(logits["ms"], logits["dense"], rtol=1e-5, atol=1e-5)

    def params(method, short_steps=2, shared=None):
        a = demo.parse_args(["--steps", "4", "--short-steps", str(short_steps), "--batch-size", "4", "--hidden", "32"])
        trained, *_, timings = demo.train_model(method, a, first_stage=shared)
        return trained.state_dict(), timings

    (ms, ms_time), (dense, _) = params("ms", shared=first), params("dense", shared=first)
    assert ms_time["first_stage_seconds"] > 0 and ms_time["train_seconds"] > 0
    assert _same(ms, params("ms")[0])  # the shared first stage is the one each would train alone
    assert not _same(ms, dense)  # their own steps differ
    assert _same(params("ms", short_steps=4)[0], params("dense", short_steps=4)[0])  # no own steps: one model


@pytest.mark.parametrize("hard", [0.0, 1.0])
def test_training_batches_weigh_the_answer_and_its_end_only(hard):
    tokenizer = PasskeyTokenizer()
    digits = demo.digit_ids(tokenizer).__contains__
    dot = tokenizer.encode(".", bos=False)
    x, y, w = demo.batch(tokenizer, random.Random(0), 200, 6, hard)
    assert x.shape == y.shape == w.shape
    for row in range(x.shape[0]):
        ids = x[row].tolist()
        key, second, answer = demo.digit_runs(ids, digits)  # the key twice, then the answer
        assert ids[answer.start:answer.stop] == ids[key.start:key.stop] == ids[second.start:second.stop]
        assert ids[answer.stop:] == dot and demo.DIGITS <= len(key) <= demo.MAX_TRAIN_DIGITS
        if hard:
            assert len(set(ids[key.start:key.stop])) <= 3
        assert torch.equal(y[row, :-1], x[row, 1:])
        weighted = w[row].nonzero().flatten().tolist()  # the targets: the answer's digits and its "."
        assert weighted == list(range(answer.start - 1, len(ids) - 1))


def test_training_keys():
    rng = random.Random(0)
    easy = [demo.training_key(rng, 5, 0.0) for _ in range(200)]
    hard = [demo.training_key(rng, 7, 1.0) for _ in range(200)]
    half = [demo.training_key(rng, 6, 0.5) for _ in range(400)]
    assert all(len(k) == 5 and k[0] != "0" for k in easy) and len({len(set(k)) for k in easy}) > 2
    assert all(len(k) == 7 and len(set(k)) <= 3 for k in hard) and sum(len(set(k)) >= 2 for k in hard) > 180
    assert all(len(k) == 6 for k in half)
    assert 120 < sum(len(set(k)) <= 3 for k in half) < 280  # about half, plus the few uniform keys with <= 3


def _tiny_ms_model(args):
    torch.manual_seed(0)
    tokenizer = PasskeyTokenizer()
    model = demo.build_model(tokenizer, args)
    prepare(model, "ms", demo.method_settings(args))
    return model, tokenizer


def test_selection_loss_scores_the_key_regions_as_ms_select_ranks_them():
    args = demo.parse_args(["--hidden", "32", "--heads", "4"])
    model, tokenizer = _tiny_ms_model(args)
    cfg = demo.method_settings(args).ms
    digit_ids = demo.digit_ids(tokenizer)
    prompts = [passkey_prompt(tokenizer, 250, 31415, 0.3), passkey_prompt(tokenizer, 250, 27182, 0.8)]
    x = torch.tensor([ids + tokenizer.encode(key + ".", bos=False) for ids, key in prompts])
    loss = demo.SelectionLoss(model, cfg, digit_ids)
    model(x)
    rows, cols, cand, key = loss.targets(x)
    value = loss(x)
    # the scored queries: those predicting the answer's digits (its first from the question's last token)
    assert rows.tolist() == [0] * 5 + [1] * 5 and cols.tolist() == [249, 250, 251, 252, 253] * 2
    for i, (b, t) in enumerate(zip(rows.tolist(), cols.tolist())):
        before = t // 32 * 32 // 16
        assert cand[i].tolist() == [j < before for j in range(cand.shape[1])]
        ids = x[b].tolist()
        digits = [p for p in range(len(ids)) if ids[p] in digit_ids and p < 250]  # both key occurrences
        assert key[i].tolist() == [j < before and any(p // 16 == j for p in digits) for j in range(cand.shape[1])]
    # the value, from the captured projections by plain loops
    expect = []
    outputs = loss.outputs
    for i in range(len(model.model.layers)):
        q, k = outputs[("q_proj", i)].view(2, -1, 4, 8), outputs[("k_proj", i)].view(2, -1, 2, 8)
        for r in range(len(rows)):
            b, t = int(rows[r]), int(cols[r])
            for h in range(2):
                qs = q[b, t, 2 * h] + q[b, t, 2 * h + 1]
                scores = torch.stack([qs @ k[b, 16 * j:16 * j + 16, h].mean(0) for j in range(cand.shape[1])])
                scores = scores.masked_fill(~cand[r], float("-inf"))
                expect.append(scores.logsumexp(0) - scores.masked_fill(~key[r], float("-inf")).logsumexp(0))
    assert torch.allclose(value, torch.stack(expect).mean(), rtol=1e-5)
    value.backward()
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    assert attn.v_proj.weight.grad is None
    loss.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_selection_loss_skips_what_ms_select_takes_whole_and_needs_rope_on_selected():
    args = demo.parse_args(["--hidden", "32", "--heads", "4"])
    model, tokenizer = _tiny_ms_model(args)
    digit_ids = demo.digit_ids(tokenizer)
    loss = demo.SelectionLoss(model, demo.method_settings(args).ms, digit_ids)
    ids, key = passkey_prompt(tokenizer, 90, 31415, 0.5)  # 96 tokens with the answer: dense
    x = torch.tensor([ids + tokenizer.encode(key + ".", bos=False)])
    model(x)
    assert loss.targets(x) is None and loss(x) is None
    with pytest.raises(ValueError, match="rope='selected'"):
        demo.SelectionLoss(model, MSConfig(), digit_ids)


def test_short_length_is_the_longest_on_which_every_group_takes_all_its_candidates():
    for block_q, block_k, merge, topk in ((16, 16, 2, 4), (16, 16, 2, 3), (8, 16, 4, 5), (16, 8, 1, 7), (4, 4, 2, 1)):
        cfg = MSConfig(block_q=block_q, block_k=block_k, merge=merge, topk=topk, rope="selected")

        def dense(n):  # the last group's candidates: the key regions wholly before its start
            return (n - 1) // cfg.span * cfg.span // block_k <= topk

        n = demo.short_length(cfg)
        assert all(dense(m) for m in range(1, n + 1)) and not dense(n + 1), (cfg, n)
    assert demo.short_length(demo.method_settings(demo.parse_args([])).ms) == 96


def test_demo_training_starts_short_and_adds_the_selection_loss_to_ms_only(monkeypatch):
    flags = ["--steps", "4", "--short-steps", "2", "--batch-size", "4", "--hidden", "32"]
    lengths = []
    original = demo.batch

    def recording(tokenizer, rng, max_len, size, hard, boundary=None):
        lengths.append(max_len)
        assert hard == 0.5  # --hard-keys
        assert boundary is None  # the segment-boundary batches are Infini-attention's only
        return original(tokenizer, rng, max_len, size, hard)

    monkeypatch.setattr(demo, "batch", recording)
    states = {}
    for method, weight in (("ms", "0.1"), ("ms", "0"), ("dense", "0.1"), ("dense", "0")):
        model, *_ = demo.train_model(method, demo.parse_args([*flags, "--select-weight", weight]))
        states[method, weight] = model.state_dict()
    assert lengths == [96, 96, 256, 256] * 4  # short_length, then --train-len
    assert not _same(states["ms", "0.1"], states["ms", "0"])
    assert _same(states["dense", "0.1"], states["dense", "0"])
