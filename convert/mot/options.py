"""Options of `--to mot` and of training its controllers (torch-free, like every variant's options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sparsify.convert.calibration.options import CalibrationTextOptions
from sparsify.errors import SparsifyError
from sparsify.option_values import check_layers_form, check_rules, require

CONTROLLER_INITS = ("weights", "data")
SPLITS = ("contiguous", "coactivation")


@dataclass
class MoTOptions(CalibrationTextOptions):
    experts: int = field(default=32, metadata={"help": "E: experts per MoT layer, each a slice of the FFN's neurons (of its copies)."})
    group_size: int = field(
        default=8,
        metadata={"help": "G: tokens mixed per group (G sequences of the batch at one position). Only G=1 reproduces the "
                          "dense model; training grows G from 1 (--grow-group-size)."},
    )
    copies: int = field(
        default=1,
        metadata={"help": "Copies of the FFN the experts are sliced from, down projections scaled by 1/copies: "
                          "1 = the FFN's parameters at 1/G of its FLOPs; G = the paper's regime (dense FLOPs, G x the parameters)."},
    )
    layers: str = field(default="later-half", metadata={"help": "Which FFNs become MoT: later-half (the paper's choice), all, or indices like 12-29."})
    mix_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the mixture over a group's tokens (1.0 in every paper config)."})
    controller_init: str | None = field(
        default=None,
        metadata={"help": "How the controller (d x E) starts: weights = each expert's mean gate-projection row; data = fitted "
                          "on --calibration-data so that, per expert, the token whose output the expert adds most to gets "
                          "the largest logit (what a mixture at low temperature should pick). Default: data with "
                          "--calibration-data, else weights."},
    )
    split: str | None = field(
        default=None,
        metadata={"help": "Which neurons form an expert: contiguous slices, or coactivation (neurons that matter for the same "
                          "calibration tokens go together; needs --calibration-data). Default: coactivation with "
                          "--calibration-data, else contiguous."},
    )

    @property
    def chosen_controller_init(self) -> str:
        return self.controller_init or ("data" if self.calibrated else "weights")

    @property
    def chosen_split(self) -> str:
        return self.split or ("coactivation" if self.calibrated else "contiguous")

    def validate(self) -> None:
        check_rules(self, (
            ("experts", lambda v: v >= 1, "must be at least 1"),
            ("group_size", lambda v: v >= 1, "must be at least 1"),
            ("copies", lambda v: v >= 1, "must be at least 1"),
            ("mix_temperature", lambda v: v > 0, "must be above 0"),
        ))
        require(self.experts % self.copies == 0, f"--experts {self.experts} must be a multiple of --copies {self.copies} (each copy is sliced alike)")
        require(self.controller_init is None or self.controller_init in CONTROLLER_INITS,
                f"--controller-init must be one of {', '.join(CONTROLLER_INITS)}, got '{self.controller_init}'")
        require(self.split is None or self.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        needs_data = [flag for flag, value in (("--controller-init data", self.chosen_controller_init == "data"),
                                               ("--split coactivation", self.chosen_split == "coactivation")) if value]
        require(self.calibrated or not needs_data,
                f"{' and '.join(needs_data)} measure{'s' if len(needs_data) == 1 else ''} the dense model on text: pass --calibration-data FILES (e.g. some of your training text)")
        self.validate_calibration()
        check_layers_form(self.layers)  # the model's layer count is checked at conversion


@dataclass
class MoTTrainOptions:
    """Training of MoT models (recipe section `train.mot`)."""

    section: ClassVar[str] = "mot"
    grow_group_size: str = field(
        default="",
        metadata={"help": "MoT models: grow the group size during training, START:END (e.g. 1:8): doubling at equal "
                          "intervals over the first --grow-fraction of the steps (G = 1, the dense model itself, gets no "
                          "steps); empty: the model's group size throughout."},
    )
    grow_fraction: float = field(default=0.5, metadata={"help": "MoT models: share of the steps over which --grow-group-size reaches END."})

    def validate(self) -> None:
        check_rules(self, (("grow_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]"),))
        if self.grow_group_size:
            parse_growth(self.grow_group_size)


def parse_growth(text: str) -> tuple[int, int]:
    """--grow-group-size START:END, both powers of two (the group size doubles), START <= END."""
    start, _, end = text.partition(":")
    try:
        low, high = int(start), int(end)
    except ValueError:
        raise SparsifyError(f"--grow-group-size takes START:END like 1:8, got '{text}'") from None
    powers = all(v >= 1 and v & (v - 1) == 0 for v in (low, high))
    require(powers and low <= high, f"--grow-group-size {text}: START and END must be powers of two with START <= END")
    return low, high


# The routers' peak learning rate of transition training. They start as the controllers' directions at
# small logits (transition.py), where the MoE variants' rate (5e-3 to 1e-2, tuned for routers trained from
# scratch) scrambles them within the warm-up: on SmolLM2-135M (later half, E16 G2, 1M tokens, H100) the
# KL to the teacher rose from 0.32 to 0.53 by step 5 and the tune-split perplexity ended at 15.5, worse than
# the untrained switch (14.4); 5e-4, 1e-4 and 2e-5 ended at 14.1, 13.5 and 13.5 (chosen on tune; valid and
# git's documentation unread). bench/results/mot_later_half_10m_smollm2_h100/tau0.03.
TRANSITION_ROUTER_LR = 1e-4

# `sparsify transition` trains briefly (the paper: ~10% of the MoT's steps) unless told otherwise.
TRANSITION_TRAINING_DEFAULTS = {"tokens": "1M", "router_lr": TRANSITION_ROUTER_LR}


@dataclass
class TransitionOptions:
    """`sparsify transition`: a trained MoT folder into a native sparse MoE (Token Choice), then trained briefly."""

    top_k: int | None = field(
        default=None,
        metadata={"help": "Experts each token is routed to; default experts / group size (the MoT's FFN compute per token)."},
    )
    teacher: str = field(
        default="",
        metadata={"help": "The model the transition training learns from (default: the dense model the MoT was converted from)."},
    )

    def untrained(self, training) -> None:
        """With --tokens 0 the native MoE is written as converted: nothing of the training options applies."""

    def validate(self) -> None:
        require(self.top_k is None or self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
