"""The MoE probe: tokens per expert, balance and router entropy of native MoE routers."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from sparsify.convert.moe.decisions import find_routers
from sparsify.convert.moe.routing import distribution, settings_of
from sparsify.eval.probes import Probe


class ExpertRoutingProbe(Probe):
    """Native MoE routers (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4.5-MoE): tokens per expert, balance, entropy."""

    kind = "moe"

    def __init__(self, routers: list[nn.Module], layers: list[int] | None = None):
        super().__init__(routers)
        self.routers = routers
        self.layers = layers or list(range(len(routers)))  # the model's layer index of each router (some layers may be dense)
        self.kinds = [settings_of(router).kind for router in routers]
        self.reset()

    @classmethod
    def find(cls, model: nn.Module) -> ExpertRoutingProbe | None:
        routers = find_routers(model)
        if not routers:
            return None
        names = {id(module): name for name, module in model.named_modules()}
        found = [re.search(r"layers\.(\d+)\.", names.get(id(router), "")) for router in routers]
        return cls(routers, [int(m.group(1)) for m in found] if all(found) else None)

    def reset(self) -> None:
        self.counts = [torch.zeros(r.weight.shape[0], dtype=torch.long) for r in self.routers]
        self.entropy_sums, self.tokens = [0.0] * len(self.routers), [0] * len(self.routers)

    def _record(self, layer: int, output: Any) -> None:
        logits, _, chosen = output
        self.counts[layer] += torch.bincount(chosen.reshape(-1).cpu(), minlength=self.counts[layer].numel())
        probs = distribution(logits, self.kinds[layer])
        self.entropy_sums[layer] += float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).sum())
        self.tokens[layer] += logits.shape[0]

    def summary(self) -> dict[str, Any]:
        layers = []
        for i, counts in enumerate(self.counts):
            experts, tokens = counts.numel(), max(self.tokens[i], 1)
            mean = counts.sum().item() / experts
            layers.append({
                "layer": self.layers[i],
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


def active_expert_share(model: nn.Module) -> float | None:
    """Share of the routed experts' parameters one token uses (k / E); None for a model without routers."""
    routers = find_routers(model)
    return routers[0].top_k / routers[0].weight.shape[0] if routers else None
