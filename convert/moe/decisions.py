"""Routers in training: fp32 router math, the dense path that turns the student back into its
teacher, and the auxiliary losses (Switch load balancing, ST-MoE z-loss).

Each native router's forward is replaced by one that does the router math in fp32 even when the
model runs in bf16 (selective precision, as in Switch/ST-MoE): a bf16 router loses the small logit
differences that decide top-k. Its outputs have the same meaning as the native ones, (logits,
weights of the chosen experts, their indices), so the native experts (any implementation) run
unchanged.

On the dense path every router instead picks copy 0's G experts with weight 1/G each. Those
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

from sparsify.convert.moe.describe import MoeLayout
from sparsify.convert.moe.options import MoeTrainOptions
from sparsify.errors import SparsifyError
from sparsify.train.decisions import Decisions

# Expert weights in transformers 5 are fused 3D parameters, which peft adapts through
# `target_parameters` (one low-rank pair per expert).
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss, averaged over layers: E * sum_e f_e * P_e, where f_e is the
    fraction of top-k assignments that go to expert e and P_e its mean router probability.
    It is 1 for perfectly uniform routing and grows with imbalance."""
    losses = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        fraction = F.one_hot(chosen, experts).float().sum(dim=(0, 1)) / chosen.numel()
        losses.append(experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits; keeps them small and stable."""
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits]).mean()


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
def dense_path(routers: list[nn.Module], layout: MoeLayout | dict[str, Any]) -> Iterator[None]:
    """Route every token through copy 0's experts with weight 1/G: the dense FFN, exactly."""
    if isinstance(layout, dict):
        layout = MoeLayout.from_record(layout)
    path = layout.dense_path
    if not path:
        raise SparsifyError("this model's sparsify.json has no dense path; pass --teacher MODEL")
    experts = torch.tensor(path.experts, dtype=torch.long)[None, :]
    for router in routers:
        router.sparsify_dense_path = (experts, float(path.weight))
    try:
        yield
    finally:
        for router in routers:
            router.sparsify_dense_path = None


class Routers(Decisions):
    """An MoE's routers: trained in full, with the balance and z auxiliary losses."""

    def __init__(self, routers: list[nn.Module], options: MoeTrainOptions):
        super().__init__(routers)
        self.options = options
        self.top_k = int(routers[0].top_k)

    def expert_lora_targets(self) -> tuple[list[str], list[str]]:
        return [], list(EXPERT_PARAMETERS)

    def teacher_path(self, layout: MoeLayout):
        return dense_path(self.modules, layout)

    def forward_kwargs(self) -> dict[str, Any]:
        return {"output_router_logits": True}

    def loss(self, output: Any, seen: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {"balance": load_balancing_loss(output.router_logits, self.top_k), "z": router_z_loss(output.router_logits)}
        return self.options.balance_weight * parts["balance"] + self.options.z_weight * parts["z"], parts

    def restore_dtype(self, dtype: torch.dtype) -> None:
        for router in self.modules:
            router.weight.data = router.weight.data.to(dtype)


def find_decisions(model: nn.Module, options: dict[str, Any]) -> Routers | None:
    routers = prepare_routers(model)
    return Routers(routers, options.get(MoeTrainOptions.section) or MoeTrainOptions()) if routers else None
