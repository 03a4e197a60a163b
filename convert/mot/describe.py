"""How `sparsify info`, the model card and eval reports describe a Mixture-of-Tokens folder (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsify.convert.variant import Layout
from sparsify.option_values import layer_ranges

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
    split: str = "contiguous"
    family: str = ""
    calibration: dict[str, Any] | None = None  # the calibration text, and per layer how well the fitted controller picks
    architecture: str = "MoTForCausalLM"
    dense_path: dict[str, int] | None = None  # {"group_size": 1} while G = 1 computes the teacher exactly
    grouping: str = "the sequences of a batch in order, G per group, at one position; padding takes no weight"

    def rows(self) -> list[tuple[str, str]]:
        layers = self.mot_layers
        return [
            ("MoT layers", f"{layer_ranges(layers)} ({len(layers)} layer{'s' if len(layers) > 1 else ''})"),
            ("experts", f"{self.experts} x {self.expert_size} neurons" + (f" (from {self.copies} copies of the FFN)" if self.copies > 1 else "")),
            ("group size", f"{self.group_size} (1 reproduces the dense model)"),
            ("mixture temperature", f"{self.temperature:g}"),
            ("controller init", self.controller_init),
            ("neurons per expert", "coactivation clusters" if self.split == "coactivation" else "contiguous slices"),
            ("grouping", self.grouping),
        ]


LAYOUT = MoTLayout


def recognises(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


# --- how `sparsify eval` shows what the MoT probe saw -------------------------------------------

ROUTING_KIND = "mot"
FLOPS_AT_ACTIVITY = ("total_mot", "forward GFLOPs per token at the model's group size (experts once per group)")


def routing_rows(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    size = summary["group_size"]
    if size == 1:
        return [("group size (1: every token alone, the dense model)", 1.0, ".0f")]
    return [
        ("group size", float(size), ".0f"),
        (f"mixture entropy per expert (nats; uniform = {summary['max_entropy']:.3f})", summary["mixture_entropy"], ".3f"),
        (f"effective tokens per expert (of {size})", summary["effective_tokens"], ".2f"),
        ("largest mixture weight per expert", summary["top_weight"], ".3f"),
    ]


def routing_plot(summary: dict[str, Any], folder: Path, plt: Any) -> Path:
    figure, axis = plt.subplots(figsize=(7.0, 3.5))
    rows = summary["layers"]
    axis.plot([row["layer"] for row in rows], [row["effective_tokens"] for row in rows], marker="o")
    axis.axhline(summary["group_size"], linestyle="--", color="grey", linewidth=1)
    axis.set_xlabel("layer")
    axis.set_ylabel("effective tokens per expert")
    axis.set_ylim(0, summary["group_size"] * 1.05)
    axis.set_title(f"MoT mixing per layer (G = {summary['group_size']}, {summary['groups']:,} groups)", fontsize=10)
    figure.tight_layout()
    path = folder / "mot_mixing.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
