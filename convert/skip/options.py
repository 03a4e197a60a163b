"""Options of `--to skip` and of training its gates (torch-free, like every variant's options)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from sparsify.option_values import check_rules, require

GATE_CHOICES = {"both": ("attention", "ffn"), "attention": ("attention",), "ffn": ("ffn",)}


@dataclass
class SkipOptions:
    gates: str = field(default="both", metadata={"help": "Which sublayers get a gate: both, attention or ffn."})
    exclude_first: int = field(default=0, metadata={"help": "Leave the first N layers ungated (always run)."})
    exclude_last: int = field(default=0, metadata={"help": "Leave the last N layers ungated (always run)."})
    threshold: float = field(default=0.5, metadata={"help": "Inference threshold: a sublayer runs for a token when its gate's probability exceeds it (adjustable after training)."})
    gate_bias_init: float = field(default=6.0, metadata={"help": "Initial gate bias: sigmoid(6) = 0.998, every gate open, the model exact."})

    def validate(self) -> None:
        require(self.gates in GATE_CHOICES, f"--gates must be one of {', '.join(GATE_CHOICES)}, got '{self.gates}'")
        require(self.exclude_first >= 0 and self.exclude_last >= 0, "--exclude-first and --exclude-last must be 0 or more")
        require(0.0 < self.threshold < 1.0, f"--threshold must be between 0 and 1, got {self.threshold}")
        open_probability = 1 / (1 + math.exp(-self.gate_bias_init))
        require(open_probability > self.threshold,
                 f"--gate-bias-init {self.gate_bias_init} starts the gates closed (sigmoid {open_probability:.3f} <= threshold)")


@dataclass
class SkipTrainOptions:
    """Gate training of skip models: the sparsity loss (recipe section `train.skip`)."""

    section: ClassVar[str] = "skip"
    skip_weight: float = field(default=0.1, metadata={"help": "Skip models: weight of the gate sparsity loss."})
    target_skip: float = field(default=0.0, metadata={"help": "Skip models: skip rate to reach (a hinge on the mean gate opening); 0: an L1 penalty on gate openings instead."})

    def validate(self) -> None:
        check_rules(self, (("skip_weight", lambda v: v >= 0, "must be 0 or more"), ("target_skip", lambda v: 0 <= v < 1, "must be in [0, 1)")))
