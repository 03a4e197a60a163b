"""`sparsify skip-freeze`: write a skip model ready to serve, with its threshold and frozen gates.

After `skip-sweep` has shown which threshold and freeze rule give the wanted trade-off, this
measures every gate's skip rate at that threshold on calibration text (training text, not the
held-out text the sweep reported on), freezes the gates the rule picks (freezing.py)
and writes a new folder whose config carries both, so transformers (with or without sparsify
installed) and the decode engine serve exactly that model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sparsify.atomic_output import check_output_free
from sparsify.errors import SparsifyError
from sparsify.model_folder import save_model_folder
from sparsify.provenance import read_record
from sparsify.convert.skip.describe import SkipLayout, read_skip_config
from sparsify.convert.skip.freezing import FreezeRule, freeze_gates


@dataclass
class FrozenCopy:
    output: Path
    threshold: float
    calibration_tokens: int
    skip_rate: float  # on the calibration text, before freezing
    gates: list[dict[str, Any]]  # layer, sublayer, skip_rate, decision ("run", "skip" or "per token")


def write_frozen_copy(model_dir: str | Path, output: Path, rule: FreezeRule, calibration_data: str, *, threshold: float | None = None,
                      tokens: str = "64k", window: int = 512, batch_size: int = 4, overwrite: bool = False,
                      command: str | None = None) -> FrozenCopy:
    from sparsify.eval.options import EvalOptions
    from sparsify.eval.routing import measure_routing
    from sparsify.eval.run import eval_text
    from sparsify.sources import check_model_ref, load_model, load_tokenizer
    from sparsify.text_files import check_sources
    from sparsify.option_values import parse_count, parse_list

    model_dir = Path(model_dir)
    config = read_skip_config(model_dir, "skip-freeze")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise SparsifyError(f"--threshold must be between 0 and 1 (got {threshold})")
    if parse_count(tokens) < 1:
        raise SparsifyError(f"--tokens {tokens}: calibrate on at least one token (e.g. --tokens 64k)")
    check_sources(parse_list(calibration_data), "--data")
    check_model_ref(str(model_dir))  # truncated weights: one line, before loading
    check_output_free(output, overwrite)  # fail before the slow part
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32), load_tokenizer(str(model_dir))
    if threshold is not None:
        model.set_skip_threshold(threshold)
    model.freeze_gates({})
    text = eval_text(EvalOptions(data=calibration_data, tokens=tokens), tokenizer)
    skip = measure_routing(model, text, block=window, batch_size=batch_size, max_tokens=parse_count(tokens))["skip"]
    frozen = freeze_gates(model, skip["sublayers"], rule)
    naming = {True: "run", False: "skip"}
    gates = [{**row, "decision": naming.get(frozen.get(f"{row['layer']}.{row['sublayer']}"), "per token")} for row in skip["sublayers"]]
    record = read_record(model_dir) or {}
    counts = {"always_run": sum(frozen.values()), "always_skip": sum(not v for v in frozen.values()), "per_token": len(gates) - len(frozen)}
    record["serving"] = {"threshold": model.config.skip_threshold, "freeze": {"open_below": rule.open_below, "closed_above": rule.closed_above},
                         "calibration": {"data": calibration_data, "tokens": skip["tokens"], "skip_rate": skip["skip_rate"]},
                         "frozen": counts, "command": command,
                         # the card lists the commands in order; training runs are a list, this is not
                         "after_training_runs": len(record.get("training", []))}
    if record.get("layout"):  # what `sparsify info` and the model card show
        layout = replace(SkipLayout.from_record(record["layout"]), threshold=model.config.skip_threshold, frozen_gates=counts)
        record["layout"] = layout.to_record()
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)
    if dtype != torch.float32:  # back to the folder's dtype; the gates stay fp32, as the model class keeps them
        gate_state = {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith("gates.")}
        model.to(dtype)
        for name, value in gate_state.items():
            model.get_parameter(name).data = value
    save_model_folder(model, tokenizer, model_dir, output, record, overwrite=overwrite)
    return FrozenCopy(output, model.config.skip_threshold, skip["tokens"], skip["skip_rate"], gates)
