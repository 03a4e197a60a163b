"""The KV cache argument's name across transformers versions.

transformers 5.24 renamed `past_key_values` to `cache` (arguments and model outputs); the old name
still works there but warns. sparsify supports 5.17 onwards, so it asks which name a function takes.
(convert/skip/modeling_skip.py keeps its own copy: it must load without sparsify installed.)
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_argument(function) -> str:
    """`cache` where the function (a model's forward, an output class) takes it, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def with_cache(model, cache) -> dict[str, Any]:
    """Keyword arguments passing `cache` to `model` under the name its forward takes."""
    return {cache_argument(model.forward): cache}


def returned_cache(outputs):
    """The cache a forward pass returned, under either name."""
    return outputs.get("cache", None) if "cache" in outputs else outputs.get("past_key_values", None)
