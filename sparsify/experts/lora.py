"""LoRA on fused expert weights as separate low-rank GEMMs, in peft's own adapter layout.

peft adapts a 3D expert parameter (`target_parameters`) by folding W + s * B A into a copy of the
whole expert stack at every forward; the backward then carries a gradient the size of the stack
(../shared/notes/kernels.md: ~1.5x the GEMM work of a dense LoRA step). Here the base weight stays
frozen and untouched, and each expert's update runs as two thin grouped GEMMs on its own rows:

    Y_e = X_e W_e^T + s (X_e A_e^T) B_e^T

peft's layout, which this reads and never changes (so saved adapters and `merge_and_unload`
round-trip): for a parameter of E experts, rank r,
    lora_A.weight  (E*r, in)   expert index slowest:  A_e = A.view(E, r, in)[e]
    lora_B.weight  (out, E*r)  expert index FASTEST:  B_e = B.view(out, r, E)[:, :, e]
and delta_e = s * B_e A_e in transformers' (E, out, in) orientation.

How it is wired: `factor_expert_adapters` gives each peft `ParamWrapper` on an expert parameter a
forward that, instead of parametrising the weight, leaves its factors on the experts module for
the duration of the call; sparsify's experts implementation (`sparsify.experts.grouped`) picks
them up. With any other implementation active, or several adapters, merged or disabled adapters,
peft's own forward runs unchanged.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

PENDING = "_sparsify_expert_lora"  # attribute on the experts module: parameter name -> (wrapper, adapter)


@dataclass(frozen=True)
class LowRankUpdate:
    """One expert parameter's update: a (E, r, in), b (E, out, r), in the compute dtype."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def grouped(self, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (S, in) -> (S, out): s (x A_e^T) B_e^T per row's expert."""
        from sparsify.experts.grouped import grouped_mm

        low = grouped_mm(rows, self.a.transpose(1, 2), ends)
        return self.scaling * grouped_mm(low, self.b.transpose(1, 2), ends)

    def all_experts(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) through every expert's update -> (T, E, out)."""
        count, rank, width = self.a.shape
        low = (x @ self.a.reshape(count * rank, width).t()).view(-1, count, rank)
        return self.scaling * torch.einsum("ter,eor->teo", low, self.b)

    def all_experts_summed(self, h: torch.Tensor) -> torch.Tensor:
        """h (T, E, in), expert e's input in slot e -> sum_e s (h_e A_e^T) B_e^T, (T, out)."""
        count, rank, _ = self.a.shape
        low = torch.einsum("tei,eri->ter", h, self.a).reshape(h.shape[0], count * rank)
        return self.scaling * (low @ self.b.permute(1, 0, 2).reshape(self.b.shape[1], count * rank).t())


@dataclass(frozen=True)
class ExpertLora:
    gate_up: LowRankUpdate | None
    down: LowRankUpdate | None


def _update(wrapper: nn.Module, adapter: str, dtype: torch.dtype) -> LowRankUpdate:
    count = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight  # (E*r, in)
    b = wrapper.lora_B[adapter].weight  # (out, E*r)
    rank = a.shape[0] // count
    return LowRankUpdate(a=a.view(count, rank, a.shape[1]).to(dtype),
                         b=b.view(b.shape[0], rank, count).permute(2, 0, 1).to(dtype).contiguous(),
                         scaling=float(wrapper.scaling[adapter]))


def active_expert_lora(experts: nn.Module, dtype: torch.dtype) -> ExpertLora | None:
    """The adapters a factored peft wrapper left on `experts` for this call, or None."""
    pending = experts.__dict__.get(PENDING)
    if not pending:
        return None
    parts = {name: _update(wrapper, adapter, dtype) for name, (wrapper, adapter) in pending.items()}
    return ExpertLora(gate_up=parts.get("gate_up_proj"), down=parts.get("down_proj"))


def _factored_forward(self, x: torch.Tensor, *args, **kwargs):
    from sparsify.experts.registry import IMPLEMENTATION

    experts = self.get_base_layer()
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if self.disable_adapters or self.merged or len(adapters) != 1 or implementation != IMPLEMENTATION or kwargs.get("adapter_names"):
        return type(self).forward(self, x, *args, **kwargs)
    pending = experts.__dict__.setdefault(PENDING, {})
    pending[self.parameter_name] = (self, adapters[0])
    try:
        return self.base_layer(x, *args, **kwargs)
    finally:
        pending.pop(self.parameter_name, None)


def factor_expert_adapters(model: nn.Module) -> int:
    """Route peft's adapters on fused expert parameters through the factored path; returns how
    many wrappers now do."""
    from peft.tuners.lora.layer import ParamWrapper

    from sparsify.experts.grouped import supports

    factored = 0
    for module in model.modules():
        if (isinstance(module, ParamWrapper) and module.parameter_name in ("gate_up_proj", "down_proj")
                and getattr(module, "num_experts", 1) > 1 and supports(module.get_base_layer())):
            module.forward = types.MethodType(_factored_forward, module)
            factored += 1
    return factored
