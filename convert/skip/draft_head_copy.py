"""`sparsify draft-head`: train a draft head (draft_head.py) on training text and write a copy of the
model that carries it in draft_head/.

The model's own files are copied byte for byte (sparsify.json and the card are rewritten for a
sparsify model, to record the head); `generate --speculative` and `eval --decode-engine speculative`
then draft with the head. Fit and score windows both come from the training text, packed, the score
windows being the last ones read (never the held-out or other-domain text a report scores). With
`fit_on="teacher"` each fit window's second half is replaced by the teacher's greedy continuation of
its first half (on a GPU this costs a few graph decode steps per window; on CPU it is slow).
Checkpoints go to a run folder beside the output (`.NAME.draft-head-run`), so a killed run resumes
when the same command is given again, and the folder is removed once the copy is written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sparsify.atomic_output import atomic_folder
from sparsify.convert.skip.draft_copy import check_copy_target, copy_model_folder
from sparsify.convert.skip.draft_head import DRAFT_HEAD_FOLDER, DraftHead, check_feature_layers
from sparsify.convert.skip.draft_head_training import DraftHeadFit, DraftHeadOptions, fit_draft_head
from sparsify.errors import SparsifyError


@dataclass
class DraftHeadCopy:
    output: Path
    fit: DraftHeadFit
    device: str


def run_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.draft-head-run"


FIT_SOURCES = ("corpus", "teacher")


def teacher_text(model, windows, options: DraftHeadOptions, device) -> "torch.Tensor":
    """Each window's first half followed by the teacher's greedy continuation of it, as long as the
    window: the text the head meets when it drafts (self-distillation, as Medusa-2 and EAGLE train)."""
    import torch

    from sparsify.convert.skip.draft_search import teacher_continuations

    half = options.window_len // 2
    batch = max(options.batch_size, 32)  # generation wants wide batches; one decoder serves every full one
    prompts = [windows[i: i + batch, :half].to(device) for i in range(0, len(windows), batch)]
    return torch.cat([ids.cpu() for ids in teacher_continuations(model, prompts, options.window_len - half)])


def write_draft_head_copy(model_dir: str | Path, output: Path, data: str, options: DraftHeadOptions, *, device: str = "auto",
                          fit_on: str = "corpus", overwrite: bool = False, command: str | None = None,
                          on_step: Callable[[int, int, float], None] = lambda step, total, loss: None) -> DraftHeadCopy:
    import torch

    from sparsify.convert.calibration.runner import text_blocks
    from sparsify.eval.run import resolve_device
    from sparsify.model_folder import write_record_and_card
    from sparsify.option_values import parse_list
    from sparsify.provenance import read_record
    from sparsify.sources import check_model_ref, load_model, load_tokenizer
    from sparsify.text_files import check_sources

    model_dir = Path(model_dir)
    if fit_on not in FIT_SOURCES:
        raise SparsifyError(f"--fit-on must be one of {', '.join(FIT_SOURCES)}, got '{fit_on}'")
    if not model_dir.is_dir():
        raise SparsifyError(f"draft-head writes a copy of a model folder, and {model_dir} is not one; convert it first "
                            f"(e.g. `sparsify upcycle {model_dir} --to skip -o skip`)")
    check_model_ref(str(model_dir))
    options.check()
    check_sources(parse_list(data), "--data")
    check_copy_target(model_dir, output, overwrite)
    import json

    layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers")
    if layers:  # before the slow part (the head checks again when built)
        check_feature_layers(options.feature_layers, layers)
    if (model_dir / DRAFT_HEAD_FOLDER).exists():
        raise SparsifyError(f"{model_dir} already carries a draft head; start from the folder without one")
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model = load_model(str(model_dir), dtype=dtype).to(target).eval()
    model.requires_grad_(False)
    wanted = options.steps * options.batch_size + options.score_windows
    try:
        blocks = text_blocks(parse_list(data), load_tokenizer(str(model_dir)), wanted * options.window_len, options.window_len)
    except SparsifyError:  # its message names the calibration flags
        raise SparsifyError(f"--data holds less than one --window-len window ({options.window_len} tokens) outside the held-out "
                            "bucket; give more training text or a shorter --window-len") from None
    if len(blocks) < options.score_windows + options.batch_size:
        raise SparsifyError(f"--data holds {len(blocks)} windows of {options.window_len} tokens outside the held-out bucket; "
                            f"the head needs at least {options.score_windows + options.batch_size}: give more training text")
    fit, tune = blocks[: -options.score_windows], blocks[-options.score_windows:]
    if fit_on == "teacher":
        fit = teacher_text(model, fit, options, target)
    head = DraftHead(model, feature_layers=list(options.feature_layers))
    run_dir = run_folder(output)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit_draft_head(head, model, fit, tune, options, run_dir=run_dir, on_step=on_step,
                            run_key={"model": str(model_dir.resolve()), "data": data, "device": target.type, "fit_on": fit_on})
    head.config.training = {**result.record(), "data": data, "fit_on": fit_on, "window_len": options.window_len, "depth": options.depth,
                            "device": target.type, "command": command}
    record = read_record(model_dir) or {}
    with atomic_folder(output, overwrite=overwrite) as staging:
        copy_model_folder(model_dir, staging, ("sparsify.json", "README.md") if record.get("variant") else ())
        head.save(staging / DRAFT_HEAD_FOLDER)
        if record.get("variant"):
            record["draft_head"] = {key: value for key, value in head.config.training.items() if key != "loss_by_tenth"}
            write_record_and_card(staging, record, json.loads((model_dir / "config.json").read_text()))
    shutil.rmtree(run_dir, ignore_errors=True)
    return DraftHeadCopy(output, result, target.type)
