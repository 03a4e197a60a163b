"""How `sparsify info`, the model card and eval reports describe a Mixture-of-Tokens folder (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsify.convert.variant import Layout

MODEL_TYPE = "sparsify_mot"


@dataclass(frozen=True)
class MoTLayout(Layout):
    mot_layers: list[int]
    experts: int
    expert_size: int  # neurons per expert
    group_size: int  # G the folder was written with (training may grow it; config.json holds the current one)
    copies: int
    temperature: float
    controller_init: str
    family: str = ""
    architecture: str = "MoTForCausalLM"
    dense_path: dict[str, int] | None = None  # {"group_size": 1} while G = 1 computes the teacher exactly
    grouping: str = "the sequences of a batch in order, G per group, at one position; padding takes no weight"

    def rows(self) -> list[tuple[str, str]]:
        layers = self.mot_layers
        contiguous = layers == list(range(layers[0], layers[-1] + 1))
        span = (f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])) if contiguous else ", ".join(map(str, layers))
        return [
            ("MoT layers", f"{span} ({len(layers)} layer{'s' if len(layers) > 1 else ''})"),
            ("experts", f"{self.experts} x {self.expert_size} neurons" + (f" (from {self.copies} copies of the FFN)" if self.copies > 1 else "")),
            ("group size", f"{self.group_size} (1 reproduces the dense model)"),
            ("mixture temperature", f"{self.temperature:g}"),
            ("controller init", self.controller_init),
            ("grouping", self.grouping),
        ]


LAYOUT = MoTLayout


def recognises(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE
