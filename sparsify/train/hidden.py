"""The hidden-state loss: each layer's FFN output in the student against the teacher's.

KL at the logits tells every layer the same thing, late and diluted; matching each FFN's output
(the MoE block, the pruned MLP, the dense MLP) gives each layer its own signal at once, which is
what the converted FFNs need to repair first. The loss per layer is the mean squared difference
divided by the teacher's mean square there, so layers whose outputs are large (often the first and
the last) do not drown the rest; the layers are then averaged.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from sparsify.errors import SparsifyError

# A decoder layer's FFN in every transformers causal LM sparsify writes or reads: `...layers.<i>.mlp`.
_FFN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


def ffn_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> that layer's FFN module (wrappers such as peft or DDP are looked through)."""
    found = {}
    for name, module in model.named_modules():
        match = _FFN_NAME.search(name)
        if match:
            found[int(match.group(1))] = module
    return found


def check_matching(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse, before training, a pair whose FFN outputs cannot be compared layer by layer."""
    mine, theirs = ffn_modules(student), ffn_modules(teacher)
    if not mine:
        raise SparsifyError("--hidden-weight needs decoder layers with an `mlp` block (layers.N.mlp); this model has none")
    if set(mine) != set(theirs):
        raise SparsifyError(
            f"--hidden-weight compares FFN outputs layer by layer, but the student has {len(mine)} FFN layers and the teacher "
            f"{len(theirs)}; use --hidden-weight 0 with this teacher"
        )


@contextmanager
def capture_ffn_outputs(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every FFN output of `model`'s forward passes, by layer index (a layer that
    did not run, e.g. a skipped one, is absent)."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for index, module in ffn_modules(model).items():

        def keep(module, args, output, index=index):
            outputs[index] = output[0] if isinstance(output, tuple) else output

        handles.append(module.register_forward_hook(keep))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def hidden_state_loss(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]) -> torch.Tensor:
    """Mean over the layers both ran of mean((s - t)^2) / mean(t^2), in fp32."""
    layers = sorted(set(student) & set(teacher))
    if not layers:
        raise SparsifyError("--hidden-weight: no layer ran its FFN in both the student and the teacher")
    per_layer = []
    for index in layers:
        target = teacher[index].detach().float()
        difference = student[index].float() - target
        per_layer.append(difference.pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))
    return torch.stack(per_layer).mean()
