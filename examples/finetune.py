"""Fine-tune a causal LM with MS attention, reduced LoRA and CRD NTK RoPE, on the HuggingFace Trainer.

The model is an HF model directory, a ``.gguf`` file or a named model (``--model smollm2-135m``;
``msattn.models.gguf``), a llama2.c checkpoint (``--llama2c stories260K.bin --tokenizer tok512.bin``) or, with
nothing given, a tiny random Llama built here with a byte tokenizer, so the script runs with nothing
downloaded. It is patched with MS attention (``msattn.hf.patch``), gets CRD NTK rotary positions
(``msattn.rope``; ``--no-crd-ntk`` keeps the model's own RoPE) and reduced LoRA (``msattn.lora``:
LoRA on k_proj/o_proj, embeddings and norms trained in full), then trains on ``--seq-len`` token
chunks of the ``--text`` files (or of synthetic text). ``--out`` receives the adapter
(``save_pretrained``) and ``msattn_finetune.json``, which records the base model, the MSConfig and
the CRD NTK numbers, so that ``load_finetuned(out)`` rebuilds the same model for evaluation.
``persuasion.txt`` is the evaluation split of ../shared/data/austen and is refused as training text.

    python examples/finetune.py --steps 20 --out runs/tiny
    python examples/finetune.py --llama2c ../shared/data/stories260K/stories260K.bin \\
        --tokenizer ../shared/data/stories260K/tok512.bin --seq-len 1024 --steps 200 \\
        --text ../shared/data/austen/{emma,mansfield_park,northanger_abbey}.txt --out runs/stories
    python -m torch.distributed.run --nproc_per_node 2 examples/finetune.py --steps 20 --out runs/ddp

Under torchrun the Trainer runs DDP on the gloo backend (CPU); every trainable parameter takes part
in each forward, so DDP does not search for unused ones. msattn must be importable: installed, or
``PYTHONPATH=.`` from a source checkout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

import msattn
import msattn.hf
import msattn.lora
from msattn.eval.loading import ms_config_from_dict
from msattn.rope import CRDNTK, CRDNTKCallback, CRDNTKRotaryEmbedding

EVAL_SPLIT = "persuasion.txt"
CONFIG_NAME = "msattn_finetune.json"
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_argument_group("model and data")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--model", help="HF model directory, .gguf file or named model, e.g. smollm2-135m")
    which.add_argument("--llama2c", type=Path, help="llama2.c checkpoint (default: a tiny random Llama)")
    g.add_argument("--tokenizer", type=Path, help="llama2.c tokenizer (default: bytes)")
    g.add_argument("--text", type=Path, nargs="+", help="training text files (default: synthetic text)")
    g.add_argument("--max-tokens", type=int, help="stop tokenizing after this many tokens")
    g.add_argument("--seq-len", type=int, default=1024, help="training sequence length (%(default)s)")
    g = ap.add_argument_group("MS attention")
    g.add_argument("--block-q", type=int, default=16, help="query region size (%(default)s)")
    g.add_argument("--block-k", type=int, default=16, help="key region size (%(default)s)")
    g.add_argument("--merge", type=int, default=4, help="query regions per group (%(default)s)")
    g.add_argument("--topk", type=int, default=16, help="key regions selected per group (%(default)s)")
    g.add_argument("--rope", choices=("inputs", "selected"), default="inputs",
                   help="RoPE on the inputs or on the selected tokens (%(default)s)")
    g = ap.add_argument_group("CRD NTK RoPE")
    g.add_argument("--no-crd-ntk", dest="crd_ntk", action="store_false", help="keep the model's RoPE")
    g.add_argument("--cycle", type=int, help="position cycle (default: max(--seq-len, model context))")
    g.add_argument("--max-shift", type=int, help="random shift bound (default: the cycle)")
    g.add_argument("--scale-start", type=float, default=16.0, help="training scale at step 0 (%(default)s)")
    g.add_argument("--growth", type=float, default=2.0, help="scale factor per growth (%(default)s)")
    g.add_argument("--grow-every", type=int, default=2000, help="optimizer steps per growth (%(default)s)")
    g.add_argument("--scale-max", type=float, default=64.0, help="largest training scale (%(default)s)")
    g.add_argument("--inference-scale", type=float, help="S of the inference base (default: last training base)")
    g = ap.add_argument_group("training")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank (%(default)s)")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (%(default)s)")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps (%(default)s)")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per process and step (%(default)s)")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate, constant (%(default)s)")
    g.add_argument("--save-steps", type=int, default=50, help="checkpoint every this many steps (%(default)s)")
    g.add_argument("--out", type=Path, default=Path("runs/finetune"),
                   help="checkpoints, adapter and run config (%(default)s)")
    g.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the last checkpoint in --out, or from the one given")
    g.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the tqdm bar")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# data: token chunks of text files


class ByteTokenizer:
    """The tokenizer of the tiny random model: token 1 BOS, 2 EOS, 3 + b for each UTF-8 byte b
    (the byte tokens of llama2.c's vocabularies)."""

    vocab_size = 259
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True):
        return ([self.bos_id] if bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def synthetic_text(n_chars, seed=0):
    """Deterministic sentences from a small grammar: learnable, so fine-tuning on it lowers the loss."""
    rng = random.Random(seed)
    names = ["Anne", "Emma", "Fanny", "Elinor", "Marianne", "Catherine"]
    verbs = ["saw", "met", "wrote to", "visited"]
    places = ["the park", "Bath", "the garden", "London", "the village"]
    parts = []
    while sum(map(len, parts)) < n_chars:
        a, b = rng.sample(names, 2)
        parts.append(f"{a} {rng.choice(verbs)} {b} in {rng.choice(places)}. ")
    return "".join(parts)


def read_texts(paths):
    """The training texts; the evaluation split is refused."""
    texts = []
    for path in paths:
        if Path(path).name == EVAL_SPLIT:
            raise SystemExit(f"finetune: {path} is the evaluation split (see ../shared/data/README.md); "
                             "train on the other novels")
        texts.append(Path(path).read_text(encoding="utf-8"))
    return texts


class TokenChunks(torch.utils.data.Dataset):
    """Consecutive ``seq_len`` chunks of a token stream, as ``{"input_ids", "labels"}`` int64 ``(seq_len,)``
    (the model shifts the labels itself)."""

    def __init__(self, ids, seq_len):
        n = len(ids) // seq_len
        if n == 0:
            raise ValueError(f"finetune: {len(ids)} tokens make no chunk of {seq_len}; give more text")
        self.chunks = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def text_dataset(tokenizer, texts, seq_len, max_tokens=None):
    """Tokenize each text (BOS first, as llama2.c does), concatenate, cut into ``seq_len`` chunks."""
    ids = []
    for text in texts:
        ids += tokenizer.encode(text, bos=True)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    return TokenChunks(ids, seq_len)


# ---------------------------------------------------------------------------------------------
# the model


def base_model(llama2c=None, tokenizer=None, seed=0, model=None):
    """(model, tokenizer): ``model`` (an HF directory, .gguf file or named model, in float32), the llama2.c
    checkpoint, or a tiny random Llama seeded with ``seed``."""
    if model is not None:
        from msattn.eval.loading import load

        return load(model=model, tokenizer=tokenizer)
    if llama2c is not None:
        from msattn.models import load_llama2c

        return load_llama2c(llama2c, tokenizer)
    if tokenizer is not None:
        from msattn.models import Llama2cTokenizer

        tok = Llama2cTokenizer(tokenizer)
    else:
        tok = ByteTokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.vocab_size, attn_implementation="sdpa", **TINY_LLAMA)
    return LlamaForCausalLM(config).eval(), tok


def ms_config(args):
    return msattn.MSConfig(block_q=args.block_q, block_k=args.block_k, merge=args.merge, topk=args.topk,
                           rope=args.rope)


def crd_config(args, orig_len):
    """The CRD NTK numbers of the flags (None with --no-crd-ntk); the cycle defaults to the training
    length, and to the model's original context ``orig_len`` when that is longer."""
    if not args.crd_ntk:
        return None
    cycle = args.cycle or max(args.seq_len, orig_len)
    return CRDNTK(cycle=cycle, max_shift=cycle if args.max_shift is None else args.max_shift,
                  scale_start=args.scale_start, growth=args.growth, grow_every=args.grow_every,
                  scale_max=args.scale_max, inference_scale=args.inference_scale)


def prepare(model, ms, crd, lora_r=8, lora_alpha=16):
    """Patch ``model`` with MS attention (and CRD NTK rotary positions when ``crd`` is given), then
    wrap it with reduced LoRA; returns the PEFT model."""
    rope = None if crd is None else CRDNTKRotaryEmbedding(crd, model.config)
    msattn.hf.patch(model, ms, rope=rope)
    return msattn.lora.apply(model, r=lora_r, alpha=lora_alpha)


# ---------------------------------------------------------------------------------------------
# what the evaluation needs to rebuild the model


def run_config(args, ms, crd, model):
    """The JSON written next to the adapter: base model, MSConfig, CRD NTK (None if disabled)."""
    rotary = [m for m in model.modules() if isinstance(m, CRDNTKRotaryEmbedding)]
    tokenizer = args.tokenizer and str(Path(args.tokenizer).resolve())
    if args.model is not None:
        named_or_path = args.model if not os.path.exists(args.model) else str(Path(args.model).resolve())
        base = {"model": named_or_path, "tokenizer": tokenizer}
    elif args.llama2c is not None:
        base = {"llama2c": str(Path(args.llama2c).resolve()), "tokenizer": tokenizer}
    else:
        base = {"tiny_llama": {"seed": args.seed, "tokenizer": tokenizer}}
    return {
        "base_model": base,
        "msattn": dataclasses.asdict(ms),
        "crd_ntk": None if crd is None else {
            **dataclasses.asdict(crd),
            "resolved": {"theta": rotary[0].theta, "orig_len": rotary[0].orig_len,
                         "rotary_dim": rotary[0].rotary_dim, "final_training_scale": rotary[0].scale,
                         "inference_base": rotary[0].inference_base},
        },
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha},
        "training": {"seq_len": args.seq_len, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                     "text": [str(Path(p).resolve()) for p in args.text or []] or "synthetic", "seed": args.seed},
    }


def write_run_config(out, config):
    os.makedirs(out, exist_ok=True)
    with open(Path(out) / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=1)


def load_finetuned(out, **ms_overrides):
    """Rebuild the fine-tuned model saved in ``out`` (eval mode): base model, patch, CRD NTK, adapter.

    ``ms_overrides`` (``merge=64``, ``topk=32``...; None values ignored): MSConfig fields to evaluate
    with instead of the run's; the returned run config records the MSConfig actually used.

    Returns ``(model, tokenizer, run_config)``.
    """
    from peft import PeftModel

    with open(Path(out) / CONFIG_NAME) as f:
        config = json.load(f)
    ms = ms_config_from_dict(config["msattn"], **ms_overrides)
    config["msattn"] = dataclasses.asdict(ms)
    base = config["base_model"]
    if "model" in base:
        model, tok = base_model(tokenizer=base["tokenizer"], model=base["model"])
    elif "llama2c" in base:
        model, tok = base_model(base["llama2c"], base["tokenizer"])
    else:
        model, tok = base_model(None, base["tiny_llama"]["tokenizer"], seed=base["tiny_llama"]["seed"])
    crd = config["crd_ntk"]
    crd = None if crd is None else CRDNTK(**{k: v for k, v in crd.items() if k != "resolved"})
    rope = None if crd is None else CRDNTKRotaryEmbedding(crd, model.config)
    msattn.hf.patch(model, ms, rope=rope)
    return PeftModel.from_pretrained(model, out).eval(), tok, config


# ---------------------------------------------------------------------------------------------
# training


def make_trainer(model, dataset, args, callbacks=()):
    """A Trainer on the CPU (DDP on gloo under torchrun) whose CRDNTKCallback grows the CRD NTK scale."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a backend named outside torchrun breaks accelerate
    training = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
        save_steps=args.save_steps, report_to=[], use_cpu=True, ddp_backend="gloo" if distributed else None,
        ddp_find_unused_parameters=False, dataloader_num_workers=0, seed=args.seed, label_names=["labels"],
        restore_callback_states_from_checkpoint=True, disable_tqdm=not args.progress,
    )
    crd = [CRDNTKCallback()] if any(isinstance(m, CRDNTKRotaryEmbedding) for m in model.modules()) else []
    return Trainer(model=model, args=training, train_dataset=dataset, callbacks=[*crd, *callbacks])


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    model, tokenizer = base_model(args.llama2c, args.tokenizer, seed=args.seed, model=args.model)
    if args.text:
        texts = read_texts(args.text)
    else:  # enough for 64 steps of a few processes; longer runs go round it again
        texts = [synthetic_text(8 * args.seq_len * args.batch_size * min(args.steps, 64), args.seed)]
    dataset = text_dataset(tokenizer, texts, args.seq_len, args.max_tokens)
    ms, crd = ms_config(args), crd_config(args, model.config.max_position_embeddings)
    model = prepare(model, ms, crd, args.lora_r, args.lora_alpha)
    trainer = make_trainer(model, dataset, args)
    if trainer.is_world_process_zero():
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"finetune: {trainer.args.world_size} process(es); {len(dataset)} chunks of {args.seq_len} tokens; "
              f"{ms}; {crd}; {n_train} trainable parameters")
    resume = last_complete_checkpoint(args.out) if args.resume is True else args.resume
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        model.save_pretrained(args.out)
        write_run_config(args.out, run_config(args, ms, crd, model))
        print(f"finetune: adapter and {CONFIG_NAME} written to {args.out}")
    return trainer


def last_complete_checkpoint(out) -> str:
    """The newest ``checkpoint-N`` in ``out`` that holds ``trainer_state.json``, which the Trainer writes
    after the model, optimizer and scheduler: a run killed while saving leaves a newer, incomplete
    directory, from which the Trainer's own choice (the newest) cannot resume."""
    done = [d for d in Path(out).glob("checkpoint-*")
            if d.name.split("-")[-1].isdigit() and (d / "trainer_state.json").is_file()]
    if not done:
        raise SystemExit(f"finetune: --resume: no complete checkpoint (checkpoint-N with trainer_state.json) in {out}")
    return str(max(done, key=lambda d: int(d.name.split("-")[-1])))


if __name__ == "__main__":
    main()
