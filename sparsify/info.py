"""Describe a model folder: what it is, total vs active parameters, and whether it is exact."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from sparsify.checkpoint_reader import read_safetensors_header
from sparsify.errors import SparsifyError
from sparsify.families import FAMILIES, FFN_ROLES, Family
from sparsify.provenance import read_record


@dataclass
class ModelInfo:
    folder: Path
    architecture: str
    model_type: str
    variant: str  # "dense" for a folder sparsify did not make
    total_params: int
    active_params: int
    layout: dict[str, Any] = field(default_factory=dict)
    exact: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    training: list[dict[str, Any]] = field(default_factory=list)


def _moe_family(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if f.moe_model_type == model_type), None)


def count_params(folder: Path, config: dict[str, Any]) -> dict[str, int]:
    """Total parameters from the shard headers; active = total minus unselected experts."""
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update({name: entry.shape for name, entry in read_safetensors_header(file).items()})
    if not shapes:
        raise SparsifyError(f"{folder} has no .safetensors weights")
    total = sum(prod(shape) for shape in shapes.values())
    family = _moe_family(config.get("model_type", ""))
    if family is None:
        return {"total": total, "active": total}
    top_k = int(config[family.moe_config_keys["top_k"][0]])
    router = re.compile(re.escape(family.layer_prefix).replace(r"\{layer\}", r"(\d+)") + re.escape(family.moe_router) + "$")
    inactive = 0
    for name, shape in shapes.items():
        match = router.match(name)
        if match:
            layer = int(match.group(1))
            per_expert = sum(prod(shapes[family.layer_name(layer, family.moe_experts[r], expert=0)]) for r in FFN_ROLES)
            inactive += (shape[0] - top_k) * per_expert
    return {"total": total, "active": total - inactive}


def _moe_rows(layout: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("experts", f"{layout['experts']} = {layout['copies']} copies x granularity {layout['granularity']}"),
        ("active experts per token (top-k)", str(layout["top_k"])),
        ("expert size", f"{layout['expert_size']} (dense d_ff {layout['dense_d_ff']})"),
        ("FFN compute per token vs dense", f"{layout['active_ffn_ratio']:.2f}x"),
        ("neuron split", f"{layout['split']['strategy']} (seed {layout['split']['seed']})"),
        ("router init", layout["router_init"]),
    ]


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
    )
