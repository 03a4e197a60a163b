"""The trainable decisions of a model, as the training loop sees them.

A variant's decisions (an MoE's routers, a skip model's gates, later MoT's controllers) train in
full with an fp32 master copy at --router-lr, while LoRA adapts the rest. Each variant implements
this class in its own package (`find_decisions` in its implementation module); the loop calls
only these methods, and this base class, with no modules, is a dense model's (a LoRA baseline
against another teacher).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from sparsify.convert import hooks, variant_of_record
from sparsify.errors import SparsifyError
from sparsify.experts.registry import is_fused_experts

# LoRA targets of "experts" in a model without routed experts: its FFN projections.
DENSE_FFN_MODULES = ("gate_proj", "up_proj", "down_proj")


class Decisions:
    """A model's trainable decisions; this base class is a model that has none."""

    def __init__(self, modules: list[nn.Module] = ()):
        self.modules = list(modules)  # trained in full (fp32) at --router-lr

    def expert_lora_targets(self) -> tuple[list[str], list[str]]:
        """(module names, parameter names) peft adapts for `--lora-targets experts`."""
        return list(DENSE_FFN_MODULES), []

    def expert_weights(self, model: nn.Module) -> list[nn.Parameter]:
        """The weights `--train-experts full` trains: fused routed experts (3-D gate_up/down) and every
        FFN projection (a dense model's FFN, an MoE's shared experts)."""
        weights = []
        for name, module in model.named_modules():
            if is_fused_experts(module):
                weights += [module.gate_up_proj, module.down_proj]
            elif name.rsplit(".", 1)[-1] in DENSE_FFN_MODULES and isinstance(module, nn.Linear):
                weights.append(module.weight)
        return weights

    def teacher_path(self, layout: Any) -> ContextManager[None]:
        """A context in which the student (adapters off) computes its dense teacher exactly."""
        raise SparsifyError("this model has no dense path inside its weights; pass --teacher MODEL")

    @contextmanager
    def watch(self) -> Iterator[list[Any]]:
        """Collect what the decision modules did in the forward passes run inside the block."""
        yield []

    def loss(self, output: Any, seen: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted auxiliary loss added to the total, named parts logged per step)."""
        return output.logits.new_zeros((), dtype=torch.float32), {}

    def heldout(self, seen: list[Any]) -> dict[str, torch.Tensor]:
        """Per-block figures of a held-out batch (averaged over blocks), e.g. the skip rate."""
        return {}

    def on_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Called before every optimizer step: schedules (transition tuning, a growing group size);
        returns values to log."""
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        """Called after every optimizer step, before a checkpoint may be written: updates outside the
        optimizer (an MoE's selection biases); returns values to log."""
        return {}

    def updated_buffers(self) -> list[tuple[nn.Module, str]]:
        """Buffers (module, name) the decisions change outside the optimizer, e.g. an MoE's selection
        biases: checkpointed and saved with the trained parameters."""
        return []

    def restore_dtype(self, dtype: torch.dtype) -> None:
        """Before saving a merged model: back from the fp32 training copy where the format wants it."""


def find_decisions(model: nn.Module, record: dict[str, Any] | None, options: dict[str, Any]) -> Decisions:
    """The decisions of `model`: through the variant its sparsify.json names, else the first
    variant that finds any (a native MoE made elsewhere); a model with none gets the base class.
    `options` holds each variant's training group by section name."""
    variant = variant_of_record(record)
    own = variant.hook("find_decisions") if variant is not None else None
    for finder in [own] if own else hooks("find_decisions"):
        found = finder(model, options)
        if found is not None:
            return found
    return Decisions()


__all__ = ["DENSE_FFN_MODULES", "Decisions", "find_decisions"]
