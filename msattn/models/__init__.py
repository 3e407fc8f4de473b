"""Loaders for pretrained models in formats transformers does not read itself."""

from .llama2c import Llama2cTokenizer, load_llama2c

__all__ = ["Llama2cTokenizer", "load_llama2c"]
