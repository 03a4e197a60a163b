"""A recipe: one YAML file that names a model and the stages to run on it, read and checked whole
before anything runs.

```yaml
model: smollm2-135m          # what the first stage reads (alias, folder, .gguf, Hub id)
output: out/smol-fmoe        # the model folder the recipe makes
upcycle: {to: fine-moe, granularity: 8, top_k: 4}
train: {data: {data: corpus/train.jsonl.gz, tokens: 2M}, optimisation: {lr: 1e-3}}
eval: {teacher: smollm2-135m, data: corpus/valid.jsonl.gz}
push: {repo_id: me/smol-fmoe}
```
Sections are the stages (sparsify.recipe.stages), in the order they run; each is read by the
option dataclasses its command uses. `resolved()` is the recipe with every default filled in: what
`--print-config` shows, what the run folder keeps, and what the model card embeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsify.errors import SparsifyError
from sparsify.recipe.overrides import apply_overrides
from sparsify.recipe.schema import field_hints, read_values, refuse_tokens, unknown_key
from sparsify.recipe.source import Node, read_recipe_file


@dataclass
class Header:
    """The recipe's top-level values (every other top-level key is a stage's section)."""

    name: str = field(default="", metadata={"help": "The recipe's name (default: the file name)."})
    model: str = field(default="", metadata={"help": "The model the first stage reads: alias, folder, .gguf file or Hub id."})
    output: str = field(default="", metadata={"help": "The model folder the recipe makes."})
    run_dir: str = field(default="", metadata={"help": "The run folder: state, resolved recipe, training checkpoints, reports "
                                                       "(default: OUTPUT.run, or runs/NAME without an output)."})


@dataclass
class Recipe:
    header: Header
    stages: dict[str, Any]  # section -> the stage's settings, in run order
    file: Path | None = None

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def run_dir(self) -> Path:
        if self.header.run_dir:
            return Path(self.header.run_dir)
        if self.header.output:
            return Path(self.header.output).with_name(Path(self.header.output).name + ".run")
        return Path("runs") / self.name

    def resolved(self) -> dict[str, Any]:
        from sparsify.recipe.stages import STAGES

        header = {key: value for key, value in asdict(self.header).items() if value or key == "name"}
        return {**header, **{section: STAGES[section].resolved(settings, self) for section, settings in self.stages.items()}}

    def resolved_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=False)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and check a recipe file (or a shipped recipe's name); nothing runs."""
    from sparsify.recipe.shipped import find_recipe

    file = find_recipe(str(path))
    root = apply_overrides(read_recipe_file(file), list(overrides or []))
    return read_recipe(root, file)


def read_recipe(root: Node, file: Path | None = None) -> Recipe:
    from sparsify.recipe.stages import STAGES

    refuse_tokens(root)
    header_hints = field_hints(Header)
    header_nodes = {k: v for k, v in root.value.items() if k in header_hints}
    for key, node in root.value.items():
        if key not in header_hints and key not in STAGES:
            raise unknown_key(node, "", key, [*header_hints, *STAGES])
    header = Header(**read_values(Node(header_nodes, root.where), header_hints, ""))
    if not header.name:
        header.name = file.stem if file else "recipe"
    recipe = Recipe(header, {}, file)
    for section, stage in STAGES.items():  # the registry's order is the run order
        if section in root.value:
            recipe.stages[section] = stage.read(root.value[section], recipe)
    if not recipe.stages:
        raise SparsifyError(f"{root.where}: the recipe has no stages; add one of {', '.join(STAGES)}")
    for section, stage in STAGES.items():
        if section in recipe.stages and stage.check is not None:
            stage.check(recipe.stages[section], recipe, root.value[section])
    return recipe
