"""The flags of `sparsify distill` beside the training ones (torch-free, like every option class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparsify.errors import SparsifyError
from sparsify.option_values import check_rules, parse_count, parse_list

INITS = ("merge", "concat", "top1", "parent")

# Training flags distill sets itself (from --teacher and --hard-weight), so it does not show them.
DERIVED_TRAINING = ("teacher", "kl_weight", "ce_weight")
# Training defaults that differ for distillation: the student's FFN trains in full (LoRA on attention),
# as the sparse model's experts did; --train-experts lora gives a LoRA-only student.
TRAINING_DEFAULTS: dict[str, Any] = {"train_experts": "full"}


@dataclass
class DistillOptions:
    init: str = field(
        default="merge",
        metadata={"help": "How the dense student starts. merge: each FFN neuron is the routing-frequency-weighted mean of "
                          "its expert copies (an upcycled MoE's copies averaged by use); concat: the experts side by side "
                          "again, each expert's mean routing weight folded into its down projection (the parent exactly, "
                          "for an exact fine-grained conversion); top1: the most-used copy of each neuron (ablation); "
                          "parent: the dense model the sparse one was made from, as it was. Frequencies and weights are "
                          "measured on --calibration-data."},
    )
    teacher: str = field(default="", metadata={"help": "The model the student learns from (default: MODEL, the sparse model; never the student)."})
    parent: str = field(default="", metadata={"help": "The dense parent for --init parent (default: the source recorded in MODEL's sparsify.json)."})
    hard_weight: float = field(
        default=0.5,
        metadata={"help": "Share of the next-token loss on the text (hard labels); the KL to the teacher gets the rest "
                          "(Switch Transformer's mix of hard and soft targets, as one setting: 0 is pure distillation)."},
    )
    calibration_data: str = field(default="", metadata={"help": "Text the expert usage is measured on (default: --data; training's held-out 1% is never read)."})
    calibration_tokens: str = field(default="128k", metadata={"help": "Tokens of --calibration-data to measure the expert usage on."})
    calibration_seq_len: int = field(default=512, metadata={"help": "Tokens per calibration sequence."})

    @property
    def needs_usage(self) -> bool:
        return self.init != "parent"

    @property
    def calibration_sources(self) -> tuple[str, ...]:
        return tuple(parse_list(self.calibration_data))

    @property
    def calibration_token_count(self) -> int:
        return parse_count(self.calibration_tokens)

    def untrained(self, training) -> None:
        """With --tokens 0 (fold only): --data still names the calibration text."""
        if not self.calibration_data:
            self.calibration_data = training.data.data

    def validate(self) -> None:
        if self.init not in INITS:
            raise SparsifyError(f"--init must be one of {', '.join(INITS)}, not '{self.init}'")
        check_rules(self, (
            ("hard_weight", lambda v: 0 <= v <= 1, "is a share: 0 (KL only) to 1 (next-token loss only)"),
            ("calibration_seq_len", lambda v: v >= 2, "must be at least 2"),
        ))
        if self.calibration_token_count < self.calibration_seq_len:
            raise SparsifyError(f"--calibration-tokens {self.calibration_tokens} is less than one --calibration-seq-len sequence "
                                f"({self.calibration_seq_len} tokens)")
        if self.calibration_sources:
            from sparsify.text_files import check_sources

            check_sources(self.calibration_sources, "--calibration-data")
        for name in ("teacher", "parent"):
            if getattr(self, name):
                from sparsify.sources import check_model_ref

                check_model_ref(getattr(self, name), f"--{name}")

    def training_values(self, teacher: str) -> dict[str, Any]:
        """The training flags this sets: the teacher and the loss mix."""
        return {"teacher": teacher, "kl_weight": 1.0 - self.hard_weight, "ce_weight": self.hard_weight}


__all__ = ["DERIVED_TRAINING", "DistillOptions", "INITS", "TRAINING_DEFAULTS"]
