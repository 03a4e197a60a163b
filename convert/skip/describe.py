"""How `sparsify info`, the model card and eval reports describe a layer-skip folder (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsify.convert.variant import Layout

if TYPE_CHECKING:
    from sparsify.info import Verdict

MODEL_TYPE = "sparsify_skip"


@dataclass(frozen=True)
class SkipLayout(Layout):
    gates: list[str]  # gated sublayers: "attention", "ffn"
    gated_layers: list[int]
    threshold: float  # inference threshold (skip-freeze may change it)
    kv_rule: str = "a skipped attention sublayer still writes the token's keys and values"
    family: str = ""
    architecture: str = "SkipForCausalLM"
    dense_path: dict[str, str] | None = None  # {"gates": "open"} while every gate open is the teacher
    frozen_gates: dict[str, int] | None = None  # counts written by skip-freeze: always_run, always_skip, per_token

    def rows(self) -> list[tuple[str, str]]:
        layers = self.gated_layers
        rows = [
            ("gated sublayers", ", ".join(self.gates)),
            ("gated layers", f"{layers[0]}-{layers[-1]} ({len(layers)} layers)"),
            ("inference threshold", str(self.threshold)),
            ("KV cache rule", self.kv_rule),
        ]
        if self.frozen_gates is not None:
            rows.append(("frozen gates", "{always_run} always run, {always_skip} always skipped, {per_token} decide per token".format(**self.frozen_gates)))
        return rows


LAYOUT = SkipLayout  # the hook `Variant.layout` reads


def recognises(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def verdict_after(record: dict[str, Any], verdict: Verdict) -> Verdict:
    """After `sparsify skip-freeze` (the record's "serving"): still the teacher only if no gate skips."""
    from sparsify.info import Verdict  # noqa: F811 - the class itself, at run time

    serving = record.get("serving")
    if not serving or verdict.state == "no":
        return verdict
    frozen, threshold = serving["frozen"], serving["threshold"]
    skipped = serving["calibration"]["skip_rate"]
    if frozen["always_skip"]:
        return Verdict("no", f"skip-freeze fixed {frozen['always_skip']} gates to always skip their sublayer")
    if skipped and frozen["per_token"]:
        return Verdict("no", f"at the serving threshold {threshold:g} the gates skipped {skipped:.1%} of the calibration tokens, "
                             f"and {frozen['per_token']} still decide per token")
    return Verdict(verdict.state, f"{verdict.reason}; skip-freeze kept that: threshold {threshold:g}, "
                                  f"{frozen['always_run']} gates always run, none always skip")


# --- how `sparsify eval` shows what the skip probe saw -----------------------------------------

ROUTING_KIND = "skip"
# The report's flops_per_token entry the skip probe adds, and its row.
FLOPS_AT_ACTIVITY = ("total_with_skips", "forward GFLOPs per token at the measured skip rates")


def routing_rows(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    rows = [(f"skip rate, all gated sublayers (threshold {summary['threshold']})", summary["skip_rate"], ".2%")]
    return rows + [(f"skip rate, {sublayer}", rate, ".2%") for sublayer, rate in summary["skip_rate_by_sublayer"].items()]


def routing_plot(summary: dict[str, Any], folder: Path, plt: Any) -> Path:
    figure, axis = plt.subplots(figsize=(7.0, 3.5))
    for sublayer in summary["skip_rate_by_sublayer"]:
        rows = [row for row in summary["sublayers"] if row["sublayer"] == sublayer]
        axis.plot([row["layer"] for row in rows], [row["skip_rate"] for row in rows], marker="o", label=sublayer)
    axis.set_xlabel("layer")
    axis.set_ylabel("tokens skipping the sublayer")
    axis.set_ylim(0, 1)
    axis.set_title(f"skip rate per sublayer (threshold {summary['threshold']}, {summary['tokens']:,} tokens)", fontsize=10)
    axis.legend()
    figure.tight_layout()
    path = folder / "skip_rates.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def read_skip_config(model_dir: Path, command: str) -> dict:
    """config.json of a layer-skip model folder, or one line saying what `command` needs instead."""
    import json

    from sparsify.errors import SparsifyError

    if not (model_dir / "config.json").exists():
        raise SparsifyError(f"{model_dir} is not a model folder; {command} takes the folder of a layer-skip model")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise SparsifyError(f"{model_dir} is not a layer-skip model (make one with `sparsify upcycle ... --to skip`)")
    return config
