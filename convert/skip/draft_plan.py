"""What a skip model's draft path runs when it drafts for self-speculative decoding.

A draft plan names sublayers that every draft token skips outright (static: no gate is evaluated, and
a skipped attention sublayer writes no K/V, since no draft token reads that layer and verification
rewrites the slots) and says what the other gated sublayers do: decide per token at a draft
threshold (`gated=True`), or run (a static draft: a fixed smaller network with no gate cost).

Why static skips: on the CUDA-graph engine a per-token gate costs about half a skipped sublayer and
a skipped attention sublayer still pays its K/V write, so per-token drafts cost about one teacher step
(docs/plans/self-speculative-decoding.md, 3.5). A static plan makes the draft a plain smaller graph.

The plan lives in the model's config (`draft_plan`), so a saved model drafts the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sparsify.errors import SparsifyError

SUBLAYERS = ("attention", "ffn")


def sublayer_key(layer: int, sublayer: str) -> str:
    return f"{layer}.{sublayer}"


@dataclass(frozen=True)
class DraftPlan:
    skip: tuple[str, ...] = ()  # "layer.sublayer" keys every draft token skips (no gate, no K/V)
    gated: bool = False  # the other gates decide per token (True) or their sublayers simply run (a static draft)
    threshold: float | None = None  # where gated: the draft threshold (None: the model's own)
    chosen_by: dict[str, Any] = field(default_factory=dict, compare=False)  # how the plan was found (search settings, tune scores)

    def __post_init__(self) -> None:
        for key in self.skip:
            layer, _, sublayer = key.partition(".")
            if not layer.isdigit() or sublayer not in SUBLAYERS:
                raise SparsifyError(f"draft plan: {key!r} is not a sublayer; write it as LAYER.attention or LAYER.ffn")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise SparsifyError(f"draft threshold must lie strictly between 0 and 1, got {self.threshold}")

    @classmethod
    def per_token(cls, threshold: float | None) -> DraftPlan:
        """Every gate decides per token at `threshold` (None: the model's own threshold)."""
        return cls((), gated=True, threshold=threshold)

    def skipped_share(self, gated_sublayers: int) -> float:
        return len(self.skip) / gated_sublayers if gated_sublayers else 0.0

    def to_config(self) -> dict[str, Any]:
        return {"skip": list(self.skip), "gated": self.gated, "threshold": self.threshold, "chosen_by": self.chosen_by}

    @classmethod
    def from_config(cls, record: dict[str, Any] | None) -> DraftPlan | None:
        if not record:
            return None
        return cls(tuple(record.get("skip", ())), bool(record.get("gated", False)), record.get("threshold"),
                   dict(record.get("chosen_by") or {}))

    @classmethod
    def of_model(cls, model: Any) -> DraftPlan | None:
        """The plan saved with the model, if any."""
        return cls.from_config(getattr(model.config, "draft_plan", None))

    def save_to(self, model: Any) -> None:
        model.config.draft_plan = self.to_config()

    @classmethod
    def for_model(cls, model: Any, threshold: float | None = None) -> DraftPlan:
        """How `model` drafts when asked to: its saved plan (a given `threshold` gates the sublayers
        the plan keeps per token at it), else every gate per token at `threshold` (None: the model's own)."""
        saved = cls.of_model(model)
        if saved is None:
            return cls.per_token(threshold)
        if threshold is None:
            return saved
        return cls(saved.skip, gated=True, threshold=threshold, chosen_by=saved.chosen_by)

    def summary(self, gated_sublayers: int) -> str:
        """One line for reports: what the draft skips and how the rest decides."""
        threshold = "the model's threshold" if self.threshold is None else f"{self.threshold:g}"
        rest = f"the rest gated per token at {threshold}" if self.gated else "the rest run"
        if self.skip:
            return f"{len(self.skip)} of {gated_sublayers} sublayers skipped ({self.skipped_share(gated_sublayers):.0%}), {rest}"
        return f"every gate per token at {threshold}" if self.gated else "nothing skipped (the teacher)"


def _check_keys(plan: DraftPlan, gates: dict[str, Any]) -> None:
    unknown = [key for key in plan.skip if key not in gates]
    if unknown:
        raise SparsifyError(f"draft plan skips {', '.join(unknown[:4])}, which this model does not gate")


@contextmanager
def drafting(model: Any, plan: DraftPlan) -> Iterator[None]:
    """The model's gates set to draft by `plan` inside the block, restored after: skipped sublayers
    forced closed, the others deciding per token at the plan's threshold (frozen gates keep their
    decision) or, for a static plan, forced open."""
    skip_gates = getattr(model, "skip_gates", None)
    gates = {sublayer_key(layer, sublayer): gate for layer, sublayer, gate in (skip_gates() if skip_gates else ())}
    if not gates:
        raise SparsifyError("self-speculative decoding drafts with a skip model's gates; this model has none "
                            "(make one with `sparsify upcycle MODEL --to skip`, or give it a draft head with `sparsify draft-head`)")
    _check_keys(plan, gates)
    before = {key: (gate.forced, gate.threshold) for key, gate in gates.items()}
    skipped = set(plan.skip)
    try:
        for key, gate in gates.items():
            if key in skipped:
                gate.forced = False
            elif not plan.gated:
                gate.forced = True
            elif plan.threshold is not None:
                gate.threshold = plan.threshold
        yield
    finally:
        for key, gate in gates.items():
            gate.forced, gate.threshold = before[key]


def has_skip_gates(model: Any) -> bool:
    skip_gates = getattr(model, "skip_gates", None)
    return bool(skip_gates and skip_gates())


def teacher_mode(model: Any):
    """The model as its dense teacher inside the block: a skip model with every gate open, a dense
    model as it is (a draft head drafts for either)."""
    from contextlib import nullcontext

    return drafting(model, DraftPlan()) if has_skip_gates(model) else nullcontext()
