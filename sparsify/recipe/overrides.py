"""Command-line changes to a recipe: `a.b=value` sets a key, `~a.b` removes one (`~eval` drops the
evaluation stage). Applied to the file's nodes before anything is read, so an override is checked
exactly like the file (unknown keys and wrong types are refused, naming the override)."""

from __future__ import annotations

import yaml

from sparsify.errors import SparsifyError
from sparsify.recipe.schema import TOKEN_KEYS, TOKEN_TEXT
from sparsify.recipe.source import Node


def _value_node(text: str, where: str) -> Node:
    """The value as the file would hold it: a scalar keeps its text, `[a, b]` is a list (text that
    starts with a bracket but is no YAML list, e.g. a commit message "[WIP] x", stays text)."""
    if text.lstrip().startswith(("[", "{")):
        from sparsify.recipe.source import parse_recipe_text

        try:
            wrapped = parse_recipe_text(f"value: {text}", where).value["value"]
        except SparsifyError:
            return Node(text, where)
        return _relabel(wrapped, where)
    try:
        quoted = isinstance(yaml.compose(text, Loader=yaml.SafeLoader), yaml.ScalarNode) and text.strip()[:1] in ("'", '"')
    except yaml.YAMLError:
        quoted = False
    return Node(text.strip()[1:-1] if quoted else text, where, quoted=quoted)


def _relabel(node: Node, where: str) -> Node:
    node.where = where
    for child in node.value.values() if isinstance(node.value, dict) else node.value if isinstance(node.value, list) else ():
        _relabel(child, where)
    return node


def _shown(override: str) -> str:
    """The override as errors quote it: a value that may be a credential is not repeated (it would
    reach the terminal, logs and CI output)."""
    key, _, value = override.partition("=")
    secret = key.rsplit(".", 1)[-1].lower() in TOKEN_KEYS or TOKEN_TEXT.search(value)
    return f"{key}=<hidden>" if secret and value else override


def apply_override(root: Node, override: str) -> None:
    where = f"command line '{_shown(override)}'"
    removing = override.startswith("~")
    if removing:
        path_text, value = override[1:], None
    elif "=" in override:
        path_text, value = override.split("=", 1)
    else:
        raise SparsifyError(f"{where}: an override is KEY=VALUE (e.g. train.lr=3e-4) or ~KEY to remove one (e.g. ~eval)")
    path = path_text.strip().split(".")
    if not all(path):
        raise SparsifyError(f"{where}: '{path_text}' is not a dotted key (e.g. train.optimisation.lr)")
    mapping = root
    for depth, key in enumerate(path[:-1]):
        child = mapping.value.get(key)
        if child is None:
            if removing:
                raise SparsifyError(f"{where}: the recipe has no '{'.'.join(path[:depth + 1])}' to remove")
            child = mapping.value[key] = Node({}, where)
        if not isinstance(child.value, dict):
            # e.g. train.data.tokens=2M on a recipe that writes `train.data: FILES` (the flat key, not the group)
            raise SparsifyError(f"{where}: '{'.'.join(path[:depth + 1])}' is a single value ({child.where}), not a section")
        mapping = child
    last = path[-1]
    if removing:
        if last not in mapping.value:
            raise SparsifyError(f"{where}: the recipe has no '{path_text}' to remove")
        del mapping.value[last]
    else:
        node = _value_node(value, where)
        existing = mapping.value.get(last)
        if existing is not None and isinstance(existing.value, dict) and not isinstance(node.value, (dict, list)):
            # A single value for a section is its key of the same name: `train.data=FILES` on a recipe
            # whose `train.data` is the data group sets the group's `data` (the flat shorthand), and
            # keeps its tokens and seq_len; replacing the whole group would drop them silently.
            existing.value[last] = node
        else:
            mapping.value[last] = node


def apply_overrides(root: Node, overrides: list[str]) -> Node:
    for override in overrides:
        apply_override(root, override)
    return root
