"""``msattn pretrain`` and ``msattn finetune``: the HF Trainer on token chunks of text files.

- :func:`pretrain`: a Llama built from ``ArchitectureArguments`` (its window is ``seq_len``), from
  scratch, with the configured attention (MS attention with RoPE on selected tokens in the shipped
  configs); saves a checkpoint directory (``msattn.eval.loading.save_checkpoint``: the HF model, its
  tokenizer, ``msattn.json``) that ``finetune``, ``infer`` and ``python -m msattn.eval`` load.
- :func:`finetune`: a model (a ``pretrain`` output, any HF directory, a ``.gguf`` file, a named model,
  a llama2.c checkpoint) with the configured attention, CRD NTK rotary positions and reduced LoRA;
  saves the adapter and an ``msattn.json`` naming the base model and the positions, which
  ``msattn.eval.loading.load`` turns back into one merged model.

Both run unchanged under ``torchrun`` and ``accelerate launch`` (DDP, FSDP: the Trainer's own
options) and resume from ``output_dir``'s checkpoints (``resume_from_checkpoint: last``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, set_seed

from ..eval.loading import (CHECKPOINT_META, install_rope, load, method_meta, prepare, read_checkpoint_meta,
                            save_checkpoint, write_checkpoint_meta)
from ..rope import CRDNTK, CRDNTKCallback, CRDNTKRotaryEmbedding
from ..config import ConfigError
from .data import collate_labelled, make_tokenizer, text_dataset

__all__ = ["build_llama", "make_trainer", "resume_point", "last_complete_checkpoint", "pretrain", "finetune",
           "crd_config"]


def build_llama(arch, tokenizer, seq_len: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of ``arch``'s size over ``tokenizer``'s ids, window ``seq_len``,
    input and output embeddings tied."""
    try:
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
            num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_key_value_heads,
            intermediate_size=arch.intermediate_size, max_position_embeddings=seq_len, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    except ValueError as e:  # e.g. hidden_size not a multiple of num_attention_heads
        raise ConfigError(f"the model's size: {e}") from None


def make_trainer(model, dataset, training, callbacks=()) -> Trainer:
    """The Trainer of a phase (logits only where a loss is taken: :func:`collate_labelled`); a model with
    CRD NTK positions gets the callback that grows their scale."""
    crd = [CRDNTKCallback()] if any(isinstance(m, CRDNTKRotaryEmbedding) for m in model.modules()) else []
    return Trainer(model=model, args=training, train_dataset=dataset, data_collator=collate_labelled,
                   callbacks=[*crd, *callbacks])


def last_complete_checkpoint(out) -> str:
    """The newest ``checkpoint-N`` in ``out`` that holds ``trainer_state.json``, which the Trainer writes
    after the model, optimizer and scheduler: a run killed while saving leaves a newer, incomplete
    directory, from which the Trainer's own choice (the newest) cannot resume."""
    done = [d for d in Path(out).glob("checkpoint-*")
            if d.name.split("-")[-1].isdigit() and (d / "trainer_state.json").is_file()]
    if not done:
        raise ConfigError(f"resume_from_checkpoint: no complete checkpoint (checkpoint-N with trainer_state.json) "
                          f"in {out}")
    return str(max(done, key=lambda d: int(d.name.split("-")[-1])))


def resume_point(training) -> str | None:
    """``resume_from_checkpoint``: None, ``last`` (:func:`last_complete_checkpoint` of ``output_dir``) or
    a checkpoint directory."""
    value = training.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if value in ("last", "true", "True"):
        return last_complete_checkpoint(training.output_dir)
    if not os.path.isdir(value):
        raise ConfigError(f"resume_from_checkpoint: {value}: no such checkpoint directory")
    return value


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _announce(trainer, what: str, n_train: int, dataset, seq_len: int, method: str, settings) -> None:
    if trainer.is_world_process_zero():
        print(f"{what}: {trainer.args.world_size} process(es); {len(dataset)} chunks of {seq_len} tokens; "
              f"attention {method}{'' if method == 'dense' else f' {settings.config(method)}'}; "
              f"{n_train:,} trainable parameters", flush=True)


def _tokenizer(spec: str):
    try:
        return make_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e}") from None


def pretrain(arch, attn, data, training) -> Trainer:
    """Train a Llama from scratch; returns the Trainer (its ``state.log_history`` holds the losses)."""
    set_seed(training.seed)
    tokenizer = _tokenizer(arch.tokenizer)
    dataset = text_dataset(tokenizer, data.text, data.seq_len, data.max_tokens, passkey_share=data.passkey_share,
                           seed=training.seed)
    method, settings = attn.method(None), attn.settings(None)
    model = build_llama(arch, tokenizer, data.seq_len)
    prepare(model, method, settings).train()
    n_train = _trainable(model)  # (before the Trainer: FSDP shards the parameters)
    trainer = make_trainer(model, dataset, training)
    _announce(trainer, "pretrain", n_train, dataset, data.seq_len, method, settings)
    trainer.train(resume_from_checkpoint=resume_point(training))
    if trainer.is_world_process_zero():
        save_checkpoint(model, tokenizer, training.output_dir, method=method, settings=settings)
        print(f"pretrain: model, tokenizer and {CHECKPOINT_META} written to {training.output_dir}", flush=True)
    return trainer


def crd_config(crd, seq_len: int, orig_len: int) -> CRDNTK | None:
    """The CRD NTK numbers of ``crd`` (None when ``crd_ntk`` is off); the cycle defaults to the training
    length, or to the model's window ``orig_len`` when that is longer."""
    if not crd.crd_ntk:
        return None
    cycle = crd.cycle or max(seq_len, orig_len)
    try:
        return CRDNTK(cycle=cycle, max_shift=cycle if crd.max_shift is None else crd.max_shift,
                      scale_start=crd.scale_start, growth=crd.growth, grow_every=crd.grow_every,
                      scale_max=crd.scale_max, inference_scale=crd.inference_scale)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"CRD NTK: {e}") from None


def _base_record(base) -> dict:
    """How ``msattn.json`` names the base model: as given for a named model, else an absolute path."""
    def where(p):
        return None if p is None else (os.path.abspath(p) if os.path.exists(p) else p)

    key = "model" if base.model is not None else "llama2c"
    return {key: where(getattr(base, key)), "tokenizer": where(base.tokenizer)}


def finetune(base, attn, crd, lora, data, training) -> Trainer:
    """Fine-tune a model with reduced LoRA; returns the Trainer."""
    import msattn.lora
    from ..models.gguf import resolve

    if (base.model is None) == (base.llama2c is None):
        raise ConfigError(f"model: give one of model (an HF directory, .gguf file or named model) or llama2c; "
                          f"got model={base.model!r}, llama2c={base.llama2c!r}")
    set_seed(training.seed)
    try:
        path = resolve(base.model) if base.model is not None else None
        model, tokenizer = load(model=path, llama2c=base.llama2c, tokenizer=base.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{'model' if base.model is not None else 'llama2c'}: {e}") from None
    meta = read_checkpoint_meta(path) if path is not None else None
    method, settings = attn.method(meta), attn.settings(meta)
    if method == "infini":
        raise ConfigError("attention: infini: reduced LoRA does not train Infini-attention's gates; "
                          "pretrain with it instead")
    rope = crd_config(crd, data.seq_len, model.config.max_position_embeddings)
    dataset = text_dataset(tokenizer, data.text, data.seq_len, data.max_tokens, passkey_share=data.passkey_share,
                           seed=training.seed)
    if rope is not None:
        install_rope(model, rope)
    prepare(model, method, settings)
    model = msattn.lora.apply(model, r=lora.lora_r, alpha=lora.lora_alpha).train()
    n_train = _trainable(model)
    trainer = make_trainer(model, dataset, training)
    _announce(trainer, "finetune", n_train, dataset, data.seq_len, method, settings)
    trainer.train(resume_from_checkpoint=resume_point(training))
    if trainer.is_world_process_zero():
        out = training.output_dir
        model.save_pretrained(out)
        meta = {**method_meta(method, settings), "tokenizer": None, "base_model": _base_record(base),
                "crd_ntk": None if rope is None else dataclasses.asdict(rope),
                "lora": {"r": lora.lora_r, "alpha": lora.lora_alpha},
                "training": {"seq_len": data.seq_len, "max_steps": training.max_steps,
                             "passkey_share": data.passkey_share,
                             "text": [os.path.abspath(t) for t in data.text] or "austen"}}
        write_checkpoint_meta(out, meta)
        print(f"finetune: adapter and {CHECKPOINT_META} written to {out}", flush=True)
    return trainer
