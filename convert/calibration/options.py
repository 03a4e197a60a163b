"""The calibration flags a data-driven conversion takes (torch-free, like every option class)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsify.option_values import check_rules, parse_count, parse_list, require


@dataclass
class CalibrationTextOptions:
    """The calibration text alone: what a conversion that measures the dense model but refits nothing takes."""

    calibration_data: str = field(
        default="",
        metadata={"help": "Text the dense model is measured on (files/globs: txt, jsonl, parquet, .gz; or a Hub dataset id). "
                          "Training's default held-out 1% is never read, so the same files can be passed to --data later."},
    )
    calibration_tokens: str = field(default="128k", metadata={"help": "Calibration tokens (e.g. 64k); more is slower and steadier."})
    calibration_seq_len: int = field(default=512, metadata={"help": "Tokens per calibration sequence."})
    calibration_field: str = field(default="text", metadata={"help": "Column holding the text in jsonl/parquet/Hub calibration data."})

    @property
    def calibration_sources(self) -> tuple[str, ...]:
        return tuple(parse_list(self.calibration_data))

    @property
    def calibration_token_count(self) -> int:
        return parse_count(self.calibration_tokens)

    @property
    def calibrated(self) -> bool:
        return bool(self.calibration_sources)

    def validate_calibration(self) -> None:
        check_rules(self, (("calibration_seq_len", lambda v: v >= 16, "must be at least 16"),))
        require(self.calibration_token_count >= self.calibration_seq_len,
                f"--calibration-tokens {self.calibration_tokens} is less than one --calibration-seq-len sequence "
                f"({self.calibration_seq_len} tokens)")
        if self.calibrated:
            from sparsify.text_files import check_sources

            check_sources(self.calibration_sources, "--calibration-data")

    def record(self) -> dict:
        """What sparsify.json keeps about the calibration."""
        return {"data": list(self.calibration_sources), "tokens": self.calibration_token_count, "seq_len": self.calibration_seq_len}


@dataclass
class CalibrationOptions(CalibrationTextOptions):
    """The calibration text, and whether down projections are refitted on it (prune, fine-moe)."""

    refit: bool = field(
        default=True,
        metadata={"help": "With --calibration-data: re-solve each layer's down projections so that the neurons a token keeps "
                          "reproduce the dense FFN's output on the calibration text (ridge regression towards the dense weights)."},
    )

    def record(self) -> dict:
        return {**super().record(), "refit": self.refit}
