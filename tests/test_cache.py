"""msattn.hf.cache: MSCache (region sums, decode, the cache contract), chunked prefill."""

import os

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import msattn
import msattn.hf
from hf_compat import output_cache, with_cache
from msattn.hf.cache import InfiniLayer, MSCache, MSLayer

SPARSE = msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3)


def tiny(**kw):
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096, attn_implementation="sdpa")
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("local", [0, 1])
def test_decode_from_region_sums_equals_the_op_on_the_whole_sequence(dtype, pad, local):
    B, Hq, Hkv, D, n = 2, 4, 2, 16, 150
    kw = dict(block_q=4, block_k=4, merge=2, topk=3, local=local)
    q = torch.randn(B, Hq, n, D, dtype=dtype)
    k = torch.randn(B, Hkv, n, D, dtype=dtype)
    v = torch.randn(B, Hkv, n, D, dtype=dtype)
    mask = torch.ones(B, n, dtype=torch.bool)
    if pad:
        mask[1, :37] = False
    layer = MSLayer(block_k=4)
    layer.update(k[:, :, :21], v[:, :, :21])  # a prompt, then one token at a time
    for t in range(21, n):
        keys, values = layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        sums, counts = layer.region_sums(mask[:, :t + 1])
        index = msattn.ms_select(q[:, :, t:t + 1], keys, key_padding_mask=mask[:, :t + 1], key_sums=sums,
                                 key_counts=counts, **kw)
        want_index = msattn.ms_select(q[:, :, t:t + 1], k[:, :, :t + 1], key_padding_mask=mask[:, :t + 1], **kw)
        assert torch.equal(index, want_index)
        got = msattn.ms_attention(q[:, :, t:t + 1], keys, values, key_padding_mask=mask[:, :t + 1], index=index, **kw)
        want = msattn.ms_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                   key_padding_mask=mask[:, :t + 1], **kw)
        assert torch.equal(got, want)


def test_region_sums_equal_sums_from_scratch_after_crop():
    layer = MSLayer(block_k=4)
    k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.region_sums(None)
    layer.crop(-7)  # 23 tokens left: region 5 (20..23) holds 3
    layer.update(k[:, :, 23:50], v[:, :, 23:50])
    sums, counts = layer.region_sums(None)
    fresh = MSLayer(block_k=4)
    fresh.update(k, v)
    want_sums, want_counts = fresh.region_sums(None)
    assert torch.equal(sums[:, :, :13], want_sums[:, :, :13]) and torch.equal(counts[:, :, :13], want_counts[:, :, :13])


def test_crop_follows_the_cache_contract():
    """transformers' ``crop(max_length)``: a length to keep, or a negative number of tokens to drop."""
    k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    for make in (lambda: MSCache(block_k=4), lambda: msattn.hf.InfiniCache(segment_len=64)):
        cache = make()
        cache.update(k, v, 0)
        cache.crop(25)  # keep 25
        assert cache.get_seq_length() == 25 and torch.equal(cache.layers[0].keys, k[:, :, :25])
        cache.crop(-5)  # drop 5
        assert cache.get_seq_length() == 20 and torch.equal(cache.layers[0].values, v[:, :, :20])
        cache.crop(40)  # longer than the cache: nothing to do
        assert cache.get_seq_length() == 20


SLOW = msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3, rope="selected", score_channels="slow")


@pytest.mark.parametrize("config", [SPARSE, SLOW], ids=["ms", "slow-channels"])
def test_generate_uses_ms_cache_and_matches_dynamic_cache(config):
    # a decode step selects from the cache's region sums, a DynamicCache step from the keys: the same
    model = msattn.hf.patch(tiny(), config)
    ids = torch.randint(3, 97, (2, 50))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    kw = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    ms = model.generate(ids, **kw)
    dyn = model.generate(ids, **with_cache(model, DynamicCache(config=model.config)), **kw)
    assert isinstance(output_cache(ms), MSCache) and isinstance(output_cache(dyn), DynamicCache)
    assert output_cache(ms).capacity == 50 + 20  # sized for the prompt and its new tokens
    assert torch.equal(ms.sequences, dyn.sequences)
    for a, b in zip(ms.scores, dyn.scores):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_beam_search_reorders_the_cache():
    model = msattn.hf.patch(tiny(), SPARSE)
    ids = torch.randint(3, 97, (1, 40))
    out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, num_beams=3, do_sample=False)
    ref = model.generate(ids, max_new_tokens=10, min_new_tokens=10, num_beams=3, do_sample=False,
                         **with_cache(model, DynamicCache(config=model.config)))
    assert torch.equal(out, ref)


def test_slow_score_channels_reach_the_selection():
    # head dim 16, theta 1e4, window 4096: 2 of the 8 rotary pairs are slow; the selection (and so the
    # logits) differ from scoring with every channel, and with a window of 1 every pair is slow: the same
    ids = torch.randint(3, 97, (1, 96))
    logits = {}
    for window in (4096, 1):
        for channels in ("all", "slow"):
            torch.manual_seed(0)
            model = msattn.hf.patch(tiny(max_position_embeddings=window), msattn.MSConfig(
                block_q=4, block_k=4, merge=2, topk=3, rope="selected", score_channels=channels))
            with torch.no_grad():
                logits[window, channels] = model(ids).logits
    assert not torch.allclose(logits[4096, "all"], logits[4096, "slow"], atol=1e-3)
    assert torch.equal(logits[1, "all"], logits[1, "slow"])


def test_generation_runs_past_eight_times_the_training_length():
    # a tiny model "trained" at 32 positions generates 8x past them with a bounded key set per group
    model = msattn.hf.patch(tiny(max_position_embeddings=32), SPARSE)
    out = model.generate(torch.randint(3, 97, (1, 32)), max_new_tokens=8 * 32, min_new_tokens=8 * 32,
                         do_sample=False)
    assert out.shape == (1, 9 * 32)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("local", [0, 2])
def test_chunked_prefill_equals_one_call(pad, local):
    config = msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3, local=local)
    model = msattn.hf.patch(tiny(), config)
    n, span = 96, config.span
    ids = torch.randint(3, 97, (2, n))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :13] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    chunks = []
    cache, last = msattn.prefill(model, ids, chunk_size=3 * span, attention_mask=mask,
                                 on_logits=lambda start, logits: chunks.append((start, logits.clone())))
    got = torch.cat([c for _, c in chunks], dim=1)
    assert [s for s, _ in chunks] == list(range(0, n, 3 * span))
    assert cache.get_seq_length() == n
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(last, got[:, -1])


def test_prefill_hands_logits_over_in_bounded_slices(monkeypatch):
    # on_logits never sees more than about LOGITS_BYTES of logits at once: the LM head runs on the
    # hidden states a slice at a time, and the slices put together are the forward's logits
    import msattn.hf.cache as cache_module

    model = msattn.hf.patch(tiny(), msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3))
    vocab = model.config.vocab_size
    monkeypatch.setattr(cache_module, "LOGITS_BYTES", 4 * 2 * vocab * 5)  # 5 positions of 2 rows
    ids = torch.randint(3, 97, (2, 64))
    with torch.no_grad():
        ref = model(ids).logits
    slices = []
    _, last = msattn.prefill(model, ids, chunk_size=32, on_logits=lambda s, x: slices.append((s, x.clone())))
    assert [s for s, _ in slices] == [0, 5, 10, 15, 20, 25, 30, 32, 37, 42, 47, 52, 57, 62]
    assert max(x.shape[1] for _, x in slices) == 5
    torch.testing.assert_close(torch.cat([x for _, x in slices], 1), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(last, slices[-1][1][:, -1])


def test_prefill_bad_input():
    model = msattn.hf.patch(tiny(), SPARSE)
    ids = torch.randint(3, 97, (1, 40))
    with pytest.raises(ValueError, match="multiple of the group span"):
        msattn.prefill(model, ids, chunk_size=SPARSE.span + 1)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        msattn.prefill(model, ids, chunk_size=0)
    with pytest.raises(ValueError, match="input_ids must be"):
        msattn.prefill(model, ids[0], chunk_size=16)
    with pytest.raises(ValueError, match=r"attention_mask must cover the 0 cached tokens and the 40 of input_ids, "
                                         r"shape \(1, 40\), got \(1, 39\)"):
        msattn.prefill(model, ids, chunk_size=16, attention_mask=torch.ones(1, 39))
    cache, _ = msattn.prefill(model, ids, chunk_size=16)
    with pytest.raises(ValueError, match="cover the 40 cached tokens and the 40 of input_ids"):
        msattn.prefill(model, ids, chunk_size=16, cache=cache, attention_mask=torch.ones(1, 40))
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        MSCache(block_k=0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"MSCache: capacity must be a non-negative int \(tokens\), got {bad!r}"):
            MSCache(block_k=4, capacity=bad)


def test_cache_capacity_allocates_once_then_doubles():
    """With ``capacity`` a layer's buffers are allocated once at that size while it suffices (a prompt
    and its new tokens are never copied into a doubled buffer); past it they grow by doubling."""
    k, v = torch.randn(1, 2, 700, 8), torch.randn(1, 2, 700, 8)
    cache = MSCache(block_k=4, capacity=300)
    buffers = set()
    for start in range(0, 300, 100):
        cache.update(k[:, :, start:start + 100], v[:, :, start:start + 100], 0)
        buffers.add(cache.layers[0]._k.data_ptr())
    assert len(buffers) == 1 and cache.layers[0]._k.shape[2] == 300
    cache.update(k[:, :, 300:301], v[:, :, 300:301], 0)
    assert cache.layers[0]._k.shape[2] == 600
    assert torch.equal(cache.layers[0].keys, k[:, :, :301]) and torch.equal(cache.layers[0].values, v[:, :, :301])
    plain = MSCache(block_k=4)  # no capacity: each buffer doubles from 256
    plain.update(k[:, :, :300], v[:, :, :300], 0)
    assert plain.layers[0]._k.shape[2] == 300
    plain.update(k[:, :, 300:301], v[:, :, 300:301], 0)
    assert plain.layers[0]._k.shape[2] == 600


def test_generation_allocates_the_prompt_and_its_new_tokens_once():
    """``greedy_generate`` sizes the cache for the prompt and the new tokens (also with ``exact``, which
    re-feeds the last group): no buffer past it."""
    from msattn.eval.passkey import greedy_generate

    model = msattn.hf.patch(tiny(), SPARSE)
    ids = torch.randint(3, 97, (1, 320))
    seen = []
    original = MSLayer._reserve

    def spy(layer, n, like_k, like_v):
        original(layer, n, like_k, like_v)
        seen.append(layer._k.shape[2])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MSLayer, "_reserve", spy)
        out = greedy_generate(model, ids, 9, chunk_size=64, exact=True)
    assert out.shape == (1, 9) and set(seen) == {320 + 9}


def test_a_dropped_cache_is_freed_at_once():
    """The key tensor points back at its layer weakly: no reference cycle keeps a long cache (and its
    K/V buffers) alive until the cyclic garbage collector happens to run."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        for make in (lambda: MSLayer(block_k=16), lambda: InfiniLayer(segment_len=16)):
            layer = make()
            layer.update(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))
            alive = weakref.ref(layer)
            del layer
            assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("config", [None, msattn.SelfExtendConfig(group_size=4, window=16),
                                    msattn.InfiniConfig(segment_len=32)], ids=["dense", "self_extend", "infini"])
def test_chunked_prefill_of_any_model_equals_one_call(config):
    """``msattn.prefill`` runs an unpatched model and the peer methods too, each with its own cache."""
    model = tiny()
    if config is not None:
        msattn.hf.patch(model, config)
    ids = torch.randint(3, 97, (2, 90))
    with torch.no_grad():
        ref = model(ids).logits
    chunks = []
    cache, last = msattn.prefill(model, ids, chunk_size=32, on_logits=lambda s, logits: chunks.append(logits))
    assert type(cache) is type(msattn.hf.new_cache(model)) and cache.get_seq_length() == 90
    assert torch.allclose(torch.cat(chunks, 1), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(last, chunks[-1][:, -1])


@pytest.mark.parametrize("config", [SPARSE, None, msattn.InfiniConfig(segment_len=16)], ids=["ms", "dense", "infini"])
def test_prefill_continues_a_cache_with_a_padding_mask(config):
    """A left-padded prompt prefilled in two calls gives one call's logits: the second call's positions
    continue from the cache's real tokens, and its mask covers the cache too."""
    model = tiny()
    if config is not None:
        msattn.hf.patch(model, config)
    ids = torch.randint(3, 97, (2, 96))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    with torch.no_grad():  # positions count real tokens, as prefill's (Infini's memory holds rotated keys)
        ref = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    first, second = [], []
    cache, _ = msattn.prefill(model, ids[:, :48], chunk_size=16, attention_mask=mask[:, :48],
                              on_logits=lambda s, logits: first.append(logits))
    _, last = msattn.prefill(model, ids[:, 48:], chunk_size=16, attention_mask=mask, cache=cache,
                             on_logits=lambda s, logits: second.append((s, logits)))
    assert [s for s, _ in second] == [48, 64, 80]
    got = torch.cat(first + [logits for _, logits in second], 1)
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], rtol=1e-5, atol=1e-5)


def _smaps(tensor: torch.Tensor, name: str) -> list[str]:
    """Field ``name`` of the mapping that starts at ``tensor``'s first byte (/proc/self/smaps), split."""
    start = f"{tensor.data_ptr():x}-"
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            for field in lines[i + 1:]:
                if field.startswith(name + ":"):
                    return field.split()[1:]
    raise AssertionError(f"no mapping starts at {start}")


def _resident_kb(tensor: torch.Tensor) -> int:
    """The resident kB of the mapping that starts at ``tensor``'s first byte."""
    return int(_smaps(tensor, "Rss")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_kv_dir_cache_equals_the_memory_cache(tmp_path, dtype):
    """With ``kv_dir`` the keys and values live in unlinked files mapped into memory: prefill in chunks and
    greedy decoding give the in-memory cache's logits bit for bit, also past the capacity (the buffers grow
    into new files), and no file is left in the directory."""
    from msattn.eval.passkey import greedy_generate

    model = msattn.hf.patch(tiny().to(dtype), SPARSE)
    ids = torch.randint(3, 97, (2, 320))
    want, got = [], []
    memory, _ = msattn.prefill(model, ids, chunk_size=64, on_logits=lambda s, x: want.append(x))
    mapped = MSCache(block_k=4, capacity=288, kv_dir=tmp_path)  # too small: grows by doubling
    cache, _ = msattn.prefill(model, ids, chunk_size=64, cache=mapped, on_logits=lambda s, x: got.append(x))
    assert cache is mapped and os.listdir(tmp_path) == []
    assert torch.equal(torch.cat(got, 1), torch.cat(want, 1))
    for a, b in zip(memory.layers, mapped.layers):
        assert b._mappings and not a._mappings and b._k.shape[2] == 576
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    for exact in (False, True):
        a = greedy_generate(model, ids, 7, chunk_size=64, exact=exact)
        b = greedy_generate(model, ids, 7, chunk_size=64, exact=exact, kv_dir=str(tmp_path))
        assert torch.equal(a, b)
    assert os.listdir(tmp_path) == []


def test_kv_dir_beam_search_and_release(tmp_path):
    """Beam search reorders a mapped cache into new mapped buffers (the same tokens as a DynamicCache), and
    when a layer writes, the pages of the layer that wrote before it leave the process: only the layer in
    use is resident."""
    model = msattn.hf.patch(tiny(num_hidden_layers=3), SPARSE)
    ids = torch.randint(3, 97, (1, 40))
    cache = MSCache(block_k=4, kv_dir=tmp_path)
    kw = dict(max_new_tokens=10, min_new_tokens=10, num_beams=3, do_sample=False)
    out = model.generate(ids, **kw, **with_cache(model, cache))
    ref = model.generate(ids, **kw, **with_cache(model, DynamicCache(config=model.config)))
    assert torch.equal(out, ref) and all(layer._mappings for layer in cache.layers)
    cache.layers[0].batch_select_indices(torch.tensor([], dtype=torch.long))  # an empty batch: nothing to map
    assert cache.layers[0].keys.shape[0] == 0 and not cache.layers[0]._mappings
    cache = MSCache(block_k=4, kv_dir=tmp_path)
    msattn.prefill(model, torch.randint(3, 97, (1, 4096)), chunk_size=1024, cache=cache)
    resident = [_resident_kb(layer._k) + _resident_kb(layer._v) for layer in cache.layers]
    assert resident[0] == resident[1] == 0 and resident[2] >= 2 * 4096 * 2 * 16 * 4 // 1024  # K+V of layer 2
    cache.layers[2].release()
    assert _resident_kb(cache.layers[2]._k) == 0
    # advised random access ("rr"): a fault reads its page, not the device's read-ahead around it
    assert all("rr" in _smaps(layer._k, "VmFlags") and "rr" in _smaps(layer._v, "VmFlags") for layer in cache.layers)
    assert torch.isfinite(cache.layers[0].keys).all()  # the data is still there: read back from the files


def test_kv_dir_bad_input(tmp_path, monkeypatch):
    import errno

    with pytest.raises(ValueError, match=r"MSCache: kv_dir must be an existing directory or None, got '/no/such'"):
        MSCache(block_k=4, kv_dir="/no/such")
    for config, name in ((None, "an unpatched model's DynamicCache"),
                         (msattn.SelfExtendConfig(group_size=4, window=16), "SelfExtend's DynamicCache"),
                         (msattn.InfiniConfig(segment_len=16), "Infini-attention's InfiniCache")):
        model = tiny()
        if config is not None:
            msattn.hf.patch(model, config)
        with pytest.raises(ValueError, match=f"kv_dir: only MS attention's cache .* {name} keeps them in memory"):
            msattn.hf.new_cache(model, kv_dir=tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache = MSCache(block_k=4, kv_dir=tmp_path)
    with pytest.raises(OSError, match=r"cannot reserve 16,384 bytes of keys and values in kv_dir .*No space left"):
        cache.update(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), 0)
    assert os.listdir(tmp_path) == []
