"""Converters, keyed by the `--to` name.

A converter is a dataclass of options (whose fields become CLI flags) and a `plan` function that
describes the output model (config, lazily produced tensors, layout facts, exactness). Adding a
variant is one module here and one `Converter` entry below.

Options live in the torch-free `options` module and each plan is imported on first call, so that
the CLI can build its flags without importing torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
import importlib
from typing import TYPE_CHECKING, Any, Callable

from sparsify.convert.options import FineMoeOptions, MoeOptions, SkipOptions
from sparsify.errors import SparsifyError

if TYPE_CHECKING:
    from sparsify.convert.plan import ConversionPlan


@dataclass(frozen=True)
class Converter:
    name: str
    summary: str
    options: type
    plan: Callable[..., ConversionPlan]


def _imported_on_call(module: str) -> Callable[..., ConversionPlan]:
    """`module.plan`, imported when first called (plans import torch)."""

    def plan(*args: Any, **kwargs: Any) -> ConversionPlan:
        return importlib.import_module(module).plan(*args, **kwargs)

    return plan


CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (
        Converter("moe", "Sparse Upcycling: E copies of each FFN behind a top-k router.", MoeOptions, _imported_on_call("sparsify.convert.moe")),
        Converter(
            "fine-moe",
            "Fine-grained MoE: each FFN split into G experts of d_ff/G; top-k scales with G.",
            FineMoeOptions,
            _imported_on_call("sparsify.convert.fine_moe"),
        ),
        Converter(
            "skip",
            "Layer skip: a per-token gate before every attention and FFN sublayer (remote-code architecture).",
            SkipOptions,
            _imported_on_call("sparsify.convert.skip"),
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
    options = converter.options(**values)
    options.validate()  # before the (possibly slow) source is opened
    return options


__all__ = ["CONVERTERS", "ConversionPlan", "Converter", "build_options", "get_converter"]


def __getattr__(name: str) -> Any:
    # ConversionPlan imports torch; resolved on first use for `from sparsify.convert import ConversionPlan`.
    if name == "ConversionPlan":
        from sparsify.convert.plan import ConversionPlan

        return ConversionPlan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
