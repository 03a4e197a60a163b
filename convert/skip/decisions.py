"""Skip gates in training: find them, hold them open for the teacher, collect their decisions.

A fresh `--to skip` model with every gate open *is* its dense teacher, so — as with the MoE dense
path — the teacher comes from the student's own frozen weights: adapters off and gates forced
open. The sparsity loss pushes gate openings down, either as an L1 penalty or towards a target
skip rate; the hard skip rate actually applied is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sparsify.convert.skip.options import SkipTrainOptions
from sparsify.train.decisions import Decisions


def find_gates(model: nn.Module) -> list[nn.Module]:
    # By class name: the class may come from the folder's remote code rather than from sparsify.
    return [m for m in model.modules() if type(m).__name__ == "SkipGate"]


@contextmanager
def gates_open(gates: list[nn.Module]) -> Iterator[None]:
    before = [gate.forced for gate in gates]  # frozen gates keep their fixed decision afterwards
    for gate in gates:
        gate.forced = True
    try:
        yield
    finally:
        for gate, forced in zip(gates, before, strict=True):
            gate.forced = forced


@contextmanager
def gates_at_threshold(gates: list[nn.Module], threshold: float | None) -> Iterator[None]:
    """The gates deciding at `threshold` inside the block (None: as they are); frozen gates keep their decision."""
    before = [gate.threshold for gate in gates]
    if threshold is not None:
        for gate in gates:
            gate.threshold = threshold
    try:
        yield
    finally:
        for gate, value in zip(gates, before, strict=True):
            gate.threshold = value


@contextmanager
def recording(gates: list[nn.Module]) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Collect every gate's (probability, keep) of the forward passes run inside the block."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [gate.register_forward_hook(lambda module, inputs, output: seen.append(output)) for gate in gates]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def sparsity_loss(seen: list[tuple[torch.Tensor, torch.Tensor]], target_skip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, hard skip rate). L1 on the mean gate opening, or with a target skip rate a hinge that
    stops pushing once the mean opening is at or below 1 - target (KL then decides the rest)."""
    opening = torch.cat([probability.reshape(-1) for probability, _ in seen]).mean()
    skip_rate = 1.0 - torch.cat([keep.reshape(-1) for _, keep in seen]).mean()
    loss = torch.relu(opening - (1.0 - target_skip)) if target_skip > 0 else opening
    return loss, skip_rate.detach()


class Gates(Decisions):
    """A skip model's gates: trained in full, pushed towards skipping by the sparsity loss."""

    def __init__(self, gates: list[nn.Module], options: SkipTrainOptions):
        super().__init__(gates)
        self.options = options

    def teacher_path(self, layout: Any):
        return gates_open(self.modules)

    def watch(self):
        return recording(self.modules)

    def loss(self, output: Any, seen: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        skip, skip_rate = sparsity_loss(seen, self.options.target_skip)
        return self.options.skip_weight * skip, {"skip": skip, "skip_rate": skip_rate}

    def heldout(self, seen: list[Any]) -> dict[str, torch.Tensor]:
        return {"skip_rate": 1.0 - torch.cat([keep.reshape(-1) for _, keep in seen]).float().mean()}


def find_decisions(model: nn.Module, options: dict[str, Any]) -> Gates | None:
    gates = find_gates(model)
    return Gates(gates, options.get(SkipTrainOptions.section) or SkipTrainOptions()) if gates else None
