"""Variants, keyed by the `--to` name: the registry every stage asks.

Each variant is one package under convert/ (moe/ serves `--to moe` and `--to fine-moe`, skip/
serves `--to skip`, prune/ `--to prune`, mot/ `--to mot`) whose `VARIANTS` tuple is added below: adding a variant is one package and one
line here. `register_variant` adds one at run time (a plugin, or a test's toy variant). The registry
and every variant's options are importable without torch, so that the command line builds its
flags and answers `--help` quickly; the implementations are imported when a stage runs.
"""

from __future__ import annotations

from dataclasses import fields
from types import ModuleType
from typing import Any

from sparsify.convert import moe, mot, prune, skip
from sparsify.convert.variant import Metric, Variant
from sparsify.errors import SparsifyError

VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Add `variant` to the registry (replacing one of the same name)."""
    VARIANTS[variant.name] = variant
    return variant


def unregister_variant(name: str) -> None:
    VARIANTS.pop(name, None)


for _variant in (*moe.VARIANTS, *mot.VARIANTS, *skip.VARIANTS, *prune.VARIANTS):
    register_variant(_variant)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise SparsifyError(f"unknown target '--to {name}'; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def implementations() -> list[ModuleType]:
    """Every registered implementation module once (moe and fine-moe share one), in registry order."""
    return list({id(m): m for m in (v.load() for v in VARIANTS.values())}.values())


def hooks(name: str) -> list[Any]:
    """Every implementation's hook `name`, where it has one."""
    return [hook for module in implementations() if (hook := getattr(module, name, None)) is not None]


def descriptions() -> list[ModuleType]:
    """Every registered description module once (torch-free)."""
    return list({id(m): m for m in (v.describing() for v in VARIANTS.values())}.values())


def description_hooks(name: str) -> list[Any]:
    """Every description module's hook `name`, where it has one (torch-free)."""
    return [hook for module in descriptions() if (hook := getattr(module, name, None)) is not None]


def recognised(config: dict[str, Any]) -> ModuleType | None:
    """The description module of the variant kind a config.json belongs to (a native MoE made
    elsewhere included); None for a dense model."""
    return next((m for m in descriptions() if getattr(m, "recognises", None) and m.recognises(config)), None)


def variant_of_record(record: dict[str, Any] | None) -> Variant | None:
    """The variant a sparsify.json record names; None for a folder sparsify did not convert."""
    name = (record or {}).get("variant")
    return VARIANTS.get(name) if name else None


def train_option_groups() -> dict[str, type]:
    """Each variant's own training options by their section name (one group serves moe and fine-moe)."""
    groups: dict[str, type] = {}
    for variant in VARIANTS.values():
        if variant.train_options is not None:
            groups.setdefault(variant.train_options.section, variant.train_options)
    return groups


def all_metrics(kind: str) -> list[Metric]:
    """Every variant's step ("step") or held-out ("heldout") metrics, each key once."""
    found: dict[str, Metric] = {}
    for variant in VARIANTS.values():
        for metric in getattr(variant, f"{kind}_metrics"):
            found.setdefault(metric.key, metric)
    return list(found.values())


def build_options(variant: Variant, values: dict[str, Any]) -> Any:
    """Options dataclass from user values; refuses options that belong to another variant."""
    accepted = {f.name for f in fields(variant.options)}
    foreign = sorted(k for k in values if k not in accepted)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise SparsifyError(f"{flags} do{'es' if len(foreign) == 1 else ''} not apply to --to {variant.name}")
    options = variant.options(**values)
    options.validate()  # before the (possibly slow) source is opened
    return options


__all__ = ["Metric", "VARIANTS", "Variant", "all_metrics", "build_options", "description_hooks", "descriptions", "get_variant", "hooks",
           "implementations", "recognised", "register_variant", "train_option_groups", "unregister_variant", "variant_of_record"]
