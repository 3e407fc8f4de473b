"""CRD NTK rotary embedding, its Trainer schedule, and compact tables (msattn/rope.py).

Expected values are computed here from the formulas in fp64, independently of the module."""

import json
import math
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GlmConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from msattn.rope import (CRDNTK, CRDNTKCallback, CRDNTKRotaryEmbedding, compact_rope_tables,  # noqa: E402
                         slow_rotary_channels)

THETA = 500.0
ORIG_LEN = 32


def llama_config(**overrides):
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=ORIG_LEN,
        rope_theta=THETA,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def expected_cos_sin(positions, base, rotary_dim):
    """fp64 cos/sin ``(B, L, rotary_dim)`` in HF's duplicated layout, straight from the definition."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def ntk_base(theta, scale, cycle, orig_len, d):
    return theta * (scale * cycle / orig_len - (scale - 1)) ** (d / (d - 2))


# ----------------------------------------------------------------------------
# equality with HF where the formula leaves the base alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "crd_kwargs, mode",
    [
        # cycle = orig_len: s * cycle / orig_len - (s - 1) = 1 for every s
        (dict(cycle=ORIG_LEN, max_shift=0, scale_start=1.0, scale_max=1.0), "train"),
        (dict(cycle=ORIG_LEN, max_shift=0, scale_start=16.0, scale_max=64.0), "train"),
        (dict(cycle=ORIG_LEN, max_shift=8, scale_start=16.0, scale_max=64.0, inference_scale=1.0), "eval"),
    ],
)
def test_equals_llama_rotary_when_base_is_theta(crd_kwargs, mode, dtype):
    config = llama_config()
    hf = LlamaRotaryEmbedding(config)
    crd = CRDNTKRotaryEmbedding(CRDNTK(**crd_kwargs), config)
    crd.train(mode == "train")
    assert crd.base == THETA
    batch, length = 3, ORIG_LEN
    x = torch.randn(batch, length, config.hidden_size, dtype=dtype)
    position_ids = torch.arange(length).unsqueeze(0).expand(batch, -1)
    cos, sin = crd(x, position_ids)
    cos_hf, sin_hf = hf(x, position_ids)
    assert cos.dtype == dtype and cos.shape == (batch, length, config.head_dim)
    torch.testing.assert_close(cos, cos_hf, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_hf, rtol=0, atol=0)


def test_replaces_rotary_of_a_llama_model():
    config = llama_config()
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        model.model.rotary_emb = CRDNTKRotaryEmbedding(
            CRDNTK(cycle=ORIG_LEN, max_shift=4, scale_max=16.0, inference_scale=1.0), config
        ).eval()
        out = model(ids).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        model.model.rotary_emb = CRDNTKRotaryEmbedding(
            CRDNTK(cycle=ORIG_LEN, max_shift=4, scale_max=16.0, inference_scale=8.0), config
        ).eval()
        assert not torch.allclose(model(ids).logits, ref)


# ----------------------------------------------------------------------------
# the formulas


@pytest.mark.parametrize("scale", [1.0, 3.0, 16.0])
def test_training_positions_and_base_follow_the_formula(scale):
    config = llama_config()
    cycle, max_shift = 48, 40
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=cycle, max_shift=max_shift, scale_start=1.0, scale_max=16.0), config)
    rot.train()
    rot.scale = scale
    d = config.head_dim
    base = ntk_base(THETA, scale, cycle, ORIG_LEN, d)
    assert math.isclose(rot.training_base, base, rel_tol=1e-12)
    assert rot.base == rot.training_base

    batch, length = 3, 70  # longer than the cycle: positions wrap inside a sequence
    x = torch.randn(batch, length, config.hidden_size)
    position_ids = torch.arange(length).unsqueeze(0)  # (1, L), as HF passes it
    torch.manual_seed(1234)
    cos, sin = rot(x, position_ids)
    torch.manual_seed(1234)
    shift = torch.randint(0, max_shift, (batch, 1))
    positions = (position_ids + shift) % cycle
    cos_ref, sin_ref = expected_cos_sin(positions, base, d)
    assert cos.shape == (batch, length, d)
    torch.testing.assert_close(cos.double(), cos_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin.double(), sin_ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("scale", [1.0, 2.0, 16.0])
def test_training_frequencies_equal_hf_dynamic_ntk_at_seq_len_cycle(scale):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cycle = 3 * ORIG_LEN
    dynamic = llama_config(rope_parameters={"rope_type": "dynamic", "factor": scale, "rope_theta": THETA})
    inv_freq_hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](dynamic, "cpu", seq_len=cycle)
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=cycle, max_shift=0, scale_start=1.0, scale_max=16.0), llama_config())
    rot.scale = scale
    torch.testing.assert_close(rot.train().frequencies(), inv_freq_hf, rtol=0, atol=0)


def test_training_shift_is_per_sequence_and_within_range():
    cycle, max_shift = 64, 16
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=cycle, max_shift=max_shift, scale_max=16.0), llama_config()).train()
    batch, length = 256, 150
    position_ids = torch.arange(length).unsqueeze(0)
    positions = rot.positions(position_ids, batch)
    assert positions.shape == (batch, length)
    assert positions.min() >= 0 and positions.max() < cycle
    shift = positions[:, :1]  # position 0 + r
    assert shift.min() >= 0 and shift.max() < max_shift
    assert len(shift.unique()) > max_shift // 2  # drawn per sequence, not once per batch
    torch.testing.assert_close(positions, (position_ids + shift) % cycle, rtol=0, atol=0)
    assert (positions[:, 1:] < positions[:, :-1]).any()  # wrapped


def test_no_shift_still_wraps():
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=10, max_shift=0, scale_max=16.0, orig_len=8), llama_config()).train()
    positions = rot.positions(torch.arange(25).unsqueeze(0), 2)
    torch.testing.assert_close(positions, (torch.arange(25) % 10).expand(2, -1), rtol=0, atol=0)


@pytest.mark.parametrize("inference_scale", [None, 2.0, 37.5])
def test_eval_keeps_positions_and_uses_the_inference_base(inference_scale):
    config = llama_config()
    crd = CRDNTK(cycle=64, max_shift=32, scale_start=4.0, scale_max=8.0, inference_scale=inference_scale)
    rot = CRDNTKRotaryEmbedding(crd, config).eval()
    rot.scale = 8.0  # the training scale must not matter in eval mode
    d = config.head_dim
    s = inference_scale if inference_scale is not None else 8.0 * 64 / ORIG_LEN - 7.0
    base = THETA * s ** (d / (d - 2))
    assert math.isclose(rot.inference_base, base, rel_tol=1e-12) and rot.base == rot.inference_base

    position_ids = torch.randint(0, 5000, (2, 33))
    x = torch.randn(2, 33, config.hidden_size)
    cos, sin = rot(x, position_ids)
    cos2, _ = rot(x, position_ids)
    torch.testing.assert_close(cos, cos2, rtol=0, atol=0)  # no randomness in eval
    cos_ref, sin_ref = expected_cos_sin(position_ids, base, d)
    torch.testing.assert_close(cos.double(), cos_ref, rtol=0, atol=2e-3)  # float32 angles up to 5000 rad
    torch.testing.assert_close(sin.double(), sin_ref, rtol=0, atol=2e-3)


def test_partial_rotary_factor_is_honoured():
    config = GlmConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=ORIG_LEN,
        partial_rotary_factor=0.5,
        pad_token_id=None,
    )
    # cycle = orig_len keeps the base at theta; positions stay below the cycle
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=ORIG_LEN, max_shift=0, scale_max=16.0), config).train()
    assert rot.rotary_dim == 8 and rot.head_dim == 16
    x = torch.randn(1, ORIG_LEN, 64)
    position_ids = torch.arange(ORIG_LEN).unsqueeze(0)
    cos, sin = rot(x, position_ids)
    cos_hf, sin_hf = GlmRotaryEmbedding(config)(x, position_ids)
    assert cos.shape == cos_hf.shape == (1, ORIG_LEN, 8)
    torch.testing.assert_close(cos, cos_hf, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_hf, rtol=0, atol=0)
    # d in the exponent d / (d - 2) is the rotary dim
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=64, max_shift=0, scale_start=1.0, scale_max=4.0), config).train()
    rot.scale = 3.0
    cos, _ = rot(x, position_ids)
    cos_ref, _ = expected_cos_sin(position_ids, ntk_base(config.rope_parameters["rope_theta"], 3.0, 64, ORIG_LEN, 8), 8)
    torch.testing.assert_close(cos.double(), cos_ref, rtol=0, atol=2e-5)


def test_explicit_numbers_without_config_and_precedence():
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=64, max_shift=0, scale_max=16.0), head_dim=32, theta=1e4, orig_len=16)
    assert (rot.rotary_dim, rot.theta, rot.orig_len) == (32, 1e4, 16)
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=64, max_shift=0, scale_max=16.0, base=123.0, orig_len=20), llama_config())
    assert (rot.theta, rot.orig_len) == (123.0, 20)
    with pytest.raises(ValueError, match="theta"):
        CRDNTKRotaryEmbedding(CRDNTK(cycle=64, max_shift=0, scale_max=16.0), head_dim=32, orig_len=16)


# ----------------------------------------------------------------------------
# compact tables


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compact_tables_match_the_module(mode):
    config = llama_config()
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=48, max_shift=20, scale_start=2.0, scale_max=16.0), config)
    rot.train(mode == "train")
    length = 97
    torch.manual_seed(7)
    cos, sin = compact_rope_tables(rot, length)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (length, config.head_dim // 2)
    assert cos.is_contiguous() and sin.is_contiguous()
    torch.manual_seed(7)
    cos_full, sin_full = rot(torch.zeros(1, 1), torch.arange(length).unsqueeze(0))
    torch.testing.assert_close(cos, cos_full[0, :, : config.head_dim // 2], rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_full[0, :, config.head_dim // 2 :], rtol=0, atol=0)


def test_compact_tables_of_hf_rotary_rotate_like_rotate_half():
    config = llama_config()
    hf = LlamaRotaryEmbedding(config)
    length, d = 50, config.head_dim
    cos, sin = compact_rope_tables(hf, length)
    cos_ref, sin_ref = expected_cos_sin(torch.arange(length), THETA, d)
    torch.testing.assert_close(cos.double(), cos_ref[:, : d // 2], rtol=0, atol=2e-5)
    torch.testing.assert_close(sin.double(), sin_ref[:, : d // 2], rtol=0, atol=2e-5)
    # pairs (x[i], x[i + d/2]) rotated by the table equal HF's apply_rotary_pos_emb
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = torch.randn(1, 2, length, d)
    q_hf, _ = apply_rotary_pos_emb(q, q, *hf(q, torch.arange(length).unsqueeze(0)))
    x1, x2 = q[..., : d // 2], q[..., d // 2 :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    torch.testing.assert_close(rotated, q_hf, rtol=1e-6, atol=1e-6)


def test_compact_tables_reject_non_duplicated_layout():
    class Interleaved(torch.nn.Module):
        def forward(self, x, position_ids):
            angles = position_ids[..., None].float() * torch.linspace(1.0, 0.01, 8)
            return angles.cos(), angles.sin()

    with pytest.raises(ValueError, match="rotate_half"):
        compact_rope_tables(Interleaved(), 10)


# ----------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("cycle", 0),
        ("cycle", 2.5),
        ("max_shift", -1),
        ("max_shift", 65),  # > cycle
        ("base", 0.0),
        ("base", float("nan")),
        ("orig_len", 0),
        ("scale_start", 0.5),
        ("growth", 0.9),
        ("grow_every", 0),
        ("grow_every", True),
        ("scale_max", 8.0),  # < scale_start
        ("scale_max", float("inf")),
        ("inference_scale", 0.0),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    kwargs = dict(cycle=64, max_shift=8, scale_start=16.0, scale_max=32.0)
    kwargs[field] = value
    with pytest.raises((ValueError, TypeError), match=field):
        CRDNTK(**kwargs)


def test_scale_without_a_valid_base_is_rejected():
    # cycle < orig_len: the factor s * cycle / orig_len - (s - 1) falls to zero at s = 2
    with pytest.raises(ValueError, match="scale_max"):
        CRDNTKRotaryEmbedding(CRDNTK(cycle=16, max_shift=0, scale_start=1.0, scale_max=2.0), llama_config())
    rot = CRDNTKRotaryEmbedding(CRDNTK(cycle=16, max_shift=0, scale_start=1.0, scale_max=1.5), llama_config())
    with pytest.raises(ValueError, match="scale"):
        rot.scale = 3.0
    with pytest.raises(ValueError, match="rotary_dim"):
        CRDNTKRotaryEmbedding(CRDNTK(cycle=64, max_shift=0, scale_max=16.0), head_dim=2, theta=1e4, orig_len=16)
    with pytest.raises(ValueError, match="grow_every"):
        CRDNTKCallback(grow_every=0)


def test_schedule_formula():
    crd = CRDNTK(cycle=64, max_shift=0, scale_start=16.0, growth=2.0, grow_every=2000, scale_max=100.0)
    assert [crd.scale_at(step) for step in (0, 1999, 2000, 3999, 4000, 6000, 10**9)] == [
        16.0, 16.0, 32.0, 32.0, 64.0, 100.0, 100.0
    ]


# ----------------------------------------------------------------------------
# the schedule under a real Trainer

SCHEDULE = dict(scale_start=1.0, growth=2.0, grow_every=2, scale_max=6.0)
EXPECTED = [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]  # the scale in force during optimizer steps 0..6


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, length, vocab):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _crd_model():
    torch.manual_seed(0)
    config = llama_config()
    model = LlamaForCausalLM(config)
    crd = CRDNTK(cycle=2 * ORIG_LEN, max_shift=ORIG_LEN, **SCHEDULE)
    model.model.rotary_emb = CRDNTKRotaryEmbedding(crd, config)
    seen = []  # the scale of each training forward
    model.model.rotary_emb.register_forward_pre_hook(
        lambda module, args: seen.append(module.scale) if module.training else None
    )
    return model, seen


def _trainer(model, output_dir, callback, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=7,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=3,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**kwargs),
        train_dataset=_Tokens(32, 24, model.config.vocab_size),
        callbacks=[callback],
    )


def _callbacks(trainer):
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CRDNTKCallback)]


def test_callback_grows_the_scale_on_schedule(tmp_path):
    model, seen = _crd_model()
    trainer = _trainer(model, tmp_path, CRDNTKCallback(), save_strategy="no")
    trainer.train()
    assert seen == EXPECTED
    assert model.model.rotary_emb.scale == 6.0  # set after the last step
    (callback,) = _callbacks(trainer)
    assert (callback.scale, callback.global_step) == (6.0, 7)
    assert callback.state()["args"] == SCHEDULE  # resolved from the model's CRDNTK


def test_callback_without_rotary_module_raises(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(LlamaForCausalLM(llama_config()), tmp_path, CRDNTKCallback(), save_strategy="no")
    with pytest.raises(ValueError, match="CRDNTKRotaryEmbedding"):
        trainer.train()


@pytest.mark.parametrize("restore", [False, True])
def test_resume_continues_the_schedule(tmp_path, restore):
    model, seen = _crd_model()
    _trainer(model, tmp_path, CRDNTKCallback()).train()
    assert seen == EXPECTED
    checkpoint = tmp_path / "checkpoint-3"
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        stored = json.load(f)["stateful_callbacks"]["CRDNTKCallback"]
    assert stored == {"args": SCHEDULE, "attributes": {"scale": 2.0, "global_step": 3}}

    resumed, seen_resumed = _crd_model()
    # restore=True: a callback with another schedule is replaced by the checkpoint's.
    # restore=False (transformers' default): the callback passed in continues from step 3.
    other_schedule = dict(scale_start=1.0, growth=3.0, grow_every=5, scale_max=100.0)
    callback = CRDNTKCallback(**other_schedule) if restore else CRDNTKCallback()
    trainer = _trainer(resumed, tmp_path / "resumed", callback, restore_callback_states_from_checkpoint=restore)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not [w for w in caught if "CRDNTKCallback" in str(w.message)]  # the schedules agree
    assert seen_resumed == EXPECTED[3:]
    (restored,) = _callbacks(trainer)
    assert restored.state()["args"] == SCHEDULE
    assert resumed.model.rotary_emb.scale == 6.0


def test_resume_with_another_schedule_warns(tmp_path):
    model, _ = _crd_model()
    _trainer(model, tmp_path, CRDNTKCallback(), max_steps=3).train()
    resumed, seen = _crd_model()
    callback = CRDNTKCallback(scale_start=1.0, growth=3.0, grow_every=2, scale_max=100.0)
    trainer = _trainer(resumed, tmp_path / "resumed", callback, max_steps=5)
    with pytest.warns(UserWarning, match="restore_callback_states_from_checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert seen == [3.0, 9.0]  # its own schedule, from the restored step


def test_slow_rotary_channels_are_the_pairs_longer_than_the_window():
    # theta 1e4, head dim 16: pair p turns 1e4 ** (-p / 8) radians a position
    angles = torch.arange(4.0)[:, None] * 1e4 ** (-torch.arange(8) / 8)
    tables = (angles.cos(), angles.sin())
    wavelength = 2 * math.pi * 1e4 ** (torch.arange(8) / 8)
    for window in (1, 100, 4096, 10 ** 6):
        slow = (wavelength > window).float()
        assert torch.equal(slow_rotary_channels(tables, 16, window), torch.cat([slow, slow]))
    assert slow_rotary_channels(tables, 16, 1).sum() == 16 and slow_rotary_channels(tables, 16, 10 ** 6).sum() == 0
    # channels past a partial rotary dim never turn: slow
    assert slow_rotary_channels(tables, 20, 10 ** 6).tolist() == [0.0] * 16 + [1.0] * 4
    with pytest.raises(ValueError, match=r"slow_rotary_channels: expected \(cos, sin\) tables"):
        slow_rotary_channels((tables[0][:1], tables[1][:1]), 16, 100)
    with pytest.raises(ValueError, match="head_dim / 2 = 4"):
        slow_rotary_channels(tables, 8, 100)
    with pytest.raises(ValueError, match="window"):
        slow_rotary_channels(tables, 16, 0)
