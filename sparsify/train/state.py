"""Resumable training state: adapters + routers, optimizer, scheduler, RNG and data position.

A checkpoint is one folder, replaced atomically, so a kill at any moment leaves either the previous
checkpoint or the new one. Resuming restores every piece, which makes the resumed loss curve
identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sparsify.atomic_output import atomic_folder
from sparsify.errors import SparsifyError

CHECKPOINT = "checkpoint"
LOG = "log.jsonl"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler, meta: dict[str, Any]) -> None:
    with atomic_folder(run_dir / CHECKPOINT, overwrite=True) as staging:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}, staging / "trainable.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_state(), staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder; if a kill fell between the two renames of a replacement, the retired one."""
    current = run_dir / CHECKPOINT
    if (current / "state.json").exists():
        return current
    retired = sorted(run_dir.glob(f".{CHECKPOINT}.old-*"), key=lambda p: p.stat().st_mtime)
    return retired[-1] if retired and (retired[-1] / "state.json").exists() else None


def load_checkpoint(folder: Path, optimizer, scheduler) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = json.loads((folder / "state.json").read_text())
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    return meta, load_file(folder / "trainable.safetensors")


def check_same_run(saved: dict[str, Any], current: dict[str, Any], ignore: set[str]) -> None:
    changed = sorted(k for k in current if k not in ignore and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise SparsifyError(f"cannot resume: options changed since the checkpoint ({details}); use the same options or --restart")


class StepLog:
    """JSON lines, one per step or evaluation; on resume, entries after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        if keep_through_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_through_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._handle = open(path, "a")

    def write(self, entry: dict[str, Any]) -> None:
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
