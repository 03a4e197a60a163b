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
    watched = text.ids[: min(len(text.ids), max_tokens)]
    whole = len(watched) // block * block
    # Whole blocks in batches, then the remainder as one shorter block: every token asked for (or
    # every token the text has) is seen, so the statistics cover the count the user gave.
    batches = [watched[:whole].reshape(-1, block)[start:start + batch_size] for start in range(0, whole // block, batch_size)]
    if whole < len(watched):
        batches.append(watched[whole:][None])
    for probe in probes:
        probe.attach()
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch.to(device))
    finally:
        for probe in probes:
            probe.detach()
    return {probe.kind: probe.summary() for probe in probes}
