"""The report: report.json (versioned schema), report.md (tables), and the rows both are drawn from.

Every table — report.md, `sparsify compare`, the model card — comes from `metric_rows`, so a
metric is described once: its section, label, where it lives in the JSON, and how to show it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsify.atomic_output import write_text_atomically
from sparsify.convert import description_hooks, descriptions
from sparsify.errors import SparsifyError

SCHEMA = "sparsify-eval-report"
SCHEMA_VERSION = 1
CARD_BEGIN, CARD_END = "<!-- sparsify-eval:begin -->", "<!-- sparsify-eval:end -->"


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    model: float | None
    teacher: float | None
    fmt: str  # format spec for one value
    change: str = "ratio"  # how model vs teacher is shown: "ratio" (x1.23) or "diff" (+0.012)
    spread: dict[str, tuple[float, float]] | None = None  # side -> (min, max) of a measured median
    problems: dict[str, str] | None = None  # side -> why its measurement is not a result (eval/cost.py)

    def show(self, value: float | None, side: str = "model") -> str:
        """One cell. `side` defaults to the model, the one column `sparsify compare` shows, so a
        measured row always shows what its label promises: median (min-max), and any verdict."""
        problem = (self.problems or {}).get(side)
        if value is None:
            return problem or "-"
        text = format(value, self.fmt)
        if self.spread and side in self.spread:
            low, high = self.spread[side]
            text += f" ({format(low, self.fmt)}-{format(high, self.fmt)})"
        return f"{text}, {problem}" if problem else text

    def show_change(self) -> str:
        # A ratio of two medians is only a result when both measurements are; otherwise say why not.
        if self.problems:
            return "n/a: " + why_no_ratio(self.problems)
        if self.model is None or self.teacher is None:
            return ""
        if self.change == "diff":
            return format(self.model - self.teacher, "+" + self.fmt.lstrip(","))
        return f"x{self.model / self.teacher:.3f}" if self.teacher else ""


def problem_kind(problem: str) -> str:
    """The short kind of a measurement's problem ("invalid", "too few repeats", "unstable"): the text
    before the first colon, as eval/cost.py `timing_problem` writes it. Kept here so that reading a
    report never imports torch."""
    return problem.split(":")[0]


def why_no_ratio(problems: dict[str, str]) -> str:
    """Short reason a model-vs-teacher ratio is not shown, from side -> problem:
    "teacher unstable", "model and teacher too few repeats", "model invalid, teacher unstable"."""
    sides_by_kind: dict[str, list[str]] = {}
    for side, problem in problems.items():
        sides_by_kind.setdefault(problem_kind(problem), []).append(side)
    return ", ".join(f"{' and '.join(sides)} {kind}" for kind, sides in sides_by_kind.items())


def _at(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def metric_rows(report: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    quality = report.get("quality")
    if quality:
        for key, label, fmt in (("perplexity", "perplexity", ".3f"), ("bits_per_byte", "bits per byte", ".4f")):
            rows.append(Row("quality", label, _at(quality, "model", key), _at(quality, "teacher", key), fmt))
        if "vs_teacher" in quality:
            rows.append(Row("quality", "KL(teacher || model), nats/token", _at(quality, "vs_teacher", "kl"), None, ".4f"))
            rows.append(Row("quality", "top-1 agreement with teacher", _at(quality, "vs_teacher", "top1_agreement"), None, ".2%"))
        for setting, measured in (quality.get("settings") or {}).items():  # the model's own variations, e.g. a MoT's group size
            rows.append(Row("quality", f"perplexity, {setting}", _at(measured, "model", "perplexity"), None, ".3f"))
            if "vs_teacher" in measured:
                rows.append(Row("quality", f"KL(teacher || model), {setting}", _at(measured, "vs_teacher", "kl"), None, ".4f"))
    cost = report.get("cost")
    if cost:
        for key, label in (("total", "parameters, total"), ("active", "parameters, active per token")):
            rows.append(Row("cost", label, _at(cost, "model", "params", key), _at(cost, "teacher", "params", key), ",d"))
        rows.append(Row("cost", f"forward GFLOPs per token (context {_at(cost, 'model', 'flops_per_token', 'context')})",
                        _gflops(_at(cost, "model", "flops_per_token", "total")), _gflops(_at(cost, "teacher", "flops_per_token", "total")), ".4f"))
        for name, entry in (_at(cost, "model", "speed") or {}).items():
            batch = entry["batch"]
            engine = {"hf": "", "graph": " (CUDA graph)", "speculative": " (speculative, CUDA graph)",
                      "speculative (static cache, eager)": " (speculative, static cache, eager)"}.get(
                entry.get("decode_engine", "hf"), " (static cache, eager)")
            experts = f" [experts: {entry['experts_implementation']}]" if entry.get("experts_implementation") else ""
            fused = " [MoE sublayer: fused kernels]" if entry.get("decode_moe_sublayer") == "fused kernels" else ""
            for key, label, fmt in (("prefill_tokens_per_s", f"prefill tokens/s{experts}, batch {batch}", ",.0f"),
                                    ("decode_tokens_per_s", f"decode tokens/s{engine}{experts}{fused}, batch {batch}", ",.1f")):
                measured = {"model": _at(entry, key), "teacher": _at(cost, "teacher", "speed", name, key)}
                spread = {side: (m["min"], m["max"]) for side, m in measured.items() if m and m["min"] is not None}
                problems = {side: m["problem"] for side, m in measured.items() if m and m.get("problem")}
                rows.append(Row("cost", label + " (median, min-max)", _at(measured, "model", "median"),
                                _at(measured, "teacher", "median"), fmt, spread=spread, problems=problems))
            speculative = entry.get("decode_speculative")
            if speculative:  # what the speed above rests on: how many drafts the teacher kept
                rows.append(Row("cost", f"speculative: drafts accepted, batch {batch} ({speculative['draft']}; "
                                        f"{speculative['draft_tokens']} a round)", speculative["acceptance_rate"], None, ".1%"))
                rows.append(Row("cost", f"speculative: tokens per verification, batch {batch}", speculative["tokens_per_round"], None, ".2f"))
            peak = _at(entry, "decode_peak_bytes") or _at(entry, "prefill_peak_bytes")
            if peak is not None:
                teacher_entry = _at(cost, "teacher", "speed", name) or {}
                teacher_peak = teacher_entry.get("decode_peak_bytes") or teacher_entry.get("prefill_peak_bytes")
                rows.append(Row("cost", f"peak GPU memory GiB, batch {batch}", peak / 2**30, None if teacher_peak is None else teacher_peak / 2**30, ".2f"))
    for key, label in description_hooks("FLOPS_AT_ACTIVITY"):  # e.g. FLOPs at the measured skip rates
        at_activity = _at(cost, "model", "flops_per_token", key) if cost else None
        if at_activity is not None:
            rows.append(Row("cost", label, at_activity / 1e9, _gflops(_at(cost, "teacher", "flops_per_token", "total")), ".4f"))
    for kind, describe in _routing_describers().items():
        summary = _at(report, "routing", kind)
        if summary:
            rows += [Row("routing", label, value, None, fmt) for label, value, fmt in describe.routing_rows(summary)]
    for task, metrics in sorted((_at(report, "tasks", "model") or {}).items()):
        for metric, value in sorted(metrics.items()):
            if metric.endswith("_stderr"):
                continue
            rows.append(Row("tasks", f"{task} {metric}", value, _at(report, "tasks", "teacher", task, metric), ".4f", "diff"))
    return rows


def _gflops(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def render_markdown(report: dict[str, Any], plots: list[str] = ()) -> str:
    model, teacher = report["model"]["name"], (report.get("teacher") or {}).get("name")
    lines = [f"# Evaluation of {model}", ""]
    lines.append(f"Teacher: {teacher or 'none'}. Device: {report['device']}. Data: {report['settings'].get('data') or '-'}.")
    lines.append(f"sparsify {report['versions'].get('sparsify-lm', '?')}, schema {SCHEMA} v{SCHEMA_VERSION}, {report['created']}.")
    lines.append("")
    lines += table_markdown(metric_rows(report), teacher is not None)
    if report.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in report["notes"])]
    for plot in plots:
        lines += ["", f"![{Path(plot).stem}]({Path(plot).name})"]
    for kind, describe in _routing_describers().items():
        summary = _at(report, "routing", kind)
        if summary and hasattr(describe, "routing_markdown"):
            lines += describe.routing_markdown(summary)
    return "\n".join(lines) + "\n"


def _routing_describers() -> dict[str, Any]:
    """Each variant's description module by the kind of routing summary it shows (torch-free)."""
    return {module.ROUTING_KIND: module for module in descriptions() if hasattr(module, "ROUTING_KIND")}


def table_markdown(rows: list[Row], with_teacher: bool, level: int = 2) -> list[str]:
    """Markdown tables, one per section under a heading of `level` (2 in report.md under its "#"
    title, 3 in the model card under its "## Evaluation")."""
    lines: list[str] = []
    for section in dict.fromkeys(row.section for row in rows):
        lines += ["", f"{'#' * level} {section.capitalize()}", ""]
        if with_teacher:
            lines += ["| metric | model | teacher | model vs teacher |", "|---|---:|---:|---:|"]
            lines += [f"| {r.label} | {r.show(r.model, 'model')} | {r.show(r.teacher, 'teacher')} | {r.show_change()} |"
                      for r in rows if r.section == section]
        else:
            lines += ["| metric | model |", "|---|---:|"]
            lines += [f"| {r.label} | {r.show(r.model, 'model')} |" for r in rows if r.section == section]
    return lines


def write_report(folder: Path, report: dict[str, Any], plots: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(folder / "report.md", render_markdown(report, [str(p) for p in plots]))


def load_report(path: Path) -> dict[str, Any]:
    file = path / "report.json" if path.is_dir() else path
    if not file.exists():
        raise SparsifyError(f"{path} has no report.json; make one with `sparsify eval ... -o {path}`")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise SparsifyError(f"{file} is not valid JSON ({error})") from error
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise SparsifyError(f"{file} is not a sparsify eval report")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise SparsifyError(
            f"{file} uses report schema v{report.get('schema_version')}, this sparsify reads v{SCHEMA_VERSION}; "
            "re-run `sparsify eval` to regenerate it"
        )
    return report


def embed_in_card(model_folder: Path, report: dict[str, Any], plots: Sequence[Path] = ()) -> Path:
    """Store the report with the model (report.json, report.md and its plots in MODEL/eval/, replaced
    whole) and show it in MODEL's README.md. A folder sparsify wrote gets its card re-rendered from
    its files, the report's tables and model-index included; any other folder gets the tables put
    (or replaced) between markers in its README.md."""
    from sparsify.atomic_output import atomic_folder
    from sparsify.model_card import EVAL_FOLDER, evaluation_section, refresh_card
    from sparsify.provenance import read_record

    with atomic_folder(model_folder / EVAL_FOLDER, overwrite=True) as staging:
        for plot in plots:
            shutil.copyfile(plot, staging / Path(plot).name)
        write_report(staging, report, [staging / Path(plot).name for plot in plots])
    if read_record(model_folder) is not None:
        return refresh_card(model_folder)
    card = model_folder / "README.md"
    text = card.read_text() if card.exists() else ""
    section = evaluation_section(report)
    if CARD_BEGIN in text and CARD_END in text:
        before, rest = text.split(CARD_BEGIN, 1)
        text = before + section + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    write_text_atomically(card, text)
    return card
