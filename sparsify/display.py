"""What the commands show: the consoles, the training progress line and summary table, the
conversion summary, and an evaluation report as a table. Shared by `upcycle`, `train`, `eval` and
`run`, which shows every stage of a recipe the way its own command would."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from sparsify.convert import all_metrics

out = Console()
err = Console(stderr=True)


class TrainingDisplay:
    """The progress line of a training run (started by its first callback), its Ctrl-C message, and
    the summary table. Only the main process shows anything under `accelerate launch`."""

    def __init__(self) -> None:
        import os

        self.main_process = os.environ.get("RANK", "0") == "0"
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), TextColumn("step {task.completed}/{task.fields[steps]}"),
            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err, transient=True, disable=not self.main_process,
        )
        self.task = self.progress.add_task("train", total=None, steps="?", status="importing torch and transformers")
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.progress.start()

    def callbacks(self) -> dict[str, Any]:
        step_metrics = all_metrics("step")

        def on_plan(total_steps: int, start_step: int) -> None:
            self._start()
            self.progress.update(self.task, total=total_steps, completed=start_step, steps=f"{total_steps:,}")

        def on_step(entry: dict[str, Any]) -> None:
            status = (f"kl {entry['kl']:.4f} " if "kl" in entry else "") + f"ce {entry['ce']:.3f}" + (f" hid {entry['hidden']:.3f}" if "hidden" in entry else "") + "".join(
                f" {m.short} {format(entry[m.key], m.format)}" for m in step_metrics if m.key in entry)
            self.progress.update(self.task, completed=entry["step"], status=status + f" | {entry['tokens_per_s']:,.0f} tok/s")

        def on_status(text: str) -> None:
            self._start()
            self.progress.update(self.task, status=text)

        return {"on_plan": on_plan, "on_step": on_step, "on_status": on_status,
                "on_notice": lambda text: self.progress.console.print(f"[yellow]note:[/yellow] {text}", highlight=False)}

    @contextmanager
    def stopping(self):
        """Stop the progress line when the run ends; on Ctrl-C print why and how to resume, and exit 130."""
        from sparsify.train.loop import TrainingInterrupted

        try:
            yield
        except TrainingInterrupted as stopped:
            stop_quietly(self.progress)
            err.print(f"[yellow]{stopped}[/yellow]", highlight=False, soft_wrap=True)
            sys.exit(130)
        finally:
            stop_quietly(self.progress)

    def report(self, result) -> None:
        if not self.main_process:
            return
        table = Table(title=f"training -> {result.output}")
        for column, justify in (("held-out", "left"), ("before", "right"), ("after", "right")):
            table.add_column(column, justify=justify)
        rows = [
            ("student_ppl", "student perplexity", ".3f"),
            ("teacher_ppl", "teacher perplexity", ".3f"),
            ("kl", "KL(teacher || student)", ".4f"),
            ("top1_agreement", "top-1 agreement", ".1%"),
            *((m.key, m.title, m.format) for m in all_metrics("heldout")),
        ]
        for key, label, fmt in rows:
            if key not in result.after:
                continue
            table.add_row(label, format(result.before[key], fmt) if key in result.before else "-", format(result.after[key], fmt))
        out.print(table)
        session = (f"{result.session_tokens:,} tokens in {result.seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)")
        if result.start_step:
            out.print(f"run: {result.steps} steps, {result.tokens:,} tokens; resumed after step {result.start_step}, "
                      f"this session trained steps {result.start_step + 1}-{result.steps}: {session}")
        else:
            out.print(f"{result.steps} steps, {session}")
        out.print(f"peak {result.peak_memory_kind} memory {result.peak_memory_bytes / 2**30:.2f} GiB; log: {result.run_dir / 'log.jsonl'}")


def verdict_cell(verdict) -> str:
    from rich.markup import escape

    colour = "green" if verdict.state == "yes" else "yellow"
    return f"[{colour}]{verdict.state}[/{colour}]: {escape(verdict.reason)}"


class ConversionDisplay:
    """The byte progress bar of a conversion and its summary table."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.progress = Progress(
            TextColumn("[bold]writing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=err, transient=True,
        )
        self.task = self.progress.add_task("write", total=None)

    def callbacks(self) -> dict[str, Any]:
        planning = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                            TimeRemainingColumn(), console=err, transient=True)
        stages: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:  # calibration, before any byte is written
            if stage not in stages:
                planning.start()
                stages[stage] = planning.add_task(stage, total=total)
            planning.update(stages[stage], completed=done)

        def on_plan(plan) -> None:
            stop_quietly(planning)
            self.progress.start()
            self.progress.update(self.task, total=plan.nbytes)

        self._planning = planning
        return {"on_plan": on_plan, "on_bytes": lambda n: self.progress.advance(self.task, n), "on_progress": on_progress}

    def converted(self, result) -> None:
        from sparsify.info import layout_rows, teacher_verdict

        stop_quietly(self.progress)
        table = Table(title=self.title, show_header=False)
        for key, value in [
            ("output", str(result.output)),
            ("architecture", result.plan.layout.architecture),
            *layout_rows(result.record["variant"], result.record["layout"]),
            ("parameters", f"{result.params['total']:,} total, {result.params['active']:,} active"),
            ("reproduces teacher", verdict_cell(teacher_verdict(result.record))),
            ("size", f"{result.plan.nbytes / 1e6:,.1f} MB in {result.seconds:.1f} s"),
        ]:
            table.add_row(key, value)
        out.print(table)

    def stop(self) -> None:
        stop_quietly(self.progress)
        if hasattr(self, "_planning"):
            stop_quietly(self._planning)


def stop_quietly(progress: Progress) -> None:
    """Stop a progress display if it ever started (stopping one that did not prints blank lines)."""
    if progress.live.is_started:
        progress.stop()


def print_eval_report(report: dict[str, Any], output: Path | None) -> None:
    from sparsify.eval.report import metric_rows

    with_teacher = report.get("teacher") is not None
    table = Table(title=f"{report['model']['name']}" + (f" vs {report['teacher']['name']}" if with_teacher else ""))
    for column in ("section", "metric", "model", *(("teacher", "model vs teacher") if with_teacher else ())):
        table.add_column(column, justify="left" if column in ("section", "metric") else "right")
    for row in metric_rows(report):
        cells = [row.section, row.label, row.show(row.model, "model")]
        if with_teacher:
            cells += [row.show(row.teacher, "teacher"), row.show_change()]
        table.add_row(*cells)
    out.print(table)
    print_notes(report.get("notes", []))
    if output:
        out.print(f"report: {Path(output) / 'report.md'} (and report.json)")


def print_notes(notes) -> None:
    for note in notes:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False)


def print_compare(reports: list[dict[str, Any]], paths: list[Path], title: str = "sparsify compare") -> None:
    from sparsify.eval.compare import compare_table

    compared = compare_table(reports)
    table = Table(title=title)
    table.add_column("metric")
    for name, path in zip(compared.names, paths, strict=True):
        table.add_column(f"{name}\n[dim]{path}[/dim]", justify="right")
    for section, rows in compared.sections:
        table.add_row(f"[bold]{section}[/bold]", *[""] * len(compared.names))
        for label, cells in rows:
            table.add_row("  " + label, *cells)
    out.print(table)
