"""`sparsify draft-plan`: search a static draft plan for self-speculative decoding on tune text and
write a copy of the skip model that carries it.

The weights are copied byte for byte; only config.json (`draft_plan`, read by `sparsify generate
--speculative` and `sparsify eval --decode-engine speculative`) and sparsify.json (the search: tune
tokens, the agreement curve) change. The search runs on training text (convert/skip/draft_search.py):
never on the held-out text a report scores.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sparsify.atomic_output import atomic_folder, check_output_free
from sparsify.convert.skip.describe import read_skip_config
from sparsify.convert.skip.draft_plan import DraftPlan
from sparsify.errors import SparsifyError


@dataclass
class DraftPlanCopy:
    output: Path
    plan: DraftPlan
    gated_sublayers: int
    curve: list[dict[str, Any]]  # agreement and KL on the tune text after each sublayer dropped
    tune_tokens: int  # the tokens scored
    scored_on: str  # tune text, or the teacher's continuations of it (on_policy)


def copy_model_folder(model_dir: Path, staging: Path, rewritten: tuple[str, ...]) -> None:
    """Every file and folder of `model_dir` into `staging` byte for byte, except those the caller rewrites."""
    for item in model_dir.iterdir():
        if item.name not in rewritten:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)


def check_copy_target(model_dir: Path, output: Path, overwrite: bool) -> None:
    check_output_free(output, overwrite)  # fail before the slow part
    if output.resolve().is_relative_to(model_dir.resolve()):
        raise SparsifyError(f"-o {output} lies inside the model folder {model_dir}; write the copy somewhere else")


def write_draft_plan_copy(model_dir: str | Path, output: Path, data: str, *, share: float, windows: int = 16, window_len: int = 256,
                          batch_size: int = 4, device: str = "auto", overwrite: bool = False, command: str | None = None,
                          on_policy: int = 0, on_progress: Callable[[int, int], None] = lambda done, total: None) -> DraftPlanCopy:
    """`on_policy` > 0: each window is a prompt the teacher continues greedily by that many tokens, and
    only the teacher's tokens are scored (draft_search.py: the text a draft meets when it decodes)."""
    import torch

    from sparsify.convert.calibration.runner import text_blocks
    from sparsify.convert.skip.draft_search import search_draft_plan, teacher_continuations
    from sparsify.eval.run import resolve_device
    from sparsify.model_folder import write_record_and_card
    from sparsify.option_values import parse_list
    from sparsify.provenance import read_record
    from sparsify.sources import check_model_ref, load_model, load_tokenizer
    from sparsify.text_files import check_sources

    model_dir = Path(model_dir)
    config = read_skip_config(model_dir, "draft-plan")
    if not 0.0 < share <= 1.0:
        raise SparsifyError(f"--share must be in (0, 1]: the share of gated sublayers every draft token skips, got {share}")
    if windows < 1 or window_len < 2:
        raise SparsifyError("--windows must be at least 1 and --window-len at least 2")
    if on_policy < 0:
        raise SparsifyError(f"--on-policy is a number of tokens the teacher continues each window by (0: off), got {on_policy}")
    check_sources(parse_list(data), "--data")
    check_model_ref(str(model_dir))
    check_copy_target(model_dir, output, overwrite)
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model = load_model(str(model_dir), dtype=dtype).to(target).eval()
    blocks = text_blocks(parse_list(data), load_tokenizer(str(model_dir)), windows * window_len, window_len)
    if len(blocks) == 0:
        raise SparsifyError(f"--data holds fewer than {window_len} tokens outside the held-out bucket; give more training text")
    batches = [blocks[i:i + batch_size].to(target) for i in range(0, len(blocks), batch_size)]
    scored_from = 0
    if on_policy:
        batches = teacher_continuations(model, batches, on_policy)
        scored_from = window_len - 1  # the last prompt position predicts the teacher's first token
    search = search_draft_plan(model, batches, share, progress=on_progress, scored_from=scored_from)
    plan = search.plan_for(share)
    record = read_record(model_dir) or {}
    record["draft_plan"] = {**plan.to_config(), "data": data, "on_policy_tokens": on_policy, "curve": search.curve(), "command": command,
                            "after_training_runs": len(record.get("training", []))}
    with atomic_folder(output, overwrite=overwrite) as staging:
        copy_model_folder(model_dir, staging, ("config.json", "sparsify.json", "README.md") if record.get("variant") else ("config.json",))
        config["draft_plan"] = plan.to_config()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if record.get("variant"):
            write_record_and_card(staging, record, config)
    return DraftPlanCopy(output, plan, search.gated_sublayers, search.curve(), search.tune_tokens, search.scored_on)
