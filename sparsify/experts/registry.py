"""Which experts implementation runs a model, registered with transformers' experts interface.

transformers dispatches `experts(hidden, top_k_index, top_k_weights)` through
`config._experts_implementation` (a runtime setting, never written to config.json), so choosing
one changes speed, not the checkpoint. sparsify registers its own (`sparsify`, in
`sparsify.experts.grouped`) and, when the package is installed, Liger kernel's fused MoE
(`liger`), one of the candidates measured by bench/moe_speed.py.

Policy (`preferred_implementation`): Hopper GPUs (SM90) run `sparsify`, the fastest measured
there; every other device keeps what transformers chose (its `grouped_mm` on CPU and other GPUs),
which is how sparsify ran before this was measured. `SPARSIFY_EXPERTS=<name>` overrides the choice
(any registered name, or `keep`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMPLEMENTATION = "sparsify"
OVERRIDE_VARIABLE = "SPARSIFY_EXPERTS"


@dataclass(frozen=True)
class Candidate:
    name: str
    module: str  # must import for the candidate to run
    forward: Callable


def _liger_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Liger kernel's fused MoE (Triton) on transformers' layout: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    return LigerFusedMoEFunction.apply(hidden_states, experts.gate_up_proj, experts.down_proj, top_k_index.to(torch.int32),
                                       top_k_weights.to(hidden_states.dtype))


def _sparsify_forward(experts, hidden_states, top_k_index, top_k_weights):
    from sparsify.experts.grouped import sparsify_experts_forward

    return sparsify_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


CANDIDATES = (
    Candidate(IMPLEMENTATION, "sparsify.experts.grouped", _sparsify_forward),
    Candidate("liger", "liger_kernel.ops.fused_moe", _liger_forward),
)


def register() -> dict[str, str]:
    """Register every candidate whose package imports; returns name -> why it is not available."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    missing = {}
    for candidate in CANDIDATES:
        try:
            importlib.import_module(candidate.module)
        except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
            missing[candidate.name] = f"{type(error).__name__}: {error}"
            continue
        ALL_EXPERTS_FUNCTIONS.register(candidate.name, candidate.forward)
    return missing


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's routed experts: one 3-D gate_up_proj (and down_proj) whose first dimension is the expert."""
    return hasattr(module, "gate_up_proj") and getattr(module, "gate_up_proj").dim() == 3


def has_routed_experts(model: nn.Module) -> bool:
    return any(is_fused_experts(m) for m in model.modules())


def preferred_implementation(device: torch.device) -> str | None:
    """The implementation to run on `device`, or None to keep transformers' choice."""
    override = os.environ.get(OVERRIDE_VARIABLE)
    if override:
        return None if override == "keep" else override
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return IMPLEMENTATION
    return None


def use_fast_experts(model: nn.Module) -> str | None:
    """Switch an MoE model to the preferred implementation for the device it is on; returns the
    implementation it runs (None for a model without fused experts)."""
    if not has_routed_experts(model):
        return None
    choice = preferred_implementation(next(model.parameters()).device)
    if choice is not None:
        register()
        model.set_experts_implementation(choice)
    return model.config._experts_implementation


def execution_path(model: nn.Module) -> str | None:
    """The experts implementation the model runs now (None: no routed experts)."""
    return model.config._experts_implementation if has_routed_experts(model) else None
