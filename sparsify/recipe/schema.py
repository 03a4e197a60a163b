"""Reading recipe sections into the option dataclasses the command line uses.

There is no second schema: a section's keys are the fields of its dataclasses, a value's type is the
field's type hint, and its default is the field's default. Unknown keys are refused with the file,
the line and the closest known key (misspelt keys that are silently ignored are what users of
config-driven tools complain about most).
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Iterable

from sparsify.errors import SparsifyError
from sparsify.recipe.source import Node

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# What a Hugging Face token looks like (user access tokens start with hf_).
TOKEN_TEXT = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
TOKEN_KEYS = ("token", "hf_token", "use_auth_token", "auth_token", "api_key")


def closest(key: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest known key, '' when none is near."""
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def unknown_key(node: Node, path: str, key: str, known: Iterable[str]) -> SparsifyError:
    known = list(known)
    return SparsifyError(f"{node.where}: unknown key '{path}{key}'{closest(key, known)} (keys here: {', '.join(known)})")


def refuse_tokens(node: Node, path: str = "") -> None:
    """A token never goes in a recipe: the resolved recipe is stored in the run folder and the card."""
    items = node.value.items() if isinstance(node.value, dict) else enumerate(node.value) if isinstance(node.value, list) else ()
    for key, child in items:
        name = f"{path}{key}"
        if isinstance(key, str) and key.lower() in TOKEN_KEYS:
            raise SparsifyError(f"{child.where}: '{name}': a token never goes in a recipe (it would be kept in the run folder and "
                                "the model card); set HF_TOKEN or run `hf auth login`")
        refuse_tokens(child, f"{name}.")
    if isinstance(node.value, str) and TOKEN_TEXT.search(node.value):
        raise SparsifyError(f"{node.where}: '{path.rstrip('.')}' holds what looks like a Hugging Face token; a token never goes "
                            "in a recipe: set HF_TOKEN or run `hf auth login`")


def _options(hint: Any) -> tuple[list[Any], bool]:
    """The types a hint allows, and whether None is one of them."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = list(typing.get_args(hint))
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


def _kind(hint: Any) -> str:
    names = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}
    allowed, nullable = _options(hint)
    text = " or ".join(names.get(a, "a list" if typing.get_origin(a) is list else getattr(a, "__name__", str(a))) for a in allowed)
    return text + (" (or null)" if nullable else "")


def coerce(node: Node, hint: Any, name: str) -> Any:
    """The value of `node` as the field's type: YAML's own typing is not trusted (`3e-4` is a string
    to YAML 1.1, `on` is true), the field's type decides."""
    allowed, nullable = _options(hint)
    if node.is_null:
        if nullable:
            return None
        raise SparsifyError(f"{node.where}: '{name}' needs {_kind(hint)}, not null")
    for kind in allowed:
        value = _as(node, kind, name)
        if value is not _NO:
            return value
    shown = node.value if isinstance(node.value, str) else ("a list" if isinstance(node.value, list) else "a mapping")
    raise SparsifyError(f"{node.where}: '{name}' needs {_kind(hint)}, not '{shown}'")


_NO = object()


def _as(node: Node, kind: Any, name: str) -> Any:
    if typing.get_origin(kind) is list:
        if not isinstance(node.value, list):
            return _NO
        (item,) = typing.get_args(kind)
        return [coerce(child, item, name) for child in node.value]
    if kind is str and isinstance(node.value, list):
        # Comma-separated options (suite, tasks, data, lora_targets) also read a YAML list.
        items = [coerce(child, str, name) for child in node.value]
        return ",".join(items) if all("," not in item for item in items) else _NO
    if not isinstance(node.value, str):
        return _NO
    text = node.value.strip()
    if kind is str:
        return node.value
    if kind is bool:
        lowered = text.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else _NO
    if kind is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            pass
        try:  # 1e6 for a count of steps is a whole number too
            number = float(text.replace("_", ""))
        except ValueError:
            return _NO
        return int(number) if math.isfinite(number) and number.is_integer() else _NO
    if kind is float:
        try:
            number = float(text.replace("_", ""))
        except ValueError:
            return _NO
        return number if math.isfinite(number) else _NO
    return _NO


def field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def default_of(cls: type, name: str) -> Any:
    f = next(x for x in fields(cls) if x.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def read_values(mapping: Node, hints: dict[str, Any], path: str) -> dict[str, Any]:
    """Every key of `mapping` coerced by `hints`; a key not in `hints` is refused."""
    if not isinstance(mapping.value, dict):
        raise SparsifyError(f"{mapping.where}: '{path.rstrip('.')}' must be a mapping of options")
    values = {}
    for key, node in mapping.value.items():
        if key not in hints:
            raise unknown_key(node, path, key, hints)
        values[key] = coerce(node, hints[key], f"{path}{key}")
    return values


def build(cls: type, values: dict[str, Any], where: str, positions: dict[str, Node] | None = None) -> Any:
    """`cls(**values)`, then its own checks (validate). A failed check is placed at the key it names
    (the checks speak of flags, `--top-k`) when `positions` knows it, else at the section."""
    instance = cls(**values)
    if hasattr(instance, "validate"):
        try:
            instance.validate()
        except SparsifyError as error:
            text = str(error)
            mentions = {text.find(f"{name.replace('_', '-')} "): name for name in (positions or {}) if f"{name.replace('_', '-')} " in text}
            place = positions[mentions[min(mentions)]].where if mentions else where  # the key the message names first
            raise SparsifyError(f"{place}: {error}") from error
    return instance
