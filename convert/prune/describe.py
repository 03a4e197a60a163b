"""The `layout` record of a pruned folder (torch-free). A pruned model is dense: it needs no other hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsify.convert.variant import Layout


@dataclass(frozen=True)
class PruneLayout(Layout):
    architecture: str
    dense_d_ff: int
    kept_d_ff: int
    importance: str  # "calibration" (mean |h_n| |down_n| on calibration text) or "weights" (|gate_n| |up_n| |down_n|)
    calibration: dict[str, Any] | None = None

    def rows(self) -> list[tuple[str, str]]:
        rows = [("FFN neurons kept", f"{self.kept_d_ff} of {self.dense_d_ff} ({self.kept_d_ff / self.dense_d_ff:.0%}), every token"),
                ("importance", self.importance)]
        if self.calibration:
            rows.append(("calibration", f"{self.calibration['tokens']:,} tokens of {', '.join(self.calibration['data'])}"
                                        + (", down projections refitted" if self.calibration.get("refit") else "")))
        return rows


LAYOUT = PruneLayout
