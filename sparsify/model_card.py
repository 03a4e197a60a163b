"""The README.md model card of a converted model, with Hub metadata in its YAML header."""

from __future__ import annotations

from typing import Any

import yaml

from sparsify.info import layout_rows


def render_card(record: dict[str, Any], params: dict[str, int]) -> str:
    source, layout, exact = record["source"], record["layout"], record["exact"]
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if source.get("hub_id"):
        meta["base_model"] = source["hub_id"]
        meta["base_model_relation"] = "finetune"
    meta["tags"] = ["sparsify", *record.get("tags", [])]
    header = yaml.safe_dump(meta, sort_keys=False).strip()

    rows = [
        ("variant", f"`{record['variant']}`"),
        ("architecture", f"`{record['target']['architecture']}` (native transformers, no remote code)"),
        *layout_rows(layout),
        ("total parameters", f"{params['total']:,}"),
        ("active parameters per token", f"{params['active']:,}"),
        ("dtype", record["target"]["dtype"]),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    base = source.get("hub_id") or source["ref"]
    exact_line = (
        f"As converted, this model computes the same logits as `{base}` (up to float rounding): {exact['reason']}."
        if exact["expected"]
        else f"As converted, this model does **not** reproduce `{base}` exactly: {exact['reason']}. Train its routers before use."
    )
    for run in record.get("training", []):
        after, before = run["after"], run["before"]
        trained = "Skip gates" if "skip_rate" in after else "Routers"
        exact_line += (
            f"\n\n{trained} trained (LoRA + KL to the dense teacher) on {run['tokens']:,} tokens: held-out perplexity "
            f"{before['student_ppl']:.2f} -> {after['student_ppl']:.2f} (teacher {after['teacher_ppl']:.2f}), "
            f"KL to teacher {after['kl']:.4f}, top-1 agreement {after['top1_agreement']:.1%}"
            + (f", skip rate {after['skip_rate']:.1%} of sublayer computations." if "skip_rate" in after else ".")
        )
    return f"""---
{header}
---

# {record['variant']} upcycle of {base}

Converted from the dense `{base}` by [sparsify](https://pypi.org/project/sparsify-lm/) (`{record['variant']}`).

{table}

{exact_line}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/or/repo")
tokenizer = AutoTokenizer.from_pretrained("path/or/repo")
```

## How it was made

```
{record.get('command') or '(library call)'}
```

`sparsify.json` in this folder records the source, every option and the library versions.
"""
