"""Routing statistics over whole blocks of the evaluation text (each token seen exactly once)."""

from __future__ import annotations

from typing import Any

import torch

from sparsify.eval.probes import probes_for
from sparsify.eval.text import EvalText


def measure_routing(model, text: EvalText, *, block: int, batch_size: int, max_tokens: int) -> dict[str, Any] | None:
    """What every probe that applies saw on up to `max_tokens` tokens; None for a dense model."""
    probes = probes_for(model)
    if not probes:
        return None
    device = next(model.parameters()).device
    usable = min(len(text.ids), max_tokens) // block * block
    blocks = text.ids[:usable].reshape(-1, block) if usable else text.ids[None, : min(len(text.ids), max_tokens)]
    for probe in probes:
        probe.attach()
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                model(input_ids=blocks[start:start + batch_size].to(device))
    finally:
        for probe in probes:
            probe.detach()
    return {probe.kind: probe.summary() for probe in probes}
