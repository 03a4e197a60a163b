"""How much each routed expert is used, measured on calibration text: per layer, the fraction of tokens
that choose each expert (`frequency`, what --init merge and top1 weigh copies by) and its mean routing
weight over all tokens, 0 where not chosen (`mean_weight`, E[w_e(x)], what --init concat folds into the
down projections), and the mean of a gated shared expert's gate.

Read-only: forward hooks on the routers, whose logits go through the one router math of every target
(convert/moe/routing.py), so the figures are what the model computes, whatever the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.convert.moe.decisions import find_routers
from sparsify.convert.moe.routing import expert_load, route, selection_bias, settings_of

SEQUENCES_PER_FORWARD = 8


@dataclass
class LayerUsage:
    frequency: torch.Tensor  # (experts,), tokens choosing the expert / tokens
    mean_weight: torch.Tensor  # (experts,), sum of its routing weights / tokens
    shared_gate: float | None = None  # mean sigmoid gate of the shared expert (Qwen2-MoE), None without a gate

    def to_record(self) -> dict:
        record = {"frequency": [round(v, 6) for v in self.frequency.tolist()],
                  "mean_weight": [round(v, 6) for v in self.mean_weight.tolist()]}
        return record if self.shared_gate is None else {**record, "shared_gate": round(self.shared_gate, 6)}


def routed_blocks(model: nn.Module) -> list[nn.Module]:
    """The routed block of every MoE layer, in layer order (the module holding `gate` and `experts`)."""
    routers = {id(r) for r in find_routers(model)}
    return [m for m in model.modules() if id(getattr(m, "gate", None)) in routers]


@torch.no_grad()
def measure_usage(model: nn.Module, sequences: torch.Tensor, on_progress=lambda done, total: None) -> list[LayerUsage]:
    """Per routed layer: the experts' frequency and mean weight on `sequences` (sequences, length)."""
    blocks = routed_blocks(model)
    device = next(model.parameters()).device
    counts = [torch.zeros(b.gate.weight.shape[0], dtype=torch.float64, device=device) for b in blocks]
    weights = [torch.zeros_like(c) for c in counts]
    gates = [torch.zeros((), dtype=torch.float64, device=device) for _ in blocks]
    tokens = 0

    def on_router(index: int):
        def hook(router, inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            bias = selection_bias(router)
            chosen_weight, chosen = route(logits.reshape(-1, logits.shape[-1]).float(), settings_of(router), None if bias is None else bias.float())
            counts[index] += expert_load(chosen, counts[index].shape[0])
            weights[index].index_add_(0, chosen.reshape(-1), chosen_weight.reshape(-1).double())
        return hook

    def on_shared_gate(index: int):
        def hook(gate, inputs, output):
            gates[index] += torch.sigmoid(output.float()).sum().double()
        return hook

    handles = [block.gate.register_forward_hook(on_router(i)) for i, block in enumerate(blocks)]
    handles += [block.shared_expert_gate.register_forward_hook(on_shared_gate(i)) for i, block in enumerate(blocks)
                if isinstance(getattr(block, "shared_expert_gate", None), nn.Module)]
    try:
        model.eval()
        for start in range(0, len(sequences), SEQUENCES_PER_FORWARD):
            batch = sequences[start:start + SEQUENCES_PER_FORWARD].to(device)
            model(input_ids=batch)
            tokens += batch.numel()
            on_progress(min(start + SEQUENCES_PER_FORWARD, len(sequences)), len(sequences))
    finally:
        for handle in handles:
            handle.remove()
    has_gate = [isinstance(getattr(block, "shared_expert_gate", None), nn.Module) for block in blocks]
    return [LayerUsage((counts[i] / tokens).float().cpu(), (weights[i] / tokens).float().cpu(),
                       float(gates[i] / tokens) if has_gate[i] else None) for i in range(len(blocks))]


__all__ = ["LayerUsage", "measure_usage", "routed_blocks"]
