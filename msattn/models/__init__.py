"""Loaders for pretrained models in formats transformers does not read directly: llama2.c checkpoints,
and GGUF files (named models shipped in Python packages included) converted once into HF directories."""

from .gguf import NAMED, gguf_to_hf, load_gguf, resolve
from .llama2c import Llama2cTokenizer, load_llama2c

__all__ = ["NAMED", "Llama2cTokenizer", "gguf_to_hf", "load_gguf", "load_llama2c", "resolve"]
