"""Rotary positions for length extension (DESIGN section 3).

CRD NTK RoPE (cyclic, randomly truncated, dynamically growing NTK) lets a model fine-tuned on short
sequences run on long ones. During training every sequence sees positions
``p = (position_ids + r) mod cycle`` with ``r ~ U[0, max_shift)`` drawn per sequence, under the RoPE
base of HF's dynamic NTK formula evaluated at ``seq_len = cycle``::

    theta' = theta * (s * cycle / orig_len - (s - 1)) ** (d / (d - 2))

where ``d`` is the rotary dimension and the scale ``s`` grows by ``growth`` every ``grow_every``
optimizer steps from ``scale_start`` up to ``scale_max`` (``CRDNTKCallback`` drives it from the
Trainer). At inference (module in eval mode) positions are left alone and the base is the fixed
``theta * S ** (d / (d - 2))`` with ``S = inference_scale``.

Contents:

- ``CRDNTK``: every number of the scheme, validated.
- ``CRDNTKRotaryEmbedding``: a drop-in for HF rotary modules (``model.model.rotary_emb``).
- ``CRDNTKCallback``: the scale schedule as a ``transformers.TrainerCallback`` whose state travels
  with the Trainer's checkpoints.
- ``compact_rope_tables``: ``(length, rotary_dim // 2)`` cos/sin tables from any HF-style rotary
  module, for kernels that rotate the pairs ``(x[i], x[i + rotary_dim // 2])``.
- ``slow_rotary_channels``: from such tables, the channels whose pairs turn less than a full turn
  within a window (``MSConfig(score_channels="slow")``).

Dimension legend: B batch, L sequence length, d = rotary_dim (``head_dim`` times the partial rotary
factor, even).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    _CALLBACK_BASES: tuple[type, ...] = (TrainerCallback, ExportableState)
except ImportError:  # the callback needs transformers; the rotary module and the tables do not
    _CALLBACK_BASES = (object,)

__all__ = ["CRDNTK", "CRDNTKCallback", "CRDNTKRotaryEmbedding", "compact_rope_tables", "slow_rotary_channels"]


# ----------------------------------------------------------------------------
# validation helpers: every error names the offending field


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_real(name: str, value: Any, minimum: float, *, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")


def _ntk_term(scale: float, cycle: int, orig_len: int) -> float:
    """HF's dynamic NTK factor ``s * seq_len / orig_len - (s - 1)`` at ``seq_len = cycle``."""
    return scale * cycle / orig_len - (scale - 1)


# ----------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class CRDNTK:
    """Every number of CRD NTK RoPE; validated on construction (errors name the field).

    Attributes:
        cycle: positions are taken modulo ``cycle`` during training. The intended regime is
            ``cycle >= orig_len`` (the NTK factor is then >= 1 for every scale).
        max_shift: the per-sequence shift ``r`` is drawn uniformly from ``[0, max_shift)``
            (``0 <= max_shift <= cycle``; 0 and 1 both mean no shift).
        scale_max: the largest training scale ``s`` the schedule reaches.
        base: RoPE theta; None takes the model's (``config.rope_parameters["rope_theta"]``).
        orig_len: the model's original context; None takes ``config.max_position_embeddings``.
        scale_start: the training scale at step 0 (authors: 16).
        growth: the factor the scale grows by per growth step (authors: 2).
        grow_every: optimizer steps per growth step (authors: 2000).
        inference_scale: ``S`` of the inference base ``theta * S ** (d / (d - 2))``, chosen for the
            target length; None uses the last training base, i.e.
            ``S = scale_max * cycle / orig_len - (scale_max - 1)``.
    """

    cycle: int
    max_shift: int
    scale_max: float
    base: float | None = None
    orig_len: int | None = None
    scale_start: float = 16.0
    growth: float = 2.0
    grow_every: int = 2000
    inference_scale: float | None = None

    def __post_init__(self) -> None:
        _check_int("cycle", self.cycle, 1)
        _check_int("max_shift", self.max_shift, 0)
        if self.max_shift > self.cycle:
            raise ValueError(
                f"max_shift must be <= cycle ({self.cycle}): shifts are taken modulo cycle, "
                f"got max_shift={self.max_shift}"
            )
        if self.base is not None:
            _check_real("base", self.base, 0.0, strict=True)
        if self.orig_len is not None:
            _check_int("orig_len", self.orig_len, 1)
        _check_real("scale_start", self.scale_start, 1.0)
        _check_real("growth", self.growth, 1.0)
        _check_int("grow_every", self.grow_every, 1)
        _check_real("scale_max", self.scale_max, 1.0)
        if self.scale_max < self.scale_start:
            raise ValueError(
                f"scale_max must be >= scale_start ({self.scale_start}), got scale_max={self.scale_max}"
            )
        if self.inference_scale is not None:
            _check_real("inference_scale", self.inference_scale, 1.0)

    def scale_at(self, global_step: int) -> float:
        """The training scale after ``global_step`` optimizer steps:
        ``min(scale_start * growth ** (global_step // grow_every), scale_max)``."""
        return _scheduled_scale(global_step, self.scale_start, self.growth, self.grow_every, self.scale_max)


def _scheduled_scale(global_step: int, scale_start: float, growth: float, grow_every: int, scale_max: float) -> float:
    _check_int("global_step", global_step, 0)
    try:
        scale = scale_start * growth ** (global_step // grow_every)
    except OverflowError:
        scale = math.inf
    return float(min(scale, scale_max))


# ----------------------------------------------------------------------------
# the rotary module


def _config_value(config: Any, name: str) -> Any:
    """``config.rope_parameters[name]``, else ``config.<name>``, else None."""
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    if name in rope_parameters:
        return rope_parameters[name]
    return getattr(config, name, None)


class CRDNTKRotaryEmbedding(nn.Module):
    """CRD NTK rotary embedding with HF's rotary contract, so it can replace ``model.model.rotary_emb``.

    ``forward(x, position_ids) -> (cos, sin)``, each ``(B, L, d)`` in ``x``'s dtype, laid out like
    ``LlamaRotaryEmbedding`` (the ``d // 2`` frequencies duplicated: ``cat(freqs, freqs)``).

    - Training mode: positions ``(position_ids + r) mod cycle`` with ``r`` drawn per sequence from
      torch's global RNG (``torch.manual_seed`` makes it reproducible), base
      ``theta * (scale * cycle / orig_len - (scale - 1)) ** (d / (d - 2))``.
    - Eval mode: positions as given, base ``theta * S ** (d / (d - 2))`` (``S`` from ``CRDNTK``).

    Args:
        crd: the CRD NTK numbers.
        config: a HF model config; supplies ``head_dim`` (or ``hidden_size // num_attention_heads``),
            ``rope_parameters["rope_theta"]``, ``max_position_embeddings`` and the partial rotary
            factor when it has one. Optional when the keywords below are given.
        head_dim, theta, orig_len, partial_rotary_factor: override the config's values
            (``crd.base`` and ``crd.orig_len``, when set, take precedence over both).

    Attributes:
        scale: the current training scale ``s`` (a float, set by ``CRDNTKCallback``; starts at
            ``crd.scale_start``). Validated on assignment.
        rotary_dim: ``d``; head_dim, theta, orig_len: the resolved model numbers.
    """

    def __init__(
        self,
        crd: CRDNTK,
        config: Any = None,
        *,
        head_dim: int | None = None,
        theta: float | None = None,
        orig_len: int | None = None,
        partial_rotary_factor: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(crd, CRDNTK):
            raise TypeError(f"crd must be a CRDNTK, got {type(crd).__name__}")
        if config is not None:
            rope_parameters = getattr(config, "rope_parameters", None) or {}
            if rope_parameters and "rope_theta" not in rope_parameters and all(
                isinstance(v, dict) for v in rope_parameters.values()
            ):
                raise ValueError(
                    "config.rope_parameters is given per layer type "
                    f"({sorted(rope_parameters)}); CRDNTKRotaryEmbedding supports one set of rope parameters"
                )
            if head_dim is None:
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            if theta is None:
                theta = _config_value(config, "rope_theta")
            if orig_len is None:
                orig_len = getattr(config, "max_position_embeddings", None)
            if partial_rotary_factor is None:
                partial_rotary_factor = _config_value(config, "partial_rotary_factor")
        if crd.base is not None:
            theta = crd.base
        if crd.orig_len is not None:
            orig_len = crd.orig_len
        if partial_rotary_factor is None:
            partial_rotary_factor = 1.0

        for name, value in (("head_dim", head_dim), ("theta", theta), ("orig_len", orig_len)):
            if value is None:
                raise ValueError(f"{name} is unknown: pass a model config, set it on CRDNTK, or pass {name}=")
        _check_int("head_dim", head_dim, 1)
        _check_real("theta", theta, 0.0, strict=True)
        _check_int("orig_len", orig_len, 1)
        _check_real("partial_rotary_factor", partial_rotary_factor, 0.0, strict=True)
        rotary_dim = int(head_dim * partial_rotary_factor)
        if rotary_dim % 2 or rotary_dim < 4 or rotary_dim > head_dim:
            raise ValueError(
                f"rotary_dim = int(head_dim * partial_rotary_factor) = int({head_dim} * {partial_rotary_factor}) "
                f"= {rotary_dim} must be even, >= 4 and <= head_dim"
            )

        self.crd = crd
        self.head_dim = int(head_dim)
        self.rotary_dim = rotary_dim
        self.theta = float(theta)
        self.orig_len = int(orig_len)
        self.attention_scaling = 1.0  # HF rotary modules expose it; CRD NTK does not rescale cos/sin
        term = _ntk_term(crd.scale_max, crd.cycle, self.orig_len)
        if term <= 0:
            raise ValueError(
                f"scale_max={crd.scale_max} with cycle={crd.cycle} and orig_len={self.orig_len} gives "
                f"scale_max * cycle / orig_len - (scale_max - 1) = {term} <= 0: no valid RoPE base "
                "(use cycle >= orig_len or a smaller scale_max)"
            )
        self._scale = float(crd.scale_start)
        self._inv_freq_cache: dict[tuple[float, torch.device], torch.Tensor] = {}

    # -- scale and bases -----------------------------------------------------

    @property
    def scale(self) -> float:
        """The current training scale ``s``."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        _check_real("scale", value, 0.0, strict=True)
        term = _ntk_term(float(value), self.crd.cycle, self.orig_len)
        if term <= 0:
            raise ValueError(
                f"scale={value} with cycle={self.crd.cycle} and orig_len={self.orig_len} gives "
                f"scale * cycle / orig_len - (scale - 1) = {term} <= 0: no valid RoPE base"
            )
        self._scale = float(value)

    @property
    def training_base(self) -> float:
        """``theta * (scale * cycle / orig_len - (scale - 1)) ** (d / (d - 2))``."""
        d = self.rotary_dim
        return self.theta * _ntk_term(self._scale, self.crd.cycle, self.orig_len) ** (d / (d - 2))

    @property
    def inference_scale(self) -> float:
        """``S``: ``crd.inference_scale``, or the NTK factor of the last training base."""
        if self.crd.inference_scale is not None:
            return float(self.crd.inference_scale)
        return _ntk_term(self.crd.scale_max, self.crd.cycle, self.orig_len)

    @property
    def inference_base(self) -> float:
        """``theta * S ** (d / (d - 2))``."""
        d = self.rotary_dim
        return self.theta * self.inference_scale ** (d / (d - 2))

    @property
    def base(self) -> float:
        """The base of the current mode: ``training_base`` in training, ``inference_base`` in eval."""
        return self.training_base if self.training else self.inference_base

    def frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 ``(d // 2,)``: ``1 / base ** (2i / d)`` for the current mode, computed like HF's."""
        base = self.base
        device = torch.device(device if device is not None else "cpu")
        key = (base, device)
        cached = self._inv_freq_cache.get(key)
        if cached is None:
            if len(self._inv_freq_cache) >= 8:
                self._inv_freq_cache.clear()
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
            cached = (1.0 / (base**exponents)).to(device)  # on the CPU then moved, as HF does
            self._inv_freq_cache[key] = cached
        return cached

    # -- positions and forward ------------------------------------------------

    def positions(self, position_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The positions the module rotates by.

        Args:
            position_ids: integer ``(B, L)`` or ``(1, L)``.
            batch_size: ``B`` (training draws one shift per sequence, so a ``(1, L)`` input is
                expanded to ``(B, L)``).

        Returns:
            ``position_ids`` unchanged in eval mode; int64 ``(B, L)`` ``(position_ids + r) mod cycle``
            with ``r`` int64 ``(B, 1)`` from ``torch.randint(0, max_shift, (B, 1))`` in training
            mode (no draw when ``max_shift <= 1``).
        """
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (B, L), got shape {tuple(position_ids.shape)}")
        if not self.training:
            return position_ids
        position_ids = position_ids.long().expand(batch_size, -1)
        if self.crd.max_shift > 1:
            shift = torch.randint(0, self.crd.max_shift, (batch_size, 1), device=position_ids.device)
            position_ids = position_ids + shift
        return torch.remainder(position_ids, self.crd.cycle)

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's rotary contract.

        Args:
            x: ``(B, ...)``; only its batch size, device and dtype are used.
            position_ids: integer ``(B, L)`` or ``(1, L)``.
            layer_type: accepted for HF compatibility and ignored (one set of parameters).

        Returns:
            ``(cos, sin)``, each ``(B', L, d)`` in ``x.dtype`` (``B' = B`` in training, else
            ``position_ids``'s batch), the frequencies duplicated along the last dim.
        """
        positions = self.positions(position_ids, x.shape[0])
        freqs = positions[..., None].float() * self.frequencies(x.device)  # (B', L, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B', L, d)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"rotary_dim={self.rotary_dim}, theta={self.theta}, orig_len={self.orig_len}, "
            f"cycle={self.crd.cycle}, max_shift={self.crd.max_shift}, scale={self._scale}"
        )


# ----------------------------------------------------------------------------
# the schedule


class CRDNTKCallback(*_CALLBACK_BASES):
    """Grows the scale of every ``CRDNTKRotaryEmbedding`` in the trained model on schedule.

    ``s = min(scale_start * growth ** (global_step // grow_every), scale_max)``, set at the start of
    training (so a resumed run continues the schedule at its step) and after every optimizer step.
    As a ``transformers`` ``ExportableState`` its schedule and current scale are written to each
    checkpoint's ``trainer_state.json`` (``stateful_callbacks["CRDNTKCallback"]``), and
    ``Trainer.train(resume_from_checkpoint=...)`` rebuilds it from there when
    ``TrainingArguments.restore_callback_states_from_checkpoint`` is True (transformers' default is
    False): the checkpoint's schedule then wins over the one passed to the resuming Trainer. Without
    it the callback passed in continues from the restored ``global_step`` with its own schedule (a
    warning says so if that differs from the checkpoint's).

    Args:
        scale_start, growth, grow_every, scale_max: the schedule; each None is taken from the
            ``CRDNTK`` of the model's rotary modules (which must then agree) at the start of training.

    Attributes:
        scale: the scale last set (None before training starts).
        global_step: the step it was set for.
    """

    def __init__(
        self,
        scale_start: float | None = None,
        growth: float | None = None,
        grow_every: int | None = None,
        scale_max: float | None = None,
    ) -> None:
        if _CALLBACK_BASES == (object,):
            raise ImportError("CRDNTKCallback needs transformers (pip install 'msattn[hf]')")
        self.scale_start = scale_start
        self.growth = growth
        self.grow_every = grow_every
        self.scale_max = scale_max
        self._validate()
        self.scale: float | None = None
        self.global_step: int | None = None

    def _validate(self) -> None:
        if self.scale_start is not None:
            _check_real("scale_start", self.scale_start, 1.0)
        if self.growth is not None:
            _check_real("growth", self.growth, 1.0)
        if self.grow_every is not None:
            _check_int("grow_every", self.grow_every, 1)
        if self.scale_max is not None:
            _check_real("scale_max", self.scale_max, 1.0)
        if self.scale_start is not None and self.scale_max is not None and self.scale_max < self.scale_start:
            raise ValueError(f"scale_max must be >= scale_start ({self.scale_start}), got scale_max={self.scale_max}")

    @staticmethod
    def rotary_modules(model: nn.Module) -> list[CRDNTKRotaryEmbedding]:
        """The ``CRDNTKRotaryEmbedding`` modules of ``model`` (raises if there are none)."""
        found = [m for m in model.modules() if isinstance(m, CRDNTKRotaryEmbedding)]
        if not found:
            raise ValueError(
                "CRDNTKCallback: the model has no CRDNTKRotaryEmbedding; replace its rotary module first "
                "(model.model.rotary_emb = CRDNTKRotaryEmbedding(crd, model.config))"
            )
        return found

    def _resolve(self, modules: list[CRDNTKRotaryEmbedding]) -> None:
        for name in ("scale_start", "growth", "grow_every", "scale_max"):
            if getattr(self, name) is None:
                values = {getattr(m.crd, name) for m in modules}
                if len(values) != 1:
                    raise ValueError(
                        f"CRDNTKCallback: the rotary modules disagree on {name} ({sorted(values)}); pass {name}="
                    )
                setattr(self, name, values.pop())
        self._validate()

    def scale_at(self, global_step: int) -> float:
        """``min(scale_start * growth ** (global_step // grow_every), scale_max)`` (schedule resolved)."""
        if None in (self.scale_start, self.growth, self.grow_every, self.scale_max):
            raise RuntimeError("CRDNTKCallback: the schedule is resolved from the model at the start of training")
        return _scheduled_scale(global_step, self.scale_start, self.growth, self.grow_every, self.scale_max)

    def _update(self, model: nn.Module | None, global_step: int) -> None:
        if model is None:
            raise ValueError("CRDNTKCallback: the Trainer passed no model")
        modules = self.rotary_modules(model)
        self._resolve(modules)
        scale = self.scale_at(global_step)
        for module in modules:
            module.scale = scale
        self.scale, self.global_step = scale, int(global_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Set the scale for the step training starts (or resumes) at."""
        self._update(model, state.global_step)
        if state.global_step > 0:
            self._warn_if_checkpoint_differs(state)

    def _warn_if_checkpoint_differs(self, state) -> None:
        # Resumed without restore_callback_states_from_checkpoint: the Trainer keeps this callback,
        # which is right only if it carries the checkpoint's schedule.
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        stored = stored[0] if isinstance(stored, list) and stored else stored
        if not isinstance(stored, dict):
            return
        theirs, ours = stored.get("args", {}), self.state()["args"]
        if all(theirs.get(k) is not None for k in ours) and any(theirs[k] != ours[k] for k in ours):
            warnings.warn(
                f"CRDNTKCallback: resuming at step {state.global_step} with schedule {ours}, but the checkpoint "
                f"was trained with {theirs}; pass TrainingArguments(restore_callback_states_from_checkpoint=True) "
                "to continue the checkpoint's schedule",
                stacklevel=2,
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Set the scale for the next step after each optimizer step."""
        self._update(model, state.global_step)

    def state(self) -> dict:
        """``{"args": schedule, "attributes": {"scale", "global_step"}}``, JSON-serialisable."""
        return {
            "args": {
                "scale_start": self.scale_start,
                "growth": self.growth,
                "grow_every": self.grow_every,
                "scale_max": self.scale_max,
            },
            "attributes": {"scale": self.scale, "global_step": self.global_step},
        }


# ----------------------------------------------------------------------------
# tables for the kernels


def compact_rope_tables(
    rotary_emb: nn.Module, length: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions ``0..length-1`` from any HF-style rotary module.

    Calls ``rotary_emb(x, position_ids=arange(length)[None])`` with a float32 ``x`` and keeps the
    first half of the last dim, which HF duplicates (``cat(freqs, freqs)``; checked). Entry ``t``
    rotates the pairs ``(x[i], x[i + d // 2])`` of position ``t`` exactly like HF's ``rotate_half``
    (including any ``attention_scaling`` the module folds in). The module's mode applies: a
    ``CRDNTKRotaryEmbedding`` in training mode maps ``t`` to ``(t + r) mod cycle`` for one fresh
    ``r`` and uses its training base; in eval mode ``t`` itself under the inference base.

    Args:
        rotary_emb: e.g. ``model.model.rotary_emb``.
        length: number of positions, >= 1.
        device: where to build the tables; default: the device of the module's first buffer, or CPU.

    Returns:
        ``(cos, sin)``, each float32 contiguous ``(length, d // 2)``.
    """
    _check_int("length", length, 1)
    if device is None:
        device = next((b.device for b in rotary_emb.buffers()), torch.device("cpu"))
    x = torch.zeros((1, 1), dtype=torch.float32, device=device)
    position_ids = torch.arange(length, device=device).unsqueeze(0)  # (1, length)
    cos, sin = rotary_emb(x, position_ids)
    cos, sin = cos.float().reshape(-1, length, cos.shape[-1])[0], sin.float().reshape(-1, length, sin.shape[-1])[0]
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    if rotary_dim % 2 or not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise ValueError(
            f"{type(rotary_emb).__name__} does not return cat(freqs, freqs) tables (last dim {rotary_dim}); "
            "compact_rope_tables needs HF's rotate_half layout"
        )
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def slow_rotary_channels(tables: tuple[torch.Tensor, torch.Tensor], head_dim: int, window: int) -> torch.Tensor:
    """The channels of a head whose rotation stays below one full turn over ``window`` positions.

    Pair ``p`` of :func:`compact_rope_tables` turns by ``theta_p`` a position (read from the tables' row
    1); it is slow when its wavelength ``2 pi / theta_p`` exceeds ``window``. Within a model's window a
    slow pair's ``q . k`` keeps the sign and roughly the size of its un-rotated product, while a fast
    pair's averages out over distances; channels past the rotary dim do not rotate and count as slow.

    Args:
        tables: ``(cos, sin)``, each ``(L, rotary_dim / 2)`` with ``L >= 2``.
        head_dim: ``D >= rotary_dim``.
        window: positions, >= 1 (a model's ``max_position_embeddings``).

    Returns:
        float32 ``(D,)`` of 1 (slow: pairs ``p`` and ``p + rotary_dim / 2``, and channels past the rotary
        dim) and 0 (fast), on the tables' device.
    """
    cos, sin = tables
    _check_int("window", window, 1)
    half = cos.shape[-1]
    if cos.dim() != 2 or cos.shape[0] < 2 or sin.shape != cos.shape or not 2 * half <= head_dim:
        raise ValueError(f"slow_rotary_channels: expected (cos, sin) tables of shape (L >= 2, rotary_dim / 2 <= "
                         f"head_dim / 2 = {head_dim // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    turn = torch.atan2(sin[1].float(), cos[1].float()).abs()  # (rotary_dim / 2,) radians a position
    slow = (turn * window < 2 * math.pi).float()
    return torch.cat([slow, slow, slow.new_ones(head_dim - 2 * half)])
