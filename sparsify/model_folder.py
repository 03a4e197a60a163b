"""Write a model folder the way every sparsify command does: weights, tokenizer, the files that
travel with the source folder (generation config, chat template, remote modeling code), and the
provenance record with its model card, all through one atomic rename."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsify.atomic_output import atomic_folder
from sparsify.info import count_params
from sparsify.model_card import render_card
from sparsify.provenance import write_record
from sparsify.skip import MODELING_FILE, SkipConfig, modeling_source


def save_model_folder(model, tokenizer, source_dir: Path, output: Path, record: dict[str, Any] | None, *, overwrite: bool = False) -> None:
    with atomic_folder(output, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Remote modeling code (skip models) travels with the weights, so the folder loads without sparsify.
        extra = ["generation_config.json", "chat_template.jinja", *(p.name for p in source_dir.glob("modeling_*.py"))]
        for name in extra:
            if (source_dir / name).exists() and not (staging / name).exists():
                (staging / name).write_bytes((source_dir / name).read_bytes())
        config = json.loads((staging / "config.json").read_text())
        if config.get("model_type") == SkipConfig.model_type:  # the code that reads frozen_gates etc., not the source's older copy
            (staging / MODELING_FILE).write_bytes(modeling_source())
        if record and record.get("variant"):
            write_record(staging, record)
            (staging / "README.md").write_text(render_card(record, count_params(staging, config)))
