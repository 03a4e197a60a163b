"""Routers in training: fp32 router math, the dense path that turns the student back into its
teacher, the auxiliary losses (Switch load balancing, ST-MoE z-loss) and, for routers with a
selection bias, loss-free balancing.

Each native router's forward is replaced by one that does the router math (routing.py, softmax or
sigmoid as the target does) in fp32 even when the model runs in bf16 (selective precision, as in
Switch/ST-MoE): a bf16 router loses the small logit differences that decide top-k. Its outputs have
the same meaning as the native ones, (logits, weights of the chosen experts, their indices), so the
native experts (any implementation) run unchanged. While training it also keeps what the losses need
(each call's logits and choices) and counts each expert's load for the selection bias, which moves
after every optimizer step towards equal load (Wang et al. 2024, as in DeepSeek-V3): balance without
a gradient that competes with the distillation loss.

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
from sparsify.convert.moe.routing import balance_bias_step, distribution, expert_load, route, selection_bias, settings_of
from sparsify.errors import SparsifyError
from sparsify.experts.registry import is_fused_experts
from sparsify.train.decisions import Decisions

# Expert weights in transformers 5 are fused 3D parameters, which peft adapts through
# `target_parameters` (one low-rank pair per expert).
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def load_balancing_loss(routed: list[tuple[torch.Tensor, torch.Tensor]], kind: str = "softmax") -> torch.Tensor:
    """Switch Transformer auxiliary loss, averaged over router calls: E * sum_e f_e * P_e, where f_e is
    the fraction of top-k assignments that went to expert e and P_e its mean router probability (for
    sigmoid routers the normalised scores, as DeepSeek-V3's). It is 1 for perfectly uniform routing and
    grows with imbalance. `routed` holds (logits, chosen indices) per call."""
    losses = []
    for logits, chosen in routed:
        probs = distribution(logits, kind)
        experts = probs.shape[-1]
        fraction = expert_load(chosen, experts).float() / chosen.numel()
        losses.append(experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(routed: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits; keeps them small and stable."""
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits, _ in routed]).mean()


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The router (`gate`) of every routed block (MixtralSparseMoeBlock, Glm4MoeMoE, ...): a block
    with a `gate` that holds a 2-D weight beside fused `experts`; empty for a dense model."""
    return [m.gate for m in model.modules()
            if isinstance(getattr(m, "gate", None), nn.Module) and getattr(m.gate, "weight", torch.empty(0)).dim() == 2
            and isinstance(getattr(m, "experts", None), nn.Module) and is_fused_experts(m.experts)]


def _forward(self: nn.Module, hidden_states: torch.Tensor):
    hidden_states = hidden_states.reshape(-1, self.weight.shape[-1])
    # Autocast would turn this matmul back into bf16, so it is switched off for the router alone.
    with torch.autocast(hidden_states.device.type, enabled=False):
        logits = F.linear(hidden_states.float(), self.weight.float())
    if self.sparsify_dense_path is not None:
        experts, weight = self.sparsify_dense_path
        index = experts.to(logits.device).expand(logits.shape[0], -1)
        return logits, torch.full(index.shape, weight, device=logits.device), index
    bias = selection_bias(self)
    weights, index = route(logits, self.sparsify_settings, None if bias is None else bias.float())
    if self.training and torch.is_grad_enabled():  # training steps only: not held-out evaluation, not the teacher
        if self.sparsify_seen is not None:
            self.sparsify_seen.append((logits, index))
        if bias is not None:
            if self.sparsify_load.device != bias.device:  # the model moved to its training device after prepare_routers
                self.sparsify_load = self.sparsify_load.to(bias.device)
            self.sparsify_load += expert_load(index.detach(), logits.shape[-1])
    return logits, weights, index


def prepare_routers(model: nn.Module) -> list[nn.Module]:
    routers = find_routers(model)
    for router in routers:
        router.sparsify_dense_path = None
        router.sparsify_seen = None
        router.sparsify_settings = settings_of(router)
        router.sparsify_dtype = router.weight.dtype  # as loaded: bf16, or fp32 where the target keeps routers in fp32
        bias = selection_bias(router)
        router.sparsify_load = None if bias is None else torch.zeros(bias.shape, dtype=torch.long, device=bias.device)
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
    """An MoE's routers: trained in full, with the balance and z auxiliary losses, and their selection
    biases (if the target has them) moved towards equal load after every step."""

    def __init__(self, routers: list[nn.Module], options: MoeTrainOptions):
        super().__init__(routers)
        self.options = options
        self.kind = routers[0].sparsify_settings.kind
        self.biased = [router for router in routers if selection_bias(router) is not None]

    def expert_lora_targets(self) -> tuple[list[str], list[str]]:
        return [], list(EXPERT_PARAMETERS)

    def teacher_path(self, layout: MoeLayout):
        return dense_path(self.modules, layout)

    @contextmanager
    def watch(self) -> Iterator[list[Any]]:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        for router in self.modules:
            router.sparsify_seen = seen
        try:
            yield seen
        finally:
            for router in self.modules:
                router.sparsify_seen = None

    def loss(self, output: Any, seen: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not seen:  # a forward pass that routed nothing through the training path (e.g. every token on the dense path)
            return super().loss(output, seen)
        parts = {"balance": load_balancing_loss(seen, self.kind), "z": router_z_loss(seen)}
        return self.options.balance_weight * parts["balance"] + self.options.z_weight * parts["z"], parts

    def after_step(self, step: int) -> dict[str, float]:
        """Move every selection bias by --bias-rate towards equal load, from the loads counted in this step."""
        if not self.biased:
            return {}
        loads = torch.stack([router.sparsify_load for router in self.biased])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads)  # every process sees other tokens; the biases must stay identical
        if not loads.any():
            return {}
        with torch.no_grad():
            for router, load in zip(self.biased, loads):
                if self.options.bias_rate > 0:
                    balance_bias_step(router.e_score_correction_bias, load, self.options.bias_rate)
                router.sparsify_load.zero_()
        imbalance = (loads.max(dim=1).values.float() / loads.float().mean(dim=1).clamp_min(1e-9)).mean()
        bias = torch.stack([router.e_score_correction_bias.abs().mean() for router in self.biased]).mean()
        return {"load_max_over_mean": float(imbalance), "selection_bias_abs": float(bias)}

    def updated_buffers(self) -> list[tuple[nn.Module, str]]:
        return [(router, "e_score_correction_bias") for router in self.biased]

    def restore_dtype(self, dtype: torch.dtype) -> None:
        """Back to the dtype each router was loaded in (fp32 where the target keeps routers in fp32)."""
        for router in self.modules:
            router.weight.data = router.weight.data.to(router.sparsify_dtype)


def find_decisions(model: nn.Module, options: dict[str, Any]) -> Routers | None:
    routers = prepare_routers(model)
    return Routers(routers, options.get(MoeTrainOptions.section) or MoeTrainOptions()) if routers else None
