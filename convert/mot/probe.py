"""The MoT probe: how each layer's experts mix their group's tokens, and the FLOPs that costs.

Per expert and group, the mixture is a distribution over the group's real tokens. Its entropy H says
how many tokens an expert really blends: exp(H) "effective tokens" (1: it picks one token, Expert
Choice with capacity 1; G: a uniform blend). Reported per layer as means over groups, positions and
experts, with the largest weight a token gets.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparsify.eval.probes import Probe


class MixtureProbe(Probe):
    kind = "mot"
    flops_key = "total_mot"

    def __init__(self, layers: list[tuple[int, nn.Module]]):
        super().__init__([block.mixture for _, block in layers])
        self.layers = layers
        self.reset()

    @classmethod
    def find(cls, model: nn.Module) -> MixtureProbe | None:
        layers = [(i, layer.mlp) for i, layer in enumerate(getattr(getattr(model, "model", None), "layers", []))
                  if type(getattr(layer, "mlp", None)).__name__ == "MoTBlock"]
        return cls(layers) if layers else None

    def reset(self) -> None:
        count = len(self.layers)
        self.groups, self.entropy, self.effective, self.top_weight = [0] * count, [0.0] * count, [0.0] * count, [0.0] * count

    def _record(self, index: int, output: Any) -> None:
        weights, valid = output  # (n, S, G, E), (n, S, G)
        real = valid.any(dim=2)  # groups with at least one real token
        if not bool(real.any()):
            return
        w = weights.float()[real]  # (groups, G, E)
        entropy = -(w * torch.log(w.clamp_min(1e-30))).sum(dim=1)  # (groups, E)
        self.groups[index] += w.shape[0]
        self.entropy[index] += float(entropy.mean(dim=1).sum())
        self.effective[index] += float(entropy.exp().mean(dim=1).sum())
        self.top_weight[index] += float(w.amax(dim=1).mean(dim=1).sum())

    def summary(self) -> dict[str, Any]:
        size = int(self.layers[0][1].group_size)
        rows = [{"layer": layer, "groups": self.groups[i],
                 "mixture_entropy": self.entropy[i] / max(self.groups[i], 1),
                 "effective_tokens": self.effective[i] / max(self.groups[i], 1),
                 "top_weight": self.top_weight[i] / max(self.groups[i], 1)} for i, (layer, _) in enumerate(self.layers)]
        mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
        return {"kind": self.kind, "group_size": size, "temperature": float(self.layers[0][1].temperature),
                "max_entropy": math.log(size), "layers": rows, "groups": sum(self.groups),
                "mixture_entropy": mean("mixture_entropy"), "effective_tokens": mean("effective_tokens"), "top_weight": mean("top_weight")}

    @staticmethod
    def flops_at_activity(model: nn.Module, flops: dict[str, float], summary: dict[str, Any]) -> float:
        """Forward FLOPs per token at the model's group size G. The static count charges every token all
        the experts and the controller; at G > 1 each expert runs once per group of G tokens, and mixing
        in and emitting out cost 2 E d each per token; at G = 1 the layer is its dense FFN, no controller."""
        size = summary["group_size"]
        change = 0.0
        for _, block in MixtureProbe.find(model).layers:
            experts, _, hidden = block.gate_proj.shape
            expert_flops = 2 * sum(w.numel() for w in (block.gate_proj, block.up_proj, block.down_proj))
            if size > 1:
                change += expert_flops / size - expert_flops + 2 * 2 * experts * hidden
            else:
                change -= 2 * block.controller.weight.numel()
        return flops["total"] + change
