"""The stages a recipe can hold, as a registry keyed by section name, in run order.

Each stage says how its section is read (by the option dataclasses of its command), how it looks
resolved, what it reads and writes, and how it runs (by calling the library function behind its
command). The runner knows stages only through these entries; a later stage (distill) is one more
`register_stage` call.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sparsify.errors import SparsifyError
from sparsify.option_values import parse_list
from sparsify.recipe.schema import build, closest, coerce, field_hints, read_values
from sparsify.recipe.source import Node

if TYPE_CHECKING:
    from sparsify.recipe.recipe import Recipe
    from sparsify.recipe.runner import StageRun


@dataclass
class Stage:
    section: str
    summary: str
    read: Callable[[Node, Recipe], Any]  # the section's node -> its settings
    resolved: Callable[[Any, Recipe], dict[str, Any]]  # settings -> every value, defaults included
    run: Callable[[Any, StageRun], dict[str, Any]]  # does the work; returns what the state file keeps
    check: Callable[[Any, Recipe, Node], None] | None = None  # needs of the section on the rest of the recipe
    reads_model: bool = True  # reads the recipe's model folder: an earlier stage's output, else `model:`
    writes_model: bool = False  # leaves the recipe's model folder at `output`
    changes_input: bool = False  # rewrites the folder it read (training in place): its producer must re-run first
    checkpoints: str | None = None  # run-folder subfolder of an interrupted run's checkpoint (it resumes from it)
    prepare: Callable[[Any, StageRun], Any] | None = None  # before the first stage runs (push: token and repository)
    models: Callable[[Any, Recipe], list[str]] = lambda settings, recipe: []  # other models it reads (checked, fingerprinted)
    makes: Callable[[Any, Recipe], list[str]] = lambda settings, recipe: []  # folders it writes besides `output` (later stages may read them)
    data: Callable[[Any, Recipe], list[str]] = lambda settings, recipe: []  # text it reads (fingerprinted)
    describe: Callable[[dict[str, Any]], str] = lambda summary: ""  # a finished run's summary in one line


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage, *, after: str | None = None) -> Stage:
    """Add a stage; `after` places it in the run order (default: last)."""
    STAGES.pop(stage.section, None)
    items = list(STAGES.items())
    position = len(items) if after is None else [name for name, _ in items].index(after) + 1
    items.insert(position, (stage.section, stage))
    STAGES.clear()
    STAGES.update(items)
    return stage


def _mapping(node: Node, section: str) -> Node:
    if not isinstance(node.value, dict):
        raise SparsifyError(f"{node.where}: '{section}' must be a mapping of options (or removed)")
    return node


# --- upcycle ----------------------------------------------------------------------------------


@dataclass
class UpcycleSettings:
    to: str
    options: Any  # the variant's options dataclass
    conversion: Any  # sparsify.conversion_options.ConversionOptions


def _read_upcycle(node: Node, recipe: Recipe) -> UpcycleSettings:
    from sparsify.conversion_options import ConversionOptions
    from sparsify.convert import VARIANTS

    _mapping(node, "upcycle")
    to_node = node.value.get("to")
    if to_node is None or to_node.is_null:
        raise SparsifyError(f"{node.where}: 'upcycle' needs 'to', the target variant: {', '.join(VARIANTS)}")
    to = coerce(to_node, str, "upcycle.to")
    if to not in VARIANTS:
        raise SparsifyError(f"{to_node.where}: unknown variant 'upcycle.to: {to}'{closest(to, VARIANTS)} (variants: {', '.join(VARIANTS)})")
    variant = VARIANTS[to]
    variant_hints, conversion_hints = field_hints(variant.options), field_hints(ConversionOptions)
    hints = {"to": str, **variant_hints, **conversion_hints}
    others = sorted({f for v in VARIANTS.values() if v.name != to for f in field_hints(v.options)} - set(hints))
    for key, child in node.value.items():
        if key in others:  # an option of another variant: say so rather than "unknown"
            raise SparsifyError(f"{child.where}: 'upcycle.{key}' does not apply to 'to: {to}'")
    values = read_values(node, hints, "upcycle.")
    options = build(variant.options, {k: v for k, v in values.items() if k in variant_hints}, node.where, node.value)
    conversion = build(ConversionOptions, {k: v for k, v in values.items() if k in conversion_hints}, node.where, node.value)
    return UpcycleSettings(to, options, conversion)


def _check_upcycle(settings: UpcycleSettings, recipe: Recipe, node: Node) -> None:
    if not recipe.header.model or not recipe.header.output:
        raise SparsifyError(f"{node.where}: the upcycle stage needs 'model:' (what to convert) and 'output:' (where) at the top "
                            "of the recipe")


def _run_upcycle(settings: UpcycleSettings, run: StageRun) -> dict[str, Any]:
    from sparsify.upcycle import upcycle

    result = upcycle(run.recipe.header.model, settings.to, run.recipe.header.output, overwrite=run.replace_output,
                     command=run.command, recipe=run.resolved, **settings.conversion.upcycle_arguments(),
                     **asdict(settings.options), **run.callbacks.conversion)
    run.callbacks.on_converted(result)
    return {"output": str(result.output), "total_parameters": result.params["total"], "active_parameters": result.params["active"]}


register_stage(Stage(
    "upcycle", "convert the dense model into the variant",
    read=_read_upcycle,
    resolved=lambda s, recipe: {"to": s.to, **asdict(s.options), **asdict(s.conversion)},
    run=_run_upcycle, check=_check_upcycle, reads_model=False, writes_model=True,
    models=lambda s, recipe: [recipe.header.model],
    describe=lambda summary: f"{summary['output']}: {summary['active_parameters']:,} of {summary['total_parameters']:,} parameters active",
))


# --- train ------------------------------------------------------------------------------------


def _recipe_variant(recipe: Recipe) -> str | None:
    upcycle = recipe.stages.get("upcycle")
    return upcycle.to if upcycle is not None else None


def _read_train(node: Node, recipe: Recipe):
    """Groups as sub-sections (`train.optimisation.lr`) or, since every field name is unique across
    groups, flat (`train.lr`, `train.tokens=2M` on the command line): both land in the group."""
    from sparsify.convert import VARIANTS
    from sparsify.train.options import GROUPS, TrainOptions

    _mapping(node, "train")
    sections = TrainOptions.sections()
    owner = {name: section for section, group in sections.items() for name in field_hints(group)}
    variant = VARIANTS.get(_recipe_variant(recipe) or "")
    own_group = variant.train_options.section if variant is not None and variant.train_options is not None else None
    values: dict[str, dict[str, Any]] = {section: {} for section in sections}
    given: dict[str, Node] = {}  # field -> where it was set, to catch one option written twice
    for key, child in node.value.items():
        if key in sections and isinstance(child.value, dict):
            section = key
            found = {name: (value, child.value[name]) for name, value in
                     read_values(child, field_hints(sections[key]), f"train.{key}.").items()}
        elif key in owner:
            section = owner[key]
            found = {key: (coerce(child, field_hints(sections[section])[key], f"train.{key}"), child)}
        else:
            known = [*sections, *owner]
            raise SparsifyError(f"{child.where}: unknown key 'train.{key}'{closest(key, known)} (groups: {', '.join(sections)}; "
                                "or any of their keys directly)")
        if variant is not None and section not in GROUPS and section != own_group:
            raise SparsifyError(f"{child.where}: 'train.{key}' is for the variant whose training group is '{section}'; this recipe "
                                f"converts to '{variant.name}'" + (f" (its group is 'train.{own_group}')" if own_group else ""))
        for name, (value, where) in found.items():
            if name in given:
                # Written flat and in its group: a command-line override wins over the file; twice in the file is refused.
                overrides = [n.where.startswith("command line") for n in (given[name], where)]
                if overrides.count(True) != 1:
                    raise SparsifyError(f"{where.where}: 'train' sets '{name}' twice (also at {given[name].where}); keep one")
                if overrides[0]:
                    continue
            given[name] = where
            values[section][name] = value
    groups = {section: build(group, values[section], node.where, given) for section, group in sections.items()}
    options = TrainOptions(**{s: groups.pop(s) for s in GROUPS}, variants=groups)
    try:
        options.validate()  # the data files and teacher named exist
    except SparsifyError as error:
        raise SparsifyError(f"{node.where}: {error}") from error
    return options


def _resolved_train(options, recipe: Recipe) -> dict[str, Any]:
    from sparsify.convert import VARIANTS

    variant = VARIANTS.get(_recipe_variant(recipe) or "")
    own = {variant.train_options.section} if variant is not None and variant.train_options is not None else None
    return {section: asdict(group) for section, group in options.groups().items()
            if own is None or section in own or section not in options.variants}


def _check_train(options, recipe: Recipe, node: Node) -> None:
    header = recipe.header
    if "upcycle" in recipe.stages:  # it trains the conversion's output in place
        return
    if not header.model or not header.output or Path(header.output).resolve() == Path(header.model).resolve():
        raise SparsifyError(f"{node.where}: without an upcycle stage, training reads 'model:' (a converted folder) and writes "
                            "'output:', a different folder; a recipe never rewrites its input in place")


def _run_train(options, run: StageRun) -> dict[str, Any]:
    from sparsify.train.loop import train

    folder = run.model_folder
    output = Path(run.recipe.header.output)
    in_place = output.resolve() == folder.resolve()
    result = train(folder, options, output=None if in_place else output, run_dir=run.run_dir / "train", resume=run.resume,
                   restart=not run.resume, command=run.command, **run.callbacks.training)
    if not in_place:  # the conversion's record got the recipe; a trained copy of another folder gets it here
        _store_recipe(output, run.resolved)
    run.callbacks.on_trained(result)
    return {"output": str(result.output), "steps": result.steps, "tokens": result.tokens,
            "after": {k: v for k, v in result.after.items() if isinstance(v, (int, float))}}


register_stage(Stage(
    "train", "train the routers or gates (LoRA + KL to the dense teacher)",
    read=_read_train, resolved=_resolved_train, run=_run_train, check=_check_train,
    writes_model=True, changes_input=True, checkpoints="train",
    models=lambda options, recipe: [] if options.distillation.teacher == "self" else [options.distillation.teacher],
    data=lambda options, recipe: [*options.data.train_sources, *options.data.heldout_sources],
    describe=lambda summary: f"{summary['output']}: {summary['steps']} steps, {summary['tokens']:,} tokens",
))


# --- distill ----------------------------------------------------------------------------------


@dataclass
class TrainingCommandSettings:
    output: str  # the folder the command writes (the recipe's model folder stays what it was, for eval and push)
    options: Any  # the command's own options (DistillOptions, TransitionOptions)
    training: Any  # sparsify.train.options.TrainOptions, None with tokens 0 (no training)


@dataclass(frozen=True)
class TrainingCommand:
    """A command that writes a model from the recipe's model folder and then trains it (`sparsify distill`,
    `sparsify transition`): its options and its training options, flat in its section, plus `output`."""

    section: str
    options: Callable[[], type]  # its options class (imported when a recipe is read)
    run: Callable[[], Callable]  # its library function: (model, output, options, training, **run settings) -> result
    excluded: Callable[[], Any]  # the training options the command sets itself (names)
    defaults: Callable[[], dict[str, Any]]  # its training defaults
    output_is: str  # what `output` holds, for the error when it is missing
    summary: Callable[[Any], dict[str, Any]]  # its own figures of a result

    def training_hints(self) -> dict[str, Any]:
        from sparsify.train.options import TrainOptions

        excluded = set(self.excluded())
        return {name: hint for group in TrainOptions.sections().values() for name, hint in field_hints(group).items() if name not in excluded}

    def read(self, node: Node, recipe: Recipe) -> TrainingCommandSettings:
        from sparsify.option_values import parse_count
        from sparsify.train.options import TrainOptions

        _mapping(node, self.section)
        options_class = self.options()
        own, training_hints = field_hints(options_class), self.training_hints()
        values = read_values(node, {"output": str, **own, **training_hints}, f"{self.section}.")
        output = values.pop("output", None)
        if not output:
            raise SparsifyError(f"{node.where}: '{self.section}' needs 'output', the folder of {self.output_is}")
        options = build(options_class, {k: v for k, v in values.items() if k in own}, node.where, node.value)
        training = TrainOptions.of(**{**self.defaults(), **{k: v for k, v in values.items() if k in training_hints}})
        if parse_count(training.data.tokens) == 0:
            options.untrained(training)  # e.g. distill's calibration text falls back to --data
            return TrainingCommandSettings(output, options, None)
        try:
            training.validate()
        except SparsifyError as error:
            raise SparsifyError(f"{node.where}: {error}") from error
        return TrainingCommandSettings(output, options, training)

    def resolved(self, settings: TrainingCommandSettings, recipe: Recipe) -> dict[str, Any]:
        hints = self.training_hints()
        training = {} if settings.training is None else {k: v for k, v in settings.training.flat().items() if k in hints}
        return {"output": settings.output, **asdict(settings.options), **training}

    def execute(self, settings: TrainingCommandSettings, run: StageRun) -> dict[str, Any]:
        result = self.run()(run.model_folder, settings.output, settings.options, settings.training, run_dir=run.run_dir / self.section,
                            resume=run.resume, restart=not run.resume, command=run.command, on_status=run.callbacks.on_status,
                            train_callbacks=run.callbacks.training)
        summary: dict[str, Any] = {"output": str(result.output), **self.summary(result)}
        if result.training is not None:
            run.callbacks.on_trained(result.training)
            summary.update(steps=result.training.steps, tokens=result.training.tokens,
                           after={k: v for k, v in result.training.after.items() if isinstance(v, (int, float))})
        return summary


def _lazy(module: str, name: str) -> Callable[[], Any]:
    """`module.name`, imported when first asked for (recipes are listed and read without torch)."""
    return lambda: getattr(importlib.import_module(module), name)


def _trained(summary: dict[str, Any]) -> str:
    return f", {summary['steps']} steps, {summary['tokens']:,} tokens" if "steps" in summary else ", not trained"


def _training_data(training: Any) -> list[str]:
    return [] if training is None else [*training.data.train_sources, *training.data.heldout_sources]


def register_training_command(command: TrainingCommand, summary: str, *, models, data, describe) -> None:
    register_stage(Stage(command.section, summary, read=command.read, resolved=command.resolved, run=command.execute,
                         checkpoints=command.section, makes=lambda s, recipe: [s.output], models=models, data=data, describe=describe))


# --- distill ----------------------------------------------------------------------------------


register_training_command(
    TrainingCommand(
        "distill", options=_lazy("sparsify.convert.distill.options", "DistillOptions"), run=_lazy("sparsify.convert.distill.run", "distill"),
        excluded=_lazy("sparsify.convert.distill.options", "DERIVED_TRAINING"), defaults=_lazy("sparsify.convert.distill.options", "TRAINING_DEFAULTS"),
        output_is="the dense student", summary=lambda result: {"init": result.init},
    ),
    "fold the sparse model back into a dense one and train it against the sparse model",
    models=lambda s, recipe: [ref for ref in (s.options.teacher, s.options.parent) if ref],
    data=lambda s, recipe: [*s.options.calibration_sources, *_training_data(s.training)],
    describe=lambda summary: f"{summary['output']}: --init {summary['init']}" + _trained(summary),
)


# --- transition ---------------------------------------------------------------------------------


register_training_command(
    TrainingCommand(
        "transition", options=_lazy("sparsify.convert.mot.options", "TransitionOptions"), run=_lazy("sparsify.convert.mot.transition", "transition"),
        excluded=lambda: {"teacher"}, defaults=_lazy("sparsify.convert.mot.options", "TRANSITION_TRAINING_DEFAULTS"),
        output_is="the native MoE", summary=lambda result: {"top_k": result.top_k},
    ),
    "turn the MoT model into a native sparse MoE and train it briefly (transition tuning)",
    models=lambda s, recipe: [s.options.teacher] if s.options.teacher else [],
    data=lambda s, recipe: _training_data(s.training),
    describe=lambda summary: f"{summary['output']}: top-{summary['top_k']}" + _trained(summary),
)


# --- eval -------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    options: Any  # sparsify.eval.options.EvalOptions
    models: list[str] = field(default_factory=list)  # empty: the recipe's model folder
    card: bool | None = None  # None: put the report in the card of the recipe's own model folder
    other_data: str = ""  # text from another domain: a second, quality-only report per model


_EVAL_EXTRA = {"models": list[str], "card": bool | None, "other_data": str}


def _read_eval(node: Node, recipe: Recipe) -> EvalSettings:
    from sparsify.eval.options import EvalOptions

    _mapping(node, "eval")
    option_hints = field_hints(EvalOptions)
    values = read_values(node, {**option_hints, **_EVAL_EXTRA}, "eval.")
    options = build(EvalOptions, {k: v for k, v in values.items() if k in option_hints}, node.where, node.value)
    settings = EvalSettings(options, values.get("models") or [], values.get("card"), values.get("other_data") or "")
    if options.teacher:  # refused now, not after the conversion and the training
        from sparsify.sources import check_model_ref

        try:
            check_model_ref(options.teacher, "eval.teacher")
        except SparsifyError as error:
            raise SparsifyError(f"{node.value['teacher'].where}: {error}") from error
    if settings.other_data:
        from sparsify.text_files import check_sources

        try:
            check_sources(parse_list(settings.other_data), "eval.other_data")
        except SparsifyError as error:
            raise SparsifyError(f"{node.value['other_data'].where}: {error}") from error
    return settings


def _check_eval(settings: EvalSettings, recipe: Recipe, node: Node) -> None:
    if not settings.models and not (recipe.header.output or recipe.header.model):
        raise SparsifyError(f"{node.where}: the eval stage has nothing to measure: give 'eval.models' or 'model:'/'output:'")
    if settings.card and settings.models:
        raise SparsifyError(f"{node.where}: 'eval.card' writes into the recipe's own model folder; drop it when 'eval.models' is given")


def _run_eval(settings: EvalSettings, run: StageRun) -> dict[str, Any]:
    import json
    from dataclasses import replace

    from sparsify.atomic_output import write_text_atomically
    from sparsify.eval.compare import compare_markdown
    from sparsify.eval.run import evaluate

    models = settings.models or [str(run.model_folder)]
    root = run.run_dir / "eval"
    measured: dict[str, list[tuple[dict[str, Any], Path]]] = {"held-out": [], "other domain": []}
    for model in models:
        folder = root / _slug(model) if len(models) > 1 else root
        own = not settings.models and run.made_in_run  # only a folder this recipe made, never one it reads, gets the card
        card = own if settings.card is None else settings.card
        run.callbacks.on_status(f"evaluating {model}")
        report = evaluate(model, settings.options, output=folder, card=card, **run.callbacks.evaluation)
        measured["held-out"].append((report, folder))
        run.callbacks.on_report(report, folder)
        if settings.other_data:
            run.callbacks.on_status(f"evaluating {model} on {settings.other_data}")
            other = replace(settings.options, data=settings.other_data, suite="quality")
            report = evaluate(model, other, output=folder / "other-domain", **run.callbacks.evaluation)
            measured["other domain"].append((report, folder / "other-domain"))
            run.callbacks.on_report(report, folder / "other-domain")
            if card:
                _store_other_domain(Path(model), folder / "other-domain")
    summary: dict[str, Any] = {"reports": [str(folder / "report.json") for pairs in measured.values() for _, folder in pairs]}
    if len(models) > 1:
        compare = root / "compare.md"
        text = "".join(compare_markdown([r for r, _ in pairs], [str(f) for _, f in pairs], title=f"sparsify compare: {domain}")
                       for domain, pairs in measured.items() if pairs)
        write_text_atomically(compare, text)
        write_text_atomically(compare.with_suffix(".json"), json.dumps({"models": models, "reports": summary["reports"]}, indent=2) + "\n")
        summary["compare"] = str(compare)
        run.callbacks.on_compare([r for r, _ in measured["held-out"]], [f for _, f in measured["held-out"]])
    return summary


def _store_other_domain(model_folder: Path, report_folder: Path) -> None:
    """Keep the other-domain report with the model (eval/other-domain/), so its card shows it."""
    import shutil

    from sparsify.model_card import EVAL_FOLDER, OTHER_DOMAIN, refresh_card

    target = model_folder / EVAL_FOLDER / OTHER_DOMAIN
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("report.json", "report.md"):
        shutil.copyfile(report_folder / name, target / name)
    refresh_card(model_folder)


def _slug(model: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("./")).strip("-") or "model"


def _resolved_eval(settings: EvalSettings, recipe: Recipe) -> dict[str, Any]:
    extra = {"card": settings.card} if settings.card is not None else {}
    # `models: []` stays empty (it means "the recipe's own folder", which gets the report in its card).
    return {"models": list(settings.models), **extra,
            **({"other_data": settings.other_data} if settings.other_data else {}), **asdict(settings.options)}


register_stage(Stage(
    "eval", "measure quality, cost and routing against the teacher",
    read=_read_eval, resolved=_resolved_eval, run=_run_eval, check=_check_eval,
    models=lambda s, recipe: [*s.models, *([s.options.teacher] if s.options.teacher else [])],
    data=lambda s, recipe: parse_list(s.options.data) + parse_list(s.other_data),
    describe=lambda summary: summary.get("compare") or ", ".join(summary["reports"]),
))


# --- push -------------------------------------------------------------------------------------


def _read_push(node: Node, recipe: Recipe):
    from sparsify.hub import PushOptions

    _mapping(node, "push")
    return build(PushOptions, read_values(node, field_hints(PushOptions), "push."), node.where, node.value)


def _check_push(options, recipe: Recipe, node: Node) -> None:
    if not recipe.header.model and not any(STAGES[section].writes_model for section in recipe.stages):
        raise SparsifyError(f"{node.where}: the push stage needs a model folder: 'model:' at the top of the recipe (or a stage "
                            "that makes 'output:')")


def _store_recipe(folder: Path, resolved: dict[str, Any]) -> None:
    """Record the resolved recipe in the folder's sparsify.json (the card shows it), atomically."""
    from sparsify.provenance import read_record, write_record

    record = read_record(folder)
    if record is not None and record.get("recipe") != resolved:
        write_record(folder, {**record, "recipe": resolved})


def _prepare_push(options, run: StageRun):
    from sparsify.hub import prepare_push

    return prepare_push(options, on_status=run.callbacks.on_status)


def _run_push(options, run: StageRun) -> dict[str, Any]:
    from sparsify.hub import publish

    folder = run.model_folder
    if run.made_in_run:
        # The card shows the recipe as it is now (the evaluation or push settings may have changed
        # since the weights were made). A folder this recipe did not make keeps the recipe that did.
        _store_recipe(folder, run.resolved)
    target = run.prepared if run.prepared is not None else _prepare_push(options, run)
    result = publish(folder, target, on_status=run.callbacks.on_status)
    run.callbacks.on_pushed(result)
    return {"url": result.url, "commit": result.commit, "changed": result.changed}


register_stage(Stage(
    "push", "upload the model folder to the Hugging Face Hub",
    read=_read_push, resolved=lambda options, recipe: asdict(options), run=_run_push, check=_check_push,
    prepare=_prepare_push,
    describe=lambda summary: f"{summary['url']} ({'new commit' if summary['changed'] else 'unchanged: nothing uploaded'})",
))
