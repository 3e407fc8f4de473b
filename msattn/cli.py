"""The command line: ``msattn pretrain|finetune|infer|losscurve --config FILE.yaml [--key value ...]``.

``python -m msattn`` is the same command. Each command's fields are dataclasses parsed by transformers'
``HfArgumentParser`` (``msattn.workflow.arguments``; the training commands add the Trainer's own
``TrainingArguments``), so one YAML file holds the msattn fields and the Trainer's side by side. The
YAML's keys are read as if they were flags given before the command line's own, so a flag overrides
the file's value (``--topk 8`` or ``--topk=8``; ``--block-q`` and ``--block_q`` both work). Every key is
checked before anything runs: an unknown key, a value of the wrong type or a missing file is an error
that names the key.

    msattn pretrain --config configs/pretrain.yaml
    msattn finetune --config configs/finetune.yaml --max_steps 50
    msattn infer --config configs/infer.yaml --passkey_length 4096
    msattn losscurve --config configs/loss_curve.yaml
    torchrun --nproc_per_node 2 -m msattn pretrain --config configs/pretrain.yaml
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import dataclass

from .config import ConfigError

__all__ = ["COMMANDS", "ConfigError", "build_parser", "parse", "run", "main"]


@dataclass(frozen=True)
class Command:
    module: str        # msattn.workflow.<module>
    function: str      # called with the parsed dataclasses, in the order of `arguments`
    arguments: tuple   # names in msattn.workflow.arguments, or "TrainingArguments"
    summary: str


COMMANDS = {
    "pretrain": Command("train", "pretrain",
                        ("ArchitectureArguments", "AttentionArguments", "DataArguments", "TrainingArguments"),
                        "train a Llama from scratch with MS attention on text files"),
    "finetune": Command("train", "finetune",
                        ("BaseModelArguments", "AttentionArguments", "CRDArguments", "LoraArguments",
                         "DataArguments", "TrainingArguments"),
                        "fine-tune a model with MS attention, CRD NTK RoPE and reduced LoRA"),
    "infer": Command("infer", "infer", ("InferArguments", "AttentionArguments"),
                     "long-context generation: prefill and decode speed, peak memory"),
    "losscurve": Command("losscurve", "losscurve",
                         ("LossCurveArguments", "ArchitectureArguments", "AttentionArguments", "DataArguments",
                          "TrainingArguments"),
                         "the same pretraining under several selection budgets: loss curves, held-out loss"),
}


def _training_defaults(command: str) -> dict:
    """The Trainer defaults of the training commands (a config or flag overrides each): no reporting
    integrations, the CRD NTK schedule restored on resume, and on a machine without CUDA ``use_cpu``
    (without it accelerate does not see a torchrun or accelerate launch on the CPU as distributed, and
    each process trains alone) with the gloo backend."""
    import torch

    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {"output_dir": os.path.join("runs", command), "report_to": "none", "logging_steps": 1,
            "label_names": ["labels"], "restore_callback_states_from_checkpoint": True,
            "ddp_find_unused_parameters": False, "dataloader_pin_memory": not cpu, "use_cpu": cpu,
            "ddp_backend": "gloo" if distributed and cpu else None}


def build_parser(command: str):
    """The ``HfArgumentParser`` of ``command``, with its Trainer defaults; ``.dataclass_types`` in the
    order the command's function takes them."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    try:
        from transformers import HfArgumentParser, TrainingArguments
    except ImportError as e:
        raise ConfigError(f"the msattn command needs transformers, PEFT and matplotlib: pip install "
                          f"'msattn[hf,eval]' ({e})") from None

    from .workflow import arguments

    spec = COMMANDS[command]
    types = [TrainingArguments if name == "TrainingArguments" else getattr(arguments, name) for name in spec.arguments]
    parser = HfArgumentParser(types, prog=f"msattn {command}", description=spec.summary)
    parser.add_argument("--config", help="a YAML file of fields (flags given here override it)")
    if "TrainingArguments" in spec.arguments:
        parser.set_defaults(**_training_defaults(command))
    return parser


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config") and a.option_strings}


def _expected(action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    kind = getattr(action.type, "__name__", "a value")
    return {"string_to_bool": "true or false", "int": "an int", "float": "a number", "str": "a string"}.get(kind, kind)


def _dict_fields(parser) -> set[str]:
    """The fields whose type takes a dict (the Trainer's ``fsdp_config``, ``accelerator_config``...)."""
    import typing

    return {name for cls in parser.dataclass_types for name, hint in typing.get_type_hints(cls).items()
            if "dict" in str(hint)}


def _convert(key: str, action, value, where: str, takes_dict: bool = False):
    """A YAML value as the flag's type would parse it; ConfigError naming the key otherwise."""
    def bad():
        return ConfigError(f"{where}: {key}: expected {_expected(action)}"
                           f"{' or a list of them' if action.nargs == '+' else ''}, got {value!r}")

    def one(item):
        kind = action.type
        if kind is int:
            if isinstance(item, bool) or not isinstance(item, int):
                raise bad()
            return item
        if kind is float:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise bad()
            return float(item)
        if kind is str or kind is None:
            if isinstance(item, dict) and takes_dict:  # the Trainer's dict-or-JSON fields (fsdp_config, ...)
                return item
            if isinstance(item, (list, bool, dict)):
                raise bad()
            return str(item)
        if isinstance(item, (dict, list)):
            raise bad()
        if action.choices is not None and item in action.choices:
            return item
        try:
            out = kind(item if isinstance(item, bool) else str(item))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise bad() from None
        if action.choices is not None and out not in action.choices:
            raise bad()
        return out

    if value is None:
        if action.default is not None:
            raise bad()
        return None
    if action.nargs == "+":
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    return one(value)


def read_config(path, parser) -> dict:
    """The YAML file's fields, each checked against the parser's flags and converted to its type."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config: {path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    actions, dicts = _actions(parser), _dict_fields(parser)
    out = {}
    for key, value in data.items():
        if key not in actions:
            near = difflib.get_close_matches(str(key), list(actions), n=1)
            raise ConfigError(f"{path}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; `{parser.prog} --help` lists the fields")
        out[key] = _convert(key, actions[key], value, path, takes_dict=key in dicts)
    return out


class _Parser:
    """Turns argparse's exits into ConfigError, so that callers (tests, other programs) get an exception."""

    def __init__(self, parser):
        self.parser = parser

    def __enter__(self):
        self._error = self.parser.error
        self.parser.error = self._raise
        return self.parser

    def __exit__(self, *exc):
        self.parser.error = self._error

    def _raise(self, message):
        raise ConfigError(message)


def parse(command: str, argv) -> tuple:
    """The dataclasses of ``command`` from ``--config FILE`` and the flags in ``argv`` (flags win)."""
    parser = build_parser(command)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    with _Parser(parser):
        if known.config is not None:
            parser.set_defaults(**read_config(known.config, parser))
        try:
            args = parser.parse_args_into_dataclasses(list(argv), look_for_args_file=False)
        except ValueError as e:  # a dataclass's own check (TrainingArguments' combinations) or unused flags
            raise ConfigError(str(e)) from None
    return tuple(args[:len(parser.dataclass_types)])  # (the last one holds --config)


def run(argv):
    """Parse ``argv`` (``[command, flags...]``) and run the command; returns what it returns (the Trainer
    of a training command, the measurements of infer and losscurve)."""
    import importlib

    argv = list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"expected a command ({', '.join(COMMANDS)}), got {argv[0] if argv else 'nothing'!r}")
    command, flags = argv[0], argv[1:]
    args = parse(command, flags)
    spec = COMMANDS[command]
    function = getattr(importlib.import_module(f"msattn.workflow.{spec.module}"), spec.function)
    return function(*args)


def _usage() -> str:
    lines = ["usage: msattn COMMAND --config FILE.yaml [--field value ...]", "", "commands:"]
    lines += [f"  {name:<10} {spec.summary}" for name, spec in COMMANDS.items()]
    lines += ["", "`msattn COMMAND --help` lists a command's fields (each a YAML key and a flag)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    """The console script: exit status 0, 2 for a bad command line or config (the message names the key)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        run(argv)
    except ConfigError as e:
        print(f"msattn {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return 0
