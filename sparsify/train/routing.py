"""Routers in fp32, and the dense path that turns the student back into its teacher.

`prepare_routers` replaces each native router's forward with one that does the router math in
fp32 even when the model runs in bf16 (selective precision, as in Switch/ST-MoE): a bf16 router
loses the small logit differences that decide top-k. Its outputs have the same meaning as the
native ones, (logits, weights of the chosen experts, their indices), so the native experts
(any implementation) run unchanged.

In `dense_path(model)` every router instead picks copy 0's G experts with weight 1/G each. Those
experts' down projections were scaled by G at conversion, so the layer computes exactly the dense
FFN: with adapters disabled, the student *is* the teacher, and no second model is loaded.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.errors import SparsifyError


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The `gate` of every sparse MoE block (MixtralSparseMoeBlock, ...); empty for a dense model."""
    return [m.gate for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]


def _forward(self: nn.Module, hidden_states: torch.Tensor):
    hidden_states = hidden_states.reshape(-1, self.weight.shape[-1])
    # Autocast would turn this matmul back into bf16, so it is switched off for the router alone.
    with torch.autocast(hidden_states.device.type, enabled=False):
        logits = F.linear(hidden_states.float(), self.weight.float())
    if self.sparsify_dense_path is not None:
        experts, weight = self.sparsify_dense_path
        index = experts.to(logits.device).expand(logits.shape[0], -1)
        return logits, torch.full(index.shape, weight, device=logits.device), index
    probs = F.softmax(logits, dim=-1)
    top_probs, top_index = probs.topk(self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises; Qwen when configured
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return logits, top_probs, top_index


def prepare_routers(model: nn.Module) -> list[nn.Module]:
    routers = find_routers(model)
    for router in routers:
        router.sparsify_dense_path = None
        router.forward = types.MethodType(_forward, router)
    return routers


@contextmanager
def dense_path(routers: list[nn.Module], layout: dict[str, Any]) -> Iterator[None]:
    """Route every token through copy 0's experts with weight 1/G: the dense FFN, exactly."""
    path = layout.get("dense_path")
    if not path:
        raise SparsifyError("this model's sparsify.json has no dense path; pass --teacher MODEL")
    experts = torch.tensor(path["experts"], dtype=torch.long)[None, :]
    for router in routers:
        router.sparsify_dense_path = (experts, float(path["weight"]))
    try:
        yield
    finally:
        for router in routers:
            router.sparsify_dense_path = None
