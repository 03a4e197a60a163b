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
    made_in_run: bool = False  # model_folder is written by an earlier stage of this recipe
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


def _made_before(recipe: Recipe, section: str, ref: str) -> bool:
    """Whether a stage before `section` writes the folder `ref`: the recipe's output, or one of its own (distill's)."""
    earlier = list(recipe.stages)[: list(recipe.stages).index(section)]
    target = Path(ref).resolve()
    output = [recipe.header.output] if recipe.header.output else []
    return any(Path(made).resolve() == target for name in earlier
               for made in [*(output if STAGES[name].writes_model else []), *STAGES[name].makes(recipe.stages[name], recipe)])


def plan_run(recipe: Recipe, state: RunState) -> list[PlannedStage]:
    header, resolved = recipe.header, recipe.resolved()
    output = Path(header.output) if header.output else None
    plan: list[PlannedStage] = []
    produced, previous, rerun = False, None, False
    for section, settings in recipe.stages.items():
        stage = STAGES[section]
        # The model folder a stage reads is the output of an earlier stage of this recipe, else `model:`
        # (never an `output:` that happens to exist: that may be this recipe's own earlier result).
        folder = (output if produced else Path(header.model) if header.model else None) if stage.reads_model else None
        made = stage.reads_model and produced
        inputs = [folder_fingerprint(str(folder))] if folder is not None and not made else []
        # A folder an earlier stage makes (distill's student) is covered by that stage's fingerprint, chained into this one.
        inputs += [folder_fingerprint(ref) for ref in (*stage.models(settings, recipe), *stage.data(settings, recipe))
                   if not _made_before(recipe, section, ref)]
        fingerprint = stage_fingerprint(section, resolved[section], {"model": header.model, "output": header.output}, previous, inputs)
        status, reason = _status(stage, state.stages.get(section), fingerprint, recipe, rerun)
        rerun = rerun or status == "pending"
        plan.append(PlannedStage(section, status, reason, fingerprint, folder, made))
        previous = fingerprint
        produced = produced or (stage.writes_model and output is not None)
    _rerun_producer_of_rewritten_folder(recipe, plan, state)
    return plan


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
    if not same:
        return "pending", "interrupted, and its settings or inputs changed"
    if stage.checkpoints is not None:
        from sparsify.train.state import find_checkpoint

        folder = recipe.run_dir / stage.checkpoints
        checkpoint = find_checkpoint(folder) if folder.exists() else None
        if checkpoint is not None:
            return "resume", f"interrupted; continues from {checkpoint}"
        return "pending", "interrupted before its first checkpoint"
    return "pending", "interrupted"


def _missing_outputs(summary: dict[str, Any]) -> str | None:
    paths = [summary["output"]] if summary.get("output") else []
    paths += summary.get("reports", [])
    return next((path for path in paths if not Path(path).exists()), None)


def _rerun_producer_of_rewritten_folder(recipe: Recipe, plan: list[PlannedStage], state: RunState) -> None:
    """Training rewrites the converted folder in place: training again from scratch, or no longer
    training at all (the stage was removed), must start from a fresh conversion, not from the
    trained weights."""
    def rewrote(section: str) -> bool:
        entry = state.stages.get(section, {})
        return STAGES[section].changes_input and (entry.get("status") == "done" or bool(entry.get("ran_before")))

    in_plan = {planned.section: planned for planned in plan}
    reasons = [f"{section} is no longer in the recipe but rewrote the folder" for section in state.stages
               if section in STAGES and section not in in_plan and rewrote(section)]
    reasons += [f"{p.section} rewrote the folder in place, so it starts again from here" for p in plan
                if p.made_in_run and p.status == "pending" and rewrote(p.section)]
    producers = [index for index, p in enumerate(plan) if STAGES[p.section].writes_model and not p.made_in_run]
    if not reasons or not producers or plan[producers[0]].status == "pending":
        return
    for later in plan[producers[0]:]:
        if later.status != "pending":
            later.status, later.reason = "pending", reasons[0] if later is plan[producers[0]] else "an earlier stage runs again"


def check_plan(recipe: Recipe, plan: list[PlannedStage], state: RunState) -> None:
    """Refuse, before anything runs: a run folder that holds another recipe's run, a model a stage
    reads that no earlier stage makes and that is absent, a model reference that cannot load, and
    an output folder that exists but is not this run's."""
    from sparsify.sources import check_model_ref

    if state.recipe and state.stages and state.recipe != recipe.name:
        raise SparsifyError(f"{recipe.run_dir} holds a run of the recipe '{state.recipe}', not '{recipe.name}'; give this recipe "
                            "its own output: (or run_dir:), or remove that run folder")
    for planned in plan:
        if planned.status == "done":
            continue
        stage, settings = STAGES[planned.section], recipe.stages[planned.section]
        for model in stage.models(settings, recipe):
            if not _made_before(recipe, planned.section, model):
                check_model_ref(model, f"{planned.section}: {model}")
        if stage.reads_model and not planned.made_in_run and (planned.model_folder is None or not planned.model_folder.is_dir()):
            if not getattr(settings, "models", None):  # an evaluation of named models reads those instead
                raise SparsifyError(f"the {planned.section} stage reads the model folder {planned.model_folder or '(none: no model:)'}, "
                                    "which no earlier stage of this recipe makes and which is absent: add the stage that makes it "
                                    "(upcycle), or set model: to a folder that exists")
        output = recipe.header.output
        writes_elsewhere = planned.model_folder is None or not planned.made_in_run
        if stage.writes_model and writes_elsewhere and Path(output).exists() and not _made_by_run(state, output):
            raise SparsifyError(f"output: {output} already exists and was not made by this run ({recipe.run_dir}); choose another "
                                f"output (e.g. output={output}-2 on the command line) or remove it")


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
    replace_output = bool(recipe.header.output) and _made_by_run(state, recipe.header.output)
    context = {p.section: StageRun(recipe, resolved, run_dir, p.model_folder, callbacks, command, resume=p.status == "resume",
                                   made_in_run=p.made_in_run, replace_output=replace_output)
               for p in plan}
    for planned in plan:  # a bad token or namespace fails now, not after hours of training
        stage = STAGES[planned.section]
        if planned.status != "done" and stage.prepare is not None:
            context[planned.section].prepared = stage.prepare(recipe.stages[planned.section], context[planned.section])
    run_dir.mkdir(parents=True, exist_ok=True)
    from sparsify.atomic_output import write_text_atomically

    write_text_atomically(run_dir / RECIPE_FILE, recipe.resolved_yaml())
    state.recipe = recipe.name
    for planned in plan:
        if planned.status == "done":
            continue
        if STAGES[planned.section].writes_model:  # what stages no longer in the recipe did is gone with the folder
            state.forget([section for section in state.stages if section not in recipe.stages])
        callbacks.on_stage(planned)
        state.started(planned.section, planned.fingerprint)
        started = time.perf_counter()
        summary = STAGES[planned.section].run(recipe.stages[planned.section], context[planned.section])
        seconds = time.perf_counter() - started
        state.finished(planned.section, summary, seconds)
        result.summaries[planned.section] = summary
        callbacks.on_stage_done(planned, summary, seconds)
    return result
