"""Freezing gates that barely decide.

Evaluating a gate is not free: at batch-1 decode under the CUDA-graph engine each gated sublayer
adds a conditional node, a few microseconds, comparable to the work a small model's sublayer does.
A gate that keeps (nearly) every token pays that cost for nothing, and one that skips (nearly)
every token could drop its sublayer outright. Freezing measures each gate's skip rate on
calibration text at the current threshold and fixes the gates outside [open_below, closed_above]:
below, the sublayer always runs (no gate evaluated); above, it never runs. The rest keep deciding
per token. Frozen decisions live in the config (`frozen_gates`), so saved models keep them and
every engine honours them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsify.errors import SparsifyError


@dataclass(frozen=True)
class FreezeRule:
    open_below: float = 0.0  # a gate that skips less than this share of tokens always runs its sublayer
    closed_above: float = 1.0  # one that skips more than this share never runs it

    def __post_init__(self) -> None:
        if not 0.0 <= self.open_below <= self.closed_above <= 1.0:
            raise SparsifyError(f"freezing needs 0 <= open-below ({self.open_below}) <= closed-above ({self.closed_above}) <= 1")

    @classmethod
    def from_options(cls, open_below: float | None, closed_above: float | None) -> FreezeRule | None:
        """The rule two optional command-line bounds ask for; None when neither is given."""
        if open_below is None and closed_above is None:
            return None
        return cls(open_below or 0.0, 1.0 if closed_above is None else closed_above)

    def decide(self, skip_rate: float) -> bool | None:
        """True: always run, False: always skip, None: keep deciding per token."""
        if skip_rate < self.open_below:
            return True
        if skip_rate > self.closed_above:
            return False
        return None


def freeze_gates(model: Any, sublayer_rates: list[dict[str, Any]], rule: FreezeRule) -> dict[str, bool]:
    """Fix the gates `rule` picks, from per-gate skip rates (the skip probe's "sublayers" rows,
    measured with no gate frozen); returns the frozen decisions."""
    decisions = {}
    for row in sublayer_rates:
        decision = rule.decide(row["skip_rate"])
        if decision is not None:
            decisions[f"{row['layer']}.{row['sublayer']}"] = decision
    model.freeze_gates(decisions)
    return decisions
