"""Several eval reports side by side: the model figures of each, one row per metric, sections in
the order they first appear. `sparsify compare` prints it; an evaluation recipe writes it as
markdown next to the reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsify.eval.report import metric_rows


@dataclass
class CompareTable:
    names: list[str]  # one column per report: the model's name
    sections: list[tuple[str, list[tuple[str, list[str]]]]]  # (section, [(metric, cells per report)])


def compare_table(reports: list[dict[str, Any]]) -> CompareTable:
    columns = [{(row.section, row.label): row.show(row.model) for row in metric_rows(report)} for report in reports]
    keys = list(dict.fromkeys(key for column in columns for key in column))
    sections = list(dict.fromkeys(section for section, _ in keys))
    return CompareTable(
        names=[report["model"]["name"] for report in reports],
        sections=[(section, [(label, [column.get((section, label), "-") for column in columns])
                             for s, label in keys if s == section]) for section in sections],
    )


def compare_markdown(reports: list[dict[str, Any]], paths: list[str], title: str = "sparsify compare") -> str:
    table = compare_table(reports)
    teachers = sorted({(report.get("teacher") or {}).get("name") or "none" for report in reports})
    data = sorted({report.get("settings", {}).get("data", "") for report in reports} - {""})
    lines = [f"# {title}", "", f"Teacher: {', '.join(teachers)}." + (f" Text: {', '.join(data)}." if data else ""), "",
             "| metric | " + " | ".join(f"{name} (`{path}`)" for name, path in zip(table.names, paths, strict=True)) + " |",
             "|---|" + "---:|" * len(table.names)]
    for section, rows in table.sections:
        lines.append(f"| **{section}** |" + " |" * len(table.names))
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n\n"
