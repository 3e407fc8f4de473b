"""msattn.hf: registry hook-up, patch/unpatch of tiny Llama and Mistral models, generate, rope="selected"."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import msattn
import msattn.hf
from hf_compat import output_cache


def tiny(kind="llama", layers=2, **kw):
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096, attn_implementation="sdpa")
    common.update(kw)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return MistralForCausalLM(MistralConfig(sliding_window=None, **common)).eval()


def batch(B, N, pad=None, vocab=97):
    ids = torch.randint(3, vocab, (B, N))
    mask = torch.ones(B, N, dtype=torch.long)
    if pad == "left":
        mask[1, :N // 3] = 0
    elif pad == "right":
        mask[1, N - N // 3:] = 0
    return ids, mask


COVER = msattn.MSConfig(block_q=4, block_k=8, merge=4, topk=64)  # 64 regions of 8: covers 512 tokens
SPARSE = msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=2)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_covering_patch_equals_sdpa(kind, pad):
    model = tiny(kind)
    ids, mask = batch(2, 150, pad)
    with torch.no_grad():
        # the first forward of a process on 2 threads can differ from later ones in the last bit (2 runs in
        # 12 of this test alone; never on 1 thread): the reference is a second forward
        model(ids, attention_mask=mask)
        ref = model(ids, attention_mask=mask).logits
        msattn.hf.patch(model, COVER)
        assert model.config._attn_implementation == "msattn"
        got = model(ids, attention_mask=mask).logits
        msattn.hf.unpatch(model)
        assert model.config._attn_implementation == "sdpa"
        again = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], rtol=0, atol=1e-5 * ref.abs().max())
    assert torch.equal(again, ref)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_same_greedy_tokens(kind):
    model = tiny(kind)
    ids, mask = batch(2, 40, "left")
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    msattn.hf.patch(model, COVER)
    got = model.generate(ids, **kw)
    assert torch.equal(got, ref)


def test_sparse_generation_runs_far_past_its_groups():
    model = tiny()
    msattn.hf.patch(model, SPARSE)
    ids, _ = batch(1, 60)
    out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert out.shape == (1, 90)


def test_layers_left_dense():
    model = tiny()
    ids, _ = batch(1, 200)
    with torch.no_grad():
        ref = model(ids).logits
        msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=2, layers=()))
        all_dense = model(ids).logits
        msattn.hf.unpatch(model)
        msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=2, layers=(1,)))
        one_sparse = model(ids).logits
    assert torch.allclose(all_dense, ref, rtol=0, atol=1e-5 * ref.abs().max())
    # layer 1 sparse: the first group is dense (prefix), later positions differ
    assert torch.allclose(one_sparse[:, :8], ref[:, :8], rtol=0, atol=1e-5 * ref.abs().max())
    assert not torch.allclose(one_sparse[:, -50:], ref[:, -50:], rtol=0, atol=1e-3)


def test_patch_after_and_before_peft():
    peft = pytest.importorskip("peft")
    model = tiny()
    ids, mask = batch(2, 64, "left")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    cfg = peft.LoraConfig(r=4, target_modules=["k_proj"], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, cfg)
    msattn.hf.patch(wrapped, COVER)
    with torch.no_grad():
        got = wrapped(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], rtol=0, atol=1e-5 * ref.abs().max())
    msattn.hf.unpatch(wrapped)
    model2 = msattn.hf.patch(tiny(), COVER)
    wrapped2 = peft.get_peft_model(model2, cfg)
    assert wrapped2(ids, attention_mask=mask).logits.shape == ref.shape
    for peft_model in (wrapped2, msattn.hf.patch(wrapped, SPARSE)):  # patched under and over PEFT
        out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                  pad_token_id=0, return_dict_in_generate=True)
        assert isinstance(output_cache(out), msattn.hf.MSCache)


def test_backward_through_patched_model():
    model = tiny().train()
    msattn.hf.patch(model, SPARSE)
    ids, mask = batch(2, 100, "right")
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("config", [COVER, msattn.MSConfig(block_q=4, block_k=8, merge=4, topk=64, rope="selected")])
def test_autocast_bf16_training_step_matches_sdpa(config):
    # under torch.autocast the projections give bfloat16 while un-rotated q and k pass through float32
    # cos = 1 (rope="selected"): the attention function gets mixed dtypes and must cast as SDPA does
    model = tiny().train()
    ids, mask = batch(2, 120, "right")
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = step()
    msattn.hf.patch(model, config)  # covers the sequence: exactly dense attention, in bfloat16
    loss, grads = step()
    assert torch.allclose(loss, ref_loss, rtol=1e-2)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and g.isfinite().all()
        assert (g - r).norm() <= 0.05 * r.norm() + 1e-6


# ---------------------------------------------------------------------------------------------
# rope="selected"

def test_selected_rope_with_everything_selected_equals_ordinary_rope():
    model = tiny()
    ids, mask = batch(2, 120, "right")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=8, merge=4, topk=64, rope="selected"))
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], rtol=0, atol=1e-5 * ref.abs().max())


def test_selected_rope_ignores_position_offsets():
    model = tiny()
    msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3, rope="selected"))
    ids, _ = batch(1, 100)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, position_ids=torch.arange(100)[None] + 12345).logits
    assert torch.equal(a, b)


def test_selected_rope_tables_cover_the_compact_positions_only():
    # compact positions stay below topk * block_k + span: a forward over n tokens builds tables that
    # long, not n rows (at 1M tokens, n rows of cos and sin per forward took a third of a passkey trial)
    model = tiny()
    cfg = msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3, rope="selected")
    msattn.hf.patch(model, cfg)
    ids, _ = batch(1, 100)
    with torch.no_grad():
        model(ids)
    rotary = model.model.rotary_emb
    assert isinstance(rotary, msattn.hf.UnrotatedRotary)
    assert [t.shape[0] for t in rotary.tables(1, ids.device)] == [cfg.topk * cfg.block_k + cfg.span] * 2


def test_selected_rope_unselected_past_tokens_change_nothing():
    # queries and keys share a direction u; inserted keys point away from it, so no group selects them
    torch.manual_seed(1)
    B, Hq, Hkv, D, bq, bk, merge, topk = 1, 2, 1, 16, 4, 4, 2, 3
    span, n = bq * merge, 64
    u = torch.randn(D)
    q = torch.randn(B, Hq, n, D) + 3 * u
    k = torch.randn(B, Hkv, n, D) + 3 * u
    v = torch.randn(B, Hkv, n, D)
    ins_k = torch.randn(B, Hkv, 4 * span, D) * 0.01 - 3 * u
    ins_v = torch.randn(B, Hkv, 4 * span, D)
    ins_q = torch.randn(B, Hq, 4 * span, D)
    ang = torch.arange(topk * bk + span, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, D, 2) / D)
    rotary = (ang.cos().float(), ang.sin().float())
    kw = dict(block_q=bq, block_k=bk, merge=merge, topk=topk, rotary=rotary)
    base = msattn.ms_attention(q, k, v, **kw)
    longer = msattn.ms_attention(torch.cat([ins_q, q], 2), torch.cat([ins_k, k], 2), torch.cat([ins_v, v], 2), **kw)
    sel = msattn.ms_select(torch.cat([ins_q, q], 2), torch.cat([ins_k, k], 2),
                           **{x: kw[x] for x in ("block_q", "block_k", "merge", "topk")})
    # groups with enough real candidates to fill topk never choose an inserted region ...
    first = math.ceil(topk * bk / span)
    later = sel[:, :, 4 + first:]
    assert ((later >= 4 * span // bk) | (later < 0)).all()
    # ... and their outputs are unchanged, bit for bit
    assert torch.equal(longer[:, :, 4 * span + first * span:], base[:, :, first * span:])


# ---------------------------------------------------------------------------------------------
# compile and bad input

def test_compile_patched_forward():
    model = tiny()
    msattn.hf.patch(model, SPARSE)
    ids, mask = batch(2, 64, "left")
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        compiled = torch.compile(model)
        got = compiled(ids, attention_mask=mask).logits
    assert torch.allclose(got, eager, rtol=1e-4, atol=1e-4)


def test_unsupported_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        msattn.hf.patch(model)


def test_sliding_window_is_not_dropped_silently():
    model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                             sliding_window=32))
    with pytest.raises(ValueError, match="sliding window of 32"):
        msattn.hf.patch(model)


def test_bad_configs():
    with pytest.raises(ValueError, match="MSConfig.block_q must be a positive int"):
        msattn.MSConfig(block_q=0)
    with pytest.raises(ValueError, match="multiple of block_k"):
        msattn.MSConfig(block_q=3, block_k=8, merge=1)
    with pytest.raises(ValueError, match=r"MSConfig.local must be an int in \[0, topk = 4\], got 5"):
        msattn.MSConfig(topk=4, local=5)
    with pytest.raises(ValueError, match="MSConfig.local must be"):
        msattn.MSConfig(local=-1)
    with pytest.raises(ValueError, match="MSConfig.rope must be one of"):
        msattn.MSConfig(rope="everywhere")
    with pytest.raises(ValueError, match="MSConfig.score_channels must be one of"):
        msattn.MSConfig(score_channels="fast", rope="selected")
    with pytest.raises(ValueError, match="score_channels='slow' needs rope='selected'"):
        msattn.MSConfig(score_channels="slow")
    with pytest.raises(ValueError, match="coarse_regions and coarse_topk are both 0"):
        msattn.MSConfig(coarse_regions=4)
    with pytest.raises(ValueError, match=r"MSConfig.coarse_topk must be an int in \[0, "):
        msattn.MSConfig(coarse_regions=4, coarse_topk=-1)
    with pytest.raises(ValueError, match="names layers beyond"):
        msattn.hf.patch(tiny(), msattn.MSConfig(layers=(0, 5)))
    with pytest.raises(ValueError, match="head dim 512"):
        msattn.hf.patch(tiny(hidden_size=1024, num_attention_heads=2, num_key_value_heads=1))
    model = msattn.hf.patch(tiny())
    with pytest.raises(RuntimeError, match="already patched"):
        msattn.hf.patch(model)


def test_from_pretrained_with_attn_implementation_equals_patch(tmp_path):
    """``import msattn.hf`` registers "msattn": from_pretrained(attn_implementation="msattn") gives the
    default MSConfig's attention, as patch(model) does (a long enough sequence to be sparse for it)."""
    cfg = msattn.MSConfig()
    n = cfg.topk * cfg.block_k + 2 * cfg.span  # 9216 tokens: the last groups select
    model = tiny(layers=1, max_position_embeddings=n)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="msattn").eval()
    assert loaded.config._attn_implementation == "msattn"
    ids = torch.randint(3, 97, (1, n))
    with torch.no_grad():
        got = loaded(ids).logits
        want = msattn.hf.patch(model, cfg)(ids).logits
        msattn.hf.unpatch(model)
        dense = model(ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got[:, -cfg.span:], dense[:, -cfg.span:], rtol=0, atol=1e-4)  # really sparse


CONFIGS = [SPARSE, msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=2, rope="selected"),
           msattn.SelfExtendConfig(group_size=4, window=16), msattn.InfiniConfig(segment_len=32)]
CONFIG_IDS = ["ms", "ms-selected", "self_extend", "infini"]


@pytest.mark.parametrize("first", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("second", CONFIGS, ids=CONFIG_IDS)
def test_patching_a_patched_model_raises(first, second):
    model = msattn.hf.patch(tiny(), first)
    with pytest.raises(RuntimeError, match="already patched"):
        msattn.hf.patch(model, second)
    assert msattn.hf.patched_config(model) is first


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_unpatch_restores_the_model_bit_for_bit(config, kind):
    from msattn.rope import CRDNTK, CRDNTKRotaryEmbedding

    model = tiny(kind)
    ids, mask = batch(2, 70, "left")
    names = [n for n, _ in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        rope = None
        if config is SPARSE:  # a replaced rotary embedding is restored too
            rope = CRDNTKRotaryEmbedding(CRDNTK(cycle=4096, max_shift=4, scale_max=16.0), model.config)
        msattn.hf.patch(model, config, rope=rope)
        assert msattn.hf.patched_config(model) is config
        model(ids, attention_mask=mask)
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        msattn.hf.unpatch(model)
        assert msattn.hf.patched_config(model) is None
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                          pad_token_id=0), ref_gen)
    assert [n for n, _ in model.named_modules()] == names and "generate" not in vars(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    with pytest.raises(RuntimeError, match="not patched"):
        msattn.hf.unpatch(model)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_patched_models_pickle_and_deepcopy(config):
    import copy
    import pickle

    model = msattn.hf.patch(tiny(), config)
    ids, _ = batch(1, 50)
    with torch.no_grad():
        want = model(ids).logits
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert msattn.hf.patched_config(other) == config
            assert torch.equal(other(ids).logits, want)
            out = other.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            assert type(output_cache(out)) is type(msattn.hf.new_cache(model))
            msattn.hf.unpatch(other)  # undoes the copy only
    assert msattn.hf.patched_config(model) == config


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_torch_save_and_a_deepcopy_that_outlives_the_original(config, tmp_path):
    import copy
    import gc
    import weakref

    model = msattn.hf.patch(tiny(), config)
    ids, _ = batch(1, 50)
    with torch.no_grad():
        want = model(ids).logits
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    copied = copy.deepcopy(model)
    original = weakref.ref(model)
    del model
    gc.collect()
    assert original() is None  # the copy holds nothing of the original
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want) and torch.equal(copied(ids).logits, want)


def test_the_cache_argument_reaches_the_model():
    """msattn passes caches under ``cache_argument(model)``; if a transformers release renames it again,
    this fails naming the release instead of generation silently running without msattn's cache."""
    import transformers
    from transformers import DynamicCache

    model = tiny()
    name = msattn.hf.cache_argument(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.randint(3, 97, (1, 9)), use_cache=True, **{name: cache})
    assert output_cache(out) is cache and cache.get_seq_length() == 9, \
        f"transformers {transformers.__version__} does not take a cache as {name}="


def test_patch_takes_a_method_config():
    with pytest.raises(TypeError, match="config must be one of MSConfig, SelfExtendConfig, InfiniConfig"):
        msattn.hf.patch(tiny(), {"topk": 3})
    with pytest.raises(ValueError, match="not supported by self_extend"):
        msattn.hf.patch(_qwen2(), msattn.SelfExtendConfig())
    assert sorted(msattn.hf.METHODS) == ["infini", "ms", "self_extend"]
    assert {m.config for m in msattn.hf.METHODS.values()} == {msattn.MSConfig, msattn.SelfExtendConfig,
                                                               msattn.InfiniConfig}


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=97))


def test_peer_methods_without_patch_are_an_error():
    model = tiny()
    for name in ("msattn_self_extend", "msattn_infini"):
        model.set_attn_implementation(name)
        with pytest.raises(RuntimeError, match="not patched"):
            model(torch.randint(0, 97, (1, 10)))


def test_patch_method_dispatch():
    model = tiny()
    ids = torch.randint(3, 97, (1, 80))
    with torch.no_grad():
        ref = model(ids).logits
        msattn.hf.patch(model, msattn.SelfExtendConfig(group_size=4, window=1000))
        assert model.config._attn_implementation == "msattn_self_extend"
        got = model(ids).logits
        msattn.hf.unpatch(model)
        again = model(ids).logits
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * ref.abs().max())
    assert torch.equal(again, ref)
    with torch.no_grad():  # Infini with the memory gate shut and one segment is the model's own attention
        msattn.hf.patch(model, msattn.InfiniConfig(segment_len=128, gate_init=-1e4))
        infini = model(ids).logits
        msattn.hf.unpatch(model)
    assert torch.allclose(infini, ref, rtol=0, atol=1e-5 * ref.abs().max())
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_save_pretrained_and_from_pretrained_keep_the_method_and_its_trained_weights(config, tmp_path):
    model = msattn.hf.patch(tiny(), config)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):  # "trained" gates: not the initial value
            if hasattr(layer.self_attn, "infini_gate"):
                layer.self_attn.infini_gate.beta.copy_(torch.linspace(-1.0, 2.0, 4) + i)
    ids, mask = batch(2, 70, "left")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = msattn.hf.from_pretrained(tmp_path).eval()
    assert msattn.hf.patched_config(loaded) == config
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, want)
    msattn.hf.unpatch(model)
    assert not hasattr(model.config, "msattn")  # saved unpatched: loads plain
    model.save_pretrained(tmp_path / "plain")
    assert msattn.hf.patched_config(msattn.hf.from_pretrained(tmp_path / "plain")) is None


@pytest.mark.parametrize("config", [SPARSE, msattn.InfiniConfig(segment_len=16)], ids=["ms", "infini"])
def test_left_padding_by_whole_groups_equals_the_prompt_alone(config):
    """Groups (MS) and segments (Infini) are aligned to cache slots, not to a row's first real token
    (README, "Padding"): left padding by a whole number of groups / segments gives the prompt alone's
    logits; other amounts shift the grid, which is allowed to change them."""
    model = msattn.hf.patch(tiny(), config)
    unit = config.span if isinstance(config, msattn.MSConfig) else config.segment_len
    ids = torch.randint(3, 97, (1, 60))
    with torch.no_grad():
        alone = model(ids).logits
        for pad in (unit, 2 * unit):
            padded = torch.cat([torch.zeros(1, pad, dtype=ids.dtype), ids], 1)
            mask = (torch.arange(pad + 60) >= pad).long()[None]
            positions = (mask.cumsum(1) - 1).clamp_min(0)  # what generate() passes
            got = model(padded, attention_mask=mask, position_ids=positions).logits[:, pad:]
            assert torch.allclose(got, alone, rtol=1e-5, atol=1e-5), pad
        right = torch.cat([ids, torch.zeros(1, 7, dtype=ids.dtype)], 1)  # right padding: any amount
        got = model(right, attention_mask=(torch.arange(67) < 60).long()[None]).logits[:, :60]
        assert torch.allclose(got, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [SPARSE, msattn.InfiniConfig(segment_len=16),
                                    msattn.SelfExtendConfig(group_size=4, window=16)], ids=["ms", "infini", "self_extend"])
def test_a_static_cache_is_refused_not_misread(config):
    """The kernels take a call's queries as the last keys; a static cache has empty slots after them, which
    silently shifted every position (MS generated other tokens than with its own cache)."""
    model = msattn.hf.patch(tiny(), config)
    ids = torch.randint(3, 97, (1, 40))
    with pytest.raises(NotImplementedError, match="static or preallocated cache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 43)  # its own cache


# ---------------------------------------------------------------------------------------------
# padding-free batches (position_ids restarting per sequence, DataCollatorWithFlattening)

LENGTHS = [37, 90, 5, 64]
SELECTED = msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=2, local=1, rope="selected")


def _sequences(lengths=LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=generator).tolist() for n in lengths]


def _padded(sequences):
    """Right-padded ids, attention mask and labels (-100 on padding) of the sequences."""
    length = max(map(len, sequences))
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("config", [SPARSE, SELECTED], ids=["sparse", "rope-selected"])
def test_padding_free_batch_equals_padded_batch(config):
    """A sparse selection (topk 2 of up to 22 regions) on transformers' padding-free batch: the logits of
    every token, the loss and every gradient equal those of the right-padded batch; the same tokens run
    as one unpacked sequence differ (the sequences would see each other)."""
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(0)
    model = msattn.hf.patch(tiny(), config)
    sequences = _sequences()
    flat = DataCollatorWithFlattening()([{"input_ids": s} for s in sequences])
    got = model(**flat, use_cache=False)  # what the Trainer runs (TrainingArguments.use_cache=False)
    got.loss.backward()
    got_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    want = model(**_padded(sequences), use_cache=False)
    want.loss.backward()
    want_logits = torch.cat([want.logits[row, :len(s)] for row, s in enumerate(sequences)])
    torch.testing.assert_close(got.logits[0], want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        unpacked = model(flat["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(unpacked, want_logits, rtol=1e-3, atol=1e-3)


def test_padding_free_rows_of_a_batch_equal_the_padded_batch():
    """Two rows, each packing two sequences (position_ids restart inside each row)."""
    torch.manual_seed(0)
    model = msattn.hf.patch(tiny(), SPARSE)
    sequences = _sequences([30, 50, 61, 19])
    ids = torch.tensor([sequences[0] + sequences[1], sequences[2] + sequences[3]])
    positions = torch.tensor([list(range(30)) + list(range(50)), list(range(61)) + list(range(19))])
    with torch.no_grad():
        got = model(ids, position_ids=positions, use_cache=False).logits
        want = model(**_padded(sequences), use_cache=False).logits
    torch.testing.assert_close(got[0], torch.cat([want[0, :30], want[1, :50]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], torch.cat([want[2, :61], want[3, :19]]), rtol=1e-5, atol=1e-5)


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return {"input_ids": self.sequences[i]}


def test_trainer_with_packing_trains_like_padding(tmp_path):
    """The Trainer with DataCollatorWithFlattening (padding-free) and with right padding, from the same
    weights over the same batches: the same losses and, after three SGD steps, the same weights."""
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    sequences = _sequences([37, 90, 5, 64, 70, 12], seed=1)
    results = []
    for collator in (DataCollatorWithFlattening(), _padded_collator):
        torch.manual_seed(0)
        model = msattn.hf.patch(tiny(), SPARSE)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                 learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                 dataloader_num_workers=0, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=_Sequences(sequences), data_collator=collator)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, {name: p.detach().clone() for name, p in model.named_parameters()}))
    (packed_losses, packed_weights), (padded_losses, padded_weights) = results
    assert len(packed_losses) == 3
    assert packed_losses == pytest.approx(padded_losses, rel=1e-4)
    for name, weight in packed_weights.items():
        torch.testing.assert_close(weight, padded_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def _padded_collator(features):
    return _padded([f["input_ids"] for f in features])


@pytest.mark.parametrize("config", [msattn.InfiniConfig(segment_len=16), msattn.SelfExtendConfig(group_size=4, window=16)],
                         ids=["infini", "self_extend"])
def test_padding_free_batches_are_refused_by_the_methods_without_them(config):
    model = msattn.hf.patch(tiny(), config)
    ids = torch.randint(3, 97, (1, 40))
    positions = torch.tensor([list(range(25)) + list(range(15))])
    with pytest.raises(NotImplementedError, match="packed sequences|mask pattern"):
        model(ids, position_ids=positions, use_cache=False)


def test_multiscale_selection_in_a_patched_model():
    """MSConfig(coarse_regions=, coarse_topk=) reaches the selection: keeping every coarse region gives
    the exact model's logits bit for bit, keeping one changes them; generation with the cache runs."""
    model = tiny()
    ids = torch.randint(3, 97, (1, 200))
    logits = {}
    for name, coarse in (("exact", {}), ("all", dict(coarse_regions=4, coarse_topk=13)),
                         ("one", dict(coarse_regions=4, coarse_topk=1))):
        msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3, **coarse))
        with torch.no_grad():
            logits[name] = model(ids).logits
        if name == "one":
            assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 204)
        msattn.hf.unpatch(model)
    assert torch.equal(logits["all"], logits["exact"])
    assert not torch.allclose(logits["one"], logits["exact"], rtol=1e-4, atol=1e-4)


def test_the_packed_mask_is_recognised_only_when_block_causal():
    """msattn's mask function turns a block-causal mask function (what transformers builds for a
    padding-free batch) into the sequences' offsets, and refuses what is not: a sliding window shorter
    than a sequence, attention within a sequence in both directions."""
    from msattn.hf.common import packed_or_padding_mask

    seq = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])  # two rows of 16 tokens

    def packed(b, h, q, kv):
        return (kv <= q) & (seq[b, q] == seq[b, kv])

    offsets = packed_or_padding_mask(2, 16, 16, mask_function=packed)
    assert offsets.dtype == torch.int32 and offsets.tolist() == [0, 5, 12, 16, 25, 32]
    for name, fn in (("window", lambda b, h, q, kv: packed(b, h, q, kv) & (q - kv < 3)),
                     ("both directions", lambda b, h, q, kv: seq[b, q] == seq[b, kv])):
        with pytest.raises(NotImplementedError, match="another mask pattern"):
            packed_or_padding_mask(2, 16, 16, mask_function=fn)
