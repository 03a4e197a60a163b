"""The `sparsify distill` pipeline, one phase per function: check the sparse model and the options;
measure its expert usage on calibration text; fold it into the dense student (kept in the run folder,
so a killed run resumes without redoing it); train the student against the sparse model with the
training loop; record what was done beside the weights (distill.json).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from sparsify.atomic_output import check_output_free, write_text_atomically
from sparsify.convert.calibration.runner import text_blocks
from sparsify.convert.distill.options import DistillOptions
from sparsify.convert.distill.student import check_parent, dense_family, expert_count_keys, folded_student, moe_model_types
from sparsify.convert.distill.usage import LayerUsage, measure_usage
from sparsify.errors import SparsifyError
from sparsify.provenance import read_record, versions

INIT_FOLDER = "student-init"  # inside the run folder
RECORD = "distill.json"  # beside the distilled weights, and in the student-init folder


@dataclass
class DistillResult:
    output: Path
    run_dir: Path
    init: str
    usage_tokens: int  # calibration tokens the expert usage was measured on (0: none needed, or reused)
    training: Any = None  # sparsify.train.loop.TrainResult, None with --tokens 0


def distill(model_dir: str | Path, output: str | Path, options: DistillOptions, training, *, run_dir: str | Path | None = None,
            resume: bool = False, restart: bool = False, command: str | None = None,
            on_status: Callable[[str], None] = lambda text: None, train_callbacks: dict[str, Callable] | None = None) -> DistillResult:
    """Fold the sparse model in `model_dir` into a dense student and train it (`training`: TrainOptions, or
    None to write the folded student as it is)."""
    model_dir, output = Path(model_dir), Path(output)
    from sparsify.train.loop import default_run_dir

    run_dir = Path(run_dir) if run_dir else default_run_dir(output)
    options.validate()
    config, record = check_distillable(model_dir)
    teacher = options.teacher or str(model_dir)
    if training is not None:
        training.validate()
    check_output_free(output, overwrite=False)
    _check_run_folder(run_dir, training, resume, restart)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name, ref in (("--teacher", options.teacher), ("--parent", options.parent if options.init == "parent" else "")):
        if ref:
            check_same_tokenizer(ref, tokenizer, name)
    init_dir = run_dir / INIT_FOLDER
    usage_tokens = 0
    settings = _init_settings(options, training)
    if init_dir.exists() and json.loads((init_dir / RECORD).read_text()).get("settings") == settings and not restart:
        on_status(f"reusing the folded student in {init_dir}")
    else:
        shutil.rmtree(init_dir, ignore_errors=True)
        usage_tokens = _fold(model_dir, config, record, options, training, tokenizer, init_dir, settings, on_status)
    merged = None
    if training is None:
        _copy_folder(init_dir, output)
        result = DistillResult(output, run_dir, options.init, usage_tokens)
    else:
        from sparsify.train.loop import train

        merged = replace(training, distillation=replace(training.distillation, **options.training_values(teacher)))
        trained = train(init_dir, merged, output=output, run_dir=run_dir, resume=resume, restart=restart, command=command,
                        **(train_callbacks or {}))
        result = DistillResult(output, run_dir, options.init, usage_tokens, trained)
    _write_record(result, model_dir, teacher, init_dir, merged.flat() if merged is not None else None, command)
    return result


def check_distillable(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config, record) of a sparse model `distill` can fold; refuses anything else with what to do."""
    from sparsify.checkpoint_reader import check_weight_files
    from sparsify.convert import recognised

    if not (model_dir / "config.json").exists():
        raise SparsifyError(f"{model_dir} is not a model folder (no config.json); sparsify distill takes an MoE folder, "
                            "e.g. one made by `sparsify upcycle --to moe`")
    check_weight_files(model_dir)
    config, record = json.loads((model_dir / "config.json").read_text()), read_record(model_dir)
    model_type = config.get("model_type")
    if model_type not in moe_model_types() and any(key in config for key in expert_count_keys()):
        dense_family(config, record)  # an MoE of a family sparsify has no dense mapping for: says so
    if model_type not in moe_model_types():
        variant = (record or {}).get("variant")
        if variant or recognised(config) is not None:
            raise SparsifyError(f"{model_dir} is a {variant or model_type} model, which has no routed experts to fold; sparsify distill "
                                f"folds MoE models ({', '.join(moe_model_types())}). A layer-skip model keeps every dense weight: "
                                "its dense parent is the source in its sparsify.json")
        raise SparsifyError(f"{model_dir} is a dense model already ({model_type}); sparsify distill folds a sparse model (an MoE: "
                            f"{', '.join(moe_model_types())}) back into a dense one. Upcycle it first: sparsify upcycle {model_dir} --to moe")
    dense_family(config, record)  # refuses an MoE whose dense family is unknown
    return config, record


def check_same_tokenizer(ref: str, tokenizer, flag: str) -> None:
    """Distillation compares distributions token by token: the vocabularies must be the same."""
    from sparsify.sources import load_tokenizer

    other = load_tokenizer(ref)
    if other.get_vocab() != tokenizer.get_vocab():
        raise SparsifyError(f"{flag} {ref} has another tokenizer ({len(other.get_vocab()):,} tokens against the sparse model's "
                            f"{len(tokenizer.get_vocab()):,}, or the same number mapped differently); give a model with the same tokenizer")


def _check_run_folder(run_dir: Path, training, resume: bool, restart: bool) -> None:
    from sparsify.train.state import find_checkpoint

    checkpoint = find_checkpoint(run_dir) if run_dir.exists() else None
    if training is not None and checkpoint and not (resume or restart):
        raise SparsifyError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --restart to start over")
    if resume and not checkpoint:
        raise SparsifyError(f"nothing to resume: no checkpoint in {run_dir}")


def _init_settings(options: DistillOptions, training) -> dict[str, Any]:
    """What the folded student depends on: reused on --resume only where these match."""
    calibration = list(options.calibration_sources or (training.data.train_sources if training is not None else ()))
    return {"init": options.init, "parent": options.parent, "calibration_data": calibration,
            "calibration_tokens": options.calibration_token_count, "calibration_seq_len": options.calibration_seq_len}


def _fold(model_dir: Path, config: dict[str, Any], record, options: DistillOptions, training, tokenizer, init_dir: Path,
          settings: dict[str, Any], on_status) -> int:
    """Measure the usage, fold, and write the student into `init_dir` (atomically); returns the calibration tokens."""
    from transformers import AutoModelForCausalLM

    from sparsify.model_folder import save_model_folder
    from sparsify.option_values import dtype_name

    dtype = getattr(torch, dtype_name(config.get("dtype") or config.get("torch_dtype") or "float32", "dtype", ("float32", "bfloat16", "float16")))
    usage: list[LayerUsage] | None = None
    tokens = 0
    if options.init == "parent":
        student = _parent(options, record, config, dtype)
    else:
        if not settings["calibration_data"]:
            raise SparsifyError("the expert usage is measured on text: pass --data (or --calibration-data)")
        sequences = text_blocks(settings["calibration_data"], tokenizer, options.calibration_token_count, options.calibration_seq_len,
                                training.data.text_field if training is not None else "text")
        tokens = sequences.numel()
        on_status("loading the sparse model")
        moe = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        moe.to(device)
        on_status(f"measuring expert usage on {tokens:,} calibration tokens")
        usage = measure_usage(moe, sequences, lambda done, total: on_status(f"measuring expert usage: {done}/{total} sequences"))
        on_status(f"folding the experts ({options.init})")
        student = folded_student(moe.cpu(), config, record, usage, options.init, dtype)
        del moe
    save_model_folder(student, tokenizer, model_dir, init_dir, None)
    usage_record = [layer.to_record() for layer in usage] if usage else None
    write_text_atomically(init_dir / RECORD, json.dumps({"settings": settings, "calibration_tokens": tokens, "usage": usage_record}, indent=1) + "\n")
    return tokens


def _parent(options: DistillOptions, record, config: dict[str, Any], dtype: torch.dtype):
    from sparsify.sources import load_model

    ref = options.parent or ((record or {}).get("source") or {}).get("path") or ((record or {}).get("source") or {}).get("ref")
    if not ref:
        raise SparsifyError("--init parent needs the dense parent: this folder's sparsify.json names none; pass --parent MODEL")
    try:
        parent = load_model(ref, dtype=torch.float32)
    except (OSError, SparsifyError) as error:
        raise SparsifyError(f"the dense parent {ref} could not be loaded ({error}); pass --parent MODEL") from error
    check_parent(parent, config)
    return parent.to(dtype)


def _copy_folder(source: Path, output: Path) -> None:
    from sparsify.atomic_output import atomic_folder

    with atomic_folder(output) as staging:
        for file in source.iterdir():
            if file.name != RECORD:
                shutil.copy2(file, staging / file.name)


def _write_record(result: DistillResult, model_dir: Path, teacher: str, init_dir: Path, options: dict[str, Any] | None,
                  command: str | None) -> None:
    """distill.json beside the weights: where they came from and how they were made."""
    folded = json.loads((init_dir / RECORD).read_text())
    training = result.training
    record = {
        "format": "sparsify-distill/1",
        "sparse_model": str(model_dir),
        "sparse_record_source": ((read_record(model_dir) or {}).get("source") or {}).get("ref"),
        "teacher": teacher,
        "init": {**folded["settings"], "calibration_tokens": folded["calibration_tokens"], "usage": folded["usage"]},
        "training": None if training is None else {
            "steps": training.steps, "tokens": training.tokens, "before": training.before, "after": training.after, "options": options,
        },
        "command": command,
        "versions": versions(),
    }
    write_text_atomically(result.output / RECORD, json.dumps(record, indent=1) + "\n")


__all__ = ["DistillResult", "check_distillable", "check_same_tokenizer", "distill"]
