"""Reduced LoRA on PEFT (msattn/lora.py): what is trainable, and that the wrapped model is the base
model at initialisation."""

import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from msattn import lora  # noqa: E402

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)

MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"k_proj", "o_proj"}),
    "mistral": (MistralConfig, MistralForCausalLM, {"q_proj", "o_proj"}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"k_proj", "o_proj"}),
}
CASES = [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True)]


def tiny_model(model_type, tied):
    config_class, model_class, _ = MODELS[model_type]
    torch.manual_seed(0)
    return model_class(config_class(tie_word_embeddings=tied, **TINY)).eval()


def expected_trainable(base, targets):
    """PEFT names of the parameters reduced LoRA must train, derived from the base model's modules."""
    names = set()
    for name, module in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            names |= {f"base_model.model.{name}.lora_{ab}.default.weight" for ab in "AB"}
        elif module is base.get_input_embeddings() or type(module).__name__.endswith("RMSNorm"):
            names.add(f"base_model.model.{name}.modules_to_save.default.weight")
    return names


@pytest.mark.parametrize("model_type, tied", CASES)
def test_exactly_the_reduced_set_is_trainable(model_type, tied):
    base = tiny_model(model_type, tied)
    targets = MODELS[model_type][2]
    model = lora.apply(copy.deepcopy(base))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = expected_trainable(base, targets)
    n_layers, n_norms = TINY["num_hidden_layers"], 2 * TINY["num_hidden_layers"] + 1
    assert len(expected) == 2 * len(targets) * n_layers + 1 + n_norms
    assert trainable == expected
    # the norms and the embedding are trained in full: every element of their weights
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hidden, vocab, r = TINY["hidden_size"], TINY["vocab_size"], 8
    kv = TINY["num_key_value_heads"] * hidden // TINY["num_attention_heads"]
    lora_sizes = {"q_proj": r * (hidden + hidden), "k_proj": r * (hidden + kv), "o_proj": r * (hidden + hidden)}
    assert n_trainable == n_layers * sum(lora_sizes[t] for t in targets) + vocab * hidden + n_norms * hidden


@pytest.mark.parametrize("model_type, tied", CASES)
def test_config_values(model_type, tied):
    base = tiny_model(model_type, tied)
    config = lora.reduced_lora_config(base, r=4, alpha=32, dropout=0.1)
    assert set(config.target_modules) == MODELS[model_type][2]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 32, 0.1)
    assert config.task_type == "CAUSAL_LM"
    assert set(config.modules_to_save) == {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    assert config.ensure_weight_tying == tied


@pytest.mark.parametrize("model_type, tied", CASES)
def test_forward_equals_base_at_init_and_trains(model_type, tied):
    base = tiny_model(model_type, tied)
    model = lora.apply(copy.deepcopy(base), dropout=0.0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_A" not in name:  # lora_A gets no gradient while lora_B is zero
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif not p.requires_grad:
            assert p.grad is None, name


@pytest.mark.parametrize("model_type, tied", CASES)
def test_tied_output_embedding_follows_the_trained_copy(model_type, tied):
    model = lora.apply(tiny_model(model_type, tied))
    inner = model.base_model.model
    trained = inner.get_input_embeddings().modules_to_save["default"].weight
    lm_head = inner.get_output_embeddings()
    if tied:
        assert lm_head.modules_to_save["default"].weight is trained
    else:
        assert not lm_head.weight.requires_grad and lm_head.weight is not trained


@pytest.mark.parametrize("model_type, tied", CASES)
def test_adapter_round_trip(model_type, tied, tmp_path):
    base = tiny_model(model_type, tied)
    model = lora.apply(copy.deepcopy(base))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert not torch.allclose(out, base(input_ids=ids).logits)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(model_type, tied), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, out, rtol=0, atol=0)


def test_unsupported_model_type_raises():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'.*llama.*mistral"):
        lora.reduced_lora_config(model)
    with pytest.raises(ValueError, match="gpt2"):
        lora.apply(model)
