"""msattn.cli: YAML configs and flags through HfArgumentParser, every key checked, errors that name it;
the shipped configs parse."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from msattn import cli  # noqa: E402
from msattn.config import InfiniConfig, MSConfig, SelfExtendConfig  # noqa: E402
from msattn.config import ConfigError  # noqa: E402
from msattn.workflow.arguments import AttentionArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_fields_reach_every_dataclass_and_flags_override_them(tmp_path):
    config = _yaml(tmp_path, "hidden_size: 64\ntopk: 4\nrope: selected\ntext: [a.txt, b.txt]\nseq_len: 256\n"
                             "max_steps: 7\nlearning_rate: 0.01\nbf16: false\noutput_dir: out\n")
    arch, attn, data, training = cli.parse("pretrain", ["--config", config, "--topk", "8", "--max-steps=9"])
    assert (arch.hidden_size, arch.tokenizer) == (64, "bytes")
    assert (attn.topk, attn.rope, attn.block_q) == (8, "selected", None)  # flag over the file; unset stays None
    assert (data.text, data.seq_len) == (["a.txt", "b.txt"], 256)
    assert (training.max_steps, training.learning_rate, training.output_dir) == (9, 0.01, "out")
    # the Trainer defaults of a training command, and a file or flag overriding one
    assert training.report_to == [] or training.report_to == "none" or training.report_to == ["none"]
    assert training.restore_callback_states_from_checkpoint and training.logging_steps == 1
    *_, training = cli.parse("pretrain", ["--config", config, "--logging_steps", "5"])
    assert training.logging_steps == 5
    # with no config at all: the dataclasses' defaults
    arch, attn, data, training = cli.parse("pretrain", [])
    assert arch.hidden_size == 128 and attn.topk is None and data.text == [] and training.output_dir == "runs/pretrain"


def test_a_yaml_list_a_scalar_for_a_list_a_bool_and_null(tmp_path):
    config = _yaml(tmp_path, "text: one.txt\ndelta_rule: true\nmax_tokens: null\nbudgets: [dense, topk=2]\n")
    lc, _, attn, data, _ = cli.parse("losscurve", ["--config", config])
    assert data.text == ["one.txt"] and attn.delta_rule is True and data.max_tokens is None
    assert lc.budgets == ["dense", "topk=2"]


@pytest.mark.parametrize("text, message", [
    ("topkk: 4\n", "unknown key 'topkk' (did you mean 'topk'?)"),
    ("topk: many\n", "topk: expected an int, got 'many'"),
    ("topk: 2.5\n", "topk: expected an int, got 2.5"),
    ("topk: true\n", "topk: expected an int, got True"),
    ("rope: sideways\n", "rope: expected one of inputs, selected, got 'sideways'"),
    ("learning_rate: fast\n", "learning_rate: expected a number, got 'fast'"),
    ("seq_len: null\n", "seq_len: expected an int, got None"),
    ("text: {a: 1}\n", "text: expected a string or a list of them"),
    ("- a\n- b\n", "expected a mapping of fields, got list"),
    ("topk: [1\n", "not valid YAML"),
])
def test_a_bad_config_names_its_key(tmp_path, text, message):
    config = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        cli.parse("pretrain", ["--config", config])
    assert message in str(e.value) and config in str(e.value)


def test_bad_flags_missing_files_and_unknown_commands_are_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--config: .*nope.yaml: no such file"):
        cli.parse("pretrain", ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="argument --topk: invalid int value: 'x'"):
        cli.parse("pretrain", ["--topk", "x"])
    with pytest.raises(ConfigError, match="--topkk"):
        cli.parse("pretrain", ["--topkk", "3"])
    with pytest.raises(ConfigError, match="expected a command"):
        cli.run(["train"])
    # the console script: exit status 2 and the message on stderr, no traceback
    assert cli.main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "msattn pretrain: error: --config:" in err and "Traceback" not in err
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0
    assert "losscurve" in capsys.readouterr().out


def test_values_a_method_config_refuses_are_errors_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="MSConfig.block_q must be a positive int, got 0"):
        AttentionArguments(block_q=0).settings()
    with pytest.raises(ConfigError, match="merge \\* block_q must be a multiple of block_k"):
        AttentionArguments(block_q=16, merge=1, block_k=32).settings()


def test_attention_arguments_carry_every_method_config_field():
    # the fields a YAML can set: every parameter of the method configs but those that are not per-run
    # choices (MSConfig.layers, InfiniConfig.gate_init)
    carried = {f.name for f in dataclasses.fields(AttentionArguments)}
    for config in (MSConfig, SelfExtendConfig, InfiniConfig):
        assert {f.name for f in dataclasses.fields(config)} - {"layers", "gate_init"} <= carried, config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    command = {"pretrain": "pretrain", "finetune": "finetune", "infer": "infer", "loss": "losscurve"}[
        path.stem.split("_")[0]]
    args = cli.parse(command, ["--config", str(path)])
    assert len(args) == len(cli.COMMANDS[command].arguments)
    for a in args:
        if isinstance(a, AttentionArguments) and a.attention is not None:
            a.settings()  # the config's method settings are valid


def test_python_dash_m_msattn_is_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "msattn", "infer", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--passkey_length" in proc.stdout and "--block-q" in proc.stdout


def test_without_transformers_the_command_says_what_to_install():
    code = ("import sys; sys.modules['transformers'] = None; from msattn import cli; "
            "sys.exit(cli.main(['pretrain']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install 'msattn[hf,eval]'" in proc.stderr, proc.stderr
