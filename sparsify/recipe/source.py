"""A recipe file read into nodes that remember where each value was written.

Every error about a recipe names the file and line of the value at fault, so values are kept as
`Node`s (value + where) rather than plain Python objects. Scalars stay as the text the user typed
(with whether it was quoted): YAML 1.1 reads `3e-4` as a string, `on` as true and `08` as a string,
so the type comes from the option field the value is for, not from YAML (see schema.coerce).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparsify.errors import SparsifyError

NULLS = ("", "~", "null", "Null", "NULL")


@dataclass
class Node:
    value: Any  # str (a scalar's text), list[Node] or dict[str, Node]
    where: str  # "recipe.yaml:12" or "command line 'train.lr=3e-4'"
    quoted: bool = False  # a quoted scalar is never null

    @property
    def is_null(self) -> bool:
        return isinstance(self.value, str) and not self.quoted and self.value in NULLS

    def plain(self) -> Any:
        """The node as plain Python (scalars as their text; null as None)."""
        if isinstance(self.value, dict):
            return {key: node.plain() for key, node in self.value.items()}
        if isinstance(self.value, list):
            return [node.plain() for node in self.value]
        return None if self.is_null else self.value


def read_recipe_file(path: Path) -> Node:
    """The file's top-level mapping as nodes; a missing file, a syntax error, a duplicate key or a
    top level that is not a mapping is one clear error with the line."""
    if not path.is_file():
        raise SparsifyError(f"recipe {path} not found; `sparsify recipes list` shows the shipped ones")
    text = path.read_text()
    return parse_recipe_text(text, str(path))


def parse_recipe_text(text: str, name: str) -> Node:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SparsifyError(f"{name}{line}: YAML syntax error: {error.problem or error.context}; fix the file and re-run") from error
    except yaml.YAMLError as error:
        raise SparsifyError(f"{name}: not valid YAML ({error})") from error
    if root is None:
        return Node({}, f"{name}:1")
    node = _convert(root, name)
    if not isinstance(node.value, dict):
        raise SparsifyError(f"{node.where}: a recipe is a mapping of sections (model:, upcycle:, train:, eval:, push:)")
    return node


def _where(name: str, node: yaml.Node) -> str:
    return f"{name}:{node.start_mark.line + 1}"


def _convert(node: yaml.Node, name: str) -> Node:
    if isinstance(node, yaml.MappingNode):
        mapping: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SparsifyError(f"{_where(name, key_node)}: keys must be plain names")
            key = key_node.value
            if key == "<<":
                raise SparsifyError(f"{_where(name, key_node)}: YAML merge keys (<<) are not supported in recipes; write the values out")
            if key in mapping:
                raise SparsifyError(f"{_where(name, key_node)}: '{key}' is given twice (first at {mapping[key].where}); keep one")
            value = _convert(value_node, name)
            value.where = _where(name, key_node)  # errors point at the key the user wrote
            mapping[key] = value
        return Node(mapping, _where(name, node))
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(item, name) for item in node.value], _where(name, node))
    assert isinstance(node, yaml.ScalarNode)
    return Node(node.value, _where(name, node), quoted=node.style in ("'", '"'))
