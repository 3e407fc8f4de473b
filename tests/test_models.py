"""msattn.models: the llama2.c checkpoint loader and tokenizer.

The stories260K tests read ../shared/data (see its README) and skip without it; the others write tiny
llama2.c files themselves and check them against independent references in this file: a literal port
of llama2.c's `encode`, and an fp64 forward pass in llama2.c's own layout (interleaved-pair RoPE).
"""

import math
import struct
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from msattn.models import Llama2cTokenizer, load_llama2c

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260K"
needs_stories = pytest.mark.skipif(
    not (STORIES / "stories260K.bin").is_file() or not (STORIES / "tok512.bin").is_file(),
    reason=f"stories260K data absent (expected {STORIES}/stories260K.bin and tok512.bin)",
)


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin")


# ---------------------------------------------------------------------------------------------
# references


def encode_ref(tok, text, bos=True, eos=False):
    """llama2.c run.c `encode`, line for line (quadratic rescan of all pairs per merge)."""
    lookup = {}
    for i, piece in enumerate(tok.pieces):
        lookup.setdefault(piece, i)
    tokens = [1] if bos else []
    data = text.encode("utf-8")
    if data:
        tokens.append(lookup[b" "])
    buf = b""
    for i, c in enumerate(data):
        if (c & 0xC0) != 0x80:
            buf = b""
        buf += bytes([c])
        if i + 1 < len(data) and (data[i + 1] & 0xC0) == 0x80 and len(buf) < 4:
            continue
        tokens += [lookup[buf]] if buf in lookup else [b + 3 for b in buf]
        buf = b""
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(tok.pieces[tokens[i]] + tok.pieces[tokens[i + 1]], -1)
            if merged != -1 and tok.scores[merged] > best_score:
                best_score, best_id, best_idx = tok.scores[merged], merged, i
        if best_idx == -1:
            break
        tokens[best_idx:best_idx + 2] = [best_id]
    return tokens + [2] if eos else tokens


def forward_ref(w, tokens):
    """fp64 llama2.c forward (its model.py) on llama2.c-layout weights; tokens (N,) -> logits (N, V)."""
    n_heads, n_kv_heads = w["n_heads"], w["n_kv_heads"]
    N, C = len(tokens), w["token_embedding"].shape[1]
    D = C // n_heads
    w = {k: v.double() if torch.is_tensor(v) else v for k, v in w.items()}
    freqs = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(N, D // 2, dtype=torch.float64), torch.outer(torch.arange(N).double(), freqs))

    def rope(t):  # (N, H, D), rotating pairs (2i, 2i+1)
        t = torch.view_as_complex(t.reshape(N, -1, D // 2, 2)) * rot[:, None]
        return torch.view_as_real(t).reshape(N, -1, D)

    def rmsnorm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    causal = torch.full((N, N), -math.inf, dtype=torch.float64).triu(1)
    x = w["token_embedding"][tokens]
    for l in range(len(w["wq"])):
        h = rmsnorm(x, w["rms_att"][l])
        q = rope((h @ w["wq"][l].T).view(N, n_heads, D))
        k = rope((h @ w["wk"][l].T).view(N, n_kv_heads, D)).repeat_interleave(n_heads // n_kv_heads, 1)
        v = (h @ w["wv"][l].T).view(N, n_kv_heads, D).repeat_interleave(n_heads // n_kv_heads, 1)
        p = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D) + causal).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", p, v).reshape(N, C) @ w["wo"][l].T
        h = rmsnorm(x, w["rms_ffn"][l])
        x = x + (torch.nn.functional.silu(h @ w["w1"][l].T) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


# ---------------------------------------------------------------------------------------------
# writers of tiny llama2.c files


def random_hf_model(shared, C=32, F=40, L=2, n_heads=4, n_kv_heads=2, V=37, T=16):
    config = LlamaConfig(
        vocab_size=V, hidden_size=C, intermediate_size=F, num_hidden_layers=L, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, max_position_embeddings=T, rms_norm_eps=1e-5,
        tie_word_embeddings=shared, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.25)
    return model


def halves_to_interleaved(w, n_heads):
    """HF q/k rows (i, i+D/2) of each head -> llama2.c rows (2i, 2i+1)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_llama2c(model, path):
    """Write an HF Llama in the legacy llama2.c format; returns the llama2.c-layout weights written."""
    cfg, sd = model.config, model.state_dict()
    C, F, L, V, T = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size,
                     cfg.max_position_embeddings)
    n_heads, n_kv_heads, D = cfg.num_attention_heads, cfg.num_key_value_heads, C // cfg.num_attention_heads

    def stack(name, fix=lambda t: t):
        return torch.stack([fix(sd[f"model.layers.{l}.{name}.weight"]) for l in range(L)])

    angles = torch.outer(torch.arange(T).float(), 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D))
    w = {
        "token_embedding": sd["model.embed_tokens.weight"], "rms_att": stack("input_layernorm"),
        "wq": stack("self_attn.q_proj", lambda t: halves_to_interleaved(t, n_heads)),
        "wk": stack("self_attn.k_proj", lambda t: halves_to_interleaved(t, n_kv_heads)),
        "wv": stack("self_attn.v_proj"), "wo": stack("self_attn.o_proj"),
        "rms_ffn": stack("post_attention_layernorm"), "w1": stack("mlp.gate_proj"),
        "w2": stack("mlp.down_proj"), "w3": stack("mlp.up_proj"), "rms_final": sd["model.norm.weight"],
        "freq_cis_real": angles.cos(), "freq_cis_imag": angles.sin(),
    }
    if not cfg.tie_word_embeddings:
        w["wcls"] = sd["lm_head.weight"]
    header = struct.pack("<7i", C, F, L, n_heads, n_kv_heads, V if cfg.tie_word_embeddings else -V, T)
    path.write_bytes(header + b"".join(t.float().contiguous().numpy().tobytes() for t in w.values()))
    w.setdefault("wcls", w["token_embedding"])
    return w | {"n_heads": n_heads, "n_kv_heads": n_kv_heads}


def write_tokenizer(path, pieces, scores):
    body = b"".join(struct.pack("<fi", s, len(p)) + p for p, s in zip(pieces, scores))
    path.write_bytes(struct.pack("<i", max(map(len, pieces))) + body)


# ---------------------------------------------------------------------------------------------
# 1. stories260K: the conversion reproduces the published greedy story


@needs_stories
def test_stories260k_greedy(stories):
    model, tok = stories
    assert (model.config.vocab_size, model.config.num_key_value_heads, tok.vocab_size) == (512, 4, 512)
    assert not model.training and model.config.tie_word_embeddings
    prompt = torch.tensor([[tok.bos_id]])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                             do_sample=False, pad_token_id=tok.eos_id)
    text = tok.decode(out[0].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily. "
                           "She loved to play outside in the park."), text


# ---------------------------------------------------------------------------------------------
# 2. tokenizer

TEXTS = ["Once upon a time", "Lily and Ben went to the park.\nThey played!", "  two  spaces ",
         "café, naïve, Zürich", "☃ 日本語 🙂 — “quotes”", "x", ""]


@needs_stories
@pytest.mark.parametrize("text", TEXTS)
def test_stories_tokenizer_matches_llama2c(stories, text):
    tok = stories[1]
    ids = tok.encode(text)
    assert ids == encode_ref(tok, text)
    assert ids[0] == tok.bos_id and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=False, eos=True) == ids[1:] + [tok.eos_id]


@needs_stories
def test_stories_tokenizer_known_ids(stories):
    tok = stories[1]
    # the ids stories260K itself generates for this opening (test_stories260k_greedy)
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.decode([1, 403, 407, 261, 378, 2]) == "Once upon a time"
    snowman = tok.encode("☃", bos=False)  # not in tok512: a " " token, then its three byte tokens
    assert snowman[1:] == [b + 3 for b in "☃".encode()] and tok.decode(snowman) == " ☃"
    assert tok.decode([1, 0xE2 + 3]) == "\ufffd"  # a lone lead byte decodes with replacement


@needs_stories
def test_stories_tokenizer_long_text(stories):
    tok = stories[1]
    austen = STORIES.parent / "austen" / "persuasion.txt"
    text = austen.read_text()[20000:21500] if austen.is_file() else " ".join(TEXTS) * 20
    assert tok.encode(text) == encode_ref(tok, text)


def test_tokenizer_merge_order(tmp_path):
    """A tiny vocab with tied scores and competing merges: the heap agrees with llama2.c's rescan."""
    specials = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    merges = {b" ": 0.0, b"a": 0.0, b"b": 0.0, b"ab": -1.0, b"ba": -1.0, b"aa": -1.0, b" a": -2.0,
              b"aba": -1.0, b"abab": -0.5, b"bab": -3.0, b"aab": -2.0, b"\xc3\xa9": 0.0, b"\xc3\xa9a": -1.0}
    path = tmp_path / "tok.bin"
    write_tokenizer(path, specials + list(merges), [0.0] * len(specials) + list(merges.values()))
    tok = Llama2cTokenizer(path)
    assert tok.vocab_size == len(specials) + len(merges)
    for _ in range(200):
        text = "".join("ab éc🙂"[i] for i in torch.randint(0, 6, (int(torch.randint(0, 14, ())),)))
        assert tok.encode(text) == encode_ref(tok, text), text
        assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------
# 3. tiny written checkpoints: same logits as the HF model and as llama2.c's own forward


@pytest.mark.parametrize("shared", [True, False], ids=["shared_classifier", "separate_classifier"])
def test_tiny_checkpoint_logits(tmp_path, shared):
    reference = random_hf_model(shared)
    weights = write_llama2c(reference, tmp_path / "tiny.bin")
    model, tok = load_llama2c(tmp_path / "tiny.bin", attn_implementation="eager")
    assert tok is None and not model.training
    assert model.config.tie_word_embeddings == shared
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    tokens = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        logits, expected = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the written file really is llama2.c's layout: its own forward gives the same logits
    for b in range(2):
        ref = forward_ref(weights, tokens[b])
        assert (logits[b].double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_tiny_checkpoint_sdpa_and_dtype(tmp_path):
    reference = random_hf_model(False)
    write_llama2c(reference, tmp_path / "tiny.bin")
    fp32, _ = load_llama2c(tmp_path / "tiny.bin")
    bf16, _ = load_llama2c(tmp_path / "tiny.bin", dtype=torch.bfloat16)
    assert fp32.config._attn_implementation == "sdpa" and bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained leaves it
    tokens = torch.randint(0, 37, (1, 16))
    with torch.no_grad():
        expected = reference(tokens).logits
        torch.testing.assert_close(fp32(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        error = (bf16(tokens).logits.float() - expected).abs().max() / expected.abs().max()
    assert error < 0.05


# ---------------------------------------------------------------------------------------------
# 4. bad input


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.bin: llama2.c checkpoint not found"):
        load_llama2c(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match=r"tok\.bin: llama2.c tokenizer not found"):
        Llama2cTokenizer(tmp_path / "tok.bin")


def test_bad_checkpoints(tmp_path):
    path = tmp_path / "tiny.bin"
    write_llama2c(random_hf_model(True), path)
    good = path.read_bytes()
    cases = {
        good[:-4]: r"tiny\.bin: llama2.c checkpoint truncated: .* implies \d+ bytes, file has \d+",
        good + b"\0" * 8: r"tiny\.bin: llama2.c checkpoint has trailing bytes",
        good[:20]: r"tiny\.bin: truncated llama2.c checkpoint: 20 bytes, the header alone needs 28",
        struct.pack("<7i", 32, 40, 2, 3, 1, 37, 16) + good[28:]: r"implausible header",
        b"": r"truncated",
    }
    for data, message in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            load_llama2c(path)


def test_bad_tokenizers(tmp_path):
    path = tmp_path / "tok.bin"
    write_tokenizer(path, [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"hello"], [0.0] * 4)
    good = path.read_bytes()
    for data, message in {good[:-2]: r"token 3 claims 5 bytes", good[:-7]: r"token 3 header .* needs 8",
                          good[:2]: r"needs 4", good[:4]: r"has 0 tokens"}.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"tok\.bin: .*" + message):
            Llama2cTokenizer(path)
    path.write_bytes(good)
    write_llama2c(random_hf_model(True), tmp_path / "tiny.bin")
    with pytest.raises(ValueError, match=r"tokenizer has 4 tokens, checkpoint .*tiny\.bin has vocab_size 37"):
        load_llama2c(tmp_path / "tiny.bin", path)


# ---------------------------------------------------------------------------------------------
# the converted stories260K model under MS attention

PERSUASION = STORIES.parent / "austen" / "persuasion.txt"


def _persuasion_chunks(tokenizer, n, length=512):
    text = PERSUASION.read_text(encoding="utf-8")[:40_000]  # the start of the novel: a few chunks are enough
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    assert len(ids) >= n * length
    return ids[:n * length].view(n, length)


@needs_stories
def test_stories260k_covering_config_equals_dense(stories):
    import msattn
    import msattn.hf

    model, tokenizer = stories
    chunks = _persuasion_chunks(tokenizer, 2)
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


@needs_stories
def test_stories260k_sparse_perplexity_next_to_dense(stories):
    import msattn
    import msattn.hf

    model, tokenizer = stories
    chunks = _persuasion_chunks(tokenizer, 4)
    sparse = msattn.MSConfig(block_q=16, block_k=16, merge=4, topk=8)
    assert not sparse.covers(chunks.shape[1])

    def perplexity():
        with torch.no_grad():
            return math.exp(model(input_ids=chunks, labels=chunks).loss.item())

    dense_ppl = perplexity()
    msattn.hf.patch(model, sparse)
    try:
        sparse_ppl = perplexity()
    finally:
        msattn.hf.unpatch(model)
    print(f"\nstories260K on persuasion.txt, {chunks.shape[0]} chunks of {chunks.shape[1]} tokens: "
          f"dense perplexity {dense_ppl:.3f}, MS {sparse} perplexity {sparse_ppl:.3f} "
          f"(ratio {sparse_ppl / dense_ppl:.4f})")
    assert math.isfinite(dense_ppl) and math.isfinite(sparse_ppl)
    assert sparse_ppl != dense_ppl  # the sparse config really drops keys
    assert sparse_ppl < 2 * dense_ppl
