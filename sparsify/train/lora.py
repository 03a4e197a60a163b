"""LoRA adapters (peft) on attention and FFN/expert weights; the variant's decisions trained in full.

Attention projections are ordinary linear layers (`target_modules`); what "experts" means is the
decisions' to say (an MoE's fused 3D expert parameters through `target_parameters`, a dense or
skip model's FFN projections). Adapters on fused experts keep peft's layout but run as separate
low-rank GEMMs when sparsify's experts implementation is active (sparsify/experts/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsify.errors import SparsifyError
from sparsify.train.decisions import Decisions
from sparsify.train.options import LORA_TARGETS

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = LORA_TARGETS


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    full_experts: bool = False  # the expert weights themselves train (then "experts" is no LoRA target)


def add_adapters(model: nn.Module, settings: LoraSettings, decisions: Decisions) -> nn.Module:
    """Wrap `model` with peft LoRA; afterwards only adapters, the decisions and (with `full_experts`)
    the expert weights require grad, all in fp32."""
    from peft import LoraConfig, get_peft_model

    unknown = set(settings.targets) - set(TARGETS)
    if unknown:
        raise SparsifyError(f"unknown --lora-targets {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    for param in model.parameters():
        param.requires_grad_(False)
    if settings.targets and settings.rank > 0:
        modules = list(ATTENTION_MODULES) if "attention" in settings.targets else []
        parameters: list[str] = []
        if "experts" in settings.targets and not settings.full_experts:
            expert_modules, parameters = decisions.expert_lora_targets()
            modules += expert_modules
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=0.0,
            target_modules=modules,
            target_parameters=parameters or None,
        )
        model = get_peft_model(model, config)
        if parameters:  # fused expert weights: low-rank GEMMs under sparsify's experts implementation
            from sparsify.experts.lora import factor_expert_adapters

            factor_expert_adapters(model)
    for module in decisions.modules:  # trained in full, with an fp32 master copy (selective precision)
        for param in module.parameters():
            param.data = param.data.float()
            param.requires_grad_(True)
    if settings.full_experts:
        for param in decisions.expert_weights(model):
            param.data = param.data.float()
            param.requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the trained parameters (and the buffers the decisions update, e.g. selection biases) into `model`."""
    params = dict(model.named_parameters())
    tensors = {**dict(model.named_buffers()), **params}
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing or any(n not in tensors for n in state):
        raise SparsifyError("the checkpoint's trainable parameters do not match this model and these --lora-* options")
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights; returns the plain transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
