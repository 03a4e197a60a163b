"""`sparsify.json`: what a converted folder is and how it was made, so it can be reproduced.

Besides the conversion's settings the record keeps a fingerprint of the weight files sparsify
wrote (size and sha256 per file): a claim that the model reproduces its teacher is only as good as
the knowledge that nobody changed the weights since, and `sparsify info` checks it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import struct
from collections import Counter
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import yaml

FORMAT = "sparsify/1"
FILENAME = "sparsify.json"
# The files whose content decides the logits: weights, the config (top-k, threshold, frozen gates)
# and remote modeling code. Fingerprinted when sparsify writes a folder, checked by `info`.
FINGERPRINTED = ("*.safetensors", "config.json", "*.py")
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
        "source": with_license(source),
        "target": {"architecture": plan.config["architectures"][0], "model_type": plan.config["model_type"], "dtype": dtype},
        "options": asdict(options) if is_dataclass(options) else dict(options),
        "layout": plan.layout.to_record(),
        "tags": plan.tags,
        "exact": {"expected": plan.exactness.exact, "reason": plan.exactness.reason},
        "command": command,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_record(folder: Path, record: dict[str, Any]) -> None:
    from sparsify.atomic_output import write_text_atomically

    # Atomic: the record is also rewritten in place in finished folders (a recipe stores itself there).
    write_text_atomically(folder / FILENAME, json.dumps(record, indent=2) + "\n")


def read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / FILENAME
    return json.loads(path.read_text()) if path.exists() else None


def source_reference(record: dict[str, Any] | None) -> str | None:
    """The model a recorded conversion was read from: the folder, if still there (a relative ref may not
    resolve from here); else what the user typed; None where the record names none."""
    source = (record or {}).get("source") or {}
    return source["path"] if source.get("kind") == "folder" and source.get("path") and Path(source["path"]).is_dir() else source.get("ref")


# --- the source's license ---------------------------------------------------------------------


def with_license(source: dict[str, Any]) -> dict[str, Any]:
    """`source` (as ModelSource.provenance() describes it) with the license its own metadata declares:
    "license" (a Hub identifier such as "apache-2.0") and, for `license: other`, "license_name" and
    "license_link". Read while the source is at hand, since a converted model inherits it; a source
    that declares none gets no key (the card then declares none: a license is never guessed)."""
    if "license" in source:
        return source
    if source.get("kind") == "gguf":
        found = {"license": (source.get("gguf") or {}).get("license")}
    else:
        found = card_license(_source_card(source))
    return {**source, **{key: value for key, value in found.items() if isinstance(value, str) and value}}


def card_license(readme: Path | None) -> dict[str, Any]:
    """license, license_name and license_link from a model card's YAML front matter ({} if none)."""
    from huggingface_hub.repocard import metadata_load

    if readme is None or not readme.is_file():
        return {}
    try:
        meta = metadata_load(readme) or {}
    except (ValueError, UnicodeDecodeError, yaml.YAMLError):  # a card whose header does not parse declares nothing
        return {}
    return {key: meta[key] for key in ("license", "license_name", "license_link") if isinstance(meta.get(key), str)}


def _source_card(source: dict[str, Any]) -> Path | None:
    """The README.md of a folder or Hub source. A Hub snapshot holds only the files conversion
    needs, so its card is fetched on its own (one small file, from the cache when offline)."""
    folder = Path(source["path"]) if source.get("path") else None
    if folder is not None and (folder / "README.md").is_file():
        return folder / "README.md"
    if source.get("kind") != "hub" or not source.get("hub_id"):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source["hub_id"], "README.md", revision=source.get("revision")))
    except Exception:  # no card on the Hub, offline without it cached, no network: the source declares nothing we can read
        return None


# --- weight fingerprints ----------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprinted(folder: Path) -> dict[str, Path]:
    return {file.name: file for pattern in FINGERPRINTED for file in sorted(folder.glob(pattern)) if file.is_file()}


def fingerprint_weights(folder: Path) -> dict[str, dict[str, Any]]:
    """Size, modification time and sha256 of every file that decides the logits (FINGERPRINTED)."""
    return {name: {"bytes": file.stat().st_size, "mtime_ns": file.stat().st_mtime_ns, "sha256": file_sha256(file)}
            for name, file in _fingerprinted(folder).items()}


def changed_weight_files(folder: Path, fingerprint: dict[str, dict[str, Any]]) -> list[str]:
    """Files added, removed or rewritten since `fingerprint` was taken. A file of the same size and
    modification time is taken as unchanged, so an untouched multi-GB folder is not re-read; any
    other file of the same size is re-hashed (a copied folder has new times but the same bytes)."""
    present = _fingerprinted(folder)
    # Removed files, and added weight shards; a config or code file the record does not list was
    # not fingerprinted (records from before they were), so it is not evidence of a change.
    changed = (set(fingerprint) - set(present)) | {name for name in set(present) - set(fingerprint) if name.endswith(".safetensors")}
    for name in set(present) & set(fingerprint):
        stat, recorded = present[name].stat(), fingerprint[name]
        if stat.st_size != recorded["bytes"]:
            changed.add(name)
        elif stat.st_mtime_ns != recorded.get("mtime_ns") and file_sha256(present[name]) != recorded["sha256"]:
            changed.add(name)
    return sorted(changed)


# --- GGUF sources -----------------------------------------------------------------------------

# GGUF metadata value types (gguf.GGUFValueType) of fixed size, as struct formats; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_value(handle: BinaryIO, kind: int, endian: str) -> Any:
    """Read one metadata value; arrays are skipped (returned as None) since only scalars are wanted."""
    def unpack(fmt: str) -> Any:
        return struct.unpack(endian + fmt, handle.read(struct.calcsize(fmt)))[0]

    if kind == 8:
        return handle.read(unpack("Q")).decode("utf-8", errors="replace")
    if kind == 9:
        item, count = unpack("I"), unpack("Q")
        if item in _GGUF_SCALARS:
            handle.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
        else:
            for _ in range(count):
                _gguf_value(handle, item, endian)
        return None
    return unpack(_GGUF_SCALARS[kind])


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int]]]:
    """Scalar metadata and (name, shape, ggml type) per tensor, from the file header alone.

    gguf.GGUFReader would also do, but it materialises every array field (the tokenizer's 49k
    tokens and merges) as numpy objects: 5 s for SmolLM2-135M, against milliseconds here."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = handle.read(4)
        endian = "<" if struct.unpack("<I", version)[0] < 0x10000 else ">"  # v3 allows big-endian files
        tensors, entries = struct.unpack(endian + "QQ", handle.read(16))
        fields: dict[str, Any] = {}
        for _ in range(entries):
            key = _gguf_value(handle, 8, endian)
            kind = struct.unpack(endian + "I", handle.read(4))[0]
            fields[key] = _gguf_value(handle, kind, endian)
        infos = []
        for _ in range(tensors):
            name = _gguf_value(handle, 8, endian)
            dims = struct.unpack(endian + "I", handle.read(4))[0]
            shape = struct.unpack(endian + "Q" * dims, handle.read(8 * dims))
            ggml_type, _offset = struct.unpack(endian + "IQ", handle.read(12))
            infos.append((name, shape, ggml_type))
    return {k: v for k, v in fields.items() if v is not None}, infos


def _enum_name(enum: Any, value: int) -> str:
    try:
        return enum(value).name
    except ValueError:  # a type newer than the installed gguf package
        return str(value)


def describe_gguf(path: Path, package: str | None = None) -> dict[str, Any]:
    """What a GGUF source file is: name, size, sha256 and how its weights are stored (e.g. Q4_1),
    plus the installed distribution that shipped it when it came from an alias."""
    import gguf

    fields, tensors = read_gguf_header(path)
    # The storage of the 2-D weights, which hold almost all parameters; llama.cpp keeps norms in F32
    # and often one tensor (the embedding) at higher precision, so take the most common type.
    matrix_types = Counter(_enum_name(gguf.GGMLQuantizationType, t) for _, shape, t in tensors if len(shape) == 2)
    file_type = fields.get("general.file_type")
    described = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "quantization": matrix_types.most_common(1)[0][0] if matrix_types else None,
        "file_type": _enum_name(gguf.LlamaFileType, file_type) if file_type is not None else None,
        "tensor_types": dict(matrix_types.most_common()),
    }
    if isinstance(fields.get("general.license"), str):  # llama.cpp's converter copies the Hub card's license here
        described["license"] = fields["general.license"]
    if package:
        try:
            described["package"] = {"name": package, "version": metadata.version(package)}
        except metadata.PackageNotFoundError:
            described["package"] = {"name": package, "version": None}
    return described
