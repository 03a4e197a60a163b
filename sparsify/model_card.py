"""The README.md model card of a converted model: Hub metadata in its YAML header, then what the
model is, whether it reproduces its teacher, how it measured and how it was made.

A card is drawn from the folder's own files only (sparsify.json, config.json, the weight headers,
eval/report.json), never from the environment: re-rendering it (`refresh_card`, which the push
command calls with the repo id) gives the same card, and no access token can reach it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from sparsify.atomic_output import write_text_atomically
from sparsify.convert import VARIANTS
from sparsify.eval.report import CARD_BEGIN, CARD_END, load_report, metric_rows, table_markdown
from sparsify.info import count_params, layout_rows, teacher_verdict
from sparsify.option_values import parse_list
from sparsify.provenance import read_record
from sparsify.text_files import LOADERS, local_files

# Where a model folder keeps the report of `sparsify eval MODEL --card` (report.json, report.md, plots).
EVAL_FOLDER = "eval"
# Under EVAL_FOLDER: the report on text of another domain (quality only), when the recipe measured one.
OTHER_DOMAIN = "other-domain"
# GGUF storage types that keep full floats; any other type (Q4_1, Q8_0, ...) is a quantisation.
FLOAT_GGUF_TYPES = {"F32", "F16", "BF16", "F64"}
VERDICT_LINES = {
    "yes": "**Reproduces its teacher now: yes.** It computes the same logits as `{name}` (up to float rounding): {reason}.",
    "no": "**Reproduces its teacher now: no**: {reason}.",
    "unknown": "**Reproduces its teacher now: unknown**: {reason}.",
}

# --- the Hub's metadata rules, as data ----------------------------------------------------------

# The relations the Hub's model tree knows (hub-docs, docs/hub/model-cards.md, "Specifying a base
# model"; ../shared/notes/hub-and-recipes.md). Only "merge" has several parents.
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
# License identifiers of the Hub, from the table in huggingface/hub-docs docs/hub/repositories-licenses.md
# (commit 008d54d08fd9d5d05ed2840bebb0b61111326a15). The Hub adds identifiers from time to time: a source
# license missing here is still inherited as is, and card_metadata_problems names it so the list gets updated.
# llama3 to llama3.3 were added to the Hub's list later (huggingface/hub-docs pull request 1619).
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
    cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
    cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
    cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
    lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense
    zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 gemma unknown other
""".split())
# Hugging Face access tokens ("hf_" + 34 letters and digits); none may appear in a card.
ACCESS_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
# Recipe keys whose values are credentials (hub_token, api_key, ...), not counts such as `tokens`.
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$", re.IGNORECASE)
TEXT_GENERATION = {"type": "text-generation", "name": "Text Generation"}
# model-index metric types for the report's quality rows (by their label in eval/report.py metric_rows).
QUALITY_METRIC_TYPES = {
    "perplexity": "perplexity",
    "bits per byte": "bits_per_byte",
    "KL(teacher || model), nats/token": "kl_divergence",
    "top-1 agreement with teacher": "top1_agreement",
}


# --- the source ---------------------------------------------------------------------------------


def _quantisation(source: dict[str, Any]) -> str | None:
    """The quantisation of a GGUF source's weights (e.g. "Q4_1"), None for a float or non-GGUF source."""
    quantisation = (source.get("gguf") or {}).get("quantization")
    return quantisation if quantisation and quantisation not in FLOAT_GGUF_TYPES else None


def _license_metadata(source: dict[str, Any]) -> dict[str, Any]:
    """The source's license as card metadata. A name and a link only go with `license: other`; a
    link into the source repo ("LICENSE") is made absolute, since this repo has no such file, or
    left out when the source has no Hub repo to point into."""
    if not source.get("license"):
        return {}
    if source["license"] != "other":
        return {"license": source["license"]}
    meta = {"license": "other", **{key: source[key] for key in ("license_name", "license_link") if source.get(key)}}
    link = meta.get("license_link")
    if link and "://" not in link:
        if source.get("hub_id"):
            meta["license_link"] = f"https://huggingface.co/{source['hub_id']}/blob/{source.get('revision') or 'main'}/{link}"
        else:
            del meta["license_link"]
    return meta


def _hub_metadata(source: dict[str, Any]) -> dict[str, Any]:
    """license (inherited, when the source declares one) and base_model with its relation."""
    meta = _license_metadata(source)
    if not source.get("hub_id"):
        return meta
    # The Hub knows four relations (adapter, merge, quantized, finetune); "quantized" means "this
    # model is a quantisation of the base" and would list a converted float model among the base's
    # quantisations. A conversion changes the weights as a fine-tune does: "finetune", also from a
    # quantised GGUF (the body says the weights started from that file's quantised values).
    return {**meta, "base_model": source["hub_id"], "base_model_relation": "finetune"}


def source_name(source: dict[str, Any]) -> str:
    """What the weights were read from: the GGUF file itself when there was one, else the Hub id or folder."""
    if source.get("kind") == "gguf":
        return Path(source["path"]).name
    return source.get("hub_id") or source["ref"]


def _hub_link(hub_id: str, kind: str = "") -> str:
    return f"[`{hub_id}`](https://huggingface.co/{kind}{hub_id})"


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


def _license_text(source: dict[str, Any]) -> str:
    where = "its GGUF metadata" if source.get("kind") == "gguf" else "its model card"
    if not source.get("license"):
        return f"The source declares no license in {where}, so this card declares none: check the source's terms before use."
    name = f" (`{source['license_name']}`)" if source["license"] == "other" and source.get("license_name") else ""
    return f"License: `{source['license']}`{name}, inherited from the source ({where})."


# --- the model ----------------------------------------------------------------------------------


def _remote_code_files(config: dict[str, Any]) -> list[str]:
    """The modeling files a folder's config sends transformers to (auto_map), e.g. ["modeling_skip.py"]."""
    return sorted({f"{target.split('.')[0]}.py" for target in (config.get("auto_map") or {}).values()})


def _architecture(record: dict[str, Any], remote: list[str]) -> str:
    name = f"`{record['target']['architecture']}`"
    if not remote:
        return f"{name} (native transformers, no remote code)"
    return f"{name} (code in {', '.join(f'`{f}`' for f in remote)} in this folder: load with `trust_remote_code=True`, or `import sparsify` first)"


def _tags(record: dict[str, Any], remote: list[str]) -> list[str]:
    """sparsify, the conversion's tags (its plan's: moe and mixture-of-experts for the MoE variants,
    layer-skip for skip, ...) and the variant's own option tags, which records that lack them still
    get; custom_code where the folder carries modeling code."""
    variant = VARIANTS.get(record.get("variant", ""))
    option_tags = getattr(variant.options, "tags", ()) if variant is not None else ()
    return list(dict.fromkeys(["sparsify", *record.get("tags", []), *option_tags, *(["custom_code"] if remote else [])]))


# --- training data ------------------------------------------------------------------------------


def is_hub_dataset_id(source: str) -> bool:
    """Whether a --data entry names a Hub dataset (owner/name) rather than local files or a glob: the
    shape sparsify.text_files.check_sources takes for a Hub id, and no file or folder of that name here."""
    return source.count("/") == 1 and _repo_id_problem("datasets", source, "dataset") is None and local_files(source) is None


def _looks_local(source: str) -> bool:
    """A path, a glob or a data file name (train.jsonl.gz): never a Hub id, wherever it is read."""
    name = source[:-3] if source.endswith(".gz") else source
    return any(c in source for c in "*?[") or source.startswith((".", "/", "~")) or Path(name).suffix in LOADERS


def training_datasets(record: dict[str, Any]) -> list[str]:
    """The Hub dataset ids the training runs read (their --data), in order, each once."""
    sources = [source for run in record.get("training", []) for source in parse_list(str((run.get("options") or {}).get("data") or ""))]
    return list(dict.fromkeys(source for source in sources if is_hub_dataset_id(source)))


def _data_text(data: str) -> str:
    """The training text of a run in words: Hub datasets linked, local files by their name only."""
    sources = parse_list(data)
    return ", ".join(_hub_link(s, "datasets/") if is_hub_dataset_id(s) else f"the local file `{Path(s).name}`" for s in sources)


def _training_text(record: dict[str, Any]) -> str:
    variant = VARIANTS.get(record.get("variant", ""))
    trained = (variant.decides if variant is not None else "routers").capitalize()
    metrics = variant.heldout_metrics if variant is not None else ()
    paragraphs = []
    for run in record.get("training", []):
        after, before, options = run["after"], run["before"], run.get("options") or {}
        extra = "".join(f", {m.label} {format(after[m.key], m.format)}" + (f" of {m.share_of}" if m.share_of else "")
                        for m in metrics if m.key in after)
        data = _data_text(str(options.get("data") or ""))
        teacher = options.get("teacher")
        against = f"the teacher `{teacher}`" if teacher and teacher != "self" else "the dense teacher"
        paragraphs.append(
            f"{trained} trained (LoRA + KL to {against}) on {run['tokens']:,} tokens{f' of {data}' if data else ''}: held-out perplexity "
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
    lines = [command or f"# sparsify {step}: called from Python, no command line recorded" for step, command in steps]
    # One `sparsify run` makes several steps: its command line is shown once.
    return [line for index, line in enumerate(lines) if index == 0 or line != lines[index - 1]]


# --- evaluation ---------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite metric value, to six significant digits (the Hub shows numbers, not strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


def _eval_dataset(report: dict[str, Any]) -> dict[str, str]:
    """The held-out text of a report as a model-index dataset: its Hub id, or its local file names."""
    sources = parse_list(str(report.get("settings", {}).get("data") or ""))
    if not sources:  # only the speed was measured, on the prompt eval/run.py ships
        return {"type": "sparsify-speed-text", "name": "sparsify eval's built-in speed text"}
    if len(sources) == 1 and is_hub_dataset_id(sources[0]):
        return {"type": sources[0], "name": sources[0], "split": "train"}  # iter_documents streams the train split
    names = _source_names(sources)
    return {"type": names, "name": f"held-out text: {names}"}


def _source_names(sources: list[str]) -> str:
    """Data sources as a card names them: Hub ids whole, local files by their name only."""
    return ", ".join(s if is_hub_dataset_id(s) else Path(s).name for s in sources)


def _quality_and_speed(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A report's quality metrics, and speed ratios to the teacher where both timings are results."""
    metrics = []
    for row in metric_rows(report):
        value = _number(row.model)
        if row.section == "quality" and value is not None:
            metrics.append({"type": QUALITY_METRIC_TYPES.get(row.label, re.sub(r"\W+", "_", row.label).strip("_")), "name": row.label,
                            "value": value})
        # A measured speed row (it has a spread) gives a ratio only when both sides are results.
        elif row.spread is not None and not row.problems and value is not None and _number(row.teacher):
            metrics.append({"type": "speedup", "name": f"{row.label.replace(' (median, min-max)', '')}: model / teacher",
                            "value": _number(row.model / row.teacher)})
    return metrics


def model_index(report: dict[str, Any], name: str, other: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
    """The Hub's model-index of a report: quality (perplexity, bits per byte, KL to the teacher, top-1
    agreement) and speed ratios to the teacher on the held-out text, the same quality figures on the
    other-domain text when `other` is given, and each lm-eval task on its own data. Rows come from
    metric_rows, as in every other table; None when nothing has a value."""
    # A copy per result: one shared dict would be dumped as a YAML anchor and aliases (&id001 / *id001).
    results = [{"task": dict(TEXT_GENERATION), "dataset": _eval_dataset(measured), "metrics": metrics}
               for measured in (report, other) if measured is not None and (metrics := _quality_and_speed(measured))]
    for task, metrics in sorted(((report.get("tasks") or {}).get("model") or {}).items()):
        entries = [{"type": metric, "name": f"{task} {metric}", "value": _number(value)} for metric, value in sorted(metrics.items())
                   if not metric.endswith("_stderr") and _number(value) is not None]
        if entries:
            results.append({"task": dict(TEXT_GENERATION), "dataset": {"type": task, "name": task}, "metrics": entries})
    return [{"name": name, "results": results}] if results else None


def evaluation_section(report: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """The card's "## Evaluation": the report's tables between markers (so that a card sparsify did
    not write can have them replaced), where the whole report is, and the quality on text of another
    domain when `other` is given."""
    teacher = (report.get("teacher") or {}).get("name")
    sources = parse_list(str(report.get("settings", {}).get("data") or ""))
    lines = [
        CARD_BEGIN, "## Evaluation", "",
        f"Measured with `sparsify eval` against {teacher or 'no teacher'} on {report['device']}"
        + (f", held-out text `{_source_names(sources)}`." if sources else "."),
        f"The full report, with its plots, is in [`{EVAL_FOLDER}/report.md`]({EVAL_FOLDER}/report.md).",
        *table_markdown(metric_rows(report), teacher is not None, level=3),
    ]
    if other is not None:
        other_sources = _source_names(parse_list(str(other.get("settings", {}).get("data") or "")))
        rows = [row for row in metric_rows(other) if row.section == "quality"]
        lines += ["", "### Another domain", "", f"The same quality figures on text of another domain, `{other_sources}`, never "
                  f"used for training or for choosing settings ([`{EVAL_FOLDER}/{OTHER_DOMAIN}/report.md`]({EVAL_FOLDER}/{OTHER_DOMAIN}/report.md))."]
        lines += ["", *table_markdown(rows, (other.get("teacher") or {}).get("name") is not None, level=4)[3:]]
    return "\n".join([*lines, CARD_END])


# --- the card -----------------------------------------------------------------------------------


def _without_secrets(tree: Any) -> Any:
    """A recipe with the values of credential keys (hub_token, ...) replaced: a card is public."""
    if isinstance(tree, dict):
        return {key: "<redacted>" if SECRET_KEY.search(str(key)) else _without_secrets(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_without_secrets(item) for item in tree]
    return tree


def _recipe_section(record: dict[str, Any]) -> str:
    recipe = record.get("recipe")
    if not isinstance(recipe, dict) or not recipe:
        return ""
    text = yaml.safe_dump(_without_secrets(recipe), sort_keys=False, allow_unicode=True, width=1000).strip()
    return f"\n## Recipe\n\nThe resolved recipe of `sparsify run` that made this folder:\n\n```yaml\n{text}\n```\n"


def render_card(record: dict[str, Any], params: dict[str, int], config: dict[str, Any], *, report: dict[str, Any] | None = None,
                repo_id: str | None = None, other: dict[str, Any] | None = None) -> str:
    """The card of a folder sparsify wrote, from its record, its parameter counts, its config.json,
    the eval report stored with it (if any) and the Hub repo it goes to (if known)."""
    source = record["source"]
    remote = _remote_code_files(config)
    name = source_name(source)
    title = f"{record['variant']} upcycle of {name}"
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", **_hub_metadata(source)}
    datasets = training_datasets(record)
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = _tags(record, remote)
    index = model_index(report, repo_id.split("/")[-1] if repo_id else title, other) if report else None
    if index:
        meta["model-index"] = index
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000).strip()

    rows = [
        ("variant", f"`{record['variant']}`"),
        ("architecture", _architecture(record, remote)),
        *layout_rows(record["variant"], record["layout"]),
        ("total parameters", f"{params['total']:,}"),
        ("active parameters per token", f"{params['active']:,}"),
        ("dtype", record["target"]["dtype"]),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    # Written together with the weights' fingerprint, so there is nothing on disk to check yet.
    verdict = teacher_verdict(record)
    verdict_line = VERDICT_LINES[verdict.state].format(name=name, reason=verdict.reason)
    load_options = ", trust_remote_code=True" if remote else ""
    repo = repo_id or "path/or/repo"
    steps = "\n".join(commands(record))
    evaluation = f"\n{evaluation_section(report, other)}\n" if report else ""
    card = f"""---
{header}
---

# {title}

{SOURCE_TEXTS[source['kind']](source)} Made by [sparsify](https://pypi.org/project/sparsify-lm/) (`{record['variant']}`).
{_license_text(source)}

{table}

{verdict_line}{_training_text(record)}
{evaluation}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}"{load_options})
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```
{_recipe_section(record)}
## How it was made

```
{steps}
```

`sparsify.json` in this folder records the source, every option, the library versions and a
fingerprint (size, sha256) of the weights, config and modeling code as sparsify wrote them.
"""
    # Nothing above reads the environment; a token typed into a recorded command line is cut all the same.
    return ACCESS_TOKEN.sub("hf_<redacted>", card)


def refresh_card(folder: Path, repo_id: str | None = None) -> Path:
    """Re-render README.md of a folder sparsify wrote from its files: sparsify.json, config.json, the
    weights' parameter counts and eval/report.json when `sparsify eval --card` stored one; `repo_id`
    (the Hub repo it is pushed to) goes into the usage snippet. Written atomically. A folder without
    sparsify.json keeps its README.md as it is. Returns the card's path."""
    folder = Path(folder)
    card = folder / "README.md"
    record = read_record(folder)
    if record is None:
        return card
    config = json.loads((folder / "config.json").read_text())
    stored, other = folder / EVAL_FOLDER / "report.json", folder / EVAL_FOLDER / OTHER_DOMAIN / "report.json"
    report = load_report(stored) if stored.exists() else None
    # Replaced whole: a reader (or an upload) sees the old card or the new one, never half.
    write_text_atomically(card, render_card(record, count_params(folder, config), config, report=report, repo_id=repo_id,
                                            other=load_report(other) if report and other.exists() else None))
    return card


# --- checking a card's metadata -----------------------------------------------------------------


def _ids(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _repo_id_problem(field: str, value: Any, kind: str) -> str | None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str):
        return f"{field}: {value!r} is not a string"
    if _looks_local(value):
        return f"{field}: '{value}' is not a Hub {kind} id (owner/name) but a local path or file pattern"
    try:
        validate_repo_id(value)
    except HFValidationError:
        return f"{field}: '{value}' is not a Hub {kind} id (owner/name)"
    return None


def _strings(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [s for key, value in tree.items() for s in (*_strings(key), *_strings(value))]
    if isinstance(tree, list):
        return [s for item in tree for s in _strings(item)]
    return [tree] if isinstance(tree, str) else []


def card_metadata_problems(meta: dict[str, Any]) -> list[str]:
    """Each rule of the Hub's card metadata that `meta` (a card's YAML header) breaks, as one line:
    base_model ids and base_model_relation, license identifiers, dataset ids, the types of
    library_name, pipeline_tag and tags, and model-index as huggingface_hub's own parser reads it."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    problems = []
    for key in ("library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"{key}: must be one string, not {meta[key]!r}")
    if "tags" in meta and not all(isinstance(tag, str) for tag in _ids(meta["tags"])):
        problems.append(f"tags: every tag must be a string, got {meta['tags']!r}")

    bases = [] if meta.get("base_model") is None else _ids(meta["base_model"])
    problems += [p for base in bases if (p := _repo_id_problem("base_model", base, "model"))]
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            problems.append(f"base_model_relation: '{relation}' is not one the Hub knows ({', '.join(BASE_MODEL_RELATIONS)})")
        if not bases:
            problems.append("base_model_relation: given without a base_model")
        elif relation != "merge" and len(bases) > 1:
            problems.append(f"base_model_relation: '{relation}' has one parent, but base_model lists {len(bases)} (several are a merge)")

    license_id = meta.get("license")
    if license_id is not None and license_id not in HUB_LICENSES:
        problems.append(f"license: '{license_id}' is not a Hub license identifier (docs/hub/repositories-licenses.md); "
                        "use `other` with license_name and license_link, or add it to HUB_LICENSES if the Hub lists it now")
    if license_id == "other" and not isinstance(meta.get("license_name"), str):
        problems.append("license: `other` needs a license_name (and a license_link)")
    if license_id != "other" and ("license_name" in meta or "license_link" in meta):
        problems.append("license_name/license_link: only read with `license: other`")

    if meta.get("datasets") is not None:
        problems += [p for dataset in _ids(meta["datasets"]) if (p := _repo_id_problem("datasets", dataset, "dataset"))]

    if "model-index" in meta:
        try:
            _, results = model_index_to_eval_results(meta["model-index"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            problems.append(f"model-index: huggingface_hub cannot parse it ({type(error).__name__}: {error})")
        else:
            if not results:
                problems.append("model-index: has no results")
            problems += [f"model-index: metric '{r.metric_name or r.metric_type}' has the value {r.metric_value!r}, not a number"
                         for r in results if _number(r.metric_value) is None]

    if any(ACCESS_TOKEN.search(text) for text in _strings(meta)):
        problems.append("a value looks like a Hugging Face access token; a card is public")
    return problems
