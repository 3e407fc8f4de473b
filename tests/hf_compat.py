"""What the tests need to read or pass a cache on every supported transformers release: the name of
the cache argument moved from ``past_key_values`` to ``cache`` in 5.24 (msattn's own code asks
``msattn.hf.cache_argument``)."""

from msattn.hf import cache_argument


def with_cache(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)`` keyword arguments."""
    return {cache_argument(model): cache}


def output_cache(out):
    """The cache of a model or ``generate()`` output (``out.cache`` in newer releases, ``out.past_key_values`` in older ones)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
