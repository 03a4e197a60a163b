"""LoRA adapters (peft) on attention and expert weights; routers trained in full.

Expert weights in transformers 5 are fused 3D parameters (`experts.gate_up_proj`,
`experts.down_proj`), which peft adapts through `target_parameters` (one low-rank pair per
expert). Attention projections are ordinary linear layers (`target_modules`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.train.options import LORA_TARGETS

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
# In a dense model (a baseline with the same flags) "experts" means its FFN projections.
DENSE_FFN_MODULES = ["gate_proj", "up_proj", "down_proj"]
TARGETS = LORA_TARGETS


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS


def add_adapters(model: nn.Module, settings: LoraSettings, routers: list[nn.Module], gates: list[nn.Module] = ()) -> nn.Module:
    """Wrap `model` with peft LoRA; afterwards only adapters, routers and skip gates require grad (in fp32)."""
    from peft import LoraConfig, get_peft_model

    unknown = set(settings.targets) - set(TARGETS)
    if unknown:
        raise SparsifyError(f"unknown --lora-targets {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    for param in model.parameters():
        param.requires_grad_(False)
    if settings.targets and settings.rank > 0:
        modules = list(ATTENTION_MODULES) if "attention" in settings.targets else []
        parameters = None
        if "experts" in settings.targets:
            if routers:
                parameters = EXPERT_PARAMETERS
            else:
                modules += DENSE_FFN_MODULES
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=0.0,
            target_modules=modules,
            target_parameters=parameters,
        )
        model = get_peft_model(model, config)
    for module in [*routers, *gates]:  # trained in full, with an fp32 master copy (selective precision)
        for param in module.parameters():
            param.data = param.data.float()
            param.requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing or any(n not in params for n in state):
        raise SparsifyError("the checkpoint's trainable parameters do not match this model and these --lora-* options")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights; returns the plain transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
