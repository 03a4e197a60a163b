"""Options of `--to prune` (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sparsify.convert.calibration.options import CalibrationOptions
from sparsify.option_values import require


@dataclass
class PruneOptions(CalibrationOptions):
    tags: ClassVar[tuple[str, ...]] = ("pruned",)
    keep: float = field(default=0.5, metadata={"help": "Fraction of each FFN's neurons kept (the active fraction of a fine-moe it is compared with)."})

    def validate(self) -> None:
        require(0 < self.keep <= 1, f"--keep must be in (0, 1], got {self.keep}")
        self.validate_calibration()
