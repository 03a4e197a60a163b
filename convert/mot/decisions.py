"""MoT controllers in training: found by class name, the dense path (group size 1) that makes the
student its own teacher, and the group-size schedule (`--grow-group-size`).

No balance loss: every expert takes one mixed token per group by construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from sparsify.convert.mot.options import MoTTrainOptions, parse_growth
from sparsify.errors import SparsifyError
from sparsify.train.decisions import DENSE_FFN_MODULES, Decisions

EXPERT_PARAMETERS = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # MoTBlock's stacked (E, m, d) / (E, d, m) experts


def find_blocks(model: nn.Module) -> list[nn.Module]:
    # By class name: the class may come from the folder's remote code rather than from sparsify.
    return [m for m in model.modules() if type(m).__name__ == "MoTBlock"]


def group_size_at(step: int, total_steps: int, growth: tuple[int, int], fraction: float) -> int:
    """The group size of optimizer step `step` (1-based): START, 2*START, ... END, each size before END for
    an equal share of the first `fraction` of the steps, END from there on. G = 1 gets no steps: there the
    student is its own teacher (KL 0, no gradient to the controllers), and Adam's normalised steps on
    near-zero gradients only drift it (measured: KL 0 -> 0.08 over 0.9M tokens of SmolLM2)."""
    start, end = growth
    sizes = [max(start, 2) if end > 1 else 1]
    while sizes[-1] < end:
        sizes.append(sizes[-1] * 2)
    if len(sizes) == 1:
        return sizes[0]
    growing = fraction * total_steps  # steps before END
    index = int((step - 1) * (len(sizes) - 1) // growing) if growing > 0 else len(sizes) - 1
    return sizes[min(index, len(sizes) - 1)]


@contextmanager
def group_size(blocks: list[nn.Module], size: int) -> Iterator[None]:
    before = [block.group_size for block in blocks]
    for block in blocks:
        block.group_size = size
    try:
        yield
    finally:
        for block, kept in zip(blocks, before, strict=True):
            block.group_size = kept


class Controllers(Decisions):
    """A MoT model's controllers, trained in full; the group size grows on schedule."""

    def __init__(self, blocks: list[nn.Module], options: MoTTrainOptions):
        super().__init__([block.controller for block in blocks])
        self.blocks = blocks
        self.options = options
        self.growth = parse_growth(options.grow_group_size) if options.grow_group_size else None
        size = blocks[0].group_size
        if self.growth is not None and self.growth[1] != size:
            raise SparsifyError(f"--grow-group-size {options.grow_group_size} ends at {self.growth[1]}, but the model's group size is "
                                f"{size}: grow to {size}, or convert with --group-size {self.growth[1]}")

    def expert_lora_targets(self) -> tuple[list[str], list[str]]:
        # The MoT layers' experts are stacked 3-D parameters (one low-rank pair per expert through peft's
        # target_parameters, as for fused MoE experts); the other layers keep their dense FFN modules.
        return list(DENSE_FFN_MODULES), list(EXPERT_PARAMETERS)

    def expert_weights(self, model: nn.Module) -> list[nn.Parameter]:
        weights = super().expert_weights(model)  # the dense FFNs of the layers that stayed dense
        return weights + [getattr(block, name) for block in self.blocks for name in ("gate_proj", "up_proj", "down_proj")]

    def teacher_path(self, layout: Any):
        return group_size(self.blocks, 1)

    def on_step(self, step: int, total_steps: int) -> dict[str, float]:
        if self.growth is not None:
            size = group_size_at(step, total_steps, self.growth, self.options.grow_fraction)
            for block in self.blocks:
                block.group_size = size
        return {"group_size": float(self.blocks[0].group_size), "temperature": float(self.blocks[0].temperature)}


def quality_settings(model: nn.Module) -> dict[str, Any]:
    """What `sparsify eval` also scores a MoT model at: the dense path (G = 1) and half and twice its group
    size (how much its quality hangs on G, which the batch at serving time may not match)."""
    blocks = find_blocks(model)
    if not blocks:
        return {}
    size = blocks[0].group_size
    others = sorted({1, size // 2, size * 2} - {0, size})
    return {f"group size {other}": group_size(blocks, other) for other in others}


def find_decisions(model: nn.Module, options: dict[str, Any]) -> Controllers | None:
    blocks = find_blocks(model)
    return Controllers(blocks, options.get(MoTTrainOptions.section) or MoTTrainOptions()) if blocks else None
