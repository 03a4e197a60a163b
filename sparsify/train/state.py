"""Resumable training state: adapters + routers, optimizer, scheduler, RNG and data position.

A checkpoint is one folder, replaced atomically, so a kill at any moment leaves either the previous
checkpoint or the new one. Resuming restores every piece, which makes the resumed loss curve
identical to an uninterrupted run.

The trainable parameters and the optimizer state are stored whole (unsharded, keyed by parameter
name) through torch.distributed.checkpoint's state-dict API, which gathers FSDP shards, strips DDP
wrappers and does nothing special for a plain model. A checkpoint is therefore the same file
whether it was written by one process, DDP or FSDP, and any of them can resume it.
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


FORMAT = 2  # 1: optimizer state keyed by position (before FSDP support)


def _whole() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


# Both gathers below are collective under FSDP: every process must call them. The result is
# complete on the main process (and, without a process group, on the only one).


def gather_trainable(model, names: set[str]) -> dict[str, torch.Tensor]:
    """Whole trainable parameters (adapters and routers), on CPU, keyed by parameter name.
    `names` filters out frozen weights the API still returns (an output head tied to the embedding)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v for k, v in get_model_state_dict(model, options=_whole()).items() if k in names}


def gather_optimizer(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_whole())


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict[str, Any], scheduler,
                    meta: dict[str, Any]) -> None:
    with atomic_folder(run_dir / CHECKPOINT, overwrite=True) as staging:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}, staging / "trainable.safetensors")
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_state(), staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, "format": FORMAT, **meta}, indent=2))


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder; if a kill fell between the two renames of a replacement, the retired one."""
    current = run_dir / CHECKPOINT
    if (current / "state.json").exists():
        return current
    retired = sorted(run_dir.glob(f".{CHECKPOINT}.old-*"), key=lambda p: p.stat().st_mtime)
    return retired[-1] if retired and (retired[-1] / "state.json").exists() else None


def load_checkpoint(folder: Path, model, optimizer, scheduler, trainable_names: set[str]) -> dict[str, Any]:
    """Restore a checkpoint into (possibly wrapped or sharded) `model` and its optimizer, on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format", 1) != FORMAT:
        raise SparsifyError(f"{folder} was written by an older sparsify; restart the run with --restart")
    trainable = load_file(folder / "trainable.safetensors")
    if set(trainable) != trainable_names:
        raise SparsifyError("the checkpoint's trainable parameters do not match this model and these --lora-* options")
    whole = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, trainable, options=whole)
    set_optimizer_state_dict(model, optimizer, torch.load(folder / "optimizer.pt", weights_only=False), options=whole)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    return meta


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
