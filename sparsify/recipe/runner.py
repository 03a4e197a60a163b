"""Running a recipe: plan the stages against the run folder's state, check the push first, then
run what is not done, recording each stage as it starts and ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparsify.errors import SparsifyError
from sparsify.pipeline import StageCallbacks
from sparsify.recipe.recipe import Recipe
from sparsify.recipe.run_state import RECIPE_FILE, RunState, folder_fingerprint, stage_fingerprint
from sparsify.recipe.stages import STAGES


@dataclass
class PlannedStage:
    section: str
    status: str  # "done" (skipped), "resume" (continues from its checkpoint) or "pending" (runs)
    reason: str
    fingerprint: str
    model_folder: Path | None  # the model folder the stage reads, where it reads one
    made_in_run: bool  # that folder is written by an earlier stage of this recipe


@dataclass
class RecipeCallbacks(StageCallbacks):
    on_plan: Callable[[list[PlannedStage]], None] = lambda plan: None
    on_stage: Callable[[PlannedStage], None] = lambda stage: None  # a stage starts
    on_stage_done: Callable[[PlannedStage, dict[str, Any], float], None] = lambda stage, summary, seconds: None


@dataclass
class StageRun:
    """What a stage's `run` gets besides its settings."""

    recipe: Recipe
    resolved: dict[str, Any]
    run_dir: Path
    model_folder: Path | None
    callbacks: RecipeCallbacks
    command: str | None
    resume: bool = False
    replace_output: bool = False  # the output folder is this run's own and may be replaced
    prepared: Any = None


@dataclass
class RunResult:
    recipe: Recipe
    plan: list[PlannedStage]
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


def _made_by_run(state: RunState, output: str) -> bool:
    """Whether this run folder's state says its stages wrote `output` (so it may be replaced)."""
    return any(entry.get("summary", {}).get("output") and Path(entry["summary"]["output"]).resolve() == Path(output).resolve()
               for entry in state.stages.values())


def plan_run(recipe: Recipe, state: RunState) -> list[PlannedStage]:
    header, resolved = recipe.header, recipe.resolved()
    output = Path(header.output) if header.output else None
    plan: list[PlannedStage] = []
    produced, previous, rerun = False, None, False
    for section in recipe.stages:
        stage = STAGES[section]
        if section == "upcycle":
            folder, made = None, False
        elif produced:
            folder, made = output, True
        elif output is not None and output.is_dir():
            folder, made = output, False
        else:
            folder, made = (Path(header.model) if header.model else None), False
        inputs = _external_inputs(section, recipe, folder, made)
        fingerprint = stage_fingerprint(section, resolved[section], {"model": header.model, "output": header.output}, previous, inputs)
        entry = state.stages.get(section)
        status, reason = _status(stage, entry, fingerprint, recipe, rerun)
        rerun = rerun or status == "pending"
        plan.append(PlannedStage(section, status, reason, fingerprint, folder, made))
        previous = fingerprint
        produced = produced or (stage.writes_model and output is not None)
    _rerun_producer_of_changed_input(plan, state)
    return plan


def _external_inputs(section: str, recipe: Recipe, folder: Path | None, made: bool) -> list[str]:
    if section == "upcycle":
        return [folder_fingerprint(recipe.header.model)]
    models = getattr(recipe.stages[section], "models", None) or ([] if made or folder is None else [str(folder)])
    return [folder_fingerprint(model) for model in models]


def _status(stage, entry: dict[str, Any] | None, fingerprint: str, recipe: Recipe, rerun: bool) -> tuple[str, str]:
    if rerun:
        return "pending", "an earlier stage runs again"
    if entry is None:
        return "pending", "not run yet"
    same = entry.get("fingerprint") == fingerprint
    if entry.get("status") == "done":
        if not same:
            return "pending", "its settings or inputs changed"
        missing = _missing_outputs(entry.get("summary", {}))
        return ("pending", f"{missing} is gone") if missing else ("done", "finished, settings unchanged")
    if stage.resumable and same:
        from sparsify.train.state import find_checkpoint

        checkpoint = find_checkpoint(recipe.run_dir / stage.section) if (recipe.run_dir / stage.section).exists() else None
        if checkpoint is not None:
            return "resume", f"interrupted; continues from {checkpoint}"
    return "pending", "interrupted before a checkpoint" if same else "interrupted, and its settings changed"


def _missing_outputs(summary: dict[str, Any]) -> str | None:
    paths = [summary["output"]] if summary.get("output") else []
    paths += summary.get("reports", [])
    return next((path for path in paths if not Path(path).exists()), None)


def _rerun_producer_of_changed_input(plan: list[PlannedStage], state: RunState) -> None:
    """Training rewrites the converted folder in place: training again from scratch must start from
    a fresh conversion, not from the trained weights."""
    for index, planned in enumerate(plan):
        stage = STAGES[planned.section]
        entry = state.stages.get(planned.section, {})
        trained_before = entry.get("status") == "done" or entry.get("ran_before")
        if not (stage.changes_input and planned.made_in_run and planned.status == "pending" and trained_before):
            continue
        producer = max(i for i in range(index) if STAGES[plan[i].section].writes_model)
        for later in plan[producer:]:
            if later.status != "pending":
                later.status, later.reason = "pending", f"{planned.section} rewrote the folder in place, so it starts again from here"
        return


def check_plan(recipe: Recipe, plan: list[PlannedStage], state: RunState) -> None:
    """Refuse, before anything runs, a stage whose input no earlier stage makes and that is absent,
    and an output folder that exists but is not this run's."""
    from sparsify.sources import check_model_ref

    for planned in plan:
        if planned.status == "done":
            continue
        if planned.section == "upcycle":
            check_model_ref(recipe.header.model, "model:")
            output = Path(recipe.header.output)
            if output.exists() and not _made_by_run(state, recipe.header.output):
                raise SparsifyError(f"output: {output} already exists and was not made by this run ({recipe.run_dir}); choose another "
                                    f"output (e.g. output={output}-2 on the command line) or remove it")
            continue
        models = getattr(recipe.stages[planned.section], "models", None)
        if models:
            for model in models:
                check_model_ref(model, f"{planned.section}.models")
            continue
        if not planned.made_in_run and (planned.model_folder is None or not planned.model_folder.is_dir()):
            named = planned.model_folder or recipe.header.output or "(none)"
            raise SparsifyError(f"the {planned.section} stage reads the model folder {named}, which no earlier stage of this recipe "
                                "makes and which is absent: keep the upcycle stage, or set model: to a folder that exists")


def run_recipe(recipe: Recipe, *, callbacks: RecipeCallbacks | None = None, command: str | None = None,
               plan_only: bool = False) -> RunResult:
    callbacks = callbacks or RecipeCallbacks()
    run_dir = recipe.run_dir
    state = RunState.load(run_dir)
    plan = plan_run(recipe, state)
    check_plan(recipe, plan, state)
    callbacks.on_plan(plan)
    result = RunResult(recipe, plan, {p.section: state.stages[p.section].get("summary", {}) for p in plan if p.status == "done"})
    if plan_only or all(p.status == "done" for p in plan):
        return result
    resolved = recipe.resolved()
    context = {p.section: StageRun(recipe, resolved, run_dir, p.model_folder, callbacks, command, resume=p.status == "resume",
                                   replace_output=_made_by_run(state, recipe.header.output) if recipe.header.output else False)
               for p in plan}
    for planned in plan:  # a bad token or namespace fails now, not after hours of training
        stage = STAGES[planned.section]
        if planned.status != "done" and stage.prepare is not None:
            context[planned.section].prepared = stage.prepare(recipe.stages[planned.section], context[planned.section])
    run_dir.mkdir(parents=True, exist_ok=True)
    from sparsify.atomic_output import write_text_atomically

    write_text_atomically(run_dir / RECIPE_FILE, recipe.resolved_yaml())
    state.recipe = str(recipe.file) if recipe.file else recipe.name
    for planned in plan:
        if planned.status == "done":
            continue
        callbacks.on_stage(planned)
        state.started(planned.section, planned.fingerprint)
        started = time.perf_counter()
        summary = STAGES[planned.section].run(recipe.stages[planned.section], context[planned.section])
        seconds = time.perf_counter() - started
        state.finished(planned.section, summary, seconds)
        result.summaries[planned.section] = summary
        callbacks.on_stage_done(planned, summary, seconds)
    return result
