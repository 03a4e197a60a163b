"""The run folder's memory: which stages finished, with which settings, so a re-run does only
what changed.

Each stage gets a fingerprint: its resolved settings, the recipe's model and output, the
fingerprint of the stage before it (so a changed stage changes every later one), the fingerprints
of inputs the run did not make (a folder's weight files by name, size and time), and the sparsify
version. A finished stage whose fingerprint matches is skipped; the first stage that must run
makes every later one run too; an interrupted resumable stage (training) with a matching
fingerprint continues from its checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sparsify.atomic_output import write_text_atomically
from sparsify.errors import SparsifyError

STATE_FILE = "state.json"
RECIPE_FILE = "recipe.yaml"
FORMAT = "sparsify-run/1"
# Files whose name, size and modification time stand for a model folder the run did not make.
_INPUT_FILES = ("config.json", "*.safetensors", "*.bin", "sparsify.json", "*.py")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunState:
    run_dir: Path
    recipe: str = ""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        path = run_dir / STATE_FILE
        if not path.exists():
            return cls(run_dir)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SparsifyError(f"{path} is not valid JSON ({error}); remove the run folder {run_dir} to start over") from error
        if data.get("format") != FORMAT:
            raise SparsifyError(f"{path} is not a sparsify run state; choose another run_dir or remove {run_dir}")
        return cls(run_dir, data.get("recipe", ""), data.get("stages", {}))

    def save(self) -> None:
        write_text_atomically(self.run_dir / STATE_FILE,
                              json.dumps({"format": FORMAT, "recipe": self.recipe, "stages": self.stages}, indent=2) + "\n")

    def started(self, section: str, fingerprint: str) -> None:
        self.stages[section] = {"status": "running", "fingerprint": fingerprint, "started": _now(),
                                "ran_before": self.stages.get(section, {}).get("ran_before", False)
                                or self.stages.get(section, {}).get("status") == "done"}
        self.save()

    def forget(self, sections: list[str]) -> None:
        for section in sections:
            self.stages.pop(section, None)
        self.save()

    def finished(self, section: str, summary: dict[str, Any], seconds: float) -> None:
        self.stages[section] = {**self.stages[section], "status": "done", "finished": _now(), "seconds": round(seconds, 1),
                                "summary": summary}
        self.save()


def folder_fingerprint(ref: str) -> str:
    """A cheap stand-in for a model's content: names, sizes and times of its weight and config files
    (a Hub id or an alias stands for itself; its revision is in the settings)."""
    from sparsify.sources import gguf_path

    try:
        gguf = gguf_path(ref)
    except SparsifyError:
        gguf = None
    path = gguf or Path(ref).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted({f for pattern in _INPUT_FILES for f in path.glob(pattern) if f.is_file()})
    elif glob.has_magic(str(path)):  # data files named by a pattern: the files it matches now
        files = sorted(Path(f) for f in glob.glob(str(path)))
    else:
        return ref
    return hashlib.sha256(json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()).hexdigest()[:16]


def stage_fingerprint(section: str, settings: dict[str, Any], header: dict[str, Any], previous: str | None,
                      inputs: list[str]) -> str:
    from sparsify import __version__

    payload = {"stage": section, "settings": settings, "model": header.get("model"), "output": header.get("output"),
               "previous": previous, "inputs": inputs, "sparsify": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
