"""Probes: hooks that watch a model's sparse decisions without changing them.

Each variant brings its own probe class (the `Probe` hook of its implementation module). A probe
says whether it applies to a model, attaches forward hooks that only read the decision modules'
outputs, and summarises what it saw under its `kind` in the report's "routing" section. How that
summary is shown (table rows, markdown, plots) is the variant's description module's business,
so reports can be rendered without torch. `sparsify eval` runs every probe that applies.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsify.convert import hooks


class Probe:
    """Base of the variants' probes: hook bookkeeping; subclasses define find, _record and summary."""

    kind = ""  # the key of its summary under the report's "routing"
    flops_key = ""  # the key of `flops_at_activity` under the report's flops_per_token

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self._handles: list[Any] = []

    @classmethod
    def find(cls, model: nn.Module) -> Probe | None:
        raise NotImplementedError

    def reset(self) -> None:
        """Clear the counts before watching."""

    def attach(self) -> None:
        self.reset()
        self._handles = [module.register_forward_hook(self._hook(i)) for i, module in enumerate(self.modules)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def record(module, inputs, output) -> None:
            self._record(index, output)

        return record

    def _record(self, index: int, output: Any) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def flops_at_activity(model: nn.Module, flops: dict[str, float], summary: dict[str, Any]) -> float | None:
        """Forward FLOPs per token at the measured activity (e.g. skip rates), or None when they
        equal the static count."""
        return None


def probes_for(model: nn.Module) -> list[Probe]:
    return [probe for kind in hooks("Probe") if (probe := kind.find(model)) is not None]


def probe_kinds() -> dict[str, type]:
    return {kind.kind: kind for kind in hooks("Probe")}
