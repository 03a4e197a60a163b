"""Write a model folder the way every sparsify command does: weights, tokenizer, the files that
travel with the source folder (generation config, chat template, remote modeling code), and the
provenance record with its model card, all through one atomic rename."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsify.atomic_output import atomic_folder
from sparsify.convert import variant_of_record
from sparsify.info import count_params
from sparsify.model_card import render_card
from sparsify.provenance import fingerprint_weights, write_record


def write_record_and_card(folder: Path, record: dict[str, Any], config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """The last files of every folder sparsify writes, once the weights are final: sparsify.json
    with the weights' fingerprint, and README.md. Returns the record as written and the counts."""
    record = {**record, "weights": fingerprint_weights(folder)}
    params = count_params(folder, config)
    write_record(folder, record)
    (folder / "README.md").write_text(render_card(record, params, config))
    return record, params


def apply_umask(folder: Path) -> None:
    """Give every file the mode a plain open() gives under the user's umask (0644 under 022).

    safetensors writes its files 0600 (a private temporary file renamed into place), so folders
    saved through save_pretrained would differ from converted ones, and a shared model folder
    would be unreadable to its group. The mode is read off a probe file, not by setting the
    process umask, which would race with other threads creating files."""
    probe = folder / ".mode-probe"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)


def save_model_folder(model, tokenizer, source_dir: Path, output: Path, record: dict[str, Any] | None, *, overwrite: bool = False) -> None:
    variant = variant_of_record(record)
    with atomic_folder(output, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Remote modeling code (of a variant with its own architecture) travels with the weights, so
        # the folder loads without sparsify.
        extra = ["generation_config.json", "chat_template.jinja", *(p.name for p in source_dir.glob("modeling_*.py"))]
        for name in extra:
            if (source_dir / name).exists() and not (staging / name).exists():
                (staging / name).write_bytes((source_dir / name).read_bytes())
        config = json.loads((staging / "config.json").read_text())
        remote_code = variant.hook("remote_code") if variant is not None else None
        for name, content in (remote_code() if remote_code else {}).items():  # this version's code, not the source's older copy
            (staging / name).write_bytes(content)
        if record and record.get("variant"):
            write_record_and_card(staging, record, config)
        apply_umask(staging)
