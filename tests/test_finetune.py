"""examples/finetune.py: reduced-LoRA fine-tuning of a patched model with CRD NTK on the HF Trainer
(in process, through the script's functions, and under a 2-process torchrun), and the converted
stories260K model under MS attention: exact with a covering config, sane perplexity with a sparse one.

The stories260K tests read ../shared/data (see its README) and skip without it.
"""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import msattn  # noqa: E402
import msattn.hf  # noqa: E402
from msattn.rope import CRDNTKCallback, CRDNTKRotaryEmbedding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = DATA / "stories260K"
PERSUASION = DATA / "austen" / "persuasion.txt"
needs_stories = pytest.mark.skipif(
    not all(p.is_file() for p in (STORIES / "stories260K.bin", STORIES / "tok512.bin", PERSUASION)),
    reason=f"stories260K data absent (expected {STORIES}/stories260K.bin, tok512.bin and {PERSUASION})",
)


def _load_script(path=SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ft = _load_script()


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: on the shared 2-core machine one thread is many times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


# a sequence of 256 tokens has 16 groups of 16 queries; each selects 4 regions of 8 tokens (32 of the
# up to 240 tokens before it), so selection decides what most queries see
SEQ_LEN = 256
SPARSE_FLAGS = ["--seq-len", str(SEQ_LEN), "--block-q", "8", "--block-k", "8", "--merge", "2", "--topk", "4"]
SCHEDULE_FLAGS = ["--scale-start", "1", "--growth", "2", "--grow-every", "5", "--scale-max", "8"]
EXPECTED_SCALES = [1.0] * 5 + [2.0] * 5 + [4.0] * 5 + [8.0] * 5  # in force during steps 0..19


def _eval_loss(model, dataset):
    model.eval()
    with torch.no_grad():
        ids = dataset.chunks
        return model(input_ids=ids, labels=ids).loss.item()


# ---------------------------------------------------------------------------------------------
# fine-tuning through the script's functions


@pytest.mark.parametrize("rope", ["inputs", "selected"])
def test_finetune_lowers_loss_trains_reduced_set_and_grows_crd_scale(rope, tmp_path):
    args = ft.parse_args([*SPARSE_FLAGS, *SCHEDULE_FLAGS, "--rope", rope, "--steps", "20", "--batch-size", "2",
                          "--lr", "5e-3", "--save-steps", "1000", "--out", str(tmp_path), "--no-progress"])
    model, tokenizer = ft.base_model(seed=0)
    ms, crd = ft.ms_config(args), ft.crd_config(args, model.config.max_position_embeddings)
    assert not ms.covers(SEQ_LEN)
    assert crd.cycle > model.config.max_position_embeddings  # the NTK base really changes with the scale
    train = ft.text_dataset(tokenizer, [ft.synthetic_text(50 * SEQ_LEN, seed=0)], SEQ_LEN)
    held_out = ft.text_dataset(tokenizer, [ft.synthetic_text(4 * SEQ_LEN, seed=1)], SEQ_LEN)
    model = ft.prepare(model, ms, crd, args.lora_r, args.lora_alpha)
    assert msattn.hf.patched_config(model) == ms

    (rotary,) = [m for m in model.modules() if isinstance(m, CRDNTKRotaryEmbedding)]
    seen = []  # (scale, base) of each training forward
    rotary.register_forward_pre_hook(lambda m, a: seen.append((m.scale, m.training_base)) if m.training else None)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_before = _eval_loss(model, held_out)

    trainer = ft.make_trainer(model, train, args)
    trainer.train()

    # the loss falls: on held-out chunks and along the run
    loss_after = _eval_loss(model, held_out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses

    # exactly the LoRA matrices, the embedding copy and the norm copies changed
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable == {name for name in params if "lora_" in name or "modules_to_save" in name}
    assert any("embed_tokens" in n for n in trainable) and any("norm" in n for n in trainable)
    assert {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n} == {"k_proj", "o_proj"}
    changed = {name for name, p in params.items() if not torch.equal(before[name], p.detach())}
    assert changed == trainable

    # the CRD NTK scale followed its schedule, step by step, and the base grew with it
    assert [scale for scale, _ in seen] == EXPECTED_SCALES
    bases = [base for _, base in seen]
    assert all(b1 < b2 for b1, b2 in zip(bases[::5], bases[5::5]))
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CRDNTKCallback)]
    assert (callback.scale, callback.global_step, rotary.scale) == (8.0, 20, 8.0)

    # what --out holds rebuilds the same model
    model.save_pretrained(tmp_path)
    ft.write_run_config(tmp_path, ft.run_config(args, ms, crd, model))
    rebuilt, _, config = ft.load_finetuned(tmp_path)
    assert config["msattn"]["topk"] == 4 and config["crd_ntk"]["resolved"]["final_training_scale"] == 8.0
    ids = held_out.chunks[:2]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)
    # evaluated with other MS parameters than trained: the patch and the returned config say so
    wider, _, config = ft.load_finetuned(tmp_path, topk=6)
    assert config["msattn"]["topk"] == 6 and msattn.hf.patched_config(wider).topk == 6
    assert msattn.hf.patched_config(wider).merge == ms.merge
    with pytest.raises(ValueError, match="MSConfig has no field"):
        ft.load_finetuned(tmp_path, top_k=6)


def test_resume_continues_steps_and_crd_schedule(tmp_path):
    flags = [*SPARSE_FLAGS, *SCHEDULE_FLAGS, "--seq-len", "64", "--batch-size", "2", "--save-steps", "3",
             "--lr", "1e-3", "--out", str(tmp_path), "--no-progress"]
    first = ft.main([*flags, "--steps", "6"])
    assert first.state.global_step == 6 and (tmp_path / "checkpoint-6").is_dir()
    (tmp_path / "checkpoint-9").mkdir()  # a run killed while writing its next checkpoint
    (tmp_path / "checkpoint-9" / "model.safetensors").write_bytes(b"")
    resumed = ft.main([*flags, "--steps", "12", "--resume"])  # from checkpoint-6, the last complete one
    assert resumed.state.global_step == 12
    assert len([h for h in resumed.state.log_history if "loss" in h]) == 12  # 6 restored + 6 new
    (callback,) = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, CRDNTKCallback)]
    assert (callback.scale, callback.global_step) == (4.0, 12)  # 1 * 2 ** (12 // 5)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / ft.CONFIG_NAME).is_file()

    # examples/eval_finetuned.py on that run, with another merge than trained (the run's merge is 2)
    eval_finetuned = _load_script(SCRIPT.parent / "eval_finetuned.py")
    text = tmp_path / "held_out.txt"
    text.write_text(ft.synthetic_text(3000, seed=1), encoding="utf-8")
    common = ["--run", str(tmp_path), "--text", str(text), "--lengths", "128", "--no-dense"]
    records = eval_finetuned.main([*common, "--merge", "4", "--out", str(tmp_path / "eval")])
    assert [r["length"] for r in records] == [128] and math.isfinite(records[0]["perplexity"])
    assert (tmp_path / "eval" / "perplexity.json").is_file()
    for flag in ("--merge", "--chunk-size"):
        with pytest.raises(SystemExit):
            eval_finetuned.main([*common, flag, "0"])


def test_resume_without_a_complete_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        ft.main([*SPARSE_FLAGS, "--seq-len", "64", "--steps", "2", "--out", str(tmp_path), "--no-progress", "--resume"])


def test_evaluation_split_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="evaluation split"):
        ft.read_texts([tmp_path / "novels" / "persuasion.txt"])
    with pytest.raises(SystemExit, match="evaluation split"):
        ft.main(["--text", str(tmp_path / "persuasion.txt"), "--out", str(tmp_path)])


def test_token_chunks():
    dataset = ft.TokenChunks(list(range(10)), 3)
    assert len(dataset) == 3
    assert dataset[2]["input_ids"].tolist() == [6, 7, 8]
    assert torch.equal(dataset[2]["labels"], dataset[2]["input_ids"])
    with pytest.raises(ValueError, match="no chunk of 16"):
        ft.TokenChunks(list(range(10)), 16)


# ---------------------------------------------------------------------------------------------
# DDP


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *SPARSE_FLAGS, "--seq-len", "128", "--steps", "4", "--batch-size", "2", "--save-steps", "2",
           "--rope", "selected", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finetune: 2 process(es)" in proc.stdout  # one DDP run, not two single ones
    assert (out / "adapter_model.safetensors").is_file() and (out / ft.CONFIG_NAME).is_file()
    assert (out / "checkpoint-4").is_dir()
    model, _, config = ft.load_finetuned(out)
    assert config["training"]["steps"] == 4 and msattn.hf.patched_config(model).rope == "selected"


# ---------------------------------------------------------------------------------------------
# the real model: stories260K


@pytest.fixture(scope="module")
def stories():
    from msattn.models import load_llama2c

    model, tokenizer = load_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin")
    text = PERSUASION.read_text(encoding="utf-8")[:40_000]  # the start of the novel: a few chunks are enough
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return model, ids


def _chunks(ids, n, length=512):
    assert len(ids) >= n * length
    return ids[:n * length].view(n, length)


@needs_stories
def test_stories260k_covering_config_equals_dense(stories):
    model, ids = stories
    chunks = _chunks(ids, 2)
    cover = msattn.MSConfig(block_q=16, block_k=16, merge=4, topk=32)
    assert cover.covers(chunks.shape[1])
    with torch.no_grad():
        ref = model(input_ids=chunks).logits
        msattn.hf.patch(model, cover)
        try:
            got = model(input_ids=chunks).logits
        finally:
            msattn.hf.unpatch(model)
    assert ref.dtype == torch.float32
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


def _perplexity(model, chunks):
    with torch.no_grad():
        return math.exp(model(input_ids=chunks, labels=chunks).loss.item())


@needs_stories
def test_stories260k_sparse_perplexity_next_to_dense(stories):
    model, ids = stories
    chunks = _chunks(ids, 4)
    sparse = msattn.MSConfig(block_q=16, block_k=16, merge=4, topk=8)
    assert not sparse.covers(chunks.shape[1])
    dense_ppl = _perplexity(model, chunks)
    msattn.hf.patch(model, sparse)
    try:
        sparse_ppl = _perplexity(model, chunks)
    finally:
        msattn.hf.unpatch(model)
    print(f"\nstories260K on persuasion.txt, {chunks.shape[0]} chunks of {chunks.shape[1]} tokens: "
          f"dense perplexity {dense_ppl:.3f}, MS {sparse} perplexity {sparse_ppl:.3f} "
          f"(ratio {sparse_ppl / dense_ppl:.4f})")
    assert math.isfinite(dense_ppl) and math.isfinite(sparse_ppl)
    assert sparse_ppl != dense_ppl  # the sparse config really drops keys
    assert sparse_ppl < 2 * dense_ppl


def test_finetune_a_gguf_model(tmp_path, monkeypatch):
    # --model takes what python -m msattn.eval takes (here a GGUF file); the run config names it, so
    # load_finetuned rebuilds the same base model
    pytest.importorskip("gguf")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_gguf import tiny_llama, write_gguf

    monkeypatch.setenv("MSATTN_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama())
    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"Sentence {i} goes on and then it ends." for i in range(200)), encoding="utf-8")
    out = tmp_path / "run"
    trainer = ft.main([*SPARSE_FLAGS, "--model", str(path), "--text", str(text), "--seq-len", "64", "--steps", "3",
                       "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert trainer.state.global_step == 3
    model, tok, config = ft.load_finetuned(out)
    assert config["base_model"]["model"] == str(path.resolve()) and model.config.hidden_size == 64
    ids = torch.tensor([tok.encode("Sentence 3 goes on", bos=True)])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
