"""How every command reads the values of its options: counts (5M, 512k), comma-separated lists,
numbers, dtype names, and per-field rules. One vocabulary for all commands; torch-free, so that
options are checked before anything slow is imported.
"""

from __future__ import annotations

import re

from sparsify.errors import SparsifyError

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str | int) -> int:
    """'20M' -> 20_000_000; '512k' -> 512_000; plain integers pass through."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise SparsifyError(f"cannot read '{text}' as a count; write e.g. 5M, 512k or 20000000")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2).lower()])


def require(ok: bool, message: str) -> None:
    """Refuse with `message` unless `ok`: the one-line checks of option values."""
    if not ok:
        raise SparsifyError(message)


def check_rules(options, rules) -> None:
    """Refuse the first field of `options` that breaks its rule; `rules` is (field, accepts, rule text)."""
    for name, ok, rule in rules:
        if not ok(getattr(options, name)):
            raise SparsifyError(f"--{name.replace('_', '-')} {getattr(options, name)}: {rule}")


def parse_numbers(text: str, kind: type, flag: str, accepts=lambda value: True, rule: str = "") -> list:
    """'0.3, 0.5' -> [0.3, 0.5] for a comma-separated flag, with one clear error for a bad item."""
    try:
        values = [kind(part) for part in (p.strip() for p in text.split(",")) if part]
    except ValueError:
        values = []
    if not values or not all(accepts(v) for v in values):
        example = "0.3,0.5,0.7" if kind is float else "512,2048"
        raise SparsifyError(f"{flag} takes comma-separated {kind.__name__} values{' ' + rule if rule else ''} (e.g. {example}), not '{text}'")
    return values


LAYER_CHOICES = ("later-half", "all")  # or explicit indices: "0-3,8"


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """The layers a `--layers` flag names: later-half, all, or indices and ranges ("0-3,8"). Check the form
    alone with a large `num_layers`; the model's own count is checked when it is opened."""
    if spec == "later-half":
        return list(range(num_layers // 2, num_layers))
    if spec == "all":
        return list(range(num_layers))
    chosen: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise SparsifyError(f"--layers takes later-half, all or indices like 0-3,8; got '{spec}'") from None
        if low > high or high >= num_layers:  # checked here: a huge range is refused before it is spelled out
            raise SparsifyError(f"--layers {spec}: range {part.strip()} runs backwards" if low > high
                                else f"--layers {spec} names layers outside 0-{num_layers - 1}")
        chosen.update(range(low, high + 1))
    outside = sorted(i for i in chosen if not 0 <= i < num_layers)
    if outside or not chosen:
        raise SparsifyError(f"--layers {spec} names layers outside 0-{num_layers - 1}" if outside else f"--layers {spec} names no layer")
    return sorted(chosen)


def check_layers_form(spec: str) -> None:
    """Refuse a `--layers` value that names no layers whatever the model (before the model is opened)."""
    if spec not in LAYER_CHOICES:
        parse_layers(spec, 10**6)


def layer_ranges(layers: list[int]) -> str:
    """[15, 16, 17, 20] -> '15-17, 20': what parse_layers reads back."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def parse_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: every comma-separated flag (data sources, suites, targets)."""
    return [part.strip() for part in text.split(",") if part.strip()]


# One dtype vocabulary: both spellings are accepted wherever a dtype is asked for.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def dtype_name(text: str, flag: str = "--dtype", allowed: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a dtype flag value, or "auto"."""
    if text == "auto":
        return text
    canonical = DTYPE_NAMES.get(text)
    if canonical not in allowed:
        spellings = ", ".join(name for name, value in DTYPE_NAMES.items() if value in allowed)
        raise SparsifyError(f"{flag} must be auto or one of {spellings}, got '{text}'")
    return canonical


def torch_dtype(name: str):
    """The torch dtype of a canonical name (imports torch: call it when the work starts)."""
    import torch

    return getattr(torch, name)
