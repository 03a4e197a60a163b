"""Downstream tasks through EleutherAI's lm-evaluation-harness, on the model already in memory.

The harness gets the loaded model object (no re-loading by name, so a converted model is scored
exactly as evaluated elsewhere in the report). Tasks are the harness's own, any folder of task
YAML files given with --tasks-path, and the tiny tasks shipped in eval/tasks/ that run offline.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparsify.errors import SparsifyError

SHIPPED = Path(__file__).parent / "tasks"
NOT_METRICS = {"sample_len", "sample_count"}  # bookkeeping numbers the harness puts among the results


def _shipped_task_folder(into: Path) -> Path:
    """The shipped task YAMLs with their data files' absolute paths filled in."""
    for template in SHIPPED.glob("*.yaml"):
        data_file = SHIPPED / f"{template.stem}.jsonl"
        (into / template.name).write_text(template.read_text().replace("@DATA_FILE@", str(data_file)))
    return into


def run_tasks(model, tokenizer, names: list[str], *, task_paths: list[str], batch_size: int, limit: int | None,
              num_fewshot: int | None) -> dict[str, dict[str, float]]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise SparsifyError("the tasks suite needs lm-evaluation-harness: pip install 'sparsify-lm[tasks]'") from error
    for path in task_paths:
        if not Path(path).is_dir():
            raise SparsifyError(f"--tasks-path {path} is not a folder of task YAML files")
    with tempfile.TemporaryDirectory(prefix="sparsify-tasks-") as scratch:
        manager = TaskManager(include_path=[str(_shipped_task_folder(Path(scratch))), *task_paths])
        unknown = [name for name in names if name not in manager.all_tasks]
        if unknown:
            raise SparsifyError(
                f"task(s) not found: {', '.join(unknown)}. Shipped offline tasks: "
                f"{', '.join(p.stem for p in SHIPPED.glob('*.yaml'))}; add a folder of task YAMLs with --tasks-path"
            )
        with _quiet_stderr(Path(scratch) / "harness.log") as log:
            harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            try:
                output = simple_evaluate(model=harness_model, tasks=names, task_manager=manager, limit=limit,
                                         num_fewshot=num_fewshot, log_samples=False)
            except (ConnectionError, OSError, ValueError) as error:
                raise SparsifyError(
                    f"a task's data could not be loaded ({type(error).__name__}: {str(error)[:300]}). Offline, only tasks "
                    "whose data is on disk run: point a task YAML at local files and pass its folder with --tasks-path. "
                    f"Harness output: {log.read_text()[-500:]!r}"
                ) from error
    return {task: _metrics(values) for task, values in output["results"].items()}


@contextlib.contextmanager
def _quiet_stderr(log: Path) -> Iterator[Path]:
    """The harness writes progress bars and `git` complaints straight to file descriptor 2 (also
    from subprocesses); keep them in a log that errors quote, and the terminal for sparsify."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "w") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """{'acc,none': .5, 'acc_stderr,none': .1, 'alias': ...} -> {'acc': .5, 'acc_stderr': .1}."""
    cleaned = {}
    for key, value in values.items():
        name = key.split(",")[0]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in NOT_METRICS:
            cleaned[name] = float(value)
    return cleaned
