"""The commands around recipes and the Hub: `sparsify run`, `sparsify recipes list/show` and
`sparsify push`. Thin: they parse, call sparsify.recipe / sparsify.hub, and print."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from sparsify.display import ConversionDisplay, TrainingDisplay, err, out, print_compare, print_eval_report, stop_quietly

recipes_app = typer.Typer(help="The recipes that ship with sparsify.", no_args_is_help=True)

STATUS_STYLE = {"done": "green", "resume": "yellow", "pending": "cyan"}


def run(
    recipe: Annotated[str, typer.Argument(help="A recipe file, or the name of a shipped one (`sparsify recipes list`).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Changes to the recipe: KEY=VALUE sets a key (train.tokens=2M, push.repo_id=me/x, 'eval.models=\\[a, b]'); "
             "~KEY removes one (~eval drops the evaluation stage).", show_default=False)] = None,
    print_config: Annotated[bool, typer.Option(help="Print the resolved recipe (every default filled in) and stop.")] = False,
    validate: Annotated[bool, typer.Option(help="Check the recipe, its files and the plan against the run folder, and stop.")] = False,
) -> None:
    """Run a recipe: convert -> train -> evaluate -> push, as its sections say. Re-running skips the stages that finished
    with the same settings, re-runs a changed stage and everything after it, and resumes an interrupted training run
    from its checkpoint. The run folder keeps state.json, the resolved recipe.yaml, training checkpoints and reports."""
    from sparsify.recipe.recipe import load_recipe
    from sparsify.recipe.runner import RecipeCallbacks, run_recipe

    loaded = load_recipe(recipe, overrides or [])
    if print_config:
        sys.stdout.write(loaded.resolved_yaml())
        return
    if validate:
        plan = run_recipe(loaded, callbacks=RecipeCallbacks(on_plan=lambda plan: _print_plan(loaded, plan)), plan_only=True).plan
        out.print(f"[green]valid[/green]: {len(plan)} stage{'s' if len(plan) > 1 else ''}; nothing was run")
        return
    _run(loaded, shlex.join(["sparsify", *sys.argv[1:]]))


def _print_plan(recipe, plan) -> None:
    table = Table(title=f"recipe {recipe.name}: run folder {recipe.run_dir}")
    for column in ("stage", "plan", "why"):
        table.add_column(column)
    for planned in plan:
        style = STATUS_STYLE[planned.status]
        table.add_row(planned.section, f"[{style}]{planned.status}[/{style}]", planned.reason)
    out.print(table)


def _run(recipe, command: str) -> None:
    from sparsify.recipe.runner import RecipeCallbacks, run_recipe
    from sparsify.train.loop import TrainingInterrupted

    conversion, training = ConversionDisplay(f"{recipe.name}: upcycle"), TrainingDisplay()
    evaluation = Progress(TextColumn("[bold]eval"), BarColumn(), TextColumn("{task.fields[status]}"), console=err, transient=True)
    eval_task = evaluation.add_task("eval", total=None, status="starting")
    seconds: dict[str, float] = {}
    results: dict[str, str] = {}
    current: list[str] = []

    def on_stage(planned) -> None:
        current.append(planned.section)
        out.rule(f"{planned.section}: {planned.reason}" if planned.status == "pending" else f"{planned.section}: resuming")

    def on_stage_done(planned, summary, taken) -> None:
        stop_quietly(evaluation)
        seconds[planned.section] = taken
        results[planned.section] = _summary_text(planned.section, summary)

    def on_status(text: str) -> None:
        if evaluation.live.is_started:
            evaluation.update(eval_task, status=text, completed=0, total=None)
        else:
            err.print(f"[dim]{text}[/dim]", highlight=False)

    def eval_status(text: str) -> None:
        evaluation.start()
        evaluation.update(eval_task, status=text, completed=0, total=None)

    def on_report(report, folder) -> None:
        stop_quietly(evaluation)
        print_eval_report(report, folder)

    callbacks = RecipeCallbacks(
        conversion=conversion.callbacks(), on_converted=conversion.converted,
        training=training.callbacks(), on_trained=training.report,
        evaluation={"on_status": eval_status, "on_progress": lambda done, total: evaluation.update(eval_task, completed=done, total=total)},
        on_report=on_report, on_compare=lambda reports, folders: print_compare(reports, folders, "compare (held-out text)"),
        on_status=on_status, on_pushed=_print_pushed,
        on_plan=lambda plan: _print_plan(recipe, plan), on_stage=on_stage, on_stage_done=on_stage_done,
    )
    try:
        result = run_recipe(recipe, callbacks=callbacks, command=command)
    except (TrainingInterrupted, KeyboardInterrupt) as stopped:
        stop_quietly(training.progress)
        section = current[-1] if current else "planning"
        err.print(f"[yellow]stopped during {section}[/yellow]"
                  f"{': ' + str(stopped).split(';')[0] if isinstance(stopped, TrainingInterrupted) else ''}. Re-run `{command}` to "
                  f"continue: the finished stages are skipped, and {section} {_how_it_continues(recipe, section)}.",
                  highlight=False, soft_wrap=True)
        sys.exit(130)
    finally:
        conversion.stop()
        stop_quietly(training.progress)
        stop_quietly(evaluation)
    table = Table(title=f"recipe {recipe.name}")
    for column in ("stage", "this run", "time", "result"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for planned in result.plan:
        ran = planned.section in seconds
        table.add_row(planned.section, "ran" if ran else "[green]skipped: done[/green]",
                      f"{seconds[planned.section]:.0f} s" if ran else "-",
                      results.get(planned.section) or _summary_text(planned.section, result.summaries.get(planned.section, {})))
    out.print(table)
    out.print(f"run folder: {recipe.run_dir} (state.json, recipe.yaml)")


def _summary_text(section: str, summary: dict) -> str:
    from sparsify.recipe.stages import STAGES

    return STAGES[section].describe(summary) if summary else ""


def _how_it_continues(recipe, section: str) -> str:
    from sparsify.recipe.stages import STAGES
    from sparsify.train.state import find_checkpoint

    stage = STAGES.get(section)
    folder = recipe.run_dir / stage.checkpoints if stage is not None and stage.checkpoints else None
    if folder is not None and folder.exists() and find_checkpoint(folder) is not None:
        return f"continues from its last checkpoint ({folder})"
    return "starts again"


@recipes_app.command("list")
def list_recipes() -> None:
    """The shipped recipes, with what each makes and its stages."""
    from sparsify.recipe.recipe import load_recipe
    from sparsify.recipe.shipped import shipped, summary
    from sparsify.errors import SparsifyError

    table = Table(title="shipped recipes (sparsify run NAME; sparsify recipes show NAME > my.yaml)")
    for column in ("name", "makes", "stages"):
        table.add_column(column)
    for name, path in shipped().items():
        try:
            stages = " -> ".join(load_recipe(path).stages)
        except SparsifyError:  # e.g. its data files are not here: still listed, with why
            stages = "(its inputs are not on this machine)"
        table.add_row(name, summary(path), stages)
    out.print(table)


@recipes_app.command("show")
def show_recipe(name: Annotated[str, typer.Argument(help="A shipped recipe's name.")]) -> None:
    """Print a shipped recipe's file, to start your own: sparsify recipes show NAME > my.yaml"""
    from sparsify.recipe.shipped import find_recipe

    sys.stdout.write(find_recipe(name).read_text())


def push(
    folder: Annotated[Path, typer.Argument(help="The model folder to upload (written by sparsify upcycle or train).")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repository, NAMESPACE/NAME; created if missing.")],
    public: Annotated[bool, typer.Option(help="Create the repository public (the default is private).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created from main if missing).")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="The commit message.")] = None,
) -> None:
    """Upload a model folder to the Hugging Face Hub, with its model card refreshed for the repository. The token comes
    from HF_TOKEN or `hf auth login`; run folders, checkpoints and tokenized data are never uploaded, and an unchanged
    folder makes no commit."""
    from sparsify.hub import PushOptions, push as push_folder

    options = PushOptions(repo_id=repo_id, private=not public, revision=revision or "", commit_message=commit_message or "")
    with err.status("pushing") as status:
        result = push_folder(folder, options, on_status=lambda text: status.update(text))
    _print_pushed(result)


def _print_pushed(result) -> None:
    if result.changed:
        out.print(f"pushed: {result.url} (commit {result.commit[:12]})")
    else:
        out.print(f"pushed: {result.url} already held every file; nothing uploaded (commit {result.commit[:12]})")


def register(app: typer.Typer) -> None:
    app.command(name="run", help=run.__doc__)(run)
    app.add_typer(recipes_app, name="recipes")
    app.command(name="push", help=push.__doc__)(push)
