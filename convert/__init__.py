"""Converters, keyed by the `--to` name.

A converter is a dataclass of options (whose fields become CLI flags) and a `plan` function that
describes the output model (config, lazily produced tensors, layout facts, exactness). Adding a
variant is one module here and one `Converter` entry below.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from sparsify.convert import fine_moe, moe, skip
from sparsify.convert.plan import ConversionPlan
from sparsify.errors import SparsifyError


@dataclass(frozen=True)
class Converter:
    name: str
    summary: str
    options: type
    plan: Callable[..., ConversionPlan]


CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (
        Converter("moe", "Sparse Upcycling: E copies of each FFN behind a top-k router.", moe.MoeOptions, moe.plan),
        Converter(
            "fine-moe",
            "Fine-grained MoE: each FFN split into G experts of d_ff/G; top-k scales with G.",
            fine_moe.FineMoeOptions,
            fine_moe.plan,
        ),
        Converter(
            "skip",
            "Layer skip: a per-token gate before every attention and FFN sublayer (remote-code architecture).",
            skip.SkipOptions,
            skip.plan,
        ),
    )
}


def get_converter(name: str) -> Converter:
    if name not in CONVERTERS:
        raise SparsifyError(f"unknown target '--to {name}'; choose one of: {', '.join(CONVERTERS)}")
    return CONVERTERS[name]


def build_options(converter: Converter, values: dict[str, Any]) -> Any:
    """Options dataclass from user values; refuses options that belong to another converter."""
    accepted = {f.name for f in fields(converter.options)}
    foreign = sorted(k for k in values if k not in accepted)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise SparsifyError(f"{flags} do{'es' if len(foreign) == 1 else ''} not apply to --to {converter.name}")
    return converter.options(**values)


__all__ = ["CONVERTERS", "Converter", "ConversionPlan", "build_options", "get_converter"]
