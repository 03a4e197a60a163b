"""Per-variant instruments: hooks that watch a model's sparse decisions without changing them.

Each probe kind says whether it applies to a model, attaches forward hooks that only read the
decision modules' outputs, and summarises what it saw. `sparsify eval` runs every probe that
applies, so a new variant (skip gates, MoT) adds a probe here and nothing else changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsify.train.routing import find_routers


@dataclass
class ExpertRoutingProbe:
    """Native MoE routers (Mixtral, Qwen2-MoE, Qwen3-MoE): tokens per expert, balance, entropy."""

    kind = "moe"
    routers: list[nn.Module]
    counts: list[torch.Tensor] = field(default_factory=list)
    entropy_sums: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    @classmethod
    def find(cls, model: nn.Module) -> ExpertRoutingProbe | None:
        routers = find_routers(model)
        return cls(routers) if routers else None

    def attach(self) -> None:
        self.counts = [torch.zeros(r.weight.shape[0], dtype=torch.long) for r in self.routers]
        self.entropy_sums, self.tokens = [0.0] * len(self.routers), [0] * len(self.routers)
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: int):
        def record(module, inputs, output) -> None:
            logits, _, chosen = output
            self.counts[layer] += torch.bincount(chosen.reshape(-1).cpu(), minlength=self.counts[layer].numel())
            probs = torch.softmax(logits.float(), dim=-1)
            self.entropy_sums[layer] += float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).sum())
            self.tokens[layer] += logits.shape[0]

        return record

    def summary(self) -> dict[str, Any]:
        layers = []
        for i, counts in enumerate(self.counts):
            experts, tokens = counts.numel(), max(self.tokens[i], 1)
            mean = counts.sum().item() / experts
            layers.append({
                "layer": i,
                "load": counts.tolist(),
                "imbalance": counts.max().item() / mean if mean else 0.0,
                "entropy": self.entropy_sums[i] / tokens,
                "entropy_normalised": self.entropy_sums[i] / tokens / math.log(experts),
            })
        return {
            "kind": self.kind,
            "tokens": self.tokens[0] if self.tokens else 0,
            "num_experts": int(self.routers[0].weight.shape[0]),
            "top_k": int(self.routers[0].top_k),
            "layers": layers,
            "max_imbalance": max(layer["imbalance"] for layer in layers),
            "mean_entropy_normalised": sum(layer["entropy_normalised"] for layer in layers) / len(layers),
        }


@dataclass
class SkipGateProbe:
    """Layer-skip gates: the fraction of tokens that skip each gated attention and FFN sublayer."""

    kind = "skip"
    gates: list[tuple[int, str, nn.Module]]
    skipped: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    @classmethod
    def find(cls, model: nn.Module) -> SkipGateProbe | None:
        gates = model.skip_gates() if hasattr(model, "skip_gates") else []
        return cls(gates) if gates else None

    def attach(self) -> None:
        self.skipped, self.seen = [0] * len(self.gates), [0] * len(self.gates)
        self._handles = [gate.register_forward_hook(self._hook(i)) for i, (_, _, gate) in enumerate(self.gates)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def record(module, inputs, output) -> None:
            keep = output[1]
            self.skipped[index] += int((keep == 0).sum())
            self.seen[index] += keep.numel()

        return record

    def summary(self) -> dict[str, Any]:
        rows = [
            {"layer": layer, "sublayer": sublayer, "skip_rate": self.skipped[i] / max(self.seen[i], 1)}
            for i, (layer, sublayer, _) in enumerate(self.gates)
        ]
        by_sublayer = {}
        for sublayer in dict.fromkeys(row["sublayer"] for row in rows):
            picked = [i for i, row in enumerate(rows) if row["sublayer"] == sublayer]
            by_sublayer[sublayer] = sum(self.skipped[i] for i in picked) / max(sum(self.seen[i] for i in picked), 1)
        return {
            "kind": self.kind,
            "threshold": float(self.gates[0][2].threshold),
            "tokens": self.seen[0] if self.seen else 0,
            "sublayers": rows,
            "skip_rate": sum(self.skipped) / max(sum(self.seen), 1),
            "skip_rate_by_sublayer": by_sublayer,
        }


PROBES = [ExpertRoutingProbe, SkipGateProbe]


def probes_for(model: nn.Module) -> list[Any]:
    return [probe for kind in PROBES if (probe := kind.find(model)) is not None]
