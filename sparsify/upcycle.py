"""The library entry point behind `sparsify upcycle`: dense checkpoint in, converted folder out."""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sparsify.atomic_output import atomic_folder, check_disk_space, check_output_free
from sparsify.checkpoint_writer import DEFAULT_MAX_SHARD_BYTES, write_checkpoint
from sparsify.convert import build_options, get_variant
from sparsify.convert.base import ConversionPlan
from sparsify.model_folder import apply_umask, write_record_and_card
from sparsify.option_values import dtype_name, torch_dtype
from sparsify.provenance import build_record
from sparsify.sources import ModelSource, open_source



@dataclass
class UpcycleResult:
    output: Path
    plan: ConversionPlan
    record: dict[str, Any]
    params: dict[str, int]
    seconds: float


def resolve_dtype(name: str, source: ModelSource) -> torch.dtype:
    if dtype_name(name) == "auto":
        floating = [source.tensors.dtype(n) for n in source.tensors.names() if source.tensors.dtype(n).is_floating_point]
        return floating[0] if floating else torch.float32
    return torch_dtype(dtype_name(name))


def upcycle(
    model: str,
    to: str,
    output: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    command: str | None = None,
    recipe: dict[str, Any] | None = None,
    on_plan: Callable[[ConversionPlan], None] = lambda plan: None,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_progress: Callable[[str, int, int], None] = lambda stage, done, total: None,
    **options: Any,
) -> UpcycleResult:
    """Convert `model` (alias, folder, .gguf or Hub id) into variant `to`; options are its option fields."""
    started = time.perf_counter()
    variant = get_variant(to)
    opts = build_options(variant, options)
    output = Path(output)
    check_output_free(output, overwrite)  # fail before the (possibly slow) model load
    dtype_name(dtype)  # a bad --dtype is refused before the source is opened
    source = open_source(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, revision=revision)
    out_dtype = resolve_dtype(dtype, source)
    make_plan = variant.hook("plan")
    # A plugin variant's plan may predate progress reporting (then it reports none).
    progress = {"on_progress": on_progress} if "on_progress" in inspect.signature(make_plan).parameters else {}
    plan = make_plan(source, opts, out_dtype, **progress)
    record, params = write_conversion(source, plan, variant.name, opts, output, out_dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                                      command=command, recipe=recipe, on_plan=on_plan, on_bytes=on_bytes)
    return UpcycleResult(output, plan, record, params, time.perf_counter() - started)


def write_conversion(source: ModelSource, plan: ConversionPlan, variant: str, options: Any, output: Path, dtype: torch.dtype, *,
                     overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, command: str | None = None,
                     recipe: dict[str, Any] | None = None, on_plan: Callable[[ConversionPlan], None] = lambda plan: None,
                     on_bytes: Callable[[int], None] = lambda n: None) -> tuple[dict[str, Any], dict[str, int]]:
    """Write a planned conversion as a model folder, atomically: weights, config, the source's tokenizer
    and other sidecars, the plan's extra files, sparsify.json and the model card. Returns (record, parameter counts)."""
    check_disk_space(output, plan.nbytes)
    on_plan(plan)
    record = build_record(
        variant=variant,
        source=source.provenance(),
        options=options,
        plan=plan,
        dtype=str(dtype).removeprefix("torch."),
        command=command,
    )
    if recipe is not None:  # the resolved recipe of `sparsify run`: provenance, and the card shows it
        record["recipe"] = recipe
    with atomic_folder(output, overwrite) as staging:
        write_checkpoint(staging, plan.tensors, max_shard_bytes=max_shard_bytes, on_bytes=on_bytes)
        (staging / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        source.write_sidecars(staging)
        for name, content in plan.files.items():
            (staging / name).write_bytes(content)
        record, params = write_record_and_card(staging, record, plan.config)
        apply_umask(staging)
    return record, params
