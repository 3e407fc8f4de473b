"""Reduced LoRA (DESIGN section 4), built on PEFT.

LoRA (r=8, alpha=16, dropout 0 by default) on two projections of each attention block only:
``k_proj`` and ``o_proj`` for Llama (and Qwen2), ``q_proj`` and ``o_proj`` for Mistral. The input
embeddings and every norm are trained in full, as LongLoRA's ``trainable_params="embed,norm"``: PEFT
keeps a trainable copy of each through ``LoraConfig.modules_to_save`` and saves them with the
adapter. When the model ties its output embedding to the input one, ``ensure_weight_tying`` makes
PEFT tie ``lm_head`` to the trainable copy, so both ends keep sharing one matrix.
"""

from __future__ import annotations

from torch import nn

__all__ = ["LORA_TARGETS", "apply", "reduced_lora_config"]

#: model_type -> the projections that get LoRA adapters.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "o_proj"),
    "qwen2": ("k_proj", "o_proj"),
    "mistral": ("q_proj", "o_proj"),
}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def _embeddings_tied(model: nn.Module) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and getattr(outputs, "weight", None) is inputs.weight


def _full_names(model: nn.Module) -> tuple[str, list[str]]:
    """The input embedding's module name and the names of all norm modules."""
    embedding = model.get_input_embeddings()
    embed_name, norm_names = None, []
    for name, module in model.named_modules():
        if module is embedding:
            embed_name = name
        elif _is_norm(module):
            norm_names.append(name)
    if embed_name is None:
        raise ValueError("the model's input embedding is not one of its modules")
    return embed_name, norm_names


def _modules_to_save(model: nn.Module) -> list[str]:
    """Names that make PEFT's suffix match (``full_name.endswith(entry)``) pick exactly the input
    embedding and the norms: their last name components (for Llama ``embed_tokens``,
    ``input_layernorm``, ``post_attention_layernorm``, ``norm``), or the full names of the modules
    of a component that some other module's name also ends with."""
    embed_name, norm_names = _full_names(model)
    wanted = [embed_name, *norm_names]
    wanted_set = set(wanted)
    names = [name for name, _ in model.named_modules() if name]
    entries: list[str] = []
    for full in wanted:
        leaf = full.rsplit(".", 1)[-1]
        exact = all(name in wanted_set for name in names if name.endswith(leaf))
        entry = leaf if exact else full
        if entry not in entries:
            entries.append(entry)
    return entries


def reduced_lora_config(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0):
    """The ``peft.LoraConfig`` of reduced LoRA for ``model``.

    Args:
        model: a HF causal LM (``model.config.model_type`` one of ``LORA_TARGETS``).
        r: LoRA rank. alpha: ``lora_alpha`` (the update is scaled by ``alpha / r``).
        dropout: ``lora_dropout``.

    Returns:
        ``LoraConfig(task_type="CAUSAL_LM", target_modules=<the type's two projections>,
        modules_to_save=<the input embedding and the norms, by their last name component>)``, with
        ``ensure_weight_tying=True`` when the model ties ``lm_head`` to the input embedding.

    Raises:
        ValueError: the model type has no reduced-LoRA targets.
    """
    from peft import LoraConfig, TaskType

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"reduced LoRA does not support model_type {model_type!r}; supported: {sorted(LORA_TARGETS)}"
        )
    modules_to_save = _modules_to_save(model)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGETS[model_type]),
        modules_to_save=modules_to_save,
        bias="none",
        ensure_weight_tying=_embeddings_tied(model),
    )


def apply(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0):
    """Wrap ``model`` with reduced LoRA (see ``reduced_lora_config``); returns the ``peft.PeftModel``.

    Only the LoRA A/B matrices of the two target projections, the input embedding copy and the norm
    copies are trainable; the base model is frozen. At initialisation LoRA B is zero, so the wrapped
    model computes exactly what ``model`` did.
    """
    from peft import get_peft_model

    return get_peft_model(model, reduced_lora_config(model, r=r, alpha=alpha, dropout=dropout))
