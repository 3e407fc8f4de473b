"""msattn.eval: the passkey prompt and tokenizer, the greedy decode and NLL paths, reports, the CLI end to end."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import msattn
import msattn.hf
from msattn.eval import PasskeyTokenizer, passkey_prompt, save_checkpoint
from msattn.eval.__main__ import main, parse_lengths
from msattn.eval.loading import Settings
from msattn.eval.passkey import (FILLER, INSTRUCTION, KEY_SENTENCE, QUESTION, TextFiller, greedy_generate,
                                 retrieved, template_length, trial_plan)
from msattn.eval.perplexity import window_nll
from msattn.eval.report import format_table

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
STORIES = DATA / "stories260K"
HAVE_STORIES = (STORIES / "stories260K.bin").is_file() and (STORIES / "tok512.bin").is_file()
SPARSE = msattn.MSConfig(block_q=8, block_k=8, merge=4, topk=4)  # span 32: sparse past 32 key regions


def tiny(vocab=PasskeyTokenizer().vocab_size):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def tokenizers():
    out = [pytest.param(PasskeyTokenizer(), id="passkey")]
    if HAVE_STORIES:
        from msattn.models.llama2c import Llama2cTokenizer

        out.append(pytest.param(Llama2cTokenizer(STORIES / "tok512.bin"), id="llama2c"))
    return out


def byte_tokenizer():
    """An HFTokenizer whose tokens are single bytes (a ByteLevel BPE without merges): any text encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.decoders import ByteLevel as ByteLevelDecoder
    from transformers import PreTrainedTokenizerFast

    from msattn.eval.loading import HFTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = ByteLevelDecoder()
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                               unk_token="<unk>"))


# ---------------------------------------------------------------------------------------------
# the prompt and the tokenizer


def test_text_filler_prompt(tmp_path):
    # real-text filler: exact length, a contiguous stretch of the text around the key sentence, which
    # sits at a sentence end near the asked depth; each offset starts somewhere else in the text
    tok = byte_tokenizer()
    sentences = [f"Sentence number {i} tells of {'ab' * (i % 7)} things." for i in range(400)]
    (tmp_path / "book.txt").write_text(" ".join(sentences))
    filler = TextFiller(tok, [tmp_path / "book.txt"])
    assert filler.name == "book.txt" and tok.decode(filler.ids) == " " + " ".join(sentences)
    head = tok.encode(INSTRUCTION)
    for depth, offset in ((0.0, 0.0), (0.37, 0.5), (1.0, 0.99)):
        ids, answer = passkey_prompt(tok, 3000, 31415, depth, filler=filler, offset=offset)
        assert len(ids) == 3000 and answer == "31415"
        text = tok.decode(ids)
        key = " " + KEY_SENTENCE.format(key=31415)
        before, after = text[len(INSTRUCTION):].split(key)
        assert after.endswith(" " + QUESTION)
        body = before + after[:-len(" " + QUESTION)]
        assert body in " ".join(sentences * 2)  # one stretch of the text, cut only where the key went in
        assert before == "" or before.endswith(".")  # the key follows a whole sentence
        budget = 3000 - len(head) - len(tok.encode(key, bos=False)) - len(tok.encode(" " + QUESTION, bos=False))
        assert abs(len(tok.encode(before, bos=False)) - depth * budget) <= TextFiller.SEARCH
    starts = {tok.decode(passkey_prompt(tok, 600, 1, 0.5, filler=filler, offset=o)[0])[len(INSTRUCTION):][:40]
              for o in (0.1, 0.4, 0.8)}
    assert len(starts) == 3
    with pytest.raises(ValueError, match="another tokenizer"):
        passkey_prompt(byte_tokenizer(), 600, 1, 0.5, filler=filler)
    with pytest.raises(FileNotFoundError, match="nowhere.txt: filler text file not found"):
        TextFiller(tok, [tmp_path / "nowhere.txt"])
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(ValueError, match="short.txt holds 11 tokens"):
        TextFiller(tok, [tmp_path / "short.txt"])

@pytest.mark.parametrize("tokenizer", tokenizers())
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("extra", [0, 1, 97, 700])
def test_prompt_has_exact_length_and_holds_the_key(tokenizer, depth, extra):
    key = random.randint(10000, 99999)
    n = template_length(tokenizer, key) + extra
    ids, answer = passkey_prompt(tokenizer, n, key, depth)
    assert len(ids) == n and answer == str(key)
    assert ids[0] == tokenizer.bos_id and ids[1:].count(tokenizer.bos_id) == 0
    head = tokenizer.encode(INSTRUCTION, bos=True)
    needle = tokenizer.encode(KEY_SENTENCE.format(key=key), bos=False)
    tail = tokenizer.encode(QUESTION, bos=False)
    assert ids[:len(head)] == head and ids[-len(tail):] == tail
    at = next(i for i in range(n) if ids[i:i + len(needle)] == needle)
    assert at - len(head) == round(depth * extra)  # filler before the key: depth of all filler
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in tokenizer.decode(ids)
    if extra >= 700:  # whole filler sentences on both sides of the key
        assert tokenizer.decode(ids).count(FILLER) >= 2


@pytest.mark.parametrize("tokenizer", tokenizers())
def test_prompt_shorter_than_the_template_is_an_error(tokenizer):
    need = template_length(tokenizer, 12345)
    with pytest.raises(ValueError, match=f"shorter than the prompt template.*at least {need} tokens"):
        passkey_prompt(tokenizer, need - 1, 12345, 0.5)
    with pytest.raises(ValueError, match="depth must lie in"):
        passkey_prompt(tokenizer, need, 12345, 1.5)


def test_passkey_tokenizer_round_trip():
    tok = PasskeyTokenizer()
    assert tok.vocab[:13] == ["<pad>", "<bos>", "<eos>"] + list("0123456789")
    text = " ".join([INSTRUCTION, FILLER, KEY_SENTENCE.format(key=907316), QUESTION, "0123"])
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode("907316", bos=False) == [3 + int(d) for d in "907316"]
    again = PasskeyTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.vocab == tok.vocab and again.encode(text) == ids
    framed = [tok.bos_id, *tok.encode("The pass key is 42.", bos=False), tok.eos_id, tok.pad_id]
    assert tok.decode(framed) == "The pass key is 42."
    with pytest.raises(ValueError, match="'purple' is not in the vocabulary"):
        tok.encode("The sky is purple.")
    with pytest.raises(ValueError, match="PasskeyTokenizer.from_dict"):
        PasskeyTokenizer.from_dict({"vocab": tok.vocab})


def test_sample_is_reproducible_and_answers_the_prompt():
    tok = PasskeyTokenizer()
    a = tok.sample(random.Random(7), 200, digits=6)
    b = tok.sample(random.Random(7), 200, digits=6)
    assert a == b
    ids, answer = a
    key = tok.decode(answer)
    assert len(ids) == 200 and len(answer) == 6 and key.isdigit() and key[0] != "0"
    assert f"The pass key is {key}." in tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# the decode and NLL paths against HF's own

@pytest.mark.parametrize("method", ["dense", "ms"])
def test_greedy_generate_equals_hf_generate(method):
    model = tiny()
    if method == "ms":
        msattn.hf.patch(model, SPARSE)
    ids = torch.randint(3, model.config.vocab_size, (2, 100))
    got = greedy_generate(model, ids, 7, chunk_size=32)  # 4 chunks, the last one partial
    model.generation_config.eos_token_id = None  # greedy_generate does not stop at EOS either
    want = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)[:, 100:]
    assert torch.equal(got, want)


def test_exact_greedy_generate_equals_a_full_forward_per_token():
    """exact=True predicts every token as one forward over the whole sequence so far does (the group
    selects with all its queries), which the cached single-query step need not."""
    torch.manual_seed(0)
    model = tiny(vocab=13)  # few tokens: sharp, repetitive attention, so selections differ
    msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=4, merge=4, topk=2))  # span 16
    ids = torch.randint(3, 13, (3, 90))
    got = greedy_generate(model, ids, 20, chunk_size=32, exact=True)  # crosses group boundaries at 96, 112
    sequence, want = ids, []
    with torch.no_grad():
        for _ in range(20):
            token = model(sequence).logits[:, -1].argmax(-1)
            want.append(token)
            sequence = torch.cat([sequence, token[:, None]], 1)
    assert torch.equal(got, torch.stack(want, 1))
    dense = tiny(vocab=13)
    assert torch.equal(greedy_generate(dense, ids, 5, exact=True), greedy_generate(dense, ids, 5))  # no-op


@pytest.mark.parametrize("method", ["dense", "ms"])
def test_chunked_nll_equals_the_loss_of_one_forward(method):
    model = tiny()
    if method == "ms":
        msattn.hf.patch(model, SPARSE)
    ids = torch.randint(3, model.config.vocab_size, (2, 90))
    nll, count = window_nll(model, ids, chunk_size=32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert count == 2 * 89
    assert nll / count == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# reports and arguments

def test_table_and_lengths():
    assert parse_lengths("1k,4K,300,1m") == [1024, 4096, 300, 2 ** 20]
    records = [{"method": m, "length": n, "accuracy": a} for m, n, a in
               [("dense", 1024, 1.0), ("ms", 1024, 0.5), ("dense", 4096, 0.25)]]
    lines = format_table(records).splitlines()
    assert lines[0].split("|")[1:-1] == [" length ", " dense ", "   ms "]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["1K", "1.00", "0.50"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["4K", "0.25", "-"]
    assert len({len(line) for line in lines}) == 1  # fixed width


# ---------------------------------------------------------------------------------------------
# the CLI

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A demo-style checkpoint directory: a tiny random Llama over the PasskeyTokenizer vocabulary."""
    path = tmp_path_factory.mktemp("demo")
    save_checkpoint(tiny(), PasskeyTokenizer(), path, method="ms", settings=Settings(ms=SPARSE))
    return path


def _check_outputs(out, task, metric, methods, lengths, count_field, count):
    records = json.loads((out / f"{task}.json").read_text())
    assert sorted((r["method"], r["length"]) for r in records) == sorted((m, n) for m in methods for n in lengths)
    for r in records:
        assert r[count_field] == count and r["peak_rss_mb"] > 0
        assert r[metric] >= 0 and (metric != "accuracy" or r[metric] <= 1)
    assert (out / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"## {'passkey accuracy' if metric == 'accuracy' else 'perplexity'}" in (out / f"{task}.md").read_text()
    return records


def test_cli_passkey_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "msattn.eval", "passkey", "--model", str(checkpoint), "--lengths", "256,512",
           "--trials", "2", "--methods", "dense,ms", "--chunk-size", "128", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = _check_outputs(out, "passkey", "accuracy", ["dense", "ms"], [256, 512], "trials", 2)
    assert all(r["seconds_per_trial"] > 0 for r in records)
    assert "| length | dense |" in proc.stdout


def test_cli_perplexity_end_to_end(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    out = tmp_path / "out"
    if HAVE_STORIES:
        story = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                 "One day, she saw a big red ball under a tree. She ran to get it, and her dog Max ran with her. ")
        text.write_text(story * 12)
        model = ["--llama2c", str(STORIES / "stories260K.bin"), "--tokenizer", str(STORIES / "tok512.bin")]
    else:
        text.write_text(" ".join([INSTRUCTION] + [FILLER] * 40))
        model = ["--model", str(checkpoint)]
    # merge 4 x block_q 16 = span 64; topk 64 x block_k 16 covers 1024 tokens: ms must equal dense
    argv = ["perplexity", *model, "--text", str(text), "--lengths", "128,256", "--windows", "2", "--methods",
            "dense,ms", "--block-q", "16", "--block-k", "16", "--merge", "4", "--topk", "64", "--chunk-size", "64",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    records = _check_outputs(out, "perplexity", "perplexity", ["dense", "ms"], [128, 256], "windows", 2)
    by = {(r["method"], r["length"]): r["perplexity"] for r in records}
    for n in (128, 256):
        assert by["ms", n] == pytest.approx(by["dense", n], rel=1e-4)
        if HAVE_STORIES:  # a trained model on a repetitive children's story
            assert by["dense", n] < 10
    assert "## perplexity" in capsys.readouterr().out


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_cli_bad_input(checkpoint, tmp_path, capsys):
    base = ["--model", str(checkpoint), "--out", str(tmp_path / "out"), "--quiet"]
    need = template_length(PasskeyTokenizer(), 12345)
    _fails(["passkey", *base, "--lengths", "4k,40", "--methods", "dense"], capsys,
           "passkey length 40 is shorter than the prompt template", f"at least {need} tokens")
    _fails(["passkey", *base, "--lengths", "256", "--methods", "dense,flash9"], capsys, "unknown method 'flash9'",
           "known methods: dense, ms")
    _fails(["passkey", *base, "--lengths", "2q"], capsys, "cannot read length '2q'")
    _fails(["passkey", *base, "--lengths", "256", "--chunk-size", "100"], capsys,
           "--chunk-size 100 is not a multiple of the MS group span merge * block_q = 4 * 8 = 32")
    missing = tmp_path / "nowhere"
    _fails(["passkey", "--model", str(missing), "--lengths", "256"], capsys, f"{missing}: model directory not found")
    _fails(["perplexity", *base, "--lengths", "256", "--text", str(missing / "a.txt")], capsys,
           f"{missing / 'a.txt'}: text file not found")
    short = tmp_path / "short.txt"
    short.write_text(FILLER)
    _fails(["perplexity", *base, "--lengths", "256", "--text", str(short)], capsys,
           f"the text has {len(PasskeyTokenizer().encode(FILLER, bos=False))} tokens, shorter than the length 256")
    _fails(["passkey", *base, "--lengths", "256", "--methods", "dense,ms", "--kv-dir", str(tmp_path)], capsys,
           "--kv-dir keeps MS attention's cache in files of an existing directory: it needs --methods ms and a "
           f"directory, got --methods dense,ms and {str(tmp_path)!r}")
    _fails(["passkey", *base, "--lengths", "256", "--methods", "ms", "--kv-dir", str(missing)], capsys,
           f"got --methods ms and {str(missing)!r}")
    assert not (tmp_path / "out").exists()


def test_cli_passkey_with_the_cache_in_files(checkpoint, tmp_path):
    """``--kv-dir``: the same answers as the cache in memory, and no file left behind."""
    kv = tmp_path / "kv"
    kv.mkdir()
    runs = {}
    for name, extra in (("memory", []), ("files", ["--kv-dir", str(kv)])):
        argv = ["passkey", "--model", str(checkpoint), "--lengths", "512", "--trials", "3", "--methods", "ms",
                "--chunk-size", "128", "--out", str(tmp_path / name), "--quiet", *extra]
        assert main(argv) == 0
        runs[name] = json.loads((tmp_path / name / "passkey.json").read_text())[0]
    assert runs["files"]["accuracy"] == runs["memory"]["accuracy"]
    assert runs["files"]["missed"] == runs["memory"]["missed"] and os.listdir(kv) == []


def test_parameter_dtype_auto_follows_the_hardware(tmp_path, monkeypatch):
    """``--dtype auto``: bfloat16 on CUDA and on CPUs with AMX (the kernel's ``amx_bf16`` flag), float32 on
    other CPUs; a bad name is an error naming the choices."""
    from msattn.eval import loading

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert loading._cpu_has_amx(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert not loading._cpu_has_amx(str(cpuinfo))
    assert not loading._cpu_has_amx(str(tmp_path / "missing"))
    for amx, cpu in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "_cpu_has_amx", lambda amx=amx: amx)
        assert loading.parse_dtype("auto") == loading.fast_dtype("cpu") == cpu
        assert loading.parse_dtype("auto", "cuda") == torch.bfloat16
        assert loading.parse_dtype("float32") == torch.float32 and loading.parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype: expected auto or one of float32, bfloat16, float16, got 'fp8'"):
        loading.parse_dtype("fp8")


def test_cli_dtype_auto(checkpoint, tmp_path, monkeypatch):
    """The eval CLI loads the model in the dtype ``auto`` picks."""
    from msattn.eval import loading

    seen = []
    real_load = loading.load

    def spy(*args, **kwargs):
        seen.append(kwargs["dtype"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr("msattn.eval.__main__.load", spy)
    for amx, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(loading, "_cpu_has_amx", lambda amx=amx: amx)
        argv = ["passkey", "--model", str(checkpoint), "--lengths", "256", "--trials", "1", "--methods", "dense",
                "--dtype", "auto", "--out", str(tmp_path / str(amx)), "--quiet"]
        assert main(argv) == 0 and seen[-1] == dtype


def test_hf_model_directory_with_its_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from msattn.eval import load, prepare, run_passkey

    words = PasskeyTokenizer().vocab + ["<unk>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
    tiny(len(words)).save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    model, tok = load(model=tmp_path)
    ids, answer = passkey_prompt(tok, 150, 31415, 0.5)
    assert len(ids) == 150 and ids[0] == 1 and tok.encode(answer, bos=False) == [3 + int(d) for d in answer]
    records = run_passkey(prepare(model, "ms", SPARSE), tok, [150], 2, method="ms", chunk_size=64, progress=False)
    assert records[0]["method"] == "ms" and records[0]["trials"] == 2 and 0 <= records[0]["accuracy"] <= 1
    # every prompt not retrieved is named, as trial_plan draws it, with what the model wrote
    plan = trial_plan(150, 2)
    missed = records[0]["missed"]
    assert len(missed) == round(2 * (1 - records[0]["accuracy"]))
    for m in missed:
        assert (m["key"], m["depth"], m["offset"]) == plan[m["trial"]] and not retrieved(str(m["key"]), m["generated"])
    with pytest.raises(ValueError, match="unknown method 'sparse'"):
        prepare(model, "sparse")


# ---------------------------------------------------------------------------------------------
# every method, and the comparison

def test_prepare_switches_between_all_methods():
    """prepare() moves one model through every method and back; each method changes what it should.

    With a window covering the sequence SelfExtend is the model itself; Infini with one segment and its
    gates shut is local attention, i.e. the model itself too."""
    from msattn.eval import prepare

    torch.manual_seed(0)
    model = tiny()
    x = torch.randint(3, PasskeyTokenizer().vocab_size, (2, 96))
    with torch.no_grad():
        reference = model(x).logits
        covering = Settings(ms=msattn.MSConfig(block_q=8, block_k=8, merge=4, topk=64),
                            self_extend=msattn.SelfExtendConfig(group_size=4, window=96),
                            infini=msattn.InfiniConfig(segment_len=96))
        for method in ("ms", "self_extend", "infini", "dense", "infini", "ms"):
            prepare(model, method, covering)
            if method == "infini":
                for layer in model.model.layers:
                    layer.self_attn.infini_gate.beta.fill_(-60.0)
            got = model(x).logits
            torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4, msg=method)
        short = Settings(self_extend=msattn.SelfExtendConfig(group_size=4, window=8),
                         infini=msattn.InfiniConfig(segment_len=32))
        for method in ("self_extend", "infini"):  # a short window / segments: no longer the model itself
            assert (prepare(model, method, short)(x).logits - reference).abs().max() > 1e-5, method
    assert prepare(model, "dense")(x).logits.allclose(reference, atol=1e-5)


def test_infini_checkpoint_keeps_its_trained_gates(tmp_path):
    from msattn.eval import load, prepare

    torch.manual_seed(0)
    model = tiny()
    settings = Settings(infini=msattn.InfiniConfig(segment_len=16, delta_rule=True))
    prepare(model, "infini", settings)
    layers = model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.self_attn.infini_gate.beta.copy_(torch.linspace(-1.0, 2.0, 4) + i)
    x = torch.randint(3, PasskeyTokenizer().vocab_size, (1, 70))
    with torch.no_grad():
        expected = model(x).logits
    save_checkpoint(model, PasskeyTokenizer(), tmp_path, method="infini", settings=settings)
    meta = json.loads((tmp_path / "msattn.json").read_text())
    assert meta["infini"]["segment_len"] == 16 and meta["infini"]["delta_rule"] is True
    loaded, _ = load(model=tmp_path)
    assert not any("infini_gate" in name for name, _ in loaded.named_parameters())  # plain HF weights
    assert not hasattr(loaded.config, "msattn")  # and a plain config
    from msattn.eval.loading import settings_from_meta

    restored = settings_from_meta(meta)
    assert (restored.infini.segment_len, restored.infini.delta_rule) == (16, True)
    with torch.no_grad():
        got = prepare(loaded, "infini", restored)(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the model still patched"):
        save_checkpoint(tiny(), PasskeyTokenizer(), tmp_path / "b", method="infini", settings=settings)


def test_cli_compare_end_to_end(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join([INSTRUCTION] + [FILLER] * 40))
    out = tmp_path / "out"
    argv = ["compare", "--model", str(checkpoint), "--lengths", "128,256", "--trials", "2", "--text", str(text),
            "--group-size", "4", "--window", "32", "--segment-len", "64", "--chunk-size", "64", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    records = json.loads((out / "compare.json").read_text())
    methods = ["dense", "ms", "self_extend", "infini"]
    assert [(r["method"], r["length"]) for r in records] == [(m, n) for m in methods for n in (128, 256)]
    for r in records:
        assert 0 <= r["passkey_accuracy"] <= 1 and r["passkey_trials"] == 2 and r["passkey_seconds_per_trial"] > 0
        assert r["perplexity"] > 1 and r["perplexity_windows"] == 1 and r["perplexity_seconds"] > 0
        assert r["peak_rss_mb"] > 0
    by = {(r["method"], r["length"]): r["perplexity"] for r in records}
    assert by["self_extend", 128] != pytest.approx(by["dense", 128], rel=1e-6)  # window 32 < 128: it acts
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert "| method" in table and "self_extend" in table and "perplexity" in table
    printed = capsys.readouterr().out
    assert "| infini" in printed
    # passkey only
    assert main(["compare", "--model", str(checkpoint), "--lengths", "128", "--trials", "1", "--methods", "dense",
                 "--out", str(tmp_path / "o2"), "--quiet"]) == 0
    only = json.loads((tmp_path / "o2" / "compare.json").read_text())
    assert only[0]["perplexity"] is None and only[0]["passkey_trials"] == 1
    _fails(["compare", "--model", str(checkpoint), "--lengths", "128", "--trials", "0", "--out", str(tmp_path / "o3"),
            "--quiet"], capsys, "nothing to compare")
    _fails(["compare", "--model", str(checkpoint), "--lengths", "128", "--window", "-1", "--out", str(tmp_path / "o3"),
            "--quiet"], capsys, "--window must be >= 0, got -1")


def test_perplexity_tokens_scores_the_same_text_at_every_length(tmp_path):
    from msattn.eval import run_perplexity

    text = tmp_path / "text.txt"
    text.write_text(" ".join([INSTRUCTION] + [FILLER] * 40))
    model = tiny()
    records = run_perplexity(model, PasskeyTokenizer(), text, [64, 128, 256], method="dense", tokens=256,
                             chunk_size=None, progress=False)
    assert [r["windows"] for r in records] == [4, 2, 1]
    with pytest.raises(ValueError, match="tokens must be at least 1"):
        run_perplexity(model, PasskeyTokenizer(), text, [64], method="dense", tokens=0)


def test_trial_plan_and_criterion():
    # the prompts of run_passkey: one deterministic plan per (seed, length), keys of the asked digits
    plan = trial_plan(300, 8, seed=3, digits=4)
    assert plan == trial_plan(300, 8, seed=3, digits=4)
    assert plan != trial_plan(300, 8, seed=4, digits=4) and plan != trial_plan(301, 8, seed=3, digits=4)
    assert all(1000 <= key <= 9999 and 0.0 <= depth < 1.0 and 0.0 <= offset < 1.0 for key, depth, offset in plan)
    # the keys and depths do not depend on the filler offsets drawn beside them
    assert [p[:2] for p in trial_plan(300, 3, seed=3, digits=4)] == [p[:2] for p in plan[:3]]
    with pytest.raises(ValueError, match="digits must be a positive int"):
        trial_plan(300, 1, digits=0)
    # retrieved: the key as a whole number, not a part of one
    assert retrieved("12345", "The pass key is 12345.") and retrieved("12345", "7 12345 9")
    assert not retrieved("12345", "123456") and not retrieved("12345", "1234") and not retrieved("12345", "")


def _passkey_selection_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "passkey_selection.py"
    spec = importlib.util.spec_from_file_location("passkey_selection", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                        max_position_embeddings=4096, attn_implementation="eager")).eval()


def test_passkey_selection_probe_reads_the_attention_weights():
    # benchmarks/passkey_selection.py's Probe runs the kernel on indicator values; with every region
    # selected MS attention is exact attention, so the mass it reads must equal eager attention's
    # weights of the last query summed over each mark
    from msattn.hf import MSCache

    script = _passkey_selection_script()
    model = _tiny_llama()
    ids = torch.randint(3, 97, (1, 65))
    n, marks = 64, [[5, 40], [0, 1, 2, 3], [63, 64]]
    with torch.no_grad():
        ref = model(ids, output_attentions=True).attentions  # per layer (1, Hq, N, N)
    msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=8, merge=4, topk=64, rope="selected"))
    # keys end at n + 1: step 1
    probe = script.Probe(n, 48, lambda step: marks if step == 1 else False, slow=torch.ones(16), block_q=4,
                         block_k=8)
    try:
        with torch.no_grad():
            model(ids, use_cache=True, **{msattn.hf.cache_argument(model): MSCache(block_k=8)})
    finally:
        probe.remove()
    assert sorted(probe.mass) == [(1, 0), (1, 1)] and sorted(probe.index) == [(1, 0), (1, 1)]
    for layer, weights in enumerate(ref):
        want = torch.stack([weights[0, :, -1, m].sum(-1) for m in marks], -1)  # (Hq, marks)
        assert want[:, 0].min() > 0.01  # the marks carry weight: the comparison means something
        torch.testing.assert_close(probe.mass[(1, layer)], want, rtol=0, atol=1e-5)
    # without a cache there is no selection from region sums to read: a clear error, not a wrong table
    probe = script.Probe(n, 48, lambda step: None, slow=torch.ones(16), block_q=4, block_k=8)
    try:
        with pytest.raises(RuntimeError, match="MSCache"), torch.no_grad():
            model(ids)
    finally:
        probe.remove()


def test_passkey_selection_probe_reads_the_models_selection_and_scores():
    # the prefill's last chunk (step 0): the selection the model made for its last group equals
    # ms_select on the same queries and keys, and the scores equal the region means, Quest's bound and
    # the slow channels' means computed here from the keys
    from msattn.hf import MSCache

    script = _passkey_selection_script()
    model = _tiny_llama()
    msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3, rope="selected"))
    captured = {}
    hooks = [getattr(layer.self_attn, f"{name}_proj").register_forward_hook(
        lambda m, a, out, key=(name, i): captured.__setitem__(key, out.detach()))
        for i, layer in enumerate(model.model.layers) for name in ("q", "k")]
    n, start = 64, 56  # the last group: positions 56-63; 14 candidate regions, 3 kept
    slow = (torch.arange(16) % 3 == 0).float()
    probe = script.Probe(n, start, lambda step: None if step == 0 else False, slow=slow, block_q=4, block_k=4)
    try:
        with torch.no_grad():
            model(torch.randint(3, 97, (1, n)), use_cache=True,
                  **{msattn.hf.cache_argument(model): MSCache(block_k=4)})
    finally:
        probe.remove()
        for h in hooks:
            h.remove()
    assert sorted(probe.index) == [(0, 0), (0, 1)] and sorted(probe.scores) == [0, 1]
    for layer in range(2):
        q = captured[("q", layer)].view(1, n, 4, 16).transpose(1, 2).contiguous()
        k = captured[("k", layer)].view(1, n, 2, 16).transpose(1, 2).contiguous()
        want = msattn.ms_select(q, k, block_q=4, block_k=4, merge=2, topk=3)[0, :, -1]  # (Hkv, 3)
        assert torch.equal(probe.index[(0, layer)], want)
        qbar = q[0, :, 60:].mean(1).view(2, 2, 16).sum(1)  # the last query region, summed per KV head
        blocks = k[0, :, :start].reshape(2, 14, 4, 16)
        kbar = blocks.mean(2)
        bound = torch.maximum(qbar[:, None] * blocks.amin(2), qbar[:, None] * blocks.amax(2)).sum(-1)
        for got, ref in zip(probe.scores[layer], (kbar @ qbar[..., None], bound, (kbar * slow) @ qbar[..., None])):
            torch.testing.assert_close(got, ref.reshape(2, 14), rtol=1e-5, atol=1e-5)
        # the interleave takes each query region's best first: the last region's best is selected
        for h in range(2):
            assert int(probe.scores[layer][0][h].argmax()) in want[h].tolist()
