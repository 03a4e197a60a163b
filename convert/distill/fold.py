"""The initialisations of `sparsify distill`, as arithmetic on one layer's experts.

Routed expert e is partition p of copy c, e = c*R + p (convert/moe/experts.py): R partitions of the
parent's FFN neurons, C copies of each, and each expert's down projection carries a factor s (the
expert scale). The dense student has one neuron per parent neuron: partition p's neurons are a
mix of its C copies,
    gate_p = sum_c a_c gate_{c,p},   up_p likewise,   down_p = sum_c d_c down_{c,p},
and the shared expert's neurons (if any) go in front, their down projection times the shared gate's
mean (1 without a gate). The initialisations differ only in (a, d), from each copy's routing frequency
f_c and mean weight w_c = E[weight of (c, p)] (usage.py):
    merge   a = f / sum f,  d = a / s   (the parent plus the usage-weighted sum of the copies' deltas)
    concat  a = w / sum w,  d = w       (each expert's mean routing weight folded into its down projection)
    top1    a = d*s = one-hot of the most-used copy
An untrained upcycle (identical copies) merges back into its parent exactly; an exact fine-grained
conversion (K = R, weights 1/R, s = R) concatenates back into it exactly.
A folder without a sparsify.json layout is taken as C copies of one partition (an upcycled MoE's shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparsify.convert.distill.usage import LayerUsage


@dataclass(frozen=True)
class ExpertGrid:
    """How the routed experts map onto the parent's neurons."""

    copies: int  # C
    partitions: int  # R
    scale: float = 1.0  # s, on each routed expert's down projection

    @classmethod
    def from_layout(cls, layout: dict | None, experts: int) -> ExpertGrid:
        if not layout:
            return cls(copies=experts, partitions=1)
        copies = int(layout["copies"])
        return cls(copies, experts // copies, float(layout.get("expert_scale") or 1))


@dataclass
class LayerExperts:
    """One layer's experts in fp32: routed (N, I, H) gate and up, (N, H, I) down; shared (if any) as one FFN."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    shared: dict[str, torch.Tensor] | None = None

    @classmethod
    def of_block(cls, block: torch.nn.Module) -> LayerExperts:
        """From a transformers 5 routed block: fused `experts.gate_up_proj` (gate rows first) and `down_proj`,
        and a `shared_expert` (Qwen2-MoE) or `shared_experts` (GLM-4.5-MoE) MLP."""
        gate_up = block.experts.gate_up_proj.detach().float()
        width = gate_up.shape[1] // 2
        shared_mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
        shared = None
        if shared_mlp is not None and shared_mlp.gate_proj.weight.shape[0] > 0:
            shared = {role: getattr(shared_mlp, f"{role}_proj").weight.detach().float() for role in ("gate", "up", "down")}
        return cls(gate_up[:, :width], gate_up[:, width:], block.experts.down_proj.detach().float(), shared)


Mix = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def _share(values: torch.Tensor) -> torch.Tensor:
    total = values.sum()
    return values / total if total > 0 else torch.full_like(values, 1 / len(values))


def _merge(frequency: torch.Tensor, mean_weight: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = _share(frequency)
    return a, a / scale


def _concat(frequency: torch.Tensor, mean_weight: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _share(mean_weight), mean_weight


def _top1(frequency: torch.Tensor, mean_weight: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.zeros_like(frequency)
    a[int(frequency.argmax())] = 1.0
    return a, a / scale


MIXES: dict[str, Mix] = {"merge": _merge, "concat": _concat, "top1": _top1}


def fold(experts: LayerExperts, usage: LayerUsage, grid: ExpertGrid, init: str) -> dict[str, torch.Tensor]:
    """The dense FFN (gate (d_ff, H), up (d_ff, H), down (H, d_ff)) that `init` makes of one layer."""
    mix = MIXES[init]
    parts: dict[str, list[torch.Tensor]] = {"gate": [], "up": [], "down": []}
    if experts.shared is not None:
        gate_mean = 1.0 if usage.shared_gate is None else usage.shared_gate
        parts["gate"].append(experts.shared["gate"])
        parts["up"].append(experts.shared["up"])
        parts["down"].append(experts.shared["down"] * gate_mean)
    copies = torch.arange(grid.copies) * grid.partitions
    for partition in range(grid.partitions):
        members = copies + partition
        a, d = mix(usage.frequency[members].double(), usage.mean_weight[members].double(), grid.scale)
        a, d = a.float(), d.float()
        parts["gate"].append(torch.einsum("c,cih->ih", a, experts.gate[members]))
        parts["up"].append(torch.einsum("c,cih->ih", a, experts.up[members]))
        parts["down"].append(torch.einsum("c,chi->hi", d, experts.down[members]))
    return {"gate": torch.cat(parts["gate"]), "up": torch.cat(parts["up"]), "down": torch.cat(parts["down"], dim=1)}


__all__ = ["ExpertGrid", "LayerExperts", "MIXES", "fold"]
