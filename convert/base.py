"""What every variant's conversion shares: the plan type, exactness, tensor passthrough, the
config keys a converted model does not inherit (the typed layout record is in variant.py, torch-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.variant import Layout

# Buffers some old checkpoints saved that models recompute (and would reject as unexpected).
SKIPPED = re.compile(r"rotary_emb\.inv_freq$")

# Dense config keys that describe the dense model rather than the converted one.
DROPPED_CONFIG_KEYS = {"architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype"}


# on_progress(stage, done, total): long steps of planning (calibration) report how far they are.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class Exactness:
    exact: bool
    reason: str


@dataclass
class ConversionPlan:
    config: dict[str, Any]  # config.json of the output
    tensors: list[PlannedTensor]  # in write order; produced lazily
    layout: Layout  # variant-specific facts for sparsify.json, `sparsify info` and the card
    exactness: Exactness  # whether the fresh output reproduces the teacher's logits, and why
    tags: list[str] = field(default_factory=list)  # model card tags
    files: dict[str, bytes] = field(default_factory=dict)  # extra files (remote modeling code), by name

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def passthrough(reader: Any, name: str, dtype: torch.dtype) -> PlannedTensor:
    """A source tensor copied unchanged (floating-point ones cast to the output dtype)."""
    source_dtype = reader.dtype(name)
    out_dtype = dtype if source_dtype.is_floating_point else source_dtype
    return PlannedTensor(name, reader.shape(name), out_dtype, lambda: reader.get(name).to(out_dtype))


def kept_source_tensors(source: Any) -> list[str]:
    """The source tensors a conversion reads, in order: all but buffers models recompute and a tied
    output head (the input embedding, stored once as transformers saves it)."""
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    return [name for name in source.tensors.names() if not SKIPPED.search(name) and not (tied and name == "lm_head.weight")]
