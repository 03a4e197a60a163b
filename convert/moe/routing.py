"""The router math of the native MoE targets, in one place: the training forward, the refit at
conversion, the balance loss and the eval probe all route through these functions.

softmax (Mixtral, Qwen2-MoE, Qwen3-MoE): p = softmax(logits); the K largest p, renormalised over the K
    when the target does (Mixtral always; the Qwen targets with norm_topk_prob, which we write).
sigmoid (GLM-4.5-MoE, DeepSeek-V3 style): s = sigmoid(logits); the K experts with the largest s + b are
    chosen, where b is a per-expert selection bias that never enters the weights, so moving it moves
    load without changing what a chosen expert contributes (auxiliary-loss-free balancing, Wang et al.
    2024); weights are the chosen s renormalised over the K, times a fixed scale (1 in what we write).

Renormalised weights sum to 1 under either kind, which is all the exact construction of
convert/moe/experts.py needs: a conversion exact with one kind is exact with the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RouterSettings:
    """What a native router module holds beside its weight, read once (see `settings_of`)."""

    kind: str = "softmax"
    top_k: int = 1
    renormalise: bool = True
    scale: float = 1.0
    groups: int = 1  # expert groups (DeepSeek-V3's node-limited routing); 1 in what we write
    top_groups: int = 1


def settings_of(router: nn.Module) -> RouterSettings:
    """The routing of a transformers router module: sigmoid when it has a selection bias."""
    if hasattr(router, "e_score_correction_bias"):
        return RouterSettings("sigmoid", int(router.top_k), bool(getattr(router, "norm_topk_prob", True)),
                              float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
                              int(getattr(router, "num_group", 1) or 1), int(getattr(router, "topk_group", 1) or 1))
    # Mixtral always renormalises; the Qwen targets when configured.
    return RouterSettings("softmax", int(router.top_k), bool(getattr(router, "norm_topk_prob", True)))


def selection_bias(router: nn.Module) -> torch.Tensor | None:
    return getattr(router, "e_score_correction_bias", None)


def scores(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-expert scores the weights are taken from: softmax or sigmoid of the logits."""
    return torch.softmax(logits, dim=-1) if kind == "softmax" else torch.sigmoid(logits)


def distribution(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The scores as a distribution over experts (sum 1 per token), for the balance loss and entropy.
    For sigmoid routers this is DeepSeek-V3's normalised affinity s / sum(s)."""
    s = scores(logits.float(), kind)
    return s if kind == "softmax" else s / s.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def route(logits: torch.Tensor, settings: RouterSettings, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices), each (tokens, top_k), of the experts `settings` chooses for `logits` (fp32)."""
    s = scores(logits, settings.kind)
    choice = s if bias is None else s + bias
    if settings.groups > 1:
        # Keep the top groups by the sum of their two best choice scores, as DeepSeek-V3 does.
        tokens, experts = choice.shape
        grouped = choice.view(tokens, settings.groups, experts // settings.groups)
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1).topk(settings.top_groups, dim=-1).indices
        keep = torch.zeros(tokens, settings.groups, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(experts // settings.groups, dim=1), float("-inf"))
    index = choice.topk(settings.top_k, dim=-1).indices
    weights = s.gather(1, index)
    if settings.renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights * settings.scale, index


def dense_weights(logits: torch.Tensor, settings: RouterSettings) -> torch.Tensor:
    """(tokens, experts): each token's routing weights, 0 for the experts it does not choose (no bias:
    at conversion the bias is zero)."""
    weights, index = route(logits, settings)
    return torch.zeros_like(logits).scatter_(1, index, weights)


def expert_load(index: torch.Tensor, experts: int) -> torch.Tensor:
    """Top-k assignments per expert in `index` (tokens, top_k). A scatter, not bincount: on a GPU
    bincount reads its size back to the host, a synchronisation per router call."""
    flat = index.reshape(-1)
    return torch.zeros(experts, dtype=torch.long, device=index.device).scatter_add_(0, flat, torch.ones_like(flat))


def balance_bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """Loss-free balancing (Wang et al. 2024; DeepSeek-V3): each expert's selection bias moves by
    `rate` towards the mean load, up if it was under-loaded, down if over-loaded. The scale that
    matters is the spread of the scores: a calibrated router's logits have std 0.1
    (clustering.ROUTER_LOGIT_STD), sigmoid scores about 0.025, so at 1e-3 per step the bias can
    override the fitted ranking within a few dozen steps; 1e-4 scored the same within noise (docs/results.md)."""
    load = load.float()
    bias.add_(rate * torch.sign(load.mean() - load))


__all__ = ["RouterSettings", "balance_bias_step", "dense_weights", "distribution", "expert_load", "route", "scores",
           "selection_bias", "settings_of"]

