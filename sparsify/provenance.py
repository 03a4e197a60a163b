"""`sparsify.json`: what a converted folder is and how it was made, so it can be reproduced."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT = "sparsify/1"
FILENAME = "sparsify.json"
_TRACKED = ("sparsify-lm", "torch", "transformers", "safetensors", "huggingface_hub", "gguf", "peft")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _TRACKED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def build_record(*, variant: str, source: dict[str, Any], options: Any, plan: Any, dtype: str, command: str | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "variant": variant,
        "source": source,
        "target": {"architecture": plan.config["architectures"][0], "model_type": plan.config["model_type"], "dtype": dtype},
        "options": asdict(options) if is_dataclass(options) else dict(options),
        "layout": plan.layout,
        "tags": plan.tags,
        "exact": {"expected": plan.exactness.exact, "reason": plan.exactness.reason},
        "command": command,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / FILENAME).write_text(json.dumps(record, indent=2) + "\n")


def read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / FILENAME
    return json.loads(path.read_text()) if path.exists() else None
