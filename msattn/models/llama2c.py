"""Load llama2.c checkpoints (legacy format) as HuggingFace `LlamaForCausalLM`, and its tokenizer.

Checkpoint contract (Karpathy's llama2.c, "legacy" export, little-endian):
  header: 7 int32  dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
          (vocab_size > 0: the classifier shares the token embedding; < 0: a separate classifier
          of |vocab_size| rows is stored at the end)
  then float32 tensors, each an `nn.Linear` weight (out_features, in_features), row-major:
          token_embedding (V, C); rms_att (L, C); wq (L, Hq*D, C); wk (L, Hkv*D, C); wv (L, Hkv*D, C);
          wo (L, C, Hq*D); rms_ffn (L, C); w1 (L, F, C); w2 (L, C, F); w3 (L, F, C); rms_final (C);
          freq_cis_real (T, D/2); freq_cis_imag (T, D/2)  (unused); [wcls (V, C) when vocab_size < 0]
  The file holds exactly these bytes: a longer or shorter file is an error.

Legend: V vocab, C dim, F hidden_dim, L layers, Hq query heads, Hkv key/value heads, D = C / Hq head
size, T seq_len.

llama2.c rotates interleaved pairs (x[2i], x[2i+1]) of each head; HuggingFace Llama rotates halves
(x[i], x[i+D/2]). The rows of wq and wk are therefore permuted within each head (`_interleaved_to_halves`),
the same permutation as transformers' own Meta-to-HF conversion.

Tokenizer contract (`tok*.bin`): int32 max_token_length, then per token until the end of the file:
float32 score, int32 byte length, the token's bytes. Token 1 is BOS, token 2 EOS, tokens 3..258 are the
byte tokens `<0x00>`..`<0xFF>`.
"""

import heapq
import os
import re
import struct

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

__all__ = ["Llama2cTokenizer", "load_llama2c"]

_HEADER = struct.Struct("<7i")
_HEADER_NAMES = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def _read(path, what):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        return path, f.read()


# ---------------------------------------------------------------------------------------------
# checkpoint


def _interleaved_to_halves(w, n_heads):
    """Rows of a q/k projection (n_heads*D, C): per head, pair rows (2i, 2i+1) become rows (i, i+D/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_checkpoint(path):
    """Returns (header dict, shared_classifier, dict of llama2.c-named fp32 tensors)."""
    path, raw = _read(path, "llama2.c checkpoint")
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path}: truncated llama2.c checkpoint: {len(raw)} bytes, "
                         f"the header alone needs {_HEADER.size}")
    header = dict(zip(_HEADER_NAMES, _HEADER.unpack_from(raw)))
    shared = header["vocab_size"] > 0
    header["vocab_size"] = abs(header["vocab_size"])
    C, F, L, Hq, Hkv, V, T = header.values()
    if min(header.values()) <= 0 or C % Hq or Hq % Hkv or (C // Hq) % 2:
        raise ValueError(f"{path}: not a llama2.c checkpoint: implausible header {header} (need all "
                         "positive, dim divisible by n_heads, n_heads by n_kv_heads, an even head size)")
    D = C // Hq
    shapes = {
        "token_embedding": (V, C), "rms_att": (L, C), "wq": (L, Hq * D, C), "wk": (L, Hkv * D, C),
        "wv": (L, Hkv * D, C), "wo": (L, C, Hq * D), "rms_ffn": (L, C), "w1": (L, F, C),
        "w2": (L, C, F), "w3": (L, F, C), "rms_final": (C,), "freq_cis_real": (T, D // 2),
        "freq_cis_imag": (T, D // 2),
    }
    if not shared:
        shapes["wcls"] = (V, C)
    counts = [torch.Size(s).numel() for s in shapes.values()]
    expected = _HEADER.size + 4 * sum(counts)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(f"{path}: llama2.c checkpoint {problem}: header {header} "
                         f"({'shared' if shared else 'separate'} classifier) implies {expected} bytes, "
                         f"file has {len(raw)}")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.float32, offset=_HEADER.size)
    tensors = dict(zip(shapes, (t.view(s) for t, s in zip(flat.split(counts), shapes.values()))))
    return header, shared, tensors


def load_llama2c(checkpoint_path, tokenizer_path=None, *, dtype=torch.float32, attn_implementation="sdpa"):
    """Load a legacy llama2.c checkpoint as an eval-mode `transformers.LlamaForCausalLM`.

    Args:
        checkpoint_path: the `.bin` checkpoint (format in the module docstring).
        tokenizer_path: optional llama2.c tokenizer file (`tok512.bin`, `tokenizer.bin`); its size
            must match the checkpoint's vocab_size.
        dtype: dtype of the returned model's parameters (the file is always fp32).
        attn_implementation: passed to the config ("sdpa", "eager", a registered custom name, or
            None for transformers' default choice).

    Returns:
        (model, tokenizer): the model takes input_ids (B, N) and returns logits (B, N, V); the
        tokenizer is a `Llama2cTokenizer`, or None when no tokenizer_path is given.
    """
    header, shared, w = _read_checkpoint(checkpoint_path)
    n_heads, n_kv_heads = header["n_heads"], header["n_kv_heads"]
    config = LlamaConfig(
        vocab_size=header["vocab_size"], hidden_size=header["dim"], intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=header["seq_len"], rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2, attn_implementation=attn_implementation,
    )
    state = {"model.embed_tokens.weight": w["token_embedding"], "model.norm.weight": w["rms_final"],
             "lm_head.weight": w["token_embedding"] if shared else w["wcls"]}
    for i in range(header["n_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": w["rms_att"][i],
            p + "self_attn.q_proj.weight": _interleaved_to_halves(w["wq"][i], n_heads),
            p + "self_attn.k_proj.weight": _interleaved_to_halves(w["wk"][i], n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "post_attention_layernorm.weight": w["rms_ffn"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
        })
    # Built in `dtype` the way from_pretrained does it, so the RoPE inv_freq buffer stays fp32.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True)
    model.eval()

    tokenizer = None
    if tokenizer_path is not None:
        tokenizer = Llama2cTokenizer(tokenizer_path)
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens, checkpoint "
                             f"{os.fspath(checkpoint_path)} has vocab_size {config.vocab_size}")
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# tokenizer

# llama2.c starts its best-merge search at `float best_score = -1e10` (exact in fp32): pairs scoring no
# higher never merge.
_NO_MERGE_SCORE = -1e10
_BYTE_TOKEN = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer:
    """The llama2.c tokenizer: byte-fallback BPE over a `tok*.bin` vocabulary (format in the module docstring).

    `encode` reproduces llama2.c's `encode` (run.c) token for token; `decode` concatenates pieces the way
    llama2.c prints them. Ids are plain Python ints in [0, vocab_size).
    """

    bos_id = 1
    eos_id = 2

    def __init__(self, path):
        self.path, raw = _read(path, "llama2.c tokenizer")
        if len(raw) < 4:
            raise ValueError(f"{self.path}: truncated llama2.c tokenizer: {len(raw)} bytes, "
                             "the max_token_length header needs 4")
        (self.max_token_length,) = struct.unpack_from("<i", raw)
        self.pieces, self.scores, offset = [], [], 4
        while offset < len(raw):
            if offset + 8 > len(raw):
                raise ValueError(f"{self.path}: truncated llama2.c tokenizer: token {len(self.pieces)} "
                                 f"header at byte {offset} needs 8 bytes, {len(raw) - offset} left")
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            if not 0 <= length <= len(raw) - offset:
                raise ValueError(f"{self.path}: truncated or corrupt llama2.c tokenizer: token "
                                 f"{len(self.pieces)} claims {length} bytes at byte {offset}, "
                                 f"{len(raw) - offset} left")
            self.pieces.append(raw[offset:offset + length])
            self.scores.append(score)
            offset += length
        if len(self.pieces) <= self.eos_id:
            raise ValueError(f"{self.path}: llama2.c tokenizer has {len(self.pieces)} tokens, "
                             "need at least <unk>, BOS and EOS")
        self._ids = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)
        # What llama2.c prints for each token: byte tokens become their byte.
        self._text = [bytes([int(m[1], 16)]) if (m := _BYTE_TOKEN.fullmatch(p)) else p for p in self.pieces]

    @property
    def vocab_size(self):
        return len(self.pieces)

    def to_dict(self) -> dict:
        """What a checkpoint's ``msattn.json`` records of this tokenizer: its file's absolute path."""
        return {"type": "Llama2cTokenizer", "path": os.path.abspath(self.path)}

    def encode(self, text, bos=True, eos=False):
        """str -> list[int]: [BOS] + (" " token if text) + per-character tokens merged by best score + [EOS].

        Each UTF-8 character (at most 4 bytes) is looked up whole; an unknown one becomes byte
        tokens (byte + 3). Then the adjacent pair whose concatenation is a token with the highest
        score is merged, leftmost first on ties, until no pair merges. A heap finds the same merges
        as llama2.c's quadratic rescan.
        """
        ids = [self.bos_id] if bos else []
        data = text.encode("utf-8")
        if data:
            ids.append(self._ids.get(b" ", ord(" ") + 3))
        char = bytearray()
        for i, byte in enumerate(data):
            if byte & 0xC0 != 0x80:  # not a continuation byte: a new character starts
                char.clear()
            char.append(byte)
            next_byte = data[i + 1] if i + 1 < len(data) else 0
            if next_byte & 0xC0 == 0x80 and len(char) < 4:
                continue
            token = self._ids.get(bytes(char))
            ids.extend([token] if token is not None else [b + 3 for b in char])
            char.clear()
        ids = self._merge(ids)
        return ids + [self.eos_id] if eos else ids

    def _merge(self, ids):
        # Doubly linked list over positions; the heap holds (-score, left position, right position,
        # merged id) and stale entries are skipped when popped.
        n = len(ids)
        next_pos, prev_pos = list(range(1, n + 1)), list(range(-1, n - 1))
        alive = [True] * n
        heap = []

        def push(left):
            right = next_pos[left] if left >= 0 else n
            if left < 0 or right >= n:
                return
            merged = self._ids.get(self.pieces[ids[left]] + self.pieces[ids[right]])
            if merged is not None and self.scores[merged] > _NO_MERGE_SCORE:
                heapq.heappush(heap, (-self.scores[merged], left, right, merged))

        for pos in range(n - 1):
            push(pos)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not (alive[left] and alive[right] and next_pos[left] == right
                    and self._ids.get(self.pieces[ids[left]] + self.pieces[ids[right]]) == merged):
                continue
            ids[left], alive[right] = merged, False
            next_pos[left] = next_pos[right]
            if next_pos[right] < n:
                prev_pos[next_pos[right]] = left
            push(prev_pos[left])
            push(left)
        return [token for token, keep in zip(ids, alive) if keep]

    def decode(self, ids):
        """list[int] -> str. BOS and EOS print nothing; the leading space of the token right after BOS is
        dropped (as llama2.c and sentencepiece do); byte tokens become bytes; invalid UTF-8 is replaced."""
        out, prev = bytearray(), None
        for token in ids:
            token = int(token)
            if token not in (self.bos_id, self.eos_id):
                piece = self._text[token]
                out += piece[1:] if prev == self.bos_id and piece.startswith(b" ") else piece
            prev = token
        return out.decode("utf-8", errors="replace")
