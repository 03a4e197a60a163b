"""The README.md model card of a converted model, with Hub metadata in its YAML header."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sparsify.convert import VARIANTS
from sparsify.info import layout_rows, teacher_verdict

# GGUF storage types that keep full floats; any other type (Q4_1, Q8_0, ...) is a quantisation.
FLOAT_GGUF_TYPES = {"F32", "F16", "BF16", "F64"}
VERDICT_LINES = {
    "yes": "**Reproduces its teacher now: yes.** It computes the same logits as `{name}` (up to float rounding): {reason}.",
    "no": "**Reproduces its teacher now: no**: {reason}.",
    "unknown": "**Reproduces its teacher now: unknown**: {reason}.",
}


def _quantisation(source: dict[str, Any]) -> str | None:
    """The quantisation of a GGUF source's weights (e.g. "Q4_1"), None for a float or non-GGUF source."""
    quantisation = (source.get("gguf") or {}).get("quantization")
    return quantisation if quantisation and quantisation not in FLOAT_GGUF_TYPES else None


def _hub_metadata(source: dict[str, Any]) -> dict[str, Any]:
    if not source.get("hub_id"):
        return {}
    # The Hub knows four relations (adapter, merge, quantized, finetune). A model converted from a
    # quantised GGUF carries that file's quantisation error, not the Hub weights' precision:
    # "finetune" would present the full-precision model as its starting point.
    return {"base_model": source["hub_id"], "base_model_relation": "quantized" if _quantisation(source) else "finetune"}


def source_name(source: dict[str, Any]) -> str:
    """What the weights were read from: the GGUF file itself when there was one, else the Hub id or folder."""
    if source.get("kind") == "gguf":
        return Path(source["path"]).name
    return source.get("hub_id") or source["ref"]


def _hub_link(hub_id: str) -> str:
    return f"[`{hub_id}`](https://huggingface.co/{hub_id})"


def _folder_source_text(source: dict[str, Any]) -> str:
    if not source.get("hub_id"):
        return f"Converted from the local folder `{source['ref']}`."
    revision = f" at revision `{source['revision']}`" if source.get("revision") else ""
    return f"Converted from {_hub_link(source['hub_id'])}{revision}."


def _gguf_source_text(source: dict[str, Any]) -> str:
    gguf, quantisation = source.get("gguf") or {}, _quantisation(source)
    storage = f"{quantisation} weights dequantised to float32" if quantisation else f"{gguf.get('quantization') or 'its'} weights"
    package = gguf.get("package")
    shipped = (f", the file behind the alias `{source['ref']}`, from the Python package `{package['name']}` {package['version'] or ''}".rstrip()
               if package else "")
    digest = f" (sha256 `{gguf['sha256'][:16]}…`)" if gguf.get("sha256") else ""
    text = f"Converted from the GGUF file `{source_name(source)}` ({storage}){shipped}{digest}."
    if not source.get("hub_id"):
        return text
    if not quantisation:
        return f"{text} That file is a GGUF export of {_hub_link(source['hub_id'])}."
    return (f"{text} That file is a {quantisation} quantisation of {_hub_link(source['hub_id'])}: this model starts from its "
            "quantised weights, not from the Hub model's.")


SOURCE_TEXTS = {"gguf": _gguf_source_text, "folder": _folder_source_text, "hub": _folder_source_text}


def _remote_code_files(config: dict[str, Any]) -> list[str]:
    """The modeling files a folder's config sends transformers to (auto_map), e.g. ["modeling_skip.py"]."""
    return sorted({f"{target.split('.')[0]}.py" for target in (config.get("auto_map") or {}).values()})


def _architecture(record: dict[str, Any], remote: list[str]) -> str:
    name = f"`{record['target']['architecture']}`"
    if not remote:
        return f"{name} (native transformers, no remote code)"
    return f"{name} (code in {', '.join(f'`{f}`' for f in remote)} in this folder: load with `trust_remote_code=True`, or `import sparsify` first)"


def _training_text(record: dict[str, Any]) -> str:
    variant = VARIANTS.get(record.get("variant", ""))
    trained = (variant.decides if variant is not None else "routers").capitalize()
    metrics = variant.heldout_metrics if variant is not None else ()
    paragraphs = []
    for run in record.get("training", []):
        after, before = run["after"], run["before"]
        extra = "".join(f", {m.label} {format(after[m.key], m.format)}" + (f" of {m.share_of}" if m.share_of else "")
                        for m in metrics if m.key in after)
        paragraphs.append(
            f"{trained} trained (LoRA + KL to the dense teacher) on {run['tokens']:,} tokens: held-out perplexity "
            f"{before['student_ppl']:.2f} -> {after['student_ppl']:.2f} (teacher {after['teacher_ppl']:.2f}), "
            f"KL to teacher {after['kl']:.4f}, top-1 agreement {after['top1_agreement']:.1%}{extra}."
        )
    return "".join(f"\n\n{p}" for p in paragraphs)


def commands(record: dict[str, Any]) -> list[str]:
    """Every command that made the folder, in order: upcycle, training runs, skip-freeze."""
    runs = [("train", run.get("command")) for run in record.get("training", [])]
    serving = record.get("serving")
    # skip-freeze notes how many training runs came before it; older records: it came last.
    before = serving.get("after_training_runs", len(runs)) if serving else len(runs)
    steps = [("upcycle", record.get("command")), *runs[:before], *([("skip-freeze", serving.get("command"))] if serving else []), *runs[before:]]
    return [command or f"# sparsify {step}: called from Python, no command line recorded" for step, command in steps]


def render_card(record: dict[str, Any], params: dict[str, int], config: dict[str, Any]) -> str:
    """The card of a folder sparsify wrote, from its record, its parameter counts and its config.json."""
    source = record["source"]
    remote = _remote_code_files(config)
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", **_hub_metadata(source)}
    meta["tags"] = ["sparsify", *record.get("tags", []), *(["custom_code"] if remote else [])]
    header = yaml.safe_dump(meta, sort_keys=False).strip()

    rows = [
        ("variant", f"`{record['variant']}`"),
        ("architecture", _architecture(record, remote)),
        *layout_rows(record["variant"], record["layout"]),
        ("total parameters", f"{params['total']:,}"),
        ("active parameters per token", f"{params['active']:,}"),
        ("dtype", record["target"]["dtype"]),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    name = source_name(source)
    # Written together with the weights' fingerprint, so there is nothing on disk to check yet.
    verdict = teacher_verdict(record)
    verdict_line = VERDICT_LINES[verdict.state].format(name=name, reason=verdict.reason)
    load_options = ", trust_remote_code=True" if remote else ""
    steps = "\n".join(commands(record))
    return f"""---
{header}
---

# {record['variant']} upcycle of {name}

{SOURCE_TEXTS[source['kind']](source)} Made by [sparsify](https://pypi.org/project/sparsify-lm/) (`{record['variant']}`).

{table}

{verdict_line}{_training_text(record)}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/or/repo"{load_options})
tokenizer = AutoTokenizer.from_pretrained("path/or/repo")
```

## How it was made

```
{steps}
```

`sparsify.json` in this folder records the source, every option, the library versions and a
fingerprint (size, sha256) of the weights, config and modeling code as sparsify wrote them.
"""
