"""What every converter returns: the output model, fully described before any data is computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparsify.checkpoint_writer import PlannedTensor
from sparsify.convert.experts import Exactness


@dataclass
class ConversionPlan:
    config: dict[str, Any]  # config.json of the output
    tensors: list[PlannedTensor]  # in write order; produced lazily
    layout: dict[str, Any]  # variant-specific facts for sparsify.json, `sparsify info` and the card
    exactness: Exactness  # whether the fresh output reproduces the teacher's logits, and why
    tags: list[str] = field(default_factory=list)  # model card tags
    files: dict[str, bytes] = field(default_factory=dict)  # extra files (remote modeling code), by name

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)
