"""What a variant is to the rest of sparsify: one registry entry, importable without torch.

A variant (`--to NAME`) is one package under convert/. Its registry entry holds what the command
line needs before anything heavy is imported (the option dataclasses, the metrics it logs) and the
dotted name of its implementation module, which the stages import when they run. The stages
(upcycle, train, eval, info, the model card, the folder writer) call that module's hooks and never
name a variant. An implementation module provides:

    plan(source, options, dtype) -> ConversionPlan     required: the converted model, described
    find_decisions(model, options) -> Decisions | None what trains in full (routers, gates); see
                                                       sparsify.train.decisions.Decisions
    Probe                                              eval instrument; see sparsify.eval.probes.Probe
    remote_code() -> dict[str, bytes]                  modeling files a folder of its own architecture carries

Its description module, importable without torch (`sparsify info` and the card read folders with it):

    LAYOUT                                             required: the typed `layout` record class (a Layout)
    recognises(config) -> bool                         a config.json of this variant's kind (made by sparsify or not)
    inactive_parameters(shapes, config, folder) -> int parameters a token does not use, from the shard headers
    verdict_after(record, verdict) -> Verdict          whether it still reproduces its teacher after the
                                                       variant's own later steps (skip-freeze)
    ROUTING_KIND, routing_rows, routing_markdown,      how eval reports show what its probe saw
    routing_plot, FLOPS_AT_ACTIVITY

Only `plan` and `LAYOUT` are required; a missing hook means "this variant has none".
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, fields, replace
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Metric:
    """A figure training reports (per step or held out), as the command line shows it."""

    key: str  # in log.jsonl entries and the held-out evaluations
    label: str  # in sentences and tables, e.g. "skip rate"
    short: str  # for the progress line
    format: str  # format spec, e.g. ".1%"
    detail: str = ""  # what it counts, for tables: "sublayers x tokens"
    share_of: str = ""  # the same in a sentence: "sublayer computations"

    @property
    def title(self) -> str:
        return f"{self.label} ({self.detail})" if self.detail else self.label


@dataclass(frozen=True)
class LearningRates:
    """Peak learning rates `sparsify train` uses for a variant when --lr / --router-lr are not given:
    measured on the train split's tune bucket (bench/conversion_quality.py --tune), not guessed."""

    adapters: float  # --lr: the LoRA adapters
    decisions: float  # --router-lr: the routers or gates, trained in full


# Where a variant has no tuned rates: the values first tuned for fine-moe router training (docs/results.md).
UNTUNED_LEARNING_RATES = LearningRates(adapters=1e-3, decisions=5e-3)


@dataclass(frozen=True)
class Variant:
    name: str  # `--to NAME`, and "variant" in sparsify.json
    summary: str  # one line for `--help`
    options: type  # conversion options: a dataclass whose fields become `sparsify upcycle` flags
    implementation: str  # dotted module name with the hooks listed in this module's docstring (imports torch)
    description: str  # dotted module name with Layout and the folder-reading hooks (torch-free)
    train_options: type | None = None  # the variant's own training group (its fields become `train` flags)
    step_metrics: tuple[Metric, ...] = ()  # logged at every step beside kl and ce
    heldout_metrics: tuple[Metric, ...] = ()  # added to the held-out evaluation beside perplexity and KL
    decides: str = "routers"  # what training trains in full, for messages and the card ("skip gates")
    architecture: str | None = None  # module with register(): an own architecture, registered with transformers' Auto classes
    learning_rates: LearningRates = UNTUNED_LEARNING_RATES  # training's defaults for --lr and --router-lr

    def load(self) -> ModuleType:
        return importlib.import_module(self.implementation)

    def hook(self, name: str) -> Any:
        """The implementation's `name`, or None where the variant has none."""
        return getattr(self.load(), name, None)

    def describing(self) -> ModuleType:
        return importlib.import_module(self.description)

    def layout(self, record: dict[str, Any]) -> Layout:
        """The typed layout of a sparsify.json `layout` record this variant wrote."""
        return self.describing().LAYOUT.from_record(record)


class Layout:
    """The `layout` record of sparsify.json as a typed value: what a variant's converter wrote,
    read by training, `sparsify info` and the model card. Subclasses are dataclasses."""

    architecture: str

    @classmethod
    def from_record(cls, record: dict[str, Any]):
        """From sparsify.json; keys a subclass does not know (or an older record lacks) are tolerated."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows shown by `sparsify upcycle`, `sparsify info` and the model card."""
        return []

    def has_dense_path(self) -> bool:
        """Whether the weights still hold the dense teacher (router/gate training uses it as teacher)."""
        return bool(getattr(self, "dense_path", None))

    def without_dense_path(self):
        """After training merged adapters into the weights, the dense path is no longer the teacher."""
        return replace(self, dense_path=None) if hasattr(self, "dense_path") else self


